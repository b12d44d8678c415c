"""`med3dfm devices`: where jobs can run here (torch build, CUDA GPUs and driver, Apple MPS, CPU, RAM)."""

from __future__ import annotations

import argparse
import json

from Med3DFMLib.progress import Progress

NAME = "devices"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    devices = subparsers.add_parser(NAME, help="show the devices a job can run on (GPU, driver, torch build, RAM)")
    devices.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    return devices


def run(args: argparse.Namespace, progress: Progress) -> int:
    from Med3DFMLib.devices import describe, device_report

    report = device_report()
    print(json.dumps(report, indent=2) if args.json else describe(report))
    return 0
