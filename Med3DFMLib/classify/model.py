"""The classification adapter: class-specific task-query attention pooling (AnyMC3D-style) over
three levels of the frozen encoder's feature pyramid (strides 4, 8 and 16; stride 16 carries the
graph and the ViT token channels), shipped as an ensemble of its cross-fitting fold models.

Pooling is restricted to a region by adding log(occupancy) to the attention scores, where
occupancy is the fraction of each cell that lies inside the region (the scan itself, without
padding, or a user's ROI). A cell half inside an ROI counts half; a cell outside never contributes.

Every class has its own queries and its logit reads only what its queries pooled, so the attention
of class k's queries is a map of the evidence for class k (not one map shared by all classes).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from Med3DFMLib.errors import Med3DFMError

LEVELS = (4, 8, 16)
STRIDE = 16  # the coarsest level: windows and padding are multiples of it
KIND = "classify"
ARCHITECTURE_VERSION = 2

Tokens = List[torch.Tensor]  # one (B, N_level, C_level) tensor per level, in LEVELS order
Weights = List[torch.Tensor]  # one (B, N_level) log-occupancy tensor per level (−inf = outside)


class PoolingHead(nn.Module):
    """One model: per level LayerNorm → keys and values; per class `queries_per_class` queries per
    level; logit k = a linear read-out of class k's pooled vectors (+ an auxiliary per-cell evidence
    logit on the stride-16 values, trained only where masks of the evidence were given)."""

    def __init__(self, in_dims: Sequence[int], num_classes: int, queries_per_class: int = 2, dim: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        self.in_dims, self.num_classes, self.queries_per_class, self.dim = list(in_dims), num_classes, queries_per_class, dim
        for index, channels in enumerate(in_dims):
            self.register_buffer(f"mean{index}", torch.zeros(channels))
            self.register_buffer(f"std{index}", torch.ones(channels))
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in in_dims)
        self.keys = nn.ModuleList(nn.Linear(c, dim) for c in in_dims)
        self.values = nn.ModuleList(nn.Linear(c, dim) for c in in_dims)
        self.queries = nn.Parameter(torch.randn(len(in_dims), num_classes, queries_per_class, dim) * 0.02)
        width = len(in_dims) * queries_per_class * dim
        self.read_norm = nn.LayerNorm(width)
        self.read_weight = nn.Parameter(torch.randn(num_classes, width) * width ** -0.5)
        self.read_bias = nn.Parameter(torch.zeros(num_classes))
        self.aux = nn.Linear(dim, 1)
        self.dropout = nn.Dropout(dropout)

    def set_statistics(self, tokens: Tokens) -> None:
        """Channel means and standard deviations of the training tokens (each (N, C))."""
        for index, level in enumerate(tokens):
            getattr(self, f"mean{index}").copy_(level.mean(0))
            getattr(self, f"std{index}").copy_(level.std(0).clamp_min(1e-3))

    def standardise(self, tokens: Tokens) -> Tokens:
        return [(t - getattr(self, f"mean{i}")) / getattr(self, f"std{i}") for i, t in enumerate(tokens)]

    def forward(self, tokens: Tokens, log_weights: Weights) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        return self.forward_standardised(self.standardise(tokens), log_weights)

    def forward_standardised(self, tokens: Tokens, log_weights: Weights) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """(logits (B, K), attention per level (B, K, q, N_level), aux logits (B, N_16))."""
        pooled, attentions, aux = [], [], None
        for index, (x, weight) in enumerate(zip(tokens, log_weights)):
            x = self.dropout(self.norms[index](x))
            values = self.values[index](x)
            scores = torch.einsum("kqd,bnd->bkqn", self.queries[index], self.keys[index](x)) / self.dim ** 0.5
            attention = (scores + weight[:, None, None, :]).softmax(-1)
            attentions.append(attention)
            pooled.append(torch.einsum("bkqn,bnd->bkqd", attention, values))
            if index == len(tokens) - 1:
                aux = self.aux(values).squeeze(-1)
        per_class = torch.cat(pooled, dim=2).flatten(2)  # (B, K, levels * q * dim)
        read = self.dropout(self.read_norm(per_class))
        logits = (read * self.read_weight).sum(-1) + self.read_bias
        assert aux is not None
        return logits, attentions, aux


class ClassifyAdapter(nn.Module):
    """The shipped model: the mean logit of the cross-fitting fold models (one member when there is
    a single model, as during training). The temperature was fitted on these members' out-of-fold
    logits, so the calibration belongs to the model that is applied."""

    def __init__(self, in_dims: Sequence[int], num_classes: int, members: int = 1, queries_per_class: int = 2, dim: int = 64) -> None:
        super().__init__()
        self.members = nn.ModuleList(PoolingHead(in_dims, num_classes, queries_per_class, dim) for _ in range(members))
        self.in_dims, self.num_classes, self.queries_per_class, self.dim = list(in_dims), num_classes, queries_per_class, dim

    def forward(self, tokens: Tokens, log_weights: Weights) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """Mean logits, mean attention per level, mean aux logits over the members."""
        outputs = [member(tokens, log_weights) for member in self.members]
        logits = torch.stack([o[0] for o in outputs]).mean(0)
        attentions = [torch.stack([o[1][level] for o in outputs]).mean(0) for level in range(len(tokens))]
        aux = torch.stack([o[2] for o in outputs]).mean(0)
        return logits, attentions, aux

    def architecture(self) -> Dict[str, Any]:
        return {
            "type": "classify-adapter", "version": ARCHITECTURE_VERSION, "kind": KIND, "levels": list(LEVELS), "in_dims": self.in_dims,
            "num_classes": self.num_classes, "queries_per_class": self.queries_per_class, "dim": self.dim, "members": len(self.members),
        }


def build_classify_adapter(architecture: Dict[str, Any]) -> ClassifyAdapter:
    if architecture.get("type") != "classify-adapter":
        raise Med3DFMError(f"not a classification adapter (architecture type {architecture.get('type')!r})")
    if architecture.get("version") != ARCHITECTURE_VERSION or list(architecture.get("levels", [])) != list(LEVELS):
        raise Med3DFMError("this classification adapter was made by an older Med3DFM (stride-16 pooling only); learn it again with `med3dfm adapt --task classify` from the same list")
    return ClassifyAdapter(architecture["in_dims"], int(architecture["num_classes"]), int(architecture["members"]), int(architecture["queries_per_class"]), int(architecture["dim"]))


def cell_occupancy(mask: np.ndarray, padded: Tuple[int, int, int], stride: int) -> np.ndarray:
    """Fraction of each stride³ cell of the padded grid covered by `mask` (values 0..1, (z, y, x))."""
    full = np.zeros(padded, dtype=np.float32)
    full[tuple(slice(0, s) for s in mask.shape)] = mask
    d, h, w = (p // stride for p in padded)
    return full.reshape(d, stride, h, stride, w, stride).mean(axis=(1, 3, 5))


def log_weights(occupancy: np.ndarray) -> torch.Tensor:
    """log(occupancy) with −inf outside, flattened in token order (z, y, x)."""
    tensor = torch.from_numpy(np.ascontiguousarray(occupancy, dtype=np.float32)).flatten()
    return torch.where(tensor > 0, tensor.clamp_min(1e-8).log(), torch.full_like(tensor, -float("inf")))


def tokens_of(feature_map: torch.Tensor) -> torch.Tensor:
    """(N, C) tokens in (z, y, x) order from a (C, d, h, w) map."""
    return feature_map.flatten(1).t().contiguous()


def cells_to_grid(cells: np.ndarray, shape: Tuple[int, int, int], stride: int) -> np.ndarray:
    """Upsample a cell map (d, h, w) of one level to the model grid (D, H, W), cell centres exact."""
    tensor = torch.from_numpy(np.ascontiguousarray(cells, dtype=np.float32))[None, None]
    up = F.interpolate(tensor, scale_factor=stride, mode="trilinear", align_corners=False)[0, 0]
    return up[: shape[0], : shape[1], : shape[2]].numpy()
