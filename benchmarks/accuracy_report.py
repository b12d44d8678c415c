#!/usr/bin/env python3
"""Collect every accuracy evaluation into one report, `docs/accuracy.md`, with peers' published numbers.

    python benchmarks/accuracy_report.py                      # writes docs/accuracy.md
    python benchmarks/accuracy_report.py --out /tmp/accuracy.md

Inputs (all must exist and carry the expected keys, else it stops with a message and writes nothing):
`docs/fewshot_eval.json` (scripts/evaluate_fewshot.py), `docs/classification_eval.json`
(scripts/evaluate_classification.py), the model card of the bundled segmentation model and the card
of the bundled encoder (to spot a few-shot run made with an older encoder).

Peers' numbers are transcribed by hand from `../shared/REFERENCES.md` into `PEERS` below, each with
its source line and whether its protocol is the same as ours. REFERENCES.md says protocols differ and
must never be mixed in one comparison, so a peer with a different protocol is shown beside our
figures, marked "different protocol: <why>", and never ranked against them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_FEWSHOT = ROOT / "docs" / "fewshot_eval.json"
DEFAULT_CLASSIFICATION = ROOT / "docs" / "classification_eval.json"
DEFAULT_MODEL = ROOT / "Resources" / "models" / "hippocampus-mr-demo.safetensors"
DEFAULT_ENCODER = ROOT / "Resources" / "models" / "med3dfm-encoder-small.safetensors"
DEFAULT_OUT = ROOT / "docs" / "accuracy.md"

# Few-shot methods in the order of the tables; "ours" is what the product does in each setting:
# within one volume the this-scan path (`adapt --segment`), across volumes the decoder.
OURS = {"within": "this-scan", "across": "decoder"}
METHODS: Dict[str, str] = {
    "this-scan": "**ours**: this scan (adapter + outlines + edges)",
    "decoder": "**ours**: decoder (other patients, budget)",
    "adapter-pretrained": "point adapter alone, pretrained encoder",
    "prototype": "ours, prototype mode (training-free)",
    "adapter-random": "adapter, random-init encoder (ablation)",
    "unet": "MONAI BasicUNet from scratch (same time)",
    "unet-3x": "MONAI BasicUNet from scratch (3× the time)",
    "unet-aug": "MONAI BasicUNet from scratch, same loop and budget",
    "unet-aug-3x": "MONAI BasicUNet from scratch, same loop, 3× budget",
    "random-walker": "random walker (3D)",
    "fill-between-slices": "Fill between slices (Slicer)",
}
# A setting is "clearly" won or lost when the seed-means differ by more than the sum of the two seed
# stds and by at least this much Dice (the criterion of docs/fewshot_eval.md).
CLEAR_MARGIN = 0.02
# Randomised-weights sanity check: a map passes when its correlation with the map of the randomised
# model is below this (a threshold chosen for this report; the JSON stores only the correlation).
SANITY_MAX_R = 0.5

# REFERENCES.md, "Published accuracy (protocols differ; never mix them in one comparison)": the bullets
# quoted as written there (line breaks joined).
_SRC_BTCV = (
    "BTCV 13 organs, mean Dice: nnU-Net 83.1, MedNeXt-L 85.0, SwinUNETR 78.9 (5-fold CV, nnU-Net "
    "Revisited); SwinUNETR with self-supervised pretraining 82.3, VoCo-10k 84.5 (MONAI 24/6 split); "
    "Hi-End-MAE one-shot 72.5."
)
_SRC_BRATS = "BraTS 2021 mean Dice: nnU-Net 91.2, SwinUNETR 90.7 (5-fold CV)."
_SRC_LA = (
    "Left atrium (2018 challenge): V-Net with 80 labelled volumes ≈ 0.91 Dice; semi-supervised UA-MT with "
    "16 labelled ≈ 0.88."
)
_SRC_ANYMC3D = (
    "AnyMC3D: mean AUROC 0.894 over 10 classification tasks with ~1.2 M trainable parameters per task "
    "(3D DenseNet 0.833, linear probe 0.785)."
)
_SRC_MEDMNIST = (
    "MedMNIST v2 3D, best AUC: OrganMNIST3D 0.996, NoduleMNIST3D 0.914, AdrenalMNIST3D 0.839, "
    "FractureMNIST3D 0.750, VesselMNIST3D 0.930, SynapseMNIST3D 0.851."
)
_NOT_HIPPO = "different protocol: {what}; ours is MSD Task04 hippocampus MR, 40 held-out cases, fully supervised"
PEERS: List[Dict[str, str]] = [
    {"section": "segmentation", "peer": "nnU-Net", "metric": "BTCV 13 organs, mean Dice (%)", "value": "83.1", "source": _SRC_BTCV,
     "protocol": _NOT_HIPPO.format(what="BTCV 13 abdominal CT organs, 5-fold CV")},
    {"section": "segmentation", "peer": "MedNeXt-L", "metric": "BTCV 13 organs, mean Dice (%)", "value": "85.0", "source": _SRC_BTCV,
     "protocol": _NOT_HIPPO.format(what="BTCV 13 abdominal CT organs, 5-fold CV")},
    {"section": "segmentation", "peer": "SwinUNETR", "metric": "BTCV 13 organs, mean Dice (%)", "value": "78.9", "source": _SRC_BTCV,
     "protocol": _NOT_HIPPO.format(what="BTCV 13 abdominal CT organs, 5-fold CV")},
    {"section": "segmentation", "peer": "SwinUNETR with self-supervised pretraining", "metric": "BTCV 13 organs, mean Dice (%)", "value": "82.3",
     "source": _SRC_BTCV, "protocol": _NOT_HIPPO.format(what="BTCV 13 abdominal CT organs, MONAI 24/6 split")},
    {"section": "segmentation", "peer": "VoCo-10k", "metric": "BTCV 13 organs, mean Dice (%)", "value": "84.5", "source": _SRC_BTCV,
     "protocol": _NOT_HIPPO.format(what="BTCV 13 abdominal CT organs, MONAI 24/6 split")},
    {"section": "segmentation", "peer": "nnU-Net", "metric": "BraTS 2021, mean Dice (%)", "value": "91.2", "source": _SRC_BRATS,
     "protocol": _NOT_HIPPO.format(what="BraTS 2021 brain tumour MR, 5-fold CV")},
    {"section": "segmentation", "peer": "SwinUNETR", "metric": "BraTS 2021, mean Dice (%)", "value": "90.7", "source": _SRC_BRATS,
     "protocol": _NOT_HIPPO.format(what="BraTS 2021 brain tumour MR, 5-fold CV")},
    {"section": "segmentation", "peer": "V-Net, 80 labelled volumes", "metric": "left atrium (2018 challenge), Dice", "value": "≈ 0.91", "source": _SRC_LA,
     "protocol": _NOT_HIPPO.format(what="left atrium MR, 2018 challenge")},
    {"section": "across", "peer": "Hi-End-MAE, one-shot", "metric": "BTCV 13 organs, mean Dice (%)", "value": "72.5", "source": _SRC_BTCV,
     "protocol": "different protocol: BTCV 13 abdominal CT organs, one labelled volume, ViT-L encoder; "
                 "ours is hippocampus MR crops, n = 1/3/5 labelled volumes, 10 test cases"},
    {"section": "across", "peer": "UA-MT (semi-supervised), 16 labelled volumes", "metric": "left atrium (2018 challenge), Dice", "value": "≈ 0.88",
     "source": _SRC_LA,
     "protocol": "different protocol: left atrium MR, 16 labelled volumes plus unlabelled ones; ours is hippocampus MR crops, "
                 "n ≤ 5 labelled volumes, no unlabelled ones"},
    {"section": "classification", "peer": "MedMNIST v2, best", "metric": "AdrenalMNIST3D AUC", "value": "0.839", "source": _SRC_MEDMNIST,
     "protocol": "different protocol: MedMNIST v2 scores its test split at 28³ (classification_eval.md); "
                 "we score the val split (98 scans) at 64³"},
    {"section": "classification", "peer": "AnyMC3D", "metric": "mean AUROC over 10 classification tasks", "value": "0.894", "source": _SRC_ANYMC3D,
     "protocol": "different protocol: a mean over 10 tasks (~1.2 M trainable parameters per task), not AdrenalMNIST3D alone"},
    {"section": "classification", "peer": "3D DenseNet (in AnyMC3D's comparison)", "metric": "mean AUROC over 10 classification tasks", "value": "0.833",
     "source": _SRC_ANYMC3D, "protocol": "different protocol: a mean over 10 tasks, not AdrenalMNIST3D alone"},
    {"section": "classification", "peer": "linear probe (in AnyMC3D's comparison)", "metric": "mean AUROC over 10 classification tasks", "value": "0.785",
     "source": _SRC_ANYMC3D, "protocol": "different protocol: a mean over 10 tasks, not AdrenalMNIST3D alone"},
]
SECTIONS = ("segmentation", "within", "across", "classification", "lesion", "heatmaps")


class InputError(SystemExit):
    """A missing or malformed input: stops the run before anything is written."""


def get(obj: Any, path: str, source: str) -> Any:
    """`obj[a][b]...` for path "a.b...", or a clear error naming the file and the missing key."""
    current = obj
    for i, part in enumerate(path.split(".")):
        key: Any = int(part) if isinstance(current, list) and part.isdigit() else part
        try:
            current = current[key]
        except (KeyError, IndexError, TypeError):
            where = ".".join(path.split(".")[: i + 1])
            raise InputError(f"accuracy_report: {source} lacks the expected key '{where}'") from None
    return current


def number(obj: Any, path: str, source: str) -> float:
    """A numeric value at `path`; a non-number is as bad as a missing key."""
    value = get(obj, path, source)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"accuracy_report: {source}: '{path}' should be a number, found {value!r}")
    return float(value)


def load_json(path: Path) -> Dict[str, Any]:
    """Parse an evaluation JSON; a missing or unreadable file stops the run."""
    if not path.is_file():
        raise InputError(f"accuracy_report: input file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"accuracy_report: cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise InputError(f"accuracy_report: {path} is not a JSON object")
    return data


def load_card(path: Path) -> Dict[str, Any]:
    """The model card stored in a safetensors file (no tensors loaded)."""
    if not path.is_file():
        raise InputError(f"accuracy_report: input file not found: {path}")
    from Med3DFMLib.errors import Med3DFMError
    from Med3DFMLib.weights import read_card

    try:
        return read_card(path)
    except Med3DFMError as err:
        raise InputError(f"accuracy_report: cannot read the model card of {path}: {err}") from None


def f3(value: float) -> str:
    """Three decimals, the precision of the evaluation reports."""
    return f"{value:.3f}"


def mean(values: Iterable[float]) -> float:
    """numpy's mean, as the evaluation scripts use (see mean_std)."""
    return float(np.mean(list(values)))


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and population std computed as the evaluation scripts compute them (numpy), so a mean
    that falls on a rounding boundary prints the same digits here as in their reports."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), (float(array.std()) if len(array) > 1 else 0.0)


def fmt_ms(values: Sequence[float]) -> str:
    """'mean ± std' over seeds or draws; a single run is shown alone."""
    mean, std = mean_std(values)
    return f"{f3(mean)} ± {f3(std)}" if len(values) > 1 else f3(mean)


def fmt_summary(entry: Dict[str, Any], source: str, path: str, draws: int) -> str:
    """A {'mean', 'std'} entry as 'mean ± std' (the mean alone for a single draw, whose std means nothing)."""
    mean, std = number(entry, "mean", f"{source} ({path})"), number(entry, "std", f"{source} ({path})")
    return f"{f3(mean)} ± {f3(std)}" if draws > 1 else f3(mean)


def table(header: Sequence[str], rows: Iterable[Sequence[str]], align: Optional[str] = None) -> List[str]:
    """Markdown table lines; `align` is one character per column ('l' or 'r')."""
    align = align or "l" * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def peers_block(section: str) -> List[str]:
    """The peers of one section as a table plus their quoted source lines."""
    peers = [p for p in PEERS if p["section"] == section]
    if not peers:
        return ["Published (REFERENCES.md): no published number for this protocol or task."]
    rows = [[p["peer"], p["metric"], p["value"], "same protocol" if p["protocol"] == "same" else p["protocol"]] for p in peers]
    lines = ["Published (REFERENCES.md; shown beside ours, not ranked against them unless the protocol is the same):", ""]
    lines += table(["peer", "task, metric", "published", "protocol"], rows, "llrl")
    sources = list(dict.fromkeys(p["source"] for p in peers))
    lines += [""] + [f"> REFERENCES.md: “{s}”" for s in sources]
    return lines


def same_protocol_peers(section: str) -> List[Dict[str, str]]:
    return [p for p in PEERS if p["section"] == section and p["protocol"] == "same"]


def peer_sentence(section: str) -> str:
    """What the loss line can say about published peers."""
    same = same_protocol_peers(section)
    if same:
        return "Same-protocol peers: " + "; ".join(f"{p['peer']} {p['value']} ({p['metric']})" for p in same) + "."
    return "No published number in REFERENCES.md uses this protocol, so we cannot say whether we lose to a published peer here."


def clear(ours: Sequence[float], other: Sequence[float]) -> int:
    """+1 ours clearly better, -1 clearly worse, 0 within noise (docs/fewshot_eval.md's criterion)."""
    (ma, sa), (mb, sb) = mean_std(ours), mean_std(other)
    if abs(ma - mb) > sa + sb and abs(ma - mb) >= CLEAR_MARGIN:
        return 1 if ma > mb else -1
    return 0


def loss_lines(settings: List[Tuple[str, Dict[str, List[float]]]], methods: Sequence[str], ours: str) -> List[str]:
    """Per baseline: in how many settings ours clearly wins/loses, naming the losses."""
    lines = []
    for method in methods:
        if method == ours:
            continue
        pairs = [(name, d[ours], d[method]) for name, d in settings if d.get(ours) and d.get(method)]
        if not pairs:
            continue
        verdicts = [(name, clear(a, b), a, b) for name, a, b in pairs]
        worse = [(n, a, b) for n, v, a, b in verdicts if v < 0]
        better = sum(1 for _, v, _, _ in verdicts if v > 0)
        text = (f"- vs {METHODS.get(method, method)}: ours clearly better in {better}/{len(pairs)}, clearly worse in "
                f"{len(worse)}/{len(pairs)}, within noise in {len(pairs) - better - len(worse)}/{len(pairs)}")
        if worse:
            text += ": **loses** at " + "; ".join(f"{n} ({f3(mean(a))} vs {f3(mean(b))})" for n, a, b in worse)
        lines.append(text + ".")
    return lines


# ---------------------------------------------------------------- sections


def section_segmentation(card: Dict[str, Any], fewshot: Dict[str, Any], card_src: str, fs_src: str) -> List[str]:
    """The bundled segmentation model's held-out Dice, from its card."""
    metrics = get(card, "metrics", card_src)
    dice = get(metrics, "dice", card_src + " (metrics)")
    if not isinstance(dice, dict) or not dice:
        raise InputError(f"accuracy_report: {card_src}: 'metrics.dice' should map each structure to its Dice")
    model = f"{get(card, 'id', card_src)} {get(card, 'version', card_src)}"
    rows = []
    for name, entry in dice.items():
        where = f"{card_src} (metrics.dice.{name})"
        rows.append([name, f3(number(entry, "mean", where)), f3(number(entry, "std", where)), f3(number(entry, "min", where))])
    mean_dice = number(metrics, "mean_dice", card_src + " (metrics)")
    rows.append(["**mean**", f"**{f3(mean_dice)}**", "", ""])
    demo = get(fewshot, "across_info.demo_model", fs_src)
    n_test = len(get(fewshot, "across_info.test_cases", fs_src))
    lines = [
        "## Segmentation: bundled model",
        "",
        f"`{model}` (model card). Test set: {get(metrics, 'dataset', card_src + ' (metrics)')}. "
        f"Protocol: {get(metrics, 'protocol', card_src + ' (metrics)')}; "
        f"{number(metrics, 'seconds_per_case_cpu', card_src + ' (metrics)'):.3f} s per case on a CPU.",
        "",
    ]
    lines += table(["structure", "Dice (mean over cases)", "std over cases", "worst case"], rows, "lrrr")
    lines += [
        "",
        f"The same model on the {n_test}-case subset used by the few-shot evaluation: Dice "
        f"{f3(number(demo, 'dice', fs_src + ' (across_info.demo_model)'))} ± {f3(number(demo, 'dice_case_std', fs_src + ' (across_info.demo_model)'))} "
        f"(std over cases), {number(demo, 'segment_s_per_case', fs_src + ' (across_info.demo_model)'):.3f} s per case.",
        "",
    ]
    lines += peers_block("segmentation")
    weakest = min(dice, key=lambda n: number(dice[n], "mean", card_src))
    lines += [
        "",
        f"**Where we lose, and to whom:** {peer_sentence('segmentation')} Our weaker structure is {weakest} "
        f"({f3(number(dice[weakest], 'mean', card_src))}, worst case {f3(number(dice[weakest], 'min', card_src))}).",
        "",
    ]
    return lines


def _rows(data: Dict[str, Any], key: str, fields: Sequence[str], source: str) -> List[Dict[str, Any]]:
    """A list of run records, each checked for the fields the report uses."""
    rows = get(data, key, source)
    if not isinstance(rows, list) or not rows:
        raise InputError(f"accuracy_report: {source}: '{key}' should be a non-empty list of runs")
    for i, row in enumerate(rows):
        for field in fields:
            if field in ("dice", "adapt_s", "segment_s", "segment_s_per_case", "k", "n"):
                number(row, field, f"{source} ({key}[{i}])")
            else:
                get(row, field, f"{source} ({key}[{i}])")
    return rows


def _method_order(rows: Sequence[Dict[str, Any]], ours: str) -> List[str]:
    present = list(dict.fromkeys(r["method"] for r in rows))
    if ours not in present:
        raise InputError(f"accuracy_report: no '{ours}' runs in the few-shot results")
    return [m for m in METHODS if m in present] + [m for m in present if m not in METHODS]


def _time_table(rows: Sequence[Dict[str, Any]], methods: Sequence[str], segment_key: str, segment_label: str) -> List[str]:
    out = []
    for m in methods:
        runs = [r for r in rows if r["method"] == m]
        out.append([METHODS.get(m, m), f"{mean(r['adapt_s'] for r in runs):.2f}",
                    f"{mean(r[segment_key] for r in runs):.3f}", str(len(runs))])
    return table(["method", "adapt (s, mean)", segment_label, "runs"], out, "lrrr")


def _best(cells: Dict[str, List[float]]) -> str:
    best = max(cells, key=lambda m: mean(cells[m]))
    return METHODS.get(best, best).replace("**ours**: ", "ours: ")


def section_within(fewshot: Dict[str, Any], source: str) -> List[str]:
    """Few-shot inside one volume: k labelled slices, Dice on the other slices."""
    rows = _rows(fewshot, "within", ("task", "plane", "k", "method", "dice", "adapt_s", "segment_s"), source)
    methods = _method_order(rows, OURS["within"])
    settings: Dict[Tuple[str, str, int], Dict[str, List[float]]] = {}
    for r in rows:
        settings.setdefault((r["task"], r["plane"], int(r["k"])), {}).setdefault(r["method"], []).append(float(r["dice"]))
    body = []
    for (task, plane, k), cells in settings.items():
        body.append([task, plane, str(k)] + [fmt_ms(cells[m]) if m in cells else "–" for m in methods] + [_best(cells)])
    lines = [
        "## Few-shot segmentation within one volume",
        "",
        "k labelled slices of the volume being segmented; Dice on all its other slices (mean ± std over seeds; one value = one run). "
        "Source: `fewshot_eval.json` (`within`); protocol and caveats in `fewshot_eval.md`.",
        "",
    ]
    lines += table(["structure", "plane", "k"] + [METHODS.get(m, m) for m in methods] + ["best"], body, "lll" + "r" * len(methods) + "l")
    tasks = list(dict.fromkeys(t for t, _, _ in settings))
    ks = sorted({k for _, _, k in settings})
    mean_rows = []
    for k in ks:
        cells = []
        for m in methods:
            per_task = [mean(settings[key][m]) for key in settings if key[2] == k and m in settings[key]]
            cells.append(fmt_ms(per_task) if per_task else "–")
        mean_rows.append([str(k)] + cells)
    lines += ["", f"Mean over the {len(tasks)} structures (each structure's seed-mean, then mean ± std across structures):", ""]
    lines += table(["k"] + [METHODS.get(m, m) for m in methods], mean_rows, "l" + "r" * len(methods))
    lines += ["", "Time per run (mean over all structures, k and seeds):", ""]
    lines += _time_table(rows, methods, "segment_s", "segment (s, mean)")
    lines += ["", *peers_block("within"), "", f"**Where we lose, and to whom** (clearly = seed-means differ by more than the sum of the seed stds and by ≥ {CLEAR_MARGIN} Dice):"]
    lines += loss_lines([(f"{t} k={k}", d) for (t, _, k), d in settings.items()], methods, OURS["within"])
    lines += [f"- {peer_sentence('within')}", ""]
    return lines


def section_across(fewshot: Dict[str, Any], source: str) -> List[str]:
    """Few-shot across volumes: n densely labelled training volumes, Dice on unseen test cases."""
    rows = _rows(fewshot, "across", ("task", "n", "method", "dice", "adapt_s", "segment_s_per_case"), source)
    methods = _method_order(rows, OURS["across"])
    settings: Dict[int, Dict[str, List[float]]] = {}
    for r in rows:
        settings.setdefault(int(r["n"]), {}).setdefault(r["method"], []).append(float(r["dice"]))
    task = ", ".join(dict.fromkeys(r["task"] for r in rows))
    n_test = len(get(fewshot, "across_info.test_cases", source))
    demo = get(fewshot, "across_info.demo_model", source)
    body = [[str(n)] + [fmt_ms(cells[m]) if m in cells else "–" for m in methods] + [_best(cells)] for n, cells in sorted(settings.items())]
    lines = [
        "## Few-shot segmentation across volumes",
        "",
        f"{task}: adapters trained on n densely labelled volumes, Dice averaged over {n_test} unseen test cases "
        "(mean ± std over seeds, i.e. over training draws; one value = one run). Source: `fewshot_eval.json` (`across`).",
        "",
    ]
    lines += table(["n volumes"] + [METHODS.get(m, m) for m in methods] + ["best"], body, "l" + "r" * len(methods) + "l")
    lines += [
        "",
        f"Fully supervised reference on the same {n_test} test cases: the bundled `hippocampus-mr-demo` "
        f"(see the first section), Dice {f3(number(demo, 'dice', source))}.",
        "",
        "Time per run (adapt = cold encoder features + training; segment per test case):",
        "",
    ]
    lines += _time_table(rows, methods, "segment_s_per_case", "segment per case (s, mean)")
    lines += ["", *peers_block("across"), "", f"**Where we lose, and to whom** (clearly = as above, ≥ {CLEAR_MARGIN} Dice):"]
    lines += loss_lines([(f"n={n}", d) for n, d in sorted(settings.items())], methods, OURS["across"])
    lines += [f"- {peer_sentence('across')}", ""]
    return lines


_SETTING_ORDER = {"10": 0, "20": 1, "50": 2, "all": 3}


def section_classification(data: Dict[str, Any], source: str) -> List[str]:
    """AdrenalMNIST3D: the classification adapter against logistic regression, ResNet-10 and chance."""
    adrenal = get(data, "adrenal", source)
    settings = get(adrenal, "settings", source + " (adrenal)")
    summary = get(adrenal, "summary", source + " (adrenal)")
    val_per_class = [int(number(adrenal, f"val_per_class.{i}", source + " (adrenal)")) for i in range(len(get(adrenal, "val_per_class", source)))]
    majority = max(val_per_class) / sum(val_per_class)
    published = number(adrenal, "published_medmnist_auc", source + " (adrenal)")
    ours_transcribed = next(p for p in PEERS if p["metric"] == "AdrenalMNIST3D AUC")["value"]
    if abs(float(ours_transcribed) - published) > 1e-9:
        raise InputError(f"accuracy_report: {source} gives the published MedMNIST AUC as {published}, REFERENCES.md as {ours_transcribed}")
    rows, losses = [], []
    for key in sorted(settings, key=lambda s: (_SETTING_ORDER.get(s, 99), s)):
        where = f"{source} (adrenal.summary.{key})"
        s = get(summary, key, source + " (adrenal.summary)")
        draws = get(settings, key, source + " (adrenal.settings)")
        if not isinstance(draws, list) or not draws:
            raise InputError(f"accuracy_report: {source}: 'adrenal.settings.{key}' should be a non-empty list of draws")
        d0 = draws[0]
        d0_src = f"{source} (adrenal.settings.{key}[0])"
        n_train = int(number(d0, "n_train", d0_src))
        label = f"all {n_train:,}" if key == "all" else f"{key} per class"
        n_draws = int(number(s, "draws", where))
        ours_auc, ours_acc = number(s, "adapter_auroc.mean", where), number(s, "adapter_accuracy.mean", where)
        ours_auc_sd, ours_acc_sd = number(s, "adapter_auroc.std", where), number(s, "adapter_accuracy.std", where)
        lr_auc, lr_acc = number(s, "lr_auroc.mean", where), number(s, "lr_accuracy.mean", where)
        lr_auc_sd, lr_acc_sd = number(s, "lr_auroc.std", where), number(s, "lr_accuracy.std", where)
        d0_auc, d0_acc = number(d0, "after.auroc", d0_src), number(d0, "after.accuracy", d0_src)
        resnet = get(d0, "baselines", d0_src).get("resnet10_1x")  # ResNet-10 given the adapter's CPU time
        if resnet is not None:
            rn_auc, rn_acc = number(resnet, "auroc", d0_src + " resnet10"), number(resnet, "accuracy", d0_src + " resnet10")
            rn_cell = f"{f3(rn_auc)} / {f3(rn_acc)} ({int(number(resnet, 'steps', d0_src))} steps)"
            if abs(rn_acc - majority) < 5e-4:
                rn_cell += f" ≈ majority-class rate {f3(majority)}"
        else:
            rn_cell = "–"
        rows.append([
            label, str(n_draws),
            fmt_summary(get(s, "adapter_auroc", where), source, f"adrenal.summary.{key}.adapter_auroc", n_draws),
            fmt_summary(get(s, "adapter_accuracy", where), source, f"adrenal.summary.{key}.adapter_accuracy", n_draws),
            fmt_summary(get(s, "ece_after", where), source, f"adrenal.summary.{key}.ece_after", n_draws),
            f"{f3(d0_auc)} / {f3(d0_acc)}",
            fmt_summary(get(s, "lr_auroc", where), source, f"adrenal.summary.{key}.lr_auroc", n_draws),
            fmt_summary(get(s, "lr_accuracy", where), source, f"adrenal.summary.{key}.lr_accuracy", n_draws),
            rn_cell,
        ])

        def noise(a: float, sa: float, b: float, sb: float) -> str:
            return "" if abs(a - b) > sa + sb and abs(a - b) >= CLEAR_MARGIN else " (within noise)"

        if lr_auc > ours_auc:
            losses.append(f"{label}: logistic regression AUROC {f3(lr_auc)} vs ours {f3(ours_auc)}{noise(lr_auc, lr_auc_sd, ours_auc, ours_auc_sd)}")
        if lr_acc > ours_acc:
            losses.append(f"{label}: logistic regression accuracy {f3(lr_acc)} vs ours {f3(ours_acc)}{noise(lr_acc, lr_acc_sd, ours_acc, ours_acc_sd)}")
        if resnet is not None and rn_auc > d0_auc:
            losses.append(f"{label}: ResNet-10 AUROC {f3(rn_auc)} vs ours {f3(d0_auc)} (draw 0, one run each)")
        if resnet is not None and rn_acc > d0_acc:
            losses.append(f"{label}: ResNet-10 accuracy {f3(rn_acc)} vs ours {f3(d0_acc)} (draw 0, one run each)")
        if majority > ours_acc:
            losses.append(f"{label}: always predicting the majority class, accuracy {f3(majority)} vs ours {f3(ours_acc)}")
    n_val = sum(val_per_class)
    lines = [
        "## Classification: AdrenalMNIST3D",
        "",
        f"Adapter on the frozen encoder; train {int(number(adrenal, 'train', source)):,} scans, scored on the val split "
        f"({n_val} scans: {' / '.join(str(v) for v in val_per_class)} per class). Few-shot settings are balanced draws; "
        "mean ± std over draws. Accuracy at the 0.5 threshold; ECE after temperature scaling. Source: `classification_eval.json` (`adrenal`).",
        "",
    ]
    lines += table(
        ["training scans", "draws", "**ours** AUROC", "**ours** accuracy", "ours ECE", "ours draw 0 AUROC / acc.",
         "log. regression AUROC", "log. regression accuracy", "ResNet-10 AUROC / acc. (draw 0, same CPU time)"],
        rows, "lrrrrrrrr")
    lines += ["", f"Trivial baselines: chance AUROC 0.500; always predicting the majority class gives accuracy {f3(majority)} on this val split.", ""]
    lines += peers_block("classification")
    lines += ["", "**Where we lose, and to whom:**"]
    lines += [f"- {text}." for text in losses] or ["- nowhere among the baselines."]
    lines += [f"- {peer_sentence('classification')} (MedMNIST v2's best AdrenalMNIST3D AUC is {published:.3f}, on its own protocol.)", ""]
    return lines


def section_lesion(data: Dict[str, Any], source: str) -> List[str]:
    """Lesion present/absent: leave-one-scan-out AUROC and accuracy, against chance."""
    lesions = get(data, "lesions", source)
    variants = get(lesions, "variants", source + " (lesions)")
    if not isinstance(variants, dict) or not variants:
        raise InputError(f"accuracy_report: {source}: 'lesions.variants' should name at least one variant")
    rows = []
    below = []
    for name, variant in variants.items():
        where = f"{source} (lesions.variants.{name}.summary)"
        auc, acc = number(variant, "summary.auroc", where), number(variant, "summary.accuracy", where)
        rows.append([_variant(name), f3(auc), f3(acc)])
        if auc <= 0.5:
            below.append(f"{_variant(name)} AUROC {f3(auc)}")
    lines = [
        "## Classification: lesion present / absent",
        "",
        f"{int(number(lesions, 'crops', source + ' (lesions)'))} crops from real scans, "
        f"{int(number(lesions, 'per_scan_and_class', source + ' (lesions)'))} per scan and class (balanced), "
        "leave-one-scan-out. Source: `classification_eval.json` (`lesions`).",
        "",
    ]
    lines += table(["variant", "**ours** AUROC", "**ours** accuracy"], rows + [["chance (balanced classes)", "0.500", "0.500"]], "lrr")
    lines += ["", *peers_block("lesion"), ""]
    verdict = ("we lose to chance: " + "; ".join(below) + " (at or below 0.500)") if below else "above chance in every variant"
    lines += [f"**Where we lose, and to whom:** {verdict}. {peer_sentence('lesion')}", ""]
    return lines


def _variant(name: str) -> str:
    return {"no_aux": "no auxiliary masks", "aux_masks": "lesion masks as auxiliary supervision"}.get(name, name)


_MAPS = {
    "attention": "attention pooling (ours)",
    "gradcam": "Grad-CAM (ours)",
    "occlusion": "occlusion (ours)",
    "random": "baseline: random point / uniform map",
    "centre": "baseline: centre Gaussian",
    "attention_random": "attention, randomised weights",
    "gradcam_random": "Grad-CAM, randomised weights",
}
_OUR_MAPS = ("attention", "gradcam", "occlusion")


def section_heatmaps(data: Dict[str, Any], source: str) -> List[str]:
    """Heatmaps on held-out positive crops: pointing game and heat mass inside the lesion, with baselines."""
    variants = get(data, "lesions.variants", source)
    names = list(variants)
    heat = {v: get(variants[v], "summary.heatmaps", f"{source} (lesions.variants.{v})") for v in names}
    for v in names:
        for needed in ("random", "centre"):
            get(heat[v], needed, f"{source} (lesions.variants.{v}.summary.heatmaps)")
    keys = [k for k in _MAPS if any(k in heat[v] for v in names)] + sorted({k for v in names for k in heat[v]} - set(_MAPS))
    rows = []
    for key in keys:
        row = [_MAPS.get(key, key)]
        for v in names:
            if key in heat[v]:
                where = f"{source} (lesions.variants.{v}.summary.heatmaps.{key})"
                row += [str(int(number(heat[v][key], "n", where))), f3(number(heat[v][key], "pointing", where)), f3(number(heat[v][key], "mass_inside", where))]
            else:
                row += ["–", "–", "–"]
        rows.append(row)
    header = ["map"]
    for v in names:
        header += [f"n ({_variant(v)})", f"pointing game ({_variant(v)})", f"heat mass inside lesion ({_variant(v)})"]
    lines = [
        "## Heatmaps (lesion crops)",
        "",
        "Held-out positive crops of the lesion task, on the input grid. Pointing game = fraction of crops whose hottest voxel is in the lesion; "
        "heat mass = fraction of the map's total inside the lesion. Source: `classification_eval.json` (`lesions.variants.*.summary.heatmaps`).",
        "",
    ]
    lines += table(header, rows, "l" + "r" * (3 * len(names)))
    sanity = []
    for v in names:
        for method in ("attention", "gradcam"):
            key = f"{method}_random_correlation"
            r = number(variants[v], f"summary.{key}", f"{source} (lesions.variants.{v})")
            sanity.append([_variant(v), _MAPS[method], f"{r:.3f}", "passes" if r < SANITY_MAX_R else "**fails**"])
    lines += ["", f"Randomised-weights sanity check: Pearson r between the trained model's map and the map after re-initialising the adapter "
              f"(a map that explains the model must change; this report calls r < {SANITY_MAX_R} a pass):", ""]
    lines += table(["variant", "map", "r (trained vs randomised)", "verdict"], sanity, "llrl")
    losses = []
    for v in names:
        parts = []
        for key in _OUR_MAPS:
            if key not in heat[v]:
                continue
            lost = []
            for base in ("random", "centre"):
                where = f"{source} (lesions.variants.{v}.summary.heatmaps)"
                pairs = [(label, number(heat[v][key], metric, where), number(heat[v][base], metric, where))
                         for metric, label in (("pointing", "pointing"), ("mass_inside", "mass inside"))]
                pairs = [(label, ours, theirs) for label, ours, theirs in pairs if theirs >= ours]
                if pairs:
                    lost.append(f"the {base} baseline (" + ", ".join(f"{label} {f3(o)} vs {f3(t)}" for label, o, t in pairs) + ")")
            if lost:
                parts.append(f"{_MAPS[key].replace(' (ours)', '')} loses to " + " and ".join(lost))
        if parts:
            losses.append(f"{_variant(v)}: " + "; ".join(parts))
    failed = [f"{row[1].replace(' (ours)', '')} ({row[0]}, r = {row[2]})" for row in sanity if row[3] != "passes"]
    lines += ["", *peers_block("heatmaps"), "", "**Where we lose, and to whom:**"]
    lines += [f"- {text}." for text in losses] or ["- our maps beat the random and centre baselines everywhere."]
    if failed:
        lines.append("- sanity check failed by: " + "; ".join(failed) + ".")
    lines += [f"- {peer_sentence('heatmaps')}", ""]
    return lines


def staleness(fewshot: Dict[str, Any], encoder: Dict[str, Any]) -> List[str]:
    """Warn when the few-shot run's own notes name a pretraining step count other than the bundled encoder's."""
    notes = fewshot.get("notes") or []
    steps = (encoder.get("training") or {}).get("summary", {}).get("steps")
    found = [int(m.replace(",", "")) for note in notes if isinstance(note, str) and "pretraining" in note
             for m in re.findall(r"(\d[\d,]*) steps", note)]
    if steps is None or not found or all(s == steps for s in found):
        return []
    return [f"> **Possibly stale:** `fewshot_eval.json`'s notes describe an encoder pretrained for {', '.join(f'{s:,}' for s in found)} steps, "
            f"the bundled `{encoder.get('id', 'encoder')}` card says {steps:,} steps; the few-shot numbers below may predate the current encoder.", ""]


def build_report(fewshot_path: Path, classification_path: Path, model_path: Path, encoder_path: Path, out: Path) -> str:
    """The whole report as text; raises InputError before anything is written."""
    fewshot = load_json(fewshot_path)
    classification = load_json(classification_path)
    card = load_card(model_path)
    encoder = load_card(encoder_path)
    fs_src, cl_src, card_src = fewshot_path.name, classification_path.name, f"model card of {model_path.name}"

    def link(path: Path) -> str:
        try:
            return os.path.relpath(path, out.parent).replace(os.sep, "/")
        except ValueError:
            return str(path)

    lines = [
        "# Med3DFM accuracy summary",
        "",
        "Generated by `python benchmarks/accuracy_report.py` from "
        f"[{fewshot_path.name}]({link(fewshot_path)}), [{classification_path.name}]({link(classification_path)}) and the model card of "
        f"`{model_path.name}`; peers' numbers are transcribed from `REFERENCES.md` (shared project notes) with their source lines. "
        "Every table puts our figures first and the baselines measured in the same run beside them; published numbers follow in their own table, "
        "marked *same protocol* or *different protocol: why*. Different-protocol numbers are context, not a ranking.",
        "",
        "ARCHITECTURE.md sets speed and size budgets but no accuracy target, so nothing here is marked met / not met.",
        "",
    ]
    lines += staleness(fewshot, encoder)
    lines += section_segmentation(card, fewshot, card_src, fs_src)
    lines += section_within(fewshot, fs_src)
    lines += section_across(fewshot, fs_src)
    lines += section_classification(classification, cl_src)
    lines += section_lesion(classification, cl_src)
    lines += section_heatmaps(classification, cl_src)
    return "\n".join(lines).rstrip() + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(text)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def main(argv: Optional[List[str]] = None) -> Path:
    """Build the report from the inputs and write it; returns the report's path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fewshot", type=Path, default=DEFAULT_FEWSHOT, help="few-shot evaluation JSON")
    parser.add_argument("--classification", type=Path, default=DEFAULT_CLASSIFICATION, help="classification evaluation JSON")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="bundled segmentation model (its card holds the test Dice)")
    parser.add_argument("--encoder", type=Path, default=DEFAULT_ENCODER, help="bundled encoder (its card, to flag stale few-shot results)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report path (default docs/accuracy.md)")
    args = parser.parse_args(argv)
    text = build_report(args.fewshot, args.classification, args.model, args.encoder, args.out)
    write_atomic(args.out, text)
    print(f"[accuracy_report] wrote {args.out}", file=sys.stderr)
    return args.out


if __name__ == "__main__":
    main()
