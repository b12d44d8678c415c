#!/usr/bin/env python3
"""Why did masked-volume pretraining barely beat predicting zeros? How much of its loss *can* be learned.

No training: on random crops drawn as the pretraining loop draws them, this measures, for the
reconstruction target rule used before and the one used now,
  - the share of hidden patches that are flat in the clean crop (padding, air),
  - the loss of predicting zeros (the trivial baseline the run is compared with),
  - the loss of oracles that know each hidden patch's sub-block means (2³, 4³ or 8³ numbers per
    16³ patch): a model that gets the coarse content of a hidden patch right cannot do better.
The gap between the zero loss and the oracles is what a model can learn at best; the rest of the
loss is noise no context can predict.

It also reports how often each sampling rule draws a scan smaller than the window (mostly padding).

Rules (each on its own crops): *before* = input noise in the targets, variance floor 1e-6, every
hidden patch scored, scans drawn ∝ √voxels; *now* = `Med3DFMLib.pretrain.decoder.reconstruction_targets` on the
un-noised crops, hidden patches with content only, scans drawn by `Archive.weights`.

Usage: python scripts/diagnose_pretraining_targets.py --archive RUN/archive.npz [--window 128] [--out docs/]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from Med3DFMLib.io.atomic import atomic_path  # noqa: E402
from Med3DFMLib.pretrain.data import Archive, random_batch  # noqa: E402
from Med3DFMLib.pretrain.decoder import masked_mse, patchify, reconstruction_targets  # noqa: E402
from Med3DFMLib.pretrain.masking import block_masks  # noqa: E402

PATCH = 16


def targets_before(volume: torch.Tensor) -> torch.Tensor:
    """The rule before the fix: per-patch normalisation with a 1e-6 variance floor."""
    target = patchify(volume, PATCH)
    return (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()


class SqrtWeighted(Archive):
    """The sampling rule before the fix: scans drawn ∝ √voxels."""

    def weights(self, window: int) -> np.ndarray:
        sizes = np.sqrt(np.array([v.size for v in self.volumes], dtype=np.float64))
        return sizes / sizes.sum()


def oracle(normalised: torch.Tensor, values_per_axis: int) -> torch.Tensor:
    """Each patch replaced by the means of its values_per_axis³ sub-blocks (of itself)."""
    batch, count, _ = normalised.shape
    cubes = normalised.reshape(batch * count, 1, PATCH, PATCH, PATCH)
    block = PATCH // values_per_axis
    coarse = F.interpolate(F.avg_pool3d(cubes, block), scale_factor=block, mode="nearest")
    return coarse.reshape(batch, count, -1)


def padding_share(archive: Archive, probabilities: np.ndarray, window: int) -> Dict[str, float]:
    """Share of draws from scans smaller than the window, and the expected padding of a draw."""
    sizes = np.array([v.size for v in archive.volumes], dtype=np.float64)
    small = sizes < window**3
    padding = np.clip(1.0 - sizes / window**3, 0.0, 1.0)
    return {"draws_from_smaller_scans": round(float(probabilities[small].sum()), 3), "expected_padding": round(float((probabilities * padding).sum()), 3)}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--crops", type=int, default=32)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    archive = Archive.load(args.archive)
    rows: Dict[str, Dict[str, float]] = {}
    found: Dict[str, List[Dict[str, float]]] = {"before": [], "now": []}
    samplers = {"before": SqrtWeighted(archive.volumes, archive.names, archive.spacing), "now": archive}
    for name, sampler in samplers.items():
        generator = torch.Generator().manual_seed(0)
        for start in range(0, args.crops, 4):
            inputs, clean = random_batch(sampler, min(4, args.crops - start), args.window, generator, torch.device("cpu"))
            mask = block_masks(inputs.shape[0], [args.window // PATCH] * 3, args.mask_ratio, args.block, generator)
            now, content = reconstruction_targets(clean, PATCH)
            target, scored = (targets_before(inputs), mask) if name == "before" else (now, mask & content)
            found[name].append({
                "hidden_flat_share": float((mask & ~content).sum() / mask.sum()),
                "scored": float(scored.sum()),
                "zero": float(masked_mse(torch.zeros_like(target), target, scored)),
                **{f"oracle_{n}": float(masked_mse(oracle(target, n), target, scored)) for n in (2, 4, 8)},
            })
    for name, batches in found.items():
        weight = np.array([r["scored"] for r in batches])
        rows[name] = {k: round(float(np.average([r[k] for r in batches], weights=weight)), 3) for k in batches[0] if k != "scored"}
    sampling = {name: padding_share(archive, sampler.weights(args.window), args.window) for name, sampler in samplers.items()}
    result = {"archive": str(args.archive), "scans": len(archive.volumes), "window": args.window, "crops": args.crops, "mask_ratio": args.mask_ratio, "block": args.block, "targets": rows, "sampling": sampling}
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "pretraining_targets.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    lines = [
        "# Pretraining targets: how much of the loss can be learned",
        "",
        f"Generated by `scripts/diagnose_pretraining_targets.py` on {len(archive.volumes)} scans, {args.crops} crops of "
        f"{args.window}³, mask ratio {args.mask_ratio}, blocks of {args.block}³ patches. No training: zero prediction and "
        "oracles that know each hidden patch's sub-block means (the best a model that gets the coarse content right can do).",
        "",
        "| target rule | hidden patches flat in the clean crop | loss of predicting zeros | oracle 2³ | oracle 4³ | oracle 8³ |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    labels = {"before": "before: noisy targets, floor 1e-6, every hidden patch", "now": "now: clean targets, floor 0.05², hidden patches with content"}
    for name, row in rows.items():
        lines.append(f"| {labels[name]} | {row['hidden_flat_share']:.0%} | {row['zero']:.3f} | {row['oracle_2']:.3f} | {row['oracle_4']:.3f} | {row['oracle_8']:.3f} |")
    lines += [
        "",
        "| sampling rule | draws from scans smaller than the window | expected padding share of a crop |",
        "|---|---:|---:|",
        f"| before: ∝ √voxels | {sampling['before']['draws_from_smaller_scans']:.0%} | {sampling['before']['expected_padding']:.0%} |",
        f"| now: ∝ voxels a window holds | {sampling['now']['draws_from_smaller_scans']:.0%} | {sampling['now']['expected_padding']:.0%} |",
        "",
    ]
    with atomic_path(args.out / "pretraining_targets.md") as tmp:
        tmp.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
