"""MobileNetV2 (Sandler et al. 2018) in plain PyTorch, torchvision layout and module names.

``features`` is ``[stem, 17 inverted residual blocks, 1x1 conv to 1280]`` and ``classifier`` is
``[Dropout(0.2), Linear(1280, num_classes)]``, as in torchvision, so parameter names and counts match
(3,504,872 params and 0.301 G MACs at 224x224, width 1.0).

For dynamic methods: ``stem`` is ``features[0]``, ``blocks`` the inverted residuals, ``head(x)`` the
last 1x1 conv, pooling and classifier. Every ``InvertedResidual`` exposes ``residual(x)`` (expand,
depthwise, project) and ``shortcut(x)`` (identity); the shortcut exists only when
``block.use_res_connect`` (stride 1 and equal widths), otherwise ``forward`` is ``residual(x)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# (expansion t, output channels c, repeats n, first stride s), the paper's Table 2.
IMAGENET_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without going more than 10% below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNAct(nn.Sequential):
    """Conv (no bias, "same" padding) + BN + ReLU6: ``(N, in_ch, H, W) -> (N, out_ch, H/s, W/s)``."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )
        self.out_channels = out_ch


class InvertedResidual(nn.Module):
    """1x1 expand (if ``expand_ratio != 1``), 3x3 depthwise (stride), 1x1 linear projection.

    ``(N, in_ch, H, W) -> (N, out_ch, H/stride, W/stride)``; ``self.conv`` holds the branch.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride: expected 1 or 2, got {stride}")
        hidden = int(round(in_ch * expand_ratio))
        self.stride, self.in_channels, self.out_channels, self.hidden_channels = stride, in_ch, out_ch, hidden
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(in_ch, hidden, kernel_size=1))
        layers += [
            ConvBNAct(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def residual(self, x: Tensor) -> Tensor:
        """The conv branch (no activation after the projection)."""
        return self.conv(x)

    def shortcut(self, x: Tensor) -> Tensor:
        """Identity; only meaningful when ``use_res_connect``."""
        if not self.use_res_connect:
            raise RuntimeError("shortcut: this block has no residual connection (stride or width changes)")
        return x

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2: ``(N, in_channels, H, W) -> (N, num_classes)``; features have stride 32."""

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        in_channels: int = 3,
        setting: tuple[tuple[int, int, int, int], ...] = IMAGENET_SETTING,
        last_channel: int = 1280,
        dropout: float = 0.2,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult: must be > 0, got {width_mult}")
        if not setting or any(len(row) != 4 for row in setting):
            raise ValueError("setting: expected a non-empty sequence of (t, c, n, s) rows")
        in_ch = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(last_channel * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNAct(in_channels, in_ch, stride=stem_stride)]
        for t, c, n, s in setting:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(ConvBNAct(in_ch, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        self.num_features = self.last_channel
        self._init()

    def _init(self) -> None:
        """torchvision's init: Kaiming-normal (fan_out) convs, unit BN, N(0, 0.01) classifier."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def stem(self) -> ConvBNAct:
        """The first conv: ``(N, in_channels, H, W) -> (N, 32, H/2, W/2)``."""
        return self.features[0]

    @property
    def blocks(self) -> tuple[InvertedResidual, ...]:
        """The inverted residual blocks, in order."""
        return tuple(self.features[1:-1])

    def head(self, x: Tensor) -> Tensor:
        """``(N, C_last_block, h, w) -> (N, num_classes)``: 1x1 conv to 1280, average pool, classifier."""
        x = self.features[-1](x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and blocks: ``(N, in_channels, H, W) -> (N, 320, H/32, W/32)`` (before the last 1x1 conv)."""
        return self.features[:-1](x)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_channels, H, W) -> (N, num_classes)`` logits."""
        return self.head(self.forward_features(x))


def mobilenet_v2(
    num_classes: int = 1000,
    width_mult: float = 1.0,
    in_channels: int = 3,
    setting: tuple[tuple[int, int, int, int], ...] = IMAGENET_SETTING,
    last_channel: int = 1280,
    dropout: float = 0.2,
    stem_stride: int = 2,
) -> MobileNetV2:
    """MobileNetV2; defaults are torchvision's ``mobilenet_v2()``.

    Small variant for tests: e.g. ``mobilenet_v2(10, 0.25, setting=((1, 8, 1, 1), (6, 16, 2, 2)),
    last_channel=64, stem_stride=1)`` on 8x8 inputs.
    """
    return MobileNetV2(num_classes, width_mult, in_channels, setting, last_channel, dropout, stem_stride)
