"""scripts/diagnose_pretraining.py on one real hippocampus crop: every feature set runs for both
encoders, the zeroed levels really are zero, and the report is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))


def test_feature_levels_are_zeroed_and_every_set_runs(tmp_path):
    import torch

    import diagnose_pretraining as diagnosis
    from Med3DFMLib.fewshot.features import VolumeFeatures

    maps = {s: torch.ones(2, 3, 3, 3) * s for s in (2, 4, 8, 16)}
    deep = diagnosis.keep_levels(VolumeFeatures(maps, (6, 6, 6), (16, 16, 16)), diagnosis.FEATURE_SETS["deep"])
    assert all(float(deep.maps[s].abs().sum()) == 0 for s in (2, 4)) and torch.equal(deep.maps[16], maps[16])
    assert float(maps[2].sum()) > 0  # the original is untouched

    assert diagnosis.main(["--structures", "hippocampus crop", "--seeds", "1", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "pretraining_diagnosis.json").read_text())
    runs = payload["runs"]
    assert {(r["encoder"], r["features"]) for r in runs} == {(e, f) for e in ("pretrained", "random-init") for f in diagnosis.FEATURE_SETS}
    assert all(r["dice"] is not None and 0.0 <= r["dice"] <= 1.0 for r in runs)
    # the structure is learned from the painted slices with every feature set
    assert np.mean([r["dice"] for r in runs if r["features"] == "all"]) > 0.3
    report = (tmp_path / "pretraining_diagnosis.md").read_text()
    assert "| hippocampus crop" in report and "Mean difference" in report
