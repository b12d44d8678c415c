"""`med3dfm adapt`: learn a new structure (few-shot segmentation adapter or decoder) or a classifier from a
few labelled scans, on the frozen encoder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from Med3DFMLib.commands.options import add_common_options, add_device_option, add_licence_option
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.progress import Progress

NAME = "adapt"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    adapt = subparsers.add_parser(NAME, help="learn a new structure (few-shot segmentation) or a classifier from a few labelled scans")
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
    adapt.add_argument("--no-registration", action="store_true", help="decoder: keep no labelled images in the adapter file (by default the labelled "
                       "volumes are kept and registered onto each new scan to vote for its labels; the file is then as private as those images)")
    adapt.add_argument("--no-mirror", action="store_true", help="classify: do not also train on each scan mirrored left-right (for a task where left and right differ)")
    adapt.add_argument("--no-propagate", action="store_true", help="--segment: the adapter's answer alone, without the painted outlines and the image's edges")
    add_device_option(adapt)
    adapt.add_argument("--seed", type=int, default=0)
    add_licence_option(adapt)
    add_common_options(adapt)
    return adapt


def run(args: argparse.Namespace, progress: Progress) -> int:
    from Med3DFMLib.registry.licences import require_for

    require_for(args.encoder, args.accept_licence, args.registry, encoder=True)  # what is made on it inherits its licence
    if args.task == "classify":
        return _run_classifier(args, progress)
    from Med3DFMLib.fewshot.adapt import run_adapt

    if args.classes or args.list or args.roi or args.no_mirror:
        raise Med3DFMError("--class, --roi, --list and --no-mirror belong to --task classify")
    args.image, args.labels = args.image or [], args.labels or []
    if not args.image or not args.labels:
        raise Med3DFMError("adapt needs --image and --labels (one --labels per --image)")
    if len(args.image) != len(args.labels):
        raise Med3DFMError(f"each --image needs its --labels ({len(args.image)} images, {len(args.labels)} label files)")
    record = run_adapt(
        list(zip(args.image, args.labels)), args.name, args.output, mode=args.mode, dense=args.dense, axis=args.slice_axis,
        encoder_spec=args.encoder, device_name=args.device, segment_output=args.segment, registry=args.registry, seed=args.seed, progress=progress,
        propagate=not args.no_propagate, budget_minutes=args.budget_minutes, registration=not args.no_registration,
    )
    if progress.mode != "json":
        held = record["training"].get("held_out_dice")
        note = f", held-out Dice {held:.3f}" if held is not None else ""
        print(f"wrote {args.output} ({record['adapter']['parameters']} parameters{note}) in {record['timings_s']['total']:.1f} s")
    return 0


def _run_classifier(args: argparse.Namespace, progress: Progress) -> int:
    """`adapt --task classify`: rows from --image/--class[/--roi] pairs or from --list."""
    from Med3DFMLib.classify.data import ListRow, read_list
    from Med3DFMLib.classify.job import run_adapt_classify

    images: List[Path] = list(args.image or [])
    classes: List[str] = list(args.classes or [])
    rois: List[Path] = list(args.roi or [])
    if args.labels:
        raise Med3DFMError("--labels belongs to segmentation adapters; a classifier takes --class per --image (or --list)")
    if args.list is not None:
        if images or classes or rois:
            raise Med3DFMError("give either --list FILE.csv or --image/--class pairs, not both")
        rows = read_list(args.list, need_class=True)
    else:
        if not images:
            raise Med3DFMError("adapt --task classify needs --image X --class NAME (repeated) or --list FILE.csv")
        if len(classes) != len(images):
            raise Med3DFMError(f"each --image needs its --class ({len(images)} images, {len(classes)} classes)")
        if rois and len(rois) != len(images):
            raise Med3DFMError(f"give an --roi for every --image or for none ({len(images)} images, {len(rois)} ROIs)")
        rows = [ListRow(f"--image {i + 1} ({image.name})", image, cls, rois[i] if rois else None) for i, (image, cls) in enumerate(zip(images, classes))]
    record = run_adapt_classify(rows, args.name, args.output, encoder_spec=args.encoder, device_name=args.device, registry=args.registry,
                                seed=args.seed, progress=progress, mirror=not args.no_mirror)
    if progress.mode != "json":
        calibration = record["calibration"]
        oof = record["training"]["out_of_fold"]
        print(
            f"wrote {args.output} ({record['adapter']['parameters']} parameters, classes {', '.join(record['adapter']['classes'])}; "
            f"cross-validated accuracy {oof['accuracy']:.3f}, AUROC {oof['auroc']:.3f}, held-out ECE {oof['ece_held_out']:.3f}; "
            f"{'calibrated' if calibration['calibrated'] else 'not calibrated'}, T={calibration['temperature']:.3g}) in {record['timings_s']['total']:.1f} s"
        )
    return 0
