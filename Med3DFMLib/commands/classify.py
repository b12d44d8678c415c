"""`med3dfm classify`: class probabilities of one scan or a list, with a classification adapter; optional heatmap.

`--list FILE.csv -o TABLE.tsv` scores the list into one table; `--list FILE.csv --output-dir DIR` runs
it as a batch (Med3DFMLib/batch.py): one table per scan, a summary, resumable, shared under torchrun."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

from Med3DFMLib.batch import add_output_dir_option, check_batch_arguments
from Med3DFMLib.commands.options import add_common_options, add_device_option, add_licence_option
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.progress import Progress

NAME = "classify"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    classify = subparsers.add_parser(NAME, help="classify scans with a classification adapter; optional heatmap")
    classify.add_argument("input", type=Path, nargs="?", help="volume file or DICOM series folder (or use --list)")
    classify.add_argument("--list", type=Path, help="CSV with a header: image[,roi] (paths relative to the CSV's folder); "
                          "with --output-dir also input (for image), output and id columns")
    classify.add_argument("--model", required=True, help="classification adapter (.safetensors file or registry id)")
    classify.add_argument("--roi", type=Path, help="label map or .seg.nrrd: pool only inside it (matched in physical space)")
    classify.add_argument("-o", "--output", type=Path, help="result table (.tsv)")
    add_output_dir_option(classify)
    classify.add_argument("--heatmap", type=Path, help="also write a heatmap (float .nrrd on the input grid) for the predicted class")
    classify.add_argument("--heatmap-method", choices=["attention", "gradcam", "occlusion"], default="attention", help="attention (instant), gradcam, occlusion (slow reference)")
    classify.add_argument("--target", help="class the heatmap explains (default: the predicted class)")
    classify.add_argument("--prevalence", action="append", metavar="CLASS=P", help="expected share of CLASS among the scans to classify (repeatable); "
                          "probabilities are adjusted from the training prevalence the model's card states")
    add_device_option(classify)
    add_licence_option(classify)
    add_common_options(classify)
    return classify


def parse_prevalence(values: Optional[List[str]]) -> Optional[Dict[str, float]]:
    """{'mass': 0.2} from ['mass=0.2'] (None when none was given); one-line errors."""
    if not values:
        return None
    parsed: Dict[str, float] = {}
    for value in values:
        name, sep, number = value.partition("=")
        try:
            parsed[name.strip()] = float(number)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise Med3DFMError(f"--prevalence {value!r}: write CLASS=P, e.g. --prevalence mass=0.2")
    return parsed


def run(args: argparse.Namespace, progress: Progress) -> int:
    """Classify; exit code 1 when any list row failed (the table marks it ERROR)."""
    from Med3DFMLib.classify.data import ListRow, read_list
    from Med3DFMLib.classify.job import run_classify
    from Med3DFMLib.registry.licences import require_for

    if check_batch_arguments(args, ["--output", "--roi", "--heatmap", "--target"], list_alone=True):
        from Med3DFMLib.batch import ClassifyTask, run_batch_command

        require_for(args.model, args.accept_licence, args.registry)  # before any scan is read
        return run_batch_command(ClassifyTask(args.model, args.device, args.registry, parse_prevalence(args.prevalence)), args, progress)
    if (args.input is None) == (args.list is None):
        raise Med3DFMError("give either one scan or --list FILE.csv")
    if args.output is None:
        raise Med3DFMError("give -o TABLE.tsv (or --list FILE.csv --output-dir DIR for a batch)")
    if args.list is not None:
        if args.roi is not None:
            raise Med3DFMError("with --list, give ROIs in the list's roi column")
        rows = read_list(args.list, need_class=False)
    else:
        rows = [ListRow(str(args.input), args.input, roi=args.roi)]
    require_for(args.model, args.accept_licence, args.registry)
    record, failed = run_classify(rows, args.model, args.output, args.heatmap, args.heatmap_method, args.target, args.device, args.registry, progress,
                                  prevalence=parse_prevalence(args.prevalence))
    if progress.mode != "json":
        if len(rows) == 1 and not failed:
            result = record["results"][0]
            print(f"{Path(result['image']).name}: {result['prediction']} → {args.output} ({'calibrated' if record['calibration'].get('calibrated') else 'not calibrated'})")
        else:
            print(f"wrote {args.output}: {len(rows) - failed} scans classified, {failed} failed")
    if failed:
        progress.update("error", 1.0, f"{failed} of {len(rows)} rows failed; see {args.output}")
        print(f"med3dfm: error: {failed} of {len(rows)} rows failed (marked ERROR in {args.output})", file=sys.stderr)
        return 1
    return 0
