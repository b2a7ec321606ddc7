"""# IamNN: Iterative and Adaptive Mobile Neural Network

[Leroux, Molchanov, Simoens, Dhoedt, Breuel and Kautz, ICLR 2018 Workshop](https://arxiv.org/abs/1804.10123)
(no official code found).

## What is dynamic

- **Unit:** one iteration of a stage's *iterative block*: a residual unit (two 3x3 convolutions)
  whose convolution weights are **shared across iterations**; it replaces the stack of residual units
  of a ResNet stage. Each stage is a transition unit (an ordinary residual unit that changes the
  resolution and width) followed by up to `max_iterations` iterations of the shared block.
- **Decided by:** Adaptive Computation Time, per sample: after every iteration but the last a halting
  unit (global average pool -> BatchNorm -> linear -> sigmoid) gives `h_t`; the sample stops after
  the first iteration `N` where `h_1 + ... + h_N >= threshold` (ACT's `1 - eps`). The stage's output is
  the halting-weighted mixture of the iterates, `sum_{t<N} h_t F_t + R F_N`, `R = 1 - sum_{t<N} h_t`.
- **When:** per sample, at every stage, in train and eval.
  - `train()`: every iteration runs on every sample, halted samples get weight 0 in the mixture,
    and the ponder cost `tau * sum_stages mean_n (N_n + R_n)` is the `aux_loss`.
  - `eval()`: a sample that halts **leaves the batch**; the later iterations run only on the samples
    still iterating (gathered rows); when all samples of the batch have stopped, the block is not
    called again.

`info` holds `units (S, N)` (iterations per stage and sample), `ponder (S, N)`, `unit_rate`
(executed fraction of all iterations) and `aux_loss`. Halting MACs count on the dynamic side; the
baseline is the same weight-shared network running every iteration.

## Operating point

- `threshold` (halt when the cumulative halting probability reaches it; ACT's `1 - eps` = 0.99):
  lowering it at test time stops earlier, so executed MACs fall monotonically with it.
- `max_iterations` per stage bounds the work (the baseline runs all of them).
- `tau` moves the trained compute.
- Untrained models (what `catalog bench` measures): with `iter_rate_init` set, `build` gives the
  halting BatchNorms the statistics of a fixed calibration batch (photo crops) and bisects the shared
  halting bias so that about that fraction of the iterations runs there at threshold 0.99; `threshold`
  then moves the work from that point. The entry's first operating point is ours: 64/128/256
  channels on 32x32 inputs, up to 8 iterations per stage, half of them executed.

## Simplifications against the paper

- A CIFAR-style three-stage network on 32x32 inputs; the paper's backbones, numbers and training
  schedule were not confirmed from the paper, so the stage layout is ours.
- BatchNorm is separate per iteration (convolutions shared), as the journal extension of the paper
  describes ("different batchnorm statistics per iteration"); one halting linear layer per stage,
  shared across iterations, with its own BatchNorm per iteration.
- The stage output is ACT's halting-weighted mixture of the iterates.
- For the short digits run: halting bias -1 at init, `tau` 0.25 (ours) and a 10x learning-rate multiplier
  on the halting units (`halting_lr_mult`, see `implementations/depth/act.py`).
- `example_input` is a batch of crops of the two scikit-learn sample photos, not random noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.losses import ponder_cost
from implementations.common.resnet import BasicBlock, PadShortcut, conv3x3
from implementations.common.train import TrainSettings
from implementations.depth.act import (
    act_stage_eval,
    act_stage_masked,
    calibrate,
    photo_batch,
    scale_down_,
)

CALIBRATION_THRESHOLD = 0.99  # `iter_rate_init` is calibrated at ACT's threshold; `threshold` then moves it


@dataclass
class Config:
    width: int = 16  # channels of the first stage (then 2x, 4x)
    max_iterations: int = 3  # iterations of the shared block per stage (the baseline runs all)
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    threshold: float = 0.99  # halt when the cumulative halting probability reaches it (ACT: 1 - eps)
    tau: float = 0.25  # ponder cost weight (ours, for the ~100-step digits run)
    halting_bias: float = -1.0  # initial halting bias (the SACT code starts at -3, for 100k-step runs)
    iter_rate_init: float | None = None  # untrained operating point: calibrate the bias to run this fraction
    halting_lr_mult: float = 10.0  # learning-rate multiplier of the halting units (short digits runs)


TRAIN = TrainSettings(epochs=4, lr=3e-3, batch_size=64)


def _check(cfg: Config) -> None:
    if not 0.0 < cfg.threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {cfg.threshold!r}")
    if cfg.max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {cfg.max_iterations!r}")
    if not cfg.tau >= 0:
        raise ValueError(f"tau must be >= 0, got {cfg.tau!r}")
    if not cfg.halting_lr_mult > 0:
        raise ValueError(f"halting_lr_mult must be > 0, got {cfg.halting_lr_mult!r}")
    if cfg.iter_rate_init is not None and not 0.0 < cfg.iter_rate_init <= 1.0:
        raise ValueError(f"iter_rate_init must be None or in (0, 1], got {cfg.iter_rate_init!r}")


class IterativeBlock(nn.Module):
    """Residual unit with shared convs and one BN pair per iteration: `(N, C, H, W) -> (N, C, H, W)`."""

    def __init__(self, channels: int, iterations: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv3x3(channels, channels), conv3x3(channels, channels)
        self.bn1 = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(iterations))
        self.bn2 = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(iterations))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor, t: int) -> Tensor:
        """Iteration `t` (0-based): `relu(x + bn2_t(conv2(relu(bn1_t(conv1(x))))))`."""
        r = self.bn2[t](self.conv2(F.relu(self.bn1[t](self.conv1(x)))))
        return F.relu(x + r)


class Stage(nn.Module):
    """Transition unit (changes width/resolution, not shared) + the iterative block."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, iterations: int) -> None:
        super().__init__()
        down = PadShortcut(in_ch, out_ch, stride) if stride != 1 or in_ch != out_ch else None
        self.transition = BasicBlock(in_ch, out_ch, stride, down)
        self.block = IterativeBlock(out_ch, iterations)
        self.iterations = iterations


class Halting(nn.Module):
    """`(N, C, H, W) -> (N,)` halting probability after iteration `t`: sigmoid(fc(BN_t(avg_pool(x)))).

    `fc` is stored divided by `lr_mult` (`act.scale_down_`: a learning-rate multiplier)."""

    def __init__(self, channels: int, iterations: int, bias: float, lr_mult: float = 1.0) -> None:
        super().__init__()
        self.bn = nn.ModuleList(nn.BatchNorm1d(channels) for _ in range(iterations))
        self.fc = nn.Linear(channels, 1)
        self.lr_mult = lr_mult
        nn.init.constant_(self.fc.bias, bias)
        scale_down_(self.fc, lr_mult)

    def forward(self, x: Tensor, t: int) -> Tensor:
        return torch.sigmoid(self.lr_mult * self.fc(self.bn[t](x.mean(dim=(2, 3)))).squeeze(1))

    def set_bias(self, bias: float) -> None:
        with torch.no_grad():
            self.fc.bias.fill_(bias / self.lr_mult)


class IterativeNet(nn.Module):
    """Stem, three stages (transition + iterative block), head. Shared by `IamNN` and the baseline."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        w = cfg.width
        self.conv1 = conv3x3(cfg.in_channels, w)
        self.bn1 = nn.BatchNorm2d(w)
        self.stages = nn.ModuleList(
            Stage(cin, cout, s, cfg.max_iterations) for cin, cout, s in ((w, w, 1), (w, 2 * w, 2), (2 * w, 4 * w, 2))
        )
        self.fc = nn.Linear(4 * w, cfg.num_classes)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def head(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class IamNN(nn.Module):
    """IamNN with ACT over the iterations of every stage; `forward(x) -> (logits (N, K), info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = IterativeNet(cfg)
        self.halting = nn.ModuleList(
            Halting(s.block.conv1.out_channels, cfg.max_iterations - 1, cfg.halting_bias, cfg.halting_lr_mult)
            for s in self.net.stages
        )

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.run(x, masked=self.training)

    def masked_forward(self, x: Tensor) -> tuple[Tensor, dict]:
        """The training relaxation (every iteration on every sample, masked); the eval path's test oracle."""
        return self.run(x, masked=True)

    def run(self, x: Tensor, masked: bool, threshold: float | None = None) -> tuple[Tensor, dict]:
        """Relaxed (`masked`) or executing forward, halting at `threshold` (default `cfg.threshold`)."""
        stage_fn = act_stage_masked if masked else act_stage_eval
        eps = 1.0 - (self.cfg.threshold if threshold is None else threshold)
        h = self.net.stem(x)
        units, ponders = [], []
        for stage, halting in zip(self.net.stages, self.halting, strict=True):
            h = stage.transition(h)
            steps = [partial(stage.block, t=t) for t in range(stage.iterations)]
            heads = [partial(halting, t=t) for t in range(stage.iterations - 1)]
            h, n_iter, rem = stage_fn(steps, heads, h, eps)
            units.append(n_iter)
            ponders.append(n_iter.to(rem.dtype) + rem)
        units_t = torch.stack(units)
        info = {
            "units": units_t,
            "ponder": torch.stack(ponders).detach(),
            "unit_rate": (units_t.float() / self.cfg.max_iterations).mean(),
            "aux_loss": self.cfg.tau * sum(ponder_cost(u, r) for u, r in zip(units, ponders, strict=True)),
        }
        return self.net.head(h), info

    def set_halting_bias(self, bias: float) -> None:
        with torch.no_grad():
            for halting in self.halting:
                halting.set_bias(bias)


class IterativeBaseline(nn.Module):
    """The same weight-shared network running every iteration; parameters under `net.` as in `IamNN`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = IterativeNet(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        h = self.net.stem(x)
        for stage in self.net.stages:
            h = stage.transition(h)
            for t in range(stage.iterations):
                h = stage.block(h, t)
        return self.net.head(h), {}


def build(cfg: Config | None = None) -> IamNN:
    cfg = cfg or Config()
    _check(cfg)
    model = IamNN(cfg)
    if cfg.iter_rate_init is not None:
        norms = [bn for halting in model.halting for bn in halting.bn]
        rate = lambda x: float(model.run(x, masked=False, threshold=CALIBRATION_THRESHOLD)[1]["unit_rate"])  # noqa: E731
        calibrate(model, cfg, rate, cfg.iter_rate_init, norms)
    return model


def build_baseline(cfg: Config | None = None) -> IterativeBaseline:
    cfg = cfg or Config()
    _check(cfg)
    return IterativeBaseline(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    return photo_batch(batch_size, cfg.image_size, cfg.in_channels, seed=0)


def summarize(info: dict) -> dict:
    """Executed fraction of the iterations, mean iterations per stage and the ponder cost."""
    if "units" not in info:
        return {"executed_iterations": 1.0}
    units = info["units"].float()
    return {
        "executed_iterations": round(float(info["unit_rate"]), 4),
        "mean_iterations_per_stage": " ".join(f"{u:.2f}" for u in units.mean(dim=1).tolist()),
        "mean_ponder_cost": round(float(info["ponder"].sum(0).mean()), 4),
    }
