#!/usr/bin/env python3
"""Run every benchmark with its default settings and write the report `docs/benchmarks.md`.

    python benchmarks/run_all.py            # full run (CPU, 2 threads; about 15 minutes on 2 cores)
    python benchmarks/run_all.py --smoke    # tiny sizes, everything in one process (CI, < ~1 minute)
    python benchmarks/run_all.py --device cuda

Raw results (JSON, Markdown tables, PNG plots) go to `--out` (default `docs/benchmarks/`), the
report to `--report` (default `docs/benchmarks.md`; with `--smoke`, `<out>/benchmarks.md`).
The report marks the budgets of ARCHITECTURE.md as met or not met with the measured figure.
It also writes the accuracy summary (`accuracy_report.py`) beside the report: `docs/accuracy.md`,
or `<out>/accuracy.md` with `--smoke`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import accuracy_report  # noqa: E402
import bench_volume  # noqa: E402
import bench_window  # noqa: E402

# ARCHITECTURE.md, "Budgets" (one 96³ window, 2 CPU threads; a 512×512×300 CT).
ENCODER_GFLOPS_BUDGET = 30.0
ENCODER_SECONDS_BUDGET = 0.3
VOLUME_CPU_SECONDS_BUDGET = 60.0
VOLUME_GPU_SECONDS_BUDGET = 5.0
BUDGET_THREADS = "2"


def machine() -> Dict[str, Any]:
    import psutil
    import torch

    info: Dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "logical_cpus": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("Model name", info["cpu"])
        for key in ("Hypervisor vendor", "L2 cache", "L3 cache"):
            if key in fields:
                info[key.lower().replace(" ", "_")] = fields[key]
        flags = fields.get("Flags", "").split()
        info["vector_isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def window_args(smoke: bool, device: str, out: Path) -> List[str]:
    args = ["--device", device, "--out", str(out)]
    if smoke:
        # SwinUNETR needs ≥ 64³ (its bottleneck instance norm needs more than one voxel).
        args += ["--size", "32", "--swin-size", "64", "--threads", "2", "--repeats", "1", "--min-repeats", "1", "--in-process"]
    return args


def volume_args(smoke: bool, device: str, out: Path) -> List[str]:
    args = ["--device", device, "--out", str(out), "--scaling"]
    if smoke:
        args += [
            "--slices", "40", "--xy", "64", "--window", "64", "--swin-windows", "1",
            "--scaling-slices", "20,40,60,80", "--scaling-overlap-slices", "40", "--in-process",
        ]
    return args


def _verdict(value: Optional[float], budget: float, applicable: bool) -> str:
    if value is None:
        return "not measured"
    if not applicable:
        return "n/a (smoke sizes)"
    return "**met**" if value <= budget else "**not met**"


def targets(window: Dict[str, Any], volume: Dict[str, Any], smoke: bool) -> List[Dict[str, Any]]:
    encoder = window["models"].get("med3dfm_encoder")
    size = window["settings"]["size"]
    window_ok = not smoke and size == 96 and window["settings"]["device"] == "cpu"
    med = volume["med3dfm"]
    size_ok = med["input_size"] == [512, 512, 300]
    cpu = volume["settings"]["device"] == "cpu"
    whole = med["timings_s"]["total"] + med["load_model_s"] + med["imports_s"]
    seconds = encoder["seconds"].get(BUDGET_THREADS, {}).get("median") if encoder else None
    rows = [
        {
            "target": f"encoder ≤ {ENCODER_GFLOPS_BUDGET:g} GFLOPs per 96³ window",
            "measured": None if encoder is None else f"{encoder['gflops']:.2f} GFLOPs ({size}³)",
            "value": None if encoder is None else encoder["gflops"],
            "verdict": _verdict(None if encoder is None else encoder["gflops"], ENCODER_GFLOPS_BUDGET, not smoke and size == 96),
        },
        {
            "target": f"encoder ≤ {ENCODER_SECONDS_BUDGET:g} s per 96³ window on 2 CPU threads",
            "measured": None if seconds is None else f"{seconds:.3f} s ({size}³, {window['settings']['device']})",
            "value": seconds,
            "verdict": _verdict(seconds, ENCODER_SECONDS_BUDGET, window_ok),
        },
        {
            "target": f"512×512×300 CT segmented in ≤ {VOLUME_CPU_SECONDS_BUDGET:g} s on 2 CPU cores",
            "measured": f"{whole:.1f} s end to end incl. model loading and imports ({med['timings_s']['total']:.1f} s load→write); "
            f"{'×'.join(str(v) for v in med['input_size'])}, {volume['settings']['threads']} thread(s)",
            "value": whole if cpu else None,
            "verdict": _verdict(whole if cpu else None, VOLUME_CPU_SECONDS_BUDGET, size_ok and not smoke and volume["settings"]["threads"] == 2),
        },
        {
            "target": f"512×512×300 CT segmented in ≤ {VOLUME_GPU_SECONDS_BUDGET:g} s on one H100",
            "measured": f"{whole:.1f} s on {volume['settings']['device']}" if not cpu else "(CPU run; use --device cuda)",
            "value": whole if not cpu else None,
            "verdict": _verdict(whole if not cpu else None, VOLUME_GPU_SECONDS_BUDGET, size_ok and not smoke),
        },
    ]
    return rows


def _link(target: Path, report: Path) -> str:
    return os.path.relpath(target, report.parent).replace(os.sep, "/")


def report_markdown(info: Dict[str, Any], window: Dict[str, Any], volume: Dict[str, Any], rows: List[Dict[str, Any]], out: Path, report: Path, smoke: bool, wall: float) -> str:
    title = "# Med3DFM benchmarks" + (" (SMOKE RUN: tiny sizes, numbers meaningless)" if smoke else "")
    cpu = f"{info['cpu']}, {info['physical_cores']} cores / {info['logical_cpus']} logical CPUs"
    if info.get("hypervisor_vendor"):
        cpu += f" ({info['hypervisor_vendor']} VM)"
    lines = [
        title,
        "",
        f"Generated by `python benchmarks/run_all.py{' --smoke' if smoke else ''}` on {info['date_utc']} in {wall / 60:.1f} minutes. "
        "Raw results: " + ", ".join(f"[{name}]({_link(out / name, report)})" for name in ("window.json", "volume.json", "scaling.json")) + ".",
        "",
        "## Machine",
        "",
        f"- CPU: {cpu}; vector ISA: {', '.join(info.get('vector_isa', [])) or 'unknown'}",
        f"- Memory: {info['memory_gib']} GiB; GPU: {info['cuda'] or 'none'}",
        f"- {info['platform']}; Python {info['python']}, torch {info['torch']}, MONAI {info.get('monai', '?')}",
        "",
        "Timings are medians of repeats; where other processes share the machine, single runs can be several times slower (every run is listed in the JSON files).",
        "",
        "## Budgets (ARCHITECTURE.md)",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| {r['target']} | {r['measured'] or '–'} | {r['verdict']} |" for r in rows]
    lines += ["", "## Per window", "", bench_window.markdown(window), "## Whole volume", "", bench_volume.volume_markdown(volume)]
    scaling = volume.get("scaling")
    if scaling:
        text = bench_volume.scaling_markdown(scaling)
        for plot in scaling.get("plots", []):
            name = Path(plot).name
            text = text.replace(f"]({name})", f"]({_link(out / name, report)})")
        lines += ["## Scaling", "", text]
        for plot in scaling.get("plots", []):
            lines += [f"![{Path(plot).stem}]({_link(out / Path(plot).name, report)})", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat, in one process (CI)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="raw results folder (default docs/benchmarks)")
    parser.add_argument("--report", type=Path, default=None, help="report path (default docs/benchmarks.md; <out>/benchmarks.md with --smoke)")
    args = parser.parse_args(argv)
    out = args.out or (ROOT / "docs" / "benchmarks" if not args.smoke else ROOT / "benchmarks" / "results" / "smoke")
    report = args.report or (ROOT / "docs" / "benchmarks.md" if not args.smoke and args.out is None else out / "benchmarks.md")
    out.mkdir(parents=True, exist_ok=True)
    report.parent.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    info = machine()
    tick = time.perf_counter()
    window = bench_window.main(window_args(args.smoke, args.device, out))
    window_s = time.perf_counter() - tick
    tick = time.perf_counter()
    volume = bench_volume.main(volume_args(args.smoke, args.device, out))
    volume_s = time.perf_counter() - tick
    wall = time.perf_counter() - started
    rows = targets(window, volume, args.smoke)
    summary = {"machine": info, "targets": rows, "wall_seconds": {"window": window_s, "volume": volume_s, "total": wall}, "smoke": args.smoke}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    report.write_text(report_markdown(info, window, volume, rows, out, report, args.smoke, wall), encoding="utf-8")
    accuracy_report.main(["--out", str(report.parent / "accuracy.md")])
    print(f"[run_all] wrote {report} in {wall:.0f} s (window {window_s:.0f} s, volume {volume_s:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
