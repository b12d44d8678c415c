"""Other patients: the convolutional decoder over the frozen encoder, trained with augmentation within
a time budget (Med3DFMLib.fewshot.decoder, `med3dfm adapt --mode decoder`), on the fixture MR crops."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch

from Med3DFMLib.cli import main
from Med3DFMLib.fewshot.adapt import stop_file_for
from Med3DFMLib.fewshot.decoder import augmentation, lateralised
from Med3DFMLib.weights import read_weights

TRAIN = ("hippocampus_014", "hippocampus_024")
TEST = "hippocampus_035"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / (np.sum(a) + np.sum(b)))


def _pairs(data_dir, folder):
    """--image/--labels for the training patients, their two hippocampus parts merged into one label."""
    arguments = []
    for name in TRAIN:
        labels = sitk.ReadImage(str(data_dir / "hippocampus" / "labels" / f"{name}.nii.gz"))
        merged = sitk.Cast(labels > 0, sitk.sitkUInt8)
        path = folder / f"{name}_hippocampus.nii.gz"
        sitk.WriteImage(merged, str(path))
        arguments += ["--image", str(data_dir / "hippocampus" / "images" / f"{name}.nii.gz"), "--labels", str(path)]
    return arguments


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """Two labelled patients, dense labels, `--mode auto` (→ decoder), a one-minute budget."""
    folder = tmp_path_factory.mktemp("decoder")
    out = folder / "hippocampus.safetensors"
    started = time.perf_counter()
    assert main(["adapt", *_pairs(data_dir, folder), "--name", "hippocampus", "--dense", "--budget-minutes", "1", "-o", str(out), "--progress", "none", "--device", "cpu"]) == 0
    return folder, out, time.perf_counter() - started


def test_decoder_segments_a_patient_it_never_saw(trained, data_dir, tmp_path):
    _, out, _ = trained
    target = tmp_path / "test.seg.nrrd"
    assert main(["segment", str(data_dir / "hippocampus" / "images" / f"{TEST}.nii.gz"), "-o", str(target), "--model", str(out), "--progress", "none", "--device", "cpu"]) == 0
    seg = slicerio.read_segmentation(str(target))
    predicted = seg["voxels"].transpose(2, 1, 0)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "hippocampus" / "labels" / f"{TEST}.nii.gz"))) > 0
    assert [s["name"] for s in seg["segments"]] == ["hippocampus"]  # the single structure takes --name
    # From two patients in one minute: far from good, far from chance (an untrained decoder scores ≈ 0.1).
    score = _dice(predicted == 1, truth)
    assert score > 0.3, score


def test_decoder_card_says_how_it_was_trained(trained):
    _, out, seconds = trained
    tensors, card = read_weights(out)
    assert card["architecture"]["type"] == "feature-decoder" and card["task"] == "adapter"
    trainable = sum(t.numel() for k, t in tensors.items() if not k.startswith("registration."))
    assert 100_000 < trainable <= 1_000_000
    summary = card["training"]["summary"]
    assert summary["mode"] == "decoder" and summary["stopped_by"] == "budget" and summary["steps"] > 10
    assert 59 <= summary["seconds"] <= 70 and seconds < 120  # the budget bounds the training time
    assert summary["held_out_volumes"] == 0  # fewer than 4 volumes: nothing held out, the last state is kept
    record = json.loads((out.parent / "hippocampus.json").read_text())
    assert record["parameters"]["mode"] == "auto: decoder" and record["training"]["steps"] == summary["steps"]


def test_a_stop_file_ends_training_early_and_keeps_the_model(data_dir, tmp_path):
    """What Slicer's Cancel does for a long budget: the job stops and writes the model it has."""
    out = tmp_path / "stopped.safetensors"

    def stop_soon() -> None:
        time.sleep(8)
        stop_file_for(out).write_text("stop\n")

    threading.Thread(target=stop_soon, daemon=True).start()
    started = time.perf_counter()
    assert main(["adapt", *_pairs(data_dir, tmp_path), "--name", "h", "--mode", "decoder", "--dense", "--budget-minutes", "5", "-o", str(out), "--progress", "none", "--device", "cpu"]) == 0
    assert time.perf_counter() - started < 60
    _, card = read_weights(out)
    assert card["training"]["summary"]["stopped_by"] == "user" and card["training"]["summary"]["steps"] > 0
    assert not stop_file_for(out).exists()  # the request is consumed


def test_augmentation_moves_the_labels_with_the_image(data_dir):
    """The label map given as the image too: after any augmentation draw, the moved image (rounded)
    and the moved labels must still agree (intensity changes stay well within ±0.5 of a label value)."""
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "hippocampus" / "labels" / f"{TRAIN[0]}.nii.gz"))).astype(np.float32)
    transform = augmentation([2], seed=3)
    agreements, unmoved = [], []
    for _ in range(8):
        out = transform({"image": torch.from_numpy(labels[None].copy()), "label": torch.from_numpy(labels[None].copy())})
        moved_labels = np.asarray(out["label"])[0]
        moved_image = np.rint(np.asarray(out["image"])[0])
        assert set(np.unique(moved_labels)) <= {0.0, 1.0, 2.0}  # nearest neighbour: no new label values
        agreements.append(min(_dice(moved_image == v, moved_labels == v) for v in (1.0, 2.0)))
        unmoved.append(min(_dice(labels == v, moved_labels == v) for v in (1.0, 2.0)))
    # Bilinear against nearest-neighbour resampling differs on the boundary of these thin structures
    # (measured 0.74–0.84); labels drawn apart from the image would agree no better than the unmoved map.
    assert min(agreements) > 0.7 and np.mean(agreements) > np.mean(unmoved) + 0.1, (agreements, unmoved)


def test_lateralised_names_forbid_left_right_flips():
    assert lateralised(["left kidney"]) and lateralised(["Kidney_R", "r"]) and not lateralised(["liver", "anterior hippocampus"])


def test_explain_writes_a_map_for_a_decoder_adapter(trained, data_dir, tmp_path):
    """Grad-CAM of a decoder adapter: a map in [0, 1] on the input grid that is not flat (whether it
    points at the structure is measured by the heatmap evaluation, not here)."""
    _, out, _ = trained
    image = data_dir / "hippocampus" / "images" / f"{TEST}.nii.gz"
    heat = tmp_path / "heat.nrrd"
    assert main(["explain", str(image), "--model", str(out), "--target", "hippocampus", "-o", str(heat), "--method", "gradcam", "--progress", "none", "--device", "cpu"]) == 0
    heatmap = sitk.GetArrayFromImage(sitk.ReadImage(str(heat)))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "hippocampus" / "labels" / f"{TEST}.nii.gz"))) > 0
    assert heatmap.shape == truth.shape and 0.0 <= heatmap.min() and heatmap.max() <= 1.0 and heatmap.std() > 0.01


def _model_grid_volumes(data_dir, names):
    from Med3DFMLib.fewshot.adapt import _model_grid_volume, load_encoder

    encoder = load_encoder("med3dfm-encoder-small")
    volumes = []
    for name in names:
        image = sitk.ReadImage(str(data_dir / "hippocampus" / "images" / f"{name}.nii.gz"))
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "hippocampus" / "labels" / f"{name}.nii.gz"))).astype(np.int16)
        volumes.append(_model_grid_volume(image, labels, encoder.spec)[0])
    return encoder, volumes


def test_label_atlas_says_where_each_class_lay(data_dir):
    """The atlas of the labelled volumes is high where their labels are, and pooling with it moves
    uncertain probabilities towards it (weight 0 leaves them as they were)."""
    from Med3DFMLib.fewshot.decoder import ATLAS_GRID, label_atlas, pool_with_atlas

    _, volumes = _model_grid_volumes(data_dir, TRAIN)
    atlas = label_atlas([v.targets for v in volumes], 2)
    assert atlas.shape == (2, ATLAS_GRID, ATLAS_GRID, ATLAS_GRID) and 0.0 <= atlas.min() and atlas.max() <= 1.0
    assert atlas.sum(0).max() <= 1.0 + 1e-5 and atlas[0].max() > 0.9 and atlas[1].max() > 0.9
    flat = np.full((3,) + volumes[0].image.shape, 1 / 3, dtype=np.float32)
    assert np.array_equal(pool_with_atlas(flat, atlas, 0.0), flat)
    pooled = pool_with_atlas(flat, atlas, 1.0)
    assert np.allclose(pooled.sum(0), 1.0, atol=1e-5)
    # Undecided voxels now follow the atlas: where the first volume is labelled, mostly its labels.
    agreement = np.mean(pooled.argmax(0)[volumes[0].targets > 0] == volumes[0].targets[volumes[0].targets > 0])
    assert agreement > 0.6, agreement


def test_three_volumes_keep_an_atlas_that_travels_with_the_weights(data_dir, tmp_path):
    """From three labelled volumes the decoder stores their atlas and its weight; written and read
    back, the adapter predicts exactly what the trained one did."""
    from Med3DFMLib.fewshot.adapt import load_adapter_model
    from Med3DFMLib.fewshot.decoder import DEFAULT_ATLAS_WEIGHT, predict_volume, train_decoder
    from Med3DFMLib.weights import write_weights

    encoder, volumes = _model_grid_volumes(data_dir, TRAIN + (TEST,))
    decoder, summary = train_decoder(encoder.module, volumes, 2, ["anterior", "posterior"], 600.0, max_steps=4, registration=False)
    assert summary["steps"] == 4 and summary["stopped_by"] == "steps" and decoder.registration is None
    assert decoder.uses_atlas and summary["atlas"]["weight"] == DEFAULT_ATLAS_WEIGHT and float(decoder.atlas.max()) > 0.9
    card = {"architecture": {"type": "feature-decoder", "num_classes": 2, "level_channels": decoder.level_channels, "widths": decoder.widths, "atlas": True}}
    path = tmp_path / "atlas.safetensors"
    write_weights(path, {k: v.contiguous() for k, v in decoder.state_dict().items()}, {"id": "t", "task": "adapter", **card})
    from Med3DFMLib.weights import read_weights

    tensors, _ = read_weights(path)
    reloaded = load_adapter_model(tensors, card)
    image = volumes[0].image
    assert np.allclose(predict_volume(encoder.module, decoder, image), predict_volume(encoder.module, reloaded, image), atol=1e-5)
    # The atlas changes the answer: pooled and network-only probabilities differ.
    assert not np.allclose(predict_volume(encoder.module, decoder, image), predict_volume(encoder.module, decoder, image, atlas=False), atol=1e-3)


def test_one_labelled_volume_is_already_a_registration_atlas(data_dir):
    """A single labelled crop is kept for registration (one registered crop beat the network alone on
    the evaluation, 0.74 vs 0.66), with the default pooling weight (no volume to hold out), and its
    votes move the decoder's answer on a patient it never saw towards that patient's labels."""
    from Med3DFMLib.fewshot.decoder import predict_volume, train_decoder
    from Med3DFMLib.fewshot.registration import DEFAULT_WEIGHT

    encoder, volumes = _model_grid_volumes(data_dir, TRAIN[:1] + (TEST,))
    decoder, summary = train_decoder(encoder.module, volumes[:1], 2, ["anterior", "posterior"], 600.0, max_steps=2)
    assert decoder.registration is not None and len(decoder.registration.atlases) == 1
    assert summary["registration"]["volumes"] == 1 and summary["registration"]["weight"] == DEFAULT_WEIGHT
    assert summary["registration"]["chosen_by"].startswith("default")
    test = volumes[1]
    network = predict_volume(encoder.module, decoder, test.image, registration=False).argmax(0)
    pooled = predict_volume(encoder.module, decoder, test.image).argmax(0)
    truth = test.targets > 0
    assert _dice(pooled > 0, truth) > _dice(network > 0, truth) + 0.1  # two training steps: the votes carry it


def test_registered_atlases_vote_for_a_patient_they_never_saw(data_dir):
    """Two labelled crops registered onto a third (affine + demons) carry their labels close to its
    own; a crop registered onto itself returns its labels almost exactly; votes are fractions."""
    from Med3DFMLib.fewshot.registration import make_atlas, pool_with_votes, votes

    _, volumes = _model_grid_volumes(data_dir, (TEST,) + TRAIN)
    target = volumes[0]
    atlases = [make_atlas(v.image, v.targets, v.spacing_zyx) for v in volumes[1:]]
    fraction = votes(target.image, target.spacing_zyx, atlases, 2)
    assert fraction.shape == (3,) + target.image.shape and np.allclose(fraction.sum(0), 1.0, atol=1e-5)
    fused = fraction.argmax(0)
    scores = [_dice(fused == c, target.targets == c) for c in (1, 2)]
    assert min(scores) > 0.55, scores  # measured 0.79 / 0.75; an affine-only fusion of two crops scores ≈ 0.6
    itself = votes(target.image, target.spacing_zyx, [make_atlas(target.image, target.targets, target.spacing_zyx)], 2).argmax(0)
    assert min(_dice(itself == c, target.targets == c) for c in (1, 2)) > 0.9
    flat = np.full(fraction.shape, 1 / 3, dtype=np.float32)
    assert np.array_equal(pool_with_votes(flat, fraction, 0.0), flat)
    assert np.array_equal(pool_with_votes(flat, fraction, 1.0).argmax(0), fused)


def test_a_large_atlas_is_kept_on_a_coarser_grid_with_its_unlabelled_voxels():
    from Med3DFMLib.fewshot.labels import IGNORE
    from Med3DFMLib.fewshot.registration import MAX_VOXELS, make_atlas

    labels = np.full((160, 120, 100), IGNORE, dtype=np.int16)
    labels[:, :60] = 0
    labels[40:120, 20:50, 30:70] = 1
    atlas = make_atlas(np.random.default_rng(0).random(labels.shape, dtype=np.float32), labels, (1.25, 1.25, 1.25))
    assert atlas.image.size <= MAX_VOXELS * 1.05 and atlas.image.shape == atlas.labels.shape
    assert atlas.spacing_zyx[0] > 1.25 and set(np.unique(atlas.labels)) == {IGNORE, 0, 1}
    assert abs(np.mean(atlas.labels == IGNORE) - np.mean(labels == IGNORE)) < 0.02


def test_registration_atlases_travel_in_the_adapter_file(trained, data_dir):
    """`adapt` with two labelled volumes keeps them for registration: the card says so (the file holds
    images), the file holds them, loading restores them, and a file missing one part is refused."""
    from Med3DFMLib.errors import Med3DFMError
    from Med3DFMLib.fewshot.adapt import load_adapter_model

    _, out, _ = trained
    tensors, card = read_weights(out)
    entry = card["architecture"]["registration"]
    assert entry["atlases"] == 2 and entry["contains_images"] is True and entry["weight"] > 0
    assert {k for k in tensors if k.startswith("registration.")} == {f"registration.{i}.{part}" for i in (0, 1) for part in ("image", "labels", "spacing")}
    adapter = load_adapter_model(dict(tensors), card)
    assert adapter.registration is not None and len(adapter.registration.atlases) == 2
    assert adapter.registration.atlases[0].labels.max() == 1  # the merged hippocampus label
    damaged = {k: v for k, v in tensors.items() if k != "registration.1.labels"}
    with pytest.raises(Med3DFMError, match="damaged adapter file"):
        load_adapter_model(damaged, card)


def test_no_registration_keeps_no_images_in_the_adapter_file(data_dir, tmp_path):
    """`adapt --no-registration`: the file holds the network and the label frequencies only."""
    out = tmp_path / "private.safetensors"
    assert main(["adapt", *_pairs(data_dir, tmp_path), "--name", "hippocampus", "--dense", "--budget-minutes", "0.05", "--no-registration", "-o", str(out), "--progress", "none", "--device", "cpu"]) == 0
    tensors, card = read_weights(out)
    assert "registration" not in card["architecture"] and not any(k.startswith("registration.") for k in tensors)
    record = json.loads((tmp_path / "private.json").read_text())
    assert record["parameters"]["registration"] is False
