"""The classification adapter: task-query attention pooling (AnyMC3D-style) over the frozen
encoder's stride-16 features (graph + ViT token channels).

Pooling is restricted to a region by adding log(occupancy) to the attention scores, where
occupancy is the fraction of each 16-voxel cell that lies inside the region (the scan itself,
without padding, or a user's ROI). A cell half inside an ROI counts half; a cell outside never
contributes. The same attention weights are the heatmap.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.models.heads import TaskQueryClassifier

STRIDE = 16
KIND = "classify"


class ClassifyAdapter(nn.Module):
    """Standardise tokens → task-query attention pooling → class logits (+ an auxiliary per-token
    evidence logit, trained only where masks of the evidence were given)."""

    def __init__(self, in_dim: int, num_classes: int, num_queries: int = 4, dim: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.pool = TaskQueryClassifier(in_dim, num_classes, num_queries, dim)
        self.aux = nn.Linear(dim, 1)
        self.dropout = nn.Dropout(dropout)
        self.in_dim, self.num_classes, self.num_queries, self.dim = in_dim, num_classes, num_queries, dim

    def standardise(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens - self.mean) / self.std

    def forward(self, tokens: torch.Tensor, log_weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (B, K), attention (B, Q, N), aux logits (B, N)) from raw tokens (B, N, C) and
        log-occupancy (B, N) (−inf = not part of the region)."""
        return self.forward_standardised(self.standardise(tokens), log_weight)

    def forward_standardised(self, x: torch.Tensor, log_weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pool = self.pool
        x = self.dropout(pool.norm(x))
        values = pool.values(x)
        scores = torch.einsum("qd,bnd->bqn", pool.queries, pool.keys(x)) / pool.queries.shape[1] ** 0.5
        attention = (scores + log_weight[:, None, :]).softmax(-1)
        pooled = torch.einsum("bqn,bnd->bqd", attention, values).reshape(x.shape[0], -1)
        return pool.head(pooled), attention, self.aux(values).squeeze(-1)

    def architecture(self) -> Dict[str, Any]:
        return {"type": "classify-adapter", "kind": KIND, "in_dim": self.in_dim, "num_classes": self.num_classes, "num_queries": self.num_queries, "dim": self.dim, "stride": STRIDE}


def build_classify_adapter(architecture: Dict[str, Any]) -> ClassifyAdapter:
    if architecture.get("type") != "classify-adapter":
        raise Med3DFMError(f"not a classification adapter (architecture type {architecture.get('type')!r})")
    return ClassifyAdapter(int(architecture["in_dim"]), int(architecture["num_classes"]), int(architecture["num_queries"]), int(architecture["dim"]))


def cell_occupancy(mask: np.ndarray, padded: Tuple[int, int, int], stride: int = STRIDE) -> np.ndarray:
    """Fraction of each stride³ cell of the padded grid covered by `mask` (values 0..1, (z, y, x))."""
    full = np.zeros(padded, dtype=np.float32)
    full[tuple(slice(0, s) for s in mask.shape)] = mask
    d, h, w = (p // stride for p in padded)
    return full.reshape(d, stride, h, stride, w, stride).mean(axis=(1, 3, 5))


def log_weights(occupancy: np.ndarray) -> torch.Tensor:
    """log(occupancy) with −inf outside, flattened in token order (z, y, x)."""
    tensor = torch.from_numpy(np.ascontiguousarray(occupancy, dtype=np.float32)).flatten()
    return torch.where(tensor > 0, tensor.clamp_min(1e-8).log(), torch.full_like(tensor, -float("inf")))


def tokens_of(stride16: torch.Tensor) -> torch.Tensor:
    """(N, C) tokens in (z, y, x) order from a (C, d, h, w) map."""
    return stride16.flatten(1).t().contiguous()


def cells_to_grid(cells: np.ndarray, shape: Tuple[int, int, int], stride: int = STRIDE) -> np.ndarray:
    """Upsample a stride-16 cell map (d, h, w) to the model grid (D, H, W), cell centres exact."""
    tensor = torch.from_numpy(np.ascontiguousarray(cells, dtype=np.float32))[None, None]
    up = F.interpolate(tensor, scale_factor=stride, mode="trilinear", align_corners=False)[0, 0]
    return up[: shape[0], : shape[1], : shape[2]].numpy()
