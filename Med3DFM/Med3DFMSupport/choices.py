"""The values behind the panel's fixed combo boxes, in the order of their items in Resources/UI/Med3DFM.ui.

The .ui holds the words the user reads; the item's index picks the value here, which is what the
parameter node stores and the job's command line takes (jobs.py checks the same values).
"""

from __future__ import annotations

from typing import Optional, Sequence

from Med3DFMSupport import jobs

DEFAULT_MODEL = "hippocampus-mr-demo"  # the bundled demonstration model
DEFAULT_ENCODER = "med3dfm-encoder-small"  # what `adapt` trains on when no --encoder is given (Learn from labels)
# Confidence overlay: voxels below this are drawn and counted (Med3DFMLib.confidence.DEFAULT_THRESHOLD, checked by a test).
CONFIDENCE_FLAG_BELOW = 0.6

DEVICES = jobs.DEVICES  # deviceComboBox: Automatic, CPU, GPU (CUDA)
# learnSourceComboBox: the painted slices of the input volume, or labelled volumes of other patients
# (a decoder trained for a time budget).
LEARN_SOURCES = ("thisScan", "otherPatients")
LEARN_MODES = jobs.ADAPT_MODES  # learnModeComboBox: a small trained adapter, or the training-free instant guess
HEATMAP_METHODS = ("none",) + jobs.CLASSIFY_HEATMAPS  # heatmapMethodComboBox: "none" classifies without a heatmap
EXPLAIN_METHODS = jobs.EXPLAIN_METHODS  # explainMethodComboBox

# combo box name in the .ui -> its values, for the check that the two agree
COMBO_BOX_VALUES = {
    "deviceComboBox": DEVICES,
    "learnSourceComboBox": LEARN_SOURCES,
    "learnModeComboBox": LEARN_MODES,
    "heatmapMethodComboBox": HEATMAP_METHODS,
    "explainMethodComboBox": EXPLAIN_METHODS,
}


def index_of(values: Sequence[str], value: str) -> int:
    """The item that shows `value`; the first item for a value the list does not have."""
    return values.index(value) if value in values else 0


def value_at(values: Sequence[str], index: int) -> Optional[str]:
    """The value of item `index`; None for no item (-1, e.g. while a combo box is cleared) or one past the end."""
    return values[index] if 0 <= index < len(values) else None
