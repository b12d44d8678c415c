"""The label side of the SynthSeg recipe: which label values a training map may hold, how they group
into intensity classes, which are outside the brain, and which a network is asked to predict.

SynthSeg (Billot et al., Medical Image Analysis 2023; BBillot/SynthSeg, Apache-2.0) ships its
whole-head training maps with four small arrays, read here by `load_label_table`:

* `generation_labels.npy`: the 54 label values, background first, then 18 labels without a side
  (ventricles 14/15, brain stem 16, CSF 24, ..., the extra-cerebral tissues 502..530), then 18 left
  labels and the 18 matching right labels in the same order (so left i pairs with right i);
* `generation_classes.npy`: one intensity class per label (48 classes): labels of a class share one
  Gaussian when the contrast is drawn at random (e.g. left and right white matter);
* `prior_means_t1.npy`, `prior_stds_t1.npy`: (2, 25) arrays, row 0 the mean and row 1 the standard
  deviation of a normal prior on the mean (resp. the std) of each of 25 T1 tissue classes.

The 25 T1 classes are coarser than the 48 random-contrast ones (e.g. every CSF space is one class,
caudate, hippocampus and amygdala share the cortex's grey matter): SynthSeg stores that grouping as
`generation_classes_contrast_specific.npy`, which the shared data folder does not hold, so it is
written out below (`T1_PRIOR_CLASS_OF_LABEL`, value for value that file's grouping, with names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

# The 25 tissue classes of SynthSeg's T1 priors, by column of prior_means_t1.npy / prior_stds_t1.npy.
T1_PRIOR_CLASS_NAMES = (
    "background",                      # 0
    "CSF (ventricles, CSF, 5th ventricle)",  # 1
    "white matter (cerebral, optic chiasm)",  # 2
    "grey matter (cortex, caudate, hippocampus, amygdala, accumbens, ...)",  # 3
    "cerebellum white matter",         # 4
    "cerebellum cortex",               # 5
    "thalamus",                        # 6
    "putamen",                         # 7
    "pallidum",                        # 8
    "ventral DC",                      # 9
    "white-matter lesions",            # 10
    "vessel",                          # 11
    "labels 136/137/163/164",          # 12
    "brain stem",                      # 13
) + tuple(f"extra-cerebral {label}" for label in (502, 506, 507, 508, 509, 511, 512, 514, 515, 516, 530))  # 14..24

# label value -> T1 prior class (SynthSeg's generation_classes_contrast_specific.npy, as a table)
T1_PRIOR_CLASS_OF_LABEL: Dict[int, int] = {
    0: 0,
    14: 1, 15: 1, 24: 1, 72: 1, 4: 1, 5: 1, 43: 1, 44: 1,
    85: 2, 2: 2, 41: 2,
    3: 3, 11: 3, 17: 3, 18: 3, 26: 3, 42: 3, 50: 3, 53: 3, 54: 3, 58: 3,
    7: 4, 46: 4,
    8: 5, 47: 5,
    10: 6, 49: 6,
    12: 7, 51: 7,
    13: 8, 52: 8,
    28: 9, 60: 9,
    25: 10, 57: 10,
    30: 11, 62: 11,
    136: 12, 137: 12, 163: 12, 164: 12,
    16: 13,
    502: 14, 506: 15, 507: 16, 508: 17, 509: 18, 511: 19, 512: 20, 514: 21, 515: 22, 516: 23, 530: 24,
}

# Label values from 500 up are the tissues outside the brain (skull, skin, eyes, fat, muscle, ...):
# a skull-stripped image has none of them.
EXTRA_CEREBRAL_MIN_LABEL = 500

# The 33 structures SynthSeg 2.0 segments (its labels_table.txt), background included.
SYNTHSEG_OUTPUT_LABELS = (0, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 26, 24, 28,
                          41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60)

# Generation labels SynthSeg folds into a predicted structure rather than into background: lesions
# into white matter, labels 136/137 (163/164) into the lateral (inferior lateral) ventricle.
SYNTHSEG_OUTPUT_MERGES: Dict[int, int] = {25: 2, 57: 41, 136: 4, 137: 5, 163: 43, 164: 44}


def read_labels_table(path: Union[str, Path]) -> Dict[int, str]:
    """{label value: structure name} from a SynthSeg-style `labels_table.txt` (the lines that start
    with an integer; the rest is prose)."""
    table: Dict[int, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].isdigit():
            table[int(parts[0])] = parts[1].strip()
    if not table:
        raise ValueError(f"{path}: no 'label name' lines found")
    return table


@dataclass(frozen=True)
class LabelTable:
    """Everything the generator needs to know about label values.

    All per-label arrays are indexed like `labels` (the generation labels, background first).
    """

    labels: np.ndarray            # (L,) int64 label values; labels[0] == 0 (background)
    classes: np.ndarray           # (L,) int64 random-contrast class of each label, 0..K-1
    prior_classes: np.ndarray     # (L,) int64 T1 prior class of each label, 0..P-1
    prior_means: Optional[np.ndarray]  # (2, P) mean / std of the normal prior on a class's mean
    prior_stds: Optional[np.ndarray]   # (2, P) mean / std of the normal prior on a class's std
    n_neutral: int                # labels[:n_neutral] have no side; then left, then right, paired
    extra_cerebral: np.ndarray    # (L,) bool

    def __post_init__(self) -> None:
        labels = self.labels
        if labels.ndim != 1 or labels.size == 0 or labels[0] != 0:
            raise ValueError("generation labels must be a non-empty 1-D list starting with background 0")
        if len(np.unique(labels)) != labels.size:
            raise ValueError("generation labels must not repeat a value")
        if labels.min() < 0:
            raise ValueError("generation labels must be non-negative")
        for name in ("classes", "prior_classes", "extra_cerebral"):
            if getattr(self, name).shape != labels.shape:
                raise ValueError(f"{name} must have one entry per generation label ({labels.size})")
        for name in ("classes", "prior_classes"):
            values = getattr(self, name)
            if values.min() < 0 or set(np.unique(values)) != set(range(int(values.max()) + 1)):
                raise ValueError(f"{name} must use every class 0..K-1")
        for name in ("prior_means", "prior_stds"):
            prior = getattr(self, name)
            if prior is not None and prior.shape != (2, self.n_prior_classes):
                raise ValueError(f"{name} must have shape (2, {self.n_prior_classes}), got {prior.shape}")
        n_sided = labels.size - self.n_neutral
        if self.n_neutral < 1 or n_sided % 2:
            raise ValueError("after the neutral labels the rest must split into left and right halves")

    @property
    def n_classes(self) -> int:
        return int(self.classes.max()) + 1

    @property
    def n_prior_classes(self) -> int:
        return int(self.prior_classes.max()) + 1

    @property
    def has_t1_priors(self) -> bool:
        return self.prior_means is not None and self.prior_stds is not None

    def index_of(self) -> Dict[int, int]:
        return {int(v): i for i, v in enumerate(self.labels)}

    def flip_permutation(self) -> np.ndarray:
        """(L,) index -> index of the mirrored structure (left <-> right, neutral unchanged)."""
        n = self.labels.size
        half = (n - self.n_neutral) // 2
        perm = np.arange(n)
        left = np.arange(self.n_neutral, self.n_neutral + half)
        perm[left] = left + half
        perm[left + half] = left
        return perm

    def lookup(self, values: np.ndarray) -> np.ndarray:
        """Label values -> uint8 indices into `labels`; ValueError naming any value not in the table."""
        values = np.asarray(values)
        if values.dtype.kind == "f":
            if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
                raise ValueError("a label map must hold integer values")
        present = np.unique(values).astype(np.int64)
        unknown = sorted(set(present.tolist()) - set(self.labels.tolist()))
        if unknown:
            shown = ", ".join(str(v) for v in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise ValueError(f"the label map holds values that are not generation labels: {shown}")
        lut = np.zeros(int(max(present.max(), self.labels.max())) + 1, dtype=np.uint8)
        lut[self.labels] = np.arange(self.labels.size, dtype=np.uint8)
        return lut[values.astype(np.int64)]

    def output_lut(self, output_labels: Optional[Iterable[int]] = None,
                   merges: Optional[Mapping[int, int]] = None) -> np.ndarray:
        """(L,) int64: the output label of each generation label.

        `output_labels` None keeps every generation label as it is. Otherwise a generation label is
        kept if it is in `output_labels`, becomes `merges[label]` if that is in `output_labels`,
        and becomes background 0 else.
        """
        if output_labels is None:
            return self.labels.astype(np.int64).copy()
        keep = {int(v) for v in output_labels}
        merges = dict(merges or {})
        out = np.zeros(self.labels.size, dtype=np.int64)
        for i, value in enumerate(self.labels.tolist()):
            if value in keep:
                out[i] = value
            elif merges.get(value) in keep:
                out[i] = int(merges[value])
        return out


def load_label_table(folder: Union[str, Path], n_neutral: int = 18,
                     prior_class_of_label: Optional[Mapping[int, int]] = None) -> LabelTable:
    """The SynthSeg arrays in `folder` (generation_labels.npy, generation_classes.npy and, when
    present, prior_means_t1.npy / prior_stds_t1.npy) as a `LabelTable`.

    `prior_class_of_label` maps each label to its T1 prior class; default `T1_PRIOR_CLASS_OF_LABEL`.
    """
    folder = Path(folder)
    labels = np.load(folder / "generation_labels.npy").astype(np.int64).ravel()
    classes = np.load(folder / "generation_classes.npy").astype(np.int64).ravel()
    means_path, stds_path = folder / "prior_means_t1.npy", folder / "prior_stds_t1.npy"
    prior_means = np.load(means_path).astype(np.float64) if means_path.is_file() else None
    prior_stds = np.load(stds_path).astype(np.float64) if stds_path.is_file() else None
    return make_label_table(labels, classes, prior_means, prior_stds, n_neutral, prior_class_of_label)


def make_label_table(labels: Sequence[int], classes: Sequence[int],
                     prior_means: Optional[np.ndarray] = None, prior_stds: Optional[np.ndarray] = None,
                     n_neutral: int = 18,
                     prior_class_of_label: Optional[Mapping[int, int]] = None) -> LabelTable:
    labels_arr = np.asarray(labels, dtype=np.int64).ravel()
    mapping = T1_PRIOR_CLASS_OF_LABEL if prior_class_of_label is None else prior_class_of_label
    if prior_means is not None or prior_stds is not None:
        missing = [int(v) for v in labels_arr if int(v) not in mapping]
        if missing:
            raise ValueError(f"no T1 prior class for labels {missing}")
        prior_classes = np.array([mapping[int(v)] for v in labels_arr], dtype=np.int64)
    else:  # no priors: the T1 classes are never used; keep the random-contrast grouping
        prior_classes = np.asarray(classes, dtype=np.int64).ravel().copy()
    return LabelTable(
        labels=labels_arr,
        classes=np.asarray(classes, dtype=np.int64).ravel(),
        prior_classes=prior_classes,
        prior_means=None if prior_means is None else np.asarray(prior_means, dtype=np.float64),
        prior_stds=None if prior_stds is None else np.asarray(prior_stds, dtype=np.float64),
        n_neutral=int(n_neutral),
        extra_cerebral=labels_arr >= EXTRA_CEREBRAL_MIN_LABEL,
    )
