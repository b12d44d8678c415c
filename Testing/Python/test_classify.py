"""Classification adapters on real data: AdrenalMNIST3D shape masks (written to tmp as NIfTI with
1 mm spacing) and the pyradiomics breast MR with its lesion ROI. Covers adapt/classify lists, the
card, calibration flags, ROI pooling in physical space, heatmaps, and one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from Med3DFMLib.errors import Med3DFMError

# The first 12 normal and 12 mass training masks and the first 4 + 4 validation masks of
# ../shared/data/adrenal/adrenalmnist3d_64_trainval.npz, in their order, same keys (Testing/Data/ATTRIBUTION.md):
# the scans chosen below are the ones the full file gives.
ADRENAL = Path(__file__).resolve().parents[2] / "Testing" / "Data" / "adrenal" / "adrenalmnist3d_64_trainval_subset.npz"
PER_CLASS = 6


def cli(argv: List[str]) -> int:
    from Med3DFMLib.cli import main

    return main(argv)


def _write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), True)
    return path


@pytest.fixture(scope="module")
def adrenal(tmp_path_factory):
    """6 normal + 6 mass training scans and 4 held-out scans, with train.csv / scans.csv."""
    folder = tmp_path_factory.mktemp("adrenal")
    archive = np.load(ADRENAL)
    x, y = archive["train_images"], archive["train_labels"].ravel()
    rows = []
    for cls, name in ((0, "normal"), (1, "mass")):
        for index in np.nonzero(y == cls)[0][:PER_CLASS]:
            rows.append([_write(x[index], folder / f"train_{index}.nii.gz").name, name])
    with open(folder / "train.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "class"], *rows])
    vx, vy = archive["val_images"], archive["val_labels"].ravel()
    val = [int(np.nonzero(vy == 0)[0][0]), int(np.nonzero(vy == 0)[0][1]), int(np.nonzero(vy == 1)[0][0]), int(np.nonzero(vy == 1)[0][1])]
    scans = [_write(vx[i], folder / f"val_{i}.nii.gz") for i in val]
    (folder / "scans.csv").write_text("image\n" + "\n".join(p.name for p in scans) + "\n")
    return {"folder": folder, "scans": scans, "val_labels": [int(vy[i]) for i in val], "train_rows": rows}


@pytest.fixture(scope="module")
def model(adrenal):
    """An adapter trained from the list (a short schedule keeps the test quick)."""
    from Med3DFMLib.classify.data import read_list
    from Med3DFMLib.classify.job import run_adapt_classify

    out = adrenal["folder"] / "adrenal.safetensors"
    run_adapt_classify(read_list(adrenal["folder"] / "train.csv", True), "adrenal mass", out, max_steps=80)
    return out


def test_adapt_cli_with_image_class_pairs_and_cache(adrenal, tmp_path):
    from Med3DFMLib.weights import read_weights

    pairs = []
    for name, cls in adrenal["train_rows"][:2] + adrenal["train_rows"][-2:]:
        pairs += ["--image", str(adrenal["folder"] / name), "--class", cls]
    out = tmp_path / "pairs.safetensors"
    for expected_hits in (0, 4):  # the second run finds every scan's features in the cache
        assert cli(["adapt", "--task", "classify", *pairs, "--name", "adrenal mass", "-o", str(out), "--progress", "json"]) == 0
        assert json.loads(out.with_suffix(".json").read_text())["feature_cache_hits"] == expected_hits
    _, card = read_weights(out)
    assert card["classes"] == ["normal", "mass"] and card["training"]["summary"]["folds"] == 2


def summary_members(card) -> int:
    return int(card["architecture"]["members"])


def test_card_and_record(model):
    from Med3DFMLib.registry import resolve_model
    from Med3DFMLib.weights import read_weights

    tensors, card = read_weights(model)
    assert card["task"] == "adapter" and card["kind"] == "classify"
    assert card["classes"] == ["normal", "mass"]  # order of first appearance in the list
    encoder = resolve_model("med3dfm-encoder-small")
    assert card["encoder"]["id"] == "med3dfm-encoder-small" and card["encoder"]["sha256"] == encoder.sha256
    assert card["input"]["spacing"] and card["temperature"] >= 1.0  # 6 per class: may only soften
    assert card["calibration"]["calibrated"] is False and "not calibrated" in card["calibration"]["note"]
    assert 10_000 < card["parameters"] <= 1_000_000
    buffers = {k for k in tensors if k.rsplit(".", 1)[-1].rstrip("0123456789") in ("mean", "std")}  # the channel statistics
    assert len(buffers) == 2 * 3 * summary_members(card) and card["parameters"] == sum(t.numel() for k, t in tensors.items() if k not in buffers)
    summary = card["training"]["summary"]
    assert summary["examples"] == 2 * PER_CLASS and summary["folds"] == min(5, PER_CLASS)
    record = json.loads(model.with_suffix(".json").read_text())
    assert record["adapter"]["sha256"] and record["calibration"] == card["calibration"]


def test_a_few_training_steps_still_choose_a_checkpoint(adrenal, tmp_path):
    """Fewer steps than the checkpoint spacing (10) once left nothing to choose from (ValueError)."""
    from Med3DFMLib.classify.data import read_list
    from Med3DFMLib.classify.job import run_adapt_classify

    record = run_adapt_classify(read_list(adrenal["folder"] / "train.csv", True), "few steps", tmp_path / "few.safetensors", max_steps=5)
    assert record["training"]["steps"] == 5 and record["training"]["max_steps"] == 5


def test_classify_list_table(adrenal, model):
    out = adrenal["folder"] / "results.tsv"
    assert cli(["classify", "--list", str(adrenal["folder"] / "scans.csv"), "--model", str(model), "-o", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("# probabilities NOT calibrated")
    table = [line.split("\t") for line in lines if not line.startswith("#")]
    assert table[0] == ["image", "prediction", "probability_normal", "probability_mass"]
    assert len(table) == 1 + len(adrenal["scans"])
    for row in table[1:]:
        p = np.array([float(v) for v in row[2:]])
        assert abs(p.sum() - 1) < 1e-4 and row[1] == ["normal", "mass"][int(p.argmax())]


def test_adapter_fits_its_training_scans(adrenal, model):
    """Given enough steps the head separates its training scans (resubstitution AUROC); a broken
    pooling, loss or label order leaves this near 0.5. Uses the same tokens the job uses."""
    from Med3DFMLib.classify.data import make_example, scan_features
    from Med3DFMLib.classify.train import auroc, fit_adapter, predict_logits
    from Med3DFMLib.cpu import single_thread
    from Med3DFMLib.fewshot.adapt import load_encoder
    from Med3DFMLib.io.volumes import read_volume

    encoder = load_encoder()
    examples = []
    for name, cls in adrenal["train_rows"]:
        scan = scan_features(read_volume(adrenal["folder"] / name), encoder.module, encoder.sha256, encoder.spec, torch.device("cpu"))
        examples.append(make_example([scan], int(cls == "mass")))
    with single_thread():
        adapter, _, _ = fit_adapter(examples, 2, steps=150)
        logits = predict_logits(adapter, examples).numpy()
    labels = np.array([e.label for e in examples])
    assert auroc(logits[:, 1] - logits[:, 0], labels == 1) >= 0.95


def test_list_keeps_rows_before_a_failure(adrenal, model, capsys):
    folder = adrenal["folder"]
    (folder / "broken.nii.gz").write_bytes(b"not an image")
    (folder / "bad.csv").write_text(f"image\n{adrenal['scans'][0].name}\nmissing.nii.gz\nbroken.nii.gz\n{adrenal['scans'][1].name}\n")
    out = folder / "bad.tsv"
    assert cli(["classify", "--list", str(folder / "bad.csv"), "--model", str(model), "-o", str(out)]) == 1
    rows = [line.split("\t") for line in out.read_text().splitlines() if not line.startswith("#")][1:]
    assert len(rows) == 4
    assert rows[0][1] in ("normal", "mass") and rows[3][1] in ("normal", "mass")
    assert rows[1][1].startswith("ERROR: bad.csv line 3") and "not found" in rows[1][1]
    assert rows[2][1].startswith("ERROR: bad.csv line 4") and "cannot read" in rows[2][1]
    assert "2 of 4 rows failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ("file,label\na.nii.gz,x\n", "needs the columns image, class"),
        ("image,class\n{0},normal\n{1},mass\n{2},mass\n", "class 'normal' has only 1 example (train.csv line 2)"),
        ("image,class\n{0},normal\nmissing.nii.gz,normal\n{1},mass\n{2},mass\n", "train.csv line 3: image not found"),
        ("image,class\n{0},normal\n{1},\n", "train.csv line 3: the class column is empty"),
    ],
)
def test_adapt_list_errors(adrenal, tmp_path, capsys, content, message):
    names = [str(adrenal["folder"] / r[0]) for r in adrenal["train_rows"][:3]]
    (tmp_path / "train.csv").write_text(content.format(*names))
    assert cli(["adapt", "--task", "classify", "--list", str(tmp_path / "train.csv"), "--name", "x", "-o", str(tmp_path / "x.safetensors")]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_wrong_models_and_targets(adrenal, model, tmp_path, capsys):
    scan = str(adrenal["scans"][0])
    assert cli(["classify", scan, "--model", "hippocampus-mr-demo", "-o", str(tmp_path / "r.tsv")]) == 1
    assert "without a classification head" in capsys.readouterr().err
    assert cli(["classify", scan, "--model", str(model), "-o", str(tmp_path / "r.tsv"), "--heatmap", str(tmp_path / "h.nrrd"), "--target", "cyst"]) == 1
    assert "unknown class 'cyst'" in capsys.readouterr().err
    # An adapter whose card names another encoder is refused before any scoring.
    from Med3DFMLib.weights import read_weights, write_weights

    tensors, card = read_weights(model)
    card["encoder"]["sha256"] = "0" * 64
    write_weights(tmp_path / "other.safetensors", tensors, card)
    assert cli(["classify", scan, "--model", str(tmp_path / "other.safetensors"), "-o", str(tmp_path / "r.tsv")]) == 1
    assert "needs encoder med3dfm-encoder-small" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["attention", "gradcam"])
def test_heatmap_on_input_grid(adrenal, model, tmp_path, method):
    scan = adrenal["scans"][2]
    heat = tmp_path / f"{method}.nrrd"
    assert cli(["classify", str(scan), "--model", str(model), "-o", str(tmp_path / "r.tsv"), "--heatmap", str(heat), "--heatmap-method", method]) == 0
    image, result = sitk.ReadImage(str(scan)), sitk.ReadImage(str(heat))
    assert result.GetSize() == image.GetSize() and result.GetSpacing() == image.GetSpacing() and result.GetOrigin() == image.GetOrigin()
    values = sitk.GetArrayFromImage(result)
    assert values.dtype == np.float32 and values.min() >= 0 and values.max() == pytest.approx(1.0, abs=1e-3)
    assert values.std() > 0.01  # not a constant map
    note = json.loads((tmp_path / f"{method}.json").read_text())
    assert note["method"] == method and note["target"] in ("normal", "mass")


@pytest.fixture(scope="module")
def breast(data_dir, tmp_path_factory):
    """Breast MR with its lesion ROI, and the ROI moved to another grid (0.5 mm, shifted origin)."""
    folder = tmp_path_factory.mktemp("breast")
    label = sitk.ReadImage(str(data_dir / "pyradiomics" / "breast1_label.nrrd"))
    grid = sitk.Image([int(s * sp / 0.5) + 4 for s, sp in zip(label.GetSize(), label.GetSpacing())], sitk.sitkUInt8)
    grid.SetSpacing((0.5, 0.5, 0.5))
    grid.SetOrigin([o - 1.0 for o in label.GetOrigin()])
    grid.SetDirection(label.GetDirection())
    moved = sitk.Resample(label, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    sitk.WriteImage(moved, str(folder / "roi_other_grid.nrrd"))
    empty = sitk.Image(label)
    empty *= 0
    sitk.WriteImage(empty, str(folder / "empty.nrrd"))
    far = sitk.Image(label)
    far.SetOrigin([o + 500.0 for o in label.GetOrigin()])
    sitk.WriteImage(far, str(folder / "far.nrrd"))
    return {"image": data_dir / "pyradiomics" / "breast1_image.nrrd", "roi": data_dir / "pyradiomics" / "breast1_label.nrrd", "folder": folder}


def test_roi_pooling_in_physical_space(breast, model):
    from Med3DFMLib.classify.job import Classifier
    from Med3DFMLib.io.volumes import read_volume

    classifier = Classifier.load(str(model), device_name="cpu")
    image = read_volume(breast["image"])
    whole = classifier.prepare(image)
    inside = classifier.prepare(image, breast["roi"])
    moved = classifier.prepare(image, breast["folder"] / "roi_other_grid.nrrd")
    attention = classifier.predict(inside).attention
    for level, cells in enumerate(inside.cells):  # every level pools inside the ROI only, each query's weights sum to 1
        assert (cells > 0).sum() < (whole.cells[level] > 0).sum()
        assert np.all(attention[level][:, :, cells == 0] == 0) and np.allclose(attention[level].sum(axis=(2, 3, 4)), 1, atol=1e-5)
        # The same ROI on another grid selects the same cells.
        assert np.array_equal(cells > 0, moved.cells[level] > 0)
    assert np.allclose(classifier.predict(inside).probabilities, classifier.predict(moved).probabilities, atol=0.02)
    with pytest.raises(Med3DFMError, match="empty"):
        classifier.prepare(image, breast["folder"] / "empty.nrrd")
    with pytest.raises(Med3DFMError, match="outside the image"):
        classifier.prepare(image, breast["folder"] / "far.nrrd")


def test_calibration_helpers():
    from Med3DFMLib.classify.train import auroc, expected_calibration_error, fit_temperature

    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (400,), generator=generator)
    true_logits = torch.randn(400, 2, generator=generator) + torch.nn.functional.one_hot(labels, 2) * 1.5
    overconfident = true_logits * 4  # a model that is right as often but far too sure
    t = fit_temperature(overconfident, labels)
    assert 2.5 < t < 6
    before = expected_calibration_error(overconfident.softmax(1).numpy(), labels.numpy())
    after = expected_calibration_error((overconfident / t).softmax(1).numpy(), labels.numpy())
    assert after < before / 2


def test_shipped_model_is_the_mean_of_its_fold_models(adrenal, model):
    """The applied path (Classifier.predict on a whole scan) is the ensemble of the cross-fitting
    fold models whose out-of-fold logits fitted the temperature, each member the very head that trained."""
    from Med3DFMLib.classify.job import Classifier
    from Med3DFMLib.classify.train import predict_logits
    from Med3DFMLib.classify.data import make_example
    from Med3DFMLib.io.volumes import read_volume

    classifier = Classifier.load(str(model), device_name="cpu")
    assert len(classifier.adapter.members) == classifier.card["training"]["summary"]["folds"] == min(5, PER_CLASS)
    prepared = classifier.prepare(read_volume(adrenal["scans"][2]))
    prediction = classifier.predict(prepared)
    members = torch.stack([predict_logits(m, [make_example([prepared.scan], 0)])[0] for m in classifier.adapter.members])
    assert np.allclose(prediction.logits, members.mean(0).numpy(), atol=1e-5)
    assert members.std(0).max() > 1e-4  # the members differ: an ensemble, not one model copied
    assert np.allclose(prediction.probabilities, torch.softmax(members.mean(0) / classifier.temperature, 0).numpy(), atol=1e-5)


def test_each_class_has_its_own_attention_map(adrenal, model):
    """Class-specific queries: the heatmap of 'normal' is not the heatmap of 'mass' (it was one map
    shared by every class before), and both stay inside the scan."""
    from Med3DFMLib.classify.job import Classifier
    from Med3DFMLib.explain.classification import attention_on_grid
    from Med3DFMLib.io.volumes import read_volume

    classifier = Classifier.load(str(model), device_name="cpu")
    prepared = classifier.prepare(read_volume(adrenal["scans"][2]))
    attention = classifier.predict(prepared).attention
    assert [a.shape[:2] for a in attention] == [(2, classifier.adapter.queries_per_class)] * 3
    shape = tuple(prepared.scan.array.shape)
    normal, mass = attention_on_grid(attention, 0, shape), attention_on_grid(attention, 1, shape)
    assert normal.shape == mass.shape == shape
    # Shared queries would give identical maps; after the fixture's 80 steps the class queries have
    # only begun to part, so the test asks for a difference, not for a large one.
    assert np.abs(normal - mass).max() > 1e-3


def test_the_step_is_chosen_only_from_enough_predictions(model):
    """With enough out-of-fold predictions the checkpoint with the lowest scaled NLL is shipped;
    with too few (the fixture's 6 per class) the full schedule is, whatever the predictions say."""
    from Med3DFMLib.classify.train import choose_step
    from Med3DFMLib.weights import read_weights

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (60,), generator=generator)
    signal = torch.nn.functional.one_hot(labels, 2).float()
    oof = {step: torch.randn(60, 2, generator=generator) + signal * strength for step, strength in ((10, 3.0), (20, 1.0), (30, 0.2))}
    assert choose_step(oof, labels, trusted=True)[1] == 10
    assert choose_step(oof, labels, trusted=False)[1] == 30
    summary = read_weights(model)[1]["training"]["summary"]
    assert summary["steps"] == summary["max_steps"] == 80 and "all 80 training steps" in read_weights(model)[1]["calibration"]["note"]


def test_held_out_calibration_never_sees_the_fold_it_scores():
    """The ECE reported as held out scales each fold with a temperature fitted on the other folds:
    changing a fold's own logits changes its probabilities only through those logits."""
    from Med3DFMLib.classify.train import _folds, calibrated_on_other_folds, fit_temperature

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (200,), generator=generator)
    logits = (torch.randn(200, 2, generator=generator) + torch.nn.functional.one_hot(labels, 2) * 1.5) * 4
    folds = _folds(labels.numpy(), 5, 0)
    before = calibrated_on_other_folds(logits, labels, folds)
    changed = logits.clone()
    first = torch.from_numpy(folds[0])
    changed[first] *= 10  # fold 0 made wildly over-confident
    after = calibrated_on_other_folds(changed, labels, folds)
    others = torch.from_numpy(np.concatenate(folds[1:]))
    t0 = fit_temperature(logits[others], labels[others])
    assert np.allclose(after[folds[0]], (changed[first] / t0).softmax(1).numpy(), atol=1e-6)
    assert not np.allclose(after[folds[1]], before[folds[1]])  # the other folds' temperatures did see fold 0


def test_prevalence_adjustment():
    from Med3DFMLib.classify.train import adjusted_for_prevalence, deployment_prevalence

    # Balanced training, 20 % deployment: odds scale by 0.2/0.8 / (0.5/0.5) = 0.25.
    adjusted = adjusted_for_prevalence(np.array([[0.5, 0.5], [0.2, 0.8]]), [0.5, 0.5], [0.8, 0.2])
    assert np.allclose(adjusted[:, 1] / adjusted[:, 0], [0.25, 1.0]) and np.allclose(adjusted.sum(1), 1)
    assert deployment_prevalence(["normal", "mass"], {"normal": 0.5, "mass": 0.5}, {"Mass": 0.2}) == pytest.approx([0.8, 0.2])
    assert deployment_prevalence(["a", "b", "c"], {"a": 0.5, "b": 0.25, "c": 0.25}, {"a": 0.2}) == pytest.approx([0.2, 0.4, 0.4])
    with pytest.raises(Med3DFMError, match="unknown class 'cyst'"):
        deployment_prevalence(["normal", "mass"], {"normal": 0.5, "mass": 0.5}, {"cyst": 0.1})
    with pytest.raises(Med3DFMError, match="strictly between 0 and 1"):
        deployment_prevalence(["normal", "mass"], {"normal": 0.5, "mass": 0.5}, {"mass": 1.0})


def test_classify_with_a_deployment_prevalence(adrenal, model, tmp_path, capsys):
    """--prevalence shifts every probability by Bayes' rule from the training prevalence the card
    states (6 + 6 here) and says so in the table."""
    rows = {}
    for name, extra in (("plain", []), ("shifted", ["--prevalence", "mass=0.2"])):
        out = tmp_path / f"{name}.tsv"
        assert cli(["classify", "--list", str(adrenal["folder"] / "scans.csv"), "--model", str(model), "-o", str(out), *extra]) == 0
        lines = out.read_text().splitlines()
        table = [line.split("\t") for line in lines if not line.startswith("#")][1:]
        rows[name] = np.array([[float(v) for v in row[2:]] for row in table])
        if name == "shifted":
            assert "training prevalence normal 0.5, mass 0.5; adjusted to the deployment prevalence normal 0.8, mass 0.2" in lines[0]
    odds = lambda p: p[:, 1] / p[:, 0]  # noqa: E731
    assert np.allclose(odds(rows["shifted"]), odds(rows["plain"]) * 0.25, rtol=1e-3)
    assert cli(["classify", str(adrenal["scans"][0]), "--model", str(model), "-o", str(tmp_path / "r.tsv"), "--prevalence", "mass"]) == 1
    assert "write CLASS=P" in capsys.readouterr().err


def test_mirrored_view_mirrors_its_region(breast):
    """The mirrored training view has its own encoder features and its ROI mirrored with it."""
    from Med3DFMLib.classify.data import _region, mirrored, occupancy, scan_features
    from Med3DFMLib.fewshot.adapt import load_encoder
    from Med3DFMLib.io.volumes import read_volume

    encoder = load_encoder()
    scan = scan_features(read_volume(breast["image"]), encoder.module, encoder.sha256, encoder.spec, torch.device("cpu"))
    mirror = mirrored(scan, encoder.module, encoder.sha256, torch.device("cpu"))
    assert np.array_equal(mirror.array, scan.array[:, :, ::-1]) and mirror.flipped
    assert not torch.allclose(mirror.features.maps[16], scan.features.maps[16])
    original, flipped = _region(scan, breast["roi"], "ROI"), _region(mirror, breast["roi"], "ROI")
    assert original.any() and np.array_equal(flipped, original[:, :, ::-1]) and not np.array_equal(flipped, original)
    assert occupancy(mirror, breast["roi"])[0].sum() == pytest.approx(occupancy(scan, breast["roi"])[0].sum(), rel=1e-5)
