"""`benchmarks/accuracy_report.py` turns the real evaluation JSON files into a complete, honest report.

The expected figures are recomputed here from the JSON (not copied from the report), so a report
that drops, misplaces or mis-rounds a number fails; a missing input must stop the run and leave no
file behind.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
REFERENCES = ROOT.parent / "shared" / "REFERENCES.md"


def _load_module():
    spec = importlib.util.spec_from_file_location("accuracy_report", ROOT / "benchmarks" / "accuracy_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


accuracy_report = _load_module()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("accuracy") / "accuracy.md"
    assert accuracy_report.main(["--out", str(out)]) == out
    assert not [p for p in out.parent.iterdir() if p.name != out.name], "temporary files left behind"
    return out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def fewshot() -> dict:
    return json.loads((DOCS / "fewshot_eval.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def classification() -> dict:
    return json.loads((DOCS / "classification_eval.json").read_text(encoding="utf-8"))


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = text.find("\n## ", start + 1)
    return text[start:] if following < 0 else text[start:following]


def _cells(text: str, *first: str) -> List[str]:
    """Cells of the first table row whose leading cells equal `first`."""
    for line in text.splitlines():
        if not line.startswith("| "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[: len(first)] == list(first):
            return cells
    raise AssertionError(f"no table row starting with {first!r}")


def _seed_stat(values: List[float]) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std():.3f}" if len(values) > 1 else f"{values.mean():.3f}"


def test_fewshot_numbers(report: str, fewshot: dict) -> None:
    within = _section(report, "## Few-shot segmentation within one volume")
    groups: Dict[tuple, List[float]] = {}
    for run in fewshot["within"]:
        groups.setdefault((run["task"], run["plane"], run["k"], run["method"]), []).append(run["dice"])
    for (task, plane, k, method), dice in groups.items():
        assert _seed_stat(dice) in _cells(within, task, plane, str(k)), (task, k, method)
    across = _section(report, "## Few-shot segmentation across volumes")
    groups = {}
    for run in fewshot["across"]:
        groups.setdefault((run["n"], run["method"]), []).append(run["dice"])
    for (n, method), dice in groups.items():
        assert _seed_stat(dice) in _cells(across, str(n)), (n, method)
    assert f"{fewshot['across_info']['demo_model']['dice']:.3f}" in across
    ours = [r for r in fewshot["within"] if r["method"] == "this-scan"]
    assert f"{np.mean([r['adapt_s'] for r in ours]):.2f}" in _cells(within, "**ours**: this scan (adapter + outlines + edges)")


def test_model_card_numbers(report: str) -> None:
    from Med3DFMLib.weights import read_card

    metrics = read_card(ROOT / "Resources" / "models" / "hippocampus-mr-demo.safetensors")["metrics"]
    section = _section(report, "## Segmentation: bundled model")
    for name, entry in metrics["dice"].items():
        assert _cells(section, name)[1:4] == [f"{entry['mean']:.3f}", f"{entry['std']:.3f}", f"{entry['min']:.3f}"]
    assert f"**{metrics['mean_dice']:.3f}**" in _cells(section, "**mean**")


def test_classification_numbers(report: str, classification: dict) -> None:
    adrenal = classification["adrenal"]
    section = _section(report, "## Classification: AdrenalMNIST3D")
    for key, summary in adrenal["summary"].items():
        draws = adrenal["settings"][key]
        label = f"all {draws[0]['n_train']:,}" if key == "all" else f"{key} per class"
        cells = _cells(section, label)
        for name in ("adapter_auroc", "adapter_accuracy", "ece_after", "lr_auroc", "lr_accuracy"):
            mean, std = summary[name]["mean"], summary[name]["std"]
            expected = f"{mean:.3f} ± {std:.3f}" if summary["draws"] > 1 else f"{mean:.3f}"
            assert expected in cells, (key, name, cells)
        resnet = draws[0]["baselines"].get("resnet10_1x")
        if resnet:
            assert any(c.startswith(f"{resnet['auroc']:.3f} / {resnet['accuracy']:.3f}") for c in cells), (key, cells)
    majority = max(adrenal["val_per_class"]) / sum(adrenal["val_per_class"])
    assert f"accuracy {majority:.3f}" in section
    lesion = _section(report, "## Classification: lesion present / absent")
    heat = _section(report, "## Heatmaps")
    for variant in classification["lesions"]["variants"].values():
        summary = variant["summary"]
        assert f"| {summary['auroc']:.3f} | {summary['accuracy']:.3f} |" in lesion
        for method, entry in summary["heatmaps"].items():
            assert f"| {entry['n']} | {entry['pointing']:.3f} | {entry['mass_inside']:.3f} |" in heat, method
        for key in ("attention_random_correlation", "gradcam_random_correlation"):
            assert f"| {summary[key]:.3f} |" in heat, key


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_peers_marked_and_transcribed(report: str) -> None:
    for peer in accuracy_report.PEERS:
        assert peer["protocol"] == "same" or peer["protocol"].startswith("different protocol: "), peer
        assert peer["value"] in peer["source"], peer
        assert peer["section"] in accuracy_report.SECTIONS, peer
    rows = 0
    for block in re.findall(r"\| peer \| task, metric \| published \| protocol \|\n\|[^\n]*\n((?:\|[^\n]*\n)+)", report):
        for line in block.splitlines():
            protocol = line.strip().strip("|").split("|")[3].strip()
            assert protocol == "same protocol" or protocol.startswith("different protocol: "), line
            rows += 1
    assert rows == len(accuracy_report.PEERS)
    assert report.count("**Where we lose, and to whom") == 6


@pytest.mark.shared
def test_peers_are_quoted_verbatim_from_the_shared_references() -> None:
    """Every published figure the report quotes is a line of ../shared/REFERENCES.md, word for word."""
    references = _norm(REFERENCES.read_text(encoding="utf-8"))
    for peer in accuracy_report.PEERS:
        assert _norm(peer["source"]) in references, peer["source"]


def test_missing_input_is_a_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "accuracy.md"
    missing = tmp_path / "nowhere" / "fewshot_eval.json"
    with pytest.raises(SystemExit) as excinfo:
        accuracy_report.main(["--fewshot", str(missing), "--out", str(out)])
    assert "input file not found" in str(excinfo.value) and str(missing) in str(excinfo.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_key_is_a_clear_error_and_keeps_the_old_report(tmp_path: Path) -> None:
    data = json.loads((DOCS / "classification_eval.json").read_text(encoding="utf-8"))
    del data["lesions"]["variants"]["no_aux"]["summary"]["heatmaps"]
    broken = tmp_path / "classification_eval.json"
    broken.write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "accuracy.md"
    out.write_text("previous report\n", encoding="utf-8")
    with pytest.raises(SystemExit) as excinfo:
        accuracy_report.main(["--classification", str(broken), "--out", str(out)])
    assert "lacks the expected key" in str(excinfo.value) and "heatmaps" in str(excinfo.value)
    assert out.read_text(encoding="utf-8") == "previous report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.md", "classification_eval.json"]


def test_missing_model_card(tmp_path: Path) -> None:
    fake = tmp_path / "model.safetensors"
    shutil.copy(DOCS / "fewshot_eval.json", fake)  # not a safetensors file
    with pytest.raises(SystemExit) as excinfo:
        accuracy_report.main(["--model", str(fake), "--out", str(tmp_path / "accuracy.md")])
    assert "model card" in str(excinfo.value)
    assert not (tmp_path / "accuracy.md").exists()
