"""# Channel Gating Neural Networks

[Hua, Zhou, De Sa, Zhang and Suh, NeurIPS 2019](https://papers.nips.cc/paper/2019/hash/68b1fbe7f16e4ae3024973f12f3cb313-Abstract.html)
([arXiv 1805.12549](https://arxiv.org/abs/1805.12549), official code:
[cornell-zhang/dnn-gating](https://github.com/cornell-zhang/dnn-gating)).

## What is dynamic

- **Unit:** the contribution of the *remaining* input channels to an output feature of a 3x3
  convolution, at one output position. Every convolution of a residual branch is a channel-gated
  convolution; the stem, shortcuts and classifier are ordinary.
- **Decided by:** the convolution's own partial sum. The first `1 / partitions` of the input channels
  (the *base* path) are always convolved, giving `Yp`. `Yp` is normalized (a BatchNorm without affine
  parameters, as in the official code) and compared with a learned threshold `Delta`: where it clears
  the threshold the remaining input channels are added in (`Y = Yp + Yr`), elsewhere the output keeps
  the partial sum (`Y = Yp`).
- **When:** per sample and output position (and output-channel group, below), at every gated
  convolution, in train and eval.
  - `train()`: the dense convolution runs; the gate `1[BN(Yp) > Delta]` has a straight-through
    gradient through `sigmoid(alpha (BN(Yp) - Delta))` (the official estimator), and the gating loss
    `gate_loss_weight * sum (Delta - threshold)^2` pulls the thresholds to their target (`aux_loss`).
  - `eval()`: the base path is an ordinary convolution over the base channels; the remaining channels
    are convolved **only at the open positions**, with `kernels.sparse_conv2d` (gather the active
    receptive fields, one GEMM, scatter), and added to `Yp`.

**What is sped up and what is not.** The base path (`1 / partitions` of the MACs) always runs
densely; the gate itself is element-wise work (not counted in MACs, not free in time); the remaining
path costs its MACs only at open positions, but through a gather-GEMM-scatter that is slower per MAC
than a dense convolution, and `sparse_conv2d` falls back to the dense convolution (counted dense) when
more than its break-even fraction of positions is open. The paper's per-output-channel gating is
exploited only by its custom accelerator; here `gate_groups` output channels share one spatial gate
(one `sparse_conv2d` call per group), which is what a CPU or GPU GEMM can skip.

`info` holds `gates` (one bool `(N, G, Hout, Wout)` tensor per gated convolution in eval, 0/1 with a
straight-through gradient in train), `open_fraction` (per gated convolution), `exec_rate` and
`aux_loss`.

## Operating point

- `partitions` sets the always-computed base fraction `1 / partitions` (the paper's CIFAR script uses
  4).
- `threshold` is the value the thresholds start at and are pulled to (the official CIFAR script
  targets 1.0). The gate normalization is calibrated in `build` on a fixed random calibration batch
  (not the measurement input), so `BN(Yp)` is about standard normal and an untrained model opens
  about `1 - Phi(threshold)` of the positions: higher thresholds execute fewer MACs.

## Simplifications against the paper

- `gate_groups` output channels (default: all of them) share one gate, computed from the mean of
  their normalized partial sums; the paper gates every output channel separately
  (`gate_groups = Cout` here reproduces that decision but runs one sparse convolution per channel).
- The base path is the first `1 / partitions` input channels for every output (the official code's
  default; its `--use_group` option uses a block-diagonal base instead).
- Thresholds start at their target instead of 0; no knowledge distillation; trained from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.gates import straight_through
from implementations.common.resnet import cifar_resnet, resnet18
from implementations.common.train import TrainSettings
from kernels.sparse_conv import sparse_conv2d

_CALIBRATION_BATCH = 32


@dataclass
class Config:
    backbone: Literal["cifar", "resnet18"] = "cifar"
    depth: int = 14  # CIFAR ResNet 6n+2 (ignored by resnet18)
    width: int = 16  # channels of the first stage (64 for the standard ResNet-18)
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    partitions: int = 4  # base path = the first 1/partitions of the input channels
    gate_groups: int = 1  # output-channel groups, each with its own spatial gate
    threshold: float = 1.0  # initial value and target of every gate threshold Delta
    gate_loss_weight: float = 1e-4  # weight of sum (Delta - threshold)^2
    alpha: float = 2.0  # slope of the sigmoid behind the straight-through gradient


TRAIN = TrainSettings(epochs=4, lr=3e-3, batch_size=64)


def _check(cfg: Config) -> None:
    if cfg.backbone not in ("cifar", "resnet18"):
        raise ValueError(f"backbone must be 'cifar' or 'resnet18', got {cfg.backbone!r}")
    if cfg.partitions < 2:
        raise ValueError(f"partitions must be >= 2, got {cfg.partitions!r}")
    if cfg.gate_groups < 1 or cfg.width % cfg.gate_groups:
        raise ValueError(f"gate_groups must be >= 1 and divide width ({cfg.width}), got {cfg.gate_groups!r}")
    if cfg.width < cfg.partitions:
        raise ValueError(f"width ({cfg.width}) must be >= partitions ({cfg.partitions})")
    if not cfg.alpha > 0 or cfg.gate_loss_weight < 0:
        raise ValueError("alpha must be > 0 and gate_loss_weight >= 0")


def make_backbone(cfg: Config) -> nn.Module:
    """CIFAR ResNet (depth, width) or ImageNet-layout ResNet-18."""
    if cfg.backbone == "resnet18":
        return resnet18(cfg.num_classes, cfg.in_channels, cfg.width)
    return cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width)


class GatedConv(nn.Module):
    """Gate of one channel-gated 3x3 convolution; the convolution's weight stays in the backbone.

    `base(conv, x) -> Yp`, `score(Yp) -> (N, G, H, W)` (open where > 0) and `rest(...)`.
    """

    def __init__(self, conv: nn.Conv2d, partitions: int, groups: int, threshold: float) -> None:
        super().__init__()
        self.base_channels = max(1, conv.in_channels // partitions)
        self.groups = groups
        self.norm = nn.BatchNorm2d(groups, affine=False)
        self.delta = nn.Parameter(torch.full((groups,), float(threshold)))

    def base(self, conv: nn.Conv2d, x: Tensor) -> Tensor:
        """Partial sum over the base input channels: `(N, Cout, Hout, Wout)`."""
        cb = self.base_channels
        return F.conv2d(x[:, :cb], conv.weight[:, :cb], None, conv.stride, conv.padding)

    def score(self, yp: Tensor) -> Tensor:
        """`BN(group mean of Yp) - Delta`: `(N, G, Hout, Wout)`."""
        n, c, h, w = yp.shape
        pooled = yp.view(n, self.groups, c // self.groups, h, w).mean(dim=2)
        return self.norm(pooled) - self.delta.view(1, -1, 1, 1)

    def expand(self, gate: Tensor, channels: int) -> Tensor:
        """`(N, G, H, W)` -> `(N, channels, H, W)`: every channel gets its group's gate."""
        return gate.repeat_interleave(channels // self.groups, dim=1)

    def rest_sparse(self, conv: nn.Conv2d, x: Tensor, on: Tensor, base: Tensor) -> Tensor:
        """`base` plus the remaining channels' contribution, computed only where `on (N, G, H, W)` is True
        (with one gate group, the kernel adds it into a copy of `base` in its own pass)."""
        cb, cout = self.base_channels, conv.out_channels
        if self.groups == 1:
            return sparse_conv2d(x[:, cb:], on[:, 0], conv.weight[:, cb:], None, conv.stride, conv.padding,
                                 residual=base)
        per = cout // self.groups
        parts = [
            sparse_conv2d(x[:, cb:], on[:, g], conv.weight[g * per : (g + 1) * per, cb:], None, conv.stride,
                          conv.padding)
            for g in range(self.groups)
        ]
        return base + torch.cat(parts, dim=1)

    def rest_dense(self, conv: nn.Conv2d, x: Tensor) -> Tensor:
        """Remaining channels' contribution everywhere (training and the oracle)."""
        cb = self.base_channels
        return F.conv2d(x[:, cb:], conv.weight[:, cb:], None, conv.stride, conv.padding)


def gated_conv_forward(gate: GatedConv, conv: nn.Conv2d, x: Tensor, training: bool, alpha: float):
    """One channel-gated convolution: `(Y (N, Cout, H', W'), decision (N, G, H', W'))`."""
    yp = gate.base(conv, x)
    s = gate.score(yp)
    if training:
        d = straight_through(torch.sigmoid(alpha * s), (s > 0).to(s.dtype))
        return yp + gate.expand(d, yp.shape[1]) * gate.rest_dense(conv, x), d
    on = s > 0
    return gate.rest_sparse(conv, x, on, yp), on


class ChannelGatedResNet(nn.Module):
    """ResNet whose residual-branch 3x3 convolutions are channel-gated; `forward(x) -> (logits, info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = make_backbone(cfg)
        self.gate = nn.ModuleList()
        for b in self.net.blocks():
            for conv in (b.conv1, b.conv2):
                self.gate.append(GatedConv(conv, cfg.partitions, cfg.gate_groups, cfg.threshold))

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        h = self.net.stem(x)
        decisions = []
        for i, block in enumerate(self.net.blocks()):
            y, d1 = gated_conv_forward(self.gate[2 * i], block.conv1, h, self.training, self.cfg.alpha)
            y = F.relu(block.bn1(y))
            y, d2 = gated_conv_forward(self.gate[2 * i + 1], block.conv2, y, self.training, self.cfg.alpha)
            h = F.relu(block.shortcut(h) + block.bn2(y))
            decisions += [d1, d2]
        open_fraction = [float(d.detach().float().mean()) for d in decisions]
        deltas = torch.cat([g.delta for g in self.gate])
        info = {
            "gates": decisions,
            "open_fraction": open_fraction,
            "exec_rate": torch.tensor(open_fraction).mean(),
            "aux_loss": self.cfg.gate_loss_weight * ((deltas - self.cfg.threshold) ** 2).sum(),
        }
        return self.net.head(h), info

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        """Set the gate normalizations' running statistics from one pass over the batch `x`."""
        was_training = self.training
        self.eval()
        for g in self.gate:
            g.norm.reset_running_stats()
            g.norm.momentum = None  # cumulative average: one batch gives exactly its statistics
            g.norm.train()
        self(x)
        for g in self.gate:
            g.norm.momentum = 0.1
            g.norm.eval()
        self.train(was_training)


class DenseResNet(nn.Module):
    """The same ResNet with every channel computed everywhere; parameters under `net.`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = make_backbone(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(x), {}


def build(cfg: Config | None = None) -> ChannelGatedResNet:
    cfg = cfg or Config()
    _check(cfg)
    model = ChannelGatedResNet(cfg)
    gen = torch.Generator().manual_seed(1234)  # a calibration batch, not the measurement input
    model.calibrate(torch.randn(_CALIBRATION_BATCH, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen))
    return model


def build_baseline(cfg: Config | None = None) -> DenseResNet:
    cfg = cfg or Config()
    _check(cfg)
    return DenseResNet(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def summarize(info: dict) -> dict:
    """Fraction of open (fully computed) positions, overall and per gated convolution."""
    if "gates" not in info:
        return {"open_positions": 1.0}
    return {
        "open_positions": round(float(info["exec_rate"]), 4),
        "layer_open_fractions": " ".join(f"{f:.2f}" for f in info["open_fraction"]),
    }
