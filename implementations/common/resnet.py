"""ResNets in plain PyTorch: ImageNet ResNet-18/50 (torchvision layout, v1.5) and CIFAR ResNets (6n+2).

Built so dynamic methods can reuse the pieces:
- every block exposes ``block.residual(x)`` (the conv branch, before the add) and
  ``block.shortcut(x)`` (identity, 1x1 projection or zero-padding); ``forward`` is
  ``relu(residual(x) + shortcut(x))``, so a method can skip the branch or run it on gathered samples
  or pixels and add the shortcut itself;
- every network exposes ``stem(x)``, ``stages`` (a tuple of ``nn.Sequential`` of blocks),
  ``blocks()`` (all blocks in order), ``head(features)`` and ``forward_features(x)``.

ImageNet ResNets keep torchvision's module names (``conv1``, ``bn1``, ``layer1.0.conv2``,
``layer1.0.downsample.0``, ``fc``), so the parameter names and counts are torchvision's. ResNet v1.5:
the stride of a bottleneck sits on its 3x3 conv.

CIFAR ResNets (He et al. 2016, section 4.2): a 3x3 stem with ``width`` channels, three stages of
``n = (depth - 2) / 6`` basic blocks at ``width, 2 width, 4 width`` channels (strides 1, 2, 2), global
average pooling, a linear classifier. Shortcuts that change shape use **option A** by default
(parameter-free: subsample by the stride, zero-pad the new channels), as in the paper's CIFAR
experiments, which gives the published 0.46 M parameters of ResNet-32; ``shortcut="B"`` uses a 1x1
conv + BN projection instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 conv, padding 1, no bias (a BN follows)."""
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 conv, no bias (a BN follows)."""
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option-A shortcut: ``(N, C, H, W) -> (N, out_ch, ceil(H/s), ceil(W/s))``, new channels zero."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"out_ch: option-A shortcut cannot drop channels ({in_ch} -> {out_ch})")
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_ch - self.in_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convs: ``(N, in_ch, H, W) -> (N, planes, H/stride, W/stride)``."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.in_channels, self.out_channels = in_ch, planes

    def residual(self, x: Tensor) -> Tensor:
        """The conv branch, before the add and the final ReLU."""
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def shortcut(self, x: Tensor) -> Tensor:
        """Identity, or the downsample module when the shape changes."""
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, v1.5), 1x1 expand:
    ``(N, in_ch, H, W) -> (N, 4 planes, H/stride, W/stride)``."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.in_channels, self.out_channels = in_ch, out_ch

    def residual(self, x: Tensor) -> Tensor:
        """The conv branch, before the add and the final ReLU."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def shortcut(self, x: Tensor) -> Tensor:
        """Identity, or the downsample module when the shape changes."""
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


Block = type[BasicBlock] | type[Bottleneck]


def _init(model: nn.Module) -> None:
    """torchvision's init: Kaiming-normal (fan_out) convs, unit BN; Linear keeps PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _StagedNet(nn.Module):
    """Shared interface: ``stem`` -> ``stages`` -> ``head``; subclasses set ``stage_names``."""

    stage_names: tuple[str, ...] = ()

    @property
    def stages(self) -> tuple[nn.Sequential, ...]:
        return tuple(getattr(self, name) for name in self.stage_names)

    def blocks(self) -> Iterator[nn.Module]:
        """All residual blocks, in execution order."""
        for stage in self.stages:
            yield from stage

    def stem(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, x: Tensor) -> Tensor:
        """``(N, C, h, w) -> (N, num_classes)``: global average pool, then ``fc``."""
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_channels, H, W) -> (N, num_classes)`` logits."""
        return self.head(self.forward_features(x))


class ResNet(_StagedNet):
    """ImageNet ResNet (torchvision layout): 7x7/2 conv, 3x3/2 max-pool, four stages, pool, fc.

    ``(N, in_channels, 224, 224) -> (N, num_classes)``; stage outputs have stride 4, 8, 16, 32.
    """

    stage_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(
        self,
        block: Block,
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers: expected four positive block counts, got {layers}")
        self.in_ch = width
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_stage(block, width, layers[0], 1)
        self.layer2 = self._make_stage(block, width * 2, layers[1], 2)
        self.layer3 = self._make_stage(block, width * 4, layers[2], 2)
        self.layer4 = self._make_stage(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = width * 8 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)
        _init(self)

    def _make_stage(self, block: Block, planes: int, n: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_ch != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.in_ch, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        blocks = [block(self.in_ch, planes, stride, downsample)]
        self.in_ch = planes * block.expansion
        blocks += [block(self.in_ch, planes) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def stem(self, x: Tensor) -> Tensor:
        """``(N, in_channels, H, W) -> (N, width, H/4, W/4)``."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def resnet18(num_classes: int = 1000, in_channels: int = 3, width: int = 64) -> ResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2); 11,689,512 params and 1.814 G MACs at 224x224."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, width)


def resnet50(num_classes: int = 1000, in_channels: int = 3, width: int = 64) -> ResNet:
    """ResNet-50 v1.5: bottlenecks (3, 4, 6, 3); 25,557,032 params and 4.089 G MACs at 224x224."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, width)


class CifarResNet(_StagedNet):
    """CIFAR ResNet: 3x3 stem, three stages of basic blocks, pool, fc.

    ``(N, in_channels, 32, 32) -> (N, num_classes)``; stage outputs have stride 1, 2, 4.
    """

    stage_names = ("layer1", "layer2", "layer3")

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth: expected 6n+2 with n >= 1 (8, 14, 20, 32, 56, 110, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut: expected 'A' (zero-padding) or 'B' (1x1 conv), got {shortcut!r}")
        n = (depth - 2) // 6
        self.depth, self.shortcut_type, self.in_ch = depth, shortcut, width
        self.conv1 = conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(width, n, 1)
        self.layer2 = self._make_stage(width * 2, n, 2)
        self.layer3 = self._make_stage(width * 4, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = width * 4
        self.fc = nn.Linear(self.num_features, num_classes)
        _init(self)

    def _make_stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.in_ch != planes:
            if self.shortcut_type == "A":
                downsample = PadShortcut(self.in_ch, planes, stride)
            else:
                downsample = nn.Sequential(conv1x1(self.in_ch, planes, stride), nn.BatchNorm2d(planes))
        blocks = [BasicBlock(self.in_ch, planes, stride, downsample)]
        self.in_ch = planes
        blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def stem(self, x: Tensor) -> Tensor:
        """``(N, in_channels, H, W) -> (N, width, H, W)``."""
        return self.relu(self.bn1(self.conv1(x)))


def cifar_resnet(
    depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16, shortcut: str = "A"
) -> CifarResNet:
    """CIFAR ResNet of ``depth = 6n + 2`` layers (20, 32, 56, 110, ...).

    ResNet-32 (width 16, option A): 464,154 params, 68.9 M MACs at 32x32 (option B: 466,906 and
    69.1 M). Small variants for tests:
    e.g. ``cifar_resnet(8, width=4, in_channels=1)`` on 8x8 digits.
    """
    return CifarResNet(depth, num_classes, in_channels, width, shortcut)
