"""`med3dfm`: the command line, and what the Slicer module runs in a background process.

Errors the user can fix (Med3DFMError) print one line and exit 1; with `--progress json` an
`{"stage": "error", ...}` line is printed too so the Slicer panel can show it. A traceback appears
only with `--debug`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from Med3DFMLib import __version__
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.models.config import VARIANTS
from Med3DFMLib.progress import Progress, default_mode
from Med3DFMLib.registry.cli import add_models_parser
from Med3DFMLib.classify_cli import add_classify_parsers

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="med3dfm", description="Med3DFM: 3D medical foundation models for segmentation and classification.")
    parser.add_argument("--version", action="version", version=f"med3dfm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    segment = commands.add_parser("segment", help="segment a CT or MR volume into a Slicer .seg.nrrd")
    segment.add_argument("input", type=Path, help="volume file (NRRD, NIfTI, MHA, ...) or DICOM series folder")
    segment.add_argument("-o", "--output", type=Path, required=True, help="output segmentation, ending in .seg.nrrd")
    segment.add_argument("--model", help="registry model id or .safetensors file (default: the installed model whose domain fits the scan best)")
    segment.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    segment.add_argument("--labelmap", type=Path, help="also write a plain label map (e.g. OUT.nii.gz)")
    segment.add_argument("--table", type=Path, help="also write a .tsv table of segment volumes")
    segment.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap, 0..0.9 (default 0.25)")
    segment.add_argument("--no-overwrite", action="store_true", help="refuse to replace existing output files")
    segment.add_argument("--force", action="store_true", help="run --model even on a scan outside its declared domain (modality, field of view, "
                         "intensities); the job record says so")
    _add_common(segment)

    adapt = commands.add_parser("adapt", help="learn a new structure (few-shot segmentation) or a classifier from a few labelled scans")
    adapt.add_argument("--task", choices=["segment", "classify"], default="segment")
    adapt.add_argument("--image", type=Path, action="append", help="labelled image; repeat with --labels (segment) or --class (classify) for several")
    adapt.add_argument("--labels", type=Path, action="append", help="label map or .seg.nrrd for the --image before it (sparse slices are fine)")
    adapt.add_argument("--class", dest="classes", action="append", help="classify: the class of the --image before it")
    adapt.add_argument("--roi", type=Path, action="append", help="classify: region (label map or .seg.nrrd) of the --image before it")
    adapt.add_argument("--list", type=Path, help="classify: CSV with a header image,class[,roi][,mask] (paths relative to the CSV)")
    adapt.add_argument("--name", required=True, help='name of the structure(s) / adapter, e.g. "left atrium"')
    adapt.add_argument("-o", "--output", type=Path, required=True, help="adapter file (.safetensors)")
    adapt.add_argument("--mode", choices=["auto", "adapter", "prototype", "decoder"], default="auto",
                       help="adapter: a small MLP in seconds, for the scan you painted; decoder: a convolutional decoder trained with augmentation for "
                            "--budget-minutes, for other patients; prototype: training-free instant guess; auto (default): decoder for several "
                            "images or --dense labels, else adapter")
    adapt.add_argument("--budget-minutes", type=float, default=3.0, help="decoder: training time in minutes (default 3; more time, better model). "
                       "Ctrl-C, SIGTERM or creating the file OUTPUT.stop ends training early and keeps the best model so far")
    adapt.add_argument("--dense", action="store_true", help="labels cover the whole volume (every unlabelled voxel is background)")
    adapt.add_argument("--slice-axis", choices=["auto", "i", "j", "k"], default="auto", help="axis of the painted slices (default: the most sparsely labelled)")
    adapt.add_argument("--encoder", default="med3dfm-encoder-small", help="encoder id or file the adapter is trained on")
    adapt.add_argument("--segment", type=Path, help="also segment the first image with the new adapter into this .seg.nrrd")
    adapt.add_argument("--no-propagate", action="store_true", help="--segment: the adapter's answer alone, without the painted outlines and the image's edges")
    adapt.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    adapt.add_argument("--seed", type=int, default=0)
    _add_common(adapt)

    pretrain = commands.add_parser("pretrain", help="self-supervised pretraining of the encoder (torchrun for several GPUs/nodes)")
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
    _add_common(pretrain)

    add_classify_parsers(commands)
    add_models_parser(commands)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", choices=["json", "tqdm", "none"], default=None, help="progress reporting (default: a bar on a terminal)")
    parser.add_argument("--registry", help="model registry file to use instead of the bundled one (also MED3DFM_REGISTRY)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")


def _run(args: argparse.Namespace, progress: Progress) -> int:
    if args.command == "segment":
        from Med3DFMLib.segment import run_segment

        if not 0.0 <= args.overlap < 1.0:
            raise Med3DFMError("--overlap must be at least 0 and below 1")
        record = run_segment(
            args.input,
            args.output,
            args.model,
            device=args.device,
            labelmap=args.labelmap,
            table=args.table,
            overlap=args.overlap,
            registry=args.registry,
            overwrite=not args.no_overwrite,
            progress=progress,
            force=args.force,
        )
        if progress.mode != "json":
            segments = ", ".join(f"{s['name']} {s['volume_ml']:.2f} mL" for s in record["segments"])
            model = f"{record['model']['id']} {record['model']['version']}"
            domain = record["domain"]
            if domain["chosen"] == "best fit":
                model += " (chosen: it fits this scan best)"
            elif domain["forced"]:
                model += " (forced: the scan is outside its domain)"
            elif not domain["declared"]:
                model += " (its card declares no domain: the scan was not checked)"
            print(f"wrote {args.output} ({segments}) with {model} in {record['timings_s']['total']:.1f} s on {record['device']}")
        return 0
    if args.command == "adapt" and args.task == "classify":
        from Med3DFMLib.classify_cli import run_adapt_classify

        return run_adapt_classify(args, progress)
    if args.command == "adapt":
        from Med3DFMLib.fewshot.adapt import run_adapt

        if args.classes or args.list or args.roi:
            raise Med3DFMError("--class, --roi and --list belong to --task classify")
        args.image, args.labels = args.image or [], args.labels or []
        if not args.image or not args.labels:
            raise Med3DFMError("adapt needs --image and --labels (one --labels per --image)")
        if len(args.image) != len(args.labels):
            raise Med3DFMError(f"each --image needs its --labels ({len(args.image)} images, {len(args.labels)} label files)")
        record = run_adapt(
            list(zip(args.image, args.labels)), args.name, args.output, mode=args.mode, dense=args.dense, axis=args.slice_axis,
            encoder_spec=args.encoder, device_name=args.device, segment_output=args.segment, registry=args.registry, seed=args.seed, progress=progress,
            propagate=not args.no_propagate, budget_minutes=args.budget_minutes,
        )
        if progress.mode != "json":
            held = record["training"].get("held_out_dice")
            note = f", held-out Dice {held:.3f}" if held is not None else ""
            print(f"wrote {args.output} ({record['adapter']['parameters']} parameters{note}) in {record['timings_s']['total']:.1f} s")
        return 0
    if args.command == "pretrain":
        from Med3DFMLib.pretrain.cli import run_pretrain

        summary = run_pretrain(args, progress)
        if progress.mode != "json" and os.environ.get("RANK", "0") == "0":
            print(f"pretrained {summary['steps']} steps in {summary['seconds']:.0f} s → {args.output / 'encoder.safetensors'}")
        return 0
    if args.command in ("classify", "explain"):
        from Med3DFMLib.classify_cli import run_classify_command

        return run_classify_command(args, progress)
    if args.command == "models":
        from Med3DFMLib.registry.cli import run_models_command

        return int(run_models_command(args))
    raise AssertionError(f"unhandled command {args.command}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    mode = getattr(args, "progress", None) or default_mode()
    progress = Progress(mode)
    try:
        return _run(args, progress)
    except Med3DFMError as err:
        return _fail(str(err), progress, args)
    except KeyboardInterrupt:
        return _fail("cancelled", progress, args, code=130)
    except Exception as err:  # a bug or an unexpected environment problem: still one line
        if args.debug:
            raise
        return _fail(f"unexpected {type(err).__name__}: {err} (run with --debug for details)", progress, args)
    finally:
        progress.close()


def _fail(message: str, progress: Progress, args: argparse.Namespace, code: int = 1) -> int:
    if args.debug and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    if progress.mode == "json":
        sys.stdout.write(json.dumps({"stage": "error", "fraction": 1.0, "message": message}) + "\n")
        sys.stdout.flush()
    first_line = message.splitlines()[0] if message else "failed"
    print(f"med3dfm: error: {first_line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
