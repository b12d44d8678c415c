"""A segmentation model: the dual-branch encoder plus the light decoder, built from a card."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from Med3DFMLib.errors import Med3DFMError
from Med3DFMLib.models.config import EncoderConfig
from Med3DFMLib.models.encoder import DualBranchEncoder
from Med3DFMLib.models.heads import SegmentationDecoder


class SegmentationModel(nn.Module):
    def __init__(self, encoder_config: EncoderConfig, num_classes: int, decoder_dim: int = 32) -> None:
        super().__init__()
        self.encoder = DualBranchEncoder(encoder_config)
        self.decoder = SegmentationDecoder(self.encoder.channels, num_classes, decoder_dim)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes, D, H, W) for a (B, C, D, H, W) window."""
        return self.decoder(self.encoder(x).pyramid, x.shape[2:])

    def architecture(self) -> Dict[str, Any]:
        return {
            "type": "segmentation",
            "encoder": self.encoder.config.to_dict(),
            "num_classes": self.num_classes,
            "decoder_dim": self.decoder.lateral[0].out_channels,
        }


def build_segmentation_model(architecture: Dict[str, Any]) -> SegmentationModel:
    if architecture.get("type") != "segmentation":
        raise Med3DFMError(f"model is a {architecture.get('type')!r} model, not a segmentation model")
    return SegmentationModel(
        EncoderConfig.from_dict(architecture["encoder"]),
        int(architecture["num_classes"]),
        int(architecture.get("decoder_dim", 32)),
    )


def load_segmentation_model(tensors: Dict[str, torch.Tensor], card: Dict[str, Any]) -> SegmentationModel:
    """Model from a weight file's tensors and card, in eval mode, float32."""
    if "architecture" not in card:
        raise Med3DFMError(f"model card of {card.get('id', 'this model')} has no 'architecture' section")
    model = build_segmentation_model(card["architecture"])
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if missing or unexpected:
        raise Med3DFMError(
            f"weights do not fit the architecture in the card of {card.get('id', 'this model')}: "
            f"{len(missing)} missing and {len(unexpected)} unexpected tensors"
        )
    return model.eval()
