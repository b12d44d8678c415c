"""Sparse labels → supervision: which voxels are which class, and which are unknown.

Rules (what a radiologist painting a few slices means):
- A slice with no labelled voxel is unlabelled and ignored.
- In a slice that has labels, every unlabelled voxel is background.
- A segment named "background" marks explicit negatives anywhere.
- `dense=True` treats the whole volume as labelled.
Slices are planes across one voxel axis of the image; by default the axis along which the fewest
slices carry labels (the one the user painted on).
Labels on another grid are matched to the image in physical space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.io.segmentations import LabelVolume, SegmentInfo, resample_labels_to

IGNORE = -1
BACKGROUND_NAMES = {"background", "bg", "negative"}
AXES = {"i": 2, "j": 1, "k": 0}  # voxel axis name → axis of the (z, y, x) array


@dataclass
class Supervision:
    """Per-voxel targets on the image grid: IGNORE, 0 (background) or 1..C (structures)."""

    targets: np.ndarray  # (z, y, x) int16
    classes: List[SegmentInfo]  # class c+1 ↔ classes[c]
    axis: Optional[str]  # slice axis used ("i", "j", "k"), None when dense
    labelled_slices: List[int] = field(default_factory=list)
    summary: Dict[str, int] = field(default_factory=dict)


def supervision_from_labels(image: sitk.Image, labels: LabelVolume, name: str = "labels", dense: bool = False, axis: str = "auto") -> Supervision:
    """Targets for one image from its (sparse) labels; clear errors for unusable labels."""
    _check_extent(labels.image, image, name)
    on_image = sitk.GetArrayFromImage(resample_labels_to(labels.image, image, name)).astype(np.int32)
    background_values = {s.value for s in labels.segments if s.name.strip().lower() in BACKGROUND_NAMES}
    structures = [s for s in labels.segments if s.value not in background_values]
    if not structures:
        raise Med3DFMError(f"{name}: no structure is labelled (only background); paint the structure to learn")
    targets = np.full(on_image.shape, IGNORE, dtype=np.int16)
    any_label = on_image > 0
    if not any_label.any():
        raise Med3DFMError(f"{name}: no labelled voxel inside the image")
    chosen: Optional[str] = None
    slices: List[int] = []
    if dense:
        targets[:] = 0
    else:
        chosen = _slice_axis(any_label) if axis == "auto" else axis
        if chosen not in AXES:
            raise Med3DFMError(f"unknown slice axis {axis!r}; use auto, i, j or k")
        array_axis = AXES[chosen]
        other = tuple(a for a in range(3) if a != array_axis)
        slices = [int(i) for i in np.nonzero(any_label.any(axis=other))[0]]
        index = [slice(None)] * 3
        index[array_axis] = slices
        targets[tuple(index)] = 0
    for value in background_values:
        targets[on_image == value] = 0
    for class_index, segment in enumerate(structures, start=1):
        targets[on_image == segment.value] = class_index
    return Supervision(targets, [SegmentInfo(i, s.name, s.color, s.terminology) for i, s in enumerate(structures, start=1)], chosen, slices)


def _slice_axis(labelled: np.ndarray) -> str:
    """The axis whose slices are most sparsely labelled: the one the user painted on."""
    fractions = {name: labelled.any(axis=tuple(a for a in range(3) if a != array_axis)).mean() for name, array_axis in AXES.items()}
    return min(fractions, key=lambda name: (fractions[name], name != "k"))


def _check_extent(labels: sitk.Image, image: sitk.Image, name: str) -> None:
    """Refuse labels whose labelled voxels mostly fall outside the image (another patient)."""
    array = sitk.GetArrayViewFromImage(labels)
    points = np.argwhere(array > 0)
    if points.size == 0:
        raise Med3DFMError(f"{name}: the label file has no labelled voxel")
    sample = points[:: max(1, len(points) // 2000)]
    size = np.array(image.GetSize())
    outside = 0
    for z, y, x in sample:
        physical = labels.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
        index = np.array(image.TransformPhysicalPointToContinuousIndex(physical))
        if np.any(index < -0.5) or np.any(index > size - 0.5):
            outside += 1
    if outside == len(sample):
        raise Med3DFMError(f"{name}: the labels lie entirely outside the image (different scan or patient?)")
    if outside > 0.05 * len(sample):
        raise Med3DFMError(
            f"{name}: {100 * outside / len(sample):.0f}% of the labelled voxels lie outside the image; "
            "the labels do not belong to this scan (different patient or field of view?)"
        )


def merge_classes(supervisions: Sequence[Supervision]) -> List[SegmentInfo]:
    """One class list across several labelled images, matched by segment name."""
    names: List[SegmentInfo] = []
    for supervision in supervisions:
        for segment in supervision.classes:
            if all(s.name.lower() != segment.name.lower() for s in names):
                names.append(SegmentInfo(len(names) + 1, segment.name, segment.color, segment.terminology))
    return names


def remap(supervision: Supervision, classes: Sequence[SegmentInfo]) -> np.ndarray:
    """Targets renumbered to the merged class list."""
    lookup = {s.value: next(c.value for c in classes if c.name.lower() == s.name.lower()) for s in supervision.classes}
    targets = supervision.targets.copy()
    for old, new in lookup.items():
        targets[supervision.targets == old] = new
    return targets
