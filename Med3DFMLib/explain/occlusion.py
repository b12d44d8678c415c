"""Occlusion sensitivity, the slow reference for every other heatmap: hide one block of the scan
(fill it with the scan's background value), score again, and keep the drop in the target score.

It needs one full forward pass per block, so the block grid is capped (`max_blocks`): blocks grow
on large scans instead of the run time.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from Med3DFMLib.progress import Progress


def block_size(shape: Sequence[int], minimum: int, max_blocks: int) -> int:
    size = minimum
    while math.prod(math.ceil(s / size) for s in shape) > max_blocks:
        size += minimum
    return size


def occlusion_map(array: np.ndarray, score: Callable[[np.ndarray], float], minimum_block: int = 16, max_blocks: int = 216, progress: Optional[Progress] = None) -> Tuple[np.ndarray, int]:
    """(map of score drops ≥ 0 on the array's grid, block size) for a (z, y, x) model-grid array."""
    size = block_size(array.shape, minimum_block, max_blocks)
    fill = float(array.min())
    reference = score(array)
    result = np.zeros(array.shape, dtype=np.float32)
    starts = [range(0, s, size) for s in array.shape]
    corners = list(itertools.product(*starts))
    for index, (z, y, x) in enumerate(corners):
        region = (slice(z, z + size), slice(y, y + size), slice(x, x + size))
        occluded = array.copy()
        occluded[region] = fill
        result[region] = max(0.0, reference - score(occluded))
        if progress is not None:
            progress.update("explain", (index + 1) / len(corners), f"occlusion block {index + 1} of {len(corners)}")
    return result, size
