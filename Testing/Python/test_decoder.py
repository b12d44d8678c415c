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


def _pairs(data_dir):
    arguments = []
    for name in TRAIN:
        arguments += ["--image", str(data_dir / "hippocampus" / "images" / f"{name}.nii.gz"), "--labels", str(data_dir / "hippocampus" / "labels" / f"{name}.nii.gz")]
    return arguments


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """Two labelled patients, dense labels, `--mode auto` (→ decoder), a 30-second budget."""
    folder = tmp_path_factory.mktemp("decoder")
    out = folder / "hippocampus.safetensors"
    started = time.perf_counter()
    assert main(["adapt", *_pairs(data_dir), "--name", "hippocampus", "--dense", "--budget-minutes", "0.5", "-o", str(out), "--progress", "none", "--device", "cpu"]) == 0
    return folder, out, time.perf_counter() - started


def test_decoder_segments_a_patient_it_never_saw(trained, data_dir, tmp_path):
    _, out, _ = trained
    target = tmp_path / "test.seg.nrrd"
    assert main(["segment", str(data_dir / "hippocampus" / "images" / f"{TEST}.nii.gz"), "-o", str(target), "--model", str(out), "--progress", "none", "--device", "cpu"]) == 0
    seg = slicerio.read_segmentation(str(target))
    predicted = seg["voxels"].transpose(2, 1, 0)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "hippocampus" / "labels" / f"{TEST}.nii.gz")))
    # Two labels from the plain label maps ("label 1", "label 2": --name names only a single structure)
    assert [s["name"] for s in seg["segments"]] == ["label 1", "label 2"]
    scores = [_dice(predicted == v, truth == v) for v in (1, 2)]
    # Measured 0.4–0.55 after 30 s from two patients on 2 threads: far from good, far from chance.
    assert min(scores) > 0.25, scores


def test_decoder_card_says_how_it_was_trained(trained):
    _, out, seconds = trained
    tensors, card = read_weights(out)
    assert card["architecture"]["type"] == "feature-decoder" and card["task"] == "adapter"
    trainable = sum(t.numel() for k, t in tensors.items())
    assert 100_000 < trainable <= 1_000_000
    summary = card["training"]["summary"]
    assert summary["mode"] == "decoder" and summary["stopped_by"] == "budget" and summary["steps"] > 10
    assert 29 <= summary["seconds"] <= 40 and seconds < 90  # the budget bounds the training time
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
    assert main(["adapt", *_pairs(data_dir), "--name", "h", "--mode", "decoder", "--dense", "--budget-minutes", "5", "-o", str(out), "--progress", "none", "--device", "cpu"]) == 0
    assert time.perf_counter() - started < 60
    _, card = read_weights(out)
    assert card["training"]["summary"]["stopped_by"] == "user" and card["training"]["summary"]["steps"] > 0
    assert not stop_file_for(out).exists()  # the request is consumed


def test_augmentation_moves_the_labels_with_the_image(data_dir):
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "hippocampus" / "images" / f"{TRAIN[0]}.nii.gz"))).astype(np.float32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "hippocampus" / "labels" / f"{TRAIN[0]}.nii.gz"))).astype(np.float32)
    # A label that is a function of the image (bright voxels): after any augmentation draw the
    # label must still mark the same voxels of the moved image (intensity changes are monotone).
    bright = (image > np.percentile(image, 90)).astype(np.float32)
    transform = augmentation([2], seed=3)
    agreements, changed = [], 0
    for _ in range(6):
        out = transform({"image": torch.from_numpy(image[None].copy()), "label": torch.from_numpy(np.stack([bright, labels]))})
        moved_image = np.asarray(out["image"])[0]
        moved_bright = np.asarray(out["label"])[0] > 0.5
        threshold = np.percentile(moved_image, 90)
        agreements.append(_dice(moved_bright, moved_image > threshold))
        changed += int(not np.array_equal(moved_bright, bright > 0.5))
        assert set(np.unique(np.asarray(out["label"])[1])) <= {0.0, 1.0, 2.0}  # nearest neighbour: no new label values
    assert changed >= 3 and min(agreements) > 0.8, agreements


def test_lateralised_names_forbid_left_right_flips():
    assert lateralised(["left kidney"]) and lateralised(["Kidney_R", "r"]) and not lateralised(["liver", "anterior hippocampus"])
