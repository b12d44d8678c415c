#!/usr/bin/env python3
"""The synthetic-brain model (scripts/train_synth_brain.py, bundled by scripts/bundle_synth_brain.py)
on real scans it never saw, through the library's segment pipeline (Med3DFMLib.segment):

1. **Real T1, FreeSurfer labels**: ../shared/data/brain/test_scan_vol.nii.gz (voxelmorph's skull-
   stripped 1 mm T1) against its aseg; Dice per structure of issue 22's twelve (left and right
   averaged) and their mean. The file was stored without an affine (identity direction, origin 0);
   its true axes, found from the aseg itself (left labels lie at higher i, brain stem and
   cerebellum at higher j, caudate at higher k and cerebellum at lower k), are FreeSurfer's
   conformed LIA: i -> left, j -> inferior, k -> anterior. The scan is given that direction before
   it is segmented (`TRUE_DIRECTION`); without it the model sees a head lying on its back.
2. **Contrast**: the same scan with its brain intensities inverted (1 - I inside the brain, 0
   outside: dark white matter, bright CSF, a T2-like ordering). A synthetic change of contrast on a
   real anatomy, not a real T2: no labelled FLAIR or T2 scan is in the shared data.
3. **The classical peer, same scan**: one labelled T1 registered onto the real T1 and its labels
   carried over (the library's multi-atlas registration, Med3DFMLib.fewshot.registration: affine on
   Mattes mutual information, then diffeomorphic demons on histogram-matched intensities, at most
   1 M voxels). No second real labelled T1 is in the shared data, so the atlas is SynthSeg's
   training_seg_01 with T1 intensities drawn from SynthSeg's T1 priors (no deformation, skull
   stripped, 1 mm): the labels are a real head's, the image synthetic. Its seconds are the peer's.
4. **The MNI template** (with `--mni FOLDER`): the ICBM 2009a symmetric T1 template nilearn ships
   (mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz: a skull-stripped average of 152
   adults, 1 mm), scored as tissues, the only labels it has: grey matter against its grey-matter
   probability map above 0.5, white matter against its white-matter map (`TISSUES`). A second T1
   from another scanner population, not a subject: its average anatomy is smoother than any head.
5. **Hippocampus crops**: the 200 MSD Task04 crops (manual labels, anterior + posterior merged)
   segmented as they are, hippocampus = FreeSurfer 17 or 53; beside it the bundled crop model
   `hippocampus-mr-demo` on its own 40 held-out cases (every 5th by name), both merged.

    python scripts/evaluate_synth_brain.py build/synth_brain/synth-brain-mr.safetensors --out docs/synth_brain_eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from Med3DFMLib.synth.train import VALIDATION_STRUCTURES, structure_dice  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
TRUE_DIRECTION = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0)
"""LIA in ITK's LPS world, row-major: voxel i -> +x (left), j -> -z (inferior), k -> -y (anterior)."""
HIPPOCAMPUS = (17, 53)
MNI_FILES = {name: f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz" for name in ("t1", "gm", "wm")}
TISSUES: Dict[str, Tuple[int, ...]] = {
    "grey matter": (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58),
    "white matter": (2, 41, 7, 46, 16, 28, 60),
}
"""FreeSurfer labels grouped as the template's tissue maps draw them: cortex, cerebellar cortex and
the deep grey nuclei (thalamus, caudate, putamen, pallidum, hippocampus, amygdala, accumbens) as grey;
cerebral and cerebellar white matter, brain stem and ventral diencephalon as white. Ventricles and
CSF are in neither."""


def with_true_axes(image: sitk.Image) -> sitk.Image:
    """The voxelmorph scan with the direction it was acquired in (see the module docstring)."""
    fixed = sitk.Image(image)
    fixed.SetDirection(TRUE_DIRECTION)
    fixed.SetOrigin((0.0, 0.0, 0.0))
    return fixed


def inverted_contrast(image: sitk.Image, brain: np.ndarray) -> sitk.Image:
    """1 - I inside the brain mask, 0 outside (intensities of this scan are on 0..1)."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    top = float(np.percentile(array[brain], 99.5))
    out = np.where(brain, np.clip(1.0 - array / top, 0.0, 1.0), 0.0).astype(np.float32)
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result


def freesurfer_labels(segmenter: Any, card: Dict[str, Any], image: sitk.Image) -> np.ndarray:
    """The model's labels on the image grid as FreeSurfer values (class i -> class_labels[i])."""
    from Med3DFMLib.segment import segment_image

    classes = np.asarray(card["training"]["class_labels"], dtype=np.int64)
    return classes[sitk.GetArrayFromImage(segment_image(image, segmenter)).astype(np.int64)]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else float("nan")


def score_real_t1(segmenter: Any, card: Dict[str, Any], with_atlas: bool = True) -> Dict[str, Any]:
    image = with_true_axes(sitk.ReadImage(str(DATA / "brain" / "test_scan_vol.nii.gz"), sitk.sitkFloat32))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "brain" / "test_scan_seg.nii.gz"))).astype(np.int64)
    results = {}
    for name, scan in (("T1", image), ("T1, brain intensities inverted (T2-like)", inverted_contrast(image, truth > 0))):
        tick = time.perf_counter()
        predicted = freesurfer_labels(segmenter, card, scan)
        seconds = time.perf_counter() - tick
        per_structure = structure_dice(predicted, truth)
        results[name] = {"mean_dice": round(float(np.nanmean(list(per_structure.values()))), 4),
                         "per_structure": {k: round(v, 4) for k, v in per_structure.items()}, "seconds": round(seconds, 1)}
        print(f"{name}: mean Dice {results[name]['mean_dice']:.3f} over {len(VALIDATION_STRUCTURES)} structures ({seconds:.0f} s)", flush=True)
    if with_atlas:
        results["peer: one labelled T1 registered"] = atlas_baseline(image, truth)
        print(f"registration peer: {results['peer: one labelled T1 registered']}", flush=True)
    return results


def score_mni(segmenter: Any, card: Dict[str, Any], folder: Path) -> Dict[str, Any]:
    """Tissue Dice on the MNI template against its own probability maps (see the module docstring)."""
    missing = [f for f in MNI_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise SystemExit(f"--mni {folder}: missing {', '.join(missing)} (nilearn's nilearn/datasets/data folder has them)")
    image = sitk.ReadImage(str(folder / MNI_FILES["t1"]), sitk.sitkFloat32)
    tick = time.perf_counter()
    predicted = freesurfer_labels(segmenter, card, image)
    seconds = time.perf_counter() - tick
    per_tissue = {}
    for tissue, key in (("grey matter", "gm"), ("white matter", "wm")):
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / MNI_FILES[key]))) >= 128  # probability 0..255
        per_tissue[tissue] = round(dice(np.isin(predicted, TISSUES[tissue]), truth), 4)
    print(f"MNI template: {per_tissue} ({seconds:.0f} s)", flush=True)
    return {"per_tissue": per_tissue, "seconds": round(seconds, 1),
            "truth": "the template's own tissue probability maps above 0.5", "tissues": {k: list(v) for k, v in TISSUES.items()}}


def synthetic_t1_atlas(seed: int = 0) -> "tuple":
    """(normalised image, FreeSurfer labels, spacing zyx) of item 3's atlas, on an LPS 1 mm grid."""
    from Med3DFMLib.synth import SynthConfig, SynthGenerator, load_label_table

    folder = DATA / "synthseg"
    config = SynthConfig.no_augmentation(target_spacing=1.0, crop_shape=None, t1_prior_probability=1.0, skull_strip_probability=1.0)
    generator = SynthGenerator([folder / "training_seg_01.nii.gz"], config, seed, table=load_label_table(folder))
    image, labels = generator.sample()
    array = image[0].numpy()
    top = float(np.percentile(array[labels.numpy() > 0], 99.5))
    return np.clip(array / top, 0.0, 1.0).astype(np.float32), labels.numpy().astype(np.int64), (1.0, 1.0, 1.0)


def atlas_baseline(image: sitk.Image, truth: np.ndarray, seed: int = 0) -> Dict[str, Any]:
    """Item 3's peer on `image` (true axes set): the atlas registered onto it, arg-max of its
    (interpolated, one-hot) labels on the scan's own grid, scored like the model."""
    from Med3DFMLib.fewshot.propagate import channel_argmax
    from Med3DFMLib.fewshot.registration import make_atlas, votes
    from Med3DFMLib.synth import SYNTHSEG_OUTPUT_LABELS

    tick = time.perf_counter()
    atlas_image, atlas_labels, spacing = synthetic_t1_atlas(seed)
    classes = np.zeros(max(SYNTHSEG_OUTPUT_LABELS) + 1, dtype=np.int16)
    classes[list(SYNTHSEG_OUTPUT_LABELS)] = np.arange(len(SYNTHSEG_OUTPUT_LABELS))
    atlas = make_atlas(atlas_image, classes[np.where(np.isin(atlas_labels, SYNTHSEG_OUTPUT_LABELS), atlas_labels, 0)], spacing)
    lps = sitk.DICOMOrient(image, "LPS")
    array = sitk.GetArrayFromImage(lps).astype(np.float32)
    top = float(np.percentile(array[array > 0], 99.5))
    fraction = votes(np.clip(array / top, 0.0, 1.0), list(lps.GetSpacing())[::-1], [atlas], len(SYNTHSEG_OUTPUT_LABELS) - 1)
    labels = sitk.GetImageFromArray(np.asarray(SYNTHSEG_OUTPUT_LABELS, dtype=np.uint16)[channel_argmax(fraction)])
    labels.CopyInformation(lps)
    on_scan = sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    seconds = time.perf_counter() - tick
    per_structure = structure_dice(sitk.GetArrayFromImage(on_scan).astype(np.int64), truth)
    return {"mean_dice": round(float(np.nanmean(list(per_structure.values()))), 4),
            "per_structure": {k: round(v, 4) for k, v in per_structure.items()}, "seconds": round(seconds, 1),
            "method": "synthetic T1 of training_seg_01 registered (affine MI + diffeomorphic demons, Med3DFMLib.fewshot.registration)"}


def score_hippocampus(segmenter: Any, card: Dict[str, Any], names: Sequence[str], labels: Sequence[int] = HIPPOCAMPUS) -> List[float]:
    scores = []
    for name in names:
        image = sitk.ReadImage(str(DATA / "hippocampus" / "images" / name), sitk.sitkFloat32)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "hippocampus" / "labels" / name))) > 0
        scores.append(dice(np.isin(freesurfer_labels(segmenter, card, image), labels), truth))
    return scores


def crop_model_scores(names: Sequence[str]) -> List[float]:
    """The bundled crop model, anterior + posterior merged, on the same cases."""
    from Med3DFMLib.segment import load_segmenter, segment_image

    segmenter = load_segmenter("hippocampus-mr-demo", device_name="cpu")
    scores = []
    for name in names:
        image = sitk.ReadImage(str(DATA / "hippocampus" / "images" / name), sitk.sitkFloat32)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "hippocampus" / "labels" / name))) > 0
        scores.append(dice(sitk.GetArrayFromImage(segment_image(image, segmenter)) > 0, truth))
    return scores


def summary(scores: Sequence[float]) -> Dict[str, float]:
    values = np.asarray(scores, dtype=np.float64)
    return {"cases": int(values.size), "mean": round(float(np.nanmean(values)), 4), "std": round(float(np.nanstd(values)), 4),
            "min": round(float(np.nanmin(values)), 4)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a bundled synthetic-brain model (.safetensors from scripts/bundle_synth_brain.py)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--hippocampus-cases", type=int, default=200, help="how many of the 200 MSD crops (sorted by name; 0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-atlas", action="store_true", help="leave out the registration peer")
    parser.add_argument("--mni", type=Path, help="a folder with nilearn's MNI152 2009a T1, GM and WM files: score tissues on the template")
    args = parser.parse_args(argv)

    import torch

    from Med3DFMLib.segment import load_segmenter
    from Med3DFMLib.weights import read_card

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)  # the registration peer gets the same CPUs
    card = read_card(args.model)
    segmenter = load_segmenter(str(args.model), device_name="cpu")
    result: Dict[str, Any] = {"model": {"file": str(args.model), "id": card["id"], "version": card["version"],
                                        "steps": card["training"]["steps"], "hours_trained": round(card["training"]["seconds"] / 3600, 2),
                                        "synthetic_validation_dice": card["metrics"].get("synthetic_validation", card["metrics"])["mean_dice"]},
                              "threads": args.threads, "real_t1": score_real_t1(segmenter, card, not args.no_atlas)}
    if args.mni:
        result["mni_template"] = score_mni(segmenter, card, args.mni)
    if args.hippocampus_cases:
        names = sorted(p.name for p in (DATA / "hippocampus" / "images").glob("hippocampus_*.nii.gz"))[: args.hippocampus_cases]
        test = names[::5]
        synth = dict(zip(names, score_hippocampus(segmenter, card, names)))
        result["hippocampus_crops"] = {
            "all": summary(list(synth.values())),
            "crop_model_test_cases": {"synth-brain": summary([synth[n] for n in test]), "hippocampus-mr-demo": summary(crop_model_scores(test))},
            "note": "Dice of the whole hippocampus (MSD anterior + posterior merged; FreeSurfer 17 or 53 from this model); "
                    "hippocampus-mr-demo was trained on the other 160 crops, this model on none",
        }
        print(f"hippocampus crops: {result['hippocampus_crops']}", flush=True)
    if args.out:
        from Med3DFMLib.io.atomic import write_text_atomic

        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
