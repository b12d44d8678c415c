#!/usr/bin/env python3
"""Peak extra host memory of one forward pass per window voxel (what the inference memory guard
assumes as ACTIVATION_BYTES_PER_VOXEL). Each measurement runs in a fresh process so the
allocator's earlier peaks do not hide this one."""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _measure(size: int, batch: int, queue) -> None:
    import resource

    import torch

    from Med3DFMLib.models import VARIANTS, SegmentationModel

    torch.set_num_threads(2)
    model = SegmentationModel(VARIANTS["small"], num_classes=3).eval()
    x = torch.randn(batch, 1, size, size, size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.inference_mode():
        model(x).softmax(1)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put((after - before) / (batch * size**3))


def main() -> None:
    ctx = mp.get_context("spawn")
    results = {}
    for size, batch in ((64, 1), (96, 1), (96, 2), (128, 1)):
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(size, batch, queue))
        proc.start()
        results[f"{size}^3 x{batch}"] = round(queue.get(), 1)
        proc.join()
    print(json.dumps({"peak_bytes_per_window_voxel": results}, indent=2))


if __name__ == "__main__":
    main()
