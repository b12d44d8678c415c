"""Reading and writing scalar volumes with their geometry (origin, spacing, direction) intact.

Anything SimpleITK reads is accepted: NRRD, NIfTI, MHA/MHD, and a folder holding a DICOM series.
Every image that comes in is checked to be a 3D single-component volume, so a 2D slice, a 4D
series or an RGB image is refused with a message instead of failing deep inside the model.
"""

from __future__ import annotations

from pathlib import Path


import numpy as np
import SimpleITK as sitk

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.io.atomic import PathLike, atomic_path


def read_volume(path: PathLike) -> sitk.Image:
    """Read a 3D scalar image from a file or a DICOM series folder."""
    path = Path(path)
    if not path.exists():
        raise Med3DFMError(f"input not found: {path}")
    if path.is_dir():
        image = _read_dicom_folder(path)
    else:
        if path.stat().st_size == 0:
            raise Med3DFMError(f"input file is empty: {path}")
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise Med3DFMError(f"cannot read {path.name} as an image: {_first_line(err)}") from None
    check_volume(image, path.name)
    return image


def _read_dicom_folder(folder: Path) -> sitk.Image:
    """Read the largest DICOM series in `folder` (sorted by slice position by GDCM)."""
    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(folder)) or []
    if not series_ids:
        raise Med3DFMError(f"no DICOM series found in folder {folder}")
    files_per_series = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    series_id = max(files_per_series, key=lambda sid: len(files_per_series[sid]))
    files = files_per_series[series_id]
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise Med3DFMError(f"cannot read the DICOM series in {folder}: {_first_line(err)}") from None


def check_volume(image: sitk.Image, name: str = "image") -> None:
    """Refuse images the models cannot use: not 3D, several components, or degenerate."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise Med3DFMError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "a single-channel (grey-scale) 3D volume is needed"
        )
    dim = image.GetDimension()
    if dim == 4:
        raise Med3DFMError(f"{name} is 4D (size {image.GetSize()}); pick one 3D volume of the series first")
    if dim != 3:
        raise Med3DFMError(f"{name} is {dim}D (size {image.GetSize()}); a 3D volume is needed")
    size = image.GetSize()
    if min(size) < 2:
        raise Med3DFMError(
            f"{name} is a single slice (size {size}); a 3D volume with at least 2 slices on each axis is needed"
        )
    if any(s <= 0 for s in image.GetSpacing()):
        raise Med3DFMError(f"{name} has a non-positive voxel spacing {image.GetSpacing()}")


def to_array(image: sitk.Image) -> np.ndarray:
    """Voxel array in (i, j, k) = (x, y, z) order, as Slicer and slicerio index it."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def from_array(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Image with voxels from an (i, j, k) array and geometry copied from `reference`."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    image.CopyInformation(reference)
    return image


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix from voxel index (i, j, k) to physical LPS millimetres (ITK's space)."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def write_volume(path: PathLike, image: sitk.Image, compress: bool = True) -> None:
    """Write any image atomically (format from the extension: .nrrd, .nii.gz, .mha ...)."""
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)


def _first_line(err: BaseException) -> str:
    """ITK errors are multi-line; the useful part is the last non-empty line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


