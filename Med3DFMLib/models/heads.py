"""Task heads over the encoder: a light segmentation decoder and a task-query classifier.

The decoder is deliberately small (most of a UNETR-style model's cost is its full-resolution
decoder): a top-down pyramid at strides 16→4, one depthwise-separable refinement at stride 2 with
the stem's features, and a trilinear upsampling of the logits to full resolution.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from Med3DFMLib.models.graph import channel_norm


class SegmentationDecoder(nn.Module):
    def __init__(self, channels: Sequence[int], num_classes: int, dim: int = 32) -> None:
        """`channels`: pyramid channels at strides 2, 4, 8, 16."""
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv3d(c, dim, kernel_size=1) for c in channels[1:])
        self.smooth = nn.Sequential(nn.Conv3d(dim, dim, 3, padding=1), channel_norm(dim), nn.GELU())
        fine = channels[0]
        self.reduce = nn.Conv3d(dim, fine, kernel_size=1)
        self.refine = nn.Sequential(
            nn.Conv3d(2 * fine, 2 * fine, 3, padding=1, groups=2 * fine),
            nn.Conv3d(2 * fine, fine, 1),
            channel_norm(fine),
            nn.GELU(),
        )
        self.classify = nn.Conv3d(fine, num_classes, kernel_size=1)

    def forward(self, pyramid: List[torch.Tensor], output_size: Sequence[int]) -> torch.Tensor:
        half, *coarse = pyramid
        x = self.lateral[-1](coarse[-1])
        for level in range(len(coarse) - 2, -1, -1):
            x = F.interpolate(x, size=coarse[level].shape[2:], mode="trilinear", align_corners=False)
            x = x + self.lateral[level](coarse[level])
        x = self.smooth(x)
        x = F.interpolate(self.reduce(x), size=half.shape[2:], mode="trilinear", align_corners=False)
        x = self.refine(torch.cat([x, half], dim=1))
        return F.interpolate(self.classify(x), size=tuple(output_size), mode="trilinear", align_corners=False)


class TaskQueryClassifier(nn.Module):
    """Learned task queries attend over the encoder's stride-16 features (AnyMC3D-style pooling).

    The attention weights say where the evidence was: they double as a heatmap.
    """

    def __init__(self, in_dim: int, num_classes: int, num_queries: int = 4, dim: int = 128) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.keys = nn.Linear(in_dim, dim)
        self.values = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(in_dim)
        self.head = nn.Sequential(nn.LayerNorm(num_queries * dim), nn.Linear(num_queries * dim, num_classes))

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, classes) and attention weights (B, queries, d, h, w) from (B, C, d, h, w)."""
        batch, _, *size = features.shape
        tokens = self.norm(features.flatten(2).transpose(1, 2))
        scores = torch.einsum("qd,bnd->bqn", self.queries, self.keys(tokens)) / self.queries.shape[1] ** 0.5
        attention = scores.softmax(-1)
        pooled = torch.einsum("bqn,bnd->bqd", attention, self.values(tokens)).reshape(batch, -1)
        return self.head(pooled), attention.view(batch, -1, *size)
