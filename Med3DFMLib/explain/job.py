"""The `explain` job: a heatmap for one segment of any segmentation model (built-in models and
few-shot adapters) or one class of a classification adapter."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.inference import choose_device
from Med3DFMLib.io.volumes import read_volume
from Med3DFMLib.preprocess import InputSpec, to_model_input
from Med3DFMLib.progress import Progress

SEGMENT_METHODS = ("gradcam", "occlusion")


def _target_index(target: str, names: Dict[int, str]) -> int:
    wanted = target.strip().lower()
    for index, name in names.items():
        if name.lower() == wanted:
            return index
    raise Med3DFMError(f"unknown target {target!r}; this model's segments are: {', '.join(names.values())}")


def run_explain(
    input_path: Path,
    model_spec: str,
    target: str,
    output: Path,
    method: str = "gradcam",
    roi: Optional[Path] = None,
    device_name: str = "auto",
    registry: Optional[str] = None,
    progress: Optional[Progress] = None,
    force: bool = False,
) -> Dict[str, Any]:
    """Write the heatmap and its JSON note; returns the note.

    A segmentation model's or adapter's map is refused, like `segment`, on a scan outside the card's
    declared domain unless `force`: a map of where the model "sees" a structure it cannot see
    misleads as much as the segmentation would."""
    from Med3DFMLib.explain.heatmaps import check_heatmap_path, write_heatmap
    from Med3DFMLib.registry import resolve_model
    from Med3DFMLib.weights import read_weights

    progress = progress or Progress("none")
    output = Path(output)
    check_heatmap_path(output)
    started = time.perf_counter()
    image = read_volume(input_path)
    resolved = resolve_model(model_spec, registry=registry, progress=progress)
    tensors, card = read_weights(resolved.weights)
    provenance = {"id": resolved.id, "version": resolved.version, "sha256": resolved.sha256}
    device = choose_device(device_name)
    if card.get("task") == "adapter" and card.get("kind") == "classify":
        from Med3DFMLib.classify.job import Classifier
        from Med3DFMLib.explain.classification import classification_heatmap

        classifier = Classifier.load(model_spec, registry, device_name, progress)
        index = classifier.class_index(target)
        prepared = classifier.prepare(image, roi, progress)
        on_grid, details = classification_heatmap(classifier, prepared, method, index, progress)
        grid = prepared.scan.grid
        details["probability"] = float(classifier.predict(prepared).probabilities[index])
    else:
        if roi is not None:
            raise Med3DFMError("--roi applies to classification models only")
        if method not in SEGMENT_METHODS:
            raise Med3DFMError(f"unknown explain method {method!r} for a segmentation model; use {' or '.join(SEGMENT_METHODS)}")
        from Med3DFMLib.explain.segmentation import DecoderAdapterExplainer, ModelExplainer, PointAdapterExplainer, segmentation_heatmap

        from Med3DFMLib.domain import measure_image
        from Med3DFMLib.segment import check_given_model

        verdict = check_given_model(measure_image(image), card.get("domain"), resolved.id, registry, force)
        domain_note = {**verdict.as_dict(), "forced": verdict.declared and not verdict.fits}
        names = {int(entry["value"]): str(entry["name"]) for entry in card.get("labels", [])}
        if card.get("task") == "segment":
            from Med3DFMLib.models import load_segmentation_model

            spec = InputSpec.from_card(card["input"])
            explainer: Any = ModelExplainer(load_segmentation_model(tensors, card), spec.window[::-1], device)
        elif card.get("task") == "adapter" and card.get("architecture", {}).get("type") in ("point-adapter", "feature-decoder"):
            from Med3DFMLib.fewshot.adapt import load_adapter_model, load_encoder
            from Med3DFMLib.registry import check_adapter_encoder

            encoder = load_encoder(card["encoder"]["id"], registry, progress)
            check_adapter_encoder(card, encoder.sha256)
            spec = InputSpec.from_card(card["input"])
            if card["architecture"]["type"] == "feature-decoder":
                explainer = DecoderAdapterExplainer(load_adapter_model(tensors, card), encoder.module, device)
            else:
                explainer = PointAdapterExplainer(load_adapter_model(tensors, card), encoder, device)
        else:
            raise Med3DFMError(f"model {resolved.id} is a {card.get('task')!r} model; explain needs a segmentation model, a few-shot adapter or a classification adapter")
        index = _target_index(target, names)
        array, grid = to_model_input(image, spec)
        on_grid, details = segmentation_heatmap(explainer, array, index, method, progress)
        details["domain"] = domain_note
    note = {"method": method, "target": target, "model": provenance, **details, "seconds": round(time.perf_counter() - started, 3)}
    write_heatmap(output, on_grid, grid, image, note)
    progress.update("done", 1.0, f"wrote {output.name}", outputs={"heatmap": str(output)})
    return note
