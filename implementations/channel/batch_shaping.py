"""# Batch-Shaping for Learning Conditional Channel Gated Networks

[Ehteshami Bejnordi, Blankevoort and Welling, ICLR 2020](https://arxiv.org/abs/1907.06627)
(no official code was found).

## What is dynamic

- **Unit:** the output channels of the first convolution of every residual block (and therefore the
  input channels of the second one). The shortcut, the stem and the classifier always run.
- **Decided by:** a small gating module per block, computed from the block's input: global average
  pool -> fully connected layer (16 units) -> BatchNorm -> ReLU -> fully connected layer with one
  logit per gated channel.
- **When:** per sample and channel, at every block, in train and eval.
  - `train()`: every gate is a binary Concrete (Gumbel-sigmoid) sample with temperature `tau` and a
    hard 0/1 forward value (straight-through); it multiplies its channel after the first BN-ReLU.
    `aux_loss` is the **batch-shaping loss**: for every gate, the squared distance between the
    empirical CDF of its probabilities over the batch (sorted, `i / (N + 1)`) and the CDF of the
    prior `Beta(beta_a, beta_b)` (the Beta CDF's gradient is its density), which forces each gate to
    be *on for some inputs and off for others*; after `l0_after_steps` training steps an **L0-style
    penalty** (the expected fraction of open gates) is added to sparsify further.
  - `eval()`: a gate is on where its logit is positive. The first convolution computes **only the
    open output channels** of each sample and the second reads **only those input channels**: each
    sample uses its own gathered weight block; samples with the same number of open channels run
    together as one grouped convolution (`groups` = number of such samples; see
    `implementations.channel.fbs.gathered_conv2d`); a sample with no open channel skips both
    convolutions (its branch is the second BatchNorm's shift).

`info` holds `gates` (one `(N, C)` tensor per block: bool in eval, straight-through 0/1 in train),
`gate_probs`, `exec_rate` (fraction of open gates) and `aux_loss` (0 in eval). The gating modules' MACs count on
the dynamic side.

## Operating point

- In training, the prior sets about which fraction of the batch every gate serves: with the eval rule
  `p > 0.5`, a gate whose probabilities follow `Beta(a, b)` opens for `1 - BetaCDF(0.5)` of the inputs
  (0.62 for `Beta(0.6, 0.4)`); `l0_weight` pulls it lower.
- Without training, `open_rate_init` sets it: the last layer of every gating module gets per-channel
  biases calibrated in `build` on a fixed random calibration batch (not the measurement input), so
  that **each gate opens for that fraction of the calibration samples**, input-dependently, as the
  batch-shaping prior asks. Executed MACs of the gated convolutions then grow in proportion to it.
  `None` keeps the default initialization.

## Simplifications against the paper

- A small CIFAR ResNet by default; `backbone="resnet34"` gives the paper's ImageNet ResNet-34
  (gated to the cost of ResNet-18 at the operating point), at a reduced image size for the CPU.
- Only basic blocks (the paper also gates bottleneck ResNet-50); no warm-up schedule of the
  batch-shaping weight; trained from scratch on the digits.
- Eval decisions are deterministic (no logistic noise at test time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.special import betainc
from torch import Tensor

from implementations.channel.fbs import bn_scale_shift, gathered_conv2d
from implementations.common.gates import gumbel_sigmoid
from implementations.common.resnet import BasicBlock, ResNet, cifar_resnet
from implementations.common.train import TrainSettings

_CALIBRATION_BATCH = 64


@dataclass
class Config:
    backbone: Literal["cifar", "resnet18", "resnet34"] = "cifar"
    depth: int = 14  # CIFAR ResNet 6n+2 (ignored by the ImageNet ResNets)
    width: int = 16  # channels of the first stage (64 for the standard ResNet-18/34)
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    gate_hidden: int = 16
    beta_a: float = 0.6  # batch-shaping prior Beta(a, b)
    beta_b: float = 0.4
    shaping_weight: float = 10.0  # weight of the batch-shaping loss (a mean over gates and samples)
    l0_weight: float = 0.1  # weight of the L0-style penalty (expected fraction of open gates)
    l0_after_steps: int = 40  # warm-up: training steps before the L0 penalty starts
    tau: float = 2 / 3  # Gumbel-sigmoid temperature
    open_rate_init: float | None = None  # untrained operating point: each gate opens for this fraction


TRAIN = TrainSettings(epochs=5, lr=3e-3, batch_size=64)


def _check(cfg: Config) -> None:
    if cfg.backbone not in ("cifar", "resnet18", "resnet34"):
        raise ValueError(f"backbone must be 'cifar', 'resnet18' or 'resnet34', got {cfg.backbone!r}")
    if not (cfg.beta_a > 0 and cfg.beta_b > 0):
        raise ValueError(f"beta_a and beta_b must be > 0, got {cfg.beta_a!r} and {cfg.beta_b!r}")
    if cfg.open_rate_init is not None and not 0.0 <= cfg.open_rate_init <= 1.0:
        raise ValueError(f"open_rate_init must be None or in [0, 1], got {cfg.open_rate_init!r}")
    if not cfg.tau > 0:
        raise ValueError(f"tau must be > 0, got {cfg.tau!r}")
    if cfg.shaping_weight < 0 or cfg.l0_weight < 0:
        raise ValueError("shaping_weight and l0_weight must be >= 0")


def make_backbone(cfg: Config) -> nn.Module:
    """CIFAR ResNet (depth, width), or ImageNet-layout ResNet-18 / ResNet-34 (basic blocks)."""
    if cfg.backbone == "cifar":
        return cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width)
    layers = (2, 2, 2, 2) if cfg.backbone == "resnet18" else (3, 4, 6, 3)
    return ResNet(BasicBlock, layers, cfg.num_classes, cfg.in_channels, cfg.width)


class _BetaCDF(torch.autograd.Function):
    """CDF of Beta(a, b) at `p` (SciPy's regularized incomplete beta); gradient = the Beta density."""

    @staticmethod
    def forward(ctx, p: Tensor, a: float, b: float) -> Tensor:
        ctx.save_for_backward(p)
        ctx.ab = (a, b)
        values = betainc(a, b, p.detach().double().cpu().numpy())
        return torch.as_tensor(values, dtype=p.dtype, device=p.device)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (p,) = ctx.saved_tensors
        a, b = ctx.ab
        q = p.clamp(1e-4, 1 - 1e-4)
        log_pdf = (a - 1) * q.log() + (b - 1) * (-q).log1p() - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
        return grad * log_pdf.exp(), None, None


def batch_shaping_loss(probs: Tensor, a: float, b: float) -> Tensor:
    """Batch-shaping loss of gate probabilities `probs (N, C)`: mean over gates and samples of
    `(i / (N + 1) - BetaCDF(p_(i)))^2`, the gap between each gate's empirical CDF and the prior's."""
    n = probs.shape[0]
    sorted_p = probs.sort(dim=0).values
    empirical = torch.arange(1, n + 1, dtype=probs.dtype, device=probs.device).div(n + 1).unsqueeze(1)
    return ((empirical - _BetaCDF.apply(sorted_p, a, b)) ** 2).mean()


class GatingModule(nn.Module):
    """Per-block channel gates: `(N, Cin, H, W) -> (N, C)` logits (pool, FC, BN, ReLU, FC)."""

    def __init__(self, in_channels: int, channels: int, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(x.mean(dim=(2, 3))))))


def gated_block_train(block: BasicBlock, x: Tensor, gate: Tensor) -> Tensor:
    """Relaxed (and oracle) block: conv1's channels times `gate (N, C)`, then conv2, shortcut, ReLU."""
    h = F.relu(block.bn1(block.conv1(x))) * gate[..., None, None]
    return F.relu(block.shortcut(x) + block.bn2(block.conv2(h)))


def count_groups(counts: Tensor) -> list[tuple[int, Tensor | None]]:
    """Samples grouped by their number of open gates: `(k, rows)`; rows is None for the whole batch."""
    values = counts.unique()
    if len(values) == 1:
        return [(int(values[0]), None)]
    return [(int(k), (counts == k).nonzero().flatten()) for k in values]


def gated_block_eval(block: BasicBlock, x: Tensor, on: Tensor) -> Tensor:
    """Executing block: per sample, only the open channels of conv1 are computed and read by conv2."""
    bn2 = block.bn2
    inv2 = bn2.weight / torch.sqrt(bn2.running_var + bn2.eps)
    shift2 = (bn2.bias - bn2.running_mean * inv2)[:, None, None]
    out = block.shortcut(x)
    res = None
    for k, rows in count_groups(on.sum(dim=1)):
        xs, ons = (x, on) if rows is None else (x.index_select(0, rows), on.index_select(0, rows))
        if k == 0:  # nothing open: conv2 of a zero input, i.e. bn2's shift alone
            r = shift2.expand(len(xs), -1, *out.shape[2:])
        else:
            idx = ons.nonzero()[:, 1].view(len(xs), k)  # open channels, increasing
            h = gathered_conv2d(xs, block.conv1.weight, idx, None, block.conv1.stride, block.conv1.padding)
            scale, shift = bn_scale_shift(block.bn1, idx, torch.ones_like(idx, dtype=x.dtype))
            h = torch.addcmul(shift, h, scale).relu_()
            r = gathered_conv2d(h, block.conv2.weight, None, idx, block.conv2.stride, block.conv2.padding)
            r = torch.addcmul(shift2, r, inv2[:, None, None])
        if rows is None:
            res = r
        else:
            if res is None:
                res = r.new_empty(len(x), *r.shape[1:])
            res[rows] = r
    return F.relu(out + res)


class BatchShapedResNet(nn.Module):
    """ResNet with per-channel gates in every block; `forward(x) -> (logits (N, K), info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = make_backbone(cfg)
        self.gates = nn.ModuleList(
            GatingModule(b.in_channels, b.conv1.out_channels, cfg.gate_hidden) for b in self.net.blocks()
        )
        self.train_steps = 0  # training forwards seen (the L0 penalty starts after a warm-up)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        h = self.net.stem(x)
        decisions, probs = [], []
        for block, gate in zip(self.net.blocks(), self.gates, strict=True):
            logits = gate(h)
            if self.training:
                g = gumbel_sigmoid(logits, self.cfg.tau, hard=True)
                h = gated_block_train(block, h, g)
            else:
                g = logits > 0
                h = gated_block_eval(block, h, g)
            decisions.append(g)
            probs.append(torch.sigmoid(logits))
        info = {
            "gates": decisions,
            "gate_probs": probs,
            "exec_rate": torch.cat([d.float().flatten() for d in decisions]).mean().detach(),
            "aux_loss": self._aux_loss(probs) if self.training else torch.zeros((), device=x.device),
        }
        if self.training:
            self.train_steps += 1
        return self.net.head(h), info

    def _aux_loss(self, probs: list[Tensor]) -> Tensor:
        cfg = self.cfg
        shaping = torch.stack([batch_shaping_loss(p, cfg.beta_a, cfg.beta_b) for p in probs]).mean()
        l0 = torch.cat([p.flatten() for p in probs]).mean()
        l0_on = float(self.train_steps >= cfg.l0_after_steps)
        return cfg.shaping_weight * shaping + l0_on * cfg.l0_weight * l0

    @torch.no_grad()
    def calibrate(self, rate: float, x: Tensor) -> None:
        """Set every gate's last-layer biases so that each channel opens for `rate` of the samples `x`."""
        was_training = self.training
        self.eval()
        h = self.net.stem(x)
        for block, gate in zip(self.net.blocks(), self.gates, strict=True):
            logits = gate(h)
            threshold = torch.quantile(logits, 1.0 - rate, dim=0)  # (C,)
            gate.fc2.bias -= threshold + (1e-4 if rate == 0.0 else 0.0)
            h = gated_block_eval(block, h, gate(h) > 0)
        self.train(was_training)


class DenseResNet(nn.Module):
    """The same ResNet with every channel computed and no gates; parameters under `net.`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = make_backbone(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(x), {}


def build(cfg: Config | None = None) -> BatchShapedResNet:
    cfg = cfg or Config()
    _check(cfg)
    model = BatchShapedResNet(cfg)
    if cfg.open_rate_init is not None:
        gen = torch.Generator().manual_seed(1234)  # a calibration batch, not the measurement input
        x = torch.randn(_CALIBRATION_BATCH, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
        model.calibrate(cfg.open_rate_init, x)
    return model


def build_baseline(cfg: Config | None = None) -> DenseResNet:
    cfg = cfg or Config()
    _check(cfg)
    return DenseResNet(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def summarize(info: dict) -> dict:
    """Open-gate fraction per block and how conditional the gates are on the batch."""
    if "gates" not in info:
        return {"open_gates": 1.0}
    rates = [g.float().mean().item() for g in info["gates"]]
    per_gate = torch.cat([g.float().mean(dim=0) for g in info["gates"]])
    conditional = ((per_gate > 0) & (per_gate < 1)).float().mean().item()
    return {
        "open_gates": round(float(info["exec_rate"]), 4),
        "block_rates": " ".join(f"{r:.2f}" for r in rates),
        "conditional_gates": round(conditional, 4),
    }
