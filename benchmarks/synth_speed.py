#!/usr/bin/env python3
"""Samples per second of the SynthSeg-style generator (`Med3DFMLib.synth`) on one CPU thread.

For each (target spacing, crop) case: the label maps are loaded and resampled once (timed apart),
then `--samples` draws of the default `SynthConfig` (every step on, at its default probability)
after `--warmup` draws; prints the median and the mean seconds per sample and samples/s.
Default data: `../shared/data/synthseg` (1 mm whole-head maps) when it is there, else the two 2 mm
maps in `Testing/Data/synthseg` (then 1.5 mm means upsampling them, which costs the same per sample).

    python benchmarks/synth_speed.py                 # 2 mm (96^3, 128^3) and 1.5 mm (128^3, 160^3)
    python benchmarks/synth_speed.py --json out.json --samples 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from Med3DFMLib.synth import SynthConfig, SynthGenerator, load_label_table  # noqa: E402

CASES = ((2.0, 96), (2.0, 128), (1.5, 128), (1.5, 160))


def main() -> int:
    shared = ROOT.parent / "shared" / "data" / "synthseg"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=shared if shared.is_dir() else ROOT / "Testing" / "Data" / "synthseg")
    parser.add_argument("--maps", type=int, default=2, help="label maps to load (all samples cycle over them)")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    paths = sorted(args.data.glob("training_seg_*.nii.gz"))[: args.maps]
    if not paths:
        parser.error(f"no training_seg_*.nii.gz in {args.data}")
    table = load_label_table(args.data)
    print(f"data: {args.data} ({len(paths)} maps), threads: {args.threads}, torch {torch.__version__}")
    print(f"{'spacing':>8} {'crop':>6} {'load s/map':>11} {'median s':>9} {'mean s':>8} {'samples/s':>10}")
    results = []
    for spacing, crop in CASES:
        config = SynthConfig(target_spacing=spacing, crop_shape=crop)
        start = time.perf_counter()
        generator = SynthGenerator(paths, config, args.seed, table=table)
        load = (time.perf_counter() - start) / len(paths)
        for _ in range(args.warmup):
            generator.sample()
        times = []
        for _ in range(args.samples):
            start = time.perf_counter()
            generator.sample()
            times.append(time.perf_counter() - start)
        median, mean = statistics.median(times), statistics.fmean(times)
        results.append({"spacing_mm": spacing, "crop": crop, "map_shape": list(generator.maps[0].index.shape),
                        "load_s_per_map": load, "median_s": median, "mean_s": mean, "samples_per_s": 1.0 / mean})
        print(f"{spacing:>6.1f}mm {crop:>5}³ {load:>11.2f} {median:>9.3f} {mean:>8.3f} {1.0 / mean:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"data": str(args.data), "maps": len(paths), "threads": args.threads,
                                         "samples": args.samples, "torch": torch.__version__, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
