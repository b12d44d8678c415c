"""`med3dfm pretrain`: self-supervised pretraining of the encoder (one process, or every rank under torchrun)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from Med3DFMLib.commands.options import add_common_options
from Med3DFMLib.models.config import VARIANTS
from Med3DFMLib.progress import Progress

NAME = "pretrain"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    pretrain = subparsers.add_parser(NAME, help="self-supervised pretraining of the encoder (torchrun for several GPUs/nodes)")
    pretrain.add_argument("--data", type=Path, action="append", required=True, help="folder of scans, list file (one path per line) or prepared .npz archive; repeatable")
    pretrain.add_argument("--output", type=Path, required=True, help="run folder: archive, checkpoints, log.jsonl, encoder.safetensors")
    pretrain.add_argument("--max-steps", type=int, default=1000)
    pretrain.add_argument("--max-minutes", type=float, default=0.0, help="stop cleanly after this wall time (0 = no limit)")
    pretrain.add_argument("--batch", type=int, default=4, help="volumes per process per step")
    pretrain.add_argument("--window", type=int, default=128, help="crop size in voxels (multiple of 16; 128 gives an 8³ token grid)")
    pretrain.add_argument("--spacing", type=float, default=1.5, help="archive voxel spacing in mm")
    pretrain.add_argument("--lr", type=float, default=3e-4)
    pretrain.add_argument("--variant", choices=sorted(VARIANTS), default="small")
    pretrain.add_argument("--mask-ratio", type=float, nargs=2, default=(0.4, 0.75), metavar=("START", "END"))
    pretrain.add_argument("--mask-block", type=int, nargs=2, default=(1, 3), metavar=("START", "END"), help="block side in patches")
    pretrain.add_argument("--checkpoint-every", type=int, default=100)
    pretrain.add_argument("--activation-checkpointing", action="store_true")
    pretrain.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument("--name", default="med3dfm-encoder", help="model id written into the encoder's card")
    add_common_options(pretrain)
    return pretrain


def run(args: argparse.Namespace, progress: Progress) -> int:
    from Med3DFMLib.pretrain.cli import run_pretrain

    summary = run_pretrain(args, progress)
    if progress.mode != "json" and os.environ.get("RANK", "0") == "0":
        print(f"pretrained {summary['steps']} steps in {summary['seconds']:.0f} s → {args.output / 'encoder.safetensors'}")
    return 0
