"""Local branch: a graph network on the regular voxel grid, at strides 4, 8 and 16.

Each node is a voxel of a feature map and its edges go to its 26 neighbours. On a regular grid,
gathering neighbours and averaging them is exactly a depthwise 3×3×3 convolution (ones kernel, zero
centre, divided by the degree), which runs far faster than index gathering; here that kernel is the
initial value and is then learned. Nodes are updated from [x, aggregate(x) − x] (max-relative style
edge features) followed by a feed-forward layer, ViG-style.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from Med3DFMLib.models.vit import DropPath, checkpoint_call


def channel_norm(channels: int) -> nn.GroupNorm:
    """Normalisation over channels per sample (GroupNorm works at any batch size, even 1)."""
    return nn.GroupNorm(num_groups=min(8, channels), num_channels=channels)


class GridGraphConv(nn.Module):
    """Message passing over the 26-neighbour grid graph as a depthwise convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.aggregate = nn.Conv3d(channels, channels, kernel_size=3, padding=1, groups=channels, bias=False)
        with torch.no_grad():
            kernel = torch.ones(3, 3, 3)
            kernel[1, 1, 1] = 0.0
            self.aggregate.weight.copy_((kernel / 26.0).expand_as(self.aggregate.weight))
        self.update = nn.Conv3d(2 * channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        neighbours = self.aggregate(x)
        return self.update(torch.cat([x, neighbours - x], dim=1))


class GraphBlock(nn.Module):
    def __init__(self, channels: int, mlp_ratio: float = 2.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = channel_norm(channels)
        self.graph = GridGraphConv(channels)
        self.norm2 = channel_norm(channels)
        hidden = int(channels * mlp_ratio)
        self.ffn = nn.Sequential(nn.Conv3d(channels, hidden, 1), nn.GELU(), nn.Conv3d(hidden, channels, 1))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(F.gelu(self.graph(self.norm1(x))))
        return x + self.drop_path(self.ffn(self.norm2(x)))


class Stem(nn.Module):
    """Two strided convolutions: stride-2 features (the decoder's finest skip) and stride-4 nodes."""

    def __init__(self, in_channels: int, stem_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv3d(in_channels, stem_channels, 3, stride=2, padding=1), channel_norm(stem_channels), nn.GELU())
        self.conv2 = nn.Sequential(nn.Conv3d(stem_channels, out_channels, 3, stride=2, padding=1), channel_norm(out_channels))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        half = self.conv1(x)
        return [half, self.conv2(half)]


class GraphBranch(nn.Module):
    """Three graph stages at strides 4, 8, 16, each a few GraphBlocks, joined by 2× downsampling."""

    def __init__(self, channels: Sequence[int], depths: Sequence[int], drop_path: float = 0.0) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(*[GraphBlock(c, drop_path=drop_path) for _ in range(d)]) for c, d in zip(channels, depths))
        self.downsample = nn.ModuleList(
            nn.Sequential(nn.Conv3d(channels[i], channels[i + 1], kernel_size=2, stride=2), channel_norm(channels[i + 1]))
            for i in range(len(channels) - 1)
        )

    def forward(self, x: torch.Tensor, visible: Optional[torch.Tensor] = None, checkpoint: bool = False) -> List[torch.Tensor]:
        """Multi-scale node features; `visible` (B,1,d,h,w at stride 16) re-zeroes hidden regions after
        every stage so convolutions cannot carry visible context into masked patches."""
        outputs: List[torch.Tensor] = []
        for index, stage in enumerate(self.stages):
            if index > 0:
                x = self.downsample[index - 1](x)
            x = checkpoint_call(stage, _mask(x, visible)) if checkpoint and self.training else stage(_mask(x, visible))
            x = _mask(x, visible)
            outputs.append(x)
        return outputs


def _mask(x: torch.Tensor, visible: Optional[torch.Tensor]) -> torch.Tensor:
    if visible is None:
        return x
    return x * F.interpolate(visible.to(x.dtype), size=x.shape[2:], mode="nearest")
