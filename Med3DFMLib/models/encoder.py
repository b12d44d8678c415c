"""The dual-branch foundation encoder (3DME-style).

    input ─┬─ stem ── graph stages (stride 4, 8, 16) ──────────┐
           │                     ▲ global→local fusion         │ multi-scale features
           └─ patch tokens ── ViT blocks ── local→global fusion ┘ + tokens

ViT tokens read the graph pyramid at several depths (multi-level deformable attention); at the end
every graph level reads the final tokens. The output is a feature pyramid for dense heads and the
token sequence for classification heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from Med3DFMLib.models.config import EncoderConfig
from Med3DFMLib.models.fusion import CrossPlanarDeformableAttention
from Med3DFMLib.models.graph import GraphBranch, Stem
from Med3DFMLib.models.vit import PatchEmbed3d, TransformerBlock, apply_token_mask, checkpoint_call


@dataclass
class EncoderOutput:
    """Feature pyramid at strides 2, 4, 8, 16 (B, C, d, h, w) and the ViT tokens (B, N, D)."""

    pyramid: List[torch.Tensor]
    tokens: torch.Tensor
    token_grid: Tuple[int, int, int]
    vit_layers: List[torch.Tensor]


class DualBranchEncoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        rates = torch.linspace(0, config.drop_path, config.depth).tolist()
        self.patch_embed = PatchEmbed3d(config.in_channels, dim, config.patch_size, config.pos_grid)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, config.num_heads, config.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        self.stem = Stem(config.in_channels, config.stem_channels, config.graph_channels[0])
        self.graph = GraphBranch(config.graph_channels, config.graph_depths, config.drop_path)
        self.local_to_global = nn.ModuleList(
            CrossPlanarDeformableAttention(dim, config.graph_channels, dim, config.fusion_points) for _ in config.fusion_after
        )
        self.global_to_local = nn.ModuleList(
            CrossPlanarDeformableAttention(c, [dim], dim, config.fusion_points) for c in config.graph_channels
        )

    @property
    def channels(self) -> List[int]:
        """Channels of the pyramid levels (strides 2, 4, 8, 16)."""
        return [self.config.stem_channels, *self.config.graph_channels]

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None, checkpoint: bool = False) -> EncoderOutput:
        """`token_mask` (B, N) True = patch hidden from both branches (masked pretraining).
        `checkpoint` recomputes ViT blocks in the backward pass instead of storing activations."""
        multiple = self.config.window_multiple
        if any(s % multiple for s in x.shape[2:]):
            raise ValueError(f"input size {tuple(x.shape[2:])} must be a multiple of {multiple}")
        tokens, grid = self.patch_embed(x)
        # A hidden patch becomes the mask token plus its position: the encoder still knows where it is.
        tokens = apply_token_mask(tokens, token_mask, self.mask_token + self.patch_embed.position(grid))
        visible = None
        if token_mask is not None:
            visible = (~token_mask).view(x.shape[0], 1, *grid)
            x = x * F.interpolate(visible.to(x.dtype), size=x.shape[2:], mode="nearest")
        half, quarter = self.stem(x)
        if visible is not None:
            half = half * F.interpolate(visible.to(half.dtype), size=half.shape[2:], mode="nearest")
        graph_maps = self.graph(quarter, visible, checkpoint=checkpoint)

        fusion_index = {layer: i for i, layer in enumerate(self.config.fusion_after)}
        vit_layers: List[torch.Tensor] = []
        for layer, block in enumerate(self.blocks):
            tokens = checkpoint_call(block, tokens) if checkpoint and self.training else block(tokens)
            if layer in fusion_index:
                tokens = self.local_to_global[fusion_index[layer]](tokens, grid, graph_maps)
            vit_layers.append(tokens)
        tokens = self.norm(tokens)

        batch = x.shape[0]
        token_map = tokens.transpose(1, 2).reshape(batch, -1, *grid)
        fused: List[torch.Tensor] = []
        for level, feature_map in enumerate(graph_maps):
            size = feature_map.shape[2:]
            queries = feature_map.flatten(2).transpose(1, 2)
            updated = self.global_to_local[level](queries, size, [token_map])
            fused.append(updated.transpose(1, 2).reshape(feature_map.shape))
        return EncoderOutput([half, *fused], tokens, grid, vit_layers)
