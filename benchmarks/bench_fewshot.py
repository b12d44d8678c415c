#!/usr/bin/env python3
"""Few-shot speed: adapt + segment on a 256×256×100 MR with 3 painted slices, first round (encoder
features computed) and second round (features from the cache), through the real `med3dfm adapt`.

Input: the pyradiomics brain1 MR (256×256×25 at 0.78×0.78×6.5 mm, tumour label) with its slices
repeated 4× along z and the spacing divided by 4 (256×256×100 at 0.78×0.78×1.625 mm, same physical
extent); the tumour label on 3 slices is the painted input.

`--ct`: instead the first round on a chest-CT-sized volume (issue 17: 512×512×141, lungs painted on 3
axial slices, ≤ 60 s, ≤ 4 GB): the TotalSegmentator example CT (366×303×90 mm, the lung bases in it)
resampled linearly to 512×512×141 voxels, its lung lobes (nearest neighbour) painted on 3 axial
slices; wall time and the process's peak resident memory, and the random walker on the same input.
It is an upsampled CT (no whole chest CT is in the shared data): the size is real, the anatomy is
a crop's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SOURCE = ROOT.parent / "shared" / "data" / "pyradiomics"


def make_inputs(folder: Path) -> tuple:
    image = sitk.ReadImage(str(SOURCE / "brain1_image.nrrd"))
    labels = sitk.ReadImage(str(SOURCE / "brain1_label.nrrd"))
    def stretch(img: sitk.Image) -> sitk.Image:
        array = np.repeat(sitk.GetArrayFromImage(img), 4, axis=0)
        out = sitk.GetImageFromArray(array)
        spacing = list(img.GetSpacing())
        out.SetSpacing([spacing[0], spacing[1], spacing[2] / 4])
        out.SetOrigin(img.GetOrigin())
        out.SetDirection(img.GetDirection())
        return out
    big, big_labels = stretch(image), stretch(labels)
    return write_painted(folder, "image", big, sitk.GetArrayFromImage(big_labels))


def write_painted(folder: Path, name: str, image: sitk.Image, labels: np.ndarray) -> tuple:
    """The image and its labels kept on 3 axial slices (at the 25/50/75 % points of the structure's extent)."""
    z = np.nonzero(labels.any(axis=(1, 2)))[0]
    painted = np.zeros(labels.shape, dtype=np.uint8)
    for index in np.percentile(z, [25, 50, 75]).astype(int):
        painted[index] = labels[index]
    painted_image = sitk.GetImageFromArray(painted)
    painted_image.CopyInformation(image)
    sitk.WriteImage(image, str(folder / f"{name}.nrrd"))
    sitk.WriteImage(painted_image, str(folder / f"{name}_painted.nrrd"))
    return folder / f"{name}.nrrd", folder / f"{name}_painted.nrrd", image.GetSize()


def make_ct_inputs(folder: Path) -> tuple:
    image = sitk.ReadImage(str(SOURCE.parent / "totalseg" / "example_ct_sm.nii.gz"))
    labels = sitk.ReadImage(str(SOURCE.parent / "totalseg" / "example_seg.nii.gz"))
    classes = json.loads((SOURCE.parent / "totalseg" / "classmap.json").read_text())["total"]
    lobes = [int(v) for v, name in classes.items() if name.startswith("lung_")]
    size = (512, 512, 141)
    spacing = [e * s / n for e, s, n in zip(image.GetSize(), image.GetSpacing(), size)]
    reference = sitk.Image(size, sitk.sitkFloat32)
    reference.SetSpacing(spacing)
    reference.SetOrigin(image.GetOrigin())
    reference.SetDirection(image.GetDirection())
    big = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    lung = np.isin(sitk.GetArrayFromImage(sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)), lobes)
    return write_painted(folder, "ct", big, lung.astype(np.uint8))


def random_walker_seconds(image_path: Path, painted_path: Path) -> dict:
    """The peer on the same input: skimage's 3D random walker seeded by the painted slices, on the
    working grid scripts/evaluate_fewshot.py gives it (in-plane downsampled to ≤ 2 M voxels)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import evaluate_fewshot as ev

    image = sitk.ReadImage(str(image_path))
    painted = sitk.GetArrayFromImage(sitk.ReadImage(str(painted_path)))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    labelled = painted.reshape(painted.shape[0], -1).any(1)
    targets = np.full(painted.shape, -1, dtype=np.int16)
    targets[labelled] = (painted[labelled] > 0).astype(np.int16)
    tick = time.perf_counter()
    factor = ev.work_factor(array.shape)
    spacing = list(image.GetSpacing())[::-1]
    probabilities = ev.random_walker_segment(ev.downsample(ev.normalise(array), factor), ev.downsample(targets, factor, labels=True),
                                             [spacing[0], spacing[1] * factor, spacing[2] * factor])
    ev.upsample_probabilities(probabilities, array.shape)
    return {"method": f"skimage random_walker (beta {ev.RANDOM_WALKER_BETA}, in-plane ÷{factor})", "seconds": round(time.perf_counter() - tick, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: docs/benchmarks/fewshot_speed.json (fewshot_speed_ct.json with --ct)")
    parser.add_argument("--ct", action="store_true", help="first round on a 512×512×141 CT with the lungs painted on 3 slices, with peak memory")
    parser.add_argument("--repeats", type=int, default=1, help="MR only: run both rounds this many times, each with a cold cache, and report the median (this machine's times vary by ±20 %%)")
    args = parser.parse_args()
    args.out = args.out or ROOT / "docs" / "benchmarks" / ("fewshot_speed_ct.json" if args.ct else "fewshot_speed.json")
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        from Med3DFMLib.fewshot.adapt import run_adapt

        image, painted, size = make_ct_inputs(folder) if args.ct else make_inputs(folder)
        runs: List[List[dict]] = []
        for repeat in range(1 if args.ct else max(1, args.repeats)):
            os.environ["MED3DFM_HOME"] = str(folder / f"home{repeat}")  # each repeat starts with a cold feature cache
            rounds = []
            for round_index in (1,) if args.ct else (1, 2):
                tick = time.perf_counter()
                record = run_adapt([(image, painted)], "tumour", folder / f"r{repeat}_{round_index}.safetensors", segment_output=folder / f"r{repeat}_{round_index}.seg.nrrd", device_name=args.device)
                rounds.append({"round": round_index, "wall_s": round(time.perf_counter() - tick, 2), "stages_s": record["timings_s"], "feature_cache_hits": record["feature_cache_hits"],
                               "propagate_s": record.get("propagation", {}).get("seconds"), "propagation_solved_voxels": record.get("propagation", {}).get("solved_voxels")})
                if args.ct:  # this process did nothing else heavy before: its peak is the round's (ru_maxrss: KiB on Linux)
                    import resource

                    rounds[-1]["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2)
            runs.append(rounds)
        peer = random_walker_seconds(image, painted)
    # the repeat whose total is the median stands for all; every repeat's wall times are kept
    rounds = sorted(runs, key=lambda r: sum(x["wall_s"] for x in r))[len(runs) // 2]
    result = {"input": f"{size[0]}x{size[1]}x{size[2]}" + (" (upsampled CT, lungs)" if args.ct else ""), "painted_slices": 3, "threads": args.threads, "device": args.device,
              "rounds": rounds, "repeats": len(runs), "wall_s_of_every_repeat": [[x["wall_s"] for x in r] for r in runs],
              "load_average_1min": round(os.getloadavg()[0], 2), "peer_random_walker": peer, "ratio_first_round_to_random_walker": round(rounds[0]["wall_s"] / peer["seconds"], 2)}
    if not args.ct:
        result["ratio_second_round_to_random_walker"] = round(rounds[1]["wall_s"] / peer["seconds"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
