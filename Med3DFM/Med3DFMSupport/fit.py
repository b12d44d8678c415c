"""Which Segment models fit the selected volume: the library's domain check, for the panel.

The module hands over what a volume node has (its voxels, its IJK→RAS matrix, the DICOM Modality of
its Subject Hierarchy item); the check itself is `Med3DFMLib.domain` (numpy only), the same one the
`segment` job runs, so the panel and the job never disagree about what fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Mapping, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    from Med3DFMLib.domain import ScanFacts

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def scan_facts(voxels_kji: np.ndarray, ijk_to_ras: np.ndarray, dicom_modality: Optional[str] = None) -> "ScanFacts":
    """Facts of a volume node's voxels (Slicer's k, j, i array) and geometry (RAS), as the library measures a file."""
    from Med3DFMLib.domain import measure_scan

    return measure_scan(voxels_kji, voxels_kji.shape[::-1], RAS_TO_LPS @ np.asarray(ijk_to_ras, dtype=float), dicom_modality or None)


@dataclass(frozen=True)
class ModelFit:
    """One entry of the Segment model list, marked for the selected volume."""

    model_id: str
    label: str  # what the list shows
    fits: Optional[bool]  # None: no volume selected, or the model's card declares no domain
    reason: str = ""  # why it does not fit


def mark_model_choices(choices: Sequence[Tuple[str, str]], entries: Mapping[str, Mapping], scan: Optional["ScanFacts"]) -> List[ModelFit]:
    """The (label, id) model choices with a mark: fits this volume, does not fit, or not declared."""
    from Med3DFMLib.domain import check

    marked = []
    for label, model_id in choices:
        if scan is None:
            marked.append(ModelFit(model_id, label, None))
            continue
        verdict = check(scan, (entries.get(model_id) or {}).get("domain"), model_id)
        if not verdict.declared:
            marked.append(ModelFit(model_id, f"{label} - fit unknown (no declared domain)", None))
        elif verdict.fits:
            marked.append(ModelFit(model_id, f"\u2713 {label} - fits this volume", True))
        else:
            marked.append(ModelFit(model_id, f"\u2717 {label} - does not fit this volume", False, verdict.reason()))
    return marked


def mismatch_message(model_id: str, marked: Sequence[ModelFit]) -> str:
    """What the panel says when the chosen model does not fit the volume ("" when it fits or nothing is known)."""
    chosen = next((m for m in marked if m.model_id == model_id), None)
    if chosen is None or chosen.fits is not False:
        return ""
    others = [m.model_id for m in marked if m.fits]
    instead = (f"Models that fit it: {', '.join(others)}." if others
               else "No installed model fits it: paint the structure on a few slices and use Learn from labels.")
    return f"{model_id} does not fit this volume: {chosen.reason}. {instead}"
