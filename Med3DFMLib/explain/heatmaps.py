"""Heatmaps out: from a map on the model grid to a float `.nrrd` on the input's own grid, values
in [0, 1], with a JSON note beside it saying how it was made.

The map is resampled linearly in physical space (as `preprocess.probabilities_to_labels` does for
probabilities), so it overlays the scan exactly in Slicer whatever the scan's orientation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import SimpleITK as sitk

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.io.atomic import check_writable, write_text_atomic
from Med3DFMLib.io.volumes import write_volume
from Med3DFMLib.record import record_path_for


def check_heatmap_path(path: Path, *others: Optional[Path]) -> None:
    name = str(path).lower()
    if not name.endswith(".nrrd") or name.endswith(".seg.nrrd"):
        raise Med3DFMError(f"the heatmap must be a float volume ending in .nrrd (not .seg.nrrd): {path}")
    if any(o is not None and record_path_for(Path(o)) == record_path_for(Path(path)) for o in others):
        raise Med3DFMError(f"the heatmap {Path(path).name} and the table need different names (their JSON notes would collide)")
    check_writable(path)


def normalise(values: np.ndarray) -> np.ndarray:
    """Scale a non-negative map to [0, 1] by its maximum (all zeros stay zeros)."""
    values = np.nan_to_num(np.clip(values.astype(np.float32), 0.0, None))
    top = float(values.max(initial=0.0))
    return values / top if top > 0 else values


def to_input_grid(on_model_grid: np.ndarray, grid: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Resample a (z, y, x) map from the model grid onto the input image's grid, rescaled to [0, 1]."""
    source = sitk.GetImageFromArray(np.ascontiguousarray(on_model_grid, dtype=np.float32))
    source.CopyInformation(grid)
    resampled = sitk.Resample(source, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    array = normalise(sitk.GetArrayFromImage(resampled))  # the model-grid peak may fall between input voxels
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(reference)
    return result


def write_heatmap(path: Path, on_model_grid: np.ndarray, grid: sitk.Image, reference: sitk.Image, note: Dict[str, Any]) -> sitk.Image:
    """Write the heatmap (.nrrd, float32, input grid) and its JSON note; returns the image."""
    image = to_input_grid(on_model_grid, grid, reference)
    write_volume(path, image)
    note = {"heatmap": str(path), "values": "0..1, scaled by the map's maximum", "grid": "input image grid (resampled linearly in physical space)", **note}
    write_text_atomic(record_path_for(Path(path)), json.dumps(note, indent=2, default=str) + "\n")
    return image
