#!/usr/bin/env python3
"""Choose the within-scan propagation's parameters, and the random walker's beta, on development
structures that scripts/evaluate_fewshot.py does not score.

The evaluation's 11 structures decide whether the this-scan path beats the baselines; tuning on them
would make that comparison meaningless. So the parameters of `Med3DFMLib.fewshot.propagate` (and the
beta of the random-walker baseline, tuned the same way so the baseline is a fair one) are chosen here
on 16 other structures of the same kinds of scan: stomach, left kidney, aorta (the CT); liver, spleen,
right kidney (an abdominal MR the evaluation does not use); putamen, caudate, amygdala, brain stem
(the T1); the second pyradiomics brain tumour, the breast lesion, the other two DeepLesion lesions;
two more hippocampus crops. k = 1, 3, 5 painted slices as in the evaluation, one adapter seed.

Search: coordinate descent from the first guess, two rounds over a small grid per parameter, kept
when the mean Dice over all settings rises by more than 0.002.

Writes <out>/this_scan_tuning.json (every tried setting) and prints the chosen parameters.
Usage: python scripts/tune_this_scan.py [--out DIR] [--rounds 2]   (about 40 min on 2 CPU threads)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402

import evaluate_fewshot as ev  # noqa: E402

GRID: Dict[str, List[Any]] = {
    "beta": [3, 10, 30, 100], "gamma": [0.01, 0.03, 0.1, 0.3], "fixed_confidence": [0.95, 0.99, 0.999], "band": [1, 3, 5, 8, 12, 20],
    "shape_tau_growth": [0.2, 1.0], "shape_tau_mm": [0.5, 2.0], "cone_slope": [0.5, 2.0], "prior_correction": [0.0, 0.5, 1.0], "shape_weight": [0.5, 1.0, 2.0],
}
RW_BETAS = (30, 130, 500)
FIRST_GUESS = dict(shape_tau_mm=1.0, shape_tau_growth=0.5, cone_slope=1.0, adapter_weight=1.0, shape_weight=1.0, prior_correction=1.0, beta=30.0, gamma=0.05, fixed_confidence=0.98, band=2)


def development_tasks() -> List[ev.Task]:
    data = ev.DATA
    classmap = json.loads((data / "totalseg" / "classmap.json").read_text())
    value = {key: {name: int(v) for v, name in classes.items()} for key, classes in classmap.items()}
    ct, seg = data / "totalseg" / "example_ct_sm.nii.gz", data / "totalseg" / "example_seg.nii.gz"
    mr, seg_mr = data / "totalseg" / "example_mr_sm.nii.gz", data / "totalseg" / "example_seg_mr.nii.gz"
    brain, aseg = data / "brain" / "test_scan_vol.nii.gz", data / "brain" / "test_scan_seg.nii.gz"
    lesions = sorted((data / "deeplesion").glob("*_img.nii.gz"))  # the evaluation uses the first
    pool, _ = ev.hippocampus_cases()  # the evaluation uses crops 0, 60 and 120 of the pool
    hippo = data / "hippocampus"
    T = ev.Task
    return [
        T("stomach", "CT organ", ct, seg, {"s": (value["total"]["stomach"],)}, "k", "axial"),
        T("left kidney", "CT organ", ct, seg, {"s": (value["total"]["kidney_left"],)}, "k", "axial"),
        T("aorta", "CT organ", ct, seg, {"s": (value["total"]["aorta"],)}, "k", "axial"),
        T("MR liver", "MR organ", mr, seg_mr, {"s": (value["total_mr"]["liver"],)}, "k", "axial"),
        T("MR spleen", "MR organ", mr, seg_mr, {"s": (value["total_mr"]["spleen"],)}, "k", "axial"),
        T("MR kidney", "MR organ", mr, seg_mr, {"s": (value["total_mr"]["kidney_right"],)}, "k", "axial"),
        T("putamen", "MR brain", brain, aseg, {"s": (12, 51)}, "j", "axial"),
        T("caudate", "MR brain", brain, aseg, {"s": (11, 50)}, "j", "axial"),
        T("amygdala", "MR brain", brain, aseg, {"s": (18, 54)}, "j", "axial"),
        T("brain stem", "MR brain", brain, aseg, {"s": (16,)}, "j", "axial"),
        T("brain2 tumour", "lesion", data / "pyradiomics" / "brain2_image.nrrd", data / "pyradiomics" / "brain2_label.nrrd", {"s": (1,)}, "k", "axial"),
        T("breast1 lesion", "lesion", data / "pyradiomics" / "breast1_image.nrrd", data / "pyradiomics" / "breast1_label.nrrd", {"s": (1,)}, "k", "axial"),
        *[T(f"DeepLesion {p.name[10:16]}", "lesion", p, Path(str(p).replace("_img", "_gt")), {"s": (1,)}, "k", "axial") for p in lesions[1:3]],
        *[T(f"hippocampus crop {pool[i][12:15]}", "MR hippocampus crop", hippo / "images" / pool[i], hippo / "labels" / pool[i], {"s": (1, 2)}, "k", "k voxel axis") for i in (30, 90)],
    ]


def collect(lib: ev.Lib, tasks: List[ev.Task], log) -> List[Dict[str, Any]]:
    """Per (structure, k): the adapter's probabilities on the image grid and what scoring needs."""
    import SimpleITK as sitk

    from Med3DFMLib.fewshot.labels import AXES
    from Med3DFMLib.preprocess import probabilities_on

    settings = []
    for task in tasks:
        image = sitk.ReadImage(str(task.image))
        truth = np.isin(sitk.GetArrayFromImage(sitk.ReadImage(str(task.labels))), next(iter(task.values.values())))
        axis = AXES[task.axis]
        for k in (1, 3, 5):
            slices = ev.chosen_slices(truth, axis, k)
            sparse, scored = ev.painted(truth, axis, slices)
            supervision = lib.supervision(image, sparse, ["s"], dense=False, axis=task.axis)
            model, _, _ = lib.fit("adapter", [image], [task.image], [supervision], "pretrained", 0)
            volume, _ = lib.volume(task.image, image, "pretrained")
            probabilities = probabilities_on(lib.adapter.predict_dense(model, volume.features, volume.padded_image), volume.grid, image)
            settings.append({"task": task.name, "k": k, "axis": axis, "spacing": list(image.GetSpacing())[::-1], "image": sitk.GetArrayFromImage(image).astype(np.float32),
                             "targets": supervision.targets, "truth": truth, "scored": scored, "adapter": probabilities.astype(np.float32)})
            log(f"  evidence: {task.name} k={k}")
        lib.forget(task.image)
    return settings


def score_propagation(settings: List[Dict[str, Any]], params) -> List[float]:
    from Med3DFMLib.fewshot.propagate import segment_this_scan

    scores = []
    for s in settings:
        labels, _ = segment_this_scan(s["image"], s["spacing"], s["targets"], s["axis"], s["adapter"], params)
        scores.append(ev.dice(labels[s["scored"]] == 1, s["truth"][s["scored"]]) or 0.0)
    return scores


def score_random_walker(setting: Dict[str, Any], beta: float) -> float:
    """The evaluation's random-walker baseline (same working grid) with this beta."""
    axis = setting["axis"]
    order = [axis] + [a for a in range(3) if a != axis]
    intensities = np.transpose(setting["image"], order)
    factor = ev.work_factor(intensities.shape)
    spacing = setting["spacing"]
    work_spacing = [spacing[order[0]], spacing[order[1]] * factor, spacing[order[2]] * factor]
    targets = ev.downsample(np.transpose(setting["targets"], order), factor, labels=True)
    probabilities = ev.upsample_probabilities(ev.random_walker_segment(ev.downsample(ev.normalise(intensities), factor), targets, work_spacing, beta), intensities.shape)
    labels = np.transpose(probabilities.argmax(0), np.argsort(order))
    return ev.dice(labels[setting["scored"]] == 1, setting["truth"][setting["scored"]]) or 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    os.environ.setdefault("MED3DFM_HOME", tempfile.mkdtemp(prefix="med3dfm-tune-"))
    import torch

    from Med3DFMLib.fewshot.propagate import PropagationParams

    torch.set_num_threads(args.threads)
    lib = ev.Lib(Path(os.environ["MED3DFM_HOME"]), [])
    settings = collect(lib, development_tasks(), log)
    tried = []
    best = PropagationParams(**FIRST_GUESS)
    best_score = float(np.mean(score_propagation(settings, best)))
    tried.append({"params": best.to_dict(), "mean_dice": round(best_score, 4)})
    log(f"first guess: {best_score:.4f}")
    for _ in range(args.rounds):
        for name, values in GRID.items():
            for value in values:
                candidate = dataclasses.replace(best, **{name: value})
                if candidate == best:
                    continue
                score = float(np.mean(score_propagation(settings, candidate)))
                tried.append({"params": candidate.to_dict(), "mean_dice": round(score, 4)})
                log(f"  {name}={value}: {score:.4f}")
                if score > best_score + 0.002:
                    best, best_score = candidate, score
    log(f"chosen: {best} ({best_score:.4f}); library default: {PropagationParams()}")
    walker = {beta: float(np.mean([score_random_walker(s, beta) for s in settings])) for beta in RW_BETAS}
    log(f"random walker, mean Dice by beta: {walker}")
    payload = {"structures": sorted({s["task"] for s in settings}), "settings": len(settings), "chosen": best.to_dict(), "chosen_mean_dice": round(best_score, 4),
               "tried": tried, "random_walker_mean_dice_by_beta": {str(b): round(v, 4) for b, v in walker.items()}, "random_walker_beta": max(walker, key=walker.get),
               "wall_s": round(time.perf_counter() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "this_scan_tuning.json").write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
