#!/usr/bin/env python3
"""The inference stage of a whole-volume segment, alone: `predict_volume` (sliding windows,
Gaussian blending) on the model-grid array a 512×512×N CT becomes at the model's spacing.

Used on GPU machines that lack SimpleITK (so the end-to-end bench_volume.py cannot read DICOM
there): loading, resampling and writing are CPU stages measured by bench_volume.py; this adds the
device's share. The array's content does not change the work, so it is random.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from Med3DFMLib.inference import count_windows, predict_volume  # noqa: E402
from Med3DFMLib.models import VARIANTS, SegmentationModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="400,334,334", help="model-grid (z,y,x): 512×512×300 at 0.98×0.98×2 mm → 1.5 mm")
    parser.add_argument("--window", type=int, default=96)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    device = torch.device(args.device)
    model = SegmentationModel(VARIANTS["small"], args.classes)
    array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    window = (args.window,) * 3
    predict_volume(model, array[:128, :128, :128], window, device, args.overlap)  # warm-up
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        predict_volume(model, array, window, device, args.overlap)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape_zyx": shape, "window": args.window, "overlap": args.overlap, "classes": args.classes,
        "windows": count_windows(shape, window, args.overlap), "seconds_median": round(float(np.median(times)), 3),
        "seconds_all": [round(t, 3) for t in times],
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
    }, indent=2))


if __name__ == "__main__":
    main()
