"""`med3dfm models ...` and `setup_models.py ...`: one argparse definition used by both.

Subcommands: list [--json] [--all-versions] | download ID... | verify [ID...] | import PATH... |
remove ID... | sample ID [--output PATH] | color-table ID [--output OUT.csv] [--raw-label-names], each with --registry PATH and --progress json|tqdm|none. Errors the user can fix print one line
on stderr and exit 1; usage errors exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.progress import Progress, default_mode

COMMAND_DEST = "models_command"


def _common_options() -> argparse.ArgumentParser:
    # SUPPRESS keeps an option given before the subcommand (or by an outer parser) from being
    # overwritten by this level's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", metavar="PATH", default=argparse.SUPPRESS,
                        help="model registry file (default: $MED3DFM_REGISTRY or Resources/models.json)")
    common.add_argument("--progress", choices=("json", "tqdm", "none"), default=argparse.SUPPRESS,
                        help="progress output: JSON lines on stdout, a bar on stderr, or nothing")
    return common


def add_models_subcommands(parser: argparse.ArgumentParser) -> None:
    """Add list/download/verify/import/remove to `parser` (setup_models.py uses it at top level)."""
    common = _common_options()
    parser.add_argument("--registry", metavar="PATH", default=argparse.SUPPRESS,
                        help="model registry file (default: $MED3DFM_REGISTRY or Resources/models.json)")
    parser.add_argument("--progress", choices=("json", "tqdm", "none"), default=argparse.SUPPRESS,
                        help="progress output: JSON lines on stdout, a bar on stderr, or nothing")
    sub = parser.add_subparsers(dest=COMMAND_DEST, metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("list", parents=[common], help="list known models and where they are installed")
    p.add_argument("--json", action="store_true", help="print a JSON array (for scripts and the Slicer module)")
    p.add_argument("--all-versions", action="store_true", help="every known version of each model (default: the newest of each id)")
    p = sub.add_parser("download", parents=[common], help="download models into the user cache")
    p.add_argument("ids", nargs="+", metavar="ID", help="model id, or id@version")
    p = sub.add_parser("verify", parents=[common], help="recompute checksums of installed models")
    p.add_argument("ids", nargs="*", metavar="ID", help="model ids (default: every installed model)")
    p.add_argument("--json", action="store_true", help="print the results as a JSON array")
    p = sub.add_parser("import", parents=[common], help="install a .safetensors file or .zip bundle offline")
    p.add_argument("paths", nargs="+", metavar="PATH", help=".safetensors model file or .zip model bundle")
    p = sub.add_parser("remove", parents=[common], help="delete models from the user cache")
    p.add_argument("ids", nargs="+", metavar="ID", help="model id (all versions) or id@version")
    p = sub.add_parser("sample", parents=[common], help="download the model's sample scan (checked, cached) and print its path")
    p.add_argument("id", metavar="ID", help="model id, or id@version")
    p.add_argument("--output", type=Path, help="also copy it here (a file or a folder)")
    p = sub.add_parser("color-table", parents=[common], help="the model's label table as a Slicer colour table (.csv with terminology)")
    p.add_argument("id", metavar="ID", help="model id, or id@version")
    p.add_argument("--output", type=Path, help="write it here (.csv) instead of printing it")
    p.add_argument("--raw-label-names", action="store_true", help="the card's label names, as `segment --raw-label-names` names segments")
    parser.set_defaults(func=run_models_command)


def add_models_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `models` subcommand to another CLI's subparsers (used by `med3dfm`)."""
    parser = subparsers.add_parser(
        "models", help="list, download, verify, import and remove models",
        description="Manage Med3DFM models: the registry, the user cache and offline imports.",
    )
    add_models_subcommands(parser)
    return parser


def human_size(n: float) -> str:
    """A model's size as `models list` (and the Slicer module's Models table) shows it: 999 B, 10.2 MB."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} B"


def _print_table(rows: List[List[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _cmd_list(args: argparse.Namespace, registry: Optional[str]) -> int:
    from Med3DFMLib.registry.cache import models_home
    from Med3DFMLib.registry.manage import list_models, newest_versions

    listed = list_models(registry)
    rows = listed if args.all_versions else newest_versions(listed)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no models known")
        return 0
    table = [["ID", "VERSION", "TASK", "INSTALLED", "SIZE", "LICENCE"]]
    for row in rows:
        table.append([row["id"], row["version"], row["task"], row["installed"], human_size(row["size"]), row["licence"]])
    _print_table(table)
    older = len(listed) - len(rows)
    if older:
        print(f"\n{older} older version(s) not shown: --all-versions lists them (run one with --model ID@VERSION)")
    print(f"\ncache: {models_home()}")
    return 0


def _cmd_download(args: argparse.Namespace, registry: Optional[str], progress: Progress) -> int:
    from Med3DFMLib.registry.resolve import resolve_model

    for spec in args.ids:
        model = resolve_model(spec, registry=registry, progress=progress, allow_download=True)
        progress.close()
        if progress.mode == "json":
            print(json.dumps({"result": "installed", "id": model.id, "version": model.version,
                              "source": model.source, "path": str(model.weights)}), flush=True)
        elif model.source == "bundled":
            print(f"{model.id}@{model.version}: bundled with Med3DFM ({model.weights}); nothing to download")
        elif model.source == "cache":
            print(f"{model.id}@{model.version}: already installed ({model.weights})")
        else:
            print(f"{model.id}@{model.version}: installed ({model.weights})")
    return 0


def _cmd_verify(args: argparse.Namespace, registry: Optional[str]) -> int:
    from Med3DFMLib.registry.manage import verify_models

    checks = verify_models(args.ids, registry)
    failed = [c for c in checks if not c.ok]
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        if not checks:
            print("no installed models to verify")
        for c in checks:
            where = f"{c.location} {c.path}" if c.path else c.location
            print(f"{'OK  ' if c.ok else 'FAIL'} {c.id}@{c.version} {c.name} ({where}){'' if c.ok else ': ' + c.message}")
    if failed:
        print(f"error: {len(failed)} file(s) failed verification", file=sys.stderr)
        return 1
    return 0


def _cmd_import(args: argparse.Namespace, registry: Optional[str], progress: Progress) -> int:
    from Med3DFMLib.registry.manage import import_model

    for path in args.paths:
        for model in import_model(path, registry=registry, progress=progress):
            if progress.mode == "json":
                print(json.dumps({"result": "imported", "id": model.id, "version": model.version,
                                  "path": str(model.weights)}), flush=True)
            else:
                print(f"{model.id}@{model.version}: imported ({model.weights})")
    return 0


def _cmd_remove(args: argparse.Namespace, registry: Optional[str]) -> int:
    from Med3DFMLib.registry.manage import remove_model

    for spec in args.ids:
        result = remove_model(spec, registry)
        for folder in result.removed:
            print(f"removed {folder}")
        if result.bundled:
            print(f"{spec}: the copy bundled with Med3DFM stays ({result.bundled[0]}); bundled files are never removed")
    return 0


def _cmd_sample(args: argparse.Namespace, registry: Optional[str], progress: Progress) -> int:
    from Med3DFMLib.registry.samples import fetch_sample

    path = fetch_sample(args.id, registry, args.output, progress)
    progress.close()
    if progress.mode == "json":
        print(json.dumps({"result": "sample", "id": args.id, "path": str(path)}), flush=True)
    else:
        print(path)
    return 0


def _cmd_color_table(args: argparse.Namespace, registry: Optional[str]) -> int:
    from Med3DFMLib.io.atomic import write_text_atomic
    from Med3DFMLib.registry.resolve import newest_entry

    text = model_color_table(newest_entry(args.id, registry), args.raw_label_names)
    if args.output is None:
        sys.stdout.write(text)
    else:
        if not str(args.output).lower().endswith(".csv"):
            raise Med3DFMError(f"the colour table must end in .csv (what Slicer reads as a colour table): {args.output}")
        write_text_atomic(args.output, text)
        print(f"wrote {args.output}")
    return 0


def model_color_table(entry: Any, raw_label_names: bool = False) -> str:
    """A model's labels as the Slicer colour table that `segment --color-table` writes for it (the same
    names as its segments: terminology names unless `raw_label_names`). Resources/models/<id>.csv is this."""
    from Med3DFMLib.io.color_table import color_table_text
    from Med3DFMLib.io.segmentations import SegmentInfo
    from Med3DFMLib.io.terminology import segment_names

    labels = entry.get("labels") or []
    if not labels:
        raise Med3DFMError(f"model {entry.get('id')} has no label table (only segmentation models have one)")
    raw = raw_label_names or entry.get("task") != "segment"  # as named_segments in Med3DFMLib/segment.py
    names = segment_names(labels, raw=raw)
    return color_table_text([SegmentInfo.from_card({**label, "name": name}) for label, name in zip(labels, names)])


def run_models_command(args: argparse.Namespace) -> int:
    """Run a parsed `models` command; Med3DFMError -> one line on stderr and exit code 1."""
    registry = getattr(args, "registry", None)
    progress = Progress(getattr(args, "progress", None) or default_mode())
    command = getattr(args, COMMAND_DEST)
    try:
        if command == "list":
            return _cmd_list(args, registry)
        if command == "download":
            return _cmd_download(args, registry, progress)
        if command == "verify":
            return _cmd_verify(args, registry)
        if command == "import":
            return _cmd_import(args, registry, progress)
        if command == "remove":
            return _cmd_remove(args, registry)
        if command == "sample":
            return _cmd_sample(args, registry, progress)
        if command == "color-table":
            return _cmd_color_table(args, registry)
        raise AssertionError(f"unhandled models command {command!r}")
    except Med3DFMError as err:
        progress.close()
        if progress.mode == "json":  # the Slicer module reads errors from the JSON stream too
            print(json.dumps({"stage": "error", "fraction": 1.0, "message": str(err)}), flush=True)
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.close()
        print("error: interrupted (a partial download is kept and resumes next time)", file=sys.stderr)
        return 130
    finally:
        progress.close()


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Entry point of setup_models.py: the models subcommands at top level."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Manage Med3DFM models: list, download, verify, import (offline) and remove.",
    )
    add_models_subcommands(parser)
    args = parser.parse_args(argv)
    return run_models_command(args)
