#!/usr/bin/env python3
"""Why does a pretrained encoder not beat a random one in few-shot segmentation? Feature-level
ablations on real data, for one encoder or several (e.g. every checkpoint of a pretraining run).

For each structure (k painted slices, Dice on all other slices, the same protocol and code as
`scripts/evaluate_fewshot.py`) an adapter is fitted over each tested encoder and over random-init
encoders of the same architecture (a different one per seed), and scored. What can be varied:

- `--feature-sets`: which levels of the feature pyramid the adapter sees: all (strides 2, 4, 8, 16
  + ViT tokens); deep (8 and 16); shallow (2 and 4); intensity (no encoder feature at all: what the
  scan's intensity alone gives, the floor any encoder must beat). Levels outside the set are zeroed,
  which the adapter's standardisation turns into constants. The scan's intensity is always an input.
- `--modes`: the trained MLP adapter and/or the training-free prototype adapter (cosine similarity).
- `--checkpoints RUN`: every checkpoint of a `med3dfm pretrain` run becomes a tested encoder
  ("step N"), which shows whether few-shot Dice moves with pretraining progress at all.
- `--encoder LABEL=SEGMENTATION_MODEL`: the encoder half of a segmentation model trained with labels
  (e.g. `hippocampus-mr-demo`), given the bundled encoder's input spec: shows whether the test can
  tell features learned with labels from random ones at all.
- `--across N[,N...]`: also learn the hippocampus from N densely labelled crops and score on other
  patients' crops (the "Learn from labels" use); several N give a label-efficiency table (paired
  differences to the random-init encoder of the same seed, which also draws the same crops).
- `--feature-window`: the window the encoder runs on (the product's is 128³); an encoder pretrained
  on smaller crops can be tested at its own crop size.

Each (structure, encoder) also gets the effective rank (participation ratio of the covariance
eigenvalues) of its standardised features per level at 4,000 random voxels: how many directions
the features really vary in.

Writes <out>/pretraining_diagnosis.md and .json. Usage:
    python scripts/diagnose_pretraining.py [--encoder LABEL=FILE_OR_ID ...] [--checkpoints RUN]
        [--modes adapter,prototype] [--feature-sets all,deep,shallow] [--seeds 2] [--structures ...]
        [--across 1,3,10 --test-cases 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import evaluate_fewshot as fewshot  # noqa: E402

FEATURE_SETS: Dict[str, Tuple[int, ...]] = {"all": (2, 4, 8, 16), "deep": (8, 16), "shallow": (2, 4), "intensity": ()}
MODES = ("adapter", "prototype")
DEFAULT_STRUCTURES = "liver,right kidney,lateral ventricles,brain1 tumour,hippocampus crop"
RANDOM = "random-init"
RANK_POINTS = 4000


def keep_levels(features: Any, strides: Sequence[int]) -> Any:
    """The same feature pyramid with the levels outside `strides` zeroed."""
    import torch

    maps = {s: (m if s in strides else torch.zeros_like(m)) for s, m in features.maps.items()}
    return replace(features, maps=maps)


def effective_rank(features: Any, image: Any, points: int = RANK_POINTS) -> Dict[int, float]:
    """Per stride: participation ratio (Σλ)² / Σλ² of the standardised features' covariance at
    random voxels; 1 when one direction carries all the variance, C when all C channels vary alike."""
    import torch

    from Med3DFMLib.fewshot.adapter import STRIDES, gather

    generator = torch.Generator().manual_seed(0)
    coords = torch.rand(points, 3, generator=generator) * (torch.tensor(features.shape, dtype=torch.float32) - 1)
    samples = gather(features, image, coords)
    ranks, start = {}, 0
    for stride in STRIDES:
        part = samples[:, start : start + features.maps[stride].shape[0]]
        start += features.maps[stride].shape[0]
        standardised = (part - part.mean(0)) / part.std(0).clamp_min(1e-3)
        eigenvalues = torch.linalg.eigvalsh(torch.cov(standardised.t())).clamp_min(0)
        ranks[stride] = round(float(eigenvalues.sum() ** 2 / (eigenvalues**2).sum().clamp_min(1e-12)), 2)
    return ranks


def export_checkpoints(run: Path, folder: Path) -> Dict[str, Path]:
    """Encoder files ("step N" → path) from every checkpoint of a pretraining run, with the run's card."""
    from safetensors.torch import load_file

    from Med3DFMLib.pretrain.engine import checkpoints_of
    from Med3DFMLib.weights import read_weights, write_weights

    _, card = read_weights(run / "encoder.safetensors")
    exported = {}
    for step, checkpoint in checkpoints_of(run / "checkpoints"):
        state = load_file(str(checkpoint / "model.safetensors"))
        tensors = {k[len("encoder.") :]: v.half() for k, v in state.items() if k.startswith("encoder.")}
        path = folder / f"{run.name}-step{step}.safetensors"
        write_weights(path, tensors, dict(card, id=f"{card.get('id', 'encoder')}-step{step}", training=dict(card.get("training", {}), checkpoint_step=step)))
        exported[f"step {step}"] = path
    if not exported:
        raise SystemExit(f"no checkpoints in {run / 'checkpoints'}")
    return exported


def encoder_of_segmenter(source: str, folder: Path, template: str = "med3dfm-encoder-small") -> Path:
    """The encoder half of a segmentation model (trained with labels), as an encoder file with the
    `template` encoder's card (same input spec), so that only the weights differ: a reference for
    what features learned with labels give."""
    from Med3DFMLib.registry import resolve_model
    from Med3DFMLib.weights import read_weights, write_weights

    tensors, card = read_weights(resolve_model(source).weights)
    _, template_card = read_weights(resolve_model(template).weights)
    if card["architecture"]["encoder"] != template_card["architecture"]["encoder"]:
        raise SystemExit(f"{source}: its encoder's architecture differs from {template}'s")
    path = folder / f"{card.get('id', 'segmenter')}-encoder.safetensors"
    encoder = {k[len("encoder.") :]: v.half() for k, v in tensors.items() if k.startswith("encoder.")}
    write_weights(path, encoder, dict(template_card, id=f"{card.get('id')}-encoder", title=f"encoder half of {card.get('id')} (trained with labels)",
                                      training={"method": f"the encoder of the segmentation model {card.get('id')}: {card.get('training', {}).get('method', '')}"}))
    return path


def run(structures: Sequence[str], seeds: Sequence[int], k: int, log: Callable[[str], None], encoders: Dict[str, str],
        feature_sets: Dict[str, Sequence[int]] = FEATURE_SETS, modes: Sequence[str] = ("adapter",), feature_window: int = 0,
        across: Sequence[int] = (), test_cases: int = 10) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, Dict[int, float]]]]:
    """Rows of (structure, encoder, mode, feature set, seed, Dice) and effective ranks per (structure,
    encoder); with `across`, the across-patients rows too (see `run_across`)."""
    import SimpleITK as sitk

    from Med3DFMLib.fewshot import adapt
    from Med3DFMLib.fewshot.labels import AXES

    home = Path(tempfile.mkdtemp(prefix="med3dfm_diag_"))
    labels_ = list(encoders)
    # the random-init twins copy the first encoder's card (architecture, input spec)
    lib = fewshot.Lib(home, seeds, encoder=encoders[labels_[0]], label=labels_[0])
    lib.feature_window = feature_window or adapt.FEATURE_WINDOW
    for label in labels_[1:]:
        lib.encoders[label] = adapt.load_encoder(encoders[label])
    rows: List[Dict[str, Any]] = []
    ranks: Dict[str, Dict[str, Dict[int, float]]] = {}
    for task in fewshot.within_tasks(False, 1, structures) if structures else []:
        image = sitk.ReadImage(str(task.image))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(task.labels)))
        class_name = next(iter(task.values))
        truth = np.isin(reference, task.values[class_name])
        axis = AXES[task.axis]
        sparse, score_index = fewshot.painted(truth, axis, fewshot.chosen_slices(truth, axis, k))
        supervision = lib.supervision(image, sparse, [class_name], dense=False, axis=task.axis)
        for encoder_key in labels_ + [f"random-{s}" for s in seeds]:
            volume, _ = lib.volume(task.image, image, encoder_key)
            ranks.setdefault(task.name, {})[encoder_key] = effective_rank(volume.features, volume.padded_image)
            full = volume.features
            encoder = RANDOM if encoder_key.startswith("random-") else encoder_key
            for name, strides in feature_sets.items():
                if not strides and encoder != RANDOM:
                    continue  # intensity only: the same inputs whatever the encoder, run once per seed
                volume.features = keep_levels(full, strides)
                for mode in modes:
                    if not strides and mode == "prototype":
                        continue  # cosine similarity of one standardised value is only its sign
                    for seed in [int(encoder_key.split("-")[1])] if encoder == RANDOM else seeds:
                        tick = time.perf_counter()
                        model, _, detail = lib.fit(mode, [image], [task.image], [supervision], encoder_key, seed)
                        labels, _, _ = lib.segment(model, task.image, image, encoder_key)
                        value = fewshot.dice(labels[score_index] == 1, truth[score_index])
                        row = {"task": task.name, "k": k, "encoder": encoder, "encoder_key": encoder_key, "mode": mode, "features": name, "seed": seed,
                               "dice": None if value is None else round(value, 4), "best_step": detail.get("best_step"), "seconds": round(time.perf_counter() - tick, 2)}
                        rows.append(row)
                        log(f"{task.name:20s} {encoder:12s} {mode:9s} {name:8s} seed={seed} dice={row['dice']}")
            volume.features = full
        lib.forget(task.image)
    for n in across:
        rows += run_across(lib, labels_, n, seeds, test_cases, modes, log)
    return rows, ranks


def run_across(lib: Any, labels_: Sequence[str], n: int, seeds: Sequence[int], test_count: int, modes: Sequence[str], log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Across patients: an adapter learns the anterior and posterior hippocampus from n densely
    labelled crops of the training pool (a different draw per seed) and is scored (mean Dice of the
    two classes) on `test_count` crops of the demo model's test set."""
    import SimpleITK as sitk

    pool, test = fewshot.hippocampus_cases()
    chosen = [test[i] for i in np.linspace(0, len(test) - 1, min(test_count, len(test))).round().astype(int)]
    folder = fewshot.DATA / "hippocampus"
    classes = ["anterior hippocampus", "posterior hippocampus"]

    def load(name: str) -> Tuple[Any, np.ndarray]:
        return sitk.ReadImage(str(folder / "images" / name)), sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels" / name)))

    tests = {name: load(name) for name in chosen}
    task = f"hippocampus across patients (n = {n})"
    rows: List[Dict[str, Any]] = []
    for seed in seeds:
        names = [pool[i] for i in np.random.default_rng(1000 + seed).permutation(len(pool))[:n]]
        loaded = [load(name) for name in names]
        supervisions = [lib.supervision(image, labels, classes, dense=True, axis="auto") for image, labels in loaded]
        for encoder_key in [*labels_, f"random-{seed}"]:
            encoder = RANDOM if encoder_key.startswith("random-") else encoder_key
            for mode in modes:
                model, _, detail = lib.fit(mode, [image for image, _ in loaded], [folder / "images" / name for name in names], supervisions, encoder_key, seed)
                scores = []
                for name, (image, truth) in tests.items():
                    predicted, _, _ = lib.segment(model, folder / "images" / name, image, encoder_key)
                    scores.append(float(np.mean([fewshot.dice(predicted == c, truth == c) or 0.0 for c in (1, 2)])))
                row = {"task": task, "k": None, "labelled_crops": n, "encoder": encoder, "encoder_key": encoder_key, "mode": mode, "features": "all", "seed": seed,
                       "dice": round(float(np.mean(scores)), 4), "best_step": detail.get("best_step"), "train_cases": names, "test_cases": chosen}
                rows.append(row)
                log(f"{task:20s} {encoder:12s} {mode:9s} seed={seed} dice={row['dice']}")
        # a seed's training crops and random-init encoder are not used again; only the test crops'
        # features over the tested encoders are worth keeping (every (crop, encoder) holds a pyramid)
        for name in names:
            lib.forget(folder / "images" / name)
        lib.forget(encoder_key=f"random-{seed}")
    return rows


def summarise(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean Dice per (task, mode, feature set, encoder) and, per tested encoder, its difference to
    the random-init encoders: mean over structures, and how many structures are > +0.02 / < −0.02."""
    table: Dict[str, Dict[str, Dict[str, Dict[str, List[float]]]]] = {}
    for row in rows:
        if row["dice"] is not None:
            table.setdefault(row["task"], {}).setdefault(row["mode"], {}).setdefault(row["features"], {}).setdefault(row["encoder"], []).append(row["dice"])
    means = {t: {m: {f: {e: round(float(np.mean(v)), 4) for e, v in encs.items()} for f, encs in sets.items()} for m, sets in modes.items()} for t, modes in table.items()}
    gaps: Dict[str, List[float]] = {}
    for modes in means.values():
        for mode, sets in modes.items():
            for fs, encs in sets.items():
                for encoder, value in encs.items():
                    if encoder != RANDOM and RANDOM in encs:
                        gaps.setdefault(f"{encoder} | {mode} | {fs}", []).append(value - encs[RANDOM])
    return {"means": means, "tasks": len(means), "label_efficiency": label_efficiency(rows),
            "gaps": {key: {"mean": round(float(np.mean(g)), 4), "better": int(sum(x > 0.02 for x in g)), "worse": int(sum(x < -0.02 for x in g)), "of": len(g)} for key, g in gaps.items()}}


def label_efficiency(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Across patients, per (encoder, mode, number of labelled crops): mean Dice and the paired
    difference to the random-init encoder of the same seed (same training crops), with its
    standard error over seeds and how many seeds the encoder wins."""
    by_key: Dict[Tuple[str, str, int], Dict[int, float]] = {}
    for row in rows:
        if row.get("labelled_crops") is not None:
            by_key.setdefault((row["encoder"], row["mode"], row["labelled_crops"]), {})[row["seed"]] = row["dice"]
    table = []
    for (encoder, mode, n), dice in sorted(by_key.items(), key=lambda item: (item[0][1], item[0][2], item[0][0] == RANDOM, item[0][0])):
        random_dice = by_key.get((RANDOM, mode, n), {})
        seeds = sorted(set(dice) & set(random_dice))
        entry: Dict[str, Any] = {"encoder": encoder, "mode": mode, "labelled_crops": n, "seeds": len(dice), "mean": round(float(np.mean(list(dice.values()))), 4)}
        if encoder != RANDOM and seeds:
            diff = np.array([dice[s] - random_dice[s] for s in seeds])
            entry.update(difference=round(float(diff.mean()), 4), wins=int((diff > 0).sum()), paired=len(seeds),
                         standard_error=round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 4) if len(diff) > 1 else None)
        table.append(entry)
    return table


def write_report(out: Path, payload: Dict[str, Any]) -> None:
    summary, encoders = payload["summary"], list(payload["encoders"])
    lines = [
        "# Pretraining diagnosis: few-shot Dice over pretrained and random-init encoders",
        "",
        f"Generated by `scripts/diagnose_pretraining.py` ({payload['machine']}, wall time {payload['wall_s'] / 60:.1f} min). "
        f"Encoders: {', '.join(f'*{label}* (`{source}`)' for label, source in payload['encoders'].items())}. "
        f"Features on {payload['feature_window']}³ windows. k = {payload['k']} painted slices, Dice on all other slices, seeds {payload['seeds']} "
        "(a different random-init encoder per seed). Raw runs: `pretraining_diagnosis.json`.",
        "",
    ]
    for mode in payload["modes"]:
        # the intensity-only floor is a column of the other tables (adapter mode only)
        floor = mode == "adapter" and "intensity" in payload["feature_sets"]
        for fs in [f for f in payload["feature_sets"] if FEATURE_SETS[f]]:
            levels = ", ".join(f"stride {s}" for s in FEATURE_SETS[fs])
            lines += [f"## {mode}, features: {fs} ({levels})", "",
                      "| structure |" + (" intensity only |" if floor else "") + " random-init | " + " | ".join(f"{e} (difference)" for e in encoders) + " |",
                      "|---|" + ("---:|" if floor else "") + "---:|" + "---:|" * len(encoders)]
            for task, modes in summary["means"].items():
                cell = modes.get(mode, {}).get(fs, {})
                rnd = cell.get(RANDOM)
                entries = [f"{cell[e]:.3f} ({cell[e] - rnd:+.3f})" if e in cell and rnd is not None else "" for e in encoders]
                intensity = modes.get(mode, {}).get("intensity", {}).get(RANDOM)
                first = (f" {'' if intensity is None else f'{intensity:.3f}'} |" if floor else "")
                lines.append(f"| {task} |{first} {'' if rnd is None else f'{rnd:.3f}'} | " + " | ".join(entries) + " |")
            lines += ["", "Mean difference to random-init over the structures; structures above +0.02 / below −0.02:", ""]
            for e in encoders:
                gap = summary["gaps"].get(f"{e} | {mode} | {fs}")
                if gap:
                    lines.append(f"- **{e}**: {gap['mean']:+.3f}; better in {gap['better']}, worse in {gap['worse']} of {gap['of']}")
            lines.append("")
    efficiency = payload["summary"].get("label_efficiency", [])
    if efficiency:
        lines += ["## Hippocampus across patients: Dice against the number of labelled crops", "",
                  "Mean Dice (anterior and posterior) on other patients' crops; the difference is paired with the random-init encoder "
                  "of the same seed, which learned from the same crops (± standard error over seeds; wins = seeds where the encoder is ahead).", "",
                  "| mode | labelled crops | encoder | mean Dice | difference to random-init | wins |", "|---|---:|---|---:|---:|---:|"]
        for entry in efficiency:
            difference = entry.get("difference")
            spread = "" if entry.get("standard_error") is None else f" ± {entry['standard_error']:.3f}"
            lines.append(f"| {entry['mode']} | {entry['labelled_crops']} | {entry['encoder']} | {entry['mean']:.3f} | "
                         + ("" if difference is None else f"{difference:+.3f}{spread}") + " | "
                         + ("" if difference is None else f"{entry['wins']} of {entry['paired']}") + " |")
        lines.append("")
    if payload["ranks"]:  # measured per structure; an across-patients-only run has none
        lines += ["## Effective rank of the standardised features (mean over structures)", "",
                  "Participation ratio of the covariance eigenvalues at 4,000 random voxels: 1 = one direction carries all variance.", "",
                  "| encoder | stride 2 | stride 4 | stride 8 | stride 16 (graph + tokens) |", "|---|---:|---:|---:|---:|"]
    for e in encoders + [RANDOM]:
        values = [r for per_task in payload["ranks"].values() for key, r in per_task.items() if (key == e or (e == RANDOM and key.startswith("random-")))]
        if values:
            lines.append(f"| {e} | " + " | ".join(f"{np.mean([v[str(s)] if str(s) in v else v[s] for v in values]):.2f}" for s in (2, 4, 8, 16)) + " |")
    (out / "pretraining_diagnosis.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def card_task(source: str) -> str:
    from Med3DFMLib.registry import resolve_model

    return str(resolve_model(source).card.get("task"))


def parse_encoders(values: Sequence[str]) -> Dict[str, str]:
    """LABEL=SOURCE or SOURCE (labelled by its file stem or registry id)."""
    encoders = {}
    for value in values:
        label, _, source = value.partition("=") if "=" in value else (Path(value).stem, "", value)
        encoders[label] = source
    return encoders


def main(argv: Sequence[str] = None) -> int:  # type: ignore[assignment]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", default=DEFAULT_STRUCTURES, help="comma-separated structure names (prefixes), as in evaluate_fewshot.py")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--encoder", action="append", default=[], help="an encoder to test, LABEL=SOURCE or SOURCE (registry id or .safetensors file); repeatable")
    parser.add_argument("--checkpoints", type=Path, help="a `med3dfm pretrain` output folder: test every checkpoint in it as well")
    parser.add_argument("--feature-sets", default="all", help=f"comma-separated subset of {', '.join(FEATURE_SETS)}")
    parser.add_argument("--modes", default="adapter", help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--feature-window", type=int, default=0, help="window the encoder runs on (default: the product's)")
    parser.add_argument("--across", default="", help="also learn the hippocampus from this many labelled crops (comma-separated counts) and score on other patients' crops")
    parser.add_argument("--test-cases", type=int, default=10, help="held-out crops scored with --across")
    args = parser.parse_args(argv)
    import torch

    from Med3DFMLib.fewshot import adapt

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    seeds = list(range(args.seeds))
    sources = parse_encoders(args.encoder)  # as given, for the report
    encoders = dict(sources)  # what is loaded
    for label, source in sources.items():
        if card_task(source) == "segment":
            encoders[label] = str(encoder_of_segmenter(source, Path(tempfile.mkdtemp(prefix="med3dfm_seg_"))))
    if args.checkpoints is not None:
        exported = export_checkpoints(args.checkpoints, Path(tempfile.mkdtemp(prefix="med3dfm_ckpt_")))
        encoders.update({label: str(path) for label, path in exported.items()})
        sources.update({label: f"{args.checkpoints}/checkpoints/step_{int(label.split()[1]):07d}" for label in exported})
    if not encoders:
        encoders = sources = {"bundled": "med3dfm-encoder-small"}
    feature_sets = {name: FEATURE_SETS[name] for name in (n.strip() for n in args.feature_sets.split(",")) if name}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    window = args.feature_window or adapt.FEATURE_WINDOW
    try:
        across = [int(n) for n in args.across.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--across: comma-separated crop counts, not {args.across!r}")
    rows, ranks = run([s.strip() for s in args.structures.split(",") if s.strip()], seeds, args.k, lambda m: print(f"[{time.perf_counter() - started:7.1f}s] {m}", flush=True),
                      encoders, feature_sets, modes, window, across, args.test_cases)
    payload = {"machine": f"{platform.machine()} {args.threads} torch threads", "k": args.k, "seeds": seeds, "encoders": sources, "modes": modes,
               "feature_sets": list(feature_sets), "feature_window": window, "wall_s": round(time.perf_counter() - started, 1), "runs": rows,
               "ranks": ranks, "summary": summarise(rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pretraining_diagnosis.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    write_report(args.out, payload)
    print(json.dumps(payload["summary"]["gaps"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
