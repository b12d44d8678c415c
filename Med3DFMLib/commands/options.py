"""Arguments that several `med3dfm` subcommands take, defined once so they read the same everywhere."""

from __future__ import annotations

import argparse

DEVICES = ("auto", "cpu", "cuda")


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """`--device auto|cpu|cuda` (auto: CUDA when PyTorch sees a GPU)."""
    parser.add_argument("--device", choices=list(DEVICES), default="auto")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """`--progress`, `--registry` and `--debug`, which every job subcommand takes after its own arguments."""
    parser.add_argument("--progress", choices=["json", "tqdm", "none"], default=None, help="progress reporting (default: a bar on a terminal)")
    parser.add_argument("--registry", help="model registry file to use instead of the bundled one (also MED3DFM_REGISTRY)")
    # SUPPRESS: a --debug given before the subcommand (on the main parser) is not reset to False here.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
