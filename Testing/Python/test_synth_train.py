"""The synthetic-brain training loop (Med3DFMLib/synth/train.py) on the two real 2 mm label maps of
Testing/Data/synthseg, with the tiny encoder at 4 mm and 32^3 crops so that every run takes seconds:
a few steps train with a finite loss; a run stopped and resumed reaches bit-identical weights to an
uninterrupted one (same device, one thread); damaged or foreign checkpoints are refused clearly; the
held-out maps never reach the training sampler; the validation Dice is 1.0 for a perfect prediction
on real maps; the time budget and SIGINT stop cleanly with a checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.models import VARIANTS
from Med3DFMLib.preprocess import InputSpec
from Med3DFMLib.synth import SYNTHSEG_OUTPUT_LABELS, SynthConfig, SynthGenerator, load_label_table
from Med3DFMLib.synth.train import (
    HELD_OUT_MAPS,
    NUM_CLASSES,
    VALIDATION_STRUCTURES,
    SynthBatches,
    SynthTrainConfig,
    ValidationSet,
    checkpoint_state,
    config_for_resume,
    learning_rate,
    map_name,
    read_checkpoint,
    split_maps,
    structure_dice,
    synth_batch,
    train,
    validate,
)
from Med3DFMLib.weights import write_weights

torch.set_num_threads(1)

HELD = ("training_seg_02_2mm",)


@pytest.fixture(scope="module")
def maps(data_dir):
    return data_dir / "synthseg"


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A tiny encoder weight file with its card, as the registry's encoder files are."""
    from Med3DFMLib.models import DualBranchEncoder

    torch.manual_seed(1)
    module = DualBranchEncoder(VARIANTS["tiny"])
    card = {"id": "tiny-test-encoder", "version": "0.0.1", "task": "encoder",
            "architecture": {"type": "encoder", "encoder": VARIANTS["tiny"].to_dict()}, "input": InputSpec().to_card()}
    path = tmp_path_factory.mktemp("encoder") / "tiny.safetensors"
    write_weights(path, module.state_dict(), card)
    return path


def _config(maps, output, **changes) -> SynthTrainConfig:
    settings = dict(maps=str(maps), output=str(output), encoder="", encoder_config=VARIANTS["tiny"].to_dict(),
                    spacing=4.0, crop=32, held_out=HELD, val_images_per_map=1, val_every=0, log_every=1, warmup_steps=3)
    settings.update(changes)
    return SynthTrainConfig(**settings)


def _quiet(_message: str) -> None:
    """Progress lines are not under test."""


def _log(output):
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def test_a_few_steps_train_from_the_encoder_file_with_a_finite_loss(maps, tiny_encoder, tmp_path):
    config = _config(maps, tmp_path / "run", encoder=str(tiny_encoder), encoder_config={}, max_steps=3)
    summary = train(config, echo=_quiet)
    assert summary["steps"] == 3 and summary["stopped_by"] == "max_steps"
    losses = [e for e in _log(tmp_path / "run") if "loss" in e]
    assert [e["step"] for e in losses] == [1, 2, 3]
    assert all(math.isfinite(e["loss"]) and e["loss"] > 0 for e in losses)
    assert [e["lr"] for e in losses] == [learning_rate(config, s) for s in range(3)]
    assert all(e["samples_per_s"] > 0 and e["seconds_per_step"] > 0 for e in losses)

    weights, moments, state = read_checkpoint(tmp_path / "run" / "last.safetensors")
    assert state["step"] == 3 and state["sampler"]["next_step"] == 3 and state["seconds"] > 0
    assert state["encoder_init"]["id"] == "tiny-test-encoder"
    assert state["architecture"]["num_classes"] == NUM_CLASSES == 33
    assert moments and all(torch.isfinite(v).all() for v in weights.values())
    # the encoder started from the file: its weights moved only a little in 3 small steps
    start = load_file(str(tiny_encoder))
    name = next(k for k in start if k.endswith("weight") and start[k].ndim > 1)
    assert not torch.equal(weights[f"encoder.{name}"], start[name])
    assert torch.allclose(weights[f"encoder.{name}"], start[name], atol=1e-3)
    # a validation ran at the end and its checkpoint is the best one
    assert len(state["validation"]) == 1 and set(state["validation"][0]["per_structure"]) == set(VALIDATION_STRUCTURES)
    assert checkpoint_state(tmp_path / "run" / "best.safetensors")["best"]["step"] == 3


def test_a_stopped_and_resumed_run_reaches_the_same_weights(maps, tmp_path):
    whole = tmp_path / "whole"
    train(_config(maps, whole, max_steps=4), echo=_quiet)
    parts = tmp_path / "parts"
    train(_config(maps, parts, max_steps=2), echo=_quiet)
    resumed = config_for_resume(parts, max_steps=4)
    assert resumed.max_steps == 4 and resumed.crop == 32
    summary = train(resumed, resume=parts, echo=_quiet)
    assert summary["part_steps"] == 2

    a_weights, a_moments, a_state = read_checkpoint(whole / "last.safetensors")
    b_weights, b_moments, b_state = read_checkpoint(parts / "last.safetensors")
    assert a_state["step"] == b_state["step"] == 4
    for name in a_weights:
        assert torch.equal(a_weights[name], b_weights[name]), name
    for name in a_moments:
        assert torch.equal(a_moments[name], b_moments[name]), name
    # the same losses and learning rates step by step: the same samples, the same schedule
    strip = lambda state: [(e["step"], e["loss"], e["lr"]) for e in state["history"]]  # noqa: E731
    assert strip(a_state) == strip(b_state) and [s for s, _, _ in strip(b_state)] == [1, 2, 3, 4]
    assert [(p["from_step"], p["to_step"]) for p in b_state["parts"]] == [(0, 2), (2, 4)]


def test_a_closing_part_anneals_the_learning_rate_to_zero_and_stops_at_its_end(maps, tmp_path):
    run = tmp_path / "run"
    first = _config(maps, run, max_steps=4)
    train(first, echo=_quiet)
    closing = config_for_resume(run, max_steps=0, anneal_from=4, anneal_to=8)  # per-part settings: no refusal
    summary = train(closing, resume=run, echo=_quiet)
    assert summary["steps"] == 8 and summary["stopped_by"] == "anneal"
    rates = {e["step"]: e["lr"] for e in read_checkpoint(run / "last.safetensors")[2]["history"]}
    # the update of step s (logged at s + 1) uses lr * (1 + cos(pi (s - 4) / 4)) / 2
    assert [rates[s + 1] for s in range(4, 8)] == pytest.approx([first.lr * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)])
    assert rates[4] == first.lr and learning_rate(closing, 8) == 0.0
    # a later part without the anneal is back at the constant rate
    assert learning_rate(config_for_resume(run, anneal_from=0, anneal_to=0), 9) == first.lr
    for bad in ((5, 5), (6, 2), (-1, 3)):
        with pytest.raises(Med3DFMError, match="annealing needs"):
            _config(maps, run, anneal_from=bad[0], anneal_to=bad[1])


def test_the_sample_stream_continues_and_never_repeats(maps):
    paths, _ = split_maps(maps, HELD)
    generator = SynthGenerator(paths, SynthConfig(target_spacing=4.0, crop_shape=32), table=load_label_table(maps))
    first = iter(SynthBatches(generator, 0, 0, 1, 0))
    drawn = [next(first) for _ in range(3)]
    assert [d[0] for d in drawn] == [0, 1, 2]
    again = next(iter(SynthBatches(generator, 0, 0, 1, 2)))  # a run resumed at step 2
    assert again[0] == 2 and torch.equal(again[1], drawn[2][1]) and torch.equal(again[2], drawn[2][2])
    assert not torch.equal(drawn[0][1], drawn[1][1])
    other_rank = synth_batch(generator, 0, 2, 1, 1)
    assert not torch.equal(other_rank[0], drawn[2][1])
    # targets are class indices of the 33 outputs; images are standardised like an MR card's input
    assert int(drawn[0][2].max()) < NUM_CLASSES and drawn[0][1].shape == (1, 1, 32, 32, 32)
    assert abs(float(drawn[0][1].mean())) < 0.2 and float(drawn[0][1].std()) == pytest.approx(1.0, abs=0.2)


def test_damaged_or_foreign_checkpoints_are_refused_clearly(maps, tiny_encoder, tmp_path):
    run = tmp_path / "run"
    train(_config(maps, run, max_steps=1), echo=_quiet)
    good = (run / "last.safetensors").read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(Med3DFMError, match="not a valid safetensors"):
        read_checkpoint(truncated)
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(Med3DFMError, match="not a valid safetensors"):
        read_checkpoint(noise)
    with pytest.raises(Med3DFMError, match="not a synthetic-brain training checkpoint"):
        read_checkpoint(tiny_encoder)
    broken_state = tmp_path / "state.safetensors"
    save_file({"model.x": torch.zeros(1)}, str(broken_state), metadata={"med3dfm.synth_checkpoint": "{not json"})
    with pytest.raises(Med3DFMError, match="not valid JSON"):
        read_checkpoint(broken_state)
    with pytest.raises(Med3DFMError, match="no checkpoint"):
        train(_config(maps, tmp_path / "empty"), resume=tmp_path / "empty", echo=_quiet)

    # tensors that do not fit the model the state describes
    weights, moments, state = read_checkpoint(run / "last.safetensors")
    name = next(iter(weights))
    weights[name] = torch.zeros(3, 3)
    tensors = {**{f"model.{k}": v for k, v in weights.items()}, **{f"optimizer.{k}": v for k, v in moments.items()}}
    wrong = tmp_path / "wrong" / "last.safetensors"
    wrong.parent.mkdir()
    save_file(tensors, str(wrong), metadata={"med3dfm.synth_checkpoint": json.dumps(state)})
    with pytest.raises(Med3DFMError, match="do not fit its model"):
        train(config_for_resume(wrong, output=str(wrong.parent), max_steps=2), resume=wrong, echo=_quiet)

    # a resumed part may not change what is learned
    with pytest.raises(Med3DFMError, match="keeps its training settings.*crop 64"):
        config_for_resume(run, crop=64)
    with pytest.raises(Med3DFMError, match="differs from the resumed run's in crop"):
        train(_config(maps, run, crop=64, max_steps=2), resume=run, echo=_quiet)


def test_the_held_out_maps_never_reach_the_training_sampler(maps, tmp_path):
    # the default split on a SynthSeg-style folder: 19 and 20 held out, the other 18 trained on
    folder = tmp_path / "maps"
    folder.mkdir()
    for index in range(1, 21):
        (folder / f"training_seg_{index:02d}.nii.gz").touch()
    training, held = split_maps(folder, HELD_OUT_MAPS)
    assert [map_name(p) for p in held] == list(HELD_OUT_MAPS)
    assert len(training) == 18 and not {map_name(p) for p in training} & set(HELD_OUT_MAPS)
    with pytest.raises(Med3DFMError, match="held-out maps not found.*training_seg_21"):
        split_maps(folder, ("training_seg_21",))
    with pytest.raises(Med3DFMError, match="nothing to train on"):
        split_maps(maps, ("training_seg_01_2mm", "training_seg_02_2mm"))

    # on the real maps: the sampler only ever draws from the training map, and a run records it
    training, held = split_maps(maps, HELD)
    generator = SynthGenerator(training, SynthConfig(target_spacing=4.0, crop_shape=32), table=load_label_table(maps))
    names = set()
    for step in range(12):
        generator.reseed(step)
        names.add(generator.sample_with_info()[2]["map_name"])
    assert names == {"training_seg_01_2mm.nii.gz"}
    train(_config(maps, tmp_path / "run", max_steps=1), echo=_quiet)
    state = checkpoint_state(tmp_path / "run" / "last.safetensors")
    assert state["maps"] == {"training": ["training_seg_01_2mm"], "held_out": list(HELD)}


def test_the_validation_dice_is_one_for_a_perfect_prediction(maps):
    arrays = [sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(p)), "LPS")).astype(np.int64)
              for p in sorted(maps.glob("training_seg_*_2mm.nii.gz"))]
    kept = [np.where(np.isin(a, SYNTHSEG_OUTPUT_LABELS), a, 0) for a in arrays]
    for labels in kept:
        scores = structure_dice(labels, labels)
        assert set(scores) == set(VALIDATION_STRUCTURES) and all(v == 1.0 for v in scores.values())
    # another head is a poor prediction of this one; swapping the hemispheres ruins the sided ones
    cross = structure_dice(kept[1], kept[0])
    # (the heads are not aligned: small structures may not overlap at all)
    assert all(0.0 <= v < 0.95 for v in cross.values()) and sum(v > 0.1 for v in cross.values()) >= 6
    mirror = np.arange(max(SYNTHSEG_OUTPUT_LABELS) + 1)
    mirror[[2, 41, 17, 53]] = [41, 2, 53, 17]
    scores = structure_dice(mirror[kept[0]], kept[0])
    assert scores["cerebral white matter"] == scores["hippocampus"] == 0.0 and scores["brain stem"] == 1.0

    # end to end through the sliding window: a model that reads the labels off its input is perfect
    classes = np.zeros(max(SYNTHSEG_OUTPUT_LABELS) + 1, dtype=np.int64)
    classes[list(SYNTHSEG_OUTPUT_LABELS)] = np.arange(NUM_CLASSES)

    class Oracle(torch.nn.Module):
        num_classes = NUM_CLASSES

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 10.0 * F.one_hot(x[:, 0].round().long(), NUM_CLASSES).permute(0, 4, 1, 2, 3).float()

    data = ValidationSet([classes[kept[0]].astype(np.float32)], [kept[0].astype(np.uint8)], ["map 1"])
    result = validate(Oracle(), data, 64, torch.device("cpu"))
    assert result["dice"] == 1.0 and all(v == 1.0 for v in result["per_structure"].values())


def test_the_time_budget_and_sigint_stop_with_a_checkpoint(maps, tmp_path):
    summary = train(_config(maps, tmp_path / "budget", minutes=0.25), echo=_quiet)
    assert summary["stopped_by"] == "budget" and summary["steps"] > 0 and summary["seconds"] < 0.25 * 60 + 30
    assert checkpoint_state(tmp_path / "budget" / "last.safetensors")["step"] == summary["steps"]

    def interrupt_at_step_2(message: str) -> None:
        if message.startswith("step 2 "):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of a run without a limit

    before = signal.getsignal(signal.SIGINT)
    summary = train(_config(maps, tmp_path / "signal"), echo=interrupt_at_step_2)
    assert summary["stopped_by"] == "signal" and summary["steps"] == 2
    state = checkpoint_state(tmp_path / "signal" / "last.safetensors")
    assert state["step"] == 2 and state["validation"] == []  # a signal saves at once, no validation
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back


def _scripts():
    import importlib
    import sys
    from pathlib import Path

    scripts = str(Path(__file__).resolve().parents[2] / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("bundle_synth_brain"), importlib.import_module("evaluate_synth_brain")


def test_the_real_t1_has_the_true_axes_the_evaluation_gives_it(data_dir):
    """The voxelmorph T1 was stored without an affine; with evaluate_synth_brain's LIA direction its
    aseg lies the right way round in LPS: left labels at +x, the cerebellum behind (+y) the caudate,
    the brain stem below (-z) the thalamus."""
    _, evaluate = _scripts()
    aseg = evaluate.with_true_axes(sitk.ReadImage(str(data_dir / "brain" / "aseg_4mm.nii.gz")))
    lps = sitk.DICOMOrient(aseg, "LPS")
    array = sitk.GetArrayFromImage(lps)

    def centre(values):  # (x, y, z) in mm of the LPS grid
        where = np.argwhere(np.isin(array, values))[:, ::-1]
        return np.array(lps.TransformContinuousIndexToPhysicalPoint(where.mean(0).tolist()))

    assert centre([2, 3]) [0] > centre([41, 42])[0] + 20        # left hemisphere at +x (L)
    assert centre([8, 47])[1] > centre([11, 50])[1] + 30        # cerebellum posterior of the caudate
    assert centre([16])[2] < centre([10, 49])[2] - 10           # brain stem inferior to the thalamus
    raw = sitk.ReadImage(str(data_dir / "brain" / "aseg_4mm.nii.gz"))  # as stored, the sides come out mirrored
    stored = sitk.GetArrayFromImage(sitk.DICOMOrient(raw, "LPS"))
    assert np.argwhere(stored == 2)[:, 2].mean() > np.argwhere(stored == 41)[:, 2].mean()
    assert raw.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_the_mni_tissues_take_every_brain_structure_once_and_no_fluid(tmp_path):
    """The template is scored as grey and white matter: each of the model's 32 structures is in
    exactly one tissue except the ventricles and CSF, in none; a folder without the files is refused."""
    _, evaluate = _scripts()
    grey, white = set(evaluate.TISSUES["grey matter"]), set(evaluate.TISSUES["white matter"])
    assert not grey & white
    fluid = {4, 43, 5, 44, 14, 15, 24}
    assert grey | white | fluid | {0} == set(SYNTHSEG_OUTPUT_LABELS) and not (grey | white) & fluid
    with pytest.raises(SystemExit, match="missing mni_icbm152_t1"):
        evaluate.score_mni(None, {}, tmp_path)


def test_a_checkpoint_bundles_into_a_segment_model_that_knows_its_domain(maps, data_dir, tmp_path, capsys):
    from Med3DFMLib.domain import check, measure_image
    from Med3DFMLib.segment import load_segmenter
    from Med3DFMLib.weights import read_card

    bundle, evaluate = _scripts()
    run = tmp_path / "run"
    train(_config(maps, run, max_steps=2), echo=_quiet)
    out = tmp_path / "synth-brain-test.safetensors"
    assert bundle.main([str(run / "best.safetensors"), "--out", str(out), "--maps", str(maps), "--id", "synth-brain-test"]) == 0
    entry = json.loads(capsys.readouterr().out)
    card = read_card(out)
    assert entry["files"][0]["size"] == out.stat().st_size and card["task"] == "segment"
    assert card["licence"] == "Apache-2.0"  # a random initialisation owes only the data's licence
    labels = {e["name"]: e for e in card["labels"]}
    assert len(labels) == NUM_CLASSES - 1 and [e["value"] for e in card["labels"]] == list(range(1, NUM_CLASSES))
    assert labels["left hippocampus"]["terminology"]["type"][1] == "5366008"
    assert labels["left hippocampus"]["terminology"]["typeModifier"][2] == "Left"
    assert card["training"]["class_labels"] == list(SYNTHSEG_OUTPUT_LABELS) and card["metrics"]["step"] == 2

    # the domain: a whole brain fits, a hippocampus crop and a CT do not
    brain = evaluate.with_true_axes(sitk.ReadImage(str(data_dir / "brain" / "t1_brain_4mm.nii.gz"), sitk.sitkFloat32))
    assert check(measure_image(brain), card["domain"]).fits
    # a whole-head acquisition's field of view (256 mm, air around the head) fits too
    whole_head = sitk.ConstantPad(brain, [0, 0, 0], [64 - s for s in brain.GetSize()], 0.0)
    assert measure_image(whole_head).extent_mm == pytest.approx((256.0, 256.0, 256.0))
    assert check(measure_image(whole_head), card["domain"]).fits
    crop = sitk.ReadImage(str(sorted((data_dir / "hippocampus" / "images").glob("*.nii.gz"))[0]), sitk.sitkFloat32)
    verdict = check(measure_image(crop), card["domain"])
    assert not verdict.fits and "field of view" in verdict.reason()
    ct = sitk.ReadImage(str(data_dir / "totalseg" / "example_ct_sm.nii.gz"))
    assert "trained on MR" in check(measure_image(ct), card["domain"]).reason()

    # it segments through the library's pipeline; the evaluation maps classes to FreeSurfer labels
    segmenter = load_segmenter(str(out), device_name="cpu")
    predicted = evaluate.freesurfer_labels(segmenter, card, brain)
    assert predicted.shape == sitk.GetArrayFromImage(brain).shape
    assert set(np.unique(predicted)) <= set(SYNTHSEG_OUTPUT_LABELS)

    # with the real-scan evaluation of these weights the card states it (metrics and limits); an
    # evaluation of other weights is refused. The numbers here stand in for evaluate_synth_brain's.
    per_structure = {name: 0.5 for name in VALIDATION_STRUCTURES}
    evaluation = {"model": {"steps": 2}, "real_t1": {"T1": {"mean_dice": 0.61, "per_structure": per_structure, "seconds": 3.0},
                                                    "T1, brain intensities inverted (T2-like)": {"mean_dice": 0.52, "per_structure": per_structure},
                                                    "peer: one labelled T1 registered": {"mean_dice": 0.7}}}
    scored = tmp_path / "eval.json"
    scored.write_text(json.dumps(evaluation))
    assert bundle.main([str(run / "best.safetensors"), "--out", str(out), "--maps", str(maps), "--evaluation", str(scored)]) == 0
    card = read_card(out)
    assert card["metrics"]["mean_dice"] == 0.61 and card["metrics"]["synthetic_validation"]["step"] == 2
    assert card["metrics"]["real_t1"]["registration_peer_mean_dice"] == 0.7
    assert card["limits"].startswith("Measured on one real T1 only: mean Dice 0.61") and "0.70" in card["limits"]
    evaluation["model"]["steps"] = 3
    scored.write_text(json.dumps(evaluation))
    capsys.readouterr()
    assert bundle.main([str(run / "best.safetensors"), "--out", str(tmp_path / "other.safetensors"), "--maps", str(maps), "--evaluation", str(scored)]) == 2
    assert "scored the weights of step 3" in capsys.readouterr().err and not (tmp_path / "other.safetensors").exists()


def test_the_loss_without_one_hot_volumes_equals_the_one_hot_formula_on_a_real_label_map(maps):
    """segmentation_loss gathers and scatters by class (a one-hot volume of 33 classes made the loss
    half of a U-Net step); it must give the one-hot formula's value and gradient, IGNORE voxels
    counting for neither."""
    from Med3DFMLib.fewshot.decoder import IGNORE, segmentation_loss
    from Med3DFMLib.synth import SYNTHSEG_OUTPUT_LABELS

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(maps / "training_seg_01_2mm.nii.gz")))[56:72, 52:76, 52:76]
    lookup = {v: i for i, v in enumerate(SYNTHSEG_OUTPUT_LABELS)}
    targets = torch.tensor(np.vectorize(lambda v: lookup.get(int(v), 0))(labels), dtype=torch.long)[None]
    assert len(torch.unique(targets)) > 5
    targets[0, :, :, :3] = IGNORE
    torch.manual_seed(0)
    logits = torch.randn(1, NUM_CLASSES, *targets.shape[1:], requires_grad=True)

    known = targets != IGNORE
    safe = targets.clamp_min(0)
    onehot = F.one_hot(safe, NUM_CLASSES).permute(0, 4, 1, 2, 3).float() * known[:, None]
    probabilities = logits.softmax(1) * known[:, None]
    intersection = (probabilities * onehot)[:, 1:].sum((0, 2, 3, 4))
    total = (probabilities + onehot)[:, 1:].sum((0, 2, 3, 4))
    expected = F.cross_entropy(logits, safe, reduction="none")[known].mean() + 1 - ((2 * intersection + 1) / (total + 1)).mean()
    (expected_grad,) = torch.autograd.grad(expected, logits)

    value = segmentation_loss(logits, targets, NUM_CLASSES - 1)
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.allclose(value, expected, atol=1e-6)
    assert torch.allclose(grad, expected_grad, atol=1e-8)
    assert float(grad[..., :3].abs().max()) == 0.0  # ignored voxels get no gradient


def test_a_unet_run_keeps_bfloat16_moments_resumes_and_bundles_into_a_segment_model(maps, data_dir, tmp_path, capsys):
    """The CPU recipe: MONAI's plain U-Net from scratch with the AdamW moments stored in bfloat16
    (a checkpoint small enough to commit); it resumes, bundles and segments like the dual-branch model."""
    from Med3DFMLib.explain.segmentation import ModelExplainer
    from Med3DFMLib.models import UNetSegmentationModel, load_segmentation_model
    from Med3DFMLib.segment import load_segmenter
    from Med3DFMLib.weights import load_tensors, read_card

    changes = dict(network="unet", unet_channels=(4, 8, 16), moments_dtype="bfloat16")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(_config(maps, whole, max_steps=3, **changes), echo=_quiet)
    train(_config(maps, parts, max_steps=2, **changes), echo=_quiet)
    stored = load_file(str(parts / "last.safetensors"))
    assert {v.dtype for k, v in stored.items() if k.startswith("optimizer.") and k.endswith("exp_avg_sq")} == {torch.bfloat16}
    assert {v.dtype for k, v in stored.items() if k.startswith("model.")} == {torch.float32}
    summary = train(config_for_resume(parts, max_steps=3), resume=parts, echo=_quiet)
    assert summary["part_steps"] == 1

    a_weights, _, a_state = read_checkpoint(whole / "last.safetensors")
    b_weights, b_moments, b_state = read_checkpoint(parts / "last.safetensors")
    assert b_state["architecture"] == {"type": "segmentation", "network": "unet", "channels": [4, 8, 16], "num_classes": NUM_CLASSES}
    assert b_state["encoder_init"] is None and all(v.dtype != torch.bfloat16 for v in b_moments.values())
    # not bit-exact (the moments were rounded), but the same run: same samples, nearly the same weights
    losses = lambda state: [(e["step"], e["loss"]) for e in state["history"]]  # noqa: E731
    assert [s for s, _ in losses(b_state)] == [1, 2, 3] and losses(a_state)[:2] == losses(b_state)[:2]
    assert abs(losses(a_state)[2][1] - losses(b_state)[2][1]) < 1e-2
    for name in a_weights:
        assert torch.allclose(a_weights[name], b_weights[name], atol=1e-4), name

    bundle, evaluate = _scripts()
    out = tmp_path / "synth-brain-unet-test.safetensors"
    assert bundle.main([str(parts / "last.safetensors"), "--out", str(out), "--maps", str(maps), "--id", "synth-brain-unet-test"]) == 0
    capsys.readouterr()
    card = read_card(out)
    assert "MONAI 3D U-Net (channels 4-8-16" in card["training"]["method"] and card["licence"] == "Apache-2.0"
    model = load_segmentation_model(load_tensors(out), card)
    assert isinstance(model, UNetSegmentationModel) and model.window_multiple == 4
    brain = evaluate.with_true_axes(sitk.ReadImage(str(data_dir / "brain" / "t1_brain_4mm.nii.gz"), sitk.sitkFloat32))
    predicted = evaluate.freesurfer_labels(load_segmenter(str(out), device_name="cpu"), card, brain)
    assert predicted.shape == sitk.GetArrayFromImage(brain).shape
    with pytest.raises(Med3DFMError, match="plain U-Net.*occlusion"):
        ModelExplainer(model, (32, 32, 32), torch.device("cpu")).gradcam(np.zeros((32, 32, 32), np.float32), np.ones((32, 32, 32), np.float32), 1)


def test_a_card_naming_an_unknown_network_is_refused_clearly():
    from Med3DFMLib.models import build_segmentation_model

    with pytest.raises(Med3DFMError, match="network 'transformer-xl' this version does not know"):
        build_segmentation_model({"type": "segmentation", "network": "transformer-xl", "num_classes": 3})
    with pytest.raises(Med3DFMError, match="network must be dual-branch or unet"):
        SynthTrainConfig(maps=".", output=".", network="resnet")
    with pytest.raises(Med3DFMError, match="multiple of 32 for a U-Net of 6 levels"):
        SynthTrainConfig(maps=".", output=".", network="unet", unet_channels=(4, 8, 16, 32, 64, 128), crop=48)
