"""Global branch: a plain 3D Vision Transformer over 16³ patch tokens."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch per sample while training."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) >= self.rate
        return x * keep.to(x.dtype) / (1.0 - self.rate)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed3d(nn.Module):
    """Non-overlapping cubic patches → tokens, plus a learned position grid resized to the input."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, pos_grid: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.zeros(1, dim, pos_grid, pos_grid, pos_grid))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def position(self, size: Sequence[int]) -> torch.Tensor:
        """Position embeddings (1, N, dim) of a (d, h, w) token grid."""
        pos = self.pos if tuple(self.pos.shape[2:]) == tuple(size) else F.interpolate(self.pos, size=tuple(size), mode="trilinear", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
        grid = self.proj(x)
        size = tuple(grid.shape[2:])
        return grid.flatten(2).transpose(1, 2) + self.position(size), size  # type: ignore[return-value]


def checkpoint_call(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """Run `module` under activation checkpointing (memory for compute, for large windows)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(module, *inputs, use_reentrant=False)


def apply_token_mask(tokens: torch.Tensor, mask: Optional[torch.Tensor], mask_token: torch.Tensor) -> torch.Tensor:
    """Replace masked tokens (mask True = hidden) by the learned mask token."""
    if mask is None:
        return tokens
    return torch.where(mask.unsqueeze(-1), mask_token.to(tokens.dtype).expand_as(tokens), tokens)
