"""Model code: encoder branches, fusion, heads, and builders from model cards."""

from Med3DFMLib.models.config import VARIANTS, EncoderConfig
from Med3DFMLib.models.encoder import DualBranchEncoder, EncoderOutput
from Med3DFMLib.models.heads import SegmentationDecoder, TaskQueryClassifier
from Med3DFMLib.models.segmentation import SegmentationModel, UNetSegmentationModel, build_segmentation_model, load_segmentation_model

__all__ = [
    "VARIANTS",
    "DualBranchEncoder",
    "EncoderConfig",
    "EncoderOutput",
    "SegmentationDecoder",
    "SegmentationModel",
    "TaskQueryClassifier",
    "UNetSegmentationModel",
    "build_segmentation_model",
    "load_segmentation_model",
]
