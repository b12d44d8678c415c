"""Progressive volumetric masking.

Early in training a few small blocks of patches are hidden; later, more and larger blocks. Large
blocks hide whole neighbourhoods across slices, so the encoder cannot copy from the next slice and
has to learn volumetric continuity. Every sample in a batch hides exactly the same number of
patches, so visible tokens can be gathered into a dense tensor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Sequence, Tuple

import torch


@dataclass(frozen=True)
class MaskSchedule:
    """Mask ratio and block size (in patches per side) grow linearly from start to end."""

    start_ratio: float = 0.4
    end_ratio: float = 0.75
    start_block: int = 1
    end_block: int = 3

    def __post_init__(self) -> None:
        if not 0.0 < self.start_ratio <= self.end_ratio < 1.0:
            raise ValueError("mask ratios must satisfy 0 < start <= end < 1")
        if not 1 <= self.start_block <= self.end_block:
            raise ValueError("block sizes must satisfy 1 <= start <= end")

    def at(self, progress: float) -> Tuple[float, int]:
        """(ratio, block size) at `progress` ∈ [0, 1] of training."""
        progress = min(max(progress, 0.0), 1.0)
        ratio = self.start_ratio + (self.end_ratio - self.start_ratio) * progress
        block = int(round(self.start_block + (self.end_block - self.start_block) * progress))
        return ratio, block

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def block_masks(batch: int, grid: Sequence[int], ratio: float, block: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, N) bool, True = hidden; each row hides exactly round(ratio · N) patches in cubes of
    `block`³ patches (cubes may be cut by the volume's edge; the last cube is trimmed at random)."""
    depth, height, width = (int(g) for g in grid)
    count = depth * height * width
    target = min(max(int(round(ratio * count)), 1), count - 1)
    masks = torch.zeros(batch, depth, height, width, dtype=torch.bool)
    for row in range(batch):
        mask = masks[row]
        while int(mask.sum()) < target:
            z, y, x = (int(torch.randint(-block + 1, n, (1,), generator=generator)) for n in (depth, height, width))
            mask[max(z, 0) : z + block, max(y, 0) : y + block, max(x, 0) : x + block] = True
        excess = int(mask.sum()) - target
        if excess > 0:
            hidden = mask.view(-1).nonzero().squeeze(1)
            drop = hidden[torch.randperm(hidden.numel(), generator=generator)[:excess]]
            mask.view(-1)[drop] = False
    return masks.view(batch, count)
