"""Segmentation models built from a card: the dual-branch encoder plus the light decoder, or a
plain convolutional U-Net (MONAI's) for models trained from scratch where the encoder is too slow
to train on a CPU (the synthetic-brain model)."""

from __future__ import annotations

from typing import Any, Dict, Sequence, Union

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


def unet_window_multiple(channels: Sequence[int]) -> int:
    """A U-Net's crops must be a multiple of this per axis: one halving per level below the top."""
    return 2 ** (len(channels) - 1)


class UNetSegmentationModel(nn.Module):
    """MONAI's residual-free 3D U-Net (strided convolutions down, transposed up, one convolution
    per level): about 0.8 s per training step on a 96^3 crop with 2 CPU threads, a third of the
    dual-branch model's 2.3 s, which is what lets a synthetic-image recipe run thousands of steps
    on a CPU."""

    network = "unet"

    def __init__(self, num_classes: int, channels: Sequence[int] = (16, 32, 64, 128, 256)) -> None:
        super().__init__()
        from monai.networks.nets import UNet

        if len(channels) < 2 or any(int(c) < 1 for c in channels):
            raise Med3DFMError(f"a U-Net needs at least two positive channel counts, got {list(channels)}")
        self.channels = tuple(int(c) for c in channels)
        self.num_classes = num_classes
        self.unet = UNet(spatial_dims=3, in_channels=1, out_channels=num_classes, channels=self.channels,
                         strides=(2,) * (len(self.channels) - 1), num_res_units=0)

    @property
    def window_multiple(self) -> int:
        return unet_window_multiple(self.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes, D, H, W) for a (B, 1, D, H, W) window."""
        return self.unet(x)

    def architecture(self) -> Dict[str, Any]:
        return {"type": "segmentation", "network": self.network, "channels": list(self.channels), "num_classes": self.num_classes}


AnySegmentationModel = Union[SegmentationModel, UNetSegmentationModel]


def build_segmentation_model(architecture: Dict[str, Any]) -> AnySegmentationModel:
    if architecture.get("type") != "segmentation":
        raise Med3DFMError(f"model is a {architecture.get('type')!r} model, not a segmentation model")
    network = architecture.get("network", "dual-branch")
    if network == "unet":
        return UNetSegmentationModel(int(architecture["num_classes"]), architecture["channels"])
    if network != "dual-branch":
        raise Med3DFMError(f"the card names a segmentation network {network!r} this version does not know (dual-branch, unet)")
    return SegmentationModel(
        EncoderConfig.from_dict(architecture["encoder"]),
        int(architecture["num_classes"]),
        int(architecture.get("decoder_dim", 32)),
    )


def load_segmentation_model(tensors: Dict[str, torch.Tensor], card: Dict[str, Any]) -> AnySegmentationModel:
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
