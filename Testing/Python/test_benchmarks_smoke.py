"""The benchmark scripts run end to end at tiny sizes and write complete reports.

No timing is asserted (speed is reported by `benchmarks/run_all.py`, never tested): only that every
expected row is there and every measured number parses as a positive value.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WINDOW_ROWS = [
    "Med3DFM encoder (small)",
    "Med3DFM segmenter (small, 14 classes)",
    "SwinUNETR (feature 48, 14 classes)",
    "SwinUNETR encoder (swinViT)",
    "UNETR (ViT-B, 14 classes)",
    "UNETR encoder (ViT-B)",
]
STAGES = ["load", "preprocess", "infer", "postprocess", "write"]


def _table_row(text: str, label: str) -> list:
    """Cells of the first Markdown table row whose first cell starts with `label`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(label):
            return cells
    raise AssertionError(f"no table row {label!r} in the report")


def _number(cell: str) -> float:
    match = re.search(r"-?[\d,]*\.?\d+", cell.replace("*", ""))
    assert match, f"no number in {cell!r}"
    return float(match.group(0).replace(",", ""))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_files_written(smoke_run: Path) -> None:
    for name in ("benchmarks.md", "accuracy.md", "window.md", "window.json", "volume.md", "volume.json", "scaling.md", "scaling.json", "summary.json"):
        assert (smoke_run / name).stat().st_size > 0, name
    scaling = json.loads((smoke_run / "scaling.json").read_text())
    for plot in scaling.get("plots", []):  # only when matplotlib is installed
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_window_table(smoke_run: Path) -> None:
    report = (smoke_run / "benchmarks.md").read_text(encoding="utf-8")
    for label in WINDOW_ROWS:
        cells = _table_row(report, label)
        params, gflops, seconds = (_number(c) for c in cells[1:4])
        assert params > 0 and gflops > 0 and seconds > 0, cells
    data = json.loads((smoke_run / "window.json").read_text())
    assert data["peak_matmul"]["2"]["flops_per_s"] > 0
    for key, entry in data["models"].items():
        assert entry["flops"] > 0 and entry["params"] > 0, key
        assert all(t > 0 for t in entry["seconds"]["2"]["runs"]), key
        assert entry["fraction_of_peak"]["2"] > 0, key
        assert entry["ratio_vs_med3dfm"]["seconds"]["2"] > 0, key
    # The peers cost more per window than Med3DFM, whatever the machine (FLOPs, not time).
    assert data["models"]["swinunetr"]["flops"] > data["models"]["med3dfm_segmenter"]["flops"]


def test_volume_and_scaling(smoke_run: Path) -> None:
    report = (smoke_run / "benchmarks.md").read_text(encoding="utf-8")
    for stage in STAGES + ["**total**"]:
        assert _number(_table_row(report, stage)[1]) >= 0
    assert _number(_table_row(report, "**total**")[1]) > 0
    assert "SwinUNETR (`sliding_window_inference`)" in report
    volume = json.loads((smoke_run / "volume.json").read_text())
    assert volume["med3dfm"]["input_size"] == [64, 64, 40]
    assert volume["med3dfm"]["peak_rss_bytes"] > 0
    assert volume["peer"]["swin_s_per_window"] > 0 and volume["peer"]["med3dfm_s_per_window"] > 0
    scaling = json.loads((smoke_run / "scaling.json").read_text())
    assert len(scaling["size"]) >= 4 and [p["overlap"] for p in scaling["overlap"]] == [0, 0.25, 0.5, 0.75]
    for point in scaling["size"] + scaling["overlap"]:
        assert point["timings_s"]["total"] > 0 and point["peak_rss_bytes"] > 0 and point["windows"] >= 1


def test_budget_rows(smoke_run: Path) -> None:
    report = (smoke_run / "benchmarks.md").read_text(encoding="utf-8")
    for label in ("encoder ≤ 30 GFLOPs", "encoder ≤ 0.3 s", "512×512×300 CT segmented in ≤ 60 s", "512×512×300 CT segmented in ≤ 5 s"):
        cells = _table_row(report, label)
        assert cells[2] in {"n/a (smoke sizes)", "not measured"}, cells
    assert "## Machine" in report and "CPU:" in report
