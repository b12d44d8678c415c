"""Heatmaps for a classification adapter: the target class's own attention pooling weights,
Grad-CAM on the stride-8 features, or occlusion sensitivity (slow reference).

Grad-CAM here uses the standardised tokens (each channel centred and scaled by the training set's
statistics) as the activations: the encoder's raw channels are not non-negative like the ReLU
maps Grad-CAM was designed for, and centring makes "this cell differs from a typical training
cell in the direction the class logit likes" the quantity that is mapped.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from Med3DFMLib.classify.model import LEVELS, cells_to_grid, tokens_of
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.explain.heatmaps import normalise
from Med3DFMLib.explain.occlusion import occlusion_map
from Med3DFMLib.progress import Progress

CLASSIFY_METHODS = ("attention", "gradcam", "occlusion")
GRADCAM_LEVEL = 8  # finer than the stride-16 cells, coarse enough to carry the graph branch's context


def attention_on_grid(attention: List[np.ndarray], target: int, shape: Tuple[int, int, int]) -> np.ndarray:
    """The target class's own queries' pooling weights, every level upsampled to the model grid,
    each level scaled to its maximum and the levels averaged (a level with many cells would otherwise vanish)."""
    total = np.zeros(shape, dtype=np.float32)
    for stride, weights in zip(LEVELS, attention):
        total += normalise(cells_to_grid(weights[target].mean(0), shape, stride))
    return total / len(LEVELS)


def gradcam_cells(adapter: torch.nn.Module, tokens: List[torch.Tensor], log_weight: List[torch.Tensor], target: int, shape: Tuple[int, ...], level: int) -> np.ndarray:
    """Grad-CAM of the target logit on one level's standardised tokens (the ensemble's members summed)."""
    adapter.eval()
    cam = torch.zeros(tokens[level].shape[0])
    valid = log_weight[level].isfinite()
    for member in adapter.members:
        x = member.standardise(tokens)
        x = [t.detach().requires_grad_(i == level) for i, t in enumerate(x)]
        with torch.enable_grad():
            logits, _, _ = member.forward_standardised([t[None] for t in x], [w[None] for w in log_weight])
            logits[0, target].backward()
        weights = x[level].grad[valid].mean(0)
        cam += torch.relu(x[level].detach() @ weights)
    cam[~valid] = 0
    return cam.reshape(shape).numpy()


def classification_heatmap(classifier: Any, prepared: Any, method: str, target: int, progress: Optional[Progress] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """(map on the model grid in [0, 1], details for the JSON note)."""
    shape = tuple(prepared.scan.array.shape)
    inside = cells_to_grid(prepared.cells[0], shape, LEVELS[0]) > 0
    if method == "attention":
        prediction = classifier.predict(prepared)
        on_grid = attention_on_grid(prediction.attention, target, shape)
        details = {"resolution_mm": [s * LEVELS[0] for s in classifier.spec.spacing], "levels": list(LEVELS),
                   "description": f"pooling weights of the {classifier.classes[target]!r} class's own task queries, strides 4, 8 and 16 averaged"}
    elif method == "gradcam":
        level = LEVELS.index(GRADCAM_LEVEL)
        cells = gradcam_cells(classifier.adapter, prepared.tokens, prepared.log_weight, target, prepared.cells[level].shape, level)
        on_grid = cells_to_grid(normalise(cells) * (prepared.cells[level] > 0), shape, GRADCAM_LEVEL)
        details = {"resolution_mm": [s * GRADCAM_LEVEL for s in classifier.spec.spacing], "description": f"Grad-CAM of the target class logit w.r.t. the standardised stride-{GRADCAM_LEVEL} features"}
    elif method == "occlusion":
        from Med3DFMLib.fewshot.features import compute_features

        encoder = classifier.encoder.module
        window = prepared.scan.window

        def score(array: np.ndarray) -> float:
            features = compute_features(encoder, array, window, classifier.device)
            tokens = [tokens_of(features.maps[s])[None] for s in LEVELS]
            with torch.no_grad():
                logits, _, _ = classifier.adapter(tokens, [w[None] for w in prepared.log_weight])
            return float((logits[0] / classifier.temperature).softmax(0)[target])

        occluded, block = occlusion_map(prepared.scan.array, score, LEVELS[-1], progress=progress)
        return normalise(occluded * inside), {"description": "drop of the target class probability when a block is filled with the scan's background value", "block_voxels": block, "block_mm": [block * s for s in classifier.spec.spacing]}
    else:
        raise Med3DFMError(f"unknown heatmap method {method!r}; use {', '.join(CLASSIFY_METHODS)}")
    return normalise(on_grid * inside), details
