"""The 2D UNet backbone of PCL and KAF (the UNet of PCL, Zeng et al., 2021).

Encoder: four blocks of 2 x (Conv3x3 -> BatchNorm -> LeakyReLU) at widths f, 2f, 4f, 8f with a 2 x 2
max-pool between them; a bottleneck of 2 x (Conv3x3 -> ReLU) at 16f (no BatchNorm, as in the authors'
code); a decoder that mirrors the encoder: a 2 x 2 stride-2 transposed convolution, concatenation with the
skip, 2 x (Conv3x3 -> BatchNorm -> LeakyReLU); a 1 x 1 head without bias.

Parameter counts (checked in the tests): f = 48, 4 classes: 17,462,016 (paper: 17.5M);
f = 32, 8 classes: 7,763,584 (paper: 7.8M).

The building blocks (:class:`ConvBlock`, :class:`UNetDecoder`) take explicit channel lists so that the
KAF-UNet (:mod:`kpssl.models.kaf_unet`) reuses them with the doubled widths of its KAF levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kpssl.models.kaf import check_keypoints

__all__ = ["ConvBlock", "Bottleneck", "UNetDecoder", "UNet", "Encoding", "init_he", "check_image"]

LEVELS = 4  # encoder blocks; the image side must be divisible by 2**LEVELS


def init_he(module: nn.Module, negative_slope: float = 1e-2) -> None:
    """He-normal initialisation of every (transposed) 2D convolution, zero biases (the authors' init)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(layer.weight, a=negative_slope)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def check_image(image: Tensor, in_channels: int) -> None:
    """Raise ``ValueError`` unless ``image`` is (B, in_channels, H, W) with H, W divisible by 16."""
    if image.ndim != 4 or image.shape[1] != in_channels:
        raise ValueError(f"expected an image batch (B, {in_channels}, H, W), got shape {tuple(image.shape)}")
    side = 2**LEVELS
    if image.shape[-2] % side or image.shape[-1] % side:
        raise ValueError(f"image height and width must be divisible by {side}, got {tuple(image.shape[-2:])}")


@dataclass
class Encoding:
    """What ``encode`` returns, for the UNet and the KAF-UNet alike: the decoder's inputs and, for the
    pretraining heads, the keypoint features of the KAF levels (none for the UNet).

    ``decode(encoding.skips, encoding.bottleneck)`` gives the logits of either network.
    """

    skips: list[Tensor]  # 4 x (B, channels_l, H / 2**(l-1), W / 2**(l-1)), finest first
    bottleneck: Tensor  # (B, bottleneck_channels, H / 16, W / 16)
    keypoint_features: list[Tensor] = field(default_factory=list)  # one (B, K, d) per KAF level, finest first
    levels: tuple[int, ...] = ()  # the KAF levels (1-based) that keypoint_features belong to
    attention: list[list[Tensor]] | None = None  # per KAF level, per block (B, heads, K, K); with need_weights


class ConvBlock(nn.Sequential):
    """2 x (Conv3x3 -> BatchNorm -> LeakyReLU): (B, in_channels, H, W) -> (B, out_channels, H, W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(inplace=True),
        )


class Bottleneck(nn.Sequential):
    """2 x (Conv3x3 -> ReLU), no normalisation: (B, in_channels, h, w) -> (B, out_channels, h, w)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
        )


class UNetDecoder(nn.Module):
    """Transposed-convolution decoder with skip concatenation and a 1 x 1 head.

    Args:
        skip_channels: channels of the four skips, finest first (level 1 .. 4).
        widths: output width of each decoder level, finest first.
        bottleneck_channels: channels of the bottleneck features.
        classes: output channels of the 1 x 1 head.

    ``forward(skips, bottleneck)``: skips[l] is (B, skip_channels[l], H / 2**l, W / 2**l), bottleneck is
    (B, bottleneck_channels, H / 16, W / 16); returns logits (B, classes, H, W).
    """

    def __init__(self, skip_channels: Sequence[int], widths: Sequence[int], bottleneck_channels: int,
                 classes: int) -> None:
        super().__init__()
        if len(skip_channels) != LEVELS or len(widths) != LEVELS:
            raise ValueError(f"expected {LEVELS} skip widths and {LEVELS} decoder widths, "
                             f"got {len(skip_channels)} and {len(widths)}")
        self.skip_channels = tuple(skip_channels)
        self.bottleneck_channels = bottleneck_channels
        coarser = [*widths[1:], bottleneck_channels]  # input of each level's up-convolution
        self.up = nn.ModuleList(nn.ConvTranspose2d(c_in, w, 2, stride=2) for c_in, w in zip(coarser, widths))
        self.blocks = nn.ModuleList(ConvBlock(w + s, w) for w, s in zip(widths, skip_channels))
        self.head = nn.Conv2d(widths[0], classes, 1, bias=False)

    def forward(self, skips: Sequence[Tensor], bottleneck: Tensor) -> Tensor:
        if len(skips) != LEVELS:
            raise ValueError(f"expected {LEVELS} skips, got {len(skips)}")
        x = bottleneck  # (B, bottleneck_channels, H/16, W/16)
        for level in reversed(range(LEVELS)):
            x = self.up[level](x)  # (B, widths[level], H/2**level, W/2**level)
            x = self.blocks[level](torch.cat([x, skips[level]], dim=1))
        return self.head(x)  # (B, classes, H, W)


class UNet(nn.Module):
    """The plain 2D UNet (the UNet of PCL, Zeng et al., 2021).

    Args:
        in_channels: image channels (1 for MRI/CT slices).
        classes: segmentation classes including background.
        width: f; encoder widths f, 2f, 4f, 8f, bottleneck 16f.

    ``forward(image)``: (B, in_channels, H, W) with H, W divisible by 16 -> logits (B, classes, H, W).
    ``encode`` and ``forward`` also accept a batch's ``keypoints (B, K, 2)`` and ``valid (B, K)``, which
    are checked and otherwise unused, so that the UNet and the KAF-UNet are called in the same way.

    Example:
        >>> net = UNet(1, 4, 8)
        >>> net(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 4, 32, 32])
    """

    def __init__(self, in_channels: int = 1, classes: int = 4, width: int = 48) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("classes", classes), ("width", width)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.in_channels = in_channels
        widths = [width * 2**level for level in range(LEVELS)]  # f, 2f, 4f, 8f
        inputs = [in_channels, *widths[:-1]]
        self.blocks = nn.ModuleList(ConvBlock(c_in, w) for c_in, w in zip(inputs, widths))
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bottleneck_channels = 16 * width
        self.bottleneck = Bottleneck(widths[-1], self.bottleneck_channels)
        self.decoder = UNetDecoder(widths, widths, self.bottleneck_channels, classes)
        init_he(self)

    def encode(self, image: Tensor, keypoints: Tensor | None = None, valid: Tensor | None = None,
               need_weights: bool = False) -> Encoding:
        """Image (B, C_in, H, W) -> :class:`Encoding` with skips [(B, f 2**l, H / 2**l, W / 2**l) for
        l = 0..3] and bottleneck (B, 16f, H / 16, W / 16); no keypoint features, no KAF levels (the
        keypoints, if given, are only checked), and ``attention`` an empty list with ``need_weights``."""
        check_image(image, self.in_channels)
        if keypoints is not None or valid is not None:
            if keypoints is None or valid is None:
                raise ValueError("pass keypoints and valid together, or neither")
            check_keypoints(keypoints, valid, image.shape[0])
        x1 = self.blocks[0](image)  # (B, f, H, W)
        x2 = self.blocks[1](self.pool(x1))  # (B, 2f, H/2, W/2)
        x3 = self.blocks[2](self.pool(x2))  # (B, 4f, H/4, W/4)
        x4 = self.blocks[3](self.pool(x3))  # (B, 8f, H/8, W/8)
        x5 = self.bottleneck(self.pool(x4))  # (B, 16f, H/16, W/16)
        return Encoding([x1, x2, x3, x4], x5, attention=[] if need_weights else None)

    def decode(self, skips: Sequence[Tensor], bottleneck: Tensor) -> Tensor:
        """Skips and bottleneck from :meth:`encode` -> logits (B, classes, H, W)."""
        return self.decoder(skips, bottleneck)

    def forward(self, image: Tensor, keypoints: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        encoding = self.encode(image, keypoints, valid)
        return self.decode(encoding.skips, encoding.bottleneck)
