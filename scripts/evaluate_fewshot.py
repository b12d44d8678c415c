#!/usr/bin/env python3
"""Evaluate few-shot segmentation (the `med3dfm adapt` adapters) on real data, against baselines.

Writes <out>/fewshot_eval.md (tables), <out>/fewshot_eval.json (every run) and <out>/fewshot_eval.png
(Dice against the number of labelled slices / volumes, per method).

Settings
- Within one volume: for each structure, k = 1, 3, 5 slices are labelled (spread evenly over the
  structure's extent along the slice axis, as a radiologist would paint them); under the sparse-label
  rules every other voxel of a labelled slice is background and unlabelled slices are ignored. Dice is
  scored on all *other* slices of that volume.
- Across volumes (hippocampus crops): dense labels on n = 1, 3, 5 training volumes drawn from the 160
  cases the demo model trained on; Dice (mean of anterior and posterior) on held-out test cases.

Methods (same labels, same scored voxels)
- adapter-pretrained: point adapter (mode "adapter") on the bundled pretrained encoder.
- adapter-random: the same adapter on an encoder of the same architecture with random weights
  (one random encoder per seed).
- prototype: training-free prototypes (mode "prototype") on the pretrained encoder.
- unet: MONAI BasicUNet trained from scratch on the same labels (unlabelled voxels ignored in the loss)
  for the same wall time as adapter-pretrained's adapt time (cold encoder features + training) in
  that setting and seed.
- random-walker: skimage random_walker in 3D seeded with the labelled voxels (within-volume only; it
  needs seeds in the volume it segments).

The adapter runs mirror `run_adapt` step by step in-process (same split, probe then final training,
same prediction), so features are computed once per volume and encoder; one `run_adapt` +
`load_segmenter`/`segment_image` run is compared with the in-process path as a cross-check.

Usage: python scripts/evaluate_fewshot.py [--quick] [--out DIR] [--seeds N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

DATA = Path(os.environ.get("MED3DFM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT_STRUCTURES = "liver,right kidney,hippocampus (brain),brain1 tumour,hippocampus crop"
METHODS = ["this-scan", "decoder", "adapter-pretrained", "adapter-random", "prototype", "unet", "unet-3x", "unet-aug", "unet-aug-3x", "multi-atlas", "random-walker", "fill-between-slices"]
LABELS = {
    "this-scan": "Med3DFM this scan (adapter + outlines + edges)",
    "decoder": "Med3DFM decoder (other patients, budget)",
    "adapter-pretrained": "adapter, pretrained encoder",
    "adapter-random": "adapter, random-init encoder",
    "prototype": "prototype, pretrained encoder",
    "unet": "BasicUNet from scratch (same time)",
    "unet-3x": "BasicUNet from scratch (3× the time)",
    "unet-aug": "BasicUNet from scratch, same training loop and budget",
    "unet-aug-3x": "BasicUNet from scratch, same loop, 3× the budget",
    "multi-atlas": "multi-atlas registration alone (the decoder's votes, no network)",
    "random-walker": "random walker (3D)",
    "fill-between-slices": "Fill between slices (Slicer, ITK)",
}
# The method each comparison is about: within one volume the this-scan path (what `adapt --segment`
# writes), across volumes the adapter itself.
PRIMARY = {"within": "this-scan", "across": "decoder"}
MAX_WORK_VOXELS = 2_000_000  # U-Net and random walker grids above this are downsampled in-plane


# --------------------------------------------------------------------------------------------- data


@dataclass
class Task:
    name: str
    group: str
    image: Path
    labels: Path
    values: Dict[str, Sequence[int]]  # class name → label values of the reference map
    axis: str  # slice axis ("k" = array axis 0, "j" = array axis 1)
    plane: str


def hippocampus_cases() -> Tuple[List[str], List[str]]:
    """(training pool, test set): the demo model's test set is every 5th case by sorted name."""
    names = sorted(p.name for p in (DATA / "hippocampus" / "images").glob("hippocampus_*.nii.gz"))
    test = names[::5]
    return [n for n in names if n not in set(test)], test


def within_tasks(quick: bool, crops_count: int, structures: Optional[Sequence[str]] = None) -> List[Task]:
    ct, seg = DATA / "totalseg" / "example_ct_sm.nii.gz", DATA / "totalseg" / "example_seg.nii.gz"
    classmap = json.loads((DATA / "totalseg" / "classmap.json").read_text())["total"]
    value = {v: int(k) for k, v in classmap.items()}
    brain, aseg = DATA / "brain" / "test_scan_vol.nii.gz", DATA / "brain" / "test_scan_seg.nii.gz"
    lesions = sorted((DATA / "deeplesion").glob("*_img.nii.gz"))[:1]  # none in the tests' small folder
    hippo = DATA / "hippocampus"
    train_pool, _ = hippocampus_cases()
    crops = [train_pool[i] for i in (0, 60, 120) if i < len(train_pool)][: max(1, crops_count)]
    hippo_tasks = [Task(f"hippocampus crop {c[12:15]}", "MR hippocampus crop", hippo / "images" / c, hippo / "labels" / c, {"hippocampus": (1, 2)}, "k", "k voxel axis") for c in crops]
    if quick:
        return hippo_tasks[:1]
    tasks = [
        Task("liver", "CT organ", ct, seg, {"liver": (value["liver"],)}, "k", "axial"),
        Task("spleen", "CT organ", ct, seg, {"spleen": (value["spleen"],)}, "k", "axial"),
        Task("right kidney", "CT organ", ct, seg, {"kidney": (value["kidney_right"],)}, "k", "axial"),
        # The brain volume's array axis 1 is superior-inferior (checked on the aseg extents), so its
        # axial slices are planes of the j voxel axis.
        Task("lateral ventricles", "MR brain", brain, aseg, {"lateral ventricles": (4, 43)}, "j", "axial"),
        Task("thalamus", "MR brain", brain, aseg, {"thalamus": (10, 49)}, "j", "axial"),
        Task("hippocampus (brain)", "MR brain", brain, aseg, {"hippocampus": (17, 53)}, "j", "axial"),
        Task("brain1 tumour", "lesion", DATA / "pyradiomics" / "brain1_image.nrrd", DATA / "pyradiomics" / "brain1_label.nrrd", {"tumour": (1,)}, "k", "axial"),
        *[Task("DeepLesion " + lesion.name[10:16], "lesion", lesion, Path(str(lesion).replace("_img", "_gt")), {"lesion": (1,)}, "k", "axial") for lesion in lesions],
        *hippo_tasks,
    ]
    if structures:
        unknown = [n for n in structures if not any(t.name.startswith(n) for t in tasks)]
        if unknown:
            raise SystemExit(f"unknown structures {unknown}; choose from {[t.name for t in tasks]}")
        tasks = [t for t in tasks if any(t.name.startswith(n) for n in structures)]
    return tasks


def chosen_slices(truth: np.ndarray, axis: int, k: int) -> List[int]:
    """k slices spread evenly over the structure's extent (at the (i+1)/(k+1) points of its range)."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.nonzero(truth.any(axis=other))[0]
    low, high = int(present.min()), int(present.max())
    picks = sorted({int(round(x)) for x in np.linspace(low, high, k + 2)[1:-1]})
    return [p if truth.take(p, axis=axis).any() else int(present[np.argmin(np.abs(present - p))]) for p in picks]


def painted(truth: np.ndarray, axis: int, slices: Sequence[int]) -> Tuple[np.ndarray, Tuple[Any, ...]]:
    """(the structure on the painted slices only, index of the slices scored: all the others)."""
    sparse = np.zeros(truth.shape, dtype=np.uint8)
    index: List[Any] = [slice(None)] * 3
    index[axis] = list(slices)
    sparse[tuple(index)] = truth[tuple(index)]
    scored = np.ones(truth.shape[axis], dtype=bool)
    scored[list(slices)] = False
    index[axis] = scored
    return sparse, tuple(index)


def dice(prediction: np.ndarray, truth: np.ndarray) -> Optional[float]:
    total = int(prediction.sum()) + int(truth.sum())
    if truth.sum() == 0:
        return None
    return float(2 * np.logical_and(prediction, truth).sum() / total)


def normalise(array: np.ndarray) -> np.ndarray:
    low, high = np.percentile(array, [0.5, 99.5])
    return np.clip((array.astype(np.float32) - low) / max(high - low, 1e-6), 0.0, 1.0)


# ------------------------------------------------------------------------------------ few-shot lib


class Lib:
    """The library's few-shot pieces, plus per-(volume, encoder) prepared features."""

    def __init__(self, home: Path, random_seeds: Sequence[int], max_steps: int = 400, encoder: str = "med3dfm-encoder-small", label: str = "pretrained") -> None:
        import torch

        from Med3DFMLib.fewshot import adapt, adapter, labels
        from Med3DFMLib.io.segmentations import LabelVolume, SegmentInfo
        from Med3DFMLib.preprocess import probabilities_to_labels

        self.torch, self.adapt, self.adapter, self.labels = torch, adapt, adapter, labels
        self.LabelVolume, self.SegmentInfo, self.probabilities_to_labels = LabelVolume, SegmentInfo, probabilities_to_labels
        self.device = torch.device("cpu")
        from Med3DFMLib.registry import resolve_model

        self.encoders = {label: adapt.load_encoder(encoder)}
        self.random_files: Dict[int, Path] = {}
        for seed in random_seeds:
            path = self.random_encoder(home, seed, resolve_model(encoder).weights)
            self.random_files[seed] = path
            self.encoders[f"random-{seed}"] = adapt.load_encoder(str(path))
        self.max_steps = max_steps  # run_adapt's default (400); lowered only by --quick
        self.feature_window = adapt.FEATURE_WINDOW
        self.prepared: Dict[Tuple[str, str], Any] = {}
        self.feature_seconds: Dict[Tuple[str, str], float] = {}

    @staticmethod
    def random_encoder(home: Path, seed: int, pretrained: Path) -> Path:
        """A randomly initialised twin of the `pretrained` encoder file: same architecture and
        input spec (spacing, intensity rule), so only the weights differ."""
        import torch

        from Med3DFMLib.models import DualBranchEncoder, EncoderConfig
        from Med3DFMLib.weights import read_weights, write_weights

        _, card = read_weights(pretrained)
        torch.manual_seed(seed)
        module = DualBranchEncoder(EncoderConfig.from_dict(card["architecture"]["encoder"]))
        card = dict(card, id="random-encoder", title="random-init encoder (same architecture)", training={"method": f"none: torch.manual_seed({seed}) initialisation"})
        path = home / f"random-encoder-seed{seed}.safetensors"
        write_weights(path, {k: v.half() for k, v in module.state_dict().items()}, card)
        return path

    def volume(self, image_path: Path, image, encoder_key: str):
        """Prepared features; the first call per (volume, encoder) is timed (cold features)."""
        key = (str(image_path), encoder_key)
        if key not in self.prepared:
            encoder = self.encoders[encoder_key]
            tick = time.perf_counter()
            self.prepared[key] = self.adapt.prepare_volume(image, encoder, encoder.spec, self.device, window=self.feature_window)
            self.feature_seconds[key] = time.perf_counter() - tick
        return self.prepared[key], self.feature_seconds[key]

    def forget(self, image_path: Optional[Path] = None, encoder_key: Optional[str] = None) -> None:
        """Drop the prepared features of a volume and/or an encoder: each is a whole feature pyramid."""
        for key in [k for k in self.prepared if (image_path is None or k[0] == str(image_path)) and (encoder_key is None or k[1] == encoder_key)]:
            del self.prepared[key]

    def supervision(self, image, label_array: np.ndarray, class_names: Sequence[str], dense: bool, axis: str):
        import SimpleITK as sitk

        label_image = sitk.GetImageFromArray(label_array.astype(np.uint8))
        label_image.CopyInformation(image)
        segments = [self.SegmentInfo(i + 1, n, (0.8, 0.3, 0.2)) for i, n in enumerate(class_names)]
        return self.labels.supervision_from_labels(image, self.LabelVolume(label_image, segments), "labels", dense=dense, axis=axis)

    def fit(self, mode: str, images: Sequence[Any], image_paths: Sequence[Path], supervisions: Sequence[Any], encoder_key: str, seed: int):
        """Mirror of run_adapt's training part: (adapter, adapt seconds incl. cold features, detail)."""
        classes = self.labels.merge_classes(supervisions)
        feature_seconds, prepared, train_pts, val_pts, all_pts = 0.0, [], [], [], []
        tick = time.perf_counter()
        for image, path, supervision in zip(images, image_paths, supervisions):
            volume, cold = self.volume(path, image, encoder_key)
            feature_seconds += cold
            prepared.append(volume)
        tick = time.perf_counter()
        for image, volume, supervision in zip(images, prepared, supervisions):
            targets = self.labels.remap(supervision, classes)
            train, held = self.adapt._split(supervision, targets, seed)
            train_pts.append(self.adapt._points(train, image, volume.grid, seed))
            val_pts.append(self.adapt._points(held, image, volume.grid, seed))
            all_pts.append(self.adapt._points(targets, image, volume.grid, seed))
        features = [v.features for v in prepared]
        tensors = [v.padded_image for v in prepared]
        if mode == "prototype":
            model, summary = self.adapter.fit_prototypes(features, tensors, all_pts, len(classes), seed=seed)
            detail = {"prototypes": summary["prototypes"]}
        else:
            _, probe = self.adapter.train_point_adapter(features, tensors, train_pts, val_pts, len(classes), max_steps=self.max_steps, seed=seed)
            model, summary = self.adapter.train_point_adapter(features, tensors, all_pts, [], len(classes), max_steps=probe["best_step"], seed=seed)
            detail = {"best_step": probe["best_step"], "probe_steps": probe["steps"], "held_out_dice": probe["held_out_dice"]}
        train_seconds = time.perf_counter() - tick
        detail.update({"features_s": round(feature_seconds, 3), "train_s": round(train_seconds, 3)})
        return model, feature_seconds + train_seconds, detail

    def segment(self, model, image_path: Path, image, encoder_key: str, supervision=None) -> Tuple[np.ndarray, float, Optional[Tuple[np.ndarray, float, Dict[str, Any]]]]:
        """Label array on the image grid and seconds (features from cache + predict + resample); with the
        `supervision` of this very image also the this-scan labels (run_adapt's `_propagate`), their
        seconds (prediction + propagation) and the propagation's summary."""
        import SimpleITK as sitk

        tick = time.perf_counter()
        volume, _ = self.volume(image_path, image, encoder_key)
        probabilities = self.adapter.predict_dense(model, volume.features, volume.padded_image)
        predicted = time.perf_counter()
        labels = sitk.GetArrayFromImage(self.probabilities_to_labels(probabilities, volume.grid, image))
        seconds = time.perf_counter() - tick
        this_scan = None
        if supervision is not None:
            resampled = time.perf_counter()
            propagated, info = self.adapt._propagate(volume, probabilities, supervision.targets, supervision.axis)
            this_scan = (sitk.GetArrayFromImage(propagated), predicted - tick + time.perf_counter() - resampled, info)
        return labels, seconds, this_scan


# ---------------------------------------------------------------------------------------- U-Net


def work_factor(shape: Sequence[int]) -> int:
    """In-plane downsampling factor (slice axis first) keeping a volume under MAX_WORK_VOXELS."""
    factor = 1
    while int(np.prod(shape)) / factor**2 > MAX_WORK_VOXELS:
        factor += 1
    return factor


def downsample(array: np.ndarray, factor: int, labels: bool = False) -> np.ndarray:
    """Slice axis first; in-plane block mean (image) or subsampling (labels)."""
    if factor == 1:
        return array
    if labels:
        return array[:, factor // 2 :: factor, factor // 2 :: factor]
    d, h, w = array.shape
    h2, w2 = h // factor * factor, w // factor * factor
    trimmed = array[:, :h2, :w2].reshape(d, h2 // factor, factor, w2 // factor, factor)
    return trimmed.mean(axis=(2, 4)).astype(np.float32)


def upsample_probabilities(probabilities: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    if tuple(probabilities.shape[1:]) == tuple(shape):
        return probabilities
    tensor = torch.from_numpy(np.ascontiguousarray(probabilities, dtype=np.float32))[None]
    return F.interpolate(tensor, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)[0].numpy()


def _pad_to(array: np.ndarray, shape: Sequence[int], value: float) -> np.ndarray:
    pads = [(0, max(0, s - a)) for a, s in zip(array.shape, shape)]
    return np.pad(array, pads, constant_values=value)


def _ceil16(n: int) -> int:
    return int(np.ceil(n / 16) * 16)


def train_unet(volumes: Sequence[np.ndarray], targets: Sequence[np.ndarray], num_classes: int, budget_s: float, seed: int):
    """BasicUNet from scratch on (slice-axis-first, normalised) volumes with IGNORE(-1)-masked
    targets, for `budget_s` seconds of wall time. Cross-entropy + soft Dice on labelled voxels only."""
    import torch
    import torch.nn.functional as F
    from monai.networks.nets import BasicUNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=num_classes + 1, features=(16, 16, 32, 64, 128, 16))
    optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    shapes = [v.shape for v in volumes]
    patch = [min(_ceil16(max(s[a] for s in shapes)), (16, 96, 96)[a]) for a in range(3)]
    padded = [(_pad_to(v, [max(p, _ceil16(s)) for p, s in zip(patch, v.shape)], 0.0), _pad_to(t, [max(p, _ceil16(s)) for p, s in zip(patch, t.shape)], -1)) for v, t in zip(volumes, targets)]
    labelled = [np.nonzero((t != -1).reshape(t.shape[0], -1).any(1))[0] for _, t in padded]
    foreground = [np.argwhere(t > 0) for _, t in padded]
    batch = 2
    started, steps, loss_value = time.perf_counter(), 0, float("nan")
    net.train()
    while time.perf_counter() - started < budget_s:
        xs, ys = [], []
        for _ in range(batch):
            v = int(rng.integers(len(padded)))
            image, target = padded[v]
            if len(foreground[v]) and rng.random() < 0.5:
                centre = foreground[v][rng.integers(len(foreground[v]))]
            else:
                centre = np.array([rng.choice(labelled[v]), rng.integers(image.shape[1]), rng.integers(image.shape[2])])
            corner = [int(np.clip(c - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, s - p)) for c, p, s in zip(centre, patch, image.shape)]
            window = tuple(slice(c, c + p) for c, p in zip(corner, patch))
            xs.append(image[window])
            ys.append(target[window])
        x = torch.from_numpy(np.stack(xs)[:, None].astype(np.float32))
        y = torch.from_numpy(np.stack(ys).astype(np.int64))
        known = y != -1
        if not known.any():
            continue
        logits = net(x)
        ce = F.cross_entropy(logits, y.clamp_min(0), reduction="none")[known].mean()
        probs = logits.softmax(1)
        onehot = F.one_hot(y.clamp_min(0), num_classes + 1).permute(0, 4, 1, 2, 3).float()
        mask = known[:, None].float()
        inter = (probs * onehot * mask)[:, 1:].sum((0, 2, 3, 4))
        denom = ((probs + onehot) * mask)[:, 1:].sum((0, 2, 3, 4))
        soft_dice = 1 - ((2 * inter + 1) / (denom + 1)).mean()
        loss = ce + soft_dice
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        steps += 1
        loss_value = loss.item()
    net.eval()
    return net, {"steps": steps, "patch": patch, "final_loss": round(loss_value, 4), "train_s": round(time.perf_counter() - started, 3)}


def unet_predict(net, volume: np.ndarray) -> np.ndarray:
    import torch
    from monai.inferers import sliding_window_inference

    roi = (min(16, _ceil16(volume.shape[0])), min(128, _ceil16(volume.shape[1])), min(128, _ceil16(volume.shape[2])))
    with torch.no_grad():
        logits = sliding_window_inference(torch.from_numpy(volume[None, None].astype(np.float32)), roi, 4, net, overlap=0.25, mode="gaussian")
    return logits[0].softmax(0).numpy()


RANDOM_WALKER_BETA = 500  # the best of 30, 130 (skimage's default), 500 on the development structures (scripts/tune_this_scan.py)


def random_walker_segment(volume: np.ndarray, targets: np.ndarray, spacing: Sequence[float], beta: float = RANDOM_WALKER_BETA) -> np.ndarray:
    """Probabilities (C+1, ...) from skimage's 3D random walker seeded by the labelled voxels."""
    import warnings

    from skimage.segmentation import random_walker

    seeds = np.where(targets == -1, 0, targets + 1).astype(np.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "probability range outside [0, 1] given the tolerance": harmless for the arg-max
        probabilities = random_walker(volume, seeds, beta=beta, mode="cg_j", tol=1e-3, spacing=np.asarray(spacing, dtype=float), return_full_prob=True)
    return probabilities.astype(np.float32)


def _fill_between_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    import itk

    image = itk.image_from_array(np.ascontiguousarray(mask, dtype=np.uint8))
    interpolator = itk.MorphologicalContourInterpolator.New(image)
    interpolator.SetAxis(2 - axis)  # ITK counts axes x, y, z
    interpolator.Update()
    return np.array(itk.array_from_image(interpolator.GetOutput())) > 0


_FILL_POOL: Any = None


def _load_itk_filter() -> None:
    import itk

    itk.MorphologicalContourInterpolator  # ITK's lazy loading takes ~25 s here, once per process


def start_fill_between_slices() -> None:
    """Start the child process and its ITK import early, so it overlaps other work."""
    global _FILL_POOL
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if _FILL_POOL is None:
        _FILL_POOL = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        _FILL_POOL.submit(_load_itk_filter)


def fill_between_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    """Slicer's Fill between slices: ITK's morphological contour interpolation (Albu et al. 2008,
    `itk-morphologicalcontourinterpolation`, the filter Slicer's effect runs) of a 0/1 mask painted on
    slices of array `axis`. It does not extend past the outermost painted slices and needs two.
    Runs in a child process: ITK's Python wrapping and PyTorch in one process have crashed at exit."""
    start_fill_between_slices()
    return _FILL_POOL.submit(_fill_between_slices, mask, axis).result()


# ------------------------------------------------------------------------------------ experiments


def run_within(lib: Lib, tasks: Sequence[Task], ks: Sequence[int], seeds: Sequence[int], proto_seeds: Sequence[int], unet_seeds: Sequence[int], budget_cap: Optional[float], log,
               methods: Sequence[str] = tuple(METHODS), rw_beta: float = RANDOM_WALKER_BETA) -> List[Dict[str, Any]]:
    import SimpleITK as sitk
    import torch

    from Med3DFMLib.fewshot.labels import AXES

    results: List[Dict[str, Any]] = []
    if "fill-between-slices" in methods:
        start_fill_between_slices()
    for task in tasks:
        image = sitk.ReadImage(str(task.image))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(task.labels)))
        class_name = next(iter(task.values))
        truth = np.isin(reference, task.values[class_name])
        axis = AXES[task.axis]
        spacing_zyx = list(image.GetSpacing())[::-1]
        # U-Net / random-walker working arrays: slice axis first, in-plane downsampled if large.
        order = [axis] + [a for a in range(3) if a != axis]
        intensities = np.transpose(sitk.GetArrayFromImage(image).astype(np.float32), order)
        factor = work_factor(intensities.shape)
        work_image = downsample(normalise(intensities), factor)
        work_spacing = [spacing_zyx[order[0]], spacing_zyx[order[1]] * factor, spacing_zyx[order[2]] * factor]
        for k in ks:
            slices = chosen_slices(truth, axis, k)
            sparse, score_index = painted(truth, axis, slices)
            supervision = lib.supervision(image, sparse, [class_name], dense=False, axis=task.axis)
            truth_scored = truth[score_index]
            base = {"setting": "within", "task": task.name, "group": task.group, "k": k, "slices": slices, "slice_axis": task.axis, "plane": task.plane,
                    "labelled_voxels": int(sparse.sum()), "scored_slices": int(truth.shape[axis] - len(set(slices))), "slice_count": int(truth.shape[axis]),
                    "scored_labelled_voxels": int((supervision.targets[score_index] != -1).sum()), "scored_structure_voxels": int(truth_scored.sum())}

            def score(labels: np.ndarray) -> Optional[float]:
                return dice(labels[score_index] == 1, truth_scored)

            def record(method: str, seed: int, adapt_s: float, segment_s: float, value: Optional[float], **extra: Any) -> None:
                row = dict(base, method=method, seed=seed, dice=None if value is None else round(value, 4), adapt_s=round(adapt_s, 3), segment_s=round(segment_s, 3), **extra)
                results.append(row)
                log(f"  {task.name:22s} k={k} {method:18s} seed={seed} dice={row['dice']} adapt={adapt_s:.1f}s segment={segment_s:.1f}s")

            budgets: Dict[int, float] = {}
            for seed in seeds:
                model, adapt_s, detail = lib.fit("adapter", [image], [task.image], [supervision], "pretrained", seed)
                labels, segment_s, this_scan = lib.segment(model, task.image, image, "pretrained", supervision if "this-scan" in methods else None)
                record("adapter-pretrained", seed, adapt_s, segment_s, score(labels), **detail)
                if this_scan is not None:
                    propagated, propagate_s, info = this_scan
                    record("this-scan", seed, adapt_s, propagate_s, score(propagated), solved_voxels=info["solved_voxels"], propagate_s=info["seconds"], **detail)
                budgets[seed] = adapt_s + (this_scan[1] if this_scan is not None else segment_s)
                if "adapter-random" in methods:
                    model, adapt_s, detail = lib.fit("adapter", [image], [task.image], [supervision], f"random-{seed}", seed)
                    labels, segment_s, _ = lib.segment(model, task.image, image, f"random-{seed}")
                    record("adapter-random", seed, adapt_s, segment_s, score(labels), **detail)
            for seed in proto_seeds if "prototype" in methods else []:
                model, adapt_s, detail = lib.fit("prototype", [image], [task.image], [supervision], "pretrained", seed)
                labels, segment_s, _ = lib.segment(model, task.image, image, "pretrained")
                record("prototype", seed, adapt_s, segment_s, score(labels), **detail)
            work_targets = downsample(np.transpose(supervision.targets, order), factor, labels=True)
            for method, multiple in (("unet", 1.0), ("unet-3x", 3.0)):
                if method not in methods:
                    continue
                for seed in unet_seeds:
                    # The budget: the this-scan path's whole time (adapt + segment) in the same setting and seed.
                    budget = multiple * budgets.get(seed, float(np.mean(list(budgets.values()))))
                    if budget_cap is not None:
                        budget = min(budget, budget_cap)
                    net, detail = train_unet([work_image], [work_targets], 1, budget, seed)
                    tick = time.perf_counter()
                    probabilities = upsample_probabilities(unet_predict(net, work_image), intensities.shape)
                    labels = np.transpose(probabilities.argmax(0), np.argsort(order))
                    record(method, seed, detail["train_s"], time.perf_counter() - tick, score(labels), budget_s=round(budget, 3), work_factor=factor, **detail)
            if "random-walker" in methods:
                tick = time.perf_counter()
                probabilities = upsample_probabilities(random_walker_segment(work_image, work_targets, work_spacing, rw_beta), intensities.shape)
                labels = np.transpose(probabilities.argmax(0), np.argsort(order))
                record("random-walker", 0, 0.0, time.perf_counter() - tick, score(labels), work_factor=factor, deterministic=True, beta=rw_beta)
            if "fill-between-slices" in methods:
                tick = time.perf_counter()
                filled = fill_between_slices(supervision.targets == 1, axis)
                record("fill-between-slices", 0, 0.0, time.perf_counter() - tick, score(filled.astype(np.uint8)), deterministic=True)
        lib.forget(task.image)
        torch.set_num_threads(torch.get_num_threads())
    return results


def train_budgeted(kind: str, lib: Lib, images: Sequence[Any], labels: Sequence[np.ndarray], classes: Sequence[str], budget_s: float, seed: int):
    """'decoder' (run_adapt's decoder path) or 'unet' (BasicUNet from scratch in the very same training
    loop: crops, augmentation, loss, schedule, checkpoint choice) on dense labels; returns
    (predict(image) -> labels on the image grid, summary)."""
    import SimpleITK as sitk
    import torch
    from monai.networks.nets import BasicUNet

    from Med3DFMLib.fewshot import decoder as dec

    encoder = lib.encoders["pretrained"]
    spec = encoder.spec
    volumes = [lib.adapt._model_grid_volume(image, label.astype(np.int16), spec)[0] for image, label in zip(images, labels)]
    if kind == "decoder":
        net, summary = dec.train_decoder(encoder.module, volumes, len(classes), classes, budget_s, seed=seed)

        def model_predict(array: np.ndarray) -> np.ndarray:
            return dec.predict_volume(encoder.module, net, array)
    else:
        from monai.inferers import sliding_window_inference

        torch.manual_seed(seed)
        unet = BasicUNet(spatial_dims=3, in_channels=1, out_channels=len(classes) + 1, features=(16, 32, 64, 128, 256, 16))

        def model_predict(array: np.ndarray) -> np.ndarray:
            roi = [min(int(np.ceil(a / 16) * 16), 96) for a in array.shape]
            with torch.no_grad():
                logits = sliding_window_inference(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None], roi, 2, unet, overlap=0.25, mode="gaussian", padding_mode="replicate")
            return logits[0].softmax(0).numpy()

        net, summary = dec.train_segmenter(unet, unet, model_predict, volumes, len(classes), classes, budget_s, 16, seed=seed)
        summary["trainable_parameters"] = int(sum(p.numel() for p in unet.parameters()))

    def predict(image) -> np.ndarray:
        array, grid = lib.adapt.to_model_input(image, spec)
        return sitk.GetArrayFromImage(lib.probabilities_to_labels(model_predict(array), grid, image))

    return predict, summary


def multi_atlas(lib: Lib, images: Sequence[Any], labels: Sequence[np.ndarray], num_classes: int):
    """Classical multi-atlas label fusion with the decoder's own registration (fewshot.registration):
    every labelled volume registered onto the test scan, locally weighted votes, no network. The
    baseline that says what the decoder adds to its votes. Returns (predict, set-up seconds)."""
    import SimpleITK as sitk

    from Med3DFMLib.fewshot import registration

    started = time.perf_counter()
    spec = lib.encoders["pretrained"].spec
    volumes = [lib.adapt._model_grid_volume(image, label.astype(np.int16), spec)[0] for image, label in zip(images, labels)]
    atlases = [registration.make_atlas(v.image, v.targets, v.spacing_zyx) for v in volumes]

    def predict(image) -> np.ndarray:
        array, grid = lib.adapt.to_model_input(image, spec)
        fraction = registration.votes(array, tuple(reversed(grid.GetSpacing())), atlases, num_classes)
        return sitk.GetArrayFromImage(lib.probabilities_to_labels(fraction, grid, image))

    return predict, time.perf_counter() - started


def run_across(lib: Lib, ns: Sequence[int], seeds: Sequence[int], proto_seeds: Sequence[int], unet_seeds: Sequence[int], test_count: int, budget_cap: Optional[float], pretrain_names: set, log,
               methods: Sequence[str] = tuple(METHODS), budget_minutes: float = 2.0) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    import SimpleITK as sitk

    pool, test = hippocampus_cases()
    unseen = [t for t in test if t not in pretrain_names]
    chosen_test = [unseen[i] for i in np.linspace(0, len(unseen) - 1, min(test_count, len(unseen))).round().astype(int)]
    folder = DATA / "hippocampus"
    classes = ["anterior hippocampus", "posterior hippocampus"]

    def load(name: str):
        image = sitk.ReadImage(str(folder / "images" / name))
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels" / name))).astype(np.uint8)
        return image, labels

    tests = {name: load(name) for name in chosen_test}
    test_work = {name: normalise(sitk.GetArrayFromImage(image)) for name, (image, _) in tests.items()}

    def case_dice(labels: np.ndarray, truth: np.ndarray) -> float:
        return float(np.mean([dice(labels == c, truth == c) or 0.0 for c in (1, 2)]))

    results: List[Dict[str, Any]] = []
    info = {"test_cases": chosen_test, "training_draws": {}}
    for seed in seeds:
        draw = list(np.random.default_rng(1000 + seed).permutation(len(pool)))
        for n in ns:
            train_names = [pool[i] for i in draw[:n]]
            info["training_draws"][f"seed{seed}-n{n}"] = train_names
            loaded = [load(name) for name in train_names]
            paths = [folder / "images" / name for name in train_names]
            supervisions = [lib.supervision(image, labels, classes, dense=True, axis="auto") for image, labels in loaded]
            base = {"setting": "across", "task": "hippocampus (anterior+posterior)", "n": n, "seed": seed, "train_cases": train_names, "test_cases": len(chosen_test)}

            def record(method: str, adapt_s: float, segment_s: float, scores: List[float], **extra: Any) -> None:
                row = dict(base, method=method, dice=round(float(np.mean(scores)), 4), dice_case_std=round(float(np.std(scores)), 4), adapt_s=round(adapt_s, 3), segment_s_per_case=round(segment_s / len(scores), 3), **extra)
                results.append(row)
                log(f"  across n={n} {method:18s} seed={seed} dice={row['dice']} adapt={adapt_s:.1f}s segment/case={row['segment_s_per_case']:.2f}s")

            budget_s = budget_minutes * 60.0 if budget_cap is None else min(budget_minutes * 60.0, budget_cap)
            for method, kind, multiple in (("decoder", "decoder", 1.0), ("unet-aug", "unet", 1.0), ("unet-aug-3x", "unet", 3.0)):
                if method not in methods or (method == "unet-aug-3x" and seed not in unet_seeds):
                    continue
                predict, detail = train_budgeted(kind, lib, [i for i, _ in loaded], [l for _, l in loaded], classes, multiple * budget_s, seed)
                scores, tick = [], time.perf_counter()
                for name, (image, truth) in tests.items():
                    scores.append(case_dice(predict(image), truth))
                detail = {k: v for k, v in detail.items() if k not in ("history", "augmentation")}
                record(method, detail["seconds"], time.perf_counter() - tick, scores, **detail)
            if "multi-atlas" in methods:
                predict, adapt_s = multi_atlas(lib, [i for i, _ in loaded], [l for _, l in loaded], len(classes))
                scores, tick = [], time.perf_counter()
                for name, (image, truth) in tests.items():
                    scores.append(case_dice(predict(image), truth))
                record("multi-atlas", adapt_s, time.perf_counter() - tick, scores)
            budget = None
            for method, mode, key in (("adapter-pretrained", "adapter", "pretrained"), ("adapter-random", "adapter", f"random-{seed}"), ("prototype", "prototype", "pretrained")):
                if method not in methods or (method == "prototype" and seed not in proto_seeds):
                    continue
                model, adapt_s, detail = lib.fit(mode, [i for i, _ in loaded], paths, supervisions, key, seed)
                if method == "adapter-pretrained":
                    budget = adapt_s
                scores, seconds = [], 0.0
                for name, (image, truth) in tests.items():
                    labels, s, _ = lib.segment(model, folder / "images" / name, image, key)
                    seconds += s
                    scores.append(case_dice(labels, truth))
                record(method, adapt_s, seconds, scores, **detail)
            if seed in unet_seeds and "unet" in methods and budget is not None:
                if budget_cap is not None:
                    budget = min(budget, budget_cap)
                net, detail = train_unet([normalise(sitk.GetArrayFromImage(i)) for i, _ in loaded], [l.astype(np.int16) for _, l in loaded], 2, budget, seed)
                scores, tick = [], time.perf_counter()
                for name, (_, truth) in tests.items():
                    scores.append(case_dice(unet_predict(net, test_work[name]).argmax(0), truth))
                record("unet", detail["train_s"], time.perf_counter() - tick, scores, budget_s=round(budget, 3), **detail)
    # Reference: the bundled demo segmentation model (trained on all 160 training cases).
    try:
        from Med3DFMLib.segment import load_segmenter, segment_image

        segmenter = load_segmenter("hippocampus-mr-demo", device_name="cpu")
        scores, tick = [], time.perf_counter()
        for name, (image, truth) in tests.items():
            scores.append(case_dice(sitk.GetArrayFromImage(segment_image(image, segmenter)), truth))
        info["demo_model"] = {"dice": round(float(np.mean(scores)), 4), "dice_case_std": round(float(np.std(scores)), 4), "segment_s_per_case": round((time.perf_counter() - tick) / len(scores), 3), "train_cases": len(pool)}
        log(f"  demo model hippocampus-mr-demo: dice={info['demo_model']['dice']}")
    except Exception as err:  # the reference is optional: report, do not fail
        info["demo_model"] = {"error": f"{type(err).__name__}: {err}"}
    for name in list(tests):
        lib.forget(folder / "images" / name)
    return results, info


def cross_check(lib: Lib, home: Path, log) -> Dict[str, Any]:
    """The public path (run_adapt → adapter file → load_segmenter/segment_image) on one small case,
    compared with the in-process path used everywhere else."""
    import SimpleITK as sitk

    from Med3DFMLib.fewshot.adapt import run_adapt

    pool, _ = hippocampus_cases()
    name = pool[0]
    image_path, labels_path = DATA / "hippocampus" / "images" / name, DATA / "hippocampus" / "labels" / name
    image = sitk.ReadImage(str(image_path))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path))) > 0
    slices = chosen_slices(truth, 0, 3)
    sparse = np.zeros(truth.shape, dtype=np.uint8)
    sparse[slices] = truth[slices]
    sparse_image = sitk.GetImageFromArray(sparse)
    sparse_image.CopyInformation(image)
    sparse_path = home / "crosscheck_labels.nii.gz"
    sitk.WriteImage(sparse_image, str(sparse_path))
    scored = np.ones(truth.shape[0], bool)
    scored[slices] = False
    out: Dict[str, Any] = {"case": name, "slices": slices}
    try:
        record = run_adapt([(image_path, sparse_path)], "crosscheck", home / "crosscheck.safetensors", mode="adapter", axis="k", device_name="cpu", seed=0)
        from Med3DFMLib.segment import load_segmenter, segment_image

        segmenter = load_segmenter(str(home / "crosscheck.safetensors"), device_name="cpu")
        labels = sitk.GetArrayFromImage(segment_image(image, segmenter)) == 1
        out["run_adapt_dice"] = round(dice(labels[scored], truth[scored]) or 0.0, 4)
        out["run_adapt_timings_s"] = record["timings_s"]
    except Exception as err:
        out["run_adapt_error"] = "".join(traceback.format_exception_only(type(err), err)).strip()
    supervision = lib.supervision(image, sparse, ["hippocampus"], dense=False, axis="k")
    model, _, _ = lib.fit("adapter", [image], [image_path], [supervision], "pretrained", 0)
    labels, _, _ = lib.segment(model, image_path, image, "pretrained")
    out["in_process_dice"] = round(dice(labels[scored] == 1, truth[scored]) or 0.0, 4)
    # Can an adapter trained on an encoder given as a file be applied again with load_segmenter?
    if not lib.random_files:
        out["file_encoder_adapter_reload"] = "not checked (no random-init encoder in this run: adapter-random not among --methods)"
        log(f"  cross-check: {out}")
        return out
    try:
        run_adapt([(image_path, sparse_path)], "crosscheck-random", home / "crosscheck-random.safetensors", mode="prototype", axis="k", encoder_spec=str(lib.random_files[min(lib.random_files)]), device_name="cpu", seed=0)
        from Med3DFMLib.segment import load_segmenter

        load_segmenter(str(home / "crosscheck-random.safetensors"), device_name="cpu")
        out["file_encoder_adapter_reload"] = "ok"
    except Exception as err:
        out["file_encoder_adapter_reload"] = "".join(traceback.format_exception_only(type(err), err)).strip()
    log(f"  cross-check: {out}")
    return out


# -------------------------------------------------------------------------------------- reporting


def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return float(np.mean(values)), float(np.std(values)), len(values)


def fmt(values: Sequence[Optional[float]], digits: int = 3) -> str:
    mean, std, n = mean_std(values)
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def summarise(within: List[Dict[str, Any]], across: List[Dict[str, Any]]) -> Dict[str, Any]:
    summary: Dict[str, Any] = {"within": {}, "across": {}}
    for row in within:
        summary["within"].setdefault(row["task"], {}).setdefault(str(row["k"]), {}).setdefault(row["method"], []).append(row)
    for row in across:
        summary["across"].setdefault(str(row["n"]), {}).setdefault(row["method"], []).append(row)
    return summary


def comparisons(within: List[Dict[str, Any]], across: List[Dict[str, Any]]) -> List[str]:
    """Plain statements: where the primary method (PRIMARY) beats each other method and where it does not."""
    lines = []
    for setting, rows, key in (("within", within, "k"), ("across", across, "n")):
        primary = PRIMARY[setting]
        groups: Dict[Tuple[str, str], Dict[str, List[float]]] = {}
        for row in rows:
            task = row["task"] if setting == "within" else "hippocampus across volumes"
            groups.setdefault((task, f"{key}={row[key]}"), {}).setdefault(row["method"], []).append(row["dice"])
        for other in METHODS:
            if other == primary:
                continue
            wins, losses, ties, lost_at, gaps = 0, 0, 0, [], []
            for (task, label), by_method in groups.items():
                a, b = mean_std(by_method.get(primary, [])), mean_std(by_method.get(other, []))
                if a[0] is None or b[0] is None:
                    continue
                gaps.append(a[0] - b[0])
                margin = max(0.02, (a[1] or 0.0) + (b[1] or 0.0))
                if a[0] > b[0] + margin:
                    wins += 1
                elif a[0] < b[0] - margin:
                    losses += 1
                    lost_at.append(f"{task} {label} ({a[0]:.2f} vs {b[0]:.2f})")
                else:
                    ties += 1
            total = wins + losses + ties
            if total:
                higher = sum(g > 0 for g in gaps)
                text = (f"- {setting}: **{LABELS[primary]}** vs **{LABELS[other]}**: higher mean Dice in {higher}/{total} settings (mean gap {np.mean(gaps):+.3f}); "
                        f"clearly better in {wins}/{total}, clearly worse in {losses}/{total}, within noise in {ties}/{total}")
                text += (": worse at " + "; ".join(lost_at) + ".") if lost_at else "."
                lines.append(text)
    return lines


def write_report(out: Path, payload: Dict[str, Any]) -> None:
    within, across = payload["within"], payload["across"]
    methods_present = [m for m in METHODS if any(r["method"] == m for r in within)]  # the within-volume tables
    lines = ["# Few-shot segmentation: evaluation on real data", ""]
    lines.append(f"Generated by `scripts/evaluate_fewshot.py{' --quick' if payload['config']['quick'] else ''}` on {payload['config']['machine']} "
                 f"(CPU, {payload['config']['torch_threads']} torch threads); wall time {payload['config']['wall_s'] / 60:.1f} min. Raw runs: `fewshot_eval.json`; plot: `fewshot_eval.png`.")
    lines.append("")
    lines.append("Dice = mean ± std over seeds (std over seeds, not over cases). Methods see the same labelled voxels and are scored on the same voxels.")
    lines.append("")
    cfg = payload["config"]
    lines.append(f"Seeds: adapters {cfg['seeds']}; prototypes {cfg['proto_seeds']}; U-Net {cfg['unet_seeds']}; random walker is deterministic (one run). "
                 "adapter-random uses a different random-init encoder per seed.")
    lines.append("")
    lines.append("## Within one volume (k labelled slices, Dice on all other slices)")
    lines.append("")
    lines.append("| structure | plane | k | " + " | ".join(LABELS[m] for m in methods_present) + " |")
    lines.append("|---|---|---|" + "---|" * len(methods_present))
    tasks = list(dict.fromkeys(r["task"] for r in within))
    for task in tasks:
        for k in sorted({r["k"] for r in within if r["task"] == task}):
            rows = [r for r in within if r["task"] == task and r["k"] == k]
            cells = [fmt([r["dice"] for r in rows if r["method"] == m]) for m in methods_present]
            lines.append(f"| {task} | {rows[0]['plane']} | {k} | " + " | ".join(cells) + " |")
    lines.append("")
    if within:
        lines.append("Mean over structures (each structure's seed-mean, then mean ± std across structures):")
        lines.append("")
        lines.append("| k | " + " | ".join(LABELS[m] for m in methods_present) + " |")
        lines.append("|---|" + "---|" * len(methods_present))
        for k in sorted({r["k"] for r in within}):
            cells = []
            for m in methods_present:
                per_task = [mean_std([r["dice"] for r in within if r["task"] == t and r["k"] == k and r["method"] == m])[0] for t in tasks]
                cells.append(fmt(per_task))
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("### Time per run, within one volume (seconds, mean over all structures, k and seeds)")
        lines.append("")
        lines.append("adapt = encoder features for that volume (cold, first adapt on it) + training; U-Net: training (its budget = adapter-pretrained's adapt time of the same setting and seed); random walker: all of its time is under segment.")
        lines.append("")
        lines.append("| method | adapt (s) | segment (s) | adapt + segment (s) | ours (adapter-pretrained) ÷ this, adapt + segment |")
        lines.append("|---|---|---|---|---|")
        ours = [r["adapt_s"] + r["segment_s"] for r in within if r["method"] == "adapter-pretrained"]
        for m in methods_present:
            rows = [r for r in within if r["method"] == m]
            total = [r["adapt_s"] + r["segment_s"] for r in rows]
            ratio = f"{np.mean(ours) / np.mean(total):.2f}" if rows and ours else "n/a"
            lines.append(f"| {LABELS[m]} | {np.mean([r['adapt_s'] for r in rows]):.2f} | {np.mean([r['segment_s'] for r in rows]):.2f} | {np.mean(total):.2f} | {ratio} |")
        lines.append("")
        lines.append("Per structure (adapter-pretrained adapt / segment vs U-Net train / segment, seconds, mean over k and seeds):")
        lines.append("")
        lines.append("| structure | image grid | adapter adapt | adapter segment | U-Net train | U-Net segment | U-Net steps | ours ÷ U-Net (adapt + segment) | random walker |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for task in tasks:
            a = [r for r in within if r["task"] == task and r["method"] == "adapter-pretrained"]
            u = [r for r in within if r["task"] == task and r["method"] == "unet"]
            w = [r for r in within if r["task"] == task and r["method"] == "random-walker"]
            grid = payload["grids"].get(task, "")
            if a and u:
                ratio = np.mean([r["adapt_s"] + r["segment_s"] for r in a]) / np.mean([r["adapt_s"] + r["segment_s"] for r in u])
                lines.append(f"| {task} | {grid} | {np.mean([r['adapt_s'] for r in a]):.1f} | {np.mean([r['segment_s'] for r in a]):.1f} | {np.mean([r['adapt_s'] for r in u]):.1f} | {np.mean([r['segment_s'] for r in u]):.1f} | {np.mean([r['steps'] for r in u]):.0f} | {ratio:.2f} | {np.mean([r['segment_s'] for r in w]):.1f} |")
        lines.append("")
    lines.append("## Across volumes (hippocampus crops, dense labels on n training volumes)")
    lines.append("")
    info = payload.get("across_info", {})
    if across:
        lines.append(f"Test: {len(info.get('test_cases', []))} of the 40 test cases (every 5th case by sorted name), taken from those *not* in the encoder's pretraining list; "
                     "Dice = mean of anterior and posterior, averaged over test cases; training volumes are a fresh random draw from the 160 training cases per seed (nested: 1 ⊂ 3 ⊂ 5). "
                     "The random walker does not apply here (it needs seeds in the volume it segments).")
        lines.append("")
        across_methods = [m for m in METHODS if any(r["method"] == m for r in across)]
        lines.append("| n volumes | " + " | ".join(LABELS[m] for m in across_methods) + " |")
        lines.append("|---|" + "---|" * len(across_methods))
        for n in sorted({r["n"] for r in across}):
            cells = [fmt([r["dice"] for r in across if r["n"] == n and r["method"] == m]) for m in across_methods]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("| method | adapt (s) | segment per test case (s) |")
        lines.append("|---|---|---|")
        for m in across_methods:
            rows = [r for r in across if r["method"] == m]
            lines.append(f"| {LABELS[m]} | {np.mean([r['adapt_s'] for r in rows]):.2f} | {np.mean([r['segment_s_per_case'] for r in rows]):.3f} |")
        lines.append("")
        demo = info.get("demo_model", {})
        if "dice" in demo:
            lines.append(f"Reference: the bundled demo model `hippocampus-mr-demo` (trained on all {demo['train_cases']} training cases) scores {demo['dice']:.3f} on the same test cases ({demo['segment_s_per_case']:.2f} s per case).")
        elif demo:
            lines.append(f"Reference demo model could not be run: {demo.get('error')}")
        lines.append("")
    else:
        lines.append("Not run.")
        lines.append("")
    lines.append("## Where Med3DFM beats the baselines and where it does not")
    lines.append("")
    lines.append(f"Within one volume the method compared is `{PRIMARY['within']}` (what `med3dfm adapt --segment` writes for the painted scan), across volumes `{PRIMARY['across']}`. "
                 "Per setting (structure × k, and hippocampus × n), 'higher' compares the seed-means; 'clearly' means they differ by more than the sum of the two seed stds and by at least 0.02 Dice.")
    lines.append("")
    lines.extend(comparisons(within, across))
    lines.append("")
    lines.append("## Notes and limits")
    lines.append("")
    lines.extend(f"- {note}" for note in payload["notes"])
    check = payload.get("cross_check", {})
    if check:
        lines.append(f"- Cross-check of the in-process path against the public API (`run_adapt` → adapter file → `load_segmenter` + `segment_image`) on {check.get('case')} with 3 slices: "
                     f"in-process Dice {check.get('in_process_dice')}, public path Dice {check.get('run_adapt_dice', check.get('run_adapt_error'))}.")
        lines.append(f"- Re-applying an adapter whose encoder was given as a file (here the random-init encoder) with `load_segmenter`: {check.get('file_encoder_adapter_reload')}.")
    (out / "fewshot_eval.md").write_text("\n".join(lines) + "\n")


def write_plot(out: Path, payload: Dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    within, across = payload["within"], payload["across"]
    tasks = list(dict.fromkeys(r["task"] for r in within))
    panels = tasks + (["mean over structures"] if len(tasks) > 1 else []) + (["hippocampus across volumes"] if across else [])
    cols = min(4, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    colours = {m: plt.get_cmap("tab20")(i * 2 % 20 + i * 2 // 20) for i, m in enumerate(METHODS)}
    for ax, panel in zip(axes.ravel(), panels):
        for m in METHODS:
            if panel == "hippocampus across volumes":
                xs = sorted({r["n"] for r in across if r["method"] == m})
                stats = [mean_std([r["dice"] for r in across if r["n"] == x and r["method"] == m]) for x in xs]
                ax.set_xlabel("labelled volumes")
            elif panel == "mean over structures":
                xs = sorted({r["k"] for r in within if r["method"] == m})
                stats = [mean_std([mean_std([r["dice"] for r in within if r["task"] == t and r["k"] == x and r["method"] == m])[0] for t in tasks]) for x in xs]
                ax.set_xlabel("labelled slices")
            else:
                xs = sorted({r["k"] for r in within if r["task"] == panel and r["method"] == m})
                stats = [mean_std([r["dice"] for r in within if r["task"] == panel and r["k"] == x and r["method"] == m]) for x in xs]
                ax.set_xlabel("labelled slices")
            points = [(x, s[0], s[1]) for x, s in zip(xs, stats) if s[0] is not None]
            if points:
                ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3, label=LABELS[m], color=colours[m])
        ax.set_title(panel, fontsize=10)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Dice")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    legend: Dict[str, Any] = {}
    for ax in axes.ravel():
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend.keys())
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(out / "fewshot_eval.png", dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main


def merge_reports(paths: Sequence[Path], out: Path) -> int:
    """One report from runs of separate parts: rows, grids and notes joined, configs listed."""
    payloads = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(payloads[0])
    merged["within"] = [r for p in payloads for r in p["within"]]
    merged["across"] = [r for p in payloads for r in p["across"]]
    merged["grids"] = {k: v for p in payloads for k, v in p.get("grids", {}).items()}
    merged["across_info"] = next((p["across_info"] for p in payloads if p.get("across_info")), {})
    merged["cross_check"] = next((p["cross_check"] for p in payloads if p.get("cross_check")), {})
    merged["notes"] = list(dict.fromkeys(n for p in payloads for n in p["notes"]))
    merged["notes"].append(f"Merged from {len(payloads)} runs on the same machine (one torch thread each; side by side or one after the other): "
                           + "; ".join(f"{Path(p).name}: {len(q['within'])} within / {len(q['across'])} across rows, {q['config']['wall_s'] / 60:.0f} min" for p, q in zip(paths, payloads)) + ".")
    merged["config"] = dict(payloads[0]["config"], wall_s=max(p["config"]["wall_s"] for p in payloads), parts=[p["config"] for p in payloads])
    out.mkdir(parents=True, exist_ok=True)
    (out / "fewshot_eval.json").write_text(json.dumps(merged, indent=1) + "\n")
    write_report(out, merged)
    write_plot(out, merged)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: one hippocampus crop, 1 seed, short U-Net budget")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="output folder (default: docs/)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds for the two adapters (pretrained, random-init)")
    parser.add_argument("--proto-seeds", type=int, default=1, help="seeds for the prototype mode")
    parser.add_argument("--unet-seeds", type=int, default=1, help="seeds for the U-Net")
    parser.add_argument("--structures", default=DEFAULT_STRUCTURES, help=f"comma-separated structure names (prefixes) for the within-volume part, or 'all' (default: {DEFAULT_STRUCTURES})")
    parser.add_argument("--crops", type=int, default=1, help="hippocampus crops evaluated within one volume (1..3)")
    parser.add_argument("--n-volumes", default="1,3,5", help="across volumes: the numbers of labelled training volumes (default 1,3,5; draws are nested, so a subset repeats those settings' draws)")
    parser.add_argument("--test-cases", type=int, default=10, help="hippocampus test cases scored across volumes")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated methods to run (default: all of {', '.join(METHODS)})")
    parser.add_argument("--parts", default="within,across", help="within, across or both (default)")
    parser.add_argument("--budget-minutes", type=float, default=2.0, help="across volumes: the decoder's and the augmented U-Net's training budget (default 2)")
    parser.add_argument("--rw-beta", type=float, default=RANDOM_WALKER_BETA, help=f"random walker beta (default {RANDOM_WALKER_BETA}, chosen on the development structures)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 by default: on a shared 2-core machine 2 threads made adapter training ~10x slower)")
    parser.add_argument("--report-from", type=Path, nargs="+", help="no runs: merge these fewshot_eval.json files (e.g. a within-only and an across-only run made in parallel) and write the report")
    args = parser.parse_args(argv)
    if args.report_from:
        return merge_reports(args.report_from, args.out)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
    parts = {p.strip() for p in args.parts.split(",")}

    started = time.perf_counter()
    own_home = None
    if not os.environ.get("MED3DFM_HOME"):
        own_home = tempfile.mkdtemp(prefix="med3dfm-eval-")
        os.environ["MED3DFM_HOME"] = own_home
        import atexit

        atexit.register(shutil.rmtree, own_home, True)  # also on errors
    home = Path(os.environ["MED3DFM_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    quick = args.quick
    seeds = list(range(1 if quick else args.seeds))
    proto_seeds = list(range(1 if quick else args.proto_seeds))
    unet_seeds = list(range(1 if quick else args.unet_seeds))
    ks = [1] if quick else [1, 3, 5]
    ns = [1] if quick else [int(n) for n in args.n_volumes.split(",") if n.strip()]
    test_count = 1 if quick else args.test_cases
    budget_cap = 2.0 if quick else None

    from Med3DFMLib.weights import read_weights
    from Med3DFMLib.resources import resources_dir

    _, encoder_card = read_weights(resources_dir() / "models" / "med3dfm-encoder-small.safetensors")
    pretrain_names = {Path(n).name for n in encoder_card.get("training", {}).get("data", {}).get("names", [])}

    log("loading encoders (pretrained + random-init)")
    lib = Lib(home, seeds if "adapter-random" in methods else [], max_steps=60 if quick else 400)
    tasks = within_tasks(quick, args.crops, None if args.structures == "all" else [n.strip() for n in args.structures.split(",") if n.strip()])
    import SimpleITK as sitk

    grids = {}
    for task in tasks:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(task.image))
        reader.ReadImageInformation()
        size = reader.GetSize()
        spacing = reader.GetSpacing()
        grids[task.name] = "×".join(str(s) for s in size) + " @ " + "×".join(f"{s:.2g}" for s in spacing) + " mm"
    log(f"within-volume: {len(tasks)} structures, k={ks}, seeds={seeds}, U-Net seeds={unet_seeds}")
    within = run_within(lib, tasks, ks, seeds, proto_seeds, unet_seeds, budget_cap, log, methods, args.rw_beta) if "within" in parts else []
    log(f"across volumes: n={ns}, {test_count} test cases, budget {args.budget_minutes} min")
    across, across_info = run_across(lib, ns, seeds, proto_seeds, unet_seeds, test_count, budget_cap, pretrain_names, log, methods, args.budget_minutes) if "across" in parts else ([], {})
    check = {} if quick else cross_check(lib, home, log)

    seen = sorted({t.image.name for t in tasks if t.image.name in pretrain_names or str(t.image) in pretrain_names})
    factors = {r["task"]: r["work_factor"] for r in within if r["method"] == "random-walker"}
    downsampled = [f"{t} (in-plane ÷{f})" for t, f in factors.items() if f > 1]
    notes = [
        "The pretrained encoder's self-supervised pretraining (no labels; see the encoder's card for its steps and time) used these very images: "
        + ", ".join(seen) + " are all in its pretraining list. The within-volume numbers are therefore transductive for the pretrained encoder (it has seen the unlabelled image); across volumes the test cases were chosen outside its pretraining list.",
        "CT organ labels are TotalSegmentator pseudo-labels, not manual truth; the CT example is a 30-slice 3 mm crop in which liver and spleen run through every slice.",
        "Only one labelled volume exists for the CT organs, the brain structures and each lesion, so those are evaluated within one volume only; across-volume learning is evaluated on the hippocampus crops only.",
        "Slices: k slices at the (i+1)/(k+1) points of the structure's extent along the slice axis (axial for CT, lesions and the brain, whose axial plane is the j voxel axis; the k voxel axis for the hippocampus crops, whose anatomical orientation is not recorded). "
        "Scored slices are all other slices of the volume, including those where the structure is absent (false positives count).",
        "U-Net and random walker run on the image grid" + (f", downsampled in-plane (slice axis kept, so labelled slices stay intact) for volumes above {MAX_WORK_VOXELS / 1e6:.0f} M voxels: " + ", ".join(downsampled) + "; their probabilities are upsampled linearly to the full grid before scoring." if downsampled else "."),
        "Across volumes, `decoder` is `med3dfm adapt --mode decoder` (Med3DFMLib.fewshot.decoder over the frozen pretrained encoder) and `unet-aug` / `unet-aug-3x` a MONAI BasicUNet (features 16, 32, 64, 128, 256, 16) from scratch trained by the very same loop (crops, MONAI augmentation, cross-entropy + Dice, cosine schedule over the budget, checkpoint choice on a held-out volume from 4 volumes on) for the same budget or three times it; only the network differs. Both run on the encoder's 1.25 mm grid. From 2 labelled volumes on the decoder also registers them onto each test scan and pools with their votes (Med3DFMLib.fewshot.registration); `multi-atlas` is those votes alone, every labelled volume (also the one the decoder holds out) registered onto the test scan, no network: the classical baseline that says what the decoder adds. Its time is all under segment.",
        "U-Net (within one volume, and `unet` across volumes): MONAI BasicUNet, features (16, 16, 32, 64, 128, 16), AdamW 3e-3, batch 2 patches of up to 16 slices × 96 × 96 (centred on a labelled foreground voxel half of the time), cross-entropy + soft Dice over labelled voxels only, no augmentation; trained for exactly the adapter's adapt wall time, inferred with a sliding window. On 2 shared CPU cores that budget is only tens to a few hundred steps: this measures what a from-scratch U-Net reaches in the time our adapter needs, not what it reaches given hours.",
        f"Random walker: skimage random_walker(beta={args.rw_beta:g}, mode='cg_j', tol=1e-3, voxel spacing honoured) on percentile-normalised intensities; labelled voxels are seeds (structure and background); unlabelled slices are free. "
        "beta was chosen among 30, 130 (skimage's default) and 500 on development structures the evaluation does not score (scripts/tune_this_scan.py), as were the this-scan path's parameters.",
        "This scan (`this-scan`): the adapter of `adapter-pretrained` (same seed), then Med3DFMLib.fewshot.propagate on the image grid: the painted outlines interpolated between painted slices, pooled with the adapter's probabilities, and a random walker with that evidence as its data term; painted voxels are seeds. Its time is the adapter's adapt time plus prediction and propagation; the U-Net's budget is that whole time (`unet`) or three times it (`unet-3x`).",
        "Fill between slices: ITK's MorphologicalContourInterpolator (the filter behind Slicer's Segment Editor effect) on the painted slices; it fills only between painted slices (k = 1 gives nothing, and nothing beyond the outermost painted slices).",
        "Adapter and prototype runs reproduce run_adapt's steps in-process (same _split, probe + final training, predict_dense, probabilities_to_labels) so that features are computed once per volume and encoder; adapt time counts those cold features once per run, as a first `med3dfm adapt` on a new volume pays them (later adapts on the same volume hit the feature cache and take only the training time).",
        f"Timings are wall-clock on {platform.machine()} with {os.cpu_count()} CPUs and {torch.get_num_threads()} torch threads; other jobs on the machine slow them down, so treat them as indicative (±30 %) and compare methods within one run.",
    ]
    skipped = [t.name for t in within_tasks(False, 3) if t.name not in {x.name for x in tasks}]
    if skipped and not quick:
        notes.insert(0, f"Not run in this invocation, to keep the whole evaluation within ~25 min on a shared 2-core CPU: {', '.join(skipped)} (run with `--structures all --crops 3` to include them). "
                     f"Seeds were cut for the same reason: {len(seeds)} for each adapter, {len(proto_seeds)} for prototypes, {len(unet_seeds)} for the U-Net.")
    if quick:
        notes.insert(0, "QUICK smoke run: one hippocampus crop, k = 1, one seed, adapter training capped at 60 steps, U-Net budget capped at 2 s, 1 test case: not a result.")
    payload = {
        "config": {"quick": quick, "seeds": seeds, "proto_seeds": proto_seeds, "unet_seeds": unet_seeds, "ks": ks, "ns": ns, "test_cases": test_count,
                   "torch_threads": torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "wall_s": 0.0},
        "grids": grids,
        "within": within,
        "across": across,
        "across_info": across_info,
        "cross_check": check,
        "notes": notes,
    }
    payload["config"]["wall_s"] = round(time.perf_counter() - started, 1)
    (args.out / "fewshot_eval.json").write_text(json.dumps(payload, indent=1) + "\n")
    write_report(args.out, payload)
    write_plot(args.out, payload)
    log(f"wrote {args.out / 'fewshot_eval.md'}, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
