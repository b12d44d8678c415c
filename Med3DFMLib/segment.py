"""The Segment job: a scan in, a Slicer segmentation (and optional label map, table, record) out.

Every output is checked for writability before any work starts, written under a temporary name,
and renamed into place only when all of them are complete: a failed or cancelled run leaves
nothing that looks like a result.

Before any model runs, the scan is checked against the model's declared domain (Med3DFMLib/domain.py):
a scan outside it is refused with one line naming the mismatch and the models that fit, unless
forced (the record then says so). Without a model, the best fitting one is chosen and named.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from Med3DFMLib.confidence import DEFAULT_MEASURE, DEFAULT_THRESHOLD, MEASURES, describe_flags, flag_low_confidence
from Med3DFMLib.domain import ScanFacts, Verdict, best_fit, check, fitting_models, measure_image, refusal
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.inference import choose_device, predict_volume
from Med3DFMLib.io.color_table import color_table_text
from Med3DFMLib.io.atomic import atomic_path, check_writable
from Med3DFMLib.io.segmentations import SegmentInfo, write_labelmap, write_seg_nrrd
from Med3DFMLib.io.tables import write_tsv
from Med3DFMLib.io.terminology import segment_names
from Med3DFMLib.io.volumes import read_volume, write_volume
from Med3DFMLib.preprocess import InputSpec, labels_and_confidence, to_model_input
from Med3DFMLib.progress import Progress
from Med3DFMLib.registry import licences
from Med3DFMLib.record import new_record, record_path_for

if TYPE_CHECKING:
    from Med3DFMLib.registry.resolve import KnownModel, ResolvedModel


VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
MIN_RESOLUTION_FACTOR, MAX_RESOLUTION_FACTOR = 1.0, 4.0  # Med3DFMLib.windows.RESOLUTION_FACTORS lie in between

Predictor = Callable[[sitk.Image, Progress, Dict[str, float]], Tuple[np.ndarray, sitk.Image]]


@dataclass
class LoadedSegmenter:
    """A segmentation model or a few-shot adapter, ready to run, with what the job needs to know.

    `predict(image, progress, timings)` returns class probabilities on a model grid and that grid.
    """

    predict: Predictor
    segments: List[SegmentInfo]
    provenance: Dict[str, Any]
    model: Optional[Any] = None  # the network and its input spec, for built-in segmentation models
    spec: Optional[InputSpec] = None  # (benchmarks time their parts separately)


def load_segmenter(model_spec: str, registry: Optional[str] = None, progress: Optional[Progress] = None, device_name: str = "auto", overlap: float = 0.25,
                   resolution_factor: float = 1.0) -> LoadedSegmenter:
    from Med3DFMLib.registry import resolve_model

    return load_resolved(resolve_model(model_spec, registry=registry, progress=progress), registry, progress, device_name, overlap, resolution_factor)


def load_resolved(resolved: "ResolvedModel", registry: Optional[str] = None, progress: Optional[Progress] = None, device_name: str = "auto", overlap: float = 0.25,
                  resolution_factor: float = 1.0) -> LoadedSegmenter:
    """A resolved (verified) model file, loaded and ready to run. `resolution_factor` > 1: the model
    runs on a grid that many times coarser than its own spacing (a scan that would not fit in memory
    otherwise: memory falls with the factor cubed, detail with it); the labels still come back on
    the scan's own grid."""
    if not MIN_RESOLUTION_FACTOR <= resolution_factor <= MAX_RESOLUTION_FACTOR:
        raise Med3DFMError(f"--lower-resolution must lie in [{MIN_RESOLUTION_FACTOR:g}, {MAX_RESOLUTION_FACTOR:g}], not {resolution_factor:g}")
    from Med3DFMLib.weights import read_weights

    tensors, card = read_weights(resolved.weights)
    provenance = {"id": resolved.id, "version": resolved.version, "sha256": resolved.sha256, "source": resolved.source, "file": str(resolved.weights), "task": card.get("task")}
    device = choose_device(device_name)
    if card.get("task") == "adapter":
        from Med3DFMLib.fewshot.adapt import adapter_predictor

        if resolution_factor != 1.0:
            raise Med3DFMError("--lower-resolution works with segmentation models; an adapter runs on its encoder's grid")

        adapt_predict, segments = adapter_predictor(tensors, card, registry, device, progress)
        provenance["encoder"] = card["encoder"]

        def predict_adapter(image: sitk.Image, progress: Progress, timings: Dict[str, float]) -> Tuple[np.ndarray, sitk.Image]:
            tick = time.perf_counter()
            result = adapt_predict(image)
            timings["infer"] = time.perf_counter() - tick
            return result

        return LoadedSegmenter(predict_adapter, segments, provenance)
    if card.get("task") != "segment":
        raise Med3DFMError(f"model {resolved.id} is a {card.get('task')!r} model; `segment` needs a segmentation model or a segmentation adapter")
    from Med3DFMLib.models import load_segmentation_model

    model = load_segmentation_model(tensors, card)
    spec = InputSpec.from_card(card["input"])
    if resolution_factor != 1.0:
        spec = dataclasses.replace(spec, spacing=tuple(float(v) * resolution_factor for v in spec.spacing))  # type: ignore[arg-type]
        provenance["resolution_factor"] = resolution_factor

    def predict_model(image: sitk.Image, progress: Progress, timings: Dict[str, float]) -> Tuple[np.ndarray, sitk.Image]:
        tick = time.perf_counter()
        progress.update("preprocess", 0.0, "resampling to the model grid")
        array, grid = to_model_input(image, spec)
        timings["preprocess"] = time.perf_counter() - tick
        tick = time.perf_counter()
        probabilities = predict_volume(model, array, spec.window[::-1], device, overlap=overlap, progress=progress)
        timings["infer"] = time.perf_counter() - tick
        return probabilities, grid

    return LoadedSegmenter(predict_model, [SegmentInfo.from_card(entry) for entry in card["labels"]], provenance, model, spec)


def segment_image(image: sitk.Image, segmenter: LoadedSegmenter, progress: Optional[Progress] = None, timings: Optional[Dict[str, float]] = None) -> sitk.Image:
    """Label map on the image's own grid."""
    return segment_image_with_confidence(image, segmenter, None, progress, timings)[0]


def segment_image_with_confidence(image: sitk.Image, segmenter: LoadedSegmenter, measure: Optional[str], progress: Optional[Progress] = None,
                                  timings: Optional[Dict[str, float]] = None) -> Tuple[sitk.Image, Optional[sitk.Image]]:
    """Label map and (with a `measure` of Med3DFMLib.confidence.MEASURES) a confidence volume, on the image's grid."""
    timings = {} if timings is None else timings
    progress = progress or Progress("none")
    probabilities, grid = segmenter.predict(image, progress, timings)
    tick = time.perf_counter()
    progress.update("postprocess", 0.0, "resampling to the input grid")
    labels, confidence = labels_and_confidence(probabilities, grid, image, measure)
    timings["postprocess"] = time.perf_counter() - tick
    return labels, confidence


def segment_volumes_table(labels: sitk.Image, segments: List[SegmentInfo]) -> List[List[Any]]:
    """Rows of (segment, label value, voxels, volume mm³, volume mL) for every segment."""
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=max(s.value for s in segments) + 1)
    voxel_mm3 = float(np.prod(labels.GetSpacing()))
    return [[s.name, s.value, int(counts[s.value]), counts[s.value] * voxel_mm3, counts[s.value] * voxel_mm3 / 1000.0] for s in segments]


def segmentation_models(registry: Optional[str] = None) -> List["KnownModel"]:
    """Every model `segment` can run, newest version of each id: the registry's segmentation models and
    the segmentation adapters installed in the cache (classification adapters are not candidates)."""
    from Med3DFMLib.registry.catalogue import read_catalogue, version_key
    from Med3DFMLib.registry.resolve import known_models

    newest: Dict[str, "KnownModel"] = {}
    for known in known_models(read_catalogue(registry)):
        entry = known.entry
        if entry.get("task") != "segment" and not (entry.get("task") == "adapter" and entry.get("kind") != "classify"):
            continue
        current = newest.get(entry["id"])
        if current is None or version_key(entry["version"]) > version_key(current.entry["version"]):
            newest[entry["id"]] = known
    return list(newest.values())


@dataclass
class ModelChoice:
    """The model a segment job runs and how the scan compares with its domain (what the record keeps)."""

    resolved: "ResolvedModel"
    verdict: Verdict
    chosen: str  # "given" (--model) or "best fit" (no --model: the fitting model closest to the scan)
    forced: bool  # the scan is outside the model's domain and --force ran it anyway
    fitting: List[str]  # the candidate models that fit the scan, best first (when they were looked at)

    def as_record(self) -> Dict[str, Any]:
        return {**self.verdict.as_dict(), "chosen": self.chosen, "forced": self.forced, **({"fitting": self.fitting} if self.chosen == "best fit" else {})}


def choose_model(scan: ScanFacts, model_spec: Optional[str], registry: Optional[str] = None, force: bool = False,
                 progress: Optional[Progress] = None) -> ModelChoice:
    """The model to run on `scan`: the given one if the scan is in its domain (or `force`), else the best
    fitting one when none is given. Refuses (Med3DFMError, one line) when the scan fits no model it may use."""
    from Med3DFMLib.registry import resolve_model
    from Med3DFMLib.registry.resolve import resolve_known

    if model_spec is None:
        candidates = segmentation_models(registry)
        verdicts = [check(scan, known.entry.get("domain"), known.entry["id"]) for known in candidates]
        best = best_fit(verdicts)
        if best is None:
            reasons = "; ".join(f"{v.model}: {v.reason()}" for v in verdicts) or "no segmentation model is installed"
            hint = "--force needs --model to say which one to run" if force else "--model ID --force runs one anyway"
            raise Med3DFMError(f"no segmentation model fits this scan ({reasons}); use Learn from labels (`med3dfm adapt`) to make one; {hint}")
        known = candidates[verdicts.index(best)]
        return ModelChoice(resolve_known(known, progress=progress), best, "best fit", False, fitting_models(verdicts))
    resolved = resolve_model(model_spec, registry=registry, progress=progress)
    verdict = check_given_model(scan, resolved.card.get("domain"), resolved.id, registry, force)
    return ModelChoice(resolved, verdict, "given", verdict.declared and not verdict.fits, [])


def check_given_model(scan: ScanFacts, domain: Optional[Dict[str, Any]], model_id: str, registry: Optional[str] = None, force: bool = False) -> Verdict:
    """`scan` against a named model's `domain`; outside it and not `force`: Med3DFMError with the one
    line that names the mismatch and the installed models that fit (what segment and explain say)."""
    verdict = check(scan, domain, model_id)
    if verdict.declared and not verdict.fits and not force:
        others = [check(scan, k.entry.get("domain"), k.entry["id"]) for k in segmentation_models(registry) if k.entry["id"] != model_id]
        raise Med3DFMError(refusal(verdict, others))
    return verdict


def run_segment(
    input_path: Path,
    output: Path,
    model_spec: Optional[str] = None,
    device: str = "auto",
    labelmap: Optional[Path] = None,
    table: Optional[Path] = None,
    overlap: float = 0.25,
    registry: Optional[str] = None,
    overwrite: bool = True,
    progress: Optional[Progress] = None,
    force: bool = False,
    confidence: Optional[Path] = None,
    confidence_measure: str = DEFAULT_MEASURE,
    flag_below: float = DEFAULT_THRESHOLD,
    color_table: Optional[Path] = None,
    segmenters: Optional[Dict[Tuple[str, str, float, float], LoadedSegmenter]] = None,
    accept_licence: bool = False,
    raw_label_names: bool = False,
    lower_resolution: float = 1.0,
) -> Dict[str, Any]:
    """The whole `med3dfm segment` job; returns the record written beside the output.

    `model_spec` None: the model whose domain fits the scan best. `force`: run the given model on a
    scan outside its domain (the record's `domain.forced` says so). `confidence`: also write a
    per-voxel confidence volume (`confidence_measure`) on the input grid; the record then lists the
    segments holding the voxels below `flag_below`. `color_table`: also the model's label table as a
    Slicer colour table (.csv with names, colours and terminology), for the plain label map.
    `accept_licence`: acknowledge a licence that restricts use (Med3DFMLib/registry/licences.py); a
    restricted model that was never acknowledged is refused before it runs. `segmenters`: models already loaded, by
    (sha256, device, overlap, lower_resolution), reused and added to (a batch loads each model once). `raw_label_names`: name
    the segments of a segmentation model exactly as its card's labels, not by their terminology
    (named_segments). `lower_resolution` > 1: the model runs that many times coarser than its spacing
    (for a scan that does not fit in memory otherwise; see load_resolved).
    """
    if confidence_measure not in MEASURES:
        raise Med3DFMError(f"unknown confidence measure {confidence_measure!r}; choose one of {', '.join(MEASURES)}")
    if not 0.0 < flag_below <= 1.0:
        raise Med3DFMError(f"the low-confidence threshold must lie in (0, 1], not {flag_below}")
    if confidence is not None and (str(confidence).lower().endswith(".seg.nrrd") or not str(confidence).lower().endswith(VOLUME_SUFFIXES)):
        raise Med3DFMError(f"the confidence volume must be a plain volume file ({', '.join(VOLUME_SUFFIXES)}): {confidence}")
    progress = progress or Progress("none")
    if not str(output).lower().endswith(".seg.nrrd"):
        raise Med3DFMError(f"the segmentation output must end in .seg.nrrd: {output}")
    record_path = record_path_for(output)
    if color_table is not None and not str(color_table).lower().endswith(".csv"):
        raise Med3DFMError(f"the colour table must end in .csv (what Slicer reads as a colour table): {color_table}")
    outputs = [output, record_path] + [p for p in (labelmap, table, confidence, color_table) if p is not None]
    if len({p.resolve() for p in outputs}) != len(outputs) or Path(input_path).resolve() in {p.resolve() for p in outputs}:
        raise Med3DFMError("output paths must differ from each other and from the input")
    for path in outputs:
        check_writable(path, overwrite)

    record = new_record("segment")
    record["parameters"] = {"input": str(input_path), "model": model_spec, "device": device, "overlap": overlap, "force": force,
                            "raw_label_names": raw_label_names, "lower_resolution": lower_resolution}
    if confidence is not None:
        record["parameters"].update(confidence_measure=confidence_measure, flag_below=flag_below)
    timings = record["timings_s"]
    started = time.perf_counter()

    progress.update("load", 0.0, f"reading {Path(input_path).name}")
    tick = time.perf_counter()
    image = read_volume(input_path)
    timings["load"] = time.perf_counter() - tick
    record["input"] = {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()), "origin": list(image.GetOrigin()), "direction": list(image.GetDirection())}

    progress.update("model", 0.0, "checking the scan against the model's domain")
    tick = time.perf_counter()
    choice = choose_model(measure_image(image), model_spec, registry, force, progress)
    record["domain"] = choice.as_record()
    limit = licences.require({"id": choice.resolved.id, **choice.resolved.card}, accept_licence)
    if limit is not None:
        record["licence"] = {"licence": choice.resolved.card.get("licence"), "restriction": limit, "acknowledged": True}
    progress.update("model", 0.5, _choice_message(choice))
    key = (choice.resolved.sha256, device, overlap, lower_resolution)
    segmenter = segmenters.get(key) if segmenters is not None else None
    if segmenter is None:
        segmenter = load_resolved(choice.resolved, registry, progress, device, overlap, lower_resolution)
        if segmenters is not None:
            segmenters[key] = segmenter
    timings["load_model"] = time.perf_counter() - tick
    record["model"] = segmenter.provenance
    record["device"] = str(choose_device(device))
    segments = named_segments(segmenter, choice.resolved.card, raw_label_names)

    labels, confidence_image = segment_image_with_confidence(image, segmenter, confidence_measure if confidence is not None else None, progress, timings)

    progress.update("write", 0.0, f"writing {output.name}")
    tick = time.perf_counter()
    rows = segment_volumes_table(labels, segments)
    record["segments"] = [{"name": r[0], "value": r[1], "voxels": r[2], "volume_ml": round(r[4], 4)} for r in rows]
    record["outputs"] = {"segmentation": str(output)}
    if labelmap is not None:
        record["outputs"]["labelmap"] = str(labelmap)
    if table is not None:
        record["outputs"]["table"] = str(table)
    if color_table is not None:
        record["outputs"]["color_table"] = str(color_table)
    if confidence is not None and confidence_image is not None:
        record["outputs"]["confidence"] = str(confidence)
        flags = flag_low_confidence(sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(confidence_image), segments, flag_below,
                                    float(np.prod(labels.GetSpacing())) / 1000.0)
        record["confidence"] = {"measure": confidence_measure, "flag_below": flag_below, "segments": flags, "summary": describe_flags(flags, flag_below)}
    with contextlib.ExitStack() as stack:
        write_seg_nrrd(stack.enter_context(atomic_path(output)), labels, segments)
        if labelmap is not None:
            write_labelmap(stack.enter_context(atomic_path(labelmap)), labels)
        if table is not None:
            write_tsv(
                stack.enter_context(atomic_path(table)),
                ["segment", "label", "voxels", "volume_mm3", "volume_ml"],
                rows,
                comments=[f"model {segmenter.provenance['id']} {segmenter.provenance['version']} sha256 {segmenter.provenance['sha256']}"],
            )
        if color_table is not None:
            stack.enter_context(atomic_path(color_table)).write_text(color_table_text(segments), encoding="utf-8")
        if confidence is not None and confidence_image is not None:
            write_volume(stack.enter_context(atomic_path(confidence)), confidence_image)
        timings["write"] = time.perf_counter() - tick
        timings["total"] = time.perf_counter() - started
        record["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        stack.enter_context(atomic_path(record_path)).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    progress.update("done", 1.0, f"wrote {output.name}", outputs=record["outputs"])
    return record


def named_segments(segmenter: LoadedSegmenter, card: Dict[str, Any], raw: bool = False) -> List[SegmentInfo]:
    """The segments as a job names them: a registry segmentation model's by their terminology's standard
    names unless `raw` (Med3DFMLib.io.terminology.segment_names); an adapter's keep the names the user
    gave when painting them."""
    if card.get("task") != "segment" or raw:
        return list(segmenter.segments)
    labels = [{"name": s.name, "terminology": s.terminology} for s in segmenter.segments]
    return [dataclasses.replace(s, name=name) for s, name in zip(segmenter.segments, segment_names(labels))]


def _choice_message(choice: ModelChoice) -> str:
    """What the user should know about the model before it runs: chosen for them, forced, or unchecked."""
    name = f"{choice.resolved.id} {choice.resolved.version}"
    if choice.chosen == "best fit":
        return f"using {name}: of the models that fit this scan ({', '.join(choice.fitting)}) it fits best"
    if choice.forced:
        return f"using {name} although the scan is outside its domain (--force): {choice.verdict.reason()}"
    if not choice.verdict.declared:
        return f"using {name}: its card declares no domain, so the scan was not checked against it"
    return f"using {name}: the scan is in its domain"
