"""Smoke test: scripts/evaluate_fewshot.py --quick runs end to end and writes sane outputs.

It runs on the small MED3DFM_DATA folder built from Testing/Data (the `evaluation_data` fixture:
six hippocampus crops), which gives the quick run the same within-volume crop (006) as the full
../shared/data; a `shared` check confirms that the script finds every file it names in the full folder.
About 90 s on a quiet 2-core machine (a third of it ITK loading its filters for Fill between slices) (no timing assertions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "evaluate_fewshot.py"
SHARED_DATA = ROOT.parent / "shared" / "data"
WITHIN = {"this-scan", "adapter-pretrained", "adapter-random", "prototype", "unet", "unet-3x", "random-walker", "fill-between-slices"}
ACROSS = {"decoder", "unet-aug", "unet-aug-3x", "adapter-pretrained", "adapter-random", "prototype", "unet", "multi-atlas"}


def test_quick_evaluation_writes_tables_json_and_plot(tmp_path: Path, evaluation_data: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, MED3DFM_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), MED3DFM_DATA=str(evaluation_data))
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    for name in ("fewshot_eval.md", "fewshot_eval.json", "fewshot_eval.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "fewshot_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    payload = json.loads((out / "fewshot_eval.json").read_text())
    within, across = payload["within"], payload["across"]
    assert {r["method"] for r in within} == WITHIN
    assert {r["method"] for r in across} == ACROSS
    for row in within + across:
        assert isinstance(row["dice"], float) and 0.0 <= row["dice"] <= 1.0, row
        assert row["adapt_s"] >= 0.0
    for row in within:
        assert row["scored_structure_voxels"] > 0 and row["segment_s"] >= 0.0
        # every slice but the painted ones is scored, and no painted (labelled) voxel is among the scored ones
        assert row["scored_slices"] == row["slice_count"] - len(set(row["slices"])) and row["scored_labelled_voxels"] == 0
    unet = [r for r in within + across if r["method"].startswith("unet")]
    assert all(r["steps"] >= 1 for r in unet)

    report = (out / "fewshot_eval.md").read_text()
    assert "Within one volume" in report and "Across volumes" in report
    assert "QUICK" in report
    assert {r["task"] for r in within} == {"hippocampus crop 006"}
    assert {r["test_cases"] for r in across} == {1}


@pytest.mark.shared
def test_every_file_the_evaluation_names_is_in_shared_data(monkeypatch) -> None:
    """The full evaluation's tasks and hippocampus split, on the whole of ../shared/data."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import evaluate_fewshot

    monkeypatch.setattr(evaluate_fewshot, "DATA", SHARED_DATA)
    pool, test = evaluate_fewshot.hippocampus_cases()
    assert (len(pool), len(test)) == (160, 40)
    tasks = evaluate_fewshot.within_tasks(False, 3)
    assert len(tasks) == 11 and [t.name for t in tasks if t.name.startswith("hippocampus crop")] == ["hippocampus crop 006", "hippocampus crop 161", "hippocampus crop 303"]
    for task in tasks:
        assert task.image.exists() and task.labels.is_file(), task.name
