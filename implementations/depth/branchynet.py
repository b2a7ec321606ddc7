"""# BranchyNet: Fast Inference via Early Exiting from Deep Neural Networks

[Teerapittayanon, McDanel and Kung, ICPR 2016](https://arxiv.org/abs/1709.01686)
(official code, Chainer: [kunglab/branchynet](https://github.com/kunglab/branchynet)).

## What is dynamic

- **Unit:** the rest of the network after a side-branch classifier (an *exit*).
- **Decided by:** the entropy of the exit's softmax, `H(p) = -sum_k p_k log p_k`, compared with that
  exit's threshold: a sample whose prediction is confident enough (`H / log K < threshold`) leaves with
  the exit's prediction.
- **When:** per sample, in eval. Training runs every exit on every sample and minimizes a weighted
  sum of the exits' cross-entropies (joint training, as in the paper); the module's `loss` does this.

In `eval()` exited samples **leave the batch for real**: the later stages run only on the remaining
rows (gathered with `index_select`) and each sample's logits are written back in order; when no
sample remains the later stages are not called. `info` holds `exit_index (N,)` (0 .. E-1, E-1 is the
final classifier), `exit_counts (E,)` and, in train mode, `exit_logits` (a list of E `(N, K)` tensors).

## Operating point

`threshold` is the normalized-entropy threshold of every side exit (`thresholds` overrides it per exit);
the paper's thresholds are in nats, `threshold * log(K)` here. Raising it lets more samples leave early,
so executed MACs fall monotonically. `0` never exits early (the full network plus the side exits'
cost); an untrained exit is nearly uniform (normalized entropy close to 1), so on an untrained model
only thresholds near 1 move the MACs.

## Simplifications against the paper

- A small CIFAR ResNet (depth 14) with side exits after its first and second stages instead of
  LeNet / AlexNet / ResNet-110; each side branch is one strided 3x3 conv (doubling the channels) +
  BN + ReLU, global average pooling and a linear classifier.
- Equal exit weights by default (`exit_weights`); the network is trained jointly from scratch
  (`TRAIN`: 8 epochs of Adam with a cosine schedule on the digits at their native 8x8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.resnet import CifarResNet, cifar_resnet
from implementations.common.train import TrainSettings


@dataclass
class Config:
    depth: int = 14  # CIFAR ResNet 6n+2 (three stages)
    width: int = 16
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    exits_after: tuple[int, ...] = (1, 2)  # side exits after these stages (1-based; the last has the head)
    threshold: float = 0.2  # normalized entropy below which a sample exits (all side exits)
    thresholds: tuple[float, ...] | None = None  # per side exit; overrides `threshold`
    exit_weights: tuple[float, ...] | None = None  # loss weight per exit (side exits, then final)


TRAIN = TrainSettings(epochs=8, lr=1e-2, batch_size=64, image_size=8)  # digits at their native 8x8


def _check(cfg: Config) -> None:
    if not 0.0 <= cfg.threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {cfg.threshold!r}")
    if sorted(set(cfg.exits_after)) != list(cfg.exits_after) or not all(1 <= s <= 2 for s in cfg.exits_after):
        raise ValueError(f"exits_after must be increasing stage numbers in [1, 2], got {cfg.exits_after!r}")
    n_side = len(cfg.exits_after)
    if cfg.thresholds is not None and (
        len(cfg.thresholds) != n_side or not all(0.0 <= t <= 1.0 for t in cfg.thresholds)
    ):
        raise ValueError(f"thresholds must hold one value in [0, 1] per side exit ({n_side}), got {cfg.thresholds!r}")
    if cfg.exit_weights is not None and len(cfg.exit_weights) != n_side + 1:
        raise ValueError(f"exit_weights must have {n_side + 1} values (side exits + final), got {cfg.exit_weights!r}")


def normalized_entropy(logits: Tensor) -> Tensor:
    """`(N, K) -> (N,)` softmax entropy divided by `log K` (0: one-hot, 1: uniform)."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1) / math.log(logits.shape[1])


def exits_here(logits: Tensor, threshold: float) -> Tensor:
    """BranchyNet's exit rule: bool `(N,)`, True where the exit is confident enough to stop."""
    return normalized_entropy(logits) < threshold


class ExitBranch(nn.Module):
    """Side classifier: `(N, C, H, W) -> (N, K)` (strided 3x3 conv to 2C, BN, ReLU, pool, linear)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2 * channels)
        self.fc = nn.Linear(2 * channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class BranchyResNet(nn.Module):
    """CIFAR ResNet with side exits; `forward(x) -> (logits (N, K), info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net: CifarResNet = cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width)
        self.exits = nn.ModuleList(ExitBranch(cfg.width * 2 ** (s - 1), cfg.num_classes) for s in cfg.exits_after)
        self.thresholds = cfg.thresholds or (cfg.threshold,) * len(cfg.exits_after)

    def _side_exit(self, stage_number: int) -> int | None:
        return self.cfg.exits_after.index(stage_number) if stage_number in self.cfg.exits_after else None

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self._forward_train(x) if self.training else self._forward_eval(x)

    def _forward_train(self, x: Tensor) -> tuple[Tensor, dict]:
        h, exit_logits = self.net.stem(x), []
        for s, stage in enumerate(self.net.stages, start=1):
            h = stage(h)
            j = self._side_exit(s)
            if j is not None:
                exit_logits.append(self.exits[j](h))
        exit_logits.append(self.net.head(h))
        n_exits = len(exit_logits)
        exit_index = torch.full((len(x),), n_exits - 1, dtype=torch.long, device=x.device)
        info = {"exit_logits": exit_logits, "exit_weights": self.cfg.exit_weights, "exit_index": exit_index,
                "exit_counts": torch.bincount(exit_index, minlength=n_exits)}
        return exit_logits[-1], info

    def _forward_eval(self, x: Tensor) -> tuple[Tensor, dict]:
        n, n_exits = len(x), len(self.exits) + 1
        out = x.new_empty(n, self.cfg.num_classes)
        exit_index = torch.full((n,), n_exits - 1, dtype=torch.long, device=x.device)
        rows = torch.arange(n, device=x.device)  # original row of each remaining sample
        h = self.net.stem(x)
        for s, stage in enumerate(self.net.stages, start=1):
            h = stage(h)
            j = self._side_exit(s)
            if j is None:
                continue
            logits = self.exits[j](h)
            leave = exits_here(logits, self.thresholds[j])
            out[rows[leave]] = logits[leave]
            exit_index[rows[leave]] = j
            stay = (~leave).nonzero().flatten()
            if stay.numel() == 0:  # everyone left: later stages are never called
                break
            if stay.numel() < len(h):
                h, rows = h.index_select(0, stay), rows[stay]
        else:
            out[rows] = self.net.head(h)
        info = {"exit_index": exit_index, "exit_counts": torch.bincount(exit_index, minlength=n_exits)}
        return out, info


class DenseResNet(nn.Module):
    """The main network alone (every stage, final classifier); parameters under `net.`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(x), {}


def loss(output: Tensor, info: dict, target: Tensor) -> Tensor:
    """Joint training: `sum_i w_i * cross_entropy(exit_i, target)` (plain CE for the baseline)."""
    exit_logits = info.get("exit_logits") or [output]
    weights = info.get("exit_weights") or (1.0,) * len(exit_logits)
    return sum(w * F.cross_entropy(z, target) for w, z in zip(weights, exit_logits, strict=True))


def build(cfg: Config | None = None) -> BranchyResNet:
    cfg = cfg or Config()
    _check(cfg)
    return BranchyResNet(cfg)


def build_baseline(cfg: Config | None = None) -> DenseResNet:
    cfg = cfg or Config()
    _check(cfg)
    return DenseResNet(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def summarize(info: dict) -> dict:
    """Exit histogram and the fraction of samples that left early."""
    counts = info["exit_counts"].tolist() if "exit_counts" in info else [1]
    total = max(sum(counts), 1)
    return {
        "exit_histogram": " ".join(f"{c}" for c in counts),
        "early_exit_fraction": round(1 - counts[-1] / total, 4),
    }
