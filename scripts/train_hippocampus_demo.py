#!/usr/bin/env python3
"""Train and evaluate the bundled demonstration model `hippocampus-mr-demo`.

Data: the 200 labelled MR crops of the Medical Segmentation Decathlon hippocampus task in
../shared/data/hippocampus (1 = anterior, 2 = posterior hippocampus, manual labels).
Split (fixed, by sorted case name): every 5th case is a test case (40), never seen in training;
of the other 160, every 10th is a validation case (16) used to pick the best checkpoint; 144 train.

Three steps, so the GPU step needs nothing but PyTorch:
  prepare   read the NIfTI files, bring them to the model grid with the library's own preprocessing,
            save one compact .npz (no pickles)
  train     train encoder + decoder from random initialisation (CUDA if present), save safetensors
  evaluate  run the real `med3dfm segment` pipeline on every test case on its own grid, compute Dice,
            write the metrics into the card inside the weight file and into Resources/models.json

    python scripts/train_hippocampus_demo.py prepare --data ../shared/data/hippocampus --out build/hippo.npz
    python scripts/train_hippocampus_demo.py train --prepared build/hippo.npz --out build/hippocampus-mr-demo.safetensors
    python scripts/train_hippocampus_demo.py evaluate --data ../shared/data/hippocampus --weights build/hippocampus-mr-demo.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL_ID = "hippocampus-mr-demo"
WINDOW = (64, 64, 64)
INPUT_SPEC = {
    "modality": "MR",
    "spacing": [1.0, 1.0, 1.0],
    "window": list(WINDOW),
    "intensity": {"method": "percentile", "lower": 0.5, "upper": 99.5},
    "orientation": "LPS",
}
LABELS = [
    {
        "value": 1,
        "name": "anterior hippocampus",
        "color": [0.86, 0.55, 0.24],
        "terminology": {
            # Slicer's DICOM master list has Hippocampus (no anterior/posterior modifier exists:
            # the part is in the segment name).
            "contextName": "Segmentation category and type - DICOM master list",
            "category": ["SCT", "123037004", "Anatomical Structure"],
            "type": ["SCT", "5366008", "Hippocampus"],
        },
    },
    {
        "value": 2,
        "name": "posterior hippocampus",
        "color": [0.35, 0.63, 0.86],
        "terminology": {
            # Slicer's DICOM master list has Hippocampus (no anterior/posterior modifier exists:
            # the part is in the segment name).
            "contextName": "Segmentation category and type - DICOM master list",
            "category": ["SCT", "123037004", "Anatomical Structure"],
            "type": ["SCT", "5366008", "Hippocampus"],
        },
    },
]


def split_cases(names: List[str]) -> Dict[str, List[str]]:
    names = sorted(names)
    test = names[4::5]
    rest = [n for n in names if n not in set(test)]
    val = rest[9::10]
    train = [n for n in rest if n not in set(val)]
    return {"train": train, "val": val, "test": test}


def prepare(data: Path, out: Path) -> None:
    from Med3DFMLib.io.segmentations import read_labels, resample_labels_to
    from Med3DFMLib.io.volumes import read_volume
    from Med3DFMLib.preprocess import InputSpec, labels_to_model_grid, to_model_input

    spec = InputSpec.from_card(INPUT_SPEC)
    names = sorted(p.name for p in (data / "images").glob("*.nii.gz"))
    splits = split_cases(names)
    images, labels, shapes = [], [], []
    for name in names:
        image = read_volume(data / "images" / name)
        label = resample_labels_to(read_labels(data / "labels" / name).image, image)
        array, grid = to_model_input(image, spec)
        images.append(array.astype(np.float16).ravel())
        labels.append(labels_to_model_grid(label, grid).astype(np.uint8).ravel())
        shapes.append(array.shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        images=np.concatenate(images),
        labels=np.concatenate(labels),
        shapes=np.array(shapes, dtype=np.int64),
        names=np.array(names),
        split=np.array([next(k for k, v in splits.items() if n in v) for n in names]),
    )
    print(f"prepared {len(names)} cases → {out} ({out.stat().st_size / 1e6:.1f} MB)")


def load_prepared(path: Path) -> Tuple[List[np.ndarray], List[np.ndarray], np.ndarray, np.ndarray]:
    data = np.load(path)
    shapes = data["shapes"]
    sizes = np.prod(shapes, axis=1)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    images = [data["images"][offsets[i] : offsets[i + 1]].reshape(shapes[i]).astype(np.float32) for i in range(len(shapes))]
    labels = [data["labels"][offsets[i] : offsets[i + 1]].reshape(shapes[i]).astype(np.int64) for i in range(len(shapes))]
    return images, labels, data["names"], data["split"]


def place(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, random: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Put a case into a window-sized canvas (random or centred position, cropping if larger)."""
    canvas = np.full(WINDOW[::-1], image.min(), dtype=np.float32)
    target = np.zeros(WINDOW[::-1], dtype=np.int64)
    src, dst = [], []
    for size, win in zip(image.shape, WINDOW[::-1]):
        if size <= win:
            start = int(rng.integers(0, win - size + 1)) if random else (win - size) // 2
            src.append(slice(0, size))
            dst.append(slice(start, start + size))
        else:
            start = int(rng.integers(0, size - win + 1)) if random else (size - win) // 2
            src.append(slice(start, start + win))
            dst.append(slice(0, win))
    canvas[tuple(dst)] = image[tuple(src)]
    target[tuple(dst)] = label[tuple(src)]
    return canvas, target


def train(prepared: Path, out: Path, steps: int, batch: int, lr: float, seed: int, minutes: float) -> None:
    import torch
    import torch.nn.functional as F

    from Med3DFMLib.models import EncoderConfig, SegmentationModel
    from Med3DFMLib.weights import write_weights

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels, names, split = load_prepared(prepared)
    train_idx = [i for i, s in enumerate(split) if s == "train"]
    val_idx = [i for i, s in enumerate(split) if s == "val"]
    model = SegmentationModel(EncoderConfig(), num_classes=3).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def make_batch() -> Tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for index in rng.choice(train_idx, size=batch):
            x, y = place(images[index], labels[index], rng, random=True)
            if rng.random() < 0.5:  # left-right flip keeps anterior/posterior meaning
                x, y = x[:, :, ::-1], y[:, :, ::-1]
            x = x * rng.uniform(0.85, 1.15) + rng.uniform(-0.15, 0.15)
            x = x + rng.normal(0, rng.uniform(0, 0.08), size=x.shape).astype(np.float32)
            xs.append(np.ascontiguousarray(x, dtype=np.float32))
            ys.append(np.ascontiguousarray(y))
        return torch.from_numpy(np.stack(xs))[:, None].to(device), torch.from_numpy(np.stack(ys)).to(device)

    def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(1)[:, 1:]
        onehot = F.one_hot(target, 3).permute(0, 4, 1, 2, 3).float()[:, 1:]
        inter = (probs * onehot).sum((0, 2, 3, 4))
        return 1 - ((2 * inter + 1) / (probs.sum((0, 2, 3, 4)) + onehot.sum((0, 2, 3, 4)) + 1)).mean()

    def validate() -> float:
        model.eval()
        scores = []
        with torch.no_grad(), autocast:
            for index in val_idx:
                x, y = place(images[index], labels[index], rng, random=False)
                pred = model(torch.from_numpy(x)[None, None].to(device)).argmax(1)[0].cpu().numpy()
                for c in (1, 2):
                    denom = (pred == c).sum() + (y == c).sum()
                    scores.append(2 * ((pred == c) & (y == c)).sum() / denom if denom else 1.0)
        model.train()
        return float(np.mean(scores))

    if minutes > 0:  # fit the schedule into a time budget: time a few steps first
        probe = torch.optim.AdamW(model.parameters(), lr=0.0)
        for index in range(12):
            if index == 2:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                tick = time.time()
            x, y = make_batch()
            with autocast:
                loss = F.cross_entropy(model(x).float(), y)
            probe.zero_grad()
            loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step = (time.time() - tick) / 10
        steps = min(steps, int(minutes * 60 * 0.85 / per_step))
        warmup = max(1, steps // 20)
        print(f"{per_step:.3f} s per step → {steps} steps in {minutes} min", flush=True)

    history: List[Dict[str, float]] = []
    best, best_state, best_step = -1.0, None, 0
    start = time.time()
    model.train()
    for step in range(1, steps + 1):
        x, y = make_batch()
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y) + dice_loss(logits, y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if step % 250 == 0 or step == steps:
            score = validate()
            history.append({"step": step, "loss": round(loss.item(), 4), "val_dice": round(score, 4), "seconds": round(time.time() - start, 1)})
            print(json.dumps(history[-1]), flush=True)
            if score > best:
                best, best_step = score, step
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    card = {
        "id": MODEL_ID,
        "version": "0.1.0",
        "task": "segment",
        "architecture": model.architecture(),
        "input": INPUT_SPEC,
        "labels": LABELS,
        "training": {
            "data": "Medical Segmentation Decathlon Task04 Hippocampus (200 MR crops, manual labels), "
            f"{len(train_idx)} training cases, {len(val_idx)} validation cases, 40 test cases held out",
            "split": "sorted case names; every 5th case is test, every 10th of the rest is validation",
            "method": f"encoder and decoder trained from random initialisation (no pretraining), AdamW lr {lr}, "
            f"batch {batch}, {steps} steps, cross-entropy + Dice, random placement in a 64³ window, "
            "left-right flips, intensity scale/shift/noise; best validation checkpoint (step "
            f"{best_step})",
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "seconds": round(time.time() - start, 1),
            "history": history,
            "script": "scripts/train_hippocampus_demo.py",
        },
    }
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_weights(out, tensors, card)
    print(f"best validation Dice {best:.4f} at step {best_step}; saved {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hippocampus")
    p.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("train")
    t.add_argument("--prepared", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--minutes", type=float, default=0.0, help="shorten --steps to fit this wall-clock budget")
    e = sub.add_parser("evaluate")
    e.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hippocampus")
    e.add_argument("--weights", type=Path, required=True)
    e.add_argument("--install", action="store_true", help="copy into Resources/models and update models.json")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.data, args.out)
    elif args.command == "train":
        train(args.prepared, args.out, args.steps, args.batch, args.lr, args.seed, args.minutes)
    else:
        evaluate(args.data, args.weights, args.install)


def evaluate(data: Path, weights: Path, install: bool) -> None:
    """Dice of the real segment pipeline on every held-out test case, on each case's own grid."""
    import SimpleITK as sitk

    from Med3DFMLib.io.segmentations import read_labels, resample_labels_to
    from Med3DFMLib.io.volumes import read_volume
    from Med3DFMLib.segment import load_segmenter, segment_image
    from Med3DFMLib.weights import read_weights, write_weights

    names = sorted(p.name for p in (data / "images").glob("*.nii.gz"))
    test = split_cases(names)["test"]
    segmenter = load_segmenter(str(weights), device_name="cpu")
    per_case = []
    start = time.time()
    for name in test:
        image = read_volume(data / "images" / name)
        truth = sitk.GetArrayFromImage(resample_labels_to(read_labels(data / "labels" / name).image, image))
        pred = sitk.GetArrayFromImage(segment_image(image, segmenter))
        scores = {}
        for label in LABELS:
            a, b = pred == label["value"], truth == label["value"]
            scores[label["name"]] = float(2 * (a & b).sum() / (a.sum() + b.sum())) if (a.sum() + b.sum()) else 1.0
        per_case.append(scores)
        print(name, {k: round(v, 4) for k, v in scores.items()}, flush=True)
    seconds = time.time() - start
    metrics = {
        "dataset": f"MSD Task04 Hippocampus, {len(test)} held-out test cases (every 5th case by name)",
        "protocol": "med3dfm segment pipeline on each case's own grid, CPU, compared with the manual labels",
        "dice": {
            label["name"]: {
                "mean": round(float(np.mean([c[label["name"]] for c in per_case])), 4),
                "std": round(float(np.std([c[label["name"]] for c in per_case])), 4),
                "min": round(float(np.min([c[label["name"]] for c in per_case])), 4),
            }
            for label in LABELS
        },
        "mean_dice": round(float(np.mean([np.mean(list(c.values())) for c in per_case])), 4),
        "seconds_per_case_cpu": round(seconds / len(test), 3),
    }
    print(json.dumps(metrics, indent=2))
    from measure_domain import demo_domain  # scripts/ is on sys.path when this script runs

    tensors, card = read_weights(weights)
    card["labels"] = LABELS  # names/colours/terminology may be refined after training
    card["metrics"] = metrics
    card["limits"] = LIMITS
    card["domain"] = demo_domain(data)  # what `segment` checks scans against, from the training split
    target = ROOT / "Resources" / "models" / f"{MODEL_ID}.safetensors" if install else weights
    target.parent.mkdir(parents=True, exist_ok=True)
    sha = write_weights(target, tensors, card)
    if install:
        registry_path = ROOT / "Resources" / "models.json"
        registry = json.loads(registry_path.read_text())
        entry = next(e for e in registry["models"] if e["id"] == MODEL_ID)
        entry["files"][0].update({"sha256": sha, "size": target.stat().st_size})
        for key in ("input", "labels", "training", "metrics", "limits", "domain"):
            entry[key] = card[key]
        registry_path.write_text(json.dumps(registry, indent=2) + "\n")
        print(f"installed {target} (sha256 {sha}) and updated {registry_path}")


LIMITS = (
    "A demonstration model. It was trained on 144 small MR crops centred on one hippocampus "
    "(T1-weighted, one site); it expects such a crop at about 1 mm and finds nothing meaningful "
    "in whole-brain scans, other anatomy or CT. Not for clinical use."
)


if __name__ == "__main__":
    main()
