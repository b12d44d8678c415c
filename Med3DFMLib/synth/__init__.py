"""Synthetic training images from label maps alone (the SynthSeg recipe, Billot et al., Medical
Image Analysis 2023): `labels` for the label table, intensity classes, extra-cerebral set and
output labels; `generator` for the on-the-fly image synthesis."""

from Med3DFMLib.synth.generator import SynthConfig, SynthGenerator, gaussian_blur, resample_index_map
from Med3DFMLib.synth.labels import (
    SYNTHSEG_OUTPUT_LABELS,
    SYNTHSEG_OUTPUT_MERGES,
    T1_PRIOR_CLASS_NAMES,
    T1_PRIOR_CLASS_OF_LABEL,
    LabelTable,
    load_label_table,
    make_label_table,
    read_labels_table,
)

__all__ = [
    "SYNTHSEG_OUTPUT_LABELS",
    "SYNTHSEG_OUTPUT_MERGES",
    "T1_PRIOR_CLASS_NAMES",
    "T1_PRIOR_CLASS_OF_LABEL",
    "LabelTable",
    "SynthConfig",
    "SynthGenerator",
    "gaussian_blur",
    "load_label_table",
    "make_label_table",
    "read_labels_table",
    "resample_index_map",
]
