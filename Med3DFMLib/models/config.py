"""Model sizes as data: one dataclass per part, stored in every model card under `architecture`.

The small default fits the CPU budgets of ARCHITECTURE.md; larger variants are just other values
(see `VARIANTS`), never other code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Tuple


@dataclass(frozen=True)
class EncoderConfig:
    """The dual-branch encoder: ViT (global) + grid graph network (local) + deformable fusion."""

    in_channels: int = 1
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 8
    num_heads: int = 3
    mlp_ratio: float = 4.0
    pos_grid: int = 4  # learned position grid (tokens per axis), interpolated to any window
    stem_channels: int = 16  # stride-2 stem, also the decoder's finest skip
    graph_channels: Tuple[int, int, int] = (32, 64, 128)  # strides 4, 8, 16
    graph_depths: Tuple[int, int, int] = (1, 1, 2)
    fusion_after: Tuple[int, ...] = (3, 7)  # ViT blocks after which tokens sample the graph maps
    fusion_points: int = 4  # sampling points per plane group and level
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        if self.embed_dim % 3:
            raise ValueError("embed_dim must be divisible by 3 (one channel group per anatomical plane)")
        if self.embed_dim % self.num_heads:
            raise ValueError("embed_dim must be divisible by num_heads")
        if any(not 0 <= i < self.depth for i in self.fusion_after):
            raise ValueError("fusion_after must index ViT blocks")
        if self.patch_size != 16:
            raise ValueError("the graph pyramid ends at stride 16, so patch_size must be 16")

    @property
    def window_multiple(self) -> int:
        """Input sizes must be multiples of this (the coarsest stride)."""
        return self.patch_size

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "EncoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown encoder settings: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


VARIANTS: Dict[str, EncoderConfig] = {
    # "tiny" exists for tests and smoke runs only: too small to be a useful encoder.
    "tiny": EncoderConfig(embed_dim=48, depth=2, num_heads=2, stem_channels=8, graph_channels=(8, 16, 24), graph_depths=(1, 1, 1), fusion_after=(0, 1)),
    "small": EncoderConfig(),
    "base": EncoderConfig(embed_dim=384, depth=12, num_heads=6, graph_channels=(48, 96, 192), graph_depths=(2, 2, 2), fusion_after=(3, 7, 11)),
}
