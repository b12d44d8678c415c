#!/usr/bin/env python3
"""Train the whole-brain segmentation model on synthetic images alone (the SynthSeg recipe,
Med3DFMLib/synth/train.py), in resumable parts.

    python scripts/train_synth_brain.py --out build/synth_brain --minutes 60 --threads 2
    python scripts/train_synth_brain.py --resume build/synth_brain --minutes 60     # the next part
    python scripts/train_synth_brain.py --resume build/synth_brain --anneal 9000 12000  # a closing part
    torchrun --nproc_per_node 4 scripts/train_synth_brain.py --spacing 1 --crop 160 --workers 6 --minutes 120

A resumed part keeps the run's training settings (spacing, crop, batch, seed, ...); giving a
different one is an error. Ctrl-C (or SIGTERM) saves the checkpoint and stops.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from Med3DFMLib.errors import Med3DFMError  # noqa: E402
from Med3DFMLib.synth.train import SynthTrainConfig, config_for_resume, train  # noqa: E402

DEFAULT_OUT = ROOT / "build" / "synth_brain"
DEFAULT_MAPS = ROOT.parent / "shared" / "data" / "synthseg"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help=f"run folder (default {DEFAULT_OUT.relative_to(ROOT)}; with --resume: the resumed run's folder)")
    parser.add_argument("--resume", type=Path, help="a run folder (its last.safetensors) or a checkpoint file")
    parser.add_argument("--maps", type=Path, help=f"SynthSeg label maps (default {DEFAULT_MAPS})")
    parser.add_argument("--minutes", type=float, default=0.0, help="wall-time budget of this part (0: no limit)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop at this total step (0: no limit)")
    parser.add_argument("--anneal", type=int, nargs=2, metavar=("FROM", "TO"), default=(0, 0),
                        help="a closing part: cosine the learning rate from its value at step FROM to 0 at step TO, and stop there")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=0, help="processes synthesising images ahead (GPU runs want several)")
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0)
    parser.add_argument("--val-every", type=int, default=250, help="steps between validations (0: only at the end)")
    parser.add_argument("--log-every", type=int, default=10)
    # what is learned: fixed for a run, so None here means "the run's value" when resuming
    parser.add_argument("--spacing", type=float, help="mm (default 2; 1 for GPU runs)")
    parser.add_argument("--crop", type=int, help="training crop, voxels per axis, a multiple of 16 (default 96)")
    parser.add_argument("--batch", type=int, help="crops per step and process (default 1)")
    parser.add_argument("--seed", type=int, help="default 0")
    parser.add_argument("--lr", type=float, help="default 3e-4")
    parser.add_argument("--encoder", help="initial encoder: registry id or .safetensors (default med3dfm-encoder-small)")
    parser.add_argument("--network", choices=("dual-branch", "unet"), help="dual-branch: the project's encoder + decoder (default); "
                        "unet: MONAI's plain U-Net from scratch, a third of the step time on a CPU")
    parser.add_argument("--unet-channels", type=int, nargs="+", help="channels per U-Net level (default 16 32 64 128 256)")
    parser.add_argument("--moments-dtype", choices=("float32", "bfloat16"),
                        help="AdamW moments in the checkpoint (bfloat16: a smaller file, resumption not bit-exact)")
    args = parser.parse_args()

    torch.set_num_threads(max(1, args.threads))
    learned = {k: v for k, v in (("spacing", args.spacing), ("crop", args.crop), ("batch", args.batch), ("seed", args.seed),
                                 ("lr", args.lr), ("encoder", args.encoder), ("network", args.network),
                                 ("unet_channels", tuple(args.unet_channels) if args.unet_channels else None),
                                 ("moments_dtype", args.moments_dtype)) if v is not None}
    per_part = {"minutes": args.minutes, "max_steps": args.max_steps, "checkpoint_minutes": args.checkpoint_minutes,
                "val_every": args.val_every, "log_every": args.log_every, "workers": args.workers,
                "anneal_from": args.anneal[0], "anneal_to": args.anneal[1]}
    if args.maps is not None:
        per_part["maps"] = str(args.maps)
    try:
        if args.resume is not None:
            out = args.out or (args.resume if args.resume.is_dir() else args.resume.parent)
            config = config_for_resume(args.resume, output=str(out), **per_part, **learned)
        else:
            per_part.setdefault("maps", str(DEFAULT_MAPS))
            config = SynthTrainConfig(output=str(args.out or DEFAULT_OUT), **per_part, **learned)  # type: ignore[arg-type]
        summary = train(config, resume=args.resume)
    except Med3DFMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    best = summary["best"]
    print(f"{summary['steps']} steps ({summary['part_steps']} in this part, {summary['seconds']:.0f} s, stopped by {summary['stopped_by']}); "
          f"best validation Dice {best['dice'] if best else float('nan'):.4f} at step {best['step'] if best else '-'}; {summary['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
