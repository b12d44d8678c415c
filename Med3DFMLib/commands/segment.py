"""`med3dfm segment`: one volume in, a Slicer `.seg.nrrd` out (optionally a label map and a volume table)."""

from __future__ import annotations

import argparse
from pathlib import Path

from Med3DFMLib.commands.options import add_common_options, add_device_option
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.progress import Progress

NAME = "segment"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    segment = subparsers.add_parser(NAME, help="segment a CT or MR volume into a Slicer .seg.nrrd")
    segment.add_argument("input", type=Path, help="volume file (NRRD, NIfTI, MHA, ...) or DICOM series folder")
    segment.add_argument("-o", "--output", type=Path, required=True, help="output segmentation, ending in .seg.nrrd")
    segment.add_argument("--model", help="registry model id or .safetensors file (default: the installed model whose domain fits the scan best)")
    add_device_option(segment)
    segment.add_argument("--labelmap", type=Path, help="also write a plain label map (e.g. OUT.nii.gz)")
    segment.add_argument("--table", type=Path, help="also write a .tsv table of segment volumes")
    segment.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap, 0..0.9 (default 0.25)")
    segment.add_argument("--no-overwrite", action="store_true", help="refuse to replace existing output files")
    segment.add_argument("--force", action="store_true", help="run --model even on a scan outside its declared domain (modality, field of view, "
                         "intensities); the job record says so")
    add_common_options(segment)
    return segment


def run(args: argparse.Namespace, progress: Progress) -> int:
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
