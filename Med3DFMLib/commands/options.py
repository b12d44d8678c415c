"""Arguments that several `med3dfm` subcommands take, defined once so they read the same everywhere."""

from __future__ import annotations

import argparse

DEVICES = ("auto", "cpu", "cuda", "mps")


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """`--device auto|cpu|cuda|mps` (auto: CUDA when PyTorch sees a GPU, else Apple MPS, else the CPU)."""
    parser.add_argument("--device", choices=list(DEVICES), default="auto", help="auto (default): CUDA, else Apple MPS, else the CPU; `med3dfm devices` lists them")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """`--progress`, `--registry` and `--debug`, which every job subcommand takes after its own arguments."""
    parser.add_argument("--progress", choices=["json", "tqdm", "none"], default=None, help="progress reporting (default: a bar on a terminal)")
    parser.add_argument("--registry", help="model registry file to use instead of the bundled one (also MED3DFM_REGISTRY)")
    # SUPPRESS: a --debug given before the subcommand (on the main parser) is not reset to False here.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")


def add_licence_option(parser: argparse.ArgumentParser) -> None:
    """`--accept-licence`: the one acknowledgement a model (or encoder) whose licence restricts use needs
    before its first run (Med3DFMLib/registry/licences.py), the same for every job."""
    parser.add_argument("--accept-licence", action="store_true", help="acknowledge the licence of the model (and of the encoder it runs on) "
                        "when it restricts use (non-commercial, research only); remembered for that model")
