"""The `med3dfm adapt` job and applying an adapter: images + sparse labels → adapter file.

Round one runs the encoder over each image (cached on disk); every later round on the same image
only trains the adapter and predicts, which takes seconds.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from Med3DFMLib.domain import domain_of_images
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.fewshot.adapter import PointSet, build_adapter, fit_prototypes, predict_dense, train_point_adapter
from Med3DFMLib.fewshot.features import VolumeFeatures, cached_features
from Med3DFMLib.fewshot.labels import IGNORE, AXES, Supervision, merge_classes, remap, supervision_from_labels
from Med3DFMLib.inference import choose_device
from Med3DFMLib.io.atomic import check_writable, write_text_atomic
from Med3DFMLib.io.segmentations import SegmentInfo, read_labels
from Med3DFMLib.io.volumes import read_volume
from Med3DFMLib.preprocess import InputSpec, to_model_input
from Med3DFMLib.progress import Progress
from Med3DFMLib.record import new_record, record_path_for
from Med3DFMLib.training import StopRequest

DEFAULT_ENCODER = "med3dfm-encoder-small"
FEATURE_WINDOW = 128
MODES = ("auto", "adapter", "prototype", "decoder")
DEFAULT_BUDGET_MINUTES = 3.0


@dataclass
class Encoder:
    module: torch.nn.Module
    id: str
    version: str
    sha256: str
    spec: InputSpec


def load_encoder(spec: str = DEFAULT_ENCODER, registry: Optional[str] = None, progress: Optional[Progress] = None) -> Encoder:
    from Med3DFMLib.models import DualBranchEncoder, EncoderConfig
    from Med3DFMLib.registry import resolve_model
    from Med3DFMLib.weights import read_weights

    resolved = resolve_model(spec, registry=registry, progress=progress)
    tensors, card = read_weights(resolved.weights)
    if card.get("task") != "encoder":
        raise Med3DFMError(f"{resolved.id} is a {card.get('task')!r} model, not an encoder")
    module = DualBranchEncoder(EncoderConfig.from_dict(card["architecture"]["encoder"]))
    module.load_state_dict({k: v.float() for k, v in tensors.items()})
    return Encoder(module.eval(), resolved.id, resolved.version, resolved.sha256, InputSpec.from_card(card["input"]))


@dataclass
class PreparedVolume:
    image: sitk.Image
    grid: sitk.Image
    array: np.ndarray
    features: VolumeFeatures
    padded_image: torch.Tensor
    cache_hit: bool


def prepare_volume(image: sitk.Image, encoder: Encoder, spec: InputSpec, device: torch.device, progress: Optional[Progress] = None, window: int = FEATURE_WINDOW) -> PreparedVolume:
    """The scan on the encoder's grid and its features (`window`: the encoder's window; diagnostics vary it)."""
    array, grid = to_model_input(image, spec)
    features, hit = cached_features(encoder.module, encoder.sha256, array, window, device, progress)
    padded = np.full(features.padded, float(array.min()), dtype=np.float32)
    padded[tuple(slice(0, s) for s in array.shape)] = array
    return PreparedVolume(image, grid, array, features, torch.from_numpy(padded), hit)


MAX_POINTS_PER_VOLUME = 2_000_000


def _points(targets: np.ndarray, image: sitk.Image, grid: sitk.Image, seed: int = 0) -> PointSet:
    """Labelled voxels of the image grid as continuous (z, y, x) coordinates of the model grid.

    Points are mapped through physical space instead of resampling the labels, so a single painted
    slice is never lost between two model-grid planes.
    """
    index = np.argwhere(targets != IGNORE)  # (z, y, x) on the image grid
    if len(index) > MAX_POINTS_PER_VOLUME:
        index = index[np.random.default_rng(seed).choice(len(index), MAX_POINTS_PER_VOLUME, replace=False)]
    values = targets[tuple(index.T)].astype(np.int64)
    ijk = index[:, ::-1].astype(np.float64)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    physical = np.array(image.GetOrigin()) + (ijk * np.array(image.GetSpacing())) @ direction.T
    grid_direction = np.array(grid.GetDirection()).reshape(3, 3)
    continuous = ((physical - np.array(grid.GetOrigin())) @ grid_direction) / np.array(grid.GetSpacing())
    return PointSet(torch.from_numpy(continuous[:, ::-1].copy()).float(), torch.from_numpy(values))


def _split(supervision: Supervision, targets: np.ndarray, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train, held-out) targets: every third labelled slice is held out when there are ≥ 3,
    otherwise a random fifth of the labelled voxels."""
    train, held = targets.copy(), np.full_like(targets, IGNORE)
    if supervision.axis is not None and len(supervision.labelled_slices) >= 3:
        axis = AXES[supervision.axis]
        for index in supervision.labelled_slices[1::3]:
            where = [slice(None)] * 3
            where[axis] = index
            held[tuple(where)] = targets[tuple(where)]
            train[tuple(where)] = IGNORE
    else:
        rng = np.random.default_rng(seed)
        labelled = np.argwhere(targets != IGNORE)
        chosen = labelled[rng.random(len(labelled)) < 0.2]
        held[tuple(chosen.T)] = targets[tuple(chosen.T)]
        train[tuple(chosen.T)] = IGNORE
    return train, held


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "adapter"


def run_adapt(
    pairs: Sequence[Tuple[Path, Path]],
    name: str,
    output: Path,
    mode: str = "auto",
    dense: bool = False,
    axis: str = "auto",
    encoder_spec: str = DEFAULT_ENCODER,
    device_name: str = "auto",
    segment_output: Optional[Path] = None,
    registry: Optional[str] = None,
    seed: int = 0,
    progress: Optional[Progress] = None,
    propagate: bool = True,
    budget_minutes: float = DEFAULT_BUDGET_MINUTES,
    should_stop: Optional[Callable[[], bool]] = None,
    registration: bool = True,
) -> Dict[str, Any]:
    """Learn an adapter from labelled images; optionally segment the first image with it.

    Modes: "adapter" (point-wise MLP on cached features, seconds: for this scan), "prototype"
    (training-free), "decoder" (a convolutional decoder trained with augmentation for
    `budget_minutes`: for other patients), "auto" (decoder for several images or dense labels,
    else adapter). `should_stop()` (also: SIGINT/SIGTERM, or a file OUTPUT.stop appearing) ends
    decoder training early and keeps the best model so far.
    The first image's segmentation (`segment_output`) combines, with `propagate`, the adapter's
    evidence with the painted outlines and the image's edges (fewshot.propagate); without it, it is
    what the adapter alone gives on any other scan. `registration` (decoder, one or more volumes)
    keeps the labelled volumes in the adapter file for multi-atlas registration (fewshot.registration).
    """
    progress = progress or Progress("none")
    if not pairs:
        raise Med3DFMError("adapt needs at least one --image with its --labels")
    if mode not in MODES:
        raise Med3DFMError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if not budget_minutes > 0:
        raise Med3DFMError(f"--budget-minutes must be above 0 (got {budget_minutes})")
    if not str(output).endswith(".safetensors"):
        raise Med3DFMError(f"the adapter file must end in .safetensors: {output}")
    check_writable(output)
    if segment_output is not None:
        if not str(segment_output).lower().endswith(".seg.nrrd"):
            raise Med3DFMError(f"--segment output must end in .seg.nrrd: {segment_output}")
        check_writable(segment_output)
    record = new_record("adapt")
    record["parameters"] = {"name": name, "mode": mode, "dense": dense, "axis": axis, "propagate": propagate, "registration": registration, "encoder": encoder_spec, "images": [str(i) for i, _ in pairs], "labels": [str(l) for _, l in pairs]}
    started = time.perf_counter()
    device = choose_device(device_name)
    progress.update("load", 0.0, "loading encoder")
    encoder = load_encoder(encoder_spec, registry, progress)
    spec = encoder.spec

    supervisions, images = [], []
    for image_path, labels_path in pairs:
        image = read_volume(image_path)
        labels = read_labels(labels_path)
        supervisions.append(supervision_from_labels(image, labels, Path(labels_path).name, dense=dense, axis=axis))
        images.append(image)
    classes = merge_classes(supervisions)
    if len(classes) == 1:
        # One structure takes the name given: a plain label map only says "label 1".
        for supervision in supervisions:
            supervision.classes = [SegmentInfo(c.value, name, c.color, c.terminology) for c in supervision.classes]
        classes = merge_classes(supervisions)
    counts = {c.name: 0 for c in classes}
    for supervision in supervisions:
        for segment in supervision.classes:
            counts[segment.name] += int((supervision.targets == segment.value).sum())
    for class_name, count in counts.items():
        if count < 2:
            raise Med3DFMError(f"class '{class_name}' has only {count} labelled voxel; paint at least a few voxels of it")

    if mode == "auto":
        mode = "decoder" if (len(pairs) > 1 or dense) else "adapter"
        record["parameters"]["mode"] = f"auto: {mode}"
    if mode == "decoder":
        return _run_decoder(pairs, images, supervisions, classes, name, output, encoder, device, budget_minutes, segment_output, seed, record, started, progress, should_stop, registration)

    prepared, train_points, val_points, all_points = [], [], [], []
    hits = 0
    for index, (image, supervision) in enumerate(zip(images, supervisions)):
        progress.update("features", index / len(images), f"encoder features of image {index + 1} of {len(images)}")
        volume = prepare_volume(image, encoder, spec, device, progress)
        hits += int(volume.cache_hit)
        prepared.append(volume)
        targets = remap(supervision, classes)
        train, held = _split(supervision, targets, seed)
        train_points.append(_points(train, image, volume.grid, seed))
        val_points.append(_points(held, image, volume.grid, seed))
        all_points.append(_points(targets, image, volume.grid, seed))
    timings = {"features": round(time.perf_counter() - started, 3)}

    tick = time.perf_counter()
    features = [p.features for p in prepared]
    tensors = [p.padded_image for p in prepared]
    if mode == "prototype":
        adapter, summary = fit_prototypes(features, tensors, all_points, len(classes), seed=seed)
        architecture = {"type": "point-adapter", "mode": "prototype", "in_dim": int(adapter.mean.numel()), "num_classes": len(classes), "num_prototypes": int(adapter.prototypes.shape[0])}
    else:
        _, probe = train_point_adapter(features, tensors, train_points, val_points, len(classes), seed=seed, progress=progress)
        # The held-out slices chose how long to train; the final adapter learns from all labels.
        adapter, summary = train_point_adapter(features, tensors, all_points, [], len(classes), max_steps=probe["best_step"], seed=seed)
        summary.update({"held_out_dice": probe["held_out_dice"], "selection_history": probe["history"], "seconds": round(summary["seconds"] + probe["seconds"], 2)})
        architecture = {"type": "point-adapter", "mode": "mlp", "in_dim": int(adapter.mean.numel()), "num_classes": len(classes), "hidden": adapter.mlp[1].out_features}
    timings["train"] = round(time.perf_counter() - tick, 3)

    card = _adapter_card(name, mode, classes, architecture, adapter, encoder, spec, pairs, images, supervisions, summary, started)
    from Med3DFMLib.weights import write_weights

    sha = write_weights(output, {k: v.contiguous() for k, v in adapter.state_dict().items()}, card)
    record["adapter"] = {"file": str(output), "sha256": sha, "id": card["id"], "classes": [c.name for c in classes], "parameters": card["parameters"]}
    record["encoder"] = card["encoder"]
    record["feature_cache_hits"] = hits
    record["training"] = {k: v for k, v in summary.items() if k not in ("history", "selection_history")}

    if segment_output is not None:
        tick = time.perf_counter()
        progress.update("segment", 0.0, f"segmenting {Path(pairs[0][0]).name}")
        from Med3DFMLib.io.segmentations import write_seg_nrrd
        from Med3DFMLib.preprocess import probabilities_to_labels

        first = prepared[0]
        probabilities = predict_dense(adapter, first.features, first.padded_image)
        if propagate:
            # This scan: the painted voxels are there to use, at the image's own resolution.
            progress.update("segment", 0.3, "propagating the painted labels through the scan")
            labels_image, propagation = _propagate(first, probabilities, remap(supervisions[0], classes), supervisions[0].axis)
            record["propagation"] = propagation
        else:
            labels_image = probabilities_to_labels(probabilities, first.grid, first.image)
        write_seg_nrrd(segment_output, labels_image, classes)
        record["outputs"] = {"segmentation": str(segment_output)}
        timings["segment"] = round(time.perf_counter() - tick, 3)
    timings["total"] = round(time.perf_counter() - started, 3)
    record["timings_s"] = timings
    write_text_atomic(record_path_for(output), json.dumps(record, indent=2) + "\n")
    progress.update("done", 1.0, f"wrote {output.name}", outputs={"adapter": str(output), **record.get("outputs", {})})
    return record


def stop_file_for(output: Path) -> Path:
    """The file whose appearance asks a running `adapt` to stop and keep its best model."""
    return Path(str(output) + ".stop")


def _model_grid_volume(image: sitk.Image, targets: np.ndarray, spec: InputSpec):
    """A labelled volume on the encoder's grid: intensities normalised, targets resampled (nearest)."""
    from Med3DFMLib.fewshot.decoder import LabelledVolume
    from Med3DFMLib.preprocess import labels_to_model_grid

    array, grid = to_model_input(image, spec)
    shifted = sitk.GetImageFromArray((targets.astype(np.int32) + 1).astype(np.uint16))  # IGNORE (-1) → 0
    shifted.CopyInformation(image)
    on_grid = labels_to_model_grid(shifted, grid) - 1
    return LabelledVolume(array, on_grid.astype(np.int16), tuple(float(s) for s in reversed(grid.GetSpacing()))), grid


def _run_decoder(pairs, images, supervisions, classes, name, output, encoder, device, budget_minutes, segment_output, seed, record, started, progress, should_stop, registration) -> Dict[str, Any]:
    """`adapt --mode decoder`: train a FeatureDecoder within the budget, write it with its card."""
    from Med3DFMLib.fewshot import registration as reg
    from Med3DFMLib.fewshot.decoder import predict_volume, train_decoder
    from Med3DFMLib.weights import write_weights

    # The encoder's own grid: a 1 mm grid was tried for the 3 mL hippocampus and lost (0.58 against
    # 0.70 Dice from 5 crops in the same budget: crops twice as large, half the steps).
    spec = encoder.spec
    progress.update("prepare", 0.0, f"{len(images)} labelled volume(s) on the encoder's grid")
    volumes, grids = [], []
    for image, supervision in zip(images, supervisions):
        volume, grid = _model_grid_volume(image, remap(supervision, classes), spec)
        volumes.append(volume)
        grids.append(grid)
    timings: Dict[str, float] = {"prepare": round(time.perf_counter() - started, 3)}
    tick = time.perf_counter()
    module = encoder.module.to(device)
    with StopRequest(stop_file_for(output), should_stop) as stop:
        decoder, summary = train_decoder(module, volumes, len(classes), [c.name for c in classes], budget_minutes * 60.0, seed=seed, progress=progress, should_stop=stop,
                                        registration=registration)
    timings["train"] = round(time.perf_counter() - tick, 3)
    architecture = {"type": "feature-decoder", "num_classes": len(classes), "level_channels": [int(c) for c in decoder.level_channels], "widths": [int(w) for w in decoder.widths],
                    "atlas": decoder.uses_atlas}
    tensors = {k: v.contiguous() for k, v in decoder.state_dict().items()}
    if decoder.registration is not None:
        architecture["registration"] = decoder.registration.card()
        tensors.update(reg.to_tensors(decoder.registration.atlases))
    card = _adapter_card(name, "decoder", classes, architecture, decoder, encoder, spec, pairs, images, supervisions, summary, started)
    sha = write_weights(output, tensors, card)
    record["adapter"] = {"file": str(output), "sha256": sha, "id": card["id"], "classes": [c.name for c in classes], "parameters": card["parameters"]}
    record["encoder"] = card["encoder"]
    record["training"] = {k: v for k, v in summary.items() if k != "history"}
    if segment_output is not None:
        tick = time.perf_counter()
        progress.update("segment", 0.0, f"segmenting {Path(pairs[0][0]).name}")
        from Med3DFMLib.io.segmentations import write_seg_nrrd
        from Med3DFMLib.preprocess import probabilities_to_labels

        probabilities = predict_volume(module, decoder, volumes[0].image)
        write_seg_nrrd(segment_output, probabilities_to_labels(probabilities, grids[0], images[0]), classes)
        record["outputs"] = {"segmentation": str(segment_output)}
        timings["segment"] = round(time.perf_counter() - tick, 3)
    timings["total"] = round(time.perf_counter() - started, 3)
    record["timings_s"] = timings
    write_text_atomic(record_path_for(output), json.dumps(record, indent=2) + "\n")
    stopped = " (stopped early: best model so far)" if summary["stopped_by"] == "user" else ""
    progress.update("done", 1.0, f"wrote {output.name}{stopped}", outputs={"adapter": str(output), **record.get("outputs", {})})
    return record


def _adapter_card(name: str, mode: str, classes, architecture: Dict[str, Any], module: torch.nn.Module, encoder: Encoder, spec: InputSpec,
                  pairs, images: Sequence[sitk.Image], supervisions, summary: Dict[str, Any], started: float) -> Dict[str, Any]:
    return {
        "id": slugify(name),
        "version": "1.0.0",
        "task": "adapter",
        "title": name,
        "description": f"Few-shot {mode} for {', '.join(c.name for c in classes)}, learned with med3dfm adapt",
        "architecture": architecture,
        "parameters": int(sum(t.numel() for t in module.state_dict().values())),
        "encoder": {"id": encoder.id, "version": encoder.version, "sha256": encoder.sha256},
        "input": spec.to_card(),
        "domain": domain_of_images(images, [i for i, _ in pairs]),  # measured from the labelled images: what `segment` checks scans against
        "labels": [{"value": c.value, "name": c.name, "color": [float(v) for v in c.color], **({"terminology": c.terminology} if c.terminology else {})} for c in classes],
        "training": {
            "images": [Path(i).name for i, _ in pairs],
            "labelled": [
                {"image": Path(i).name, "slice_axis": s.axis, "labelled_slices": len(s.labelled_slices) if s.axis else "all", "voxels": {c.name: int((s.targets == c.value).sum()) for c in s.classes}}
                for (i, _), s in zip(pairs, supervisions)
            ],
            "summary": summary,
            "seconds": round(time.perf_counter() - started, 2),
        },
    }


def _propagate(volume: PreparedVolume, probabilities: np.ndarray, targets: np.ndarray, slice_axis: Optional[str]) -> Tuple[sitk.Image, Dict[str, Any]]:
    """Labels on the image grid from the adapter's probabilities and the painted targets."""
    from Med3DFMLib.fewshot.propagate import segment_this_scan
    from Med3DFMLib.preprocess import probabilities_on

    tick = time.perf_counter()
    on_image = probabilities_on(probabilities, volume.grid, volume.image)
    intensities = sitk.GetArrayViewFromImage(volume.image)
    labels, info = segment_this_scan(intensities, list(volume.image.GetSpacing())[::-1], targets, AXES[slice_axis] if slice_axis else None, on_image)
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(volume.image)
    info["seconds"] = round(time.perf_counter() - tick, 3)
    return image, info


def load_adapter_model(tensors: Dict[str, torch.Tensor], card: Dict[str, Any]) -> torch.nn.Module:
    architecture = card["architecture"]
    if architecture.get("type") == "feature-decoder":
        from Med3DFMLib.fewshot import registration as reg
        from Med3DFMLib.fewshot.decoder import FeatureDecoder

        adapter = FeatureDecoder(architecture["level_channels"], architecture["num_classes"], architecture["widths"], architecture.get("atlas", False))
        try:
            tensors, atlases = reg.split_tensors(tensors)
            if architecture.get("registration"):
                adapter.registration = reg.AtlasPrior.from_card(architecture["registration"], atlases, architecture["num_classes"])
            elif atlases:
                raise ValueError("the adapter file holds registration atlases its card does not declare")
        except (ValueError, KeyError, TypeError) as err:
            raise Med3DFMError(f"damaged adapter file: {err}") from None
    else:
        adapter = build_adapter(architecture)
    adapter.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    return adapter.eval()


def adapter_predictor(tensors: Dict[str, torch.Tensor], card: Dict[str, Any], registry: Optional[str], device: torch.device, progress: Optional[Progress]):
    """A `predict(image) -> (probabilities, grid)` for an adapter, with its encoder checked."""
    from Med3DFMLib.registry import check_adapter_encoder

    adapter = load_adapter_model(tensors, card)
    needed = card["encoder"]
    try:
        encoder = load_encoder(needed["id"], registry, progress)
    except Med3DFMError as err:
        raise Med3DFMError(
            f"this adapter needs the encoder '{needed['id']}' (sha256 {needed['sha256'][:12]}...), which is not installed: "
            f"import its file with `med3dfm models import ENCODER.safetensors` ({err})"
        ) from None
    check_adapter_encoder(card, encoder.sha256)
    spec = InputSpec.from_card(card["input"])

    if card["architecture"].get("type") == "feature-decoder":
        from Med3DFMLib.fewshot.decoder import predict_volume

        def predict(image: sitk.Image) -> Tuple[np.ndarray, sitk.Image]:
            array, grid = to_model_input(image, spec)
            return predict_volume(encoder.module.to(device), adapter.to(device), array), grid

        return predict, [SegmentInfo.from_card(entry) for entry in card["labels"]]

    def predict(image: sitk.Image) -> Tuple[np.ndarray, sitk.Image]:
        volume = prepare_volume(image, encoder, spec, device, progress)
        return predict_dense(adapter, volume.features, volume.padded_image), volume.grid

    return predict, [SegmentInfo.from_card(entry) for entry in card["labels"]]
