"""`med3dfm pretrain`: builds the archive once (rank 0), then runs the engine on every rank."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Dict

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.models.config import VARIANTS
from Med3DFMLib.progress import Progress

ARCHIVE_WAIT_S = 3600


def prepare_archive(sources: list, output: Path, spacing: float, progress: Progress) -> Path:
    """The `.npz` archive to train on: given directly, or built into the run folder by rank 0."""
    if len(sources) == 1 and str(sources[0]).endswith(".npz"):
        return Path(sources[0])
    archive = output / "archive.npz"
    if archive.is_file():
        return archive
    if int(os.environ.get("RANK", "0")) == 0:
        from Med3DFMLib.pretrain.data import build_archive

        output.mkdir(parents=True, exist_ok=True)
        progress.update("prepare", 0.0, "reading and normalising the scans")
        summary = build_archive([Path(s) for s in sources], archive, (spacing,) * 3)
        progress.update("prepare", 1.0, f"{summary['volumes']} volumes cached")
        return archive
    deadline = time.time() + ARCHIVE_WAIT_S
    while not archive.is_file():  # written atomically by rank 0
        if time.time() > deadline:
            raise Med3DFMError(f"rank {os.environ.get('RANK')} gave up waiting for {archive}")
        time.sleep(2)
    return archive


def run_pretrain(args: argparse.Namespace, progress: Progress) -> Dict[str, Any]:
    from Med3DFMLib.pretrain.engine import PretrainConfig, pretrain
    from Med3DFMLib.pretrain.masking import MaskSchedule

    if args.max_steps < 1 or args.batch < 1:
        raise Med3DFMError("--max-steps and --batch must be positive")
    schedule = MaskSchedule(args.mask_ratio[0], args.mask_ratio[1], args.mask_block[0], args.mask_block[1])
    archive = prepare_archive(args.data, args.output, args.spacing, progress)
    config = PretrainConfig(
        archive=str(archive),
        output=str(args.output),
        encoder=VARIANTS[args.variant].to_dict(),
        window=args.window,
        batch=args.batch,
        max_steps=args.max_steps,
        lr=args.lr,
        warmup_steps=min(50, max(1, args.max_steps // 10)),
        masking=schedule.to_dict(),
        checkpoint_every=args.checkpoint_every,
        activation_checkpointing=args.activation_checkpointing,
        seed=args.seed,
        name=args.name,
        max_minutes=args.max_minutes,
    )
    return pretrain(config, resume=args.resume, progress=progress)
