"""`med3dfm explain`: a heatmap of one segment of a segmentation model, or one class of a classifier."""

from __future__ import annotations

import argparse
from pathlib import Path

from Med3DFMLib.commands.options import add_common_options, add_device_option, add_licence_option
from Med3DFMLib.progress import Progress

NAME = "explain"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    explain = subparsers.add_parser(NAME, help="heatmap for one segment of a segmentation model or one class of a classifier")
    explain.add_argument("input", type=Path, help="volume file or DICOM series folder")
    explain.add_argument("--model", required=True, help="segmentation model, few-shot adapter or classification adapter")
    explain.add_argument("--target", required=True, help="segment or class name to explain")
    explain.add_argument("-o", "--output", type=Path, required=True, help="heatmap (.nrrd, float, input grid)")
    explain.add_argument("--method", choices=["gradcam", "occlusion", "attention"], default="gradcam", help="gradcam (default), occlusion (slow reference), attention (classifiers only)")
    explain.add_argument("--roi", type=Path, help="classifiers only: pool inside this region")
    add_device_option(explain)
    explain.add_argument("--force", action="store_true", help="segmentation models: explain even a scan outside the model's declared domain (the note says so)")
    add_licence_option(explain)
    add_common_options(explain)
    return explain


def run(args: argparse.Namespace, progress: Progress) -> int:
    from Med3DFMLib.explain.job import run_explain
    from Med3DFMLib.registry.licences import require_for

    require_for(args.model, args.accept_licence, args.registry)
    note = run_explain(args.input, args.model, args.target, args.output, args.method, args.roi, args.device, args.registry, progress, force=args.force)
    if progress.mode != "json":
        print(f"wrote {args.output} ({note['method']} heatmap of '{note['target']}') in {note['seconds']:.1f} s")
    return 0
