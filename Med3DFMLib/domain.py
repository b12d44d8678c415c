"""What a model was made for (its card's `domain`) and whether a scan is like that.

A radiologist who sees one confident result on a scan the model never saw (a hippocampus found
in a chest CT) stops trusting all of them, so every segmentation card declares its domain and
every input is checked against it before inference:

* **modality**: from the DICOM Modality tag where the file has one, else from the data (CT is in
  Hounsfield units, with air at about -1000; MR has no absolute scale, so it is recognised only as
  "not CT");
* **field of view**: the physical extent of the scan's bounding box along the patient axes
  (L, P, S, in mm) against the range of the training scans, with a factor of `FOV_FACTOR` either side;
* **intensity signature**: percentiles (`PERCENTILES`) of the raw voxels against their range over the
  training scans; in HU for CT, relative to the scan's 99th percentile for MR and other scales.

Body region and MR contrast are declared for people to read: the data do not tell them reliably.

Only numpy is needed here (SimpleITK for `measure_image`), so the Slicer module runs the same check
in Slicer's own process to mark the models that fit the selected volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:  # SimpleITK only for images read by the library
    import SimpleITK as sitk

MODALITY_TAG = "0008|0060"  # DICOM (0008,0060) Modality, as ITK/GDCM name it
PERCENTILES = (1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0)  # the last is the reference of the relative profile
FOV_FACTOR = 1.5  # a scan may be this many times smaller or larger per axis than the training range
# Relative percentiles (fractions of the 99th) may stray this far outside the training range: two MSD
# hippocampus crops differ by at most 0.15 in 99.9 % of all pairs (so an adapter learned on one crop
# accepts the others), while the breast MR crop in Testing/Data is 0.28 from the nearest of them.
RELATIVE_MARGIN = 0.15
# CT percentiles may stray this many HU outside the training range. They move with how much air and
# fat a field of view holds, so this catches scans that are not in HU or show a very different tissue
# mix, not one CT of a region against another.
HU_MARGIN = 250.0
HU_FLOOR = -1024.0  # nothing is darker than air; lower values are padding outside the reconstructed circle
AIR_HU = (-1100.0, -850.0)  # where air lies in a CT in Hounsfield units
MIN_AIR_FRACTION = 0.01  # a CT shows air around the body or in it
MAX_SAMPLES = 1_000_000  # voxels used for the statistics (a regular subsample of larger scans)
MODALITIES = ("CT", "MR", "not CT", "any")
AXES = "LPS"


@dataclass(frozen=True)
class ScanFacts:
    """What the check needs to know about one scan, measured from its voxels and geometry."""

    extent_mm: Tuple[float, float, float]  # bounding box along L, P, S
    percentiles: Tuple[float, ...]  # raw intensities at PERCENTILES
    air_fraction: float  # voxels at CT air values
    dicom_modality: Optional[str] = None  # the DICOM Modality tag, when the scan came with one

    @property
    def modality(self) -> str:
        """The DICOM tag if there is one, else "CT" for Hounsfield units with air, else "not CT"."""
        if self.dicom_modality:
            return self.dicom_modality
        return "CT" if self.air_fraction >= MIN_AIR_FRACTION else "not CT"

    def describe_modality(self) -> str:
        if self.dicom_modality:
            return f"{self.dicom_modality} (by its DICOM Modality tag)"
        if self.modality == "CT":
            return f"CT (Hounsfield units: {100 * self.air_fraction:.0f} % of its voxels are air at about -1000)"
        return "not CT (no air at -1000 HU)"

    def relative_percentiles(self) -> Optional[Tuple[float, ...]]:
        """Percentiles as fractions of the 99th (None if that is not positive: no relative scale)."""
        reference = self.percentiles[-1]
        if not reference > 0:
            return None
        return tuple(p / reference for p in self.percentiles[:-1])

    def as_dict(self) -> Dict[str, Any]:
        return {
            "modality": self.modality,
            "dicom_modality": self.dicom_modality,
            "extent_mm": [round(e, 1) for e in self.extent_mm],
            "percentiles": dict(zip((f"{p:g}" for p in PERCENTILES), (round(v, 4) for v in self.percentiles))),
            "air_fraction": round(self.air_fraction, 4),
        }


def measure_scan(voxels: np.ndarray, size_ijk: Sequence[int], ijk_to_lps: np.ndarray, dicom_modality: Optional[str] = None) -> ScanFacts:
    """Facts of a scan from its voxel values (any axis order), its size (i, j, k) and its 4x4 IJK→LPS matrix."""
    size = np.asarray(size_ijk, dtype=float)
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5) for k in (-0.5, size[2] - 0.5)])
    points = corners @ np.asarray(ijk_to_lps, dtype=float).T
    extent = points[:, :3].max(axis=0) - points[:, :3].min(axis=0)
    flat = np.asarray(voxels).reshape(-1)
    sample = np.asarray(flat[:: max(1, flat.size // MAX_SAMPLES)], dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        raise ValueError("the scan has no finite voxel values")
    percentiles = np.percentile(sample, PERCENTILES)
    air = float(np.count_nonzero((sample >= AIR_HU[0]) & (sample <= AIR_HU[1]))) / sample.size
    tag = (dicom_modality or "").strip().upper() or None
    return ScanFacts(tuple(float(e) for e in extent), tuple(float(p) for p in percentiles), air, tag)  # type: ignore[arg-type]


def measure_image(image: "sitk.Image") -> ScanFacts:
    """Facts of an image read by the library (`io.volumes.read_volume` keeps a DICOM series' Modality tag)."""
    import SimpleITK as sitk

    from Med3DFMLib.io.volumes import ijk_to_lps

    tag = image.GetMetaData(MODALITY_TAG) if image.HasMetaDataKey(MODALITY_TAG) else None
    return measure_scan(sitk.GetArrayViewFromImage(image), image.GetSize(), ijk_to_lps(image), tag)


# --- a training domain, measured ------------------------------------------------------------------


def common_modality(scans: Sequence[ScanFacts]) -> str:
    """The modality the training scans share: "CT", "MR" (all tagged so), "not CT", or "any" if mixed."""
    kinds = {"CT" if s.modality == "CT" else ("MR" if s.modality == "MR" else "not CT") for s in scans}
    if len(kinds) == 1:
        return kinds.pop()
    return "any" if "CT" in kinds else "not CT"


def domain_from_scans(
    scans: Sequence[ScanFacts],
    modality: Optional[str] = None,
    body_region: str = "",
    contrast: Optional[str] = None,
    fov_kind: Optional[str] = None,
    measured: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """A card's `domain` from the facts of the scans a model was trained on.

    `modality` overrides what the data say (e.g. "MR" for MR files without a DICOM tag); CT
    percentiles are floored at -1024 HU (padding is not anatomy).
    """
    if not scans:
        raise ValueError("a domain needs at least one training scan")
    modality = modality or common_modality(scans)
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}")
    extents = np.array([s.extent_mm for s in scans])
    raw = np.array([s.percentiles for s in scans])
    if modality == "CT":
        raw = np.maximum(raw, HU_FLOOR)
    relative = np.array([r for r in (s.relative_percentiles() for s in scans) if r is not None])
    field_of_view: Dict[str, Any] = {"axes": AXES, "extent_mm": {"min": _rounded(extents.min(axis=0), 1), "max": _rounded(extents.max(axis=0), 1)}}
    if fov_kind:
        field_of_view["kind"] = fov_kind
    intensity: Dict[str, Any] = {
        "scale": "absolute" if modality == "CT" else "relative",
        "percentiles": list(PERCENTILES),
        "raw": {"min": _rounded(raw.min(axis=0), 4), "max": _rounded(raw.max(axis=0), 4)},
    }
    if len(relative):
        intensity["relative_to_p99"] = {"min": _rounded(relative.min(axis=0), 4), "max": _rounded(relative.max(axis=0), 4)}
    domain: Dict[str, Any] = {"modality": modality}
    if contrast:
        domain["contrast"] = contrast
    domain.update({"body_region": body_region, "field_of_view": field_of_view, "intensity": intensity})
    domain["measured"] = {"scans": len(scans), **dict(measured or {})}
    return domain


def domain_of_images(images: Sequence["sitk.Image"], paths: Sequence[Union[str, Path]]) -> Dict[str, Any]:
    """The domain of a few-shot adapter: measured from the images it was labelled on (already read; `paths` name them)."""
    scans = [measure_image(image) for image in images]
    return domain_from_scans(scans, body_region="as in the labelled images", measured={"from": "the labelled images", "images": [Path(p).name for p in paths]})


def _rounded(values: Iterable[float], digits: int) -> List[float]:
    return [round(float(v), digits) for v in values]


# --- the check --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    """One way a scan differs from a model's domain."""

    aspect: str  # "modality" | "field of view" | "intensity"
    detail: str  # says what the scan has and what the model was trained on


@dataclass(frozen=True)
class Verdict:
    """A scan against one model's domain.

    `deviation` is 0 at the centre of the training domain and 1 at the edge of what is accepted
    (mean over the field-of-view axes and intensity percentiles): it ranks the models that fit.
    """

    model: str
    declared: bool
    mismatches: Tuple[Mismatch, ...] = ()
    deviation: float = math.inf
    any_modality: bool = False
    scan: Optional[ScanFacts] = field(default=None, compare=False)

    @property
    def fits(self) -> bool:
        return self.declared and not self.mismatches

    def reason(self) -> str:
        """One line: why the scan does not fit (or that the card declares no domain)."""
        if not self.declared:
            return "its card declares no domain"
        return "; ".join(m.detail for m in self.mismatches)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model,
            "declared": self.declared,
            "fits": self.fits,
            "mismatches": [{"aspect": m.aspect, "detail": m.detail} for m in self.mismatches],
            "deviation": round(self.deviation, 3) if math.isfinite(self.deviation) else None,
            "scan": self.scan.as_dict() if self.scan is not None else None,
        }


def check(scan: ScanFacts, domain: Optional[Mapping[str, Any]], model: str = "the model") -> Verdict:
    """Compare a scan with a card's `domain` (None: not declared, nothing to compare with)."""
    if not domain:
        return Verdict(model, False, scan=scan)
    mismatches: List[Mismatch] = []
    declared = str(domain.get("modality", "any"))
    modality = _modality_mismatch(scan, declared)
    if modality:
        mismatches.append(Mismatch("modality", modality))
    deviations: List[float] = []
    fov = domain.get("field_of_view")
    if fov:
        problem, values = _fov(scan, fov)
        deviations += values
        if problem:
            mismatches.append(Mismatch("field of view", problem))
    intensity = domain.get("intensity")
    if intensity and not modality:  # the scale of another modality is not comparable
        problem, values = _intensity(scan, intensity)
        deviations += values
        if problem:
            mismatches.append(Mismatch("intensity", problem))
    deviation = float(np.mean(deviations)) if deviations else 0.0
    return Verdict(model, True, tuple(mismatches), deviation, declared == "any", scan)


def _modality_mismatch(scan: ScanFacts, declared: str) -> str:
    if declared == "any":
        return ""
    if declared == "CT":
        return "" if scan.modality == "CT" else f"the scan is {scan.describe_modality()}, the model was trained on CT"
    wanted = "MR" if declared == "MR" else "not CT"
    if scan.modality == "CT" or (declared == "MR" and scan.dicom_modality not in (None, "MR")):
        return f"the scan is {scan.describe_modality()}, the model was trained on {wanted}"
    return ""


def _log_deviation(value: float, low: float, high: float, factor: float) -> float:
    """0 at the geometric centre of [low, high], 1 at low / factor and at high * factor."""
    centre = (math.log(low) + math.log(high)) / 2.0
    half = (math.log(high) - math.log(low)) / 2.0 + math.log(factor)
    return abs(math.log(value) - centre) / half


def _linear_deviation(value: float, low: float, high: float, margin: float) -> float:
    """0 at the centre of [low, high], 1 at low - margin and at high + margin."""
    return abs(value - (low + high) / 2.0) / ((high - low) / 2.0 + margin)


def _fov(scan: ScanFacts, fov: Mapping[str, Any]) -> Tuple[str, List[float]]:
    low, high = fov["extent_mm"]["min"], fov["extent_mm"]["max"]
    values = [_log_deviation(max(e, 1e-3), lo, hi, FOV_FACTOR) for e, lo, hi in zip(scan.extent_mm, low, high)]
    if max(values) <= 1.0:
        return "", values
    kind = fov.get("kind", "scan")
    shown = " x ".join(f"{e:.0f}" for e in scan.extent_mm)
    trained = " x ".join(f"{lo:.0f}-{hi:.0f}" for lo, hi in zip(low, high))
    return f"its field of view is {shown} mm ({' x '.join(AXES)}), the model was trained on {kind}s of {trained} mm", values


def _intensity(scan: ScanFacts, intensity: Mapping[str, Any]) -> Tuple[str, List[float]]:
    names = [f"{p:g}" for p in intensity.get("percentiles", PERCENTILES)]
    if intensity.get("scale") == "absolute":
        values = [max(p, HU_FLOOR) for p in scan.percentiles]
        low, high, margin = intensity["raw"]["min"], intensity["raw"]["max"], HU_MARGIN
        unit = " HU"
    else:
        relative = scan.relative_percentiles()
        if relative is None:
            return "its intensities are not positive (no relative scale to compare)", [math.inf]
        if "relative_to_p99" not in intensity:
            return "", []
        values = list(relative)
        low, high, margin = intensity["relative_to_p99"]["min"], intensity["relative_to_p99"]["max"], RELATIVE_MARGIN
        unit = " of its 99th percentile"
        names = names[: len(values)]
    deviations = [_linear_deviation(v, lo, hi, margin) for v, lo, hi in zip(values, low, high)]
    worst = int(np.argmax(deviations))
    if deviations[worst] <= 1.0:
        return "", deviations
    return (f"its intensity distribution differs: the {names[worst]}th percentile is {values[worst]:.3g}{unit}, "
            f"{low[worst]:.3g} to {high[worst]:.3g} in the training scans"), deviations


# --- choosing a model, and saying why none fits ----------------------------------------------------


def _ranked_fits(verdicts: Sequence[Verdict]) -> List[Verdict]:
    """The fitting verdicts, closest first; a model made for the scan's modality before one for any."""
    return sorted((v for v in verdicts if v.fits), key=lambda v: (v.any_modality, v.deviation))


def best_fit(verdicts: Sequence[Verdict]) -> Optional[Verdict]:
    """The fitting model closest to the scan."""
    ranked = _ranked_fits(verdicts)
    return ranked[0] if ranked else None


def fitting_models(verdicts: Sequence[Verdict]) -> List[str]:
    """Ids of the models that fit, best first."""
    return [v.model for v in _ranked_fits(verdicts)]


def alternatives_text(verdicts: Sequence[Verdict]) -> str:
    """What to use instead: the models that fit, or Learn from labels when none does."""
    models = fitting_models(verdicts)
    if models:
        return f"models that fit: {', '.join(models)}"
    return "no installed model fits it: use Learn from labels (`med3dfm adapt`) to make one"


def refusal(verdict: Verdict, others: Sequence[Verdict]) -> str:
    """The one-line message for a scan outside the chosen model's domain."""
    return f"{verdict.model} does not fit this scan: {verdict.reason()}; {alternatives_text(others)}; --force runs it anyway"
