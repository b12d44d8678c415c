"""Classification speed on 2 CPU threads (a benchmark, not a test).

- classify one 64³ scan (AdrenalMNIST3D, 1 mm) and one 256×256×100 scan (pyradiomics brain1
  MR resampled from 25 to 100 slices): first run (encoder features computed) and second run
  (features from the cache), plus the attention and Grad-CAM heatmaps;
- adapt on N scans whose features are already cached (N = 50, 200, 600 by default), with a linear
  fit to extrapolate to 1,000 (or measured directly with --sizes ... 1000).
MED3DFM_HOME is a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="*", default=[50, 200, 600])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "classification_bench.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="med3dfm_cls_bench_"))
    os.environ["MED3DFM_HOME"] = str(work / "home")
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(args.threads)
    from Med3DFMLib.classify.data import ListRow, read_list
    from Med3DFMLib.classify.job import run_adapt_classify, run_classify

    archive = np.load(DATA / "adrenal" / "adrenalmnist3d_64_trainval.npz")
    x, y = archive["train_images"], archive["train_labels"].ravel()
    largest = max(args.sizes)
    order = np.random.default_rng(0).permutation(len(y))[:largest]
    rows = []
    for i in order:
        image = sitk.GetImageFromArray(x[i])
        image.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(image, str(work / f"a{i}.nii.gz"), True)
        rows.append(f"a{i}.nii.gz,{'mass' if y[i] else 'normal'}")
    results = {"threads": args.threads, "torch": torch.__version__}

    # Features for every scan once (this is also the cost of the first adapt on new scans).
    (work / "all.csv").write_text("image,class\n" + "\n".join(rows) + "\n")
    tick = time.perf_counter()
    record = run_adapt_classify(read_list(work / "all.csv", True), "bench", work / "first.safetensors", max_steps=20)
    results["features_per_64_scan_s"] = round(record["timings_s"]["features"] / largest, 4)
    results["first_adapt_seconds"] = {"n": largest, "total": round(time.perf_counter() - tick, 1)}

    adapt = {}
    for n in args.sizes:
        (work / f"n{n}.csv").write_text("image,class\n" + "\n".join(rows[:n]) + "\n")
        tick = time.perf_counter()
        record = run_adapt_classify(read_list(work / f"n{n}.csv", True), "bench", work / f"n{n}.safetensors")
        adapt[n] = {"total": round(time.perf_counter() - tick, 2), "features_cached": record["timings_s"]["features"], "train": record["timings_s"]["train"], "steps": record["training"]["steps"], "max_steps": record["training"]["max_steps"]}
        print(json.dumps({"adapt_cached": n, **adapt[n]}), flush=True)
    results["adapt_cached"] = adapt
    sizes = np.array(sorted(adapt))
    totals = np.array([adapt[n]["total"] for n in sizes])
    if 1000 not in adapt and len(sizes) >= 2:
        slope, intercept = np.polyfit(sizes, totals, 1)
        results["adapt_cached_1000_extrapolated_s"] = round(float(slope * 1000 + intercept), 1)

    model = work / f"n{args.sizes[0]}.safetensors"
    unseen = sitk.GetImageFromArray(archive["val_images"][0])  # not in any training list: features not cached yet
    unseen.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(unseen, str(work / "val0.nii.gz"), True)
    scans = {"64^3": work / "val0.nii.gz"}
    brain = sitk.ReadImage(str(DATA / "pyradiomics" / "brain1_image.nrrd"))
    size = [256, 256, 100]
    spacing = [brain.GetSpacing()[0], brain.GetSpacing()[1], brain.GetSpacing()[2] * brain.GetSize()[2] / 100]
    reference = sitk.Image(size, sitk.sitkFloat32)
    reference.SetSpacing(spacing)
    reference.SetOrigin(brain.GetOrigin())
    reference.SetDirection(brain.GetDirection())
    sitk.WriteImage(sitk.Resample(sitk.Cast(brain, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkLinear, 0.0), str(work / "brain_256x256x100.nrrd"), True)
    scans["256x256x100"] = work / "brain_256x256x100.nrrd"
    classify = {}
    for name, path in scans.items():
        entry = {}
        for run in ("first (features computed)", "second (features cached)"):
            tick = time.perf_counter()
            run_classify([ListRow(name, path)], str(model), work / "r.tsv")
            entry[run] = round(time.perf_counter() - tick, 2)
        for method in ("attention", "gradcam"):
            tick = time.perf_counter()
            run_classify([ListRow(name, path)], str(model), work / "r.tsv", work / "h.nrrd", method)
            entry[f"with {method} heatmap (cached)"] = round(time.perf_counter() - tick, 2)
        classify[name] = entry
        print(json.dumps({"classify": name, **entry}), flush=True)
    results["classify_seconds"] = classify
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
