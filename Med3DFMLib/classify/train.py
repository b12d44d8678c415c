"""Training the classification adapter on cached tokens, with calibration by cross-fitting.

Few labelled scans cannot spare a separate calibration set, so every example is used twice:
K-fold cross-fitting (K = min(5, smallest class count)) trains K adapters, each scoring the fold it
did not see. Those out-of-fold logits choose the number of training steps and fit the temperature,
and the shipped model is the ensemble of those K fold models at that step, so the temperature
belongs to the models that are applied. The ECE reported as held out scales each fold with a
temperature fitted on the other folds only. With fewer than `MIN_CALIBRATION_PER_CLASS` examples
in some class the out-of-fold predictions are too few to choose either: the fitted temperature may
only soften (T ≥ 1), the result is marked as not calibrated, and the full schedule is shipped
(choosing among 20 checkpoints on 20 predictions shipped models stopped after 10 of 200 steps in
three of five draws at 10 per class: val AUROC 0.681 on average, 0.724 with the full schedule;
docs/classification_eval.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from Med3DFMLib.classify.model import ClassifyAdapter, PoolingHead
from Med3DFMLib.cpu import flush_denormals, single_thread
from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.progress import Progress

MIN_CALIBRATION_PER_CLASS = 20  # with 10 per class the fitted T ranged 2.3-20 across draws (docs/classification_eval.md)
MAX_FOLDS = 5


@dataclass
class View:
    """One view of a scan as the adapter sees it: per level, the tokens inside the region and their weights."""

    tokens: List[torch.Tensor]  # per level (N, C) raw features of the cells inside the region
    log_weight: List[torch.Tensor]  # per level (N,) log occupancy
    aux: Optional[torch.Tensor] = None  # (N_16,) fraction of each stride-16 cell inside the evidence mask


@dataclass
class Example:
    """A labelled scan (or region): its views (the original first, then augmented ones)."""

    views: List[View]
    label: int

    @property
    def has_aux(self) -> bool:
        return self.views[0].aux is not None


def _batch(views: Sequence[View], token_drop: float, generator: Optional[torch.Generator]) -> Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
    """Padded tokens and log weights per level, and the aux targets (−1 where there is none)."""
    tokens, weights = [], []
    for level in range(len(views[0].tokens)):
        tokens.append(pad_sequence([v.tokens[level] for v in views], batch_first=True))
        w = pad_sequence([v.log_weight[level] for v in views], batch_first=True, padding_value=-float("inf"))
        if token_drop > 0:
            # Drop random cells (never all of one example): the pooling is taught not to rely on one cell.
            finite = w.isfinite()
            drop = (torch.rand(w.shape, generator=generator) < token_drop) & finite
            drop &= (finite & ~drop).any(1, keepdim=True)
            w = w.masked_fill(drop, -float("inf"))
        weights.append(w)
    aux = pad_sequence([v.aux if v.aux is not None else torch.full((v.tokens[-1].shape[0],), -1.0) for v in views], batch_first=True, padding_value=-1.0)
    return tokens, weights, aux


def predict_logits(model: torch.nn.Module, examples: Sequence[Example], batch: int = 64) -> torch.Tensor:
    """Logits of each example's first (unaugmented) view."""
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            tokens, weights, _ = _batch([e.views[0] for e in examples[start : start + batch]], 0.0, None)
            outputs.append(model(tokens, weights)[0])
    return torch.cat(outputs) if outputs else torch.zeros(0, 2)


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
) -> Tuple[PoolingHead, Dict[int, torch.Tensor], Dict[int, Dict[str, torch.Tensor]]]:
    """Train one pooling head; returns it, the held-out logits and the weights at each checkpoint step."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    first = examples[0].views[0]
    model = PoolingHead([t.shape[1] for t in first.tokens], num_classes)
    model.set_statistics([torch.cat([v.tokens[level] for e in examples for v in e.views]) for level in range(len(first.tokens))])
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / 20))
    recorded: Dict[int, torch.Tensor] = {}
    states: Dict[int, Dict[str, torch.Tensor]] = {}
    wanted = set(checkpoints)
    for step in range(1, steps + 1):
        model.train()
        chosen = torch.randperm(len(examples), generator=generator)[: min(batch, len(examples))].tolist()
        views = [examples[i].views[int(torch.randint(len(examples[i].views), (1,), generator=generator))] for i in chosen]
        tokens, weights, aux = _batch(views, 0.25, generator)
        noisy = [x + torch.randn(x.shape, generator=generator) * 0.1 for x in model.standardise(tokens)]
        logits, _, aux_logits = model.forward_standardised(noisy, weights)
        loss = F.cross_entropy(logits, torch.tensor([examples[i].label for i in chosen]))
        if aux_weight > 0:
            valid = (aux >= 0) & weights[-1].isfinite()
            if bool(valid.any()):
                loss = loss + aux_weight * F.binary_cross_entropy_with_logits(aux_logits[valid], aux[valid])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step in wanted:
            states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if held_out:
                recorded[step] = predict_logits(model, held_out)
    model.eval()
    return model, recorded, states


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
    fold_states = []
    for index, held in enumerate(folds):
        if progress is not None:
            progress.update("train", index / k, f"cross-fitting fold {index + 1} of {k}")
        train_idx = np.setdiff1d(np.arange(len(examples)), held)
        _, recorded, states = fit_adapter([examples[i] for i in train_idx], len(class_names), steps, seed + index + 1, aux_weight=aux_weight, checkpoints=checkpoints, held_out=[examples[i] for i in held])
        fold_states.append(states)
        for step, logits in recorded.items():
            oof[step][torch.from_numpy(held)] = logits
    target = torch.from_numpy(labels)
    trusted = bool(counts.min() >= MIN_CALIBRATION_PER_CLASS)
    best_nll, best_step, fitted = choose_step(oof, target, trusted)
    # The shipped model is the ensemble of the fold models at the chosen step: the out-of-fold
    # logits that fitted the temperature came from these very models.
    first = examples[0].views[0]
    model = ClassifyAdapter([t.shape[1] for t in first.tokens], len(class_names), members=k)
    for member, states in zip(model.members, fold_states):
        member.load_state_dict(states[best_step])
    model.eval()
    temperature = fitted if trusted else max(fitted, 1.0)
    logits = oof[best_step]
    raw = logits.softmax(1).numpy()
    scaled = (logits / temperature).softmax(1).numpy()
    held_out_scaled = calibrated_on_other_folds(logits, target, folds, trusted)
    if trusted:
        note = f"temperature {temperature:.3g} fitted on {len(examples)} out-of-fold predictions of the {k} shipped fold models"
    else:
        note = (
            f"not calibrated: only {int(counts.min())} example(s) in the smallest class (at least {MIN_CALIBRATION_PER_CLASS} needed); "
            f"temperature {temperature:.3g} from {k}-fold cross-fitting, allowed only to soften; all {steps} training steps (too few predictions to choose a step)"
        )
    prevalence = {name: round(float(c / len(examples)), 4) for name, c in zip(class_names, counts)}
    summary = {
        "examples": int(len(examples)),
        "views": int(len(examples[0].views)),
        "per_class": {name: int(c) for name, c in zip(class_names, counts)},
        "folds": k,
        "members": k,
        "steps": int(best_step),
        "max_steps": int(steps),
        "aux_masks": int(sum(e.has_aux for e in examples)),
        "aux_weight": aux_weight if any(e.has_aux for e in examples) else 0.0,
        "out_of_fold": {
            "nll": round(best_nll, 4),
            "accuracy": round(float((raw.argmax(1) == labels).mean()), 4),
            "auroc": round(macro_auroc(raw, labels), 4),
            "ece_before": round(expected_calibration_error(raw, labels), 4),
            "ece_after": round(expected_calibration_error(scaled, labels), 4),
            "ece_held_out": round(expected_calibration_error(held_out_scaled, labels), 4),
        },
        "seconds": round(time.perf_counter() - started, 2),
    }
    calibration = {
        "calibrated": trusted, "temperature": round(temperature, 4), "fitted_temperature": round(fitted, 4),
        "method": "temperature scaling on the out-of-fold predictions of the shipped fold models",
        "ece_held_out": summary["out_of_fold"]["ece_held_out"], "training_prevalence": prevalence, "note": note,
    }
    summary["calibration"] = calibration
    return model, temperature, summary


def choose_step(oof: Dict[int, torch.Tensor], labels: torch.Tensor, trusted: bool) -> Tuple[float, int, float]:
    """(NLL, step, temperature) of the checkpoint whose temperature-scaled out-of-fold NLL is lowest;
    the last checkpoint when the predictions are too few to be trusted with the choice."""
    steps = sorted(oof) if trusted else [max(oof)]
    scored = []
    for step in steps:
        temperature = fit_temperature(oof[step], labels)
        scored.append((float(F.cross_entropy(oof[step] / temperature, labels)), step, temperature))
    return min(scored)


def calibrated_on_other_folds(logits: torch.Tensor, labels: torch.Tensor, folds: Sequence[np.ndarray], trusted: bool = True) -> np.ndarray:
    """Probabilities of each fold's out-of-fold logits under a temperature fitted on the other folds
    only: predictions on data used for neither training nor calibration, for an honest ECE."""
    scaled = np.zeros(tuple(logits.shape), dtype=np.float32)
    for held in folds:
        others = torch.from_numpy(np.setdiff1d(np.arange(len(labels)), held))
        t = fit_temperature(logits[others], labels[others])
        scaled[held] = (logits[torch.from_numpy(held)] / (t if trusted else max(t, 1.0))).softmax(1).numpy()
    return scaled


def adjusted_for_prevalence(probabilities: np.ndarray, training: Sequence[float], deployment: Sequence[float]) -> np.ndarray:
    """Bayes' rule for a prior shift: p'(k|x) ∝ p(k|x) · π'_k / π_k (probabilities (..., K))."""
    ratio = np.asarray(deployment, dtype=np.float64) / np.asarray(training, dtype=np.float64)
    adjusted = np.asarray(probabilities, dtype=np.float64) * ratio
    return adjusted / adjusted.sum(-1, keepdims=True)


def deployment_prevalence(classes: Sequence[str], training: Dict[str, float], given: Dict[str, float]) -> List[float]:
    """The prior of every class from the ones a user gave (the rest share what is left in their
    training proportions); one-line errors for unknown classes and impossible values."""
    lookup = {c.lower(): c for c in classes}
    chosen: Dict[str, float] = {}
    for name, value in given.items():
        if name.strip().lower() not in lookup:
            raise Med3DFMError(f"--prevalence names unknown class {name!r}; this model's classes are: {', '.join(classes)}")
        if not 0.0 < value < 1.0:
            raise Med3DFMError(f"--prevalence {name}={value}: a prevalence lies strictly between 0 and 1")
        chosen[lookup[name.strip().lower()]] = float(value)
    rest = [c for c in classes if c not in chosen]
    left = 1.0 - sum(chosen.values())
    if (rest and left <= 0) or (not rest and abs(left) > 1e-6):
        raise Med3DFMError(f"--prevalence values must leave a share for every class and sum to 1 (given: {', '.join(f'{k}={v}' for k, v in chosen.items())})")
    share = sum(training[c] for c in rest)
    return [chosen[c] if c in chosen else left * training[c] / share for c in classes]
