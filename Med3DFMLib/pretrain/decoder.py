"""Hierarchical encoder-driven decoder and the masked-volume pretraining model.

The decoder starts from the fused final tokens, with hidden patches replaced by a mask token.
Each decoder layer self-attends, then cross-attends to the *visible* tokens of a different ViT
depth (shallow to deep), so intermediate encoder layers must carry information the reconstruction
needs (Hi-End-MAE). Queries and memory carry fixed sine-cosine positions, whose dot products fall
off with distance, so a hidden patch can find its neighbours.

Targets are the crops *before* noise augmentation, per-patch normalised with a variance floor; the
loss counts hidden patches with content only. Why (docs/pretraining.md, "Why it did not learn"):
with noisy targets, a 1e-6 floor and every hidden patch scored, padding and air made most targets
unit-variance noise, and no model could score much below predicting zeros.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from Med3DFMLib.models.encoder import DualBranchEncoder
from Med3DFMLib.models.heads import SegmentationDecoder


class CrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_query = nn.LayerNorm(dim)
        self.norm_memory = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        m = self.norm_memory(memory)
        x = x + self.cross_attn(self.norm_query(x), m, m, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


# Per-patch normalisation divides by sqrt(var + floor): without a floor, quantisation noise in a
# flat patch becomes a unit-variance target. 0.05² in z-scored units is ~25 HU on CT, CT noise level.
TARGET_VARIANCE_FLOOR = 0.05**2
# A hidden patch whose clean standard deviation is below this (padding, air) is not scored.
CONTENT_STD = 0.02


def sincos_positions(grid: Sequence[int], dim: int, device: torch.device) -> torch.Tensor:
    """Fixed 3D sine-cosine embeddings (N, dim) of a (d, h, w) token grid, in the encoder's token
    order; a third of the channels per axis (zero-padded when dim is not a multiple of 6)."""
    per_axis = (dim // 6) * 2
    frequencies = 1.0 / (100.0 ** (torch.arange(per_axis // 2, device=device, dtype=torch.float32) / max(1, per_axis // 2)))
    axes = torch.meshgrid(*(torch.arange(n, device=device, dtype=torch.float32) for n in grid), indexing="ij")
    parts = []
    for coordinate in axes:
        angles = coordinate.reshape(-1, 1) * frequencies.view(1, -1)
        parts += [angles.sin(), angles.cos()]
    embedding = torch.cat(parts, dim=1)
    return F.pad(embedding, (0, dim - embedding.shape[1]))


class HierarchicalDecoder(nn.Module):
    def __init__(self, encoder_dim: int, encoder_depth: int, patch_voxels: int, dim: int = 192, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        # Decoder layer i reads encoder depth sources[i], spread from shallow to the last block.
        self.sources: List[int] = [round((i + 1) * encoder_depth / depth) - 1 for i in range(depth)]
        self.embed = nn.Linear(encoder_dim, dim)
        self.memory = nn.ModuleList(nn.Linear(encoder_dim, dim) for _ in range(depth))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_voxels)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, layers: Sequence[torch.Tensor], mask: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Per-patch voxel predictions (B, N, patch_voxels) from final tokens and ViT layers."""
        batch, count, _ = tokens.shape
        position = sincos_positions(grid, self.mask_token.shape[-1], tokens.device).unsqueeze(0)
        x = self.embed(tokens)
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype).expand_as(x), x) + position.to(x.dtype)
        visible = ~mask
        visible_count = int(visible[0].sum())
        for block, source, project in zip(self.blocks, self.sources, self.memory):
            memory = project(layers[source]) + position.to(x.dtype)
            x = block(x, memory[visible].view(batch, visible_count, -1))
        return self.head(self.norm(x))


def patchify(volume: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 1, D, H, W) → (B, N, patch³) in the token order of the encoder (z, y, x)."""
    batch, channels, depth, height, width = volume.shape
    x = volume.reshape(batch, channels, depth // patch, patch, height // patch, patch, width // patch, patch)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(batch, (depth // patch) * (height // patch) * (width // patch), -1)


class MaskedVolumeModel(nn.Module):
    """Encoder + hierarchical decoder; `forward` returns the masked reconstruction loss.

    A second, dense reconstruction from the fused feature pyramid (through a light pyramid decoder)
    trains the graph branch's side of the fusion too: inside hidden patches the graph features are
    zero, so whatever it reconstructs there must have come from the ViT tokens through the
    global-to-local deformable attention.
    """

    def __init__(self, encoder: DualBranchEncoder, decoder_dim: int = 192, decoder_depth: int = 4, decoder_heads: int = 4, dense_weight: float = 0.5) -> None:
        super().__init__()
        self.encoder = encoder
        config = encoder.config
        self.decoder = HierarchicalDecoder(config.embed_dim, config.depth, config.in_channels * config.patch_size**3, decoder_dim, decoder_depth, decoder_heads)
        self.dense_decoder = SegmentationDecoder(encoder.channels, config.in_channels)
        self.dense_weight = dense_weight

    def forward(self, volume: torch.Tensor, mask: torch.Tensor, target: Optional[torch.Tensor] = None, checkpoint: bool = False) -> torch.Tensor:
        """Masked reconstruction loss of `target` (default: `volume`, i.e. no input noise)."""
        out = self.encoder(volume, mask, checkpoint=checkpoint)
        prediction = self.decoder(out.tokens, out.vit_layers, mask, out.token_grid)
        patch = self.encoder.config.patch_size
        normalised, content = reconstruction_targets(volume if target is None else target, patch)
        scored = mask & content
        dense = patchify(self.dense_decoder(out.pyramid, volume.shape[2:]), patch)
        return masked_mse(prediction, normalised, scored) + self.dense_weight * masked_mse(dense, normalised, scored)


def reconstruction_targets(volume: torch.Tensor, patch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-patch normalised targets (B, N, patch³) and which patches have content (B, N)."""
    target = patchify(volume.float(), patch)
    variance = target.var(-1, keepdim=True)
    normalised = (target - target.mean(-1, keepdim=True)) / (variance + TARGET_VARIANCE_FLOOR).sqrt()
    return normalised, variance.squeeze(-1) > CONTENT_STD**2


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the scored (hidden, with content) patches; 0 when there are none."""
    error = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(-1)
    return (error * scored).sum() / scored.sum().clamp(min=1)
