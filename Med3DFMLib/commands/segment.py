"""`med3dfm segment`: one volume in, a Slicer `.seg.nrrd` out (optionally a label map and a volume table);
or a list of them with `--list FILE.csv --output-dir DIR` (Med3DFMLib/batch.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from Med3DFMLib.batch import add_output_dir_option, check_batch_arguments
from Med3DFMLib.confidence import DEFAULT_MEASURE, DEFAULT_THRESHOLD, MEASURES
from Med3DFMLib.commands.options import add_common_options, add_device_option, add_licence_option
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.progress import Progress

NAME = "segment"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    segment = subparsers.add_parser(NAME, help="segment a CT or MR volume into a Slicer .seg.nrrd")
    segment.add_argument("input", type=Path, nargs="?", help="volume file (NRRD, NIfTI, MHA, ...) or DICOM series folder (or use --list)")
    segment.add_argument("-o", "--output", type=Path, help="output segmentation, ending in .seg.nrrd")
    segment.add_argument("--list", type=Path, help="batch: CSV with a header: input[,output][,id] (inputs relative to the CSV's folder); needs --output-dir")
    add_output_dir_option(segment)
    segment.add_argument("--labelmaps", action="store_true", help="with --list: also write a label map NAME.nii.gz beside each NAME.seg.nrrd")
    segment.add_argument("--model", help="registry model id or .safetensors file (default: the installed model whose domain fits the scan best)")
    add_device_option(segment)
    segment.add_argument("--labelmap", type=Path, help="also write a plain label map (e.g. OUT.nii.gz)")
    segment.add_argument("--table", type=Path, help="also write a .tsv table of segment volumes")
    segment.add_argument("--color-table", type=Path, nargs="?", const=True, help="also write the model's label table as a Slicer colour table "
                         "(OUT.csv: names, colours, SNOMED CT terminology) for the plain label map; with --list give no file: NAME.csv beside each NAME.seg.nrrd")
    segment.add_argument("--confidence", type=Path, nargs="?", const=True, help="also write a per-voxel confidence volume on the input grid "
                         "(e.g. OUT_confidence.nii.gz): high where the model is sure, low at boundaries and on unfamiliar scans; with --list give no "
                         "file: NAME_confidence.nii.gz beside each NAME.seg.nrrd")
    segment.add_argument("--confidence-measure", choices=MEASURES, default=DEFAULT_MEASURE,
                         help="max-probability: the winning class's probability; entropy: 1 - entropy / log(classes) (default %(default)s)")
    segment.add_argument("--flag-below", type=float, default=DEFAULT_THRESHOLD,
                         help="with --confidence: list the segments holding most voxels below this confidence (default %(default)s)")
    segment.add_argument("--raw-label-names", action="store_true", help="name the segments exactly as the model card's labels (e.g. "
                         "'anterior hippocampus') instead of by their terminology (its type and modifier, e.g. 'Hippocampus')")
    segment.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap, 0..0.9 (default 0.25)")
    segment.add_argument("--lower-resolution", type=float, default=1.0, metavar="FACTOR",
                         help="run the model on a grid FACTOR times coarser than its own spacing (1-4; default 1): for a scan that does not fit "
                              "in memory otherwise (the memory error names the factor that fits); less detail, labels still on the scan's grid")
    segment.add_argument("--no-overwrite", action="store_true", help="refuse to replace existing output files")
    add_licence_option(segment)
    segment.add_argument("--force", action="store_true", help="run --model even on a scan outside its declared domain (modality, field of view, "
                         "intensities); the job record says so")
    add_common_options(segment)
    return segment


def run(args: argparse.Namespace, progress: Progress) -> int:
    from Med3DFMLib.segment import run_segment

    if not 0.0 <= args.overlap < 1.0:
        raise Med3DFMError("--overlap must be at least 0 and below 1")
    if check_batch_arguments(args, ["--output", "--labelmap", "--table"]):
        from Med3DFMLib.batch import SegmentTask, run_batch_command

        for option, value in (("--confidence", args.confidence), ("--color-table", args.color_table)):
            if isinstance(value, Path):
                raise Med3DFMError(f"with --list, give {option} without a file: each scan's goes beside its output (see --help)")
        task = SegmentTask(args.model, args.device, args.overlap, args.registry, args.force, args.labelmaps, overwrite=not args.no_overwrite,
                           accept_licence=args.accept_licence, confidence=args.confidence is True, confidence_measure=args.confidence_measure,
                           flag_below=args.flag_below, color_table=args.color_table is True, raw_label_names=args.raw_label_names,
                           lower_resolution=args.lower_resolution)
        return run_batch_command(task, args, progress)
    for option, value in (("--confidence", args.confidence), ("--color-table", args.color_table)):
        if value is True:
            raise Med3DFMError(f"{option} needs a file for one scan (without a file it goes with --list --output-dir)")
    if args.labelmaps:
        raise Med3DFMError("--labelmaps goes with --list; for one scan use --labelmap FILE")
    if args.input is None or args.output is None:
        raise Med3DFMError("give a scan and -o OUTPUT.seg.nrrd, or --list FILE.csv --output-dir DIR")
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
        confidence=args.confidence,
        confidence_measure=args.confidence_measure,
        flag_below=args.flag_below,
        color_table=args.color_table,
        accept_licence=args.accept_licence,
        raw_label_names=args.raw_label_names,
        lower_resolution=args.lower_resolution,
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
        if args.lower_resolution != 1.0:
            model += f" at {args.lower_resolution:g}x its spacing"
        print(f"wrote {args.output} ({segments}) with {model} in {record['timings_s']['total']:.1f} s on {record['device']}")
        if "confidence" in record:
            print(f"confidence ({record['confidence']['measure']}) in {args.confidence}; {record['confidence']['summary']}")
    return 0
