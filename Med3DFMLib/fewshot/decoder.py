"""Other patients: a small convolutional decoder over the frozen encoder, trained with augmentation
within a time budget.

A point-wise adapter on precomputed features cannot see augmented images and has no spatial
context; across patients it stopped at 0.6–0.7 Dice where a U-Net from scratch reached 0.75–0.86.
Here every training step draws crops of the labelled volumes, augments them (MONAI: affine with
rotation and scaling, elastic deformation, left-right flip where labels allow, gamma, intensity
scale and shift, noise), runs the frozen encoder on the augmented crop (no gradients), and trains a
U-Net-style decoder on its feature pyramid (strides 16 → 8 → 4 → 2) plus a light stem on the image
itself at full model resolution, so small structures keep their edges. The learning rate follows a
cosine over the budget, so a longer budget is a longer schedule, not just more steps at the end.
With four or more labelled volumes one is held out to choose the checkpoint.

With three or more labelled volumes the decoder also keeps their label atlas (where each class lay,
at normalised positions of the volume) and pools its probabilities with it at inference: volumes
labelled for one structure are usually framed alike (crops around it, one protocol's field of
view), and from five hippocampus crops the atlas alone scored 0.68 Dice on unseen crops. Pooling
raised the decoder's Dice on development crops by 0.03; as input channels the same atlas lowered it
(the network leaned on the noisier leave-one-out atlases it was trained with).

With one or more labelled volumes whose grid is known, the decoder also keeps the volumes
themselves for multi-atlas registration (fewshot.registration): at inference they are registered
onto the new scan, their labels vote, and the decoder's probabilities are pooled with the votes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from Med3DFMLib.cpu import flush_denormals
from Med3DFMLib.fewshot.labels import IGNORE
from Med3DFMLib.fewshot.registration import MIN_VOLUMES as MIN_REGISTRATION_VOLUMES
from Med3DFMLib.fewshot.registration import AtlasPrior, choose_weight, log_linear_pool, make_atlas, votes
from Med3DFMLib.progress import Progress

DEFAULT_WIDTHS = (128, 64, 48, 24, 16)  # stride 16, 8, 4, 2, 1
SELECTION_MARGIN = 0.05  # held-out Dice an earlier checkpoint must win by to replace the last one
MAX_CROP = 64  # training crop side (voxels of the model grid); smaller volumes are taken whole
HOLD_OUT_FROM = 4  # with this many labelled volumes one is held out to choose the checkpoint
ATLAS_GRID = 24  # side of the stored label atlas (normalised positions)
MIN_ATLAS_VOLUMES = 3  # an atlas of fewer volumes is mostly one patient's shape
# Pooling weights of the atlas tried on the held-out volume, and the one used without a held-out
# volume (on 12 development crops from 5 labelled ones, Dice rose with the weight up to 1.5).
ATLAS_WEIGHTS = (0.0, 0.5, 1.0, 1.5)
DEFAULT_ATLAS_WEIGHT = 1.0
ATLAS_FLOOR = 0.01  # added to the atlas before its logarithm: a class never seen at a position is unlikely there, not impossible


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False), nn.InstanceNorm3d(out_channels, affine=True), nn.LeakyReLU(0.01, inplace=True))


class FeatureDecoder(nn.Module):
    """Top-down decoder: pyramid levels (strides 2, 4, 8, 16 incl. ViT tokens) + image → logits at stride 1.

    Each level narrows the coarser map to its own width, up-samples it (nearest), joins the encoder's
    map there and mixes with a 3³ convolution. Full resolution, where a CPU pays most (a 3³ conv
    over 48 channels there was 80 % of a training step), holds only a thin stem on the image and
    point-wise layers.
    """

    def __init__(self, level_channels: Sequence[int], num_classes: int, widths: Sequence[int] = DEFAULT_WIDTHS, atlas: bool = False) -> None:
        super().__init__()
        self.level_channels, self.widths, self.uses_atlas = list(level_channels), list(widths), bool(atlas)
        self.registration: Optional[AtlasPrior] = None  # the labelled volumes for registration (not a tensor buffer: shapes vary)
        if self.uses_atlas:  # stored with the weights: the labelled volumes' label atlas and its pooling weight
            self.register_buffer("atlas", torch.zeros(num_classes, ATLAS_GRID, ATLAS_GRID, ATLAS_GRID))
            self.register_buffer("atlas_weight", torch.tensor(DEFAULT_ATLAS_WEIGHT))
        c2, c4, c8, c16 = level_channels
        w16, w8, w4, w2, w1 = widths
        self.top = nn.Sequential(nn.Conv3d(c16, w16, 1), _block(w16, w16))
        self.narrow8, self.up8 = nn.Conv3d(w16, w8, 1), _block(w8 + c8, w8)
        self.narrow4, self.up4 = nn.Conv3d(w8, w4, 1), _block(w4 + c4, w4)
        self.narrow2, self.up2 = nn.Conv3d(w4, w2, 1), _block(w2 + c2, w2)
        self.narrow1 = nn.Conv3d(w2, w1 // 2, 1)
        self.stem = nn.Sequential(nn.Conv3d(1, w1 // 2, 3, padding=1), nn.LeakyReLU(0.01, inplace=True))
        self.up1 = nn.Sequential(nn.Conv3d(w1, w1, 1), nn.LeakyReLU(0.01, inplace=True))
        self.head = nn.Conv3d(w1, num_classes + 1, 1)

    def forward(self, image: torch.Tensor, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        s2, s4, s8, s16 = levels
        x = self.top(s16)
        for narrow, block, skip in ((self.narrow8, self.up8, s8), (self.narrow4, self.up4, s4), (self.narrow2, self.up2, s2)):
            x = F.interpolate(narrow(x), size=skip.shape[2:], mode="nearest")
            x = block(torch.cat([x, skip], 1))
        # trilinear to full resolution (a nearest step there would show as blocks in the labels)
        x = F.interpolate(self.narrow1(x), size=image.shape[2:], mode="trilinear", align_corners=False)
        return self.head(self.up1(torch.cat([x, self.stem(image)], 1)))


def encoder_levels(encoder: nn.Module, image: torch.Tensor) -> List[torch.Tensor]:
    """The frozen encoder's pyramid for a (B, 1, d, h, w) batch, stride 16 with the ViT tokens appended."""
    with torch.no_grad():
        out = encoder(image)
        tokens = out.tokens.transpose(1, 2).reshape(image.shape[0], -1, *out.token_grid)
        s2, s4, s8, s16 = out.pyramid
        return [s2, s4, s8, torch.cat([s16, tokens], 1)]


def level_channels(encoder: nn.Module) -> List[int]:
    pyramid = list(encoder.channels)
    return pyramid[:3] + [pyramid[3] + encoder.config.embed_dim]


def label_atlas(targets: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(C, G, G, G) frequency of each class at each normalised position of the labelled volumes
    (each volume's extent scaled to a G³ grid; IGNORE voxels count for nothing)."""
    from scipy import ndimage

    counts = np.zeros((num_classes + 1, ATLAS_GRID, ATLAS_GRID, ATLAS_GRID), dtype=np.float64)
    for target in targets:
        zoom = [ATLAS_GRID / s for s in target.shape]
        counts[0] += np.clip(ndimage.zoom((target != IGNORE).astype(np.float32), zoom, order=1), 0.0, 1.0)
        for cls in range(1, num_classes + 1):
            counts[cls] += np.clip(ndimage.zoom((target == cls).astype(np.float32), zoom, order=1), 0.0, 1.0)
    return (counts[1:] / np.maximum(counts[0], 1e-6)).astype(np.float32)


def pool_with_atlas(probabilities: np.ndarray, atlas: np.ndarray, weight: float) -> np.ndarray:
    """Log-linear pooling of (C+1, D, H, W) probabilities with the (C, G, G, G) atlas stretched over the volume."""
    from scipy import ndimage

    if weight <= 0:
        return probabilities
    shape = probabilities.shape[1:]
    classes = np.stack([np.clip(ndimage.zoom(channel, [s / g for s, g in zip(shape, channel.shape)], order=1), 0.0, 1.0) for channel in atlas])
    prior = np.concatenate([np.clip(1.0 - classes.sum(0, keepdims=True), 0.0, 1.0), classes])
    return log_linear_pool(probabilities, prior, weight, ATLAS_FLOOR)


def _round_up(n: int, multiple: int) -> int:
    return int(np.ceil(n / multiple) * multiple)


def crop_shape(shapes: Sequence[Sequence[int]], multiple: int, limit: int = MAX_CROP) -> List[int]:
    """Training crop: the largest volume along each axis, rounded up to the encoder's multiple, at most `limit`."""
    return [min(_round_up(max(s[a] for s in shapes), multiple), _round_up(limit, multiple)) for a in range(3)]


def augmentation(flip_axes: Sequence[int], seed: int):
    """MONAI dictionary transforms on {"image", "label"} (channel-first tensors); labels move with the image."""
    from monai.transforms import (Compose, Rand3DElasticd, RandAdjustContrastd, RandAffined, RandFlipd, RandGaussianNoised,
                                  RandScaleIntensityd, RandShiftIntensityd)

    keys = ["image", "label"]
    steps = [
        RandAffined(keys, prob=0.8, rotate_range=(0.26, 0.26, 0.26), scale_range=(0.15, 0.15, 0.15), translate_range=(4, 4, 4),
                    mode=("bilinear", "nearest"), padding_mode="border"),
        Rand3DElasticd(keys, prob=0.15, sigma_range=(5.0, 7.0), magnitude_range=(30.0, 90.0), mode=("bilinear", "nearest"), padding_mode="border"),
        *[RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in flip_axes],
        RandAdjustContrastd(["image"], prob=0.3, gamma=(0.7, 1.5)),
        RandScaleIntensityd(["image"], prob=0.3, factors=0.15),
        RandShiftIntensityd(["image"], prob=0.3, offsets=0.15),
        RandGaussianNoised(["image"], prob=0.15, std=0.1),
    ]
    transform = Compose(steps)
    transform.set_random_state(seed=seed)
    return transform


def lateralised(names: Sequence[str]) -> bool:
    """Do the class names say left or right? Then a left-right flip would swap them."""
    words = {w for name in names for w in name.lower().replace("-", " ").replace("_", " ").split()}
    return bool(words & {"left", "right", "l", "r"})


@dataclass
class LabelledVolume:
    """One labelled scan on the model grid: normalised intensities and targets (IGNORE / 0 / 1..C)."""

    image: np.ndarray
    targets: np.ndarray
    spacing_zyx: Optional[Tuple[float, float, float]] = None  # of the model grid; needed for registration


def _pad(array: np.ndarray, shape: Sequence[int], value: float) -> np.ndarray:
    return np.pad(array, [(0, max(0, s - a)) for a, s in zip(array.shape, shape)], constant_values=value)


def _draw_crop(volume: LabelledVolume, size: Sequence[int], rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """A crop of `size`: centred near a structure voxel two times in three, anywhere otherwise."""
    image = _pad(volume.image, size, float(volume.image.min()))
    targets = _pad(volume.targets, size, IGNORE)
    foreground = np.argwhere(targets > 0) if rng.random() < 2 / 3 else np.empty((0, 3))
    corner = []
    for axis, side in enumerate(size):
        room = image.shape[axis] - side
        if room <= 0:
            corner.append(0)
            continue
        if len(foreground):
            centre = int(foreground[rng.integers(len(foreground))][axis]) + int(rng.integers(-side // 4, side // 4 + 1))
            corner.append(int(np.clip(centre - side // 2, 0, room)))
        else:
            corner.append(int(rng.integers(0, room + 1)))
    window = tuple(slice(c, c + s) for c, s in zip(corner, size))
    return image[window], targets[window]


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Cross-entropy + soft Dice over the labelled voxels (IGNORE voxels count for neither).

    The Dice terms are gathered and scattered by class instead of multiplying by a one-hot volume:
    with SynthSeg's 33 classes on a 96^3 crop the one-hot tensors made the loss half of a U-Net's
    training step on a CPU."""
    known = targets != IGNORE
    safe = targets.clamp_min(0)
    log_probabilities = logits.float().log_softmax(1)
    log_at_truth = log_probabilities.gather(1, safe[:, None])[:, 0][known]
    ce = -log_at_truth.mean()
    probabilities = log_probabilities.exp()
    mask = known[:, None].to(probabilities.dtype)
    classes = num_classes + 1
    labelled = safe[known]
    at_truth = log_at_truth.exp()
    intersection = torch.zeros(classes, dtype=probabilities.dtype, device=logits.device).scatter_add(0, labelled, at_truth)
    counts = torch.bincount(labelled, minlength=classes).to(probabilities.dtype)
    total = (probabilities * mask).sum((0, 2, 3, 4)) + counts
    return ce + 1 - ((2 * intersection[1:] + 1) / (total[1:] + 1)).mean()


def predict_volume(encoder: nn.Module, decoder: FeatureDecoder, image: np.ndarray, window: int = 96, overlap: float = 0.25, atlas: bool = True, registration: bool = True) -> np.ndarray:
    """Class probabilities (C+1, D, H, W) on the model grid: Gaussian-blended sliding windows of
    encoder + decoder (each window no larger than the volume, rounded up to the encoder's multiple),
    pooled with the decoder's label atlas and its registered atlases' votes where it has them
    (`atlas`, `registration` False: without them)."""
    from monai.inferers import sliding_window_inference

    multiple = encoder.config.window_multiple
    roi = [min(_round_up(s, multiple), _round_up(window, multiple)) for s in image.shape]
    decoder.eval()

    def run(batch: torch.Tensor) -> torch.Tensor:
        return decoder(batch, encoder_levels(encoder, batch))

    with torch.no_grad(), flush_denormals():
        logits = sliding_window_inference(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None], roi, 2, run, overlap=overlap, mode="gaussian", padding_mode="replicate")
    probabilities = logits[0].softmax(0).numpy()
    if atlas and decoder.uses_atlas:
        probabilities = pool_with_atlas(probabilities, decoder.atlas.cpu().numpy(), float(decoder.atlas_weight))
    if registration and decoder.registration is not None:
        probabilities = decoder.registration.pool(probabilities, image)
    return probabilities


def _dice(prediction: np.ndarray, targets: np.ndarray, num_classes: int) -> float:
    known = targets != IGNORE
    scores = []
    for cls in range(1, num_classes + 1):
        a, b = (prediction == cls) & known, (targets == cls) & known
        if a.any() or b.any():
            scores.append(2 * float((a & b).sum()) / float(a.sum() + b.sum()))
    return float(np.mean(scores)) if scores else 0.0


def train_decoder(
    encoder: nn.Module,
    volumes: Sequence[LabelledVolume],
    num_classes: int,
    class_names: Sequence[str],
    budget_s: float,
    seed: int = 0,
    progress: Optional[Progress] = None,
    should_stop: Callable[[], bool] = lambda: False,
    batch: int = 2,
    lr: float = 6e-3,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    max_steps: Optional[int] = None,
    atlas: Optional[bool] = None,
    registration: bool = True,
) -> Tuple[FeatureDecoder, Dict[str, Any]]:
    """Train a decoder over the frozen `encoder` for `budget_s` seconds of wall time (or until
    `should_stop()` or `max_steps`); returns the chosen state and a summary for the card.

    `atlas` (default: with MIN_ATLAS_VOLUMES or more volumes) keeps the volumes' label atlas for
    pooling; its weight is chosen on the held-out volume (whose atlas leaves it out) when there is
    one, else DEFAULT_ATLAS_WEIGHT. `registration` (with MIN_REGISTRATION_VOLUMES or more volumes
    whose grid spacing is known) keeps the volumes themselves for multi-atlas registration at
    inference, its pooling weight chosen on the held-out volume in the same way."""
    encoder.eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    torch.manual_seed(seed)
    use_atlas = len(volumes) >= MIN_ATLAS_VOLUMES if atlas is None else bool(atlas)
    decoder = FeatureDecoder(level_channels(encoder), num_classes, widths, use_atlas)
    # The network alone is trained and its checkpoint chosen; the atlas is pooled in afterwards.
    trained, summary = train_segmenter(decoder, lambda x: decoder(x, encoder_levels(encoder, x)), lambda image: predict_volume(encoder, decoder, image, atlas=False),
                                       volumes, num_classes, class_names, budget_s, encoder.config.window_multiple, seed, progress, should_stop, batch, lr, max_steps)
    summary = {"mode": "decoder", "trainable_parameters": int(sum(p.numel() for p in decoder.parameters())), **summary}
    if use_atlas:
        summary["atlas"] = _fit_atlas(encoder, trained, volumes, num_classes)
    if registration and len(volumes) >= MIN_REGISTRATION_VOLUMES and all(v.spacing_zyx is not None for v in volumes):
        summary["registration"] = _fit_registration(encoder, trained, volumes, num_classes, progress)
    return trained, summary


def _fit_registration(encoder: nn.Module, decoder: FeatureDecoder, volumes: Sequence[LabelledVolume], num_classes: int, progress: Optional[Progress]) -> Dict[str, Any]:
    """Keep the volumes as registration atlases; choose the pooling weight on the held-out volume,
    with the votes of the other volumes' atlases."""
    started = time.perf_counter()
    spacing = volumes[0].spacing_zyx
    assert spacing is not None
    prior = AtlasPrior([make_atlas(v.image, v.targets, spacing) for v in volumes], spacing, num_classes)
    decoder.registration = prior
    if len(volumes) < HOLD_OUT_FROM:
        return {"volumes": len(volumes), "weight": prior.weight, "chosen_by": "default (no held-out volume)", "seconds": round(time.perf_counter() - started, 2)}
    if progress is not None:
        progress.update("register", 0.0, f"registering {len(volumes) - 1} labelled volumes onto the held-out one")
    held_out = volumes[-1]
    probabilities = predict_volume(encoder, decoder, held_out.image, registration=False)
    fraction = votes(held_out.image, spacing, prior.atlases[:-1], num_classes)
    prior.weight, scores = choose_weight(probabilities, fraction, lambda labels: _dice(labels, held_out.targets, num_classes))
    return {"volumes": len(volumes), "weight": prior.weight, "chosen_by": "held-out volume", "held_out_dice_by_weight": scores, "seconds": round(time.perf_counter() - started, 2)}


def _fit_atlas(encoder: nn.Module, decoder: FeatureDecoder, volumes: Sequence[LabelledVolume], num_classes: int) -> Dict[str, Any]:
    """Store the atlas of all volumes; choose its weight on the held-out volume, pooled with the atlas of the others."""
    decoder.atlas.copy_(torch.from_numpy(label_atlas([v.targets for v in volumes], num_classes)))
    if len(volumes) < HOLD_OUT_FROM:
        decoder.atlas_weight.fill_(DEFAULT_ATLAS_WEIGHT)
        return {"volumes": len(volumes), "weight": DEFAULT_ATLAS_WEIGHT, "chosen_by": "default (no held-out volume)"}
    held_out = volumes[-1]
    probabilities = predict_volume(encoder, decoder, held_out.image, atlas=False)
    others = label_atlas([v.targets for v in volumes[:-1]], num_classes)
    scores = {w: _dice(pool_with_atlas(probabilities, others, w).argmax(0), held_out.targets, num_classes) for w in ATLAS_WEIGHTS}
    best = max(ATLAS_WEIGHTS, key=lambda w: (round(scores[w], 3), -abs(w - DEFAULT_ATLAS_WEIGHT)))  # ties: the default
    decoder.atlas_weight.fill_(best)
    return {"volumes": len(volumes), "weight": best, "chosen_by": "held-out volume", "held_out_dice_by_weight": {str(w): round(s, 4) for w, s in scores.items()}}


def train_segmenter(
    net: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    predict: Callable[[np.ndarray], np.ndarray],
    volumes: Sequence[LabelledVolume],
    num_classes: int,
    class_names: Sequence[str],
    budget_s: float,
    multiple: int,
    seed: int = 0,
    progress: Optional[Progress] = None,
    should_stop: Callable[[], bool] = lambda: False,
    batch: int = 2,
    lr: float = 6e-3,
    max_steps: Optional[int] = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """The training loop shared by the decoder and the from-scratch U-Net it is compared with (same
    crops, augmentation, loss, schedule and checkpoint choice; only the network differs).

    `forward(x)` gives logits for a (B, 1, d, h, w) batch, `predict(image)` probabilities for a whole
    model-grid volume (held-out checks). `max_steps` ends the schedule after that many steps if the
    budget has not ended it first (runs that must not depend on the machine's speed). The chosen state: best held-out Dice with ≥ 4 volumes (one
    held out), else the last one (the cosine schedule ends at zero learning rate)."""
    with flush_denormals():
        return _train(net, forward, predict, volumes, num_classes, class_names, budget_s, multiple, seed, progress, should_stop, batch, lr, max_steps)


def _train(net, forward, predict, volumes, num_classes, class_names, budget_s, multiple, seed, progress, should_stop, batch, lr, max_steps):
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    held_out = [volumes[-1]] if len(volumes) >= HOLD_OUT_FROM else []
    training = list(volumes[:-1]) if held_out else list(volumes)
    size = crop_shape([v.image.shape for v in training], multiple)
    flips = [] if lateralised(class_names) else [2]  # model grids are LPS: array axis 2 is left-right
    transform = augmentation(flips, seed)
    optimiser = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    check_every = max(15.0, budget_s / 12)
    best_dice, best_state, best_step, last_check = -1.0, None, 0, started
    history: List[Dict[str, Any]] = []
    step, loss_value, stopped_by = 0, float("nan"), "budget"

    def held_out_dice() -> float:
        net.eval()
        return float(np.mean([_dice(predict(v.image).argmax(0), v.targets, num_classes) for v in held_out]))

    while True:
        elapsed = time.perf_counter() - started
        done = max(elapsed / max(budget_s, 1e-6), step / max_steps if max_steps else 0.0)
        if done >= 1.0:
            stopped_by = "budget" if elapsed >= budget_s else "steps"
            break
        if should_stop():
            stopped_by = "user"
            break
        warm = min(1.0, (step + 1) / 20)
        for group in optimiser.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + np.cos(np.pi * done))
        images, labels = [], []
        for _ in range(batch):
            image, target = _draw_crop(training[int(rng.integers(len(training)))], size, rng)
            out = transform({"image": torch.from_numpy(image[None].astype(np.float32)), "label": torch.from_numpy(target[None].astype(np.float32))})
            images.append(torch.as_tensor(out["image"]).float())
            labels.append(torch.as_tensor(out["label"]).round().long()[0])
        x = torch.stack(images)
        y = torch.stack(labels)
        if not (y != IGNORE).any():
            continue
        net.train()
        loss = segmentation_loss(forward(x), y, num_classes)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step += 1
        loss_value = float(loss.item())
        now = time.perf_counter()
        if progress is not None and step % 5 == 0:
            progress.update("train", min(1.0, done), f"step {step}, loss {loss_value:.3f}")
        if held_out and now - last_check >= check_every:
            last_check = now
            dice = held_out_dice()
            history.append({"step": step, "seconds": round(now - started, 1), "loss": round(loss_value, 4), "held_out_dice": round(dice, 4)})
            if dice > best_dice:
                best_dice, best_step = dice, step
                best_state = {k: v.clone() for k, v in net.state_dict().items()}
    if held_out and step > 0:
        dice = held_out_dice()
        history.append({"step": step, "seconds": round(time.perf_counter() - started, 1), "loss": round(loss_value, 4), "held_out_dice": round(dice, 4)})
        # The last state (learning rate annealed to zero) unless an earlier one was clearly better on
        # the held-out volume: one volume's Dice is noisy (in a 5-crop hippocampus run it moved by
        # 0.03 between checks 25 s apart).
        if dice >= best_dice - SELECTION_MARGIN:
            best_dice, best_step, best_state = dice, step, None
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    summary = {
        "steps": step, "chosen_step": best_step if held_out else step, "crop": size, "batch": batch,
        "augmentation": {"affine": "rotation ±15°, scale ±15 %, shift ±4 voxels (p 0.8)", "elastic": "p 0.15", "flip": "left-right" if flips else "none (lateralised labels)",
                         "intensity": "gamma 0.7–1.5, scale ±15 %, shift ±0.15, noise 0.1 (p 0.3/0.3/0.3/0.15)"},
        "held_out_volumes": len(held_out), "held_out_dice": round(best_dice, 4) if held_out else None,
        "budget_s": round(budget_s, 1), "seconds": round(time.perf_counter() - started, 2), "stopped_by": stopped_by,
        "final_loss": round(loss_value, 4), "history": history,
    }
    return net, summary
