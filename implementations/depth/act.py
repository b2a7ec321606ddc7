"""# ACT: Adaptive Computation Time, applied to the residual units of a ResNet

[Graves, arXiv 2016](https://arxiv.org/abs/1603.08983) (unofficial PyTorch code for the RNN version:
[zphang/adaptive-computation-time-pytorch](https://github.com/zphang/adaptive-computation-time-pytorch)).
The paper is about recurrent networks; this is ACT applied to a CNN the way Figurnov et al. use it as
the "ACT" baseline of [SACT (CVPR 2017)](https://arxiv.org/abs/1612.02297) (official TensorFlow code:
[mfigurnov/sact](https://github.com/mfigurnov/sact), `act.py`, `resnet_act.py`): the residual units of
every ResNet stage are the "ponder steps" of one ACT module.

## What is dynamic

- **Unit:** a residual unit of a ResNet stage (a whole unit: its convolutions and its shortcut). The
  first unit of a stage always runs; the later ones run only until the sample halts.
- **Decided by:** a halting unit after every residual unit but the last of a stage: global average
  pool -> BatchNorm -> linear -> sigmoid gives `h_l` in (0, 1). A sample halts after the first unit
  `N` where `h_1 + ... + h_N >= 1 - eps` (the last unit has `h = 1`, so every sample halts there at
  the latest). The stage's output is the halting-weighted mixture of the unit outputs,
  `sum_{l<N} h_l F_l + R F_N` with the remainder `R = 1 - sum_{l<N} h_l`.
- **When:** per sample, at every stage, in train and eval.
  - `train()`: the relaxation of the paper: every unit runs on every sample (as in the official
    `adaptive_computation_time_wrapper`), halted samples get weight 0 in the mixture, and the ponder
    cost `tau * sum_stages mean_n (N_n + R_n)` is returned as `aux_loss` (its gradient flows through
    the remainders `R`, which push the halting units up).
  - `eval()`: the same decisions, executed: a sample that halts **leaves the batch**, the later
    units of the stage run only on the samples still pondering (gathered rows), and a unit that no
    sample needs is never called. The mixture is accumulated per sample as the units run.

`info` holds `units (S, N)` (units executed per stage and sample), `ponder (S, N)` (`N + R`),
`unit_rate` (executed fraction of all residual units) and `aux_loss`. The halting units' MACs count
on the dynamic side.

## Operating point

- `tau` (ponder cost weight) moves the trained compute: larger `tau`, fewer units.
- `eps`: a sample halts when its cumulative halting probability reaches `1 - eps` (0.01 in ACT
  and SACT); a larger `eps` halts earlier.
- Untrained models (what `catalog bench` measures): with `unit_rate_init` set, `build` gives the
  halting units' BatchNorms the statistics of a fixed calibration batch (photo crops, not the measured
  input), as a trained network's would hold, and bisects one shared halting bias so that about that
  fraction of the residual units runs on that batch. The halting units' input-dependent part keeps its
  random init, so samples still halt after different numbers of units. Executed MACs grow
  monotonically with `unit_rate_init`. The entry's first operating point is ours: an ImageNet
  ResNet-50 at 224x224 with 60 % of the units (SACT's ImageNet ACT models are ResNet-101s; a
  ResNet-50 keeps a dense batch of 8 within the CPU time budget).
- Without `unit_rate_init` the halting bias starts at `halting_bias`.

## Simplifications against the paper

- ACT was defined for RNN steps; here the steps are the (distinct, not weight-shared) residual units
  of a stage, as in SACT's ACT baseline. No vision numbers exist in the ACT paper.
- Our backbone is the catalog's post-activation ResNet (ReLU after the addition) instead of the
  pre-activation ResNet of the SACT code.
- For the short digits run (about 100 steps instead of 100k): the halting bias starts at -1 instead
  of the SACT code's -3, `tau` is 0.1 instead of 0.01, and the halting units learn 10x faster
  (`halting_lr_mult`: their parameters are stored divided by 10 and the logit is multiplied by 10,
  which is a learning-rate multiplier under Adam and changes nothing else).
- `example_input` is a batch of crops of the two scikit-learn sample photos (real images, so the
  halting units see input-dependent features), not random noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.losses import ponder_cost
from implementations.common.resnet import BasicBlock, Bottleneck, ResNet, cifar_resnet
from implementations.common.train import TrainSettings

INIT_BIAS = -3.0  # official SACT code (resnet_act.py): every halting unit's bias starts here
_IMAGENET_LAYERS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
                    50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}
IMAGENET_DEPTHS = tuple(sorted(_IMAGENET_LAYERS))
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Config:
    arch: str = "cifar"  # "cifar": CIFAR ResNet 6n+2 (three stages); "imagenet": ResNet-18/34/50/101
    depth: int = 20  # cifar: 6n+2, n units per stage; imagenet: 18, 34, 50 or 101
    width: int = 16  # channels of the first stage (64 for the ImageNet ResNets)
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    eps: float = 0.01  # halt when the cumulative halting probability reaches 1 - eps
    tau: float = 0.1  # ponder cost weight (official SACT runs: 0.01 CIFAR, 0.005 ImageNet; ours for ~100 steps)
    halting_bias: float = -1.0  # initial halting bias (official code: INIT_BIAS = -3, for 100k-step runs)
    unit_rate_init: float | None = None  # untrained operating point: calibrate the bias to run this fraction
    halting_lr_mult: float = 10.0  # learning-rate multiplier of the halting units (short digits runs)


TRAIN = TrainSettings(epochs=4, lr=3e-3, batch_size=64)


def _check(cfg: Config) -> None:
    if cfg.arch not in ("cifar", "imagenet"):
        raise ValueError(f"arch must be 'cifar' or 'imagenet', got {cfg.arch!r}")
    if cfg.arch == "imagenet" and cfg.depth not in IMAGENET_DEPTHS:
        raise ValueError(f"depth must be one of {IMAGENET_DEPTHS} for arch 'imagenet', got {cfg.depth!r}")
    if not 0.0 <= cfg.eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {cfg.eps!r}")
    if not cfg.tau >= 0:
        raise ValueError(f"tau must be >= 0, got {cfg.tau!r}")
    if not cfg.halting_lr_mult > 0:
        raise ValueError(f"halting_lr_mult must be > 0, got {cfg.halting_lr_mult!r}")
    if cfg.unit_rate_init is not None and not 0.0 < cfg.unit_rate_init <= 1.0:
        raise ValueError(f"unit_rate_init must be None or in (0, 1], got {cfg.unit_rate_init!r}")


def backbone(cfg: Config) -> nn.Module:
    """The ResNet the method runs on: `stem`, `stages` of residual units, `head` (common/resnet.py)."""
    if cfg.arch == "cifar":
        return cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width)
    block, layers = _IMAGENET_LAYERS[cfg.depth]
    return ResNet(block, layers, cfg.num_classes, cfg.in_channels, cfg.width)


# --------------------------------------------------------------------------------------------------
# ACT bookkeeping (shared with iamnn and sact)


def halting_step(cum: Tensor, h: Tensor, eps: float, last: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One ACT step for elements (samples or positions) that are still running.

    Args:
        cum: `(*)` sum of the halting probabilities of the earlier steps.
        h: `(*)` this step's halting probability (ignored, i.e. 1, at the `last` step).
    Returns:
        `p (*)`: weight of this step's state in the output (`h`, or the remainder `1 - cum` where the
        element halts now); `halt (*)` bool; `cum + h`.
    """
    new = cum + h
    halt = torch.ones_like(new, dtype=torch.bool) if last else new >= 1 - eps
    return torch.where(halt, 1 - cum, h), halt, new


@torch.no_grad()
def calibrate_bias(set_bias: Callable[[float], None], rate: Callable[[], float], target: float,
                   lo: float = -12.0, hi: float = 12.0, steps: int = 14) -> float:
    """Bisection on one halting bias so that `rate()` (non-increasing in the bias) comes closest to `target`.

    Returns the bias it leaves set (the best one seen).
    """
    best = (float("inf"), lo)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        set_bias(mid)
        r = rate()
        best = min(best, (abs(r - target), mid))
        if r > target:
            lo = mid
        else:
            hi = mid
    set_bias(best[1])
    return best[1]


@lru_cache(maxsize=1)
def _photos() -> Tensor:
    from implementations.common.data import sample_photos  # noqa: PLC0415 - sklearn only when used

    return sample_photos()


def photo_batch(batch_size: int, image_size: int, in_channels: int = 3, seed: int = 0) -> Tensor:
    """`(B, C, S, S)` random crops (scale 0.35-1 of the shorter side, random flip) of the two sample
    photos, normalized with the ImageNet mean and std; deterministic in `seed` (a fresh copy each call)."""
    return _photo_batch(batch_size, image_size, in_channels, seed).clone()


@lru_cache(maxsize=16)
def _photo_batch(batch_size: int, image_size: int, in_channels: int, seed: int) -> Tensor:
    photos = _photos()
    gen = torch.Generator().manual_seed(seed)
    h, w = photos.shape[-2:]
    out = []
    for i in range(batch_size):
        side = int(min(h, w) * (0.35 + 0.65 * float(torch.rand((), generator=gen))))
        top = int(torch.randint(0, h - side + 1, (), generator=gen))
        left = int(torch.randint(0, w - side + 1, (), generator=gen))
        crop = photos[i % 2 : i % 2 + 1, :, top : top + side, left : left + side]
        if bool(torch.rand((), generator=gen) < 0.5):
            crop = crop.flip(-1)
        out.append(F.interpolate(crop, size=(image_size, image_size), mode="bilinear", antialias=True,
                                 align_corners=False))
    return normalize_photos(torch.cat(out), in_channels)


def normalize_photos(photos: Tensor, in_channels: int = 3) -> Tensor:
    """`(B, 3, H, W)` in [0, 1] -> ImageNet-normalized `(B, in_channels, H, W)` (grey when not 3)."""
    x = (photos - torch.tensor(_MEAN).view(1, 3, 1, 1)) / torch.tensor(_STD).view(1, 3, 1, 1)
    if in_channels != 3:
        x = x.mean(dim=1, keepdim=True).expand(-1, in_channels, -1, -1)
    return x.contiguous()


# --------------------------------------------------------------------------------------------------
# The model


def scale_down_(module: nn.Module, mult: float) -> None:
    """Divide `module`'s parameters by `mult`; its user multiplies the output back by `mult`.

    The function is unchanged at init, but Adam (whose steps do not depend on the gradient's scale)
    now moves the effective parameters `mult` times faster: a learning-rate multiplier.
    """
    with torch.no_grad():
        for p in module.parameters():
            p.div_(mult)


class HaltingUnit(nn.Module):
    """ACT halting unit of the SACT code: `(N, C, H, W) -> (N,)` = sigmoid(linear(BN(avg_pool(x)))).

    The linear layer is stored divided by `lr_mult` (see `scale_down_`)."""

    def __init__(self, channels: int, bias: float = INIT_BIAS, lr_mult: float = 1.0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)
        self.fc = nn.Linear(channels, 1)
        self.lr_mult = lr_mult
        nn.init.constant_(self.fc.bias, bias)
        scale_down_(self.fc, lr_mult)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.lr_mult * self.fc(self.bn(x.mean(dim=(2, 3)))).squeeze(1))

    def set_bias(self, bias: float) -> None:
        with torch.no_grad():
            self.fc.bias.fill_(bias / self.lr_mult)


Step = Callable[[Tensor], Tensor]


def act_stage_masked(units: Sequence[Step], heads: Sequence[Step], x: Tensor, eps: float
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """ACT over a stage, relaxed: every unit runs on every sample, halted samples get weight 0.

    `units[k]`: `(N, C, H, W) -> (N, C', H', W')`; `heads[k]`: `(N, C', H', W') -> (N,)` halting
    probability after unit `k` (one fewer than `units`). Returns the output `(N, C', H', W')`, the
    units run `(N,)` long and the remainders `R (N,)`.
    """
    n = len(x)
    cum, rem = x.new_zeros(n), x.new_zeros(n)
    running = torch.ones(n, dtype=torch.bool, device=x.device)
    n_units = torch.zeros(n, dtype=torch.long, device=x.device)
    out: Tensor | float = 0.0
    for k, unit in enumerate(units):
        x = unit(x)
        last = k == len(units) - 1
        p, halt, cum_next = halting_step(cum, x.new_ones(n) if last else heads[k](x), eps, last)
        p = torch.where(running, p, torch.zeros_like(p))
        out = out + p.view(-1, 1, 1, 1) * x
        n_units += running
        rem = torch.where(running & halt, p, rem)
        running, cum = running & ~halt, cum_next
    assert isinstance(out, Tensor)
    return out, n_units, rem


def act_stage_eval(units: Sequence[Step], heads: Sequence[Step], x: Tensor, eps: float
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """ACT over a stage, executed: halted samples leave the batch; same arguments and returns as
    `act_stage_masked`.

    The mixture is accumulated in `acc`, whose rows follow the running samples (in place, no
    temporary); a sample's row is written to the output when it halts.
    """
    n, n_max = len(x), len(units)
    rows: Tensor | None = None  # original row of each sample still running (None: all, in order)
    cum, rem = x.new_zeros(n), x.new_zeros(n)
    n_units = torch.full((n,), n_max, dtype=torch.long, device=x.device)
    acc: Tensor | None = None
    out: Tensor | None = None
    for k, unit in enumerate(units):
        x = unit(x)
        last = k == n_max - 1
        p, halt, cum = halting_step(cum, x.new_ones(len(x)) if last else heads[k](x), eps, last)
        weight = p.view(-1, 1, 1, 1)
        acc = weight * x if acc is None else acc.addcmul_(weight, x)
        if last:
            rem[rows if rows is not None else slice(None)] = p
            break
        if not bool(halt.any()):
            continue
        gone, stay = halt.nonzero().flatten(), (~halt).nonzero().flatten()
        gone_rows = gone if rows is None else rows[gone]
        rem[gone_rows], n_units[gone_rows] = p[gone], k + 1
        if out is None:
            out = acc.new_empty(n, *acc.shape[1:])
        out.index_copy_(0, gone_rows, acc.index_select(0, gone))
        if stay.numel() == 0:  # everyone halted: the later units are never called
            acc = None
            break
        rows = stay if rows is None else rows[stay]
        x, cum, acc = x.index_select(0, stay), cum[stay], acc.index_select(0, stay)
    if acc is not None:  # the samples that ran to the last unit
        if rows is None:
            return acc, n_units, rem
        assert out is not None
        out.index_copy_(0, rows, acc)
    assert out is not None
    return out, n_units, rem


class ACTResNet(nn.Module):
    """ResNet with ACT over the residual units of every stage; `forward(x) -> (logits (N, K), info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = backbone(cfg)
        self.halting = nn.ModuleList(
            nn.ModuleList(HaltingUnit(stage[0].out_channels, cfg.halting_bias, cfg.halting_lr_mult) for _ in range(len(stage) - 1))
            for stage in self.net.stages
        )

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self._forward(x, masked=self.training)

    def masked_forward(self, x: Tensor) -> tuple[Tensor, dict]:
        """The training relaxation (every unit on every sample, masked); the eval path's test oracle."""
        return self._forward(x, masked=True)

    def _forward(self, x: Tensor, masked: bool) -> tuple[Tensor, dict]:
        stage_fn = act_stage_masked if masked else act_stage_eval
        h = self.net.stem(x)
        units, ponders = [], []
        for stage, heads in zip(self.net.stages, self.halting, strict=True):
            h, n_units, rem = stage_fn(list(stage), heads, h, self.cfg.eps)
            units.append(n_units)
            ponders.append(n_units.to(rem.dtype) + rem)
        units_t = torch.stack(units)
        total_units = sum(len(s) for s in self.net.stages)
        info = {
            "units": units_t,
            "ponder": torch.stack(ponders).detach(),
            "unit_rate": (units_t.sum(0).float() / total_units).mean(),
            "aux_loss": self.cfg.tau * sum(ponder_cost(u, r) for u, r in zip(units, ponders, strict=True)),
        }
        return self.net.head(h), info

    def set_halting_bias(self, bias: float) -> None:
        with torch.no_grad():
            for heads in self.halting:
                for head in heads:
                    head.set_bias(bias)


class DenseResNet(nn.Module):
    """The same ResNet with every unit executed; parameters under `net.` as in `ACTResNet`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = backbone(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(x), {}


@torch.no_grad()
def estimate_norm_stats(model: nn.Module, x: Tensor, norms: Sequence[nn.Module]) -> None:
    """Set the running statistics of the BatchNorms `norms` to their statistics on `x`.

    One relaxed forward (`model.masked_forward`, every unit on every sample) with only those norms in
    train mode and cumulative averaging; everything else stays in eval mode.
    """
    model.eval()
    saved = []
    for bn in norms:
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        saved.append(bn.momentum)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch gives exactly its statistics
        bn.train()
    model.masked_forward(x)
    for bn, momentum in zip(norms, saved, strict=True):
        bn.momentum = momentum
        bn.eval()


def calibrate(model: nn.Module, cfg: Any, rate: Callable[[Tensor], float], target: float,
              norms: Sequence[nn.Module], batch_size: int = 8) -> float:
    """Untrained operating point on a fixed batch of photo crops (`cfg.image_size`, `cfg.in_channels`).

    First the halting units' BatchNorms (`norms`) get the batch's statistics (as a trained network's
    would hold, so the halting logits vary with the input by O(1)); then one shared halting bias
    (`model.set_halting_bias`) is bisected so that `rate(x)` (the executed fraction of the eval path
    on the batch) comes closest to `target`. Returns the bias.
    """
    x = photo_batch(batch_size, cfg.image_size, cfg.in_channels, seed=1234)
    was_training = model.training
    estimate_norm_stats(model, x, norms)
    with torch.no_grad():
        bias = calibrate_bias(model.set_halting_bias, lambda: rate(x), target)
    model.train(was_training)
    return bias


def build(cfg: Config | None = None) -> ACTResNet:
    cfg = cfg or Config()
    _check(cfg)
    model = ACTResNet(cfg)
    if cfg.unit_rate_init is not None:
        norms = [head.bn for heads in model.halting for head in heads]
        calibrate(model, cfg, lambda x: float(model(x)[1]["unit_rate"]), cfg.unit_rate_init, norms)
    return model


def build_baseline(cfg: Config | None = None) -> DenseResNet:
    cfg = cfg or Config()
    _check(cfg)
    return DenseResNet(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    return photo_batch(batch_size, cfg.image_size, cfg.in_channels, seed=0)


def summarize(info: dict) -> dict:
    """Executed fraction of the residual units, units per stage and the ponder cost."""
    if "units" not in info:
        return {"executed_units": 1.0}
    units = info["units"].float()
    return {
        "executed_units": round(float(info["unit_rate"]), 4),
        "mean_units_per_stage": " ".join(f"{u:.2f}" for u in units.mean(dim=1).tolist()),
        "mean_ponder_cost": round(float(info["ponder"].sum(0).mean()), 4),
    }
