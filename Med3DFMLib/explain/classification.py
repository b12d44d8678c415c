"""Heatmaps for a classification adapter: attention pooling weights, Grad-CAM on the fused
stride-16 features, or occlusion sensitivity (slow reference).

Grad-CAM here uses the standardised tokens (each channel centred and scaled by the training set's
statistics) as the activations: the encoder's raw channels are not non-negative like the ReLU
maps Grad-CAM was designed for, and centring makes "this cell differs from a typical training
cell in the direction the class logit likes" the quantity that is mapped.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from Med3DFMLib.classify.model import STRIDE, cells_to_grid, tokens_of
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.explain.heatmaps import normalise
from Med3DFMLib.explain.occlusion import occlusion_map
from Med3DFMLib.progress import Progress

CLASSIFY_METHODS = ("attention", "gradcam", "occlusion")


def attention_cells(attention: np.ndarray) -> np.ndarray:
    """Mean of the task queries' pooling weights per cell (d, h, w)."""
    return attention.mean(0)


def gradcam_cells(adapter: torch.nn.Module, tokens: torch.Tensor, log_weight: torch.Tensor, target: int, shape: Tuple[int, ...]) -> np.ndarray:
    x = adapter.standardise(tokens).detach().requires_grad_(True)
    adapter.eval()
    with torch.enable_grad():
        logits, _, _ = adapter.forward_standardised(x[None], log_weight[None])
        logits[0, target].backward()
    grad = x.grad
    valid = log_weight.isfinite()
    weights = grad[valid].mean(0)
    cam = torch.relu(x.detach() @ weights)
    cam[~valid] = 0
    return cam.reshape(shape).numpy()


def classification_heatmap(classifier: Any, prepared: Any, method: str, target: int, progress: Optional[Progress] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """(map on the model grid in [0, 1], details for the JSON note)."""
    shape = tuple(prepared.scan.array.shape)
    cells_shape = prepared.cells.shape
    if method == "attention":
        prediction = classifier.predict(prepared)
        cells = attention_cells(prediction.attention)
        details = {"resolution_mm": [s * STRIDE for s in classifier.spec.spacing], "description": "task-query attention pooling weights (mean over queries), stride 16"}
    elif method == "gradcam":
        cells = gradcam_cells(classifier.adapter, prepared.tokens, prepared.log_weight, target, cells_shape)
        details = {"resolution_mm": [s * STRIDE for s in classifier.spec.spacing], "description": "Grad-CAM of the target class logit w.r.t. the standardised fused stride-16 features (graph + token channels)"}
    elif method == "occlusion":
        from Med3DFMLib.fewshot.features import compute_features

        encoder = classifier.encoder.module
        window = prepared.scan.window

        def score(array: np.ndarray) -> float:
            features = compute_features(encoder, array, window, classifier.device)
            tokens = tokens_of(features.maps[STRIDE])
            with torch.no_grad():
                logits, _, _ = classifier.adapter(tokens[None], prepared.log_weight[None])
            return float((logits[0] / classifier.temperature).softmax(0)[target])

        occluded, block = occlusion_map(prepared.scan.array, score, STRIDE, progress=progress)
        inside = cells_to_grid(prepared.cells, shape) > 0
        return normalise(occluded * inside), {"description": "drop of the target class probability when a block is filled with the scan's background value", "block_voxels": block, "block_mm": [block * s for s in classifier.spec.spacing]}
    else:
        raise Med3DFMError(f"unknown heatmap method {method!r}; use {', '.join(CLASSIFY_METHODS)}")
    cells = normalise(cells) * (prepared.cells > 0)
    return normalise(cells_to_grid(cells, shape)), details
