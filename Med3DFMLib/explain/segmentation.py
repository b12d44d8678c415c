"""Heatmaps for one segment of a segmentation model or a few-shot segmentation adapter.

Grad-CAM (segmentation form): the target is the target class's logit summed over the voxels the
model labels as that class (over the whole scan when it labels none); its gradient with respect
to the fused encoder features (strides 4, 8, 16) weights each channel, and the positive part of the
weighted sum is the map. Each level's map is scaled to [0, 1] over the whole scan and the levels
are averaged, so the fine levels add detail without drowning the coarse semantic one.
Occlusion: the drop of the target probability summed over the same voxels when one block is hidden.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.explain.heatmaps import normalise
from Med3DFMLib.explain.occlusion import occlusion_map
from Med3DFMLib.progress import Progress

FUSED_LEVELS = (4, 8, 16)
MAX_GRADCAM_POINTS = 200_000


def _cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of one (C, d, h, w) level: channel weights = mean gradient."""
    weights = gradient.mean(dim=(1, 2, 3))
    return torch.relu(torch.einsum("c,cdhw->dhw", weights, activation))


def _combine(levels: Sequence[np.ndarray]) -> np.ndarray:
    return normalise(np.mean([normalise(level) for level in levels], axis=0))


def _tiles(shape: Sequence[int], window: Sequence[int]) -> List[Tuple[int, int, int]]:
    starts = []
    for size, w in zip(shape, window):
        axis = list(range(0, max(size - w, 0) + 1, w))
        if axis[-1] + w < size:
            axis.append(size - w)
        starts.append(axis)
    return [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]


class ModelExplainer:
    """A built-in segmentation model (encoder + decoder) on its model grid."""

    def __init__(self, model: torch.nn.Module, window_zyx: Sequence[int], device: torch.device) -> None:
        self.model, self.window, self.device = model.eval(), [int(w) for w in window_zyx], device

    def probabilities(self, array: np.ndarray) -> np.ndarray:
        from Med3DFMLib.inference import predict_volume

        return predict_volume(self.model, array, self.window, self.device)

    def gradcam(self, array: np.ndarray, region: np.ndarray, target: int) -> np.ndarray:
        shape = array.shape
        padded = [max(s, w) for s, w in zip(shape, self.window)]
        data = np.full(padded, float(array.min()), dtype=np.float32)
        data[: shape[0], : shape[1], : shape[2]] = array
        weight = np.zeros(padded, dtype=np.float32)
        weight[: shape[0], : shape[1], : shape[2]] = region
        levels = [np.zeros(padded, dtype=np.float32) for _ in FUSED_LEVELS]
        counts = np.zeros(padded, dtype=np.float32)
        w = self.window
        for z, y, x in _tiles(padded, w):
            where = (slice(z, z + w[0]), slice(y, y + w[1]), slice(x, x + w[2]))
            crop = torch.from_numpy(data[where].copy())[None, None].to(self.device)
            mask = torch.from_numpy(weight[where].copy()).to(self.device)
            with torch.enable_grad():
                logits, fused = self._logits_and_fused_levels(crop)
                (logits[0, target] * mask).sum().backward()
            for index, level in enumerate(fused):
                cam = _cam(level[0].detach(), level.grad[0])
                up = F.interpolate(cam[None, None], size=crop.shape[2:], mode="trilinear", align_corners=False)[0, 0]
                levels[index][where] += up.cpu().numpy()
            counts[where] += 1
        crop_back = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
        return _combine([level[crop_back] / counts[crop_back] for level in levels])

    def _logits_and_fused_levels(self, crop: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Logits of one window and the fused encoder levels (strides 4, 8, 16) whose gradients Grad-CAM reads."""
        if not hasattr(self.model, "encoder"):
            raise Med3DFMError("Grad-CAM reads the dual-branch encoder's fused levels, and this model is a plain U-Net "
                               "without them: use the occlusion method")
        out = self.model.encoder(crop)
        fused = out.pyramid[1:]
        for level in fused:
            level.retain_grad()
        return self.model.decoder(out.pyramid, crop.shape[2:]), fused

    def score(self, region: np.ndarray, target: int):
        def score(array: np.ndarray) -> float:
            return float((self.probabilities(array)[target] * region).sum())

        return score


class DecoderAdapterExplainer(ModelExplainer):
    """A few-shot decoder adapter (fewshot.decoder) over the frozen encoder: same maps, its own forward."""

    def __init__(self, decoder: torch.nn.Module, encoder: torch.nn.Module, device: torch.device, window: int = 96) -> None:
        self.decoder, self.encoder = decoder.eval().to(device), encoder.eval().to(device)
        super().__init__(self.decoder, (window, window, window), device)

    def probabilities(self, array: np.ndarray) -> np.ndarray:
        """The network's own answer (with its label atlas): the maps explain the network, and occlusion
        would otherwise re-register every labelled volume for each occluded copy."""
        from Med3DFMLib.fewshot.decoder import predict_volume

        return predict_volume(self.encoder, self.decoder, array, registration=False)

    def gradcam(self, array: np.ndarray, region: np.ndarray, target: int) -> np.ndarray:
        multiple = self.encoder.config.window_multiple
        self.window = [min(int(np.ceil(s / multiple) * multiple), w) for s, w in zip(array.shape, (96, 96, 96))]
        return super().gradcam(array, region, target)

    def _logits_and_fused_levels(self, crop: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        out = self.encoder(crop)
        fused = out.pyramid[1:]
        for level in fused:
            level.retain_grad()
        tokens = out.tokens.transpose(1, 2).reshape(crop.shape[0], -1, *out.token_grid)
        levels = [out.pyramid[0], out.pyramid[1], out.pyramid[2], torch.cat([out.pyramid[3], tokens], 1)]
        return self.decoder(crop, levels), fused


class PointAdapterExplainer:
    """A few-shot point adapter over cached encoder features."""

    def __init__(self, adapter: torch.nn.Module, encoder: Any, device: torch.device) -> None:
        self.adapter, self.encoder, self.device = adapter.eval(), encoder, device

    def features(self, array: np.ndarray, cached: bool = True):
        from Med3DFMLib.fewshot.adapt import FEATURE_WINDOW
        from Med3DFMLib.fewshot.features import cached_features, compute_features

        if cached:
            features, _ = cached_features(self.encoder.module, self.encoder.sha256, array, FEATURE_WINDOW, self.device)
        else:
            features = compute_features(self.encoder.module, array, FEATURE_WINDOW, self.device)
        padded = np.full(features.padded, float(array.min()), dtype=np.float32)
        padded[tuple(slice(0, s) for s in array.shape)] = array
        return features, torch.from_numpy(padded)

    def probabilities(self, array: np.ndarray) -> np.ndarray:
        from Med3DFMLib.fewshot.adapter import predict_dense

        features, image = self.features(array)
        return predict_dense(self.adapter, features, image)

    def _points(self, region: np.ndarray) -> torch.Tensor:
        points = np.argwhere(region > 0)
        if len(points) > MAX_GRADCAM_POINTS:
            points = points[np.random.default_rng(0).choice(len(points), MAX_GRADCAM_POINTS, replace=False)]
        return torch.from_numpy(points.astype(np.float32))

    def gradcam(self, array: np.ndarray, region: np.ndarray, target: int) -> np.ndarray:
        from Med3DFMLib.fewshot.adapter import gather
        from Med3DFMLib.fewshot.features import VolumeFeatures

        features, image = self.features(array)
        leaves = {s: m.clone().requires_grad_(s in FUSED_LEVELS) for s, m in features.maps.items()}
        live = VolumeFeatures(leaves, features.shape, features.padded)
        coords = self._points(region)
        with torch.enable_grad():
            for start in range(0, coords.shape[0], 65536):
                logits = self.adapter(gather(live, image, coords[start : start + 65536]))
                logits[:, target].sum().backward()
        shape = array.shape
        maps = []
        for stride in FUSED_LEVELS:
            cam = _cam(leaves[stride].detach(), leaves[stride].grad)
            up = F.interpolate(cam[None, None], size=tuple(features.padded), mode="trilinear", align_corners=False)[0, 0]
            maps.append(up[: shape[0], : shape[1], : shape[2]].numpy())
        return _combine(maps)

    def score(self, region: np.ndarray, target: int):
        from Med3DFMLib.fewshot.adapter import gather

        coords = self._points(region)

        def score(array: np.ndarray) -> float:
            features, image = self.features(array, cached=False)
            with torch.no_grad():
                return float(self.adapter(gather(features, image, coords)).softmax(1)[:, target].sum())

        return score


def segmentation_heatmap(explainer: Any, array: np.ndarray, target: int, method: str, progress: Optional[Progress] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """(map on the model grid in [0, 1], details) for class index `target` of the model's output."""
    probabilities = explainer.probabilities(array)
    predicted = probabilities.argmax(0) == target
    details: Dict[str, Any] = {"target_voxels_predicted": int(predicted.sum())}
    region = predicted.astype(np.float32)
    if not predicted.any():
        region = np.ones(array.shape, dtype=np.float32)
        details["note"] = "the model labels no voxel as the target: the target is its logit summed over the whole scan"
    if method == "gradcam":
        details["description"] = "Grad-CAM of the target logit summed over the voxels labelled as the target, w.r.t. the fused encoder features at strides 4, 8, 16 (levels averaged)"
        return explainer.gradcam(array, region, target), details
    if method == "occlusion":
        result, block = occlusion_map(array, explainer.score(region, target), 16, progress=progress)
        details.update({"description": "drop of the summed target probability over the labelled voxels when a block is filled with the scan's background value", "block_voxels": block})
        return normalise(result), details
    raise Med3DFMError(f"unknown explain method {method!r} for a segmentation model; use gradcam or occlusion")
