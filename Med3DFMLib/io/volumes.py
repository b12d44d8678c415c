"""Reading and writing scalar volumes with their geometry (origin, spacing, direction) intact.

Anything SimpleITK reads is accepted: NRRD, NIfTI, MHA/MHD, and a folder holding a DICOM series.
Every image that comes in is checked to be a 3D single-component volume, so a 2D slice, a 4D
series or an RGB image is refused with a message instead of failing deep inside the model.

Inputs that would read "successfully" into nonsense are refused too: SimpleITK fills the missing
part of a truncated file with zeros, so NIfTI/NRRD/MetaImage files are first measured against their
header (`integrity.check_file_integrity`); NaN/Inf voxels, a constant image and an implausible
spacing are refused after reading, for files and DICOM series alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import SimpleITK as sitk

from Med3DFMLib.domain import MODALITY_TAG
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.io.atomic import PathLike, atomic_path
from Med3DFMLib.io.integrity import check_file_integrity, non_finite_message

VolumeKind = Literal["image", "labels"]
MAX_SPACING_MM = 50.0  # no CT/MR/PET protocol has voxels this coarse; larger is a unit or header error


def read_volume(path: PathLike, kind: VolumeKind = "image") -> sitk.Image:
    """Read a 3D scalar image from a file or a DICOM series folder, refusing corrupt or odd inputs.

    `kind="image"` (scans to segment, classify, explain or adapt on) also refuses a constant image:
    a blank scan gives meaningless output. `kind="labels"` accepts one, because an all-background
    (empty) or single-label map is a legitimate label file; its callers decide whether it is useful.
    """
    if kind not in ("image", "labels"):
        raise ValueError(f"kind must be 'image' or 'labels', not {kind!r}")
    path = Path(path)
    if not path.exists():
        raise Med3DFMError(f"input not found: {path}")
    if path.is_dir():
        image = _read_dicom_folder(path)
    else:
        if path.stat().st_size == 0:
            raise Med3DFMError(f"input file is empty: {path}")
        check_file_integrity(path)  # before ReadImage: it would zero-fill a short file, or allocate what a bad header asks
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise Med3DFMError(f"cannot read {path.name} as an image: {_first_line(err)}") from None
    check_volume(image, path.name)
    check_voxels(image, path.name, kind)
    return image


def _read_dicom_folder(folder: Path) -> sitk.Image:
    """Read the largest DICOM series in `folder` (sorted by slice position by GDCM).

    The series' Modality tag is kept on the image (a series reader drops every tag otherwise): the
    domain check trusts it over what the voxels suggest.
    """
    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(folder)) or []
    if not series_ids:
        raise Med3DFMError(f"no DICOM series found in folder {folder}")
    files_per_series = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    series_id = max(files_per_series, key=lambda sid: len(files_per_series[sid]))
    files = files_per_series[series_id]
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise Med3DFMError(f"cannot read the DICOM series in {folder}: {_first_line(err)}") from None
    if reader.HasMetaDataKey(0, MODALITY_TAG):
        image.SetMetaData(MODALITY_TAG, reader.GetMetaData(0, MODALITY_TAG).strip())
    return image


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
    check_spacing(image.GetSpacing(), name)


def check_spacing(spacing: Sequence[float], name: str = "image") -> None:
    """Refuse a spacing no scanner produces: 0, negative, not a number, or above 50 mm on an axis."""
    if not all(np.isfinite(s) and 0 < s <= MAX_SPACING_MM for s in spacing):
        shown = " x ".join(f"{s:g}" for s in spacing)
        raise Med3DFMError(
            f"{name} has an implausible voxel spacing of {shown} mm "
            f"(every axis must be above 0 and at most {MAX_SPACING_MM:g} mm; check the header's units)"
        )


def check_voxels(image: sitk.Image, name: str = "image", kind: VolumeKind = "image") -> None:
    """Refuse NaN/Inf voxels (a corrupt file or a failed computation) and, for scans, a constant image.

    Uses min/max over a view of the voxels, so no second copy of the volume is made.
    """
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.size == 0:
        return
    low, high = voxels.min(), voxels.max()  # both propagate NaN
    if np.issubdtype(voxels.dtype, np.floating) and not (np.isfinite(low) and np.isfinite(high)):
        message = non_finite_message(name, int(np.count_nonzero(np.isnan(voxels))), int(np.count_nonzero(np.isinf(voxels))))
        raise Med3DFMError(message or f"{name} holds non-finite voxels")
    if kind == "image" and low == high:
        raise Med3DFMError(f"{name} is a constant image (every voxel is {low:g}): a blank scan has nothing to analyse")


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


