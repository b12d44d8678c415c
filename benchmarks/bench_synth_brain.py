#!/usr/bin/env python3
"""Issue 22 part 5: a whole-head 1 mm brain MR segmented end to end by the synthetic-brain model,
against the classical peer on the same input, in one run.

Input: the real T1 of ../shared/data/brain (voxelmorph, 160×192×224 at 1 mm, skull-stripped) with
its true axes (scripts/evaluate_synth_brain.py), zero-padded to 256×256×256 voxels, the size of a
whole-head 1 mm acquisition (FreeSurfer's conformed grid). Med3DFM: `med3dfm segment` in a fresh
process (imports, model load, domain check, preprocessing, sliding window, postprocessing, writing
the .seg.nrrd), wall time and the process's peak resident memory; torch and ITK limited to
`--threads`. Peer: one labelled T1 registered onto the scan (affine + diffeomorphic demons, the
registration of scripts/evaluate_synth_brain.py) with the same threads, its wall time.

    python benchmarks/bench_synth_brain.py build/synth_brain/synth-brain-mr.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT), str(ROOT / "scripts")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import evaluate_synth_brain as evaluation  # noqa: E402

WHOLE_HEAD = 256


def whole_head_input(folder: Path) -> Path:
    """The real T1 with its true axes, centred in a 256³ 1 mm grid of zeros."""
    image = evaluation.with_true_axes(sitk.ReadImage(str(evaluation.DATA / "brain" / "test_scan_vol.nii.gz"), sitk.sitkFloat32))
    low = [(WHOLE_HEAD - n) // 2 for n in image.GetSize()]
    high = [WHOLE_HEAD - n - lo for n, lo in zip(image.GetSize(), low)]
    padded = sitk.ConstantPad(image, low, high, 0.0)
    path = folder / "head_t1.nii.gz"
    sitk.WriteImage(padded, str(path))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="the bundled model (.safetensors)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "synth_brain_speed.json")
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args()

    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                   "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = whole_head_input(folder)
        command = [sys.executable, "-m", "Med3DFMLib.cli", "segment", str(source), "-o", str(folder / "head.seg.nrrd"),
                   "--model", str(args.model.resolve()), "--device", "cpu", "--progress", "none", "--table", str(folder / "volumes.tsv")]
        tick = time.perf_counter()
        run = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
        wall = time.perf_counter() - tick
        if run.returncode != 0:
            print(run.stdout + run.stderr, file=sys.stderr)
            return 1
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2  # KiB on Linux
        result = {"input": f"{WHOLE_HEAD}^3 at 1 mm (the real voxelmorph T1, zero-padded)", "threads": args.threads, "device": "cpu",
                  "model": str(args.model), "med3dfm_segment": {"wall_s": round(wall, 1), "peak_rss_gib": round(peak_gib, 2), "command": "med3dfm segment"},
                  "load_average_1min": round(os.getloadavg()[0], 2)}
        if not args.no_peer:
            import torch

            torch.set_num_threads(args.threads)
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
            image = sitk.ReadImage(str(source), sitk.sitkFloat32)
            truth = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.int64)  # scored elsewhere; only timed here
            tick = time.perf_counter()
            evaluation.atlas_baseline(image, truth)
            peer = time.perf_counter() - tick
            result["peer_registration"] = {"method": "one labelled (synthetic T1) head registered, affine MI + diffeomorphic demons", "wall_s": round(peer, 1)}
            result["ratio_med3dfm_to_peer"] = round(wall / peer, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
