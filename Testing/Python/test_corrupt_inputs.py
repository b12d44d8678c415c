"""Corrupt and odd input volumes get one clear error and no output.

Every bad file here is made from a real fixture (Testing/Data): truncated or bit-flipped copies of
the hippocampus MR scan as .nii.gz, gzip .nrrd/.nhdr, zlib .mha/.mhd and uncompressed files, plus
NaN, Inf, constant and absurd-spacing variants, and DICOM series written from the CT fixture.
SimpleITK alone reads most of these without complaint (a cut .nii.gz comes back zero-filled).
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from Med3DFMLib.cli import main
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.io import integrity
from Med3DFMLib.io.volumes import read_volume

DATA = Path(__file__).resolve().parents[2] / "Testing" / "Data"
SCAN = DATA / "hippocampus" / "images" / "hippocampus_014.nii.gz"  # 39 x 50 x 40 float32: 312.0 kB of voxels
PROMISE = "of the 312.0 kB its header promises"
TRUNCATED_STREAM = "is truncated or corrupt: its compressed data ends after"
BAD_STREAM = r"is truncated or corrupt: its compressed data (fails its checksum|is damaged)"
SHORT_RAW = "is truncated: its voxel data ends after"


def _scan() -> sitk.Image:
    return sitk.ReadImage(str(SCAN))


def _write(image: sitk.Image, path: Path, compress: bool = True) -> Path:
    sitk.WriteImage(image, str(path), compress)
    return path


def _cut(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _flip(path: Path, at: float, bit: int = 0x10) -> Path:
    """Flip one bit at a fraction of the way into the file (or at a negative byte index)."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * at) if isinstance(at, float) else at] ^= bit
    path.write_bytes(bytes(data))
    return path


def _edit_header(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, 1))
    return path


def _nifti_with_pixdim(tmp: Path, axis: int, value: float) -> Path:
    """A .nii.gz whose header states spacing `value` on `axis` (ITK would silently repair it)."""
    raw = bytearray(gzip.decompress(SCAN.read_bytes()))
    raw[76 + 4 * axis : 80 + 4 * axis] = struct.pack("<f", value)
    path = tmp / f"pixdim{axis}.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def _variant(tmp: Path, name: str, change: Callable[[np.ndarray], np.ndarray]) -> Path:
    image = _scan()
    changed = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(image)).astype(np.float32))
    changed.CopyInformation(image)
    return _write(changed, tmp / name)


def _with_nans(voxels: np.ndarray) -> np.ndarray:
    voxels = voxels.copy()
    voxels.flat[1::1000] = np.nan  # 78 NaN voxels
    return voxels


def _with_infs(voxels: np.ndarray) -> np.ndarray:
    voxels = voxels.copy()
    voxels.flat[[5, 500, 5000]] = [np.inf, -np.inf, np.inf]
    return voxels


def _spaced(tmp: Path, name: str, spacing: Tuple[float, float, float]) -> Path:
    image = _scan()
    image.SetSpacing(spacing)
    return _write(image, tmp / name)


def _write_dicom_series(folder: Path, volume: sitk.Image) -> Path:
    """One CT slice file per z, with the tags GDCM needs to sort them into one series.

    GDCM's writer sets the process's C locale (Python's text files then default to ASCII, and later
    tests reading UTF-8 reports failed), so the locale is put back afterwards."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom_slices(folder, volume)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_slices(folder: Path, volume: sitk.Image) -> Path:
    folder.mkdir()
    uid = "1.2.826.0.1.3680043.2.1125.99.1"
    d = volume.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(volume.GetDepth()):
        slice_ = volume[:, :, z]
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{uid}.2.{z + 1}",
            "0020|000d": f"{uid}.0",
            "0020|000e": f"{uid}.1",
            "0020|0013": str(z + 1),
            "0020|0032": "\\".join(f"{c:.4f}" for c in volume.TransformIndexToPhysicalPoint((0, 0, z))),
            "0020|0037": "\\".join(f"{c:.6f}" for c in (d[0], d[3], d[6], d[1], d[4], d[7])),
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(slice_)
    return folder


def _small_ct(dicom_series: Path) -> sitk.Image:
    return read_volume(dicom_series)[::8, ::8, :]  # 64 x 64 x 20: quick to write


def _constant_dicom(tmp: Path) -> Path:
    ct = _small_ct(DATA / "totalseg" / "example_ct_dicom")
    blank = sitk.Image(ct.GetSize(), sitk.sitkInt16) + 100
    blank.CopyInformation(ct)
    return _write_dicom_series(tmp / "blank_dicom", blank)


def _coarse_dicom(tmp: Path) -> Path:
    ct = _small_ct(DATA / "totalseg" / "example_ct_dicom")
    ct.SetSpacing((60.0, 60.0, ct.GetSpacing()[2]))
    return _write_dicom_series(tmp / "coarse_dicom", ct)


def _detached_nrrd(tmp: Path) -> Path:
    header = _write(_scan(), tmp / "detached.nhdr")
    _cut(tmp / "detached.raw.gz", 0.5)
    return header


def _detached_mhd(tmp: Path) -> Path:
    header = _write(_scan(), tmp / "detached.mhd")
    _cut(tmp / "detached.zraw", 0.5)
    return header


def _missing_mhd_data(tmp: Path) -> Path:
    header = _write(_scan(), tmp / "nodata.mhd", compress=False)
    (tmp / "nodata.raw").unlink()
    return header


def _copy(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.write_bytes(SCAN.read_bytes())
    return path


# name -> (make the bad input in a folder, regex its message must match)
BAD: Dict[str, Tuple[Callable[[Path], Path], str]] = {
    # 1. compressed data that is cut short or altered
    "nii.gz cut to a third": (lambda t: _cut(_copy(t, "scan.nii.gz"), 1 / 3), rf"scan\.nii\.gz {TRUNCATED_STREAM} 95\.\d kB {PROMISE}"),
    "nii.gz cut inside its header": (lambda t: _cut(_copy(t, "scan.nii.gz"), 0.002), rf"scan\.nii\.gz {TRUNCATED_STREAM} \d+ bytes$"),
    "nii.gz bit flip": (lambda t: _flip(_copy(t, "scan.nii.gz"), 0.5), rf"scan\.nii\.gz {BAD_STREAM}"),
    "nii.gz CRC flip": (lambda t: _flip(_copy(t, "scan.nii.gz"), -8, 0x01), r"scan\.nii\.gz is truncated or corrupt: its compressed data fails its checksum \(CRC\)"),
    "nrrd gzip cut": (lambda t: _cut(_write(_scan(), t / "scan.nrrd"), 2 / 3), rf"scan\.nrrd {TRUNCATED_STREAM} .* {PROMISE}"),
    "nrrd gzip bit flip": (lambda t: _flip(_write(_scan(), t / "scan.nrrd"), 0.6), rf"scan\.nrrd {BAD_STREAM}"),
    "nhdr gzip data file cut": (_detached_nrrd, rf"detached\.raw\.gz \(the data file of detached\.nhdr\) {TRUNCATED_STREAM} .* {PROMISE}"),
    "mha zlib cut": (lambda t: _cut(_write(_scan(), t / "scan.mha"), 2 / 3), rf"scan\.mha {TRUNCATED_STREAM} .* {PROMISE}"),
    "mha zlib bit flip": (lambda t: _flip(_write(_scan(), t / "scan.mha"), 0.6), rf"scan\.mha {BAD_STREAM}"),
    "mhd zraw data file cut": (_detached_mhd, rf"detached\.zraw \(the data file of detached\.mhd\) {TRUNCATED_STREAM} .* {PROMISE}"),
    # 2. uncompressed data shorter than the header says
    "nii short": (lambda t: _cut(_write(_scan(), t / "scan.nii", False), 2 / 3), rf"scan\.nii {SHORT_RAW} 207\.\d kB {PROMISE}"),
    "nrrd raw short": (lambda t: _cut(_write(_scan(), t / "scan.nrrd", False), 2 / 3), rf"scan\.nrrd {SHORT_RAW} .* {PROMISE}"),
    "mha raw short": (lambda t: _cut(_write(_scan(), t / "scan.mha", False), 2 / 3), rf"scan\.mha {SHORT_RAW} .* {PROMISE}"),
    "mhd data file missing": (_missing_mhd_data, r"nodata\.mhd keeps its voxels in nodata\.raw, which is not found"),
    # 3. NaN / Inf (niftilib turns them into zeros on read: caught in the file; other formats after reading)
    "NaN in nii.gz": (lambda t: _variant(t, "nan.nii.gz", _with_nans), r"nan\.nii\.gz holds 78 NaN \(not-a-number\) voxels"),
    "NaN in nrrd": (lambda t: _variant(t, "nan.nrrd", _with_nans), r"nan\.nrrd holds 78 NaN \(not-a-number\) voxels"),
    "Inf in mha": (lambda t: _variant(t, "inf.mha", _with_infs), r"inf\.mha holds 3 infinite voxels"),
    # 4. constant image
    "constant nii.gz": (lambda t: _variant(t, "blank.nii.gz", lambda v: np.full_like(v, 7)), r"blank\.nii\.gz is a constant image \(every voxel is 7\)"),
    "constant DICOM series": (_constant_dicom, r"blank_dicom is a constant image \(every voxel is 100\)"),
    # 5. absurd spacing
    "60 mm spacing nrrd": (lambda t: _spaced(t, "coarse.nrrd", (1.0, 1.0, 60.0)), r"coarse\.nrrd has an implausible voxel spacing of 1 x 1 x 60 mm"),
    "60 mm spacing DICOM": (_coarse_dicom, r"coarse_dicom has an implausible voxel spacing of 60 x 60 x 2 mm"),
    "zero pixdim nii.gz": (lambda t: _nifti_with_pixdim(t, 1, 0.0), r"pixdim1\.nii\.gz has an impossible voxel spacing in its header: 0 x 1 x 1 mm"),
    "negative pixdim nii.gz": (lambda t: _nifti_with_pixdim(t, 3, -2.0), r"pixdim3\.nii\.gz has an impossible voxel spacing in its header: 1 x 1 x -2 mm"),
    "negative spacing mha": (
        lambda t: _edit_header(_write(_scan(), t / "neg.mha"), b"ElementSpacing = 1 1 1", b"ElementSpacing = -2 1 1"),
        r"neg\.mha has an impossible voxel spacing in its header: -2 x 1 x 1 mm",
    ),
    "zero space direction nrrd": (
        lambda t: _edit_header(_write(_scan(), t / "flat.nrrd"), b"space directions: (-1,0,0)", b"space directions: (0,0,0)"),
        r"flat\.nrrd has an impossible voxel spacing in its header: 0 x 1 x 1 mm",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_read_volume_refuses_with_a_clear_message(tmp_path, case):
    make, message = BAD[case]
    path = make(tmp_path)
    with pytest.raises(Med3DFMError) as caught:
        read_volume(path)
    assert re.search(message, str(caught.value)), str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("case", ["nii.gz cut to a third", "nii.gz bit flip", "nhdr gzip data file cut", "mha zlib cut", "nii short", "NaN in nii.gz", "constant nii.gz", "constant DICOM series", "negative pixdim nii.gz"])
def test_cli_one_error_line_and_no_output(tmp_path, case, capsys):
    make, message = BAD[case]
    inputs = tmp_path / "in"
    inputs.mkdir()
    path = make(inputs)
    outputs = tmp_path / "out"
    outputs.mkdir()
    code = main(["segment", str(path), "-o", str(outputs / "out.seg.nrrd"), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("med3dfm: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert list(outputs.iterdir()) == []


def test_small_chunks_give_the_same_verdicts(tmp_path, monkeypatch):
    """Chunk boundaries that split a float voxel (and the header) change nothing."""
    monkeypatch.setattr(integrity, "IN_CHUNK", 333)
    monkeypatch.setattr(integrity, "OUT_CHUNK", 4097)
    assert read_volume(SCAN).GetSize() == (39, 50, 40)
    assert read_volume(_write(_scan(), tmp_path / "scan.mha")).GetSize() == (39, 50, 40)
    for case in ["nii.gz cut to a third", "NaN in nii.gz", "nrrd gzip cut"]:
        folder = tmp_path / case.replace(" ", "_")
        folder.mkdir()
        make, message = BAD[case]
        with pytest.raises(Med3DFMError, match=message):
            read_volume(make(folder))
    raw_nans = _variant(tmp_path, "nan.nii", _with_nans)  # uncompressed: read in OUT_CHUNK pieces
    with pytest.raises(Med3DFMError, match="holds 78 NaN"):
        read_volume(raw_nans)


def _same(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize() and a.GetPixelID() == b.GetPixelID()
    assert np.allclose(a.GetSpacing(), b.GetSpacing()) and np.allclose(a.GetOrigin(), b.GetOrigin())
    assert np.allclose(a.GetDirection(), b.GetDirection())
    assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


@pytest.mark.parametrize(
    "name, kind",
    [
        ("hippocampus/images/hippocampus_014.nii.gz", "image"),
        ("hippocampus/images/hippocampus_024.nii.gz", "image"),
        ("hippocampus/labels/hippocampus_014.nii.gz", "labels"),
        ("totalseg/example_ct_sm.nii.gz", "image"),
        ("totalseg/example_seg_dicom.nii.gz", "labels"),
        ("pyradiomics/breast1_image.nrrd", "image"),
        ("pyradiomics/breast1_label.nrrd", "labels"),
    ],
)
def test_valid_fixtures_read_unchanged(name, kind):
    path = DATA / name
    _same(read_volume(path, kind=kind), sitk.ReadImage(str(path)))


def test_valid_dicom_series_reads_unchanged(dicom_series):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom_series)))
    _same(read_volume(dicom_series), reader.Execute())


@pytest.mark.parametrize("name, compress", [(n, c) for n in ("scan.nii", "scan.nrrd", "scan.nhdr", "scan.mha", "scan.mhd", "scan.hdr") for c in (True, False)])
def test_every_format_written_whole_reads_back_unchanged(tmp_path, name, compress):
    original = _scan()
    _same(read_volume(_write(original, tmp_path / name, compress)), original)


def test_a_constant_label_map_is_accepted_as_labels(tmp_path):
    """An empty (all background) or single-label map is a real label file; only scans must vary."""
    empty = sitk.Image(_scan().GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(_scan())
    path = _write(empty, tmp_path / "empty_labels.nii.gz")
    assert read_volume(path, kind="labels").GetSize() == (39, 50, 40)
    with pytest.raises(Med3DFMError, match="constant image"):
        read_volume(path)
    with pytest.raises(ValueError):
        read_volume(path, kind="mask")  # type: ignore[arg-type]
