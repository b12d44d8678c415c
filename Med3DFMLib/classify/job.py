"""The `adapt --task classify` and `classify` jobs.

A classification adapter file is self-describing: its card names the classes (in output order),
the encoder (id, version, sha256), the input spec, the temperature and whether it is trusted.
`classify` writes one table row per scan as soon as it is scored, so a failing or cancelled list
keeps every row done before it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from Med3DFMLib.classify.data import ListRow, ScanFeatures, full_tokens, make_example, mirrored, occupancy, scan_features
from Med3DFMLib.classify.model import LEVELS, ClassifyAdapter, build_classify_adapter
from Med3DFMLib.classify.train import adjusted_for_prevalence, deployment_prevalence, train_classifier
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.fewshot.adapt import DEFAULT_ENCODER
from Med3DFMLib.inference import choose_device
from Med3DFMLib.io.atomic import check_writable, write_text_atomic
from Med3DFMLib.io.tables import write_tsv
from Med3DFMLib.io.volumes import read_volume
from Med3DFMLib.preprocess import InputSpec
from Med3DFMLib.progress import Progress
from Med3DFMLib.record import new_record, record_path_for



def _where(where: str, err: Med3DFMError) -> Med3DFMError:
    return Med3DFMError(f"{where}: {err}")


def run_adapt_classify(
    rows: Sequence[ListRow],
    name: str,
    output: Path,
    encoder_spec: str = DEFAULT_ENCODER,
    device_name: str = "auto",
    registry: Optional[str] = None,
    seed: int = 0,
    aux_weight: float = 0.5,
    max_steps: Optional[int] = None,
    progress: Optional[Progress] = None,
    mirror: bool = True,
) -> Dict[str, Any]:
    """Learn a classification adapter from labelled scans (each row: image, class, optional ROI
    to pool inside, optional mask of the evidence for auxiliary supervision). `mirror`: also train
    on each scan mirrored left-right (its own encoder pass), the augmentation frozen features allow."""
    from Med3DFMLib.fewshot.adapt import load_encoder, slugify
    from Med3DFMLib.weights import write_weights

    progress = progress or Progress("none")
    output = Path(output)
    if not rows:
        raise Med3DFMError("adapt --task classify needs labelled scans: --image X --class NAME (repeated) or --list FILE.csv")
    if not str(output).endswith(".safetensors"):
        raise Med3DFMError(f"the adapter file must end in .safetensors: {output}")
    check_writable(output)
    classes: List[str] = []
    for row in rows:
        if not row.class_name or not row.class_name.strip():
            raise Med3DFMError(f"{row.where}: no class given")
        if row.class_name not in classes:
            classes.append(row.class_name)
    if len(classes) < 2:
        raise Med3DFMError(f"a classifier needs at least two classes; all {len(rows)} examples are '{classes[0]}'")
    for cls in classes:
        members = [r.where for r in rows if r.class_name == cls]
        if len(members) < 2:
            raise Med3DFMError(f"class '{cls}' has only {len(members)} example ({', '.join(members)}); every class needs at least 2")
    for row in rows:  # fail before any encoder work on a missing file
        for label, path in (("image", row.image), ("ROI", row.roi), ("mask", row.mask)):
            if path is not None and not Path(path).exists():
                raise Med3DFMError(f"{row.where}: {label} not found: {path}")

    record = new_record("adapt")
    record["parameters"] = {"task": "classify", "name": name, "encoder": encoder_spec, "examples": len(rows), "classes": classes, "seed": seed, "mirror": mirror}
    started = time.perf_counter()
    device = choose_device(device_name)
    progress.update("load", 0.0, "loading encoder")
    encoder = load_encoder(encoder_spec, registry, progress)
    examples, hits, windows = [], 0, set()
    for index, row in enumerate(rows):
        progress.update("features", index / len(rows), f"scan {index + 1} of {len(rows)}: {Path(row.image).name}")
        try:
            image = read_volume(row.image)
            scan = scan_features(image, encoder.module, encoder.sha256, encoder.spec, device)
            views = [scan, mirrored(scan, encoder.module, encoder.sha256, device)] if mirror else [scan]
            examples.append(make_example(views, classes.index(row.class_name), row.roi, row.mask))
        except Med3DFMError as err:
            raise _where(row.where, err) from None
        hits += int(scan.cache_hit)
        windows.add(scan.window)
    progress.update("features", 1.0, f"features of {len(rows)} scans ({hits} from the cache)")
    timings = {"features": round(time.perf_counter() - started, 3)}
    tick = time.perf_counter()
    model, temperature, summary = train_classifier(examples, classes, seed=seed, max_steps=max_steps, aux_weight=aux_weight, progress=progress)
    timings["train"] = round(time.perf_counter() - tick, 3)
    calibration = summary.pop("calibration")
    card = {
        "id": slugify(name),
        "version": "1.0.0",
        "task": "adapter",
        "kind": "classify",
        "title": name,
        "description": f"Classification adapter ({' / '.join(classes)}) learned with med3dfm adapt --task classify",
        "architecture": model.architecture(),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "classes": classes,
        "encoder": {"id": encoder.id, "version": encoder.version, "sha256": encoder.sha256},
        "input": encoder.spec.to_card(),
        "features": {"levels": list(LEVELS), "channels": "graph (strides 4, 8, 16) + ViT tokens (stride 16)", "window": "scan size rounded up to 16, between 64 and 128 voxels", "augmentation": "left-right mirrored view" if mirror else "none"},
        "temperature": calibration["temperature"],
        "calibration": calibration,
        "training": {"images": [Path(r.image).name for r in rows], "rois": sum(r.roi is not None for r in rows), "summary": summary, "seconds": round(time.perf_counter() - started, 2)},
    }
    sha = write_weights(output, {k: v.contiguous() for k, v in model.state_dict().items()}, card)
    record["adapter"] = {"file": str(output), "sha256": sha, "id": card["id"], "classes": classes, "parameters": card["parameters"]}
    record["encoder"] = card["encoder"]
    record["feature_cache_hits"] = hits
    record["training"] = summary
    record["calibration"] = calibration
    timings["total"] = round(time.perf_counter() - started, 3)
    record["timings_s"] = timings
    write_text_atomic(record_path_for(output), json.dumps(record, indent=2) + "\n")
    progress.update("done", 1.0, f"wrote {output.name}", outputs={"adapter": str(output)})
    return record


@dataclass
class Prepared:
    """A scan ready for the adapter: features, region weights and the full token grid."""

    scan: ScanFeatures
    cells: List[np.ndarray]  # per level (d, h, w) occupancy
    tokens: List[torch.Tensor]  # per level (N, C)
    log_weight: List[torch.Tensor]  # per level (N,)


@dataclass
class Prediction:
    logits: np.ndarray  # (K,) before temperature
    probabilities: np.ndarray  # (K,) after temperature (and the deployment prevalence, if given)
    attention: List[np.ndarray]  # per level (K, q, d, h, w): each class's own queries

    def label(self, classes: Sequence[str]) -> str:
        return classes[int(np.argmax(self.probabilities))]


class Classifier:
    """A loaded classification adapter and its (sha-checked) encoder."""

    def __init__(self, adapter: ClassifyAdapter, card: Dict[str, Any], encoder: Any, provenance: Dict[str, Any], device: torch.device) -> None:
        self.adapter, self.card, self.encoder, self.provenance, self.device = adapter, card, encoder, provenance, device
        self.classes: List[str] = list(card["classes"])
        self.temperature = float(card.get("temperature", 1.0))
        self.calibration: Dict[str, Any] = dict(card.get("calibration", {"calibrated": False, "note": "no calibration in the card"}))
        self.spec = InputSpec.from_card(card["input"])
        self.training_prevalence: Dict[str, float] = dict(self.calibration.get("training_prevalence") or {})
        self.prevalence: Optional[List[float]] = None  # deployment prior, when the user gave one

    def set_prevalence(self, given: Dict[str, float]) -> None:
        """Adjust probabilities to a deployment prevalence (prior shift), e.g. {'mass': 0.2}."""
        if not self.training_prevalence:
            raise Med3DFMError("this adapter's card does not state its training prevalence, so --prevalence cannot adjust it; learn it again with `med3dfm adapt --task classify`")
        self.prevalence = deployment_prevalence(self.classes, self.training_prevalence, given)

    @classmethod
    def load(cls, spec: str, registry: Optional[str] = None, device_name: str = "auto", progress: Optional[Progress] = None) -> "Classifier":
        from Med3DFMLib.fewshot.adapt import load_encoder
        from Med3DFMLib.registry import check_adapter_encoder, resolve_model
        from Med3DFMLib.weights import read_weights

        resolved = resolve_model(spec, registry=registry, progress=progress)
        tensors, card = read_weights(resolved.weights)
        if card.get("task") != "adapter" or card.get("kind") != "classify":
            what = "segmentation adapter" if card.get("task") == "adapter" else f"{card.get('task')!r} model"
            raise Med3DFMError(f"model {resolved.id} is a {what} without a classification head; classify needs a classification adapter (make one with `med3dfm adapt --task classify`)")
        adapter = build_classify_adapter(card["architecture"])
        missing, unexpected = adapter.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
        if missing or unexpected:
            raise Med3DFMError(f"weights of {resolved.id} do not fit its card ({len(missing)} missing, {len(unexpected)} unexpected tensors)")
        encoder = load_encoder(card["encoder"]["id"], registry, progress)
        check_adapter_encoder(card, encoder.sha256)
        provenance = {"id": resolved.id, "version": resolved.version, "sha256": resolved.sha256, "source": resolved.source, "file": str(resolved.weights), "encoder": card["encoder"]}
        return cls(adapter.eval(), card, encoder, provenance, choose_device(device_name))

    def prepare(self, image: sitk.Image, roi: Optional[Path] = None, progress: Optional[Progress] = None) -> Prepared:
        scan = scan_features(image, self.encoder.module, self.encoder.sha256, self.spec, self.device, progress)
        cells = occupancy(scan, roi)
        tokens, weights = full_tokens(scan, cells)
        return Prepared(scan, cells, tokens, weights)

    def predict(self, prepared: Prepared) -> Prediction:
        with torch.no_grad():
            logits, attention, _ = self.adapter([t[None] for t in prepared.tokens], [w[None] for w in prepared.log_weight])
        logits = logits[0]
        probabilities = (logits / self.temperature).softmax(0).numpy()
        if self.prevalence is not None:
            probabilities = adjusted_for_prevalence(probabilities, [self.training_prevalence[c] for c in self.classes], self.prevalence).astype(np.float32)
        maps = [a[0].reshape(a.shape[1], a.shape[2], *cells.shape).numpy() for a, cells in zip(attention, prepared.cells)]
        return Prediction(logits.numpy(), probabilities, maps)

    def class_index(self, name: Optional[str], prediction: Optional[Prediction] = None) -> int:
        if name is None:
            assert prediction is not None
            return int(np.argmax(prediction.probabilities))
        matches = [i for i, c in enumerate(self.classes) if c.lower() == name.strip().lower()]
        if not matches:
            raise Med3DFMError(f"unknown class {name!r}; this model's classes are: {', '.join(self.classes)}")
        return matches[0]

    def calibration_comment(self) -> str:
        flag = "calibrated" if self.calibration.get("calibrated") else "NOT calibrated"
        prior = ""
        if self.training_prevalence:
            prior = "; training prevalence " + ", ".join(f"{c} {self.training_prevalence[c]:.3g}" for c in self.classes)
            if self.prevalence is not None:
                prior += "; adjusted to the deployment prevalence " + ", ".join(f"{c} {p:.3g}" for c, p in zip(self.classes, self.prevalence))
        return f"probabilities {flag}: {self.calibration.get('note', '')}{prior}"


def run_classify(
    inputs: Sequence[ListRow],
    model_spec: str,
    output: Path,
    heatmap: Optional[Path] = None,
    heatmap_method: str = "attention",
    target: Optional[str] = None,
    device_name: str = "auto",
    registry: Optional[str] = None,
    progress: Optional[Progress] = None,
    stop_on_error: bool = False,
    classifier: Optional[Classifier] = None,
    prevalence: Optional[Dict[str, float]] = None,
) -> Tuple[Dict[str, Any], int]:
    """Score scans into a TSV (rewritten after every row); returns (record, number of failed rows).

    `classifier`: the adapter of `model_spec` already loaded (a batch loads it once for all scans).
    `prevalence`: deployment prevalence of some classes ({name: share}); probabilities are adjusted
    from the training prevalence the card states.
    """
    progress = progress or Progress("none")
    output = Path(output)
    if not str(output).lower().endswith(".tsv"):
        raise Med3DFMError(f"the result table must end in .tsv: {output}")
    check_writable(output)
    if heatmap is not None:
        from Med3DFMLib.explain.heatmaps import check_heatmap_path

        if len(inputs) != 1:
            raise Med3DFMError("--heatmap works with one scan, not with --list")
        check_heatmap_path(heatmap, output)
    record = new_record("classify")
    record["parameters"] = {"model": model_spec, "inputs": len(inputs), "heatmap_method": heatmap_method if heatmap else None}
    started = time.perf_counter()
    progress.update("load", 0.0, f"loading model {model_spec}")
    if classifier is None:
        classifier = Classifier.load(model_spec, registry, device_name, progress)
    if prevalence:
        classifier.set_prevalence(prevalence)
        record["parameters"]["prevalence"] = dict(zip(classifier.classes, classifier.prevalence or []))
    target_index = classifier.class_index(target) if target is not None else None
    record["model"] = classifier.provenance
    record["calibration"] = classifier.calibration
    columns = ["image", "prediction"] + [f"probability_{c}" for c in classifier.classes]
    comments = [classifier.calibration_comment(), f"model {classifier.provenance['id']} {classifier.provenance['version']} sha256 {classifier.provenance['sha256']}"]
    rows: List[List[Any]] = []
    failed = 0
    results = []
    for index, item in enumerate(inputs):
        progress.update("classify", index / len(inputs), f"scan {index + 1} of {len(inputs)}: {Path(item.image).name}")
        try:
            image = read_volume(item.image)
            prepared = classifier.prepare(image, item.roi)
            prediction = classifier.predict(prepared)
        except Med3DFMError as err:
            if stop_on_error or len(inputs) == 1:
                raise _where(item.where, err) if len(inputs) > 1 else err from None
            failed += 1
            rows.append([str(item.image), f"ERROR: {item.where}: {err}"] + [""] * len(classifier.classes))
            results.append({"image": str(item.image), "error": f"{item.where}: {err}"})
        else:
            rows.append([str(item.image), prediction.label(classifier.classes)] + [float(p) for p in prediction.probabilities])
            results.append({"image": str(item.image), "prediction": prediction.label(classifier.classes), "logits": [round(float(v), 5) for v in prediction.logits], "features_cached": prepared.scan.cache_hit})
            if heatmap is not None:
                from Med3DFMLib.explain.classification import classification_heatmap
                from Med3DFMLib.explain.heatmaps import write_heatmap

                tick = time.perf_counter()
                cls = target_index if target_index is not None else classifier.class_index(None, prediction)
                on_grid, details = classification_heatmap(classifier, prepared, heatmap_method, cls, progress)
                note = {"method": heatmap_method, "target": classifier.classes[cls], "model": classifier.provenance, **details}
                write_heatmap(heatmap, on_grid, prepared.scan.grid, image, note)
                record["timings_s"]["heatmap"] = round(time.perf_counter() - tick, 3)
                record.setdefault("outputs", {})["heatmap"] = str(heatmap)
        write_tsv(output, columns, rows, comments)
    record["results"] = results
    record["failed"] = failed
    record.setdefault("outputs", {})["table"] = str(output)
    record["device"] = str(classifier.device)
    record["timings_s"]["total"] = round(time.perf_counter() - started, 3)
    write_text_atomic(record_path_for(output), json.dumps(record, indent=2) + "\n")
    progress.update("done", 1.0, f"wrote {output.name}" + (f" ({failed} failed)" if failed else ""), outputs=record["outputs"])
    return record, failed
