"""`med3dfm`: the command line, and what the Slicer module runs in a background process.

Errors the user can fix (Med3DFMError) print one line and exit 1; with `--progress json` an
`{"stage": "error", ...}` line is printed too so the Slicer panel can show it. A traceback appears
only with `--debug`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from Med3DFMLib import __version__
from Med3DFMLib.commands import adapt, classify, devices, explain, pretrain, segment
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.progress import Progress, default_mode
from Med3DFMLib.registry.cli import add_models_parser

# Each adds its own parser and runs it; `med3dfm --help` lists them in this order, then `models`.
SUBCOMMANDS = (segment, adapt, pretrain, classify, explain, devices)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="med3dfm", description="Med3DFM: 3D medical foundation models for segmentation and classification.")
    parser.add_argument("--version", action="version", version=f"med3dfm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for subcommand in SUBCOMMANDS:
        subcommand.add_parser(commands)
    add_models_parser(commands)
    return parser


def _run(args: argparse.Namespace, progress: Progress) -> int:
    if args.command == "models":
        from Med3DFMLib.registry.cli import run_models_command

        return int(run_models_command(args))
    for subcommand in SUBCOMMANDS:
        if subcommand.NAME == args.command:
            return subcommand.run(args, progress)
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
