"""This scan: learned evidence, the painted slices' shapes and the image's edges in one 3D model.

A few painted slices carry three kinds of knowledge about the unpainted ones, and each alone is
weak: the adapter's per-voxel evidence knows what the structure looks like but not where it is and
works on 2.5 mm cells; the painted outlines say where the structure is near them (what Slicer's
Fill between slices uses); the image's own edges say where a boundary runs at full resolution (what
a random walker uses). Here they are combined on the image's own grid:

1. `slice_shape_prior`: per class, the signed distance to the outline on each painted slice,
   interpolated linearly between painted slices and extended past the outermost ones with a
   shrinking cone; its confidence falls with the distance to the nearest painted slice.
2. `correct_prior`: the adapter trains on the same number of points per class, so its
   probabilities assume equal class priors; they are moved to the class frequencies of the
   painted slices.
3. `combine_evidence`: log-linear pooling of the two.
4. `random_walk_with_prior`: a multi-label random walker with priors (Grady 2005): the painted
   voxels are seeds, edge weights come from intensity differences, and the pooled evidence is the
   data term. It is solved only where the evidence is uncertain or near a boundary; elsewhere the
   evidence's answer is kept as a boundary condition, so a 37 M-voxel CT costs about as much as the
   band around its structures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix, diags
from scipy.sparse.linalg import cg

from Med3DFMLib.fewshot.labels import IGNORE

EPS = 1e-4


@dataclass(frozen=True)
class PropagationParams:
    """The few numbers of the within-scan model.

    Defaults were chosen by coordinate search (scripts/tune_this_scan.py) on 16 development
    structures that the evaluation does not score (stomach, left kidney and aorta on the CT; liver,
    spleen and kidney on an abdominal MR; putamen, caudate, amygdala and brain stem on the T1; a
    second brain tumour, a breast lesion, two more DeepLesion lesions; two more hippocampus crops),
    k = 1, 3, 5 painted slices: mean Dice 0.610 with the first guess, 0.678 with these (0.694 since
    `band` went from 5 to 12, 2026-12-02).
    """

    shape_tau_mm: float = 1.0  # outline sharpness on a painted slice (mm of signed distance per logit unit)
    shape_tau_growth: float = 0.2  # ... growing by this many mm per mm away from the nearest painted slice
    cone_slope: float = 1.0  # past the outermost painted slice the outline shrinks this many mm per mm
    adapter_weight: float = 1.0  # log-linear pooling weights
    shape_weight: float = 2.0
    # 0: keep the adapter's balanced prior, 1: the painted slices' class frequencies. The search chose
    # 0 (1 cost 0.01 mean Dice): the painted slices pass through the structure, so their class
    # frequencies overstate it no less than balanced training does.
    prior_correction: float = 0.0
    beta: float = 3.0  # edge weight exp(-beta * (ΔI)² / mean (ΔI)²)
    gamma: float = 0.01  # strength of the evidence (data term) against the edges
    fixed_confidence: float = 0.98  # voxels whose evidence is surer than this, away from boundaries, are not solved
    # voxels around a boundary of the evidence that are always solved. The search's grid ended at 5, its
    # choice; extended on the same development structures: 8 0.689, 12 0.694, 20 0.692 (5: 0.679; wins
    # over the random walker 37 -> 39 of 48; 15 % more solve time). Nothing else moved with it.
    band: int = 12

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _signed_distance(mask: np.ndarray, sampling: Sequence[float]) -> np.ndarray:
    """In-plane signed distance in mm: negative inside the mask, positive outside."""
    if mask.all():
        return -ndimage.distance_transform_edt(np.pad(mask, 1, constant_values=False), sampling=sampling)[1:-1, 1:-1].astype(np.float32)
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    inside = ndimage.distance_transform_edt(mask, sampling=sampling)
    return (outside - inside).astype(np.float32)


def slice_shape_prior(targets: np.ndarray, axis: int, num_classes: int, spacing_zyx: Sequence[float], params: PropagationParams) -> Optional[np.ndarray]:
    """Logits (C+1, Z, Y, X) of the painted outlines, interpolated between painted slices.

    `targets` holds IGNORE, 0 or 1..C on the image grid; painted slices are those of `axis` with
    any non-IGNORE voxel. Returns None when nothing is painted slice-wise (dense labels).
    """
    moved = np.moveaxis(targets, axis, 0)
    painted = [int(i) for i in np.nonzero((moved != IGNORE).reshape(moved.shape[0], -1).any(1))[0]]
    if not painted or len(painted) == moved.shape[0]:
        return None
    in_plane = [s for a, s in enumerate(spacing_zyx) if a != axis]
    step = float(spacing_zyx[axis])
    logits = np.zeros((num_classes + 1,) + moved.shape, dtype=np.float32)
    positions = np.array(painted, dtype=np.float64)
    for cls in range(1, num_classes + 1):
        distances = {z: _signed_distance(moved[z] == cls, in_plane) for z in painted}
        present = [z for z in painted if (moved[z] == cls).any()]
        if not present:
            logits[cls] = -30.0
            continue
        # A painted slice without the structure: the structure has ended there, so its outline
        # shrinks to nothing at that slice (a constant distance as deep as the deepest outline).
        depth = max(float(-distances[z].min()) for z in present)
        for z in painted:
            if z not in present:
                distances[z] = np.full(moved.shape[1:], depth, dtype=np.float32)
        for z in range(moved.shape[0]):
            below = positions[positions <= z]
            above = positions[positions >= z]
            if below.size and above.size:
                a, b = int(below.max()), int(above.min())
                t = 0.0 if a == b else (z - a) / (b - a)
                sdf = (1 - t) * distances[a] + t * distances[b]
                gap_mm = min(z - a, b - z) * step
            else:
                end = int(below.max()) if below.size else int(above.min())
                gap_mm = abs(z - end) * step
                sdf = distances[end] + params.cone_slope * gap_mm
            tau = params.shape_tau_mm + params.shape_tau_growth * gap_mm
            logits[cls, z] = np.clip(-sdf / tau, -30.0, 30.0)
    # Background against each class: a one-vs-rest logit per class becomes a softmax whose
    # background logit is 0 (so a single class gives exactly sigmoid(class logit)).
    return np.moveaxis(logits, 1, axis + 1)


def painted_class_frequencies(targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Class frequencies among the labelled voxels (the prior the painted slices imply)."""
    counts = np.bincount(targets[targets != IGNORE].astype(np.int64).ravel(), minlength=num_classes + 1)[: num_classes + 1].astype(np.float64)
    return np.maximum(counts, 1.0) / max(counts.sum(), 1.0)


def correct_prior(probabilities: np.ndarray, frequencies: np.ndarray, strength: float) -> np.ndarray:
    """Log-probabilities moved from the equal class priors of balanced training to `frequencies`."""
    shift = (strength * (np.log(frequencies) - np.log(1.0 / len(frequencies)))).astype(np.float32)
    logp = np.clip(probabilities, EPS, 1.0).astype(np.float32, copy=False)
    np.log(logp, out=logp)
    logp += shift.reshape(-1, *([1] * (probabilities.ndim - 1)))
    return logp


def channel_argmax(probabilities: np.ndarray) -> np.ndarray:
    """`probabilities.argmax(0)` (first channel on ties) as uint8/uint16: numpy's arg-max along the
    first axis of a (C, Z, Y, X) array strides through memory and took ~0.15 s per call on a
    6.5 M-voxel MR, three times per round; this is one contiguous pass per channel."""
    dtype = np.uint8 if probabilities.shape[0] <= 256 else np.uint16
    best = probabilities[0].copy()
    label = np.zeros(best.shape, dtype=dtype)
    for cls in range(1, probabilities.shape[0]):
        np.copyto(label, dtype(cls), where=probabilities[cls] > best)
        np.maximum(best, probabilities[cls], out=best)
    return label


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=0, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=0, keepdims=True)
    return shifted


def combine_evidence(adapter_probabilities: Optional[np.ndarray], shape_logits: Optional[np.ndarray], frequencies: np.ndarray, params: PropagationParams) -> np.ndarray:
    """Probabilities (C+1, ...) from log-linear pooling of the adapter and the painted outlines."""
    total: Optional[np.ndarray] = None
    if adapter_probabilities is not None:
        total = correct_prior(adapter_probabilities, frequencies, params.prior_correction)
        total *= np.float32(params.adapter_weight)
    if shape_logits is not None:
        part = params.shape_weight * shape_logits
        total = part if total is None else total + part
    if total is None:
        raise ValueError("combine_evidence needs adapter probabilities or a shape prior")
    return _softmax(total.astype(np.float32, copy=False))


def _unknowns(seeds: np.ndarray, evidence: np.ndarray, label: np.ndarray, params: PropagationParams) -> np.ndarray:
    """Voxels to solve: unseeded, and unsure or within `band` voxels of a boundary of the evidence
    (`label`: the evidence's arg-max)."""
    unsure = evidence.max(0) < params.fixed_confidence
    if params.band > 0:
        unsure |= _near_boundaries(label, params.band)
    return unsure & (seeds == IGNORE)


def _near_boundaries(label: np.ndarray, band: int) -> np.ndarray:
    """Voxels within `band` voxels (dilation steps) of a change of label.

    Computed on the box around the non-background labels, widened by the band: outside it every voxel
    is background and more than `band` from any other label, so the answer there is False and the
    dilations inside the box are those of the whole volume (a 6.5 M-voxel MR: 12 dilation steps over
    the whole volume cost more than the solve)."""
    near = np.zeros(label.shape, dtype=bool)
    where = np.nonzero(label)
    if where[0].size == 0:
        return near  # one label everywhere: no boundary
    box = tuple(slice(max(int(w.min()) - band - 1, 0), min(int(w.max()) + band + 2, n)) for w, n in zip(where, label.shape))
    part = label[box]
    boundary = np.zeros(part.shape, dtype=bool)
    for cls in np.unique(part):
        inside = part == cls
        boundary |= ndimage.binary_dilation(inside, iterations=band) & ~inside
    near[box] = boundary
    return near


def random_walk_with_prior(
    image: np.ndarray,
    spacing_zyx: Sequence[float],
    seeds: np.ndarray,
    evidence: np.ndarray,
    params: PropagationParams,
    tolerance: float = 1e-3,
    max_iterations: int = 300,
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Class probabilities (C+1, Z, Y, X) of a random walker with priors on the image grid.

    Minimises Σ_edges w_pq (x_p − x_q)² + γ Σ_p Σ_c (x_pc − e_pc)² per class c, with the seeds
    (`seeds` ≥ 0) and the confident voxels away from boundaries fixed to their class. `image` is
    the intensity volume (any scale); edges join the 6 face neighbours, weighted by
    exp(−β ΔI² / mean ΔI²) and by (smallest spacing / spacing along the edge)², the coupling a
    discretised smoothness term has on an anisotropic grid.
    """
    num_labels = evidence.shape[0]
    label = channel_argmax(evidence)
    fixed_label = np.where(seeds != IGNORE, seeds, label).astype(np.int64)
    unknown = _unknowns(seeds, evidence, label, params)
    del label
    count = int(unknown.sum())
    info: Dict[str, Any] = {"solved_voxels": count, "voxels": int(unknown.size)}
    result = np.zeros_like(evidence, dtype=np.float32)
    for cls in range(num_labels):
        result[cls] = fixed_label == cls
    if count == 0:
        info["iterations"] = 0
        return result, info

    values = image.astype(np.float32, copy=False)
    index = np.full(unknown.shape, -1, dtype=np.int64)
    index[unknown] = np.arange(count)
    # Scale of the intensity differences, from edges near the unknowns.
    squares: List[np.ndarray] = []
    pairs: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (p index or -1, q index or -1, weight) per edge
    fixed_of: List[Tuple[np.ndarray, np.ndarray]] = []
    smallest = float(min(spacing_zyx))
    for axis in range(3):
        low = [slice(None)] * 3
        high = [slice(None)] * 3
        low[axis], high[axis] = slice(0, -1), slice(1, None)
        low_t, high_t = tuple(low), tuple(high)
        involved = unknown[low_t] | unknown[high_t]
        where = np.nonzero(involved)
        if where[0].size == 0:
            continue
        shifted = list(where)
        shifted[axis] = where[axis] + 1
        shifted_t = tuple(shifted)
        difference = values[where] - values[shifted_t]
        squares.append(difference.astype(np.float64) ** 2)
        pairs.append((index[where], index[shifted_t], np.full(1, (smallest / float(spacing_zyx[axis])) ** 2)))
        fixed_of.append((fixed_label[where], fixed_label[shifted_t]))
    scale = float(np.mean(np.concatenate(squares))) if squares else 1.0
    scale = max(scale, 1e-12)

    rows, cols, weights = [], [], []
    degree = np.zeros(count, dtype=np.float64)
    rhs = np.zeros((count, num_labels), dtype=np.float64)
    for (p, q, axis_weight), square, (fixed_p, fixed_q) in zip(pairs, squares, fixed_of):
        w = axis_weight[0] * np.exp(-params.beta * square / scale) + 1e-6
        both = (p >= 0) & (q >= 0)
        rows.append(p[both])
        cols.append(q[both])
        weights.append(w[both])
        np.add.at(degree, p[p >= 0], w[p >= 0])
        np.add.at(degree, q[q >= 0], w[q >= 0])
        # Edges to a fixed voxel move its known value to the right-hand side.
        to_fixed_q = (p >= 0) & (q < 0)
        np.add.at(rhs, (p[to_fixed_q], fixed_q[to_fixed_q]), w[to_fixed_q])
        to_fixed_p = (q >= 0) & (p < 0)
        np.add.at(rhs, (q[to_fixed_p], fixed_p[to_fixed_p]), w[to_fixed_p])
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    w = np.concatenate(weights)
    diagonal = degree + params.gamma
    # One COO with the diagonal in it: adding a diagonal matrix to the CSR afterwards cost ~0.9 s on a
    # 94 k-unknown band (scipy's setdiag path), more than the solve.
    diagonal_index = np.arange(count)
    system = coo_matrix((np.concatenate([-w, -w, diagonal]), (np.concatenate([r, c, diagonal_index]), np.concatenate([c, r, diagonal_index]))),
                        shape=(count, count)).tocsr()
    preconditioner = diags(1.0 / diagonal)
    prior = evidence[:, unknown].T.astype(np.float64)  # (count, C+1)
    iterations = []
    solved = np.zeros((count, num_labels), dtype=np.float64)
    for cls in range(1, num_labels) if num_labels == 2 else range(num_labels):
        b = rhs[:, cls] + params.gamma * prior[:, cls]
        steps = [0]

        def tick(_: np.ndarray) -> None:
            steps[0] += 1

        x, _ = cg(system, b, x0=prior[:, cls], rtol=tolerance, maxiter=max_iterations, M=preconditioner, callback=tick)
        solved[:, cls] = x
        iterations.append(steps[0])
    if num_labels == 2:
        solved[:, 0] = 1.0 - solved[:, 1]
    solved = np.clip(solved, 0.0, None)
    solved /= np.maximum(solved.sum(1, keepdims=True), 1e-12)
    for cls in range(num_labels):
        channel = result[cls]
        channel[unknown] = solved[:, cls]
    info["iterations"] = iterations
    return result, info


def normalised_intensities(array: np.ndarray) -> np.ndarray:
    """The scan's intensities on [0, 1] by its 0.5–99.5 percentiles (edge weights are scale-free anyway;
    this only keeps outliers from dominating the mean squared difference)."""
    sample = array[:: max(1, array.shape[0] // 64)]
    low, high = np.percentile(sample, [0.5, 99.5])
    return np.clip((array.astype(np.float32) - low) / max(float(high - low), 1e-6), 0.0, 1.0)


def segment_this_scan(
    intensities: np.ndarray,
    spacing_zyx: Sequence[float],
    targets: np.ndarray,
    axis: Optional[int],
    adapter_probabilities: Optional[np.ndarray],
    params: PropagationParams = PropagationParams(),
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Labels (Z, Y, X) of the scan the labels were painted on: evidence + outlines + edges.

    `targets` (IGNORE / 0 / 1..C) and `adapter_probabilities` (C+1, Z, Y, X) lie on the image grid
    of `intensities`; `axis` is the painted slices' array axis (None for dense labels, when only
    the adapter and the edges count). Painted voxels keep their painted class.
    """
    num_classes = (adapter_probabilities.shape[0] - 1) if adapter_probabilities is not None else int(targets.max())
    shape = slice_shape_prior(targets, axis, num_classes, spacing_zyx, params) if axis is not None else None
    frequencies = painted_class_frequencies(targets, num_classes)
    evidence = combine_evidence(adapter_probabilities, shape, frequencies, params)
    del shape
    probabilities, info = random_walk_with_prior(normalised_intensities(intensities), spacing_zyx, targets, evidence, params)
    del evidence
    labels = channel_argmax(probabilities)
    info["params"] = params.to_dict()
    return labels, info
