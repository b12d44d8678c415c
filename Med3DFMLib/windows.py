"""How many sliding windows a volume needs: plain arithmetic, importable without torch (the Slicer
module uses it to estimate run times before anything is installed)."""

from __future__ import annotations

import math
from typing import Sequence


def count_windows(volume_shape: Sequence[int], window: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's sliding window visits (same interval rule as its scan)."""
    total = 1
    for size, roi in zip(volume_shape, window):
        size = max(size, roi)
        interval = max(int(roi * (1.0 - overlap)), 1) if size > roi else roi
        total *= int(math.ceil((size - roi) / interval)) + 1
    return total
