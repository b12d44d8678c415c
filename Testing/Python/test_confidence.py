"""`med3dfm segment --confidence`: a per-voxel confidence volume on the input grid that is high inside
structures the model is sure of, low at their boundaries and low where the model meets a scan unlike
its training data; and the list of segments holding the unsure voxels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from Med3DFMLib.cli import main
from Med3DFMLib.confidence import flag_low_confidence
from Med3DFMLib.io.segmentations import SegmentInfo

ROOT = Path(__file__).resolve().parents[2]
BREAST = ROOT / "Testing" / "Data" / "pyradiomics" / "breast1_image.nrrd"  # a breast MR: not a hippocampus crop


def _segment(tmp_path: Path, image: Path, name: str, *extra: str) -> tuple:
    out = tmp_path / f"{name}.seg.nrrd"
    code = main(["segment", str(image), "-o", str(out), "--labelmap", str(tmp_path / f"{name}.nii.gz"), "--progress", "none", *extra])
    assert code == 0
    labels = sitk.ReadImage(str(tmp_path / f"{name}.nii.gz"))
    confidence = tmp_path / f"{name}.conf.nii.gz"
    return labels, (sitk.ReadImage(str(confidence)) if confidence.exists() else None), json.loads((tmp_path / f"{name}.json").read_text())


def _boundary(labels: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour of another label."""
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in range(3):
        differs = np.diff(labels, axis=axis) != 0
        low, high = [slice(None)] * 3, [slice(None)] * 3
        low[axis], high[axis] = slice(0, -1), slice(1, None)
        edge[tuple(low)] |= differs
        edge[tuple(high)] |= differs
    return edge


@pytest.mark.parametrize("measure", ["max-probability", "entropy"])
def test_confidence_is_high_inside_structures_and_low_at_their_boundaries(tmp_path, hippocampus_case, measure, capsys):
    image_path, _ = hippocampus_case
    plain, none, _ = _segment(tmp_path, image_path, "plain")
    assert none is None
    labels_image, confidence_image, record = _segment(tmp_path, image_path, "case", "--confidence", str(tmp_path / "case.conf.nii.gz"), "--confidence-measure", measure)
    assert "confidence (" in capsys.readouterr().out
    # Same labels as without --confidence, and the confidence lies on the input grid.
    assert np.array_equal(sitk.GetArrayFromImage(plain), sitk.GetArrayFromImage(labels_image))
    image = sitk.ReadImage(str(image_path))
    assert confidence_image.GetSize() == image.GetSize()
    assert np.allclose(confidence_image.GetOrigin(), image.GetOrigin()) and np.allclose(confidence_image.GetSpacing(), image.GetSpacing())
    assert confidence_image.GetPixelID() == sitk.sitkFloat32
    labels, confidence = sitk.GetArrayFromImage(labels_image), sitk.GetArrayFromImage(confidence_image)
    assert 0.0 <= confidence.min() and confidence.max() <= 1.0
    inside = ndimage.binary_erosion(labels > 0, iterations=2)
    edge = _boundary(labels)
    assert inside.sum() > 100 and edge.sum() > 100
    assert confidence[inside].mean() > 0.95
    assert confidence[edge].mean() < confidence[inside].mean() - 0.05
    # The unsure voxels are the boundary's: every one lies within a voxel of a label change.
    unsure = confidence < 0.9
    assert unsure.sum() > 50
    assert np.sum(unsure & ndimage.binary_dilation(edge)) / unsure.sum() > 0.95
    # The record names the segments that hold the unsure voxels, and counts them right.
    flags = record["confidence"]
    assert flags["measure"] == measure and record["outputs"]["confidence"].endswith("case.conf.nii.gz")
    by_name = {row["segment"]: row for row in flags["segments"]}
    assert set(by_name) == {"background", "anterior hippocampus", "posterior hippocampus"}
    anterior = labels == 1
    assert by_name["anterior hippocampus"]["low_voxels"] == int(np.sum(confidence[anterior] < flags["flag_below"]))
    assert abs(sum(row["share_of_low"] for row in flags["segments"]) - 1.0) < 1e-3


def test_confidence_is_low_where_the_model_meets_an_unfamiliar_scan(tmp_path, hippocampus_case):
    """Forced onto a breast MR, the hippocampus model's 'hippocampus' voxels are far less sure than on a
    hippocampus crop: the overlay shows a reader what the domain check would have refused."""
    image_path, _ = hippocampus_case
    labels, confidence, _ = _segment(tmp_path, image_path, "own", "--confidence", str(tmp_path / "own.conf.nii.gz"))
    foreign_labels, foreign, record = _segment(tmp_path, BREAST, "foreign", "--confidence", str(tmp_path / "foreign.conf.nii.gz"), "--model", "hippocampus-mr-demo", "--force")
    assert record["domain"]["forced"]
    own = sitk.GetArrayFromImage(confidence)[sitk.GetArrayFromImage(labels) > 0].mean()
    strange = sitk.GetArrayFromImage(foreign)[sitk.GetArrayFromImage(foreign_labels) > 0]
    assert strange.size > 0
    assert strange.mean() < own - 0.15
    flagged = [row for row in record["confidence"]["segments"] if row["segment"] != "background"]
    assert max(row["share_of_segment"] for row in flagged) > 0.25


def test_flags_rank_segments_by_their_unsure_voxels():
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[0] = 1
    labels[1:3] = 2
    confidence = np.full(labels.shape, 0.99, dtype=np.float32)
    confidence[0, :2] = 0.4  # 8 unsure voxels in segment 1
    confidence[1:3, 0] = 0.5  # 8 unsure voxels in segment 2 ...
    confidence[1, 1, 0] = 0.3  # ... and one more
    rows = flag_low_confidence(labels, confidence, [SegmentInfo.from_card({"value": 1, "name": "a"}), SegmentInfo.from_card({"value": 2, "name": "b"})], 0.6, 0.001)
    assert [row["segment"] for row in rows] == ["b", "a", "background"]
    assert [row["low_voxels"] for row in rows] == [9, 8, 0]
    assert rows[0]["share_of_segment"] == pytest.approx(9 / 32, abs=1e-4) and rows[1]["low_ml"] == pytest.approx(0.008)
    with pytest.raises(ValueError, match="different grids"):
        flag_low_confidence(labels, confidence[:2], [], 0.6, 0.001)


@pytest.mark.parametrize("extra, message", [
    (["--confidence", "{tmp}/c.seg.nrrd"], "plain volume file"),
    (["--confidence", "{tmp}/c.png"], "plain volume file"),
    (["--confidence", "{tmp}/c.nii.gz", "--flag-below", "0"], "threshold"),
    (["--confidence", "{tmp}/l.nii.gz", "--labelmap", "{tmp}/l.nii.gz"], "differ"),
])
def test_bad_confidence_options_fail_before_any_work_and_write_nothing(tmp_path, hippocampus_case, capsys, extra, message):
    image_path, _ = hippocampus_case
    code = main(["segment", str(image_path), "-o", str(tmp_path / "out.seg.nrrd"), "--progress", "none", *[e.format(tmp=tmp_path) for e in extra]])
    assert code != 0
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
