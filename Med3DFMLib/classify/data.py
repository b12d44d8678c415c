"""Scans and regions in, adapter tokens out; training and scoring lists (CSV) read with errors
that name the row.

Encoder features come from the shared on-disk cache (`fewshot.features`), so a scan seen once
(by adapt, classify, or the few-shot segmenter with the same window) never runs the encoder again.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from Med3DFMLib.classify.model import LEVELS, STRIDE, cell_occupancy, log_weights, tokens_of
from Med3DFMLib.classify.train import Example, View
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.fewshot.features import VolumeFeatures, cached_features
from Med3DFMLib.io.tables import read_list_text, resolve_listed_path
from Med3DFMLib.preprocess import InputSpec, to_model_input
from Med3DFMLib.progress import Progress

MAX_WINDOW = 128
MIN_WINDOW = 64


def feature_window(shape: Sequence[int], largest: int = MAX_WINDOW, smallest: int = MIN_WINDOW) -> int:
    """Encoder window for a model-grid volume: the volume's own size (rounded up to 16) when it is
    small, so a 64³ scan costs one 64³ window instead of a mostly padded 128³ one."""
    side = int(math.ceil(max(shape) / STRIDE) * STRIDE)
    return int(min(largest, max(smallest, side)))


@dataclass
class ScanFeatures:
    image: sitk.Image
    array: np.ndarray  # normalised model-grid volume (z, y, x), flipped along x when `flipped`
    grid: sitk.Image
    features: VolumeFeatures
    window: int
    cache_hit: bool
    seconds: float
    flipped: bool = False  # a left-right mirrored view (training augmentation)


def scan_features(image: sitk.Image, encoder_module: torch.nn.Module, encoder_sha256: str, spec: InputSpec, device: torch.device, progress: Optional[Progress] = None, max_window: int = MAX_WINDOW) -> ScanFeatures:
    tick = time.perf_counter()
    array, grid = to_model_input(image, spec)
    window = feature_window(array.shape, max_window)
    features, hit = cached_features(encoder_module, encoder_sha256, array, window, device, progress)
    return ScanFeatures(image, array, grid, features, window, hit, time.perf_counter() - tick)


def mirrored(scan: ScanFeatures, encoder_module: torch.nn.Module, encoder_sha256: str, device: torch.device) -> ScanFeatures:
    """The same scan mirrored along x, with its own encoder features: an augmented view that reaches
    the classifier although the encoder is frozen (features cannot be flipped after the fact)."""
    tick = time.perf_counter()
    array = np.ascontiguousarray(scan.array[:, :, ::-1])
    features, hit = cached_features(encoder_module, encoder_sha256, array, scan.window, device)
    return ScanFeatures(scan.image, array, scan.grid, features, scan.window, hit, time.perf_counter() - tick, flipped=True)


def _binary_image(path: Path, name: str) -> sitk.Image:
    """Any label map or .seg.nrrd as a float 0/1 image on its own grid (every segment counts)."""
    from Med3DFMLib.io.segmentations import read_labels

    labels = read_labels(path)
    binary = sitk.Cast(labels.image > 0, sitk.sitkFloat32)
    if not np.any(sitk.GetArrayViewFromImage(binary)):
        raise Med3DFMError(f"{name} {Path(path).name} is empty (no labelled voxel)")
    return binary


def region_on_grid(path: Path, grid: sitk.Image, name: str = "ROI") -> np.ndarray:
    """Fraction (0..1) of each model-grid voxel inside a region file, matched in physical space.

    Linear resampling of the 0/1 mask keeps a region thinner than one model voxel from vanishing.
    """
    binary = _binary_image(path, name)
    on_grid = sitk.GetArrayFromImage(sitk.Resample(binary, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    if not np.any(on_grid > 0):
        raise Med3DFMError(f"{name} {Path(path).name} lies outside the image (different scan or patient?)")
    return np.clip(on_grid, 0.0, 1.0)


def _region(scan: ScanFeatures, path: Optional[Path], name: str) -> np.ndarray:
    """A region on the scan's model grid (the whole scan when no file is given), mirrored with the view."""
    if path is None:
        return np.ones(scan.array.shape, dtype=np.float32)
    mask = region_on_grid(path, scan.grid, name)
    return np.ascontiguousarray(mask[:, :, ::-1]) if scan.flipped else mask


def occupancy(scan: ScanFeatures, roi: Optional[Path] = None) -> List[np.ndarray]:
    """Per-cell weights (d, h, w) of every level: the scan's own voxels, times the ROI when one is given."""
    mask = _region(scan, roi, "ROI")
    return [cell_occupancy(mask, tuple(scan.features.padded), stride) for stride in LEVELS]


def full_tokens(scan: ScanFeatures, cells: Sequence[np.ndarray]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """All tokens of the scan per level ((N, C) each) and their log weights ((N,), −inf outside the region)."""
    return [tokens_of(scan.features.maps[s]) for s in LEVELS], [log_weights(c) for c in cells]


def make_view(scan: ScanFeatures, roi: Optional[Path] = None, mask: Optional[Path] = None) -> View:
    """One view for training: only the cells inside the region are kept (smaller, faster batches)."""
    cells = occupancy(scan, roi)
    tokens, weights = full_tokens(scan, cells)
    keep = [w.isfinite() for w in weights]
    aux = None
    if mask is not None:
        aux_cells = cell_occupancy(_region(scan, mask, "mask"), tuple(scan.features.padded), LEVELS[-1])
        aux = torch.from_numpy(aux_cells.ravel().astype(np.float32))[keep[-1]]
    return View([t[k].clone() for t, k in zip(tokens, keep)], [w[k].clone() for w, k in zip(weights, keep)], aux)


def make_example(scans: Sequence[ScanFeatures], label: int, roi: Optional[Path] = None, mask: Optional[Path] = None) -> Example:
    """A training example from one or more views of the same scan (the original and its mirror)."""
    return Example([make_view(scan, roi, mask) for scan in scans], label)


@dataclass
class ListRow:
    where: str  # "train.csv line 3": what an error message names
    image: Path
    class_name: Optional[str] = None
    roi: Optional[Path] = None
    mask: Optional[Path] = None


def read_list(path: Path, need_class: bool) -> List[ListRow]:
    """Rows of a CSV with a header: image[,class][,roi][,mask]; relative paths are against the CSV's folder."""
    path = Path(path)
    text = read_list_text(path)
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise Med3DFMError(f"{path.name} is empty; it needs a header line (image{',class' if need_class else ''}[,roi]) and one row per scan")
    dialect = csv.excel_tab if "\t" in lines[0] and "," not in lines[0] else csv.excel
    reader = csv.reader(lines, dialect)
    header = [h.strip().lower() for h in next(reader)]
    needed = ["image", "class"] if need_class else ["image"]
    missing = [c for c in needed if c not in header]
    if missing:
        raise Med3DFMError(f"{path.name} needs the columns {', '.join(needed)} in its header line (missing: {', '.join(missing)}; found: {', '.join(h for h in header if h) or 'none'})")
    base = path.resolve().parent
    rows: List[ListRow] = []
    line_numbers = [i + 1 for i, line in enumerate(text.splitlines()) if line.strip() and not line.lstrip().startswith("#")]
    for number, cells in zip(line_numbers[1:], reader):
        where = f"{path.name} line {number}"
        values = {h: (cells[i].strip() if i < len(cells) else "") for i, h in enumerate(header)}
        if not values.get("image"):
            raise Med3DFMError(f"{where}: the image column is empty")
        row = ListRow(where, resolve_listed_path(values["image"], base))
        if need_class:
            if not values.get("class"):
                raise Med3DFMError(f"{where}: the class column is empty")
            row.class_name = values["class"]
        if values.get("roi"):
            row.roi = resolve_listed_path(values["roi"], base)
        if values.get("mask"):
            row.mask = resolve_listed_path(values["mask"], base)
        rows.append(row)
    if not rows:
        raise Med3DFMError(f"{path.name} has a header but no rows")
    return rows
