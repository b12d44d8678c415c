"""I/O on real volumes: geometry kept exactly, Slicer segmentations that slicerio reads back,
labels matched in physical space, atomic writes, and clear refusals of bad input."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.io.atomic import atomic_path, check_writable
from Med3DFMLib.io.segmentations import SegmentInfo, read_labels, resample_labels_to, write_labelmap, write_seg_nrrd
from Med3DFMLib.io.tables import write_tsv
from Med3DFMLib.io.volumes import ijk_to_lps, read_volume, to_array, write_volume

TERMINOLOGY = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}


def test_dicom_folder_geometry(dicom_series):
    image = read_volume(dicom_series)
    assert image.GetSize() == (512, 512, 20)
    assert np.allclose(image.GetSpacing(), (0.9765625, 0.9765625, 2.0))
    assert np.allclose(image.GetOrigin(), (-249.51171875, -437.51171875, -804.5))
    assert np.allclose(image.GetDirection(), np.eye(3).ravel())
    # CT in Hounsfield units: air near -1000 exists, bone above 300 exists.
    array = sitk.GetArrayViewFromImage(image)
    assert array.min() <= -900 and array.max() >= 300


def test_flipped_label_grid_is_matched_in_physical_space(dicom_series, data_dir):
    """The TotalSegmentator labels of this series have a flipped Y axis. Matched by physical
    position, the bone labels land on bone (high HU); matched by array index they would not."""
    image = read_volume(dicom_series)
    labels = read_labels(data_dir / "totalseg" / "example_seg_dicom.nii.gz").image
    assert labels.GetDirection()[4] == -1.0  # really flipped
    matched = sitk.GetArrayFromImage(resample_labels_to(labels, image))
    by_index = sitk.GetArrayFromImage(labels)
    hu = sitk.GetArrayFromImage(image).astype(float)
    for bone_label in (32, 33, 69, 70):  # vertebrae and ribs in TotalSegmentator's class map
        assert hu[matched == bone_label].mean() > 200
        assert hu[by_index == bone_label].mean() < 0


def test_labels_outside_the_image_are_refused(hippocampus_case):
    image = read_volume(hippocampus_case[0])
    labels = read_labels(hippocampus_case[1]).image
    labels.SetOrigin([o + 500.0 for o in labels.GetOrigin()])
    with pytest.raises(Med3DFMError, match="do not overlap"):
        resample_labels_to(labels, image)


def test_seg_nrrd_reads_back_with_slicerio_on_input_geometry(tmp_path, hippocampus_case):
    image = read_volume(hippocampus_case[0])
    labels = resample_labels_to(read_labels(hippocampus_case[1]).image, image)
    segments = [
        SegmentInfo(1, "anterior hippocampus", (0.86, 0.55, 0.24), {**TERMINOLOGY, "type": ["SCT", "5366008", "Hippocampus"]}),
        SegmentInfo(2, "posterior hippocampus", (0.35, 0.63, 0.86), None),
        SegmentInfo(3, "absent structure", (0.1, 0.2, 0.3), TERMINOLOGY),
    ]
    out = tmp_path / "case.seg.nrrd"
    write_seg_nrrd(out, labels, segments)
    seg = slicerio.read_segmentation(str(out))
    assert np.allclose(seg["ijkToLPS"], ijk_to_lps(image))
    assert [s["name"] for s in seg["segments"]] == ["anterior hippocampus", "posterior hippocampus", "absent structure"]
    assert [s["labelValue"] for s in seg["segments"]] == [1, 2, 3]
    assert np.allclose(seg["segments"][0]["color"], (0.86, 0.55, 0.24))
    term = seg["segments"][0]["terminology"]
    assert term["type"] == ["SCT", "5366008", "Hippocampus"]
    assert term["category"] == ["SCT", "123037004", "Anatomical Structure"]
    assert "3D Slicer General Anatomy" in term["contextName"]
    assert np.array_equal(seg["voxels"], to_array(labels))
    # The segmentation also reads back through our own reader as the same label map.
    back = read_labels(out)
    assert [s.name for s in back.segments] == ["anterior hippocampus", "posterior hippocampus", "absent structure"]
    assert np.array_equal(sitk.GetArrayFromImage(back.image), sitk.GetArrayFromImage(labels))
    assert np.allclose(back.image.GetDirection(), image.GetDirection())
    assert np.allclose(back.image.GetOrigin(), image.GetOrigin())


def test_slicer_sample_segmentation_reads_as_labels():
    """slicerio's own sample: a real Slicer-written .seg.nrrd with terminology."""
    from pathlib import Path

    path = Path(slicerio.__file__).parent / "data" / "Segmentation.seg.nrrd"
    volume = read_labels(path)
    names = [s.name for s in volume.segments]
    assert "ribs" in names and "right lung" in names
    assert volume.segments[0].terminology["type"][2] == "Rib"
    counts = np.bincount(sitk.GetArrayViewFromImage(volume.image).ravel())
    assert all(counts[s.value] > 0 for s in volume.segments)


def test_labelmap_table_and_float_volume_round_trip(tmp_path, hippocampus_case):
    image = read_volume(hippocampus_case[0])
    labels = read_labels(hippocampus_case[1]).image
    write_labelmap(tmp_path / "labels.nii.gz", labels)
    back = sitk.ReadImage(str(tmp_path / "labels.nii.gz"))
    assert back.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))
    heat = sitk.Cast(sitk.Cast(image, sitk.sitkFloat32) / 1000.0, sitk.sitkFloat32)
    write_volume(tmp_path / "heat.nrrd", heat)
    heat_back = sitk.ReadImage(str(tmp_path / "heat.nrrd"))
    assert heat_back.GetPixelID() == sitk.sitkFloat32
    assert np.allclose(heat_back.GetOrigin(), image.GetOrigin()) and np.allclose(heat_back.GetDirection(), image.GetDirection())
    write_tsv(tmp_path / "t.tsv", ["segment", "volume_ml"], [["a", 1.5], ["b", 2.25]], comments=["made by a test"])
    assert (tmp_path / "t.tsv").read_text().splitlines() == ["# made by a test", "segment\tvolume_ml", "a\t1.5", "b\t2.25"]


def test_atomic_write_gives_normal_permissions(tmp_path):
    import os

    with atomic_path(tmp_path / "out.tsv") as tmp:
        tmp.write_text("x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.tsv").stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "result.seg.nrrd"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("cancelled")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_when_a_write_fails(tmp_path):
    target = tmp_path / "mine.tsv"
    target.write_text("the user's data")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise RuntimeError("disk full")
    assert target.read_text() == "the user's data"
    with pytest.raises(Med3DFMError, match="already exists"):
        check_writable(target, overwrite=False)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.nii.gz", "not found"),
        (lambda d: _write(d / "empty.nrrd", b""), "empty"),
        (lambda d: _write(d / "corrupt.nii.gz", bytes(range(256)) * 40), "cannot read"),
        (lambda d: _write(d / "notes.txt", b"not an image at all\n"), "cannot read"),
        (lambda d: _image(d / "slice.nrrd", sitk.Image([32, 32], sitk.sitkInt16)), "2D"),
        (lambda d: _image(d / "series.nii.gz", sitk.Image([16, 16, 8, 3], sitk.sitkInt16)), "4D"),
        (lambda d: _image(d / "rgb.nrrd", sitk.Image([16, 16, 8], sitk.sitkVectorUInt8, 3)), "components"),
        (lambda d: _image(d / "thin.nrrd", sitk.Image([16, 16, 1], sitk.sitkInt16)), "single slice"),
        (lambda d: d, "no DICOM series"),
    ],
    ids=["missing", "empty", "corrupt", "text", "2d", "4d", "rgb", "one-slice", "folder-without-dicom"],
)
def test_bad_inputs_are_refused_clearly(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(Med3DFMError, match=message):
        read_volume(path)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _image(path, image):
    sitk.WriteImage(image, str(path))
    return path
