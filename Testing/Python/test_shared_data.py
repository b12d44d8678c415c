"""`med3dfm segment` runs on every volume in ../shared/data (CT and MR, NIfTI, NRRD and DICOM
folders) and its output lies exactly on each input's grid. CI has ../shared beside the clone.

The demo model is a hippocampus model, so on other anatomy its labels are meaningless and `segment`
refuses those scans (test_domain.py); here it is forced, because what this checks is that every real
file goes through the whole pipeline and comes back on its own geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import slicerio

from Med3DFMLib.cli import main
from Med3DFMLib.io.volumes import ijk_to_lps, read_volume

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
pytestmark = pytest.mark.shared  # every test here sweeps ../shared/data (`make test-shared`)

VOLUMES = [
    "totalseg/example_ct_sm.nii.gz",
    "totalseg/example_mr_sm.nii.gz",
    "totalseg/example_ct_dicom",
    "pyradiomics/brain1_image.nrrd",
    "pyradiomics/brain2_image.nrrd",
    "pyradiomics/breast1_image.nrrd",
    "deeplesion/CT_Lesion_000001_02_01_008-023_img.nii.gz",
    "deeplesion/CT_Lesion_000002_03_01_035-047_img.nii.gz",
    "deeplesion/CT_Lesion_000009_03_01_036-048_img.nii.gz",
    "dicom/dcmqi_ct3slice",
    "dicom/slicer_cthead",
    "dicom/niivue_mr3slice",
    "brain/test_scan_vol.nii.gz",
    "hippocampus/images/hippocampus_004.nii.gz",
]


def test_the_list_covers_every_volume_in_shared_data():
    assert SHARED.is_dir(), f"../shared/data is missing beside the checkout ({SHARED})"
    images = {str(p.relative_to(SHARED)) for p in SHARED.glob("*/*") if p.name.endswith((".nii.gz", ".nrrd")) and "_label" not in p.name and "_seg" not in p.name and "_gt" not in p.name}
    dicom_folders = {str(p.parent.relative_to(SHARED)) for p in SHARED.rglob("*.dcm")}
    listed = set(VOLUMES)
    assert images <= listed | {"totalseg/example_seg.nii.gz"}, images - listed
    assert dicom_folders <= listed, dicom_folders - listed


@pytest.mark.parametrize("relative", VOLUMES)
def test_segment_every_shared_volume(tmp_path, relative, capsys):
    source = SHARED / relative
    out = tmp_path / "out.seg.nrrd"
    assert main(["segment", str(source), "-o", str(out), "--model", "hippocampus-mr-demo", "--force", "--device", "cpu", "--progress", "none"]) == 0, capsys.readouterr().err
    image = read_volume(source)
    seg = slicerio.read_segmentation(str(out))
    assert np.allclose(seg["ijkToLPS"], ijk_to_lps(image), atol=1e-4)
    assert seg["voxels"].shape == image.GetSize()
    assert (tmp_path / "out.json").is_file()


def test_the_copies_in_testing_data_are_what_shared_data_holds():
    """Testing/Data's copies (ATTRIBUTION.md) are byte for byte the files of ../shared/data, and its
    derived files are what their recipe gives: the adrenal subset, the 4 mm aseg and the 2 mm SynthSeg maps."""
    import SimpleITK as sitk

    data = Path(__file__).resolve().parents[1] / "Data"
    copies = [p for p in data.rglob("*") if p.is_file() and p.name != "ATTRIBUTION.md" and p.suffix != ".npz" and p.name not in ("t1_brain_4mm.nii.gz", "aseg_4mm.nii.gz")
              and not p.name.endswith("_2mm.nii.gz") and p.parent.name != "samples"]
    for path in copies:
        relative = path.relative_to(data)
        source = SHARED / (relative.relative_to("evaluation") if relative.parts[0] == "evaluation" else relative)
        assert source.is_file() and source.read_bytes() == path.read_bytes(), relative
    # the registry's sample scans are other compressions of shared scans: the same voxels on the same grid
    for path in sorted((data / "samples").glob("*.nii.gz")):
        sample, shared = sitk.ReadImage(str(path)), sitk.ReadImage(str(SHARED / "hippocampus" / "images" / path.name))
        assert sample.GetSize() == shared.GetSize() and np.allclose(sample.GetSpacing(), shared.GetSpacing()), path.name
        assert np.allclose(sample.GetOrigin(), shared.GetOrigin()) and np.allclose(sample.GetDirection(), shared.GetDirection()), path.name
        assert np.array_equal(sitk.GetArrayViewFromImage(sample), sitk.GetArrayViewFromImage(shared)), path.name
    # the first 12 + 12 training and 4 + 4 validation masks of each class, in their order, same keys
    full = np.load(SHARED / "adrenal" / "adrenalmnist3d_64_trainval.npz")
    subset = np.load(data / "adrenal" / "adrenalmnist3d_64_trainval_subset.npz")
    assert subset.files == full.files
    for split, per_class in (("train", 12), ("val", 4)):
        labels = full[f"{split}_labels"].ravel()
        chosen = np.sort(np.concatenate([np.nonzero(labels == c)[0][:per_class] for c in (0, 1)]))
        for key in (f"{split}_images", f"{split}_labels"):
            assert subset[key].dtype == full[key].dtype and np.array_equal(subset[key], full[key][chosen]), key
    # the FreeSurfer labels resampled (nearest neighbour) onto the grid of t1_brain_4mm.nii.gz
    aseg = sitk.ReadImage(str(SHARED / "brain" / "test_scan_seg.nii.gz"))
    grid = sitk.ReadImage(str(data / "brain" / "t1_brain_4mm.nii.gz"))
    expected = sitk.Resample(aseg, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, aseg.GetPixelID())
    shipped = sitk.ReadImage(str(data / "brain" / "aseg_4mm.nii.gz"))
    assert shipped.GetPixelID() == aseg.GetPixelID() and np.array_equal(sitk.GetArrayFromImage(shipped), sitk.GetArrayFromImage(expected))
    # two SynthSeg label maps, every second voxel (nearest neighbour onto a 2 mm grid, same origin and direction)
    for number in ("01", "02"):
        full_map = sitk.ReadImage(str(SHARED / "synthseg" / f"training_seg_{number}.nii.gz"))
        shipped_map = sitk.ReadImage(str(data / "synthseg" / f"training_seg_{number}_2mm.nii.gz"))
        assert shipped_map.GetPixelID() == sitk.sitkUInt16 and shipped_map.GetSpacing() == (2.0, 2.0, 2.0)
        assert shipped_map.GetOrigin() == full_map.GetOrigin() and shipped_map.GetDirection() == full_map.GetDirection()
        assert np.array_equal(sitk.GetArrayFromImage(shipped_map), sitk.GetArrayFromImage(full_map)[::2, ::2, ::2])
    assert np.allclose(ijk_to_lps(shipped), ijk_to_lps(grid))
