"""`med3dfm segment` end to end with the bundled demo model, on real scans: Slicer-readable
output on the input geometry, real accuracy on a held-out case, records, progress, and clean
failures that leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from Med3DFMLib.cli import main
from Med3DFMLib.io.segmentations import read_labels, resample_labels_to
from Med3DFMLib.io.volumes import ijk_to_lps, read_volume

ROOT = Path(__file__).resolve().parents[2]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / (np.sum(a) + np.sum(b)))


def test_segment_held_out_case_is_accurate_and_slicer_readable(tmp_path, hippocampus_case, capsys):
    image_path, label_path = hippocampus_case
    out = tmp_path / "case.seg.nrrd"
    code = main(["segment", str(image_path), "-o", str(out), "--labelmap", str(tmp_path / "case.nii.gz"), "--table", str(tmp_path / "case.tsv"), "--progress", "none"])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    image = read_volume(image_path)
    seg = slicerio.read_segmentation(str(out))
    assert np.allclose(seg["ijkToLPS"], ijk_to_lps(image))
    assert seg["voxels"].shape == image.GetSize()
    names = [s["name"] for s in seg["segments"]]
    assert names == ["anterior hippocampus", "posterior hippocampus"]
    assert all(s["terminology"]["type"][0] == "SCT" for s in seg["segments"])
    truth = sitk.GetArrayFromImage(resample_labels_to(read_labels(label_path).image, image)).transpose(2, 1, 0)
    for segment in seg["segments"]:
        predicted = seg["voxels"] == segment["labelValue"]
        # A held-out test case; the card reports the mean over all 40 test cases.
        assert _dice(predicted, truth == segment["labelValue"]) > 0.7, segment["name"]
    labelmap = sitk.ReadImage(str(tmp_path / "case.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(labelmap).transpose(2, 1, 0), seg["voxels"])
    rows = (tmp_path / "case.tsv").read_text().splitlines()
    assert rows[0].startswith("# model hippocampus-mr-demo")
    assert rows[1].split("\t") == ["segment", "label", "voxels", "volume_mm3", "volume_ml"]
    voxels = int(rows[2].split("\t")[2])
    assert voxels == int(np.sum(seg["voxels"] == 1))
    record = json.loads((tmp_path / "case.json").read_text())
    assert record["model"]["id"] == "hippocampus-mr-demo" and len(record["model"]["sha256"]) == 64
    assert record["device"] == "cpu" or record["device"].startswith("cuda")
    assert {"load", "preprocess", "infer", "postprocess", "write", "total"} <= set(record["timings_s"])
    assert record["versions"]["torch"] and record["input"]["size"] == list(image.GetSize())


def test_segment_dicom_folder_lands_on_the_series_grid(tmp_path, dicom_series):
    out = tmp_path / "ct.seg.nrrd"
    # a CT is outside the MR demo model's domain (test_domain.py): forced here to check the geometry alone
    assert main(["segment", str(dicom_series), "-o", str(out), "--model", "hippocampus-mr-demo", "--force", "--progress", "none", "--device", "cpu"]) == 0
    seg = slicerio.read_segmentation(str(out))
    assert np.allclose(seg["ijkToLPS"], ijk_to_lps(read_volume(dicom_series)))
    assert seg["voxels"].shape == (512, 512, 20)


def test_progress_json_lines(tmp_path, hippocampus_case, capsys):
    out = tmp_path / "p.seg.nrrd"
    assert main(["segment", str(hippocampus_case[0]), "-o", str(out), "--progress", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    stages = [line["stage"] for line in lines]
    assert stages[0] == "load" and stages[-1] == "done"
    assert {"preprocess", "infer", "postprocess", "write"} <= set(stages)
    assert all(0.0 <= line["fraction"] <= 1.0 and isinstance(line["message"], str) for line in lines)
    assert lines[-1]["outputs"]["segmentation"] == str(out)


def test_no_overwrite_keeps_the_users_file(tmp_path, hippocampus_case, capsys):
    out = tmp_path / "mine.seg.nrrd"
    out.write_text("precious")
    assert main(["segment", str(hippocampus_case[0]), "-o", str(out), "--no-overwrite", "--progress", "none"]) == 1
    assert out.read_text() == "precious"
    assert "already exists" in capsys.readouterr().err


def _bad_inputs(tmp: Path):
    (tmp / "empty.nii.gz").write_bytes(b"")
    (tmp / "corrupt.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 10 10\n\n" + b"\x00" * 50)
    (tmp / "notes.txt").write_text("this is not an image\n")
    sitk.WriteImage(sitk.Image([40, 40], sitk.sitkInt16), str(tmp / "slice2d.nrrd"))
    sitk.WriteImage(sitk.Image([16, 16, 16, 2], sitk.sitkInt16), str(tmp / "series4d.nii.gz"))
    sitk.WriteImage(sitk.Image([16, 16, 16], sitk.sitkVectorUInt8, 3), str(tmp / "rgb.nrrd"))
    return {
        "missing": (tmp / "nope.nii.gz", "not found"),
        "empty": (tmp / "empty.nii.gz", "empty"),
        "corrupt": (tmp / "corrupt.nrrd", "cannot read"),
        "not-an-image": (tmp / "notes.txt", "cannot read"),
        "2d": (tmp / "slice2d.nrrd", "2D"),
        "4d": (tmp / "series4d.nii.gz", "4D"),
        "multi-component": (tmp / "rgb.nrrd", "components"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "not-an-image", "2d", "4d", "multi-component"])
def test_bad_input_one_line_error_no_output(tmp_path, case, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    path, message = _bad_inputs(inputs)[case]
    outputs = tmp_path / "out"
    outputs.mkdir()
    code = main(["segment", str(path), "-o", str(outputs / "x.seg.nrrd"), "--table", str(outputs / "x.tsv"), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("med3dfm: error:") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list(outputs.iterdir()) == []


def test_unwritable_output_fails_before_any_work(tmp_path, hippocampus_case, capsys):
    code = main(["segment", str(hippocampus_case[0]), "-o", str(tmp_path / "no" / "such" / "dir" / "x.seg.nrrd"), "--progress", "none"])
    assert code == 1
    assert "output folder does not exist" in capsys.readouterr().err
    code = main(["segment", str(hippocampus_case[0]), "-o", str(tmp_path / "x.nii.gz"), "--progress", "none"])
    assert code == 1
    assert ".seg.nrrd" in capsys.readouterr().err


def test_progress_json_reports_errors_as_a_line(tmp_path, capsys):
    assert main(["segment", str(tmp_path / "missing.nrrd"), "-o", str(tmp_path / "x.seg.nrrd"), "--progress", "json"]) == 1
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last["stage"] == "error" and "not found" in last["message"]


def test_debug_shows_the_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "Med3DFMLib.cli", "--debug", "segment", str(tmp_path / "missing.nrrd"), "-o", str(tmp_path / "x.seg.nrrd"), "--progress", "none"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "not found" in result.stderr


def test_console_command_version():
    result = subprocess.run([sys.executable, "-m", "Med3DFMLib.cli", "--version"], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0
    from Med3DFMLib import __version__

    assert result.stdout.strip() == f"med3dfm {__version__}"


def test_lower_resolution_runs_the_model_coarser_and_returns_labels_on_the_scan_grid(tmp_path, hippocampus_case, capsys):
    """`--lower-resolution 1.25`: the model's grid is 1.25x coarser (half the voxels), the labels come back
    on the scan's own grid, the record says so, and the hippocampus is still found. (This crop model
    loses it fast beyond: whole-hippocampus Dice on 12 of its test crops 0.89 at 1x, 0.84 at 1.25x,
    0.45 at 1.5x, 0 at 2x; README, Troubleshooting.)"""
    import torch

    from Med3DFMLib.errors import Med3DFMError
    from Med3DFMLib.inference import plan_memory
    from Med3DFMLib.windows import host_bytes_needed, lower_resolution_to_fit, window_bytes_needed

    image_path, label_path = hippocampus_case
    out = tmp_path / "coarse.seg.nrrd"
    assert main(["segment", str(image_path), "-o", str(out), "--lower-resolution", "1.25", "--progress", "none"]) == 0
    assert "at 1.25x its spacing" in capsys.readouterr().out
    image = read_volume(image_path)
    seg = slicerio.read_segmentation(str(out))
    assert seg["voxels"].shape == image.GetSize() and np.allclose(seg["ijkToLPS"], ijk_to_lps(image))
    truth = sitk.GetArrayFromImage(resample_labels_to(read_labels(label_path).image, image)).transpose(2, 1, 0) > 0
    assert _dice(seg["voxels"] > 0, truth) > 0.7
    record = json.loads((tmp_path / "coarse.json").read_text())
    assert record["parameters"]["lower_resolution"] == 1.25 and record["model"]["resolution_factor"] == 1.25
    assert record["timings_s"]["infer"] > 0

    for bad in ("0.5", "5"):
        assert main(["segment", str(image_path), "-o", str(tmp_path / f"bad{bad}.seg.nrrd"), "--lower-resolution", bad, "--progress", "none"]) != 0
        assert "--lower-resolution must lie in [1, 4]" in capsys.readouterr().err
        assert not (tmp_path / f"bad{bad}.seg.nrrd").exists()

    # the memory guard names the factor that fits, the same one the panel offers
    shape, window = (450, 410, 410), (64, 64, 64)
    available = window_bytes_needed(window) + host_bytes_needed(shape, 3) // 5
    factor = lower_resolution_to_fit(shape, 3, available, window_bytes_needed(window))
    assert factor == 2.0  # 1.5^3 = 3.4 < 5 <= 8 = 2^3
    with pytest.raises(Med3DFMError, match="--lower-resolution 2 "):
        plan_memory(shape, 3, window, torch.device("cpu"), host_available=available)
    assert lower_resolution_to_fit(shape, 3, 1000, 0) is None
