"""# ConvNet-AIG: Convolutional Networks with Adaptive Inference Graphs

[Veit and Belongie, ECCV 2018](https://openaccess.thecvf.com/content_ECCV_2018/html/Andreas_Veit_Convolutional_Networks_with_ECCV_2018_paper.html)
([arXiv 1711.11503](https://arxiv.org/abs/1711.11503), official code:
[andreasveit/convnet-aig](https://github.com/andreasveit/convnet-aig)).

## What is dynamic

- **Unit:** the residual branch of every block of a CIFAR ResNet (the shortcut always runs).
- **Decided by:** a lightweight gate per block, computed from the block's input: global average
  pool -> fully connected layer (16 units) -> BatchNorm -> ReLU -> fully connected layer with two
  logits (skip, execute).
- **When:** per sample, at every block, in train and eval.
  - `train()`: a Gumbel-Softmax sample of the two logits with a hard one-hot forward value and the
    soft sample's gradient (straight-through); the branch output is multiplied by the 0/1 gate. The
    target-rate loss `loss_weight * mean_g (target_rate - mean_n gate_{g,n})^2` is returned as
    `aux_loss`.
  - `eval()`: deterministic decision `p_execute > gate_threshold` (0.5 is the argmax of the two
    logits). The residual branch runs **only on the samples whose gate is on**, gathered into a
    smaller batch and added back in place; a block with no active sample is not called at all. The
    gate computes only the difference of its two logits (`p_execute` is its sigmoid), with its
    BatchNorm folded into the first layer (`Gate.execute_logit`): the same decision in three small
    ops, and one output row's MACs instead of two.

`info` holds `gates (G, N)` (bool in eval, straight-through 0/1 floats in train), `gate_probs (G, N)`,
`exec_rate` (fraction of executed blocks) and `aux_loss`. The gates' MACs count on the dynamic side.

## Operating point

- `target_rate` sets the execution rate the training drives every gate to.
- Without training, `exec_rate_init` sets it: the gates are initialized as in the paper (last layer's
  weights ~ N(0, 0.001), so an untrained gate is nearly input-independent) with the paper's bias
  `(0.1, 2.0)` (about 87 % open) on `round(exec_rate_init * G)` evenly spread gates and the mirrored
  bias `(2.0, 0.1)` on the others. An untrained model then executes exactly that fraction of its
  blocks, so executed MACs grow monotonically with `exec_rate_init` (about in proportion, since the
  blocks of a CIFAR ResNet cost nearly the same). `None` (default) opens every gate, as in the paper.
- `gate_threshold` moves the eval decision: higher runs fewer blocks. On an untrained model every
  gate's `p_execute` sits near 0.87 (or 0.13), so the threshold acts as a step there.

## Simplifications against the paper

- By default a small CIFAR ResNet (depth 14, option-A shortcuts) instead of ResNet-110;
  `arch="imagenet", depth=50, width=64, image_size=224` builds ConvNet-AIG 50 (every block gated,
  the downsampling ones included).
- One target rate for all gates (the paper also uses per-layer targets on ImageNet).
- Eval decisions are deterministic (the official code keeps sampling Gumbel noise at test time).
- Target-rate loss weight 4 (the official scripts use 1 or 2) and Adam with a cosine schedule, so that
  short runs reach the target: `TRAIN` uses 12 epochs on the digits at their native 8x8, enough for
  the gates to become input-dependent and the deterministic eval rate to land near the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.fold import bn_affine, bn_tensors, cached
from implementations.common.gates import gumbel_softmax
from implementations.common.losses import target_rate_loss
from implementations.common.resnet import (
    BasicBlock,
    Bottleneck,
    CifarResNet,
    ResNet,
    cifar_resnet,
    resnet18,
    resnet50,
)
from implementations.common.train import TrainSettings

_OPEN_BIAS = (0.1, 2.0)  # paper's init of the last gate layer: (skip, execute) logits, ~87 % open


@dataclass
class Config:
    arch: str = "cifar"  # "cifar" (CIFAR ResNet, depth 6n+2) | "imagenet" (ResNet-18/50, depth 18 or 50)
    depth: int = 14  # CIFAR: 3n gated blocks; ImageNet: 8 (ResNet-18) or 16 (ResNet-50) gated blocks
    width: int = 16  # stem width (ImageNet ResNets: 64)
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    gate_hidden: int = 16
    target_rate: float = 0.5  # training: target execution rate of every gate
    loss_weight: float = 4.0  # weight of the target-rate loss
    tau: float = 1.0  # Gumbel-Softmax temperature
    gate_threshold: float = 0.5  # eval: execute where p_execute > gate_threshold
    exec_rate_init: float | None = None  # untrained operating point: fraction of gates opened at init


TRAIN = TrainSettings(epochs=12, lr=1e-2, batch_size=64, image_size=8)  # digits at their native 8x8


def _check(cfg: Config) -> None:
    if cfg.arch not in ("cifar", "imagenet"):
        raise ValueError(f"arch must be 'cifar' or 'imagenet', got {cfg.arch!r}")
    if cfg.arch == "imagenet" and cfg.depth not in (18, 50):
        raise ValueError(f"depth must be 18 or 50 for arch='imagenet', got {cfg.depth!r}")
    if not 0.0 <= cfg.target_rate <= 1.0:
        raise ValueError(f"target_rate must be in [0, 1], got {cfg.target_rate!r}")
    if not 0.0 <= cfg.gate_threshold < 1.0:
        raise ValueError(f"gate_threshold must be in [0, 1), got {cfg.gate_threshold!r}")
    if cfg.exec_rate_init is not None and not 0.0 <= cfg.exec_rate_init <= 1.0:
        raise ValueError(f"exec_rate_init must be None or in [0, 1], got {cfg.exec_rate_init!r}")
    if not cfg.tau > 0:
        raise ValueError(f"tau must be > 0, got {cfg.tau!r}")


def backbone(cfg: Config) -> CifarResNet | ResNet:
    """The plain ResNet both models share (`stem`, `blocks()`, `head`)."""
    if cfg.arch == "imagenet":
        make = resnet18 if cfg.depth == 18 else resnet50
        return make(cfg.num_classes, cfg.in_channels, cfg.width)
    return cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width)


def open_gate_pattern(num_gates: int, rate: float | None) -> list[bool]:
    """Which gates start open: `round(rate * G)` of them, evenly spread (all when `rate` is None)."""
    if rate is None:
        return [True] * num_gates
    k = round(rate * num_gates)
    return [((g + 1) * k) // num_gates > (g * k) // num_gates for g in range(num_gates)]


class Gate(nn.Module):
    """ConvNet-AIG gate: `(N, C, H, W) -> (N, 2)` logits (skip, execute)."""

    def __init__(self, in_channels: int, hidden: int = 16, open_at_init: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 2)
        nn.init.normal_(self.fc2.weight, std=0.001)
        bias = _OPEN_BIAS if open_at_init else _OPEN_BIAS[::-1]
        with torch.no_grad():
            self.fc2.bias.copy_(torch.tensor(bias))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(x.mean(dim=(2, 3))))))

    def execute_logit(self, x: Tensor) -> Tensor:
        """Eval: `logits[:, 1] - logits[:, 0]` `(N,)`, so `p_execute = sigmoid` of it. The eval BatchNorm is
        folded into `fc1` and the two rows of `fc2` into their difference (cached until a weight or a
        statistic changes): three small ops per gate instead of six plus the module calls."""

        def hidden() -> tuple[Tensor, Tensor]:
            scale, shift = bn_affine(self.bn)
            return self.fc1.weight * scale[:, None], self.fc1.bias * scale + shift

        def difference() -> tuple[Tensor, Tensor]:
            return self.fc2.weight[1] - self.fc2.weight[0], self.fc2.bias[1] - self.fc2.bias[0]

        w1, b1 = cached(self.fc1, (self.fc1.weight, self.fc1.bias, *bn_tensors(self.bn)), hidden)
        wd, bd = cached(self.fc2, (self.fc2.weight, self.fc2.bias), difference)
        return torch.addmv(bd, torch.addmm(b1, x.mean(dim=(2, 3)), w1.t()).relu_(), wd)


def gated_block_train(block: BasicBlock | Bottleneck, x: Tensor, gate: Tensor) -> Tensor:
    """Relaxed block: `relu(shortcut(x) + gate * residual(x))`; `gate (N,)` 0/1 with gradient."""
    return F.relu(block.shortcut(x) + block.residual(x) * gate.view(-1, 1, 1, 1))


def gated_block_eval(block: BasicBlock | Bottleneck, x: Tensor, on: Tensor) -> Tensor:
    """Executing block: the residual branch runs only on the rows where `on (N,)` is True."""
    if len(x) == 1:  # one image: a Python decision, no index ops
        return F.relu(block.shortcut(x) + block.residual(x)) if bool(on) else F.relu(block.shortcut(x))
    out = block.shortcut(x)
    idx = on.nonzero().flatten()
    if idx.numel() == len(x):
        out = out + block.residual(x)
    elif idx.numel() > 0:
        out = out.index_add(0, idx, block.residual(x.index_select(0, idx)))
    return F.relu(out)


class ConvNetAIG(nn.Module):
    """ResNet with one gate per residual block; `forward(x) -> (logits (N, K), info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = backbone(cfg)
        blocks = list(self.net.blocks())
        pattern = open_gate_pattern(len(blocks), cfg.exec_rate_init)
        self.gates = nn.ModuleList(
            Gate(b.in_channels, cfg.gate_hidden, open_at_init=p) for b, p in zip(blocks, pattern, strict=True)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        h = self.net.stem(x)
        decisions, probs = [], []
        thr = self.cfg.gate_threshold
        cut = math.log(thr / (1 - thr)) if thr > 0 else -math.inf  # p_execute > thr <=> logit > cut
        for block, gate in zip(self.net.blocks(), self.gates, strict=True):
            if self.training:
                logits = gate(h)
                g = gumbel_softmax(logits, self.cfg.tau, hard=True, dim=1)[:, 1]
                h = gated_block_train(block, h, g)
                probs.append(torch.softmax(logits, dim=1)[:, 1])
            else:
                d = gate.execute_logit(h)
                g = d > cut
                h = gated_block_eval(block, h, g)
                probs.append(d)
            decisions.append(g)
        gates = torch.stack(decisions)
        gate_probs = torch.stack(probs) if self.training else torch.sigmoid(torch.stack(probs))
        info = {
            "gates": gates,
            "gate_probs": gate_probs,
            "exec_rate": gates.float().mean().detach(),
            "aux_loss": self.cfg.loss_weight * target_rate_loss(gates.float(), self.cfg.target_rate),
        }
        return self.net.head(h), info


class DenseResNet(nn.Module):
    """The same ResNet with every block executed; parameters under `net.` as in `ConvNetAIG`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = backbone(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(x), {}


def build(cfg: Config | None = None) -> ConvNetAIG:
    cfg = cfg or Config()
    _check(cfg)
    return ConvNetAIG(cfg)


def build_baseline(cfg: Config | None = None) -> DenseResNet:
    cfg = cfg or Config()
    _check(cfg)
    return DenseResNet(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def summarize(info: dict) -> dict:
    """Executed-block fraction and the execution rate of every gate."""
    if "gates" not in info:
        return {"executed_blocks": 1.0}
    rates = info["gates"].float().mean(dim=1)
    return {
        "executed_blocks": round(float(rates.mean()), 4),
        "gate_rates": " ".join(f"{r:.2f}" for r in rates.tolist()),
    }
