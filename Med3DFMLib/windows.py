"""How many sliding windows a volume needs and how much memory a run takes: plain arithmetic, importable
without torch (the Slicer module uses it to estimate run time and memory before anything is installed)."""

from __future__ import annotations

import math
from typing import Sequence

# Peak activation bytes per input voxel of one window for the small default model: measured
# 195-270 by benchmarks/window_memory.py (float32, CPU, 64³-128³ windows); doubled so the guard
# errs on the safe side.
ACTIVATION_BYTES_PER_VOXEL = 500


def count_windows(volume_shape: Sequence[int], window: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's sliding window visits (same interval rule as its scan)."""
    total = 1
    for size, roi in zip(volume_shape, window):
        size = max(size, roi)
        interval = max(int(roi * (1.0 - overlap)), 1) if size > roi else roi
        total *= int(math.ceil((size - roi) / interval)) + 1
    return total


def host_bytes_needed(volume_shape: Sequence[int], num_classes: int) -> int:
    """Main memory of a run: the input, the blended class scores and the count map (float32 each)."""
    return int(math.prod(int(n) for n in volume_shape)) * 4 * (int(num_classes) + 3)


def window_bytes_needed(window: Sequence[int]) -> int:
    """Activation memory of one window on the device (on the CPU: main memory too)."""
    return int(math.prod(int(w) for w in window)) * ACTIVATION_BYTES_PER_VOXEL


RESOLUTION_FACTORS = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
"""The coarser spacings (× the model's) offered when a scan does not fit: beyond 4× a model made for
1 mm structures sees little of them."""


def lower_resolution_to_fit(volume_shape: Sequence[int], num_classes: int, available: int, extra: int = 0) -> "float | None":
    """The smallest factor of RESOLUTION_FACTORS whose coarser model grid (each axis ÷ factor) fits
    in `available` bytes of main memory with `extra` more (a CPU run's window); None if none does."""
    for factor in RESOLUTION_FACTORS:
        coarse = [max(1, int(round(n / factor))) for n in volume_shape]
        if host_bytes_needed(coarse, num_classes) + extra <= available:
            return factor
    return None
