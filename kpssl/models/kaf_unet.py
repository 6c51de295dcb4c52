"""The KAF-UNet: a UNet with a KAF layer after each encoder block (Yang et al., 2023).

Layout (``kaf_decoder="doubled"``, the authors' code; it reproduces the paper's parameter counts), with
C_l = f 2**(l-1) and out_l the channels leaving level l (2 C_l at a KAF level, C_l otherwise):

* encoder block l: 2 x (Conv3x3 -> BN -> LeakyReLU), in out_{l-1} (the image for l = 1), out C_l;
* KAF layer l (if on): [F_l, D_l], C_l -> 2 C_l channels, before the pooling and the skip;
* bottleneck: 2 x (Conv3x3 -> ReLU), out_4 -> 2 out_4 (32f with all levels on);
* decoder level l: width out_l, i.e. a UNet decoder at width 2f with all levels on.

With every level off this is exactly :class:`~kpssl.models.unet.UNet`. ``kaf_decoder="plain"`` keeps the
UNet's bottleneck (16f) and decoder widths and only widens the skip inputs; about 1.3x the UNet's
convolution work instead of about 3.3x, but not the paper's network.

Parameter counts (T = 16, d = 256, hidden 64, "doubled"): f = 48, 4 classes: 106,546,624 (paper 106.8M);
f = 32, 8 classes: 71,467,264 (paper 71.7M). The remaining 263,172 are, in the authors' code, a final
projection Linear(256, 256) and a dustbin score inside each KAF layer's SuperGlue module that the KAF
layer never uses; they are left out here.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kpssl.models.kaf import KAFLayer, check_keypoints
from kpssl.models.unet import LEVELS, Bottleneck, ConvBlock, Encoding, UNetDecoder, check_image, init_he
from kpssl.settings import ModelSettings

__all__ = ["Encoding", "KAFEncoding", "KAFUNet", "check_model_settings"]

KAF_DECODERS = ("doubled", "plain")


def check_model_settings(settings: ModelSettings) -> None:
    """Raise ``ValueError`` for model settings that cannot build a network."""
    for name in ("in_channels", "classes", "width", "descriptor_dim", "heads", "fusion_hidden", "projection_dim"):
        if getattr(settings, name) < 1:
            raise ValueError(f"model.{name} must be >= 1, got {getattr(settings, name)}")
    for name in ("attention_blocks", "matching_blocks"):
        if getattr(settings, name) < 0:
            raise ValueError(f"model.{name} must be >= 0, got {getattr(settings, name)}")
    if len(settings.kaf_levels) != LEVELS:
        raise ValueError(f"model.kaf_levels needs {LEVELS} flags, got {settings.kaf_levels!r}")
    if settings.descriptor_dim % settings.heads:
        raise ValueError(f"model.descriptor_dim {settings.descriptor_dim} is not divisible by model.heads "
                         f"{settings.heads}")
    if settings.kaf_decoder not in KAF_DECODERS:
        raise ValueError(f"model.kaf_decoder must be one of {KAF_DECODERS}, got {settings.kaf_decoder!r}")


KAFEncoding = Encoding  # the one encoding of both networks (kpssl.models.unet.Encoding); the former name


class KAFUNet(nn.Module):
    """UNet with keypoint-augmented fusion (KAF) after each chosen encoder level.

    Args:
        settings: :class:`~kpssl.settings.ModelSettings` (width, classes, kaf_levels, attention_blocks,
            descriptor_dim, heads, fusion_hidden, sampling, sparse_fusion, kaf_decoder).

    ``forward(image (B, 1, H, W), keypoints (B, K, 2), valid (B, K)) -> logits (B, classes, H, W)``; H, W
    divisible by 16; keypoints as float (row, col) in image pixels; K may be 0.
    """

    def __init__(self, settings: ModelSettings | None = None) -> None:
        super().__init__()
        settings = ModelSettings() if settings is None else settings
        check_model_settings(settings)
        self.settings = settings
        f = settings.width
        widths = [f * 2**level for level in range(LEVELS)]  # C_l: f, 2f, 4f, 8f
        outputs = [2 * c if on else c for c, on in zip(widths, settings.kaf_levels)]  # after [F_l, D_l]
        inputs = [settings.in_channels, *outputs[:-1]]
        self.blocks = nn.ModuleList(ConvBlock(c_in, c) for c_in, c in zip(inputs, widths))
        self.kaf = nn.ModuleDict({
            str(level + 1): KAFLayer(widths[level], 2**level, settings.descriptor_dim, settings.attention_blocks,
                                     settings.heads, settings.fusion_hidden, settings.sampling,
                                     settings.sparse_fusion)
            for level in range(LEVELS) if settings.kaf_levels[level]
        })
        self.levels = tuple(int(name) for name in self.kaf)
        self.pool = nn.MaxPool2d(2, stride=2)
        if settings.kaf_decoder == "doubled":
            self.bottleneck_channels = 2 * outputs[-1]
            decoder_widths = outputs
        else:
            self.bottleneck_channels = 16 * f
            decoder_widths = widths
        self.bottleneck = Bottleneck(outputs[-1], self.bottleneck_channels)
        self.decoder = UNetDecoder(outputs, decoder_widths, self.bottleneck_channels, settings.classes)
        init_he(self)

    def set_sparse_fusion(self, sparse: bool) -> None:
        """Switch every KAF layer between the sparse (fast) and dense (reference) first D_l convolution."""
        for layer in self.kaf.values():
            layer.fusion.sparse = sparse

    def encode(self, image: Tensor, keypoints: Tensor, valid: Tensor, need_weights: bool = False) -> Encoding:
        """Image (B, 1, H, W), keypoints (B, K, 2), valid (B, K) -> :class:`~kpssl.models.unet.Encoding`
        with skips 4 x (B, out_l, H / 2**(l-1), W / 2**(l-1)) (out_l = 2 C_l at KAF levels), the
        bottleneck, one keypoint feature map (B, K, d) per KAF level (after attention), the levels, and
        with ``need_weights`` every block's attention (B, heads, K, K)."""
        check_image(image, self.settings.in_channels)
        check_keypoints(keypoints, valid, image.shape[0])
        image_size = (image.shape[-2], image.shape[-1])
        skips: list[Tensor] = []
        keypoint_features: list[Tensor] = []
        attention: list[list[Tensor]] | None = [] if need_weights else None
        x = image
        for level, block in enumerate(self.blocks):
            x = block(x if level == 0 else self.pool(x))  # (B, C_l, H / 2**level, W / 2**level)
            name = str(level + 1)
            if name in self.kaf:
                fused = self.kaf[name](x, keypoints, valid, image_size, need_weights)
                x = fused.features  # (B, 2 C_l, H / 2**level, W / 2**level)
                keypoint_features.append(fused.keypoint_features)  # (B, K, d)
                if attention is not None:
                    attention.append(fused.attention or [])
            skips.append(x)
        bottleneck = self.bottleneck(self.pool(x))  # (B, bottleneck_channels, H / 16, W / 16)
        return Encoding(skips, bottleneck, keypoint_features, self.levels, attention)

    def decode(self, skips: Sequence[Tensor], bottleneck: Tensor) -> Tensor:
        """Skips and bottleneck from :meth:`encode` -> logits (B, classes, H, W)."""
        return self.decoder(skips, bottleneck)

    def forward(self, image: Tensor, keypoints: Tensor, valid: Tensor) -> Tensor:
        encoding = self.encode(image, keypoints, valid)
        return self.decode(encoding.skips, encoding.bottleneck)
