"""How sure the model is, voxel by voxel, and where it is not: the confidence volume `segment` can write.

A segmentation shows what the model decided, not how close the decision was. The confidence volume
(computed on the input grid by `preprocess.labels_and_confidence`) is high inside structures the
model is sure of and falls at boundaries and on scans unlike its training data; a reader looks at
it as an overlay, and `flag_low_confidence` says which segments hold most of the unsure voxels, the
places a radiologist should check first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Sequence

import numpy as np

if TYPE_CHECKING:
    from Med3DFMLib.io.segmentations import SegmentInfo

MEASURES = ("max-probability", "entropy")
DEFAULT_MEASURE = "max-probability"
DEFAULT_THRESHOLD = 0.6  # below this a voxel is flagged (max-probability: the winning class had < 60 %)
BACKGROUND = "background"


def flag_low_confidence(labels: np.ndarray, confidence: np.ndarray, segments: Sequence["SegmentInfo"], threshold: float, voxel_ml: float) -> List[Dict[str, Any]]:
    """Per label (background included), its voxels with confidence below `threshold`, most first.

    Each row: segment name, label value, low-confidence voxels and mL, their share of the segment's
    voxels and of all low-confidence voxels, and the segment's mean confidence. Segments without any
    voxel are left out.
    """
    if labels.shape != confidence.shape:
        raise ValueError(f"labels {labels.shape} and confidence {confidence.shape} are on different grids")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"the low-confidence threshold must lie in (0, 1], not {threshold}")
    names = {0: BACKGROUND, **{s.value: s.name for s in segments}}
    flat_labels = labels.ravel()
    size = int(max(names) + 1 if flat_labels.size == 0 else max(max(names), int(flat_labels.max())) + 1)
    voxels = np.bincount(flat_labels, minlength=size)
    low = np.bincount(flat_labels, weights=(confidence.ravel() < threshold), minlength=size)
    summed = np.bincount(flat_labels, weights=confidence.ravel().astype(np.float64), minlength=size)
    total_low = float(low.sum())
    rows = []
    for value in range(size):
        if voxels[value] == 0:
            continue
        rows.append({
            "segment": names.get(value, f"label {value}"),
            "value": value,
            "low_voxels": int(low[value]),
            "low_ml": round(float(low[value]) * voxel_ml, 4),
            "share_of_segment": round(float(low[value]) / float(voxels[value]), 4),
            "share_of_low": round(float(low[value]) / total_low, 4) if total_low else 0.0,
            "mean_confidence": round(float(summed[value]) / float(voxels[value]), 4),
        })
    rows.sort(key=lambda row: (-row["low_voxels"], row["value"]))
    return rows


def describe_flags(rows: Sequence[Dict[str, Any]], threshold: float, limit: int = 3) -> str:
    """One line for the terminal and the panel: which segments hold most of the unsure voxels."""
    flagged = [row for row in rows if row["low_voxels"] > 0]
    if not flagged:
        return f"no voxel below confidence {threshold:g}"
    parts = [f"{row['segment']} {row['low_ml']:.2f} mL ({100 * row['share_of_segment']:.0f} % of it)" for row in flagged[:limit]]
    more = f", {len(flagged) - limit} more" if len(flagged) > limit else ""
    return f"below confidence {threshold:g}: " + ", ".join(parts) + more
