"""The pretraining loop: one process or many under `torchrun` (DDP: NCCL on GPUs, gloo on CPU).

`max_minutes` time-boxes a run: after a few steps the measured speed (the slowest rank's) fixes
`max_steps`, so the learning-rate and masking schedules still run their whole course; the value is
saved in each checkpoint and a resumed run keeps it. A wall-clock check stays as a safety net.

Determinism is by construction: the batch and every random choice of step `s` on rank `r` come
from generators seeded with (seed, s, r), and the learning rate is a function of `s`. A checkpoint
therefore needs only the weights, the optimiser state and the step to resume exactly.
Checkpoints are safetensors + JSON (no pickles), written to a temporary folder and renamed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.models import VARIANTS, DualBranchEncoder, EncoderConfig
from Med3DFMLib.pretrain.data import Archive, random_batch
from Med3DFMLib.pretrain.decoder import MaskedVolumeModel
from Med3DFMLib.pretrain.masking import MaskSchedule, block_masks
from Med3DFMLib.progress import Progress
from Med3DFMLib.training import distributed, flatten_optimizer, unflatten_optimizer


PROBE_WARMUP, PROBE_STEPS = 10, 20


@dataclass
class PretrainConfig:
    archive: str
    output: str
    encoder: Dict[str, Any] = field(default_factory=lambda: VARIANTS["small"].to_dict())
    window: int = 128
    batch: int = 4  # per process
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.05
    masking: Dict[str, Any] = field(default_factory=lambda: MaskSchedule().to_dict())
    decoder_dim: int = 192
    decoder_depth: int = 4
    checkpoint_every: int = 100
    log_every: int = 10
    activation_checkpointing: bool = False
    seed: int = 0
    name: str = "med3dfm-encoder"
    max_minutes: float = 0.0  # fit the run into this wall time (0 = no limit), see `pretrain`


def learning_rate(config: PretrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def save_checkpoint(folder: Path, model: torch.nn.Module, optimiser: torch.optim.Optimizer, step: int, history: List[Dict[str, Any]], config: PretrainConfig) -> Path:
    from safetensors.torch import save_file

    target = folder / f"step_{step:07d}"
    staging = Path(tempfile.mkdtemp(prefix=".staging_", dir=folder))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(staging / "model.safetensors"))
        tensors, groups = flatten_optimizer(optimiser.state_dict())
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / "optimizer.safetensors"))
        (staging / "state.json").write_text(json.dumps({"step": step, "param_groups": groups, "history": history, "config": asdict(config)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def checkpoints_of(folder: Path) -> List[Tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    found = sorted(p for p in folder.glob("step_*") if (p / "state.json").is_file())
    return [(int(p.name.split("_")[1]), p) for p in found]


def latest_checkpoint(folder: Path) -> Optional[Path]:
    found = checkpoints_of(folder)
    return found[-1][1] if found else None


def pretrain(config: PretrainConfig, resume: bool = False, progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Run (or resume) pretraining; rank 0 writes checkpoints, the log and `encoder.safetensors`."""
    from safetensors.torch import load_file

    from Med3DFMLib.weights import write_weights

    rank, world, device = distributed()
    progress = progress if (progress is not None and rank == 0) else Progress("none")
    output = Path(config.output)
    checkpoints = output / "checkpoints"
    if rank == 0:
        checkpoints.mkdir(parents=True, exist_ok=True)
    archive = Archive.load(Path(config.archive))
    encoder_config = EncoderConfig.from_dict(config.encoder)
    if config.window % encoder_config.patch_size:
        raise Med3DFMError(f"--window must be a multiple of {encoder_config.patch_size}")
    torch.manual_seed(config.seed)
    model = MaskedVolumeModel(DualBranchEncoder(encoder_config), config.decoder_dim, config.decoder_depth).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos" not in n and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos" not in n and "token" not in n)]
    optimiser = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    start_step, history = 0, []
    if resume:
        found = latest_checkpoint(checkpoints) if checkpoints.is_dir() else None
        if found is None:
            raise Med3DFMError(f"--resume: no checkpoint in {checkpoints}")
        state = json.loads((found / "state.json").read_text())
        model.load_state_dict(load_file(str(found / "model.safetensors"), device=str(device)))
        optimiser.load_state_dict(unflatten_optimizer(load_file(str(found / "optimizer.safetensors"), device=str(device)), state["param_groups"]))
        start_step, history = int(state["step"]), list(state["history"])
        config.max_steps = int(state["config"]["max_steps"])  # the schedule the run was started with
        config.max_minutes = 0.0
    train_model: torch.nn.Module = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    schedule = MaskSchedule(**config.masking)
    grid = [config.window // encoder_config.patch_size] * 3
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    started = time.time()
    window_start, samples = time.time(), 0
    step = start_step
    model.train()
    while step < config.max_steps:
        generator = torch.Generator().manual_seed(((config.seed * 1_000_003) + step) * 1009 + rank)
        torch.manual_seed(((config.seed * 1_000_003) + step) * 1009 + rank)
        ratio, block = schedule.at(step / max(1, config.max_steps - 1))
        volume, target = random_batch(archive, config.batch, config.window, generator, device)
        mask = block_masks(config.batch, grid, ratio, block, generator).to(device)
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(config, step)
        with autocast:
            loss = train_model(volume, mask, target, checkpoint=config.activation_checkpointing)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        step += 1
        samples += config.batch * world
        if config.max_minutes > 0 and step == start_step + PROBE_WARMUP:
            probe_started = time.time()
        if config.max_minutes > 0 and step == start_step + PROBE_WARMUP + PROBE_STEPS:
            # Time-boxed run: fix the length (and so the lr and mask schedules) from measured speed,
            # timed after a few warm-up steps (allocator and kernel selection make the first slow).
            remaining = config.max_minutes * 60 * 0.95 - (time.time() - started)
            per_step = torch.tensor([(time.time() - probe_started) / PROBE_STEPS], device=device)
            if world > 1:
                dist.all_reduce(per_step, op=dist.ReduceOp.MAX)  # every rank must agree on the length
            per_step = float(per_step.item())
            config.max_steps = max(step + 1, min(config.max_steps, step + int(remaining / per_step)))
            config.warmup_steps = min(config.warmup_steps, max(1, config.max_steps // 10))
        if step % config.log_every == 0 or step == config.max_steps:
            value = loss.detach()
            if world > 1:
                dist.all_reduce(value)
                value /= world
            elapsed = time.time() - window_start
            entry = {"step": step, "loss": round(float(value), 5), "mask_ratio": round(ratio, 3), "block": block, "lr": learning_rate(config, step - 1), "samples_per_s": round(samples / max(elapsed, 1e-9), 2), "seconds": round(time.time() - started, 1)}
            history.append(entry)
            window_start, samples = time.time(), 0
            if rank == 0:
                with open(output / "log.jsonl", "a", encoding="utf-8") as log:
                    log.write(json.dumps(entry) + "\n")
            progress.update("pretrain", step / config.max_steps, f"step {step}, loss {entry['loss']:.4f}")
        out_of_time = config.max_minutes > 0 and (time.time() - started) > config.max_minutes * 60
        if world > 1:
            flag = torch.tensor([1.0 if out_of_time else 0.0], device=device)
            dist.all_reduce(flag)
            out_of_time = bool(flag.item() > 0)
        if step % config.checkpoint_every == 0 or step == config.max_steps or out_of_time:
            if rank == 0:
                save_checkpoint(checkpoints, model, optimiser, step, history, config)
            if world > 1:
                dist.barrier()
        if out_of_time:
            break
    summary = {"steps": step, "world_size": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "seconds": round(time.time() - started, 1), "final_loss": history[-1]["loss"] if history else None}
    if rank == 0:
        card = {
            "id": config.name,
            "version": "0.1.0",
            "task": "encoder",
            "architecture": {"type": "encoder", "encoder": encoder_config.to_dict()},
            "input": {"modality": "any", "spacing": list(archive.spacing), "window": [config.window] * 3, "intensity": {"method": "percentile", "lower": 0.5, "upper": 99.5}, "orientation": "LPS"},
            "training": {
                "method": "progressive volumetric masking + hierarchical encoder-driven decoder (hidden patches with content only, un-noised per-patch normalised targets)",
                "data": {"volumes": len(archive.volumes), "names": archive.names[:50], "spacing_mm": list(archive.spacing)},
                "config": asdict(config),
                "summary": summary,
                "loss_curve": history[:: max(1, len(history) // 100)],
            },
        }
        # float16 on disk halves the file (the bundled encoder must stay small); loading casts back.
        write_weights(output / "encoder.safetensors", {k: v.half() if v.is_floating_point() else v for k, v in model.encoder.state_dict().items()}, card)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    progress.update("done", 1.0, f"{step} steps")
    return summary
