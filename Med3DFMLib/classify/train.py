"""Training the classification adapter on cached tokens, with calibration by cross-fitting.

Few labelled scans cannot spare a separate calibration set, so every example is used twice:
K-fold cross-fitting (K = min(5, smallest class count)) trains K adapters, each scoring the fold it
did not see. Those out-of-fold logits choose the number of training steps and fit the temperature;
the final adapter then trains on all examples for that many steps. With fewer than
`MIN_CALIBRATION_PER_CLASS` examples in some class the fitted temperature is not trusted: it may
only soften (T ≥ 1), and the result is marked as not calibrated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from Med3DFMLib.classify.model import ClassifyAdapter
from Med3DFMLib.cpu import flush_denormals, single_thread
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.progress import Progress

MIN_CALIBRATION_PER_CLASS = 20  # with 10 per class the fitted T ranged 2.3-20 across draws (docs/classification_eval.md)
MAX_FOLDS = 5


@dataclass
class Example:
    """One scan (or region) as the adapter sees it: its tokens inside the region and their weights."""

    tokens: torch.Tensor  # (N, C) raw stride-16 features of the cells inside the region
    log_weight: torch.Tensor  # (N,) log occupancy
    label: int
    aux: Optional[torch.Tensor] = None  # (N,) fraction of each cell inside the evidence mask


def _batch(examples: Sequence[Example], token_drop: float, generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = pad_sequence([e.tokens for e in examples], batch_first=True)
    weights = pad_sequence([e.log_weight for e in examples], batch_first=True, padding_value=-float("inf"))
    aux = pad_sequence([e.aux if e.aux is not None else torch.full((e.tokens.shape[0],), -1.0) for e in examples], batch_first=True, padding_value=-1.0)
    if token_drop > 0:
        # Drop random cells (never all of one example): the frozen features cannot be augmented
        # by transforming the scan, but the pooling can be taught not to rely on one cell.
        finite = weights.isfinite()
        drop = (torch.rand(weights.shape, generator=generator) < token_drop) & finite
        emptied = ~(finite & ~drop).any(1, keepdim=True)
        drop &= ~emptied
        weights = weights.masked_fill(drop, -float("inf"))
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return tokens, weights, labels, aux, torch.tensor([e.aux is not None for e in examples])


def predict_logits(model: ClassifyAdapter, examples: Sequence[Example], batch: int = 64) -> torch.Tensor:
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            tokens, weights, _, _, _ = _batch(examples[start : start + batch], 0.0, None)
            outputs.append(model(tokens, weights)[0])
    return torch.cat(outputs) if outputs else torch.zeros(0, model.num_classes)


def fit_adapter(
    examples: Sequence[Example],
    num_classes: int,
    steps: int,
    seed: int = 0,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    batch: int = 32,
    aux_weight: float = 0.5,
    checkpoints: Sequence[int] = (),
    held_out: Sequence[Example] = (),
) -> Tuple[ClassifyAdapter, Dict[int, torch.Tensor]]:
    """Train one adapter; returns it and the held-out logits at each checkpoint step."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ClassifyAdapter(int(examples[0].tokens.shape[1]), num_classes)
    every = torch.cat([e.tokens for e in examples])
    model.mean.copy_(every.mean(0))
    model.std.copy_(every.std(0).clamp_min(1e-3))
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / 20))
    recorded: Dict[int, torch.Tensor] = {}
    wanted = set(checkpoints)
    for step in range(1, steps + 1):
        model.train()
        chosen = torch.randperm(len(examples), generator=generator)[: min(batch, len(examples))]
        tokens, weights, labels, aux, has_aux = _batch([examples[i] for i in chosen.tolist()], 0.25, generator)
        noise = torch.randn(tokens.shape, generator=generator) * 0.1
        logits, _, aux_logits = model.forward_standardised(model.standardise(tokens) + noise, weights)
        loss = F.cross_entropy(logits, labels)
        if aux_weight > 0 and bool(has_aux.any()):
            valid = (aux >= 0) & weights.isfinite()
            if bool(valid.any()):
                loss = loss + aux_weight * F.binary_cross_entropy_with_logits(aux_logits[valid], aux[valid])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step in wanted and held_out:
            recorded[step] = predict_logits(model, held_out)
    model.eval()
    return model, recorded


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature minimising the NLL (search over log T in [1/20, 20]; robust, no optimiser state)."""
    candidates = torch.logspace(np.log10(0.05), np.log10(20.0), 241)
    nll = torch.stack([F.cross_entropy(logits / t, labels) for t in candidates])
    return float(candidates[int(nll.argmin())])


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE with equal-width confidence bins."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN if one class is absent."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average ranks over ties
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1
        start = end + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auroc(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Binary: AUROC of the second class; more classes: mean one-vs-rest AUROC."""
    if probabilities.shape[1] == 2:
        return auroc(probabilities[:, 1], labels == 1)
    values = [auroc(probabilities[:, k], labels == k) for k in range(probabilities.shape[1])]
    return float(np.nanmean(values))


def _folds(labels: np.ndarray, k: int, seed: int) -> List[np.ndarray]:
    """Stratified folds: each class's examples dealt round-robin after a shuffle."""
    rng = np.random.default_rng(seed)
    assignment = np.zeros(len(labels), dtype=int)
    for cls in np.unique(labels):
        members = rng.permutation(np.nonzero(labels == cls)[0])
        assignment[members] = np.arange(len(members)) % k
    return [np.nonzero(assignment == f)[0] for f in range(k)]


def default_steps(n: int, batch: int = 32) -> int:
    """About 40 epochs, between 200 and 800 steps: enough for the tiny head, cheap on a CPU."""
    return int(min(800, max(200, 40 * n // batch)))


def train_classifier(
    examples: Sequence[Example],
    class_names: Sequence[str],
    seed: int = 0,
    max_steps: Optional[int] = None,
    aux_weight: float = 0.5,
    progress: Optional[Progress] = None,
) -> Tuple[ClassifyAdapter, float, Dict[str, Any]]:
    """(adapter, temperature, summary) from labelled examples (see the module docstring)."""
    with single_thread(), flush_denormals():
        return _train_classifier(examples, class_names, seed, max_steps, aux_weight, progress)


def _train_classifier(examples: Sequence[Example], class_names: Sequence[str], seed: int, max_steps: Optional[int], aux_weight: float, progress: Optional[Progress]) -> Tuple[ClassifyAdapter, float, Dict[str, Any]]:
    started = time.perf_counter()
    labels = np.array([e.label for e in examples])
    counts = np.bincount(labels, minlength=len(class_names))
    for name, count in zip(class_names, counts):
        if count < 2:
            raise Med3DFMError(f"class '{name}' has {count} example(s); every class needs at least 2")
    steps = max_steps or default_steps(len(examples))
    every = min(steps, max(10, steps // 20))
    checkpoints = sorted(set(range(every, steps + 1, every)) | {steps})  # never empty, even for a few steps
    k = int(min(MAX_FOLDS, counts.min()))
    folds = _folds(labels, k, seed)
    oof = {c: torch.zeros(len(examples), len(class_names)) for c in checkpoints}
    for index, held in enumerate(folds):
        if progress is not None:
            progress.update("train", index / (k + 1), f"cross-fitting fold {index + 1} of {k}")
        train_idx = np.setdiff1d(np.arange(len(examples)), held)
        _, recorded = fit_adapter([examples[i] for i in train_idx], len(class_names), steps, seed + index + 1, aux_weight=aux_weight, checkpoints=checkpoints, held_out=[examples[i] for i in held])
        for step, logits in recorded.items():
            oof[step][torch.from_numpy(held)] = logits
    target = torch.from_numpy(labels)
    scored = []
    for step in checkpoints:
        temperature = fit_temperature(oof[step], target)
        scored.append((float(F.cross_entropy(oof[step] / temperature, target)), step, temperature))
    best_nll, best_step, fitted = min(scored)
    if progress is not None:
        progress.update("train", k / (k + 1), f"final adapter on all {len(examples)} examples, {best_step} steps")
    model, _ = fit_adapter(examples, len(class_names), best_step, seed, aux_weight=aux_weight)
    trusted = bool(counts.min() >= MIN_CALIBRATION_PER_CLASS)
    temperature = fitted if trusted else max(fitted, 1.0)
    raw = oof[best_step].softmax(1).numpy()
    scaled = (oof[best_step] / temperature).softmax(1).numpy()
    if trusted:
        note = f"temperature {temperature:.3g} fitted on {len(examples)} out-of-fold predictions ({k}-fold cross-fitting)"
    else:
        note = (
            f"not calibrated: only {int(counts.min())} example(s) in the smallest class (at least {MIN_CALIBRATION_PER_CLASS} needed); "
            f"temperature {temperature:.3g} from {k}-fold cross-fitting, allowed only to soften"
        )
    summary = {
        "examples": int(len(examples)),
        "per_class": {name: int(c) for name, c in zip(class_names, counts)},
        "folds": k,
        "steps": int(best_step),
        "max_steps": int(steps),
        "aux_masks": int(sum(e.aux is not None for e in examples)),
        "aux_weight": aux_weight if any(e.aux is not None for e in examples) else 0.0,
        "out_of_fold": {
            "nll": round(best_nll, 4),
            "accuracy": round(float((raw.argmax(1) == labels).mean()), 4),
            "auroc": round(macro_auroc(raw, labels), 4),
            "ece_before": round(expected_calibration_error(raw, labels), 4),
            "ece_after": round(expected_calibration_error(scaled, labels), 4),
        },
        "seconds": round(time.perf_counter() - started, 2),
    }
    calibration = {"calibrated": trusted, "temperature": round(temperature, 4), "fitted_temperature": round(fitted, 4), "method": "temperature scaling on out-of-fold predictions", "note": note}
    summary["calibration"] = calibration
    return model, temperature, summary
