"""Adapters on frozen encoder features: a point-wise MLP (trained in seconds) or prototypes
(training-free).

Both read, at any voxel, the encoder's multi-scale features there (trilinear interpolation of the
stride 2, 4, 8 and 16 maps, and the ViT tokens) plus the scan's own normalised intensity, standardise
them with statistics of the training volume, and output class logits. Training samples the same
number of labelled voxels per class at every step (with sub-voxel jitter and feature dropout, the
augmentations that make sense for frozen features of a few slices), and stops early on held-out
labelled slices. The jittered, dropped-out feature vectors are drawn once into a pool several times
larger than a step's batch, so a step costs one small matrix product (no interpolation, no random
numbers per feature): a few milliseconds on a CPU. Dense prediction runs at stride 4, then at
stride 2 near the structures and wherever stride 4 is unsure, and is upsampled: a whole volume in
about a second on a laptop CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from Med3DFMLib.cpu import flush_denormals
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.fewshot.features import VolumeFeatures
from Med3DFMLib.progress import Progress

STRIDES = (2, 4, 8, 16)


@dataclass
class PointSet:
    """Labelled voxels of one volume: model-grid coordinates (z, y, x) and class targets."""

    coords: torch.Tensor  # (N, 3) float voxel indices
    targets: torch.Tensor  # (N,) long


def gather(features: VolumeFeatures, image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """(N, C) features at voxel coordinates (N, 3) of the model grid, all levels + intensity.

    A voxel centre v maps to (v + 0.5) / padded · 2 − 1 in grid_sample's normalised coordinates at
    every stride (align_corners=False), because every level covers the same padded extent.
    """
    padded = torch.tensor(features.padded, dtype=torch.float32)
    normalised = (coords.float() + 0.5) / padded * 2.0 - 1.0
    grid = normalised.flip(-1).view(1, -1, 1, 1, 3)  # (x, y, z) order
    columns = []
    for stride in STRIDES:
        level = features.maps[stride][None]
        columns.append(F.grid_sample(level, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, :, 0, 0])
    columns.append(F.grid_sample(image[None, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, :, 0, 0])
    return torch.cat(columns, dim=0).t()


class PointAdapter(nn.Module):
    """Standardise → MLP → logits (background + classes)."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.mlp = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden // 2),
            nn.GELU(),
            nn.Linear(hidden // 2, num_classes + 1),
        )

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.mlp((points - self.mean) / self.std)


class PrototypeAdapter(nn.Module):
    """Training-free: cosine similarity to class prototypes (k-means centres of labelled voxels)."""

    def __init__(self, in_dim: int, num_classes: int, num_prototypes: int, temperature: float = 10.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.temperature = temperature
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.register_buffer("prototypes", torch.zeros(num_prototypes, in_dim))
        self.register_buffer("prototype_class", torch.zeros(num_prototypes, dtype=torch.long))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        x = F.normalize((points - self.mean) / self.std, dim=-1)
        similarity = x @ F.normalize(self.prototypes, dim=-1).t() * self.temperature
        logits = torch.full((x.shape[0], self.num_classes + 1), -1e4, dtype=similarity.dtype)
        for cls in range(self.num_classes + 1):
            chosen = self.prototype_class == cls
            if chosen.any():
                logits[:, cls] = similarity[:, chosen].max(dim=1).values
        return logits


def build_adapter(architecture: Dict[str, Any]) -> nn.Module:
    if architecture.get("type") != "point-adapter":
        raise Med3DFMError(f"not a few-shot adapter (architecture type {architecture.get('type')!r})")
    if architecture["mode"] == "prototype":
        return PrototypeAdapter(architecture["in_dim"], architecture["num_classes"], architecture["num_prototypes"])
    return PointAdapter(architecture["in_dim"], architecture["num_classes"], architecture["hidden"])


def _standardise(module: nn.Module, samples: torch.Tensor) -> None:
    module.mean.copy_(samples.mean(0))
    module.std.copy_(samples.std(0).clamp_min(1e-3))


def _class_indices(points: Sequence[PointSet], num_classes: int) -> List[List[Tuple[int, torch.Tensor]]]:
    """For each class, per volume, the indices of its labelled points."""
    result = []
    for cls in range(num_classes + 1):
        result.append([(v, torch.nonzero(p.targets == cls).squeeze(1)) for v, p in enumerate(points) if (p.targets == cls).any()])
    return result


def _sample(points: Sequence[PointSet], per_class: List[List[Tuple[int, torch.Tensor]]], count: int, generator: torch.Generator, jitter: float) -> List[Tuple[int, torch.Tensor, torch.Tensor]]:
    """`count` points per class, spread over the volumes that have that class."""
    batches: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
    for cls, entries in enumerate(per_class):
        for volume, indices in entries:
            take = max(1, count // len(entries))
            chosen = indices[torch.randint(0, indices.numel(), (take,), generator=generator)]
            coords = points[volume].coords[chosen] + (torch.rand(take, 3, generator=generator) - 0.5) * 2 * jitter
            batches.setdefault(volume, []).append((coords, torch.full((take,), cls, dtype=torch.long)))
    return [(v, torch.cat([c for c, _ in items]), torch.cat([t for _, t in items])) for v, items in batches.items()]


POOL_FACTOR = 8  # the pool holds this many times a step's points per class
# Held-out selection only from this step on. With a few painted slices the held-out slice's loss can
# be lowest at the very first check (step 10) and the final adapter then stops untrained: on 9
# settings of scripts/evaluate_fewshot.py (3 seeds each) a floor of 100 steps raised the mean Dice
# from 0.45 to 0.58 (spleen with 5 slices 0.28 -> 0.71, thalamus with 3 slices 0.09 -> 0.27).
MIN_STEPS = 100


def _feature_pool(features: Sequence[VolumeFeatures], images: Sequence[torch.Tensor], points: Sequence[PointSet],
                  per_class: List[List[Tuple[int, torch.Tensor]]], count: int, generator: torch.Generator,
                  jitter: float, dropout: float, mean: torch.Tensor) -> List[torch.Tensor]:
    """For each class with labelled points, `count` augmented feature vectors (count, C): points drawn
    over the volumes that have the class, moved by sub-voxel jitter, and dropout as the adapter's
    first layer would apply it to standardised features (a dropped feature becomes the mean)."""
    pools = []
    for cls in range(len(per_class)):
        if not per_class[cls]:
            pools.append(torch.empty(0))
            continue
        only = [entries if c == cls else [] for c, entries in enumerate(per_class)]
        drawn = _sample(points, only, count, generator, jitter)
        x = torch.cat([gather(features[v], images[v], c) for v, c, _ in drawn])
        if dropout > 0:
            keep = torch.rand(x.shape, generator=generator) >= dropout
            x = mean + (x - mean) * keep / (1.0 - dropout)
        pools.append(x)
    return pools


def _balanced_loss(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    present = torch.bincount(target, minlength=num_classes + 1).float()
    weights = torch.where(present > 0, 1.0 / present.clamp_min(1), torch.zeros_like(present))
    return float(F.cross_entropy(logits, target, weight=weights / weights.sum()))


def _dice_scores(prediction: torch.Tensor, target: torch.Tensor, num_classes: int, weight: Optional[torch.Tensor] = None) -> float:
    """Mean Dice over the structures; `weight` (per point) undoes a per-class subsample of the points."""
    weight = torch.ones(target.shape[0]) if weight is None else weight
    scores = []
    for cls in range(1, num_classes + 1):
        a, b = prediction == cls, target == cls
        if b.any() or a.any():
            scores.append(float(2 * weight[a & b].sum() / (weight[a].sum() + weight[b].sum())))
    return float(np.mean(scores)) if scores else 0.0


HELD_OUT_PER_CLASS = 8192  # held-out points scored per class at each evaluation


def _held_out(points: PointSet, generator: torch.Generator, per_class: int = HELD_OUT_PER_CLASS) -> Tuple[PointSet, torch.Tensor]:
    """At most `per_class` held-out points of each class, with weights (class count / kept) so that
    the Dice on the subsample estimates the Dice on all held-out points."""
    keep, weights = [], []
    for cls in torch.unique(points.targets):
        members = torch.nonzero(points.targets == cls).squeeze(1)
        chosen = members[torch.randperm(members.numel(), generator=generator)[:per_class]]
        keep.append(chosen)
        weights.append(torch.full((chosen.numel(),), members.numel() / chosen.numel()))
    order = torch.cat(keep)
    return PointSet(points.coords[order], points.targets[order]), torch.cat(weights)


def train_point_adapter(
    features: Sequence[VolumeFeatures],
    images: Sequence[torch.Tensor],
    train_points: Sequence[PointSet],
    val_points: Sequence[PointSet],
    num_classes: int,
    max_steps: int = 400,
    points_per_class: int = 512,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Optional[Progress] = None,
    dropout: float = 0.1,
) -> Tuple[PointAdapter, Dict[str, Any]]:
    """Train an MLP adapter; returns it (lowest class-balanced held-out loss) and a summary for its card."""
    with flush_denormals():
        return _train_point_adapter(features, images, train_points, val_points, num_classes, max_steps, points_per_class, lr, seed, progress, dropout)


def _train_point_adapter(features: Sequence[VolumeFeatures], images: Sequence[torch.Tensor], train_points: Sequence[PointSet],
                         val_points: Sequence[PointSet], num_classes: int, max_steps: int, points_per_class: int, lr: float,
                         seed: int, progress: Optional[Progress], dropout: float) -> Tuple[PointAdapter, Dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    started = time.perf_counter()
    per_class = _class_indices(train_points, num_classes)
    in_dim = sum(int(features[0].maps[s].shape[0]) for s in STRIDES) + 1
    adapter = PointAdapter(in_dim, num_classes, dropout=0.0)  # dropout is applied once, in the pool
    stats_batch = _sample(train_points, per_class, 2048, generator, 0.0)
    _standardise(adapter, torch.cat([gather(features[v], images[v], c) for v, c, _ in stats_batch]))
    pools = _feature_pool(features, images, train_points, per_class, POOL_FACTOR * points_per_class, generator, 0.5, dropout, adapter.mean)
    present = [cls for cls, pool in enumerate(pools) if pool.numel()]
    val_features = []
    for v, p in enumerate(val_points):
        if p.targets.numel():
            sample, weight = _held_out(p, generator)
            val_features.append((gather(features[v], images[v], sample.coords), sample.targets, weight))
    optimiser = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=1e-4)
    best_score, best_dice, best_state, best_step, stale = -float("inf"), 0.0, None, 0, 0
    history = []
    evaluate_every, patience = 10, 4  # stop 40 steps after the best held-out loss
    for step in range(1, max_steps + 1):
        adapter.train()
        picks = [torch.randint(0, pools[cls].shape[0], (points_per_class,), generator=generator) for cls in present]
        x = torch.cat([pools[cls][pick] for cls, pick in zip(present, picks)])
        y = torch.cat([torch.full((points_per_class,), cls, dtype=torch.long) for cls in present])
        loss = F.cross_entropy(adapter(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % evaluate_every == 0 or step == max_steps:
            adapter.eval()
            with torch.no_grad():
                outputs = [(adapter(vx), vy, vw) for vx, vy, vw in val_features]
                dice = float(np.mean([_dice_scores(o.argmax(1), vy, num_classes, vw) for o, vy, vw in outputs])) if outputs else 0.0
                # Selection by class-balanced held-out loss: unlike Dice it still ranks models that
                # miss a tiny structure entirely, which happens with a few painted slices.
                score = -float(np.mean([_balanced_loss(o, vy, num_classes) for o, vy, _ in outputs])) if outputs else 0.0
            history.append({"step": step, "loss": round(loss.item(), 4), "val_loss": round(-score, 4), "val_dice": round(dice, 4)})
            if progress is not None:
                progress.update("train", step / max_steps, f"step {step}, held-out Dice {dice:.3f}")
            if not val_features:
                continue  # nothing held out: train for exactly max_steps, keep the last state
            if step < MIN_STEPS:
                continue  # too early to choose (see MIN_STEPS)
            if score > best_score + 1e-4:
                best_score, best_dice, best_step, stale = score, dice, step, 0
                best_state = {k: v.clone() for k, v in adapter.state_dict().items()}
            else:
                stale += 1
                if stale >= patience:
                    break
    if best_state is not None:
        adapter.load_state_dict(best_state)
    else:
        best_step = step
    adapter.eval()
    summary = {"mode": "adapter", "steps": step, "best_step": best_step, "held_out_dice": round(best_dice, 4) if val_features else None, "seconds": round(time.perf_counter() - started, 2), "history": history}
    return adapter, summary


def _kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 15) -> torch.Tensor:
    k = min(k, x.shape[0])
    centres = x[torch.randperm(x.shape[0], generator=generator)[:k]].clone()
    for _ in range(iterations):
        assignment = (F.normalize(x, dim=-1) @ F.normalize(centres, dim=-1).t()).argmax(1)
        for c in range(k):
            members = x[assignment == c]
            if members.numel():
                centres[c] = members.mean(0)
    return centres


def fit_prototypes(features: Sequence[VolumeFeatures], images: Sequence[torch.Tensor], points: Sequence[PointSet], num_classes: int, background_prototypes: int = 8, class_prototypes: int = 2, seed: int = 0) -> Tuple[PrototypeAdapter, Dict[str, Any]]:
    """Prototypes from labelled voxels: k-means centres per class, no gradient steps."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    per_class = _class_indices(points, num_classes)
    batch = _sample(points, per_class, 4096, generator, 0.0)
    x = torch.cat([gather(features[v], images[v], c) for v, c, _ in batch])
    y = torch.cat([t for _, _, t in batch])
    centres, owners = [], []
    mean, std = x.mean(0), x.std(0).clamp_min(1e-3)
    standardised = (x - mean) / std
    for cls in range(num_classes + 1):
        members = standardised[y == cls]
        if members.numel() == 0:
            continue
        found = _kmeans(members, background_prototypes if cls == 0 else class_prototypes, generator)
        centres.append(found)
        owners.append(torch.full((found.shape[0],), cls, dtype=torch.long))
    prototypes = torch.cat(centres)
    adapter = PrototypeAdapter(x.shape[1], num_classes, prototypes.shape[0])
    adapter.mean.copy_(mean)
    adapter.std.copy_(std)
    adapter.prototypes.copy_(prototypes)
    adapter.prototype_class.copy_(torch.cat(owners))
    return adapter.eval(), {"mode": "prototype", "prototypes": int(prototypes.shape[0]), "seconds": round(time.perf_counter() - started, 2)}


def _logits_at(adapter: nn.Module, features: VolumeFeatures, image: torch.Tensor, coords: torch.Tensor, chunk: int) -> torch.Tensor:
    """(N, C+1) logits at model-grid coordinates, in chunks to bound memory."""
    with torch.no_grad():
        return torch.cat([adapter(gather(features, image, coords[start : start + chunk])) for start in range(0, coords.shape[0], chunk)])


def _grid_coords(sizes: Sequence[int], step: int) -> torch.Tensor:
    """(N, 3) model-grid coordinates of the centres of `step`-voxel cells (z, y, x order, row-major)."""
    offset = (step - 1) / 2.0
    axes = [torch.arange(n, dtype=torch.float32) * step + offset for n in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).view(-1, 3)


REFINE_CONFIDENCE = 0.9999  # stride-2 cells whose coarse answer is less sure than this are recomputed


def predict_dense(adapter: nn.Module, features: VolumeFeatures, image: torch.Tensor, chunk: int = 65536, refine_only: bool = True) -> np.ndarray:
    """Class probabilities (C+1, D, H, W) on the model grid from logits at stride 2, upsampled.

    With `refine_only`, logits are first computed at stride 4 and interpolated to stride 2; only the
    stride-2 cells near a structure (within one stride-4 cell of a voxel the coarse pass labels as a
    structure) or where the coarse answer is less than 99.99 % sure are recomputed. A structure fills
    a small part of most volumes, so this skips most of the work while the answer near every
    boundary is the full stride-2 one (`refine_only=False` computes every stride-2 cell).
    """
    shape = [int(s) for s in features.shape]
    fine = [int(np.ceil(s / 2)) for s in shape]
    adapter.eval()
    if refine_only:
        coarse = [int(np.ceil(s / 4)) for s in shape]
        logits = _logits_at(adapter, features, image, _grid_coords(coarse, 4), chunk).t().reshape(-1, *coarse)
        logits = F.interpolate(logits[None], scale_factor=2, mode="trilinear", align_corners=False)[0][:, : fine[0], : fine[1], : fine[2]].contiguous()
        probabilities = logits.softmax(0)
        structure = F.max_pool3d((probabilities.argmax(0) > 0).float()[None, None], 5, stride=1, padding=2)[0, 0] > 0
        todo = structure | (probabilities.max(0).values < REFINE_CONFIDENCE)
        where = torch.nonzero(todo.reshape(-1)).squeeze(1)
        if where.numel():
            coords = _grid_coords(fine, 2)[where]
            logits.view(logits.shape[0], -1)[:, where] = _logits_at(adapter, features, image, coords, chunk).t()
    else:
        logits = _logits_at(adapter, features, image, _grid_coords(fine, 2), chunk).t().reshape(-1, *fine)
    logits = F.interpolate(logits[None], scale_factor=2, mode="trilinear", align_corners=False)[0]
    logits = logits[:, : shape[0], : shape[1], : shape[2]]
    return logits.softmax(0).numpy()
