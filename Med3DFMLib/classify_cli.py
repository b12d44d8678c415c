"""`med3dfm classify`, `med3dfm explain` and `med3dfm adapt --task classify`: argument parsing
and printing only; the work is in `Med3DFMLib.classify` and `Med3DFMLib.explain`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.progress import Progress


def add_classify_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the `classify` and `explain` subcommands."""
    from Med3DFMLib.cli import _add_common

    classify = subparsers.add_parser("classify", help="classify scans with a classification adapter; optional heatmap")
    classify.add_argument("input", type=Path, nargs="?", help="volume file or DICOM series folder (or use --list)")
    classify.add_argument("--list", type=Path, help="CSV with a header: image[,roi] (paths relative to the CSV's folder)")
    classify.add_argument("--model", required=True, help="classification adapter (.safetensors file or registry id)")
    classify.add_argument("--roi", type=Path, help="label map or .seg.nrrd: pool only inside it (matched in physical space)")
    classify.add_argument("-o", "--output", type=Path, required=True, help="result table (.tsv)")
    classify.add_argument("--heatmap", type=Path, help="also write a heatmap (float .nrrd on the input grid) for the predicted class")
    classify.add_argument("--heatmap-method", choices=["attention", "gradcam", "occlusion"], default="attention", help="attention (instant), gradcam, occlusion (slow reference)")
    classify.add_argument("--target", help="class the heatmap explains (default: the predicted class)")
    classify.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    _add_common(classify)

    explain = subparsers.add_parser("explain", help="heatmap for one segment of a segmentation model or one class of a classifier")
    explain.add_argument("input", type=Path, help="volume file or DICOM series folder")
    explain.add_argument("--model", required=True, help="segmentation model, few-shot adapter or classification adapter")
    explain.add_argument("--target", required=True, help="segment or class name to explain")
    explain.add_argument("-o", "--output", type=Path, required=True, help="heatmap (.nrrd, float, input grid)")
    explain.add_argument("--method", choices=["gradcam", "occlusion", "attention"], default="gradcam", help="gradcam (default), occlusion (slow reference), attention (classifiers only)")
    explain.add_argument("--roi", type=Path, help="classifiers only: pool inside this region")
    explain.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    explain.add_argument("--force", action="store_true", help="segmentation models: explain even a scan outside the model's declared domain (the note says so)")
    _add_common(explain)


def run_classify_command(args: argparse.Namespace, progress: Progress) -> int:
    """Run `classify` or `explain`; exit code 1 when any list row failed."""
    if args.command == "explain":
        from Med3DFMLib.explain.job import run_explain

        note = run_explain(args.input, args.model, args.target, args.output, args.method, args.roi, args.device, args.registry, progress, force=args.force)
        if progress.mode != "json":
            print(f"wrote {args.output} ({note['method']} heatmap of '{note['target']}') in {note['seconds']:.1f} s")
        return 0
    if args.command != "classify":
        raise AssertionError(f"unhandled command {args.command}")
    from Med3DFMLib.classify.data import ListRow, read_list
    from Med3DFMLib.classify.job import run_classify

    if (args.input is None) == (args.list is None):
        raise Med3DFMError("give either one scan or --list FILE.csv")
    if args.list is not None:
        if args.roi is not None:
            raise Med3DFMError("with --list, give ROIs in the list's roi column")
        rows = read_list(args.list, need_class=False)
    else:
        rows = [ListRow(str(args.input), args.input, roi=args.roi)]
    record, failed = run_classify(rows, args.model, args.output, args.heatmap, args.heatmap_method, args.target, args.device, args.registry, progress)
    if progress.mode != "json":
        if len(rows) == 1 and not failed:
            result = record["results"][0]
            print(f"{Path(result['image']).name}: {result['prediction']} → {args.output} ({'calibrated' if record['calibration'].get('calibrated') else 'not calibrated'})")
        else:
            print(f"wrote {args.output}: {len(rows) - failed} scans classified, {failed} failed")
    if failed:
        progress.update("error", 1.0, f"{failed} of {len(rows)} rows failed; see {args.output}")
        import sys

        print(f"med3dfm: error: {failed} of {len(rows)} rows failed (marked ERROR in {args.output})", file=sys.stderr)
        return 1
    return 0


def run_adapt_classify(args: argparse.Namespace, progress: Progress) -> int:
    """`adapt --task classify`: rows from --image/--class[/--roi] pairs or from --list."""
    from Med3DFMLib.classify.data import ListRow, read_list
    from Med3DFMLib.classify.job import run_adapt_classify as run

    images: List[Path] = list(getattr(args, "image", None) or [])
    classes: List[str] = list(getattr(args, "classes", None) or [])
    rois: List[Path] = list(getattr(args, "roi", None) or [])
    if getattr(args, "labels", None):
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
    record = run(rows, args.name, args.output, encoder_spec=args.encoder, device_name=args.device, registry=args.registry, seed=args.seed, progress=progress)
    if progress.mode != "json":
        calibration = record["calibration"]
        oof = record["training"]["out_of_fold"]
        print(
            f"wrote {args.output} ({record['adapter']['parameters']} parameters, classes {', '.join(record['adapter']['classes'])}; "
            f"cross-validated accuracy {oof['accuracy']:.3f}, AUROC {oof['auroc']:.3f}; "
            f"{'calibrated' if calibration['calibrated'] else 'not calibrated'}, T={calibration['temperature']:.3g}) in {record['timings_s']['total']:.1f} s"
        )
    return 0
