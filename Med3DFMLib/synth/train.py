"""Whole-brain segmentation learned from synthetic images alone (the SynthSeg recipe): the training loop.

Every step draws fresh (image, labels) pairs from `SynthGenerator` over the training label maps and
trains a segmentation model (the project's dual-branch encoder, initialised from the bundled
pretrained weights, plus the light decoder; or, `network="unet"`, MONAI's plain U-Net from scratch,
three times faster a step on a CPU) with cross-entropy + soft Dice on SynthSeg's 33 classes
(32 structures and background). Runs are meant to last hours in several parts:

* **exact resumption**: the batch of step `s` on rank `r` comes from a generator reseeded with
  (seed, s, r) and the learning rate is a function of `s`, so a checkpoint needs only the weights,
  the AdamW moments and the step. A resumed run continues the same sample sequence, never repeats
  it, and on the same device and thread count reaches bit-identical weights;
* **checkpoints**: one safetensors file each (model and flattened optimiser tensors, the JSON state
  in the file's metadata: step, seconds trained, sampler position, loss and validation history,
  config), written atomically: `last.safetensors`, and `best.safetensors` by validation Dice;
* **time budget**: `minutes` stops cleanly in time to validate and write the checkpoint; a
  checkpoint is also written every `checkpoint_minutes` and on SIGINT/SIGTERM;
* **validation**: two label maps (SynthSeg's training_seg_19 and _20) never reach the training
  sampler; from them a fixed set of whole-head images is synthesised once (fixed seed) and segmented
  with the library's sliding window; the score is the mean Dice over twelve structures (left and
  right averaged);
* **torchrun**: DDP (gloo on CPU, NCCL on CUDA, bf16 autocast there), one sample stream per rank;
  rank 0 validates and writes checkpoints and the log.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch
import torch.distributed as dist

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.io.atomic import atomic_path
from Med3DFMLib.synth.generator import SynthConfig, SynthGenerator
from Med3DFMLib.synth.labels import SYNTHSEG_OUTPUT_LABELS, load_label_table

HELD_OUT_MAPS = ("training_seg_19", "training_seg_20")
"""SynthSeg's last two training maps: kept for validation, never sampled for training."""

NUM_CLASSES = len(SYNTHSEG_OUTPUT_LABELS)
"""33 network outputs: class i is the FreeSurfer label SYNTHSEG_OUTPUT_LABELS[i] (0 = background)."""

INTENSITY_RULE: Dict[str, Any] = {"method": "percentile", "lower": 0.5, "upper": 99.5}
"""The MR normalisation of the other cards; training images get the same, so inference matches."""

VALIDATION_STRUCTURES: Dict[str, Tuple[int, ...]] = {
    "cerebral white matter": (2, 41),
    "cerebral cortex": (3, 42),
    "lateral ventricle": (4, 43),
    "thalamus": (10, 49),
    "caudate": (11, 50),
    "putamen": (12, 51),
    "pallidum": (13, 52),
    "hippocampus": (17, 53),
    "amygdala": (18, 54),
    "brain stem": (16,),
    "cerebellar cortex": (8, 47),
    "cerebellar white matter": (7, 46),
}
"""The twelve structures of issue 22, by FreeSurfer label (left, right)."""

CHECKPOINT_KEY = "med3dfm.synth_checkpoint"
CHECKPOINT_FORMAT = 1
PER_PART = ("maps", "output", "minutes", "max_steps", "checkpoint_minutes", "val_every", "log_every", "workers",
            "anneal_from", "anneal_to")
"""Settings a resumed part may change: where the files are, when to stop, save and report; never
what is learned (the same maps may sit elsewhere on another machine)."""


@dataclass
class SynthTrainConfig:
    maps: str
    """folder with training_seg_*.nii.gz and SynthSeg's label arrays."""
    output: str
    encoder: str = "med3dfm-encoder-small"
    """initial encoder weights: a registry id or an encoder .safetensors file; "" = random init."""
    encoder_config: Dict[str, Any] = field(default_factory=dict)
    """the encoder's size when `encoder` is "" (else read from the weights' card)."""
    decoder_dim: int = 32
    network: str = "dual-branch"
    """"dual-branch": the project's encoder + light decoder; "unet": MONAI's plain U-Net from scratch
    (a third of the step time on a CPU; `encoder` is then unused)."""
    unet_channels: Tuple[int, ...] = (16, 32, 64, 128, 256)
    moments_dtype: str = "float32"
    """dtype the AdamW moments are stored in: "bfloat16" halves a checkpoint (a 2 M-parameter U-Net's
    24 MB to 16 MB, under the repository's 20 MB file limit) at the cost of bit-exact resumption."""
    spacing: float = 2.0
    crop: int = 96
    batch: int = 1
    lr: float = 3e-4
    # Linear warmup, then constant, not cosine: a run is continued in parts for an open-ended number
    # of steps, and a cosine needs its end fixed up front (a resumed part would either restart the
    # decay or be stuck at its floor). SynthSeg itself trains at a constant learning rate. The
    # warmup keeps the fresh decoder's first large gradients from wrecking the pretrained encoder.
    # The last part may anneal (`anneal_from`, `anneal_to`) once the run's end is known.
    warmup_steps: int = 100
    anneal_from: int = 0
    anneal_to: int = 0
    """a closing part: the learning rate falls along a half cosine from `lr` at step `anneal_from`
    to 0 at `anneal_to`, where the run stops (0, 0: no annealing). Absolute steps, so an annealing
    part that is interrupted resumes on the same curve when given the same two numbers."""
    weight_decay: float = 0.01
    seed: int = 0
    held_out: Tuple[str, ...] = HELD_OUT_MAPS
    val_images_per_map: int = 4
    val_seed: int = 20_000
    val_every: int = 250
    """steps between validations (0: only when the run stops)."""
    max_steps: int = 0
    """stop at this total step (0: no limit)."""
    minutes: float = 0.0
    """wall-time budget of this part, validation and the last checkpoint included (0: no limit)."""
    checkpoint_minutes: float = 10.0
    log_every: int = 10
    workers: int = 0
    """DataLoader processes synthesising ahead (0: in the training process)."""

    def __post_init__(self) -> None:
        self.held_out = tuple(self.held_out)
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        if self.network not in ("dual-branch", "unet"):
            raise Med3DFMError(f"network must be dual-branch or unet, got {self.network!r}")
        if self.moments_dtype not in ("float32", "bfloat16"):
            raise Med3DFMError(f"moments_dtype must be float32 or bfloat16, got {self.moments_dtype!r}")
        if self.crop % 16:
            raise Med3DFMError(f"crop must be a multiple of the encoder's window multiple 16, got {self.crop}")
        if self.network == "unet":
            from Med3DFMLib.models.segmentation import unet_window_multiple

            multiple = unet_window_multiple(self.unet_channels)
            if self.crop % multiple:
                raise Med3DFMError(f"crop {self.crop} must be a multiple of {multiple} for a U-Net of {len(self.unet_channels)} levels")
        if (self.anneal_from or self.anneal_to) and not 0 <= self.anneal_from < self.anneal_to:
            raise Med3DFMError(f"annealing needs 0 <= anneal_from < anneal_to, got {self.anneal_from} and {self.anneal_to}")
        if self.spacing <= 0 or self.batch < 1 or self.val_images_per_map < 1:
            raise Med3DFMError("spacing must be positive, batch and val_images_per_map at least 1")

    def synth_config(self) -> SynthConfig:
        """The generator's recipe: SynthSeg's defaults at this spacing and crop."""
        return SynthConfig(target_spacing=self.spacing, crop_shape=self.crop)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "SynthTrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------- data


def map_name(path: Path) -> str:
    """A label map's name without its image suffixes (training_seg_19.nii.gz -> training_seg_19)."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def split_maps(folder: Union[str, Path], held_out: Sequence[str]) -> Tuple[List[Path], List[Path]]:
    """(training maps, held-out maps) of a SynthSeg-style folder; a held-out name that is not there
    is an error, so a typo cannot silently put a validation map into training."""
    folder = Path(folder)
    paths = sorted(folder.glob("training_seg_*.nii.gz"))
    if not paths:
        raise Med3DFMError(f"no training_seg_*.nii.gz label maps in {folder}")
    names = {map_name(p): p for p in paths}
    missing = [n for n in held_out if n not in names]
    if missing:
        raise Med3DFMError(f"held-out maps not found in {folder}: {', '.join(missing)}")
    training = [p for p in paths if map_name(p) not in held_out]
    if not training:
        raise Med3DFMError(f"every label map in {folder} is held out: nothing to train on")
    return training, [names[n] for n in held_out]


def normalise(image: np.ndarray) -> np.ndarray:
    """Percentile clip and standardisation as `preprocess.to_model_input` does for an MR card."""
    from Med3DFMLib.preprocess import intensity_stats

    low, high, shift, scale = intensity_stats(sitk.GetImageFromArray(image), INTENSITY_RULE)
    return ((np.clip(image, low, high) - shift) / scale).astype(np.float32)


_CLASS_OF_LABEL = np.zeros(max(SYNTHSEG_OUTPUT_LABELS) + 1, dtype=np.int64)
_CLASS_OF_LABEL[list(SYNTHSEG_OUTPUT_LABELS)] = np.arange(NUM_CLASSES)
_LABEL_OF_CLASS = np.array(SYNTHSEG_OUTPUT_LABELS, dtype=np.int64)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The generator seed of one step on one rank: well mixed, so neighbouring steps and ranks
    draw unrelated samples."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def synth_batch(generator: SynthGenerator, seed: int, step: int, rank: int, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images (B, 1, D, H, W) normalised, class indices (B, D, H, W)) of step `step` on `rank`."""
    generator.reseed(step_seed(seed, step, rank))
    images, targets = [], []
    for _ in range(batch):
        image, labels = generator.sample()
        images.append(torch.from_numpy(normalise(image[0].numpy())))
        targets.append(torch.from_numpy(_CLASS_OF_LABEL[labels.numpy()]))
    return torch.stack(images)[:, None], torch.stack(targets)


class SynthBatches(torch.utils.data.IterableDataset):
    """(step, images, targets) from `start` on; with DataLoader workers each takes every n-th step,
    and the loader's round-robin returns them in step order, so workers change speed, not samples."""

    def __init__(self, generator: SynthGenerator, seed: int, rank: int, batch: int, start: int) -> None:
        super().__init__()
        self.generator, self.seed, self.rank, self.batch, self.start = generator, seed, rank, batch, start

    def __iter__(self) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start + worker
        while True:
            yield (step, *synth_batch(self.generator, self.seed, step, self.rank, self.batch))
            step += workers


@dataclass
class ValidationSet:
    """Whole-head synthetic images of the held-out maps, drawn once with a fixed seed."""

    images: List[np.ndarray]   # normalised, (z, y, x)
    labels: List[np.ndarray]   # FreeSurfer label values, uint8
    names: List[str]

    @classmethod
    def synthesise(cls, paths: Sequence[Path], recipe: SynthConfig, per_map: int, seed: int) -> "ValidationSet":
        from dataclasses import replace

        table = load_label_table(paths[0].parent)
        images, labels, names = [], [], []
        for index, path in enumerate(paths):
            generator = SynthGenerator([path], replace(recipe, crop_shape=None), seed + index, table=table)
            for draw in range(per_map):
                image, label = generator.sample()
                images.append(normalise(image[0].numpy()))
                labels.append(label.numpy().astype(np.uint8))
                names.append(f"{map_name(path)}#{draw}")
        return cls(images, labels, names)

    def windows(self, crop: int) -> int:
        from Med3DFMLib.windows import count_windows

        return sum(count_windows(image.shape, (crop,) * 3, 0.25) for image in self.images)


def structure_dice(prediction: np.ndarray, truth: np.ndarray) -> Dict[str, float]:
    """Dice per structure of VALIDATION_STRUCTURES between two FreeSurfer label maps, left and
    right averaged; a side absent from both maps is left out, a structure absent on both sides is NaN."""
    scores: Dict[str, float] = {}
    for name, values in VALIDATION_STRUCTURES.items():
        sides = []
        for value in values:
            predicted, true = prediction == value, truth == value
            total = int(predicted.sum()) + int(true.sum())
            if total:
                sides.append(2.0 * int((predicted & true).sum()) / total)
        scores[name] = float(np.mean(sides)) if sides else float("nan")
    return scores


def validate(model: torch.nn.Module, data: ValidationSet, crop: int, device: torch.device) -> Dict[str, Any]:
    """Mean Dice over the twelve structures (and per structure), averaged over the held-out images,
    each segmented whole with the library's Gaussian-blended sliding window."""
    from Med3DFMLib.inference import predict_volume

    per_image = []
    for image, truth in zip(data.images, data.labels):
        probabilities = predict_volume(model, image, (crop,) * 3, device)
        per_image.append(structure_dice(_LABEL_OF_CLASS[probabilities.argmax(0)], truth))
    model.train()
    per_structure = {name: float(np.nanmean([s[name] for s in per_image])) for name in VALIDATION_STRUCTURES}
    return {"dice": float(np.nanmean(list(per_structure.values()))), "per_structure": per_structure}


# --------------------------------------------------------------------------- checkpoints


def learning_rate(config: SynthTrainConfig, step: int) -> float:
    """The rate of the update made at `step`: warmup, constant, and in a closing part the anneal."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.anneal_to > config.anneal_from and step >= config.anneal_from:
        progress = min(1.0, (step - config.anneal_from) / (config.anneal_to - config.anneal_from))
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr


def last_step(config: SynthTrainConfig) -> int:
    """The step a run stops at (0: none): `max_steps` or the anneal's end, whichever comes first."""
    ends = [end for end in (config.max_steps, config.anneal_to) if end > 0]
    return min(ends) if ends else 0


def write_checkpoint(path: Path, model: torch.nn.Module, optimiser: torch.optim.Optimizer, state: Dict[str, Any],
                     moments_dtype: str = "float32") -> None:
    """Model and AdamW tensors plus the JSON state in one safetensors file, renamed into place; the
    moments (not the step counts) in `moments_dtype`, read back as float32."""
    from safetensors.torch import save_file

    from Med3DFMLib.training import flatten_optimizer

    moments, groups = flatten_optimizer(optimiser.state_dict())
    if moments_dtype == "bfloat16":
        moments = {k: v.to(torch.bfloat16) if v.is_floating_point() and not k.endswith(".step") else v for k, v in moments.items()}
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"optimizer.{k}": v for k, v in moments.items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {CHECKPOINT_KEY: json.dumps({**state, "param_groups": groups})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def find_checkpoint(folder_or_file: Union[str, Path]) -> Path:
    """A checkpoint file, or a run folder's `last.safetensors`."""
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / "last.safetensors"
    if not path.is_file():
        raise Med3DFMError(f"--resume: no checkpoint at {path}")
    return path


def checkpoint_state(path: Union[str, Path]) -> Dict[str, Any]:
    """The JSON state of a checkpoint, without loading its tensors; a clear Med3DFMError for a
    file that is damaged or is not a checkpoint of this trainer."""
    from Med3DFMLib.weights import safetensors_metadata

    path = Path(path)
    text = safetensors_metadata(path).get(CHECKPOINT_KEY)
    if text is None:
        raise Med3DFMError(f"{path} is a safetensors file but not a synthetic-brain training checkpoint (no training state inside)")
    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        raise Med3DFMError(f"{path}: the training state inside is not valid JSON ({err})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or not isinstance(state.get("step"), int):
        raise Med3DFMError(f"{path}: the training state inside is not a format-{CHECKPOINT_FORMAT} checkpoint state")
    return state


def read_checkpoint(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, Any]]:
    """(model tensors, optimiser tensors, state) of a checkpoint (errors as `checkpoint_state`)."""
    from Med3DFMLib.weights import load_tensors

    state = checkpoint_state(path)
    tensors = load_tensors(path)
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    moments = {k[len("optimizer."):]: v.float() if v.dtype == torch.bfloat16 else v for k, v in tensors.items() if k.startswith("optimizer.")}
    if not model:
        raise Med3DFMError(f"{path}: the checkpoint holds no model weights")
    return model, moments, state


def config_for_resume(checkpoint: Union[str, Path], **changes: Any) -> SynthTrainConfig:
    """The saved run's settings with `changes`; changing what is learned (spacing, crop, lr, seed,
    ...) mid-run is an error, not a silent restart."""
    saved = SynthTrainConfig.from_dict(checkpoint_state(find_checkpoint(checkpoint))["config"])
    refused = sorted(k for k, v in changes.items() if k not in PER_PART and _comparable(v) != _comparable(getattr(saved, k)))
    if refused:
        shown = ", ".join(f"{k} {changes[k]!r} (the run has {getattr(saved, k)!r})" for k in refused)
        raise Med3DFMError(f"a resumed run keeps its training settings; these differ: {shown}")
    for name, value in changes.items():
        setattr(saved, name, value)
    return saved


def _comparable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _check_same_run(config: SynthTrainConfig, saved: Dict[str, Any]) -> None:
    """A resumed part must learn what the saved run learned (build it with `config_for_resume`)."""
    run = SynthTrainConfig.from_dict(saved)
    differ = [f.name for f in fields(SynthTrainConfig)
              if f.name not in PER_PART and _comparable(getattr(config, f.name)) != _comparable(getattr(run, f.name))]
    if differ:
        raise Med3DFMError(f"the config differs from the resumed run's in {', '.join(differ)} (use config_for_resume)")


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """No weight decay on biases, norms, position grids and tokens (decay would only shrink them)."""
    decay, plain = [], []
    for name, parameter in model.named_parameters():
        (decay if parameter.ndim > 1 and "pos" not in name and "token" not in name else plain).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_model(config: SynthTrainConfig) -> Tuple[torch.nn.Module, Optional[Dict[str, str]]]:
    """The segmentation model and where its encoder came from (None: random initialisation)."""
    from Med3DFMLib.models import EncoderConfig, SegmentationModel, UNetSegmentationModel

    torch.manual_seed(config.seed)
    if config.network == "unet":
        return UNetSegmentationModel(NUM_CLASSES, config.unet_channels), None
    if not config.encoder:
        if not config.encoder_config:
            raise Med3DFMError("no encoder weights given: an encoder_config is needed for a random initialisation")
        return SegmentationModel(EncoderConfig.from_dict(config.encoder_config), NUM_CLASSES, config.decoder_dim), None
    from Med3DFMLib.fewshot.adapt import load_encoder

    encoder = load_encoder(config.encoder)
    model = SegmentationModel(encoder.module.config, NUM_CLASSES, config.decoder_dim)
    model.encoder.load_state_dict(encoder.module.state_dict())
    config.encoder_config = encoder.module.config.to_dict()
    return model, {"id": encoder.id, "version": encoder.version, "sha256": encoder.sha256}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the loop


def train(config: SynthTrainConfig, resume: Optional[Union[str, Path]] = None,
          echo: Callable[[str], None] = _stderr) -> Dict[str, Any]:
    """Train (or continue) until `max_steps`, the time budget or a stop signal; rank 0 writes
    `<output>/last.safetensors`, `best.safetensors` and `log.jsonl`. Returns the run's summary."""
    from Med3DFMLib.cpu import flush_denormals
    from Med3DFMLib.inference import autocast_for
    from Med3DFMLib.training import StopRequest, distributed, unflatten_optimizer

    part_started = time.time()
    rank, world, device = distributed()
    say = echo if rank == 0 else (lambda _message: None)
    saved: Optional[Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, Any]]] = None
    if resume is not None:
        path = find_checkpoint(resume)
        saved = read_checkpoint(path)
        _check_same_run(config, saved[2]["config"])
        say(f"resuming {path} at step {saved[2]['step']}")
    output = Path(config.output)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)

    recipe = config.synth_config()
    training_maps, held_out_maps = split_maps(config.maps, config.held_out)
    generator = SynthGenerator(training_maps, recipe, table=load_label_table(config.maps))
    model, encoder_init = build_model(config) if saved is None else (None, saved[2]["encoder_init"])
    if model is None:
        from Med3DFMLib.models import build_segmentation_model

        model = build_segmentation_model(saved[2]["architecture"])
    model = model.to(device)
    optimiser = torch.optim.AdamW(_parameter_groups(model, config.weight_decay), lr=config.lr)
    step, seconds_before, history, validations, best = 0, 0.0, [], [], None
    parts: List[Dict[str, Any]] = []
    if saved is not None:
        weights, moments, state = saved
        try:
            model.load_state_dict({k: v.to(device) for k, v in weights.items()})
            optimiser.load_state_dict(unflatten_optimizer({k: v.to(device) for k, v in moments.items()}, state["param_groups"]))
        except (RuntimeError, KeyError, ValueError) as err:
            raise Med3DFMError(f"the checkpoint's tensors do not fit its model ({str(err).splitlines()[0]})") from None
        step, seconds_before = int(state["step"]), float(state["seconds"])
        history, validations, best, parts = list(state["history"]), list(state["validation"]), state["best"], list(state["parts"])
    start_step = step
    train_model: torch.nn.Module = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    validation = ValidationSet.synthesise(held_out_maps, recipe, config.val_images_per_map, config.val_seed) if rank == 0 else None
    say(f"{len(training_maps)} training maps, {len(held_out_maps)} held out ({', '.join(config.held_out)}), "
        f"{recipe.target_spacing} mm, crop {config.crop}, batch {config.batch} x {world}, {device}, "
        f"ready in {time.time() - part_started:.0f} s")

    def state_now() -> Dict[str, Any]:
        part = {"from_step": start_step, "to_step": step, "seconds": round(time.time() - part_started, 1),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "world_size": world, "threads": torch.get_num_threads()}
        return {
            "format": CHECKPOINT_FORMAT, "step": step, "seconds": round(seconds_before + time.time() - part_started, 1),
            "sampler": {"seed": config.seed, "next_step": step, "rule": "step s on rank r draws from SynthGenerator reseeded with SeedSequence([seed, s, r])"},
            "history": history, "validation": validations, "best": best, "parts": parts + [part],
            "config": asdict(config), "recipe": recipe.to_dict(), "architecture": model.architecture(),
            "encoder_init": encoder_init, "maps": {"training": [map_name(p) for p in training_maps], "held_out": list(config.held_out)},
            "class_labels": list(SYNTHSEG_OUTPUT_LABELS),
        }

    def run_validation() -> None:
        nonlocal best
        assert validation is not None
        tick = time.time()
        result = validate(model, validation, config.crop, device)
        entry = {"step": step, "dice": round(result["dice"], 4), "per_structure": {k: round(v, 4) for k, v in result["per_structure"].items()},
                 "seconds": round(time.time() - tick, 1)}
        validations.append(entry)
        _append_log(output, {"validation": entry})
        say(f"step {step}: validation Dice {entry['dice']:.4f} over {len(VALIDATION_STRUCTURES)} structures ({entry['seconds']:.0f} s)")
        if best is None or entry["dice"] > best["dice"]:
            best = {"step": step, "dice": entry["dice"]}
            write_checkpoint(output / "best.safetensors", model, optimiser, state_now(), config.moments_dtype)

    stop = StopRequest()
    batches = torch.utils.data.DataLoader(SynthBatches(generator, config.seed, rank, config.batch, step), batch_size=None,
                                          num_workers=config.workers, prefetch_factor=2 if config.workers else None)
    stream = iter(batches)
    step_seconds: Optional[float] = None
    last_save = time.time()
    end_step = last_step(config)
    window_started, window_steps = time.time(), 0
    stopped_by = "anneal" if end_step and end_step == config.anneal_to else "max_steps"
    model.train()
    with stop, flush_denormals():
        while end_step <= 0 or step < end_step:
            tick = time.time()
            drawn, images, targets = next(stream)
            assert drawn == step, (drawn, step)
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(config, step)
            with autocast_for(device):
                logits = train_model(images.to(device))
            loss = _loss(logits.float(), targets.to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            step += 1
            window_steps += 1
            took = time.time() - tick
            step_seconds = took if step_seconds is None else 0.8 * step_seconds + 0.2 * took

            if step % config.log_every == 0:
                value = loss.detach()
                if world > 1:
                    dist.all_reduce(value)
                    value /= world
                elapsed = time.time() - window_started
                entry = {"step": step, "loss": round(float(value), 5), "lr": learning_rate(config, step - 1),
                         "seconds": round(seconds_before + time.time() - part_started, 1),
                         "seconds_per_step": round(elapsed / window_steps, 3),
                         "samples_per_s": round(window_steps * config.batch * world / max(elapsed, 1e-9), 3)}
                history.append(entry)
                if rank == 0:
                    _append_log(output, entry)
                say(f"step {step}  loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  {entry['seconds_per_step']:.2f} s/step  "
                    f"{entry['samples_per_s']:.2f} samples/s")
                window_started, window_steps = time.time(), 0
            if rank == 0 and config.val_every > 0 and step % config.val_every == 0:
                run_validation()

            # stop on a signal, or when one more step would leave too little of the budget to validate
            # and save: the last validation's time, or before any a guess (a window's inference costs
            # about a fifth of a training step; a third leaves a margin), plus 10 s for the files
            if validations:
                reserve = validations[-1]["seconds"] + 10.0
            else:
                reserve = (validation.windows(config.crop) if validation else 0) * step_seconds / 3 + 10.0
            out_of_time = config.minutes > 0 and time.time() - part_started + step_seconds + reserve > config.minutes * 60
            want = 2.0 if stop() else 1.0 if out_of_time else 0.0
            if world > 1:
                flag = torch.tensor([want], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                want = float(flag.item())
            if want:
                stopped_by = "signal" if want == 2.0 else "budget"
                break
            if rank == 0 and config.checkpoint_minutes > 0 and time.time() - last_save > config.checkpoint_minutes * 60:
                write_checkpoint(output / "last.safetensors", model, optimiser, state_now(), config.moments_dtype)
                last_save = time.time()
    del stream
    if rank == 0:
        if stopped_by != "signal" and step > start_step and (not validations or validations[-1]["step"] != step):
            run_validation()
        write_checkpoint(output / "last.safetensors", model, optimiser, state_now(), config.moments_dtype)
        say(f"stopped at step {step} ({stopped_by}); checkpoint {output / 'last.safetensors'}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"steps": step, "part_steps": step - start_step, "stopped_by": stopped_by, "world_size": world,
            "seconds": round(time.time() - part_started, 1), "seconds_per_step": step_seconds,
            "validation": validations[-1] if validations else None, "best": best, "output": str(output)}


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice over the 32 structures (the few-shot decoder's loss)."""
    from Med3DFMLib.fewshot.decoder import segmentation_loss

    return segmentation_loss(logits, targets, NUM_CLASSES - 1)


def _append_log(output: Path, entry: Dict[str, Any]) -> None:
    with open(output / "log.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps(entry) + "\n")

