"""# DRNet: Dynamic Resolution Network

[Zhu, Han, Wu, Zhang, Nie, Lan and Wang, NeurIPS 2021](https://arxiv.org/abs/2106.02898)
(official code, MindSpore: [DRNet in mindspore/models](https://gitee.com/mindspore/models/tree/master/research/cv/DRNet)).

## What is dynamic

- **Unit:** the input resolution of the classifier, one of a few candidates per image (the official
  ResNet-50 code: 224, 168 and 112 px).
- **Decided by:** a *resolution predictor*, a small ResNet (one basic block per stage, as in the
  official code) that sees a low-resolution view of the image (128 px there) and outputs one logit per
  candidate. The classifier keeps a private BatchNorm per candidate ("resolution-aware BN"; the
  switchable BatchNorm of `rs_nets`); its convolution and linear weights are shared.
- **When:** per image, before the classifier runs, in train and eval.
  - `train()`: a hard Gumbel-Softmax sample of the predictor's logits (one-hot forward, soft
    gradient); the classifier runs at every candidate and the outputs are combined with the one-hot
    sample, so the classification loss reaches the predictor. The FLOPs regularizer
    `loss_weight * (mean_n cost_n - budget)^2` (`losses.mac_budget_loss`) with
    `cost_n = sum_j g_{n,j} (r_j / r_max)^2`, the sampled fraction of the full-resolution MACs, is
    `aux_loss`.
  - `eval()`: the argmax resolution. Images are **grouped by resolution**: each group is resized once
    (bilinear) and the classifier runs once per non-empty group with that group's BatchNorms; the
    logits are written back in order. A candidate no image chose is never run (the official evaluation
    script runs every candidate and multiplies by the one-hot choice; here only the choice runs).

`info` holds `resolution_index (N,)`, `resolution (N,)` (pixels), `probs (N, R)` (predictor softmax),
`cost (N,)` (fraction of the full-resolution classifier MACs) and, in train mode, `aux_loss`. The
predictor (and the resize of its input) counts on the dynamic side.

## Operating point

- `budget` is the FLOPs target of training (fraction of the full-resolution MACs).
- Untrained, `resolution_mix` sets which fraction of images picks each candidate: in `build` a bias
  on the predictor's logits is calibrated on a fixed random calibration batch so that the argmax
  follows that mix (`None`: no bias, whatever the random predictor picks). The `paper` operating point
  uses a mix whose expected cost, predictor included, is the paper's ~34 % reduction of ResNet-50.
  With batch 1 the single image picks one candidate, so its MACs are one of the candidates' costs.
- `resolutions` sets the candidates; the baseline (`build_baseline`) is the same classifier with
  ordinary BatchNorms at the native size (the first candidate), without the predictor.

## Simplifications against the paper

- The default `Config` is a small CIFAR ResNet on 32x32 digits with candidates 32/24/16 and a 16 px
  predictor view; `arch` selects the ImageNet backbones, and the predictor width is a knob (the
  official predictor is 64 channels wide in its first stage).
- Classifier and predictor are trained jointly from scratch (the paper starts from a pretrained
  classifier); the exact form of the paper's FLOPs constraint is not confirmed here (we use the
  squared gap to the budget).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from implementations.common.gates import gumbel_softmax
from implementations.common.losses import mac_budget_loss
from implementations.common.resnet import BasicBlock, ResNet
from implementations.common.train import TrainSettings
from implementations.resolution.rs_nets import (
    ARCHS,
    macs_per_resolution,
    make_backbone,
    photo_batch,
    private_batchnorms,
    resize,
    resolution_grid,
)


@dataclass
class Config:
    arch: str = "cifar"  # cifar (CIFAR ResNet of `depth`, `width`) | resnet18 | resnet50 | mobilenet_v2
    depth: int = 8
    width: int = 8
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32  # native input size (the largest candidate)
    resolutions: tuple[int, ...] = (32, 24, 16)  # candidates, largest first (official code: 224, 168, 112)
    predictor_size: int = 16  # side of the predictor's view (official code: 128)
    predictor_width: int = 8  # first-stage channels of the predictor ResNet (official code: 64)
    budget: float = 0.6  # training target: fraction of the full-resolution MACs
    loss_weight: float = 4.0  # weight of the FLOPs regularizer
    tau: float = 1.0  # Gumbel-Softmax temperature
    resolution_mix: tuple[float, ...] | None = None  # untrained operating point: share of each candidate


TRAIN = TrainSettings(epochs=6, lr=3e-3, batch_size=64)


def _check(cfg: Config) -> None:
    if cfg.arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {cfg.arch!r}")
    res = tuple(cfg.resolutions)
    if not res or list(res) != sorted(set(res), reverse=True) or res[-1] < 8:
        raise ValueError(f"resolutions must be distinct sizes >= 8, largest first, got {res!r}")
    if res[0] != cfg.image_size:
        raise ValueError(f"resolutions must start at image_size={cfg.image_size}, got {res!r}")
    if not 0.0 < cfg.budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {cfg.budget!r}")
    mix = cfg.resolution_mix
    if mix is not None and (len(mix) != len(res) or min(mix) < 0 or abs(sum(mix) - 1.0) > 1e-6):
        raise ValueError(f"resolution_mix must hold {len(res)} non-negative shares summing to 1, got {mix!r}")
    if cfg.predictor_size < 8 or cfg.predictor_width < 1:
        raise ValueError(f"predictor_size must be >= 8 and predictor_width >= 1, got "
                         f"{cfg.predictor_size!r}, {cfg.predictor_width!r}")


def calibrate_bias(logits: Tensor, mix: Tensor, steps: int = 400) -> Tensor:
    """Bias `(R,)` such that `argmax(logits + bias)` picks candidate j for about `mix[j]` of the rows.

    `logits (M, R)`: predictor logits of a calibration batch. A price-adjustment (auction) loop: raise
    the bias of under-chosen candidates, lower the over-chosen ones, with a shrinking step.
    """
    scale = float(logits.std()) + 1e-6
    bias = torch.zeros_like(mix)
    best, best_err = bias.clone(), float("inf")
    for step in range(steps):
        share = torch.bincount((logits + bias).argmax(dim=1), minlength=len(mix)).float() / len(logits)
        err = float((share - mix).abs().sum())
        if err < best_err:
            best, best_err = bias.clone(), err
        bias = bias + scale * (mix - share) * 4.0 / (1 + step / 20)
    return best


class DRNet(nn.Module):
    """Resolution predictor + classifier with private BatchNorms per candidate; `forward -> (logits, info)`.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.resolutions = tuple(cfg.resolutions)
        self.net = make_backbone(cfg)
        self.switch = private_batchnorms(self.net, len(self.resolutions))
        self.predictor = ResNet(BasicBlock, (1, 1, 1, 1), len(self.resolutions), cfg.in_channels,
                                cfg.predictor_width)
        costs = torch.tensor([(r / self.resolutions[0]) ** 2 for r in self.resolutions])
        self.register_buffer("rel_cost", costs, persistent=False)
        self.register_buffer("logit_bias", torch.zeros(len(self.resolutions)))
        if cfg.resolution_mix is not None:
            self._calibrate(torch.tensor(cfg.resolution_mix))

    @torch.no_grad()
    def _calibrate(self, mix: Tensor, batch: int = 256) -> None:
        gen = torch.Generator().manual_seed(1234)
        cfg = self.cfg
        x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
        was_training = self.predictor.training
        self.predictor.eval()
        self.logit_bias.zero_()
        logits = self.predict(x)
        self.predictor.train(was_training)
        self.logit_bias.copy_(calibrate_bias(logits, mix))

    def predict(self, x: Tensor) -> Tensor:
        """`(N, C, H, W) -> (N, R)` resolution logits from the predictor's low-resolution view."""
        return self.predictor(resize(x, self.cfg.predictor_size, antialias=False)) + self.logit_bias

    def run_at(self, x: Tensor, j: int) -> Tensor:
        """Classifier logits of `x` resized to candidate `j`, with that candidate's BatchNorms."""
        self.switch.index = j
        return self.net(resize(x, self.resolutions[j], antialias=False))

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        logits = self.predict(x)
        if self.training:
            g = gumbel_softmax(logits, self.cfg.tau, hard=True, dim=1)  # (N, R) one-hot, soft gradient
            out = sum(g[:, j : j + 1] * self.run_at(x, j) for j in range(len(self.resolutions)))
            choice, cost = g.argmax(dim=1), (g * self.rel_cost).sum(dim=1)
            aux = self.cfg.loss_weight * mac_budget_loss(cost, 1.0, self.cfg.budget)
        else:
            choice = logits.argmax(dim=1)
            out, cost, aux = self._grouped(x, choice), self.rel_cost[choice], None
        pixels = torch.tensor(self.resolutions, device=x.device)[choice]
        info = {"resolution_index": choice, "resolution": pixels, "probs": torch.softmax(logits, dim=1),
                "cost": cost}
        if aux is not None:
            info["aux_loss"] = aux
        return out, info

    def _grouped(self, x: Tensor, choice: Tensor) -> Tensor:
        """Each non-empty resolution group is resized and classified once; `(N, K)` in input order."""
        out = None
        for j, count in enumerate(torch.bincount(choice, minlength=len(self.resolutions)).tolist()):
            if count == 0:
                continue
            if count == len(x):
                return self.run_at(x, j)
            rows = (choice == j).nonzero().flatten()
            y = self.run_at(x.index_select(0, rows), j)
            out = y.new_empty(len(x), y.shape[1]) if out is None else out
            out.index_copy_(0, rows, y)
        return out


class Baseline(nn.Module):
    """The plain classifier at the native size; parameter names as in `DRNet.net`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = make_backbone(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(x), {}


def build(cfg: Config | None = None) -> DRNet:
    cfg = cfg or Config()
    _check(cfg)
    return DRNet(cfg)


def build_baseline(cfg: Config | None = None) -> Baseline:
    cfg = cfg or Config()
    _check(cfg)
    return Baseline(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def summarize(info: dict) -> dict:
    """How many images chose each candidate and the classifier's executed fraction."""
    if "resolution_index" not in info:
        return {"resolution": "native"}
    counts = torch.bincount(info["resolution_index"], minlength=info["probs"].shape[1]).tolist()
    return {
        "images_per_resolution": " ".join(str(c) for c in counts),
        "classifier_mac_fraction": round(float(info["cost"].float().mean()), 4),
    }


FIGURE_CONFIG = Config(arch="resnet18", num_classes=1000, image_size=224, resolutions=(224, 168, 112),
                       predictor_size=128, predictor_width=16, resolution_mix=(0.3, 0.4, 0.3))


@torch.no_grad()
def decision_figure(cfg: Config | None = None):
    """The two real photos at every candidate resolution; the one the predictor chose is framed.

    Default: ResNet-18 with the official candidates 224/168/112 and the calibrated untrained predictor.
    """
    cfg = cfg or FIGURE_CONFIG
    torch.manual_seed(0)
    model = build(cfg).eval()
    photos, x = photo_batch(cfg)
    _, info = model(x)
    macs = macs_per_resolution(model.run_at, x, len(model.resolutions))
    chosen = info["resolution_index"].tolist()
    return resolution_grid(photos, model.resolutions, chosen, macs,
                           "DRNet: resolution chosen per image by the predictor (untrained unless loaded)",
                           antialias=False)
