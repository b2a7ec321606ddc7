"""# SACT: Spatially Adaptive Computation Time for Residual Networks

[Figurnov, Collins, Zhu, Zhang, Huang, Vetrov and Salakhutdinov, CVPR 2017](https://arxiv.org/abs/1612.02297)
(official TensorFlow code: [mfigurnov/sact](https://github.com/mfigurnov/sact)).

## What is dynamic

- **Unit:** the residual branch of a residual unit **at one spatial position**. Adaptive Computation
  Time runs separately at every position of every ResNet stage: a position that has halted is frozen
  (its features are copied through the later units of the stage) and the later units compute their
  residual only at the positions still running.
- **Decided by:** a halting unit after every residual unit but the last of a stage (as in the official
  `get_halting_proba_conv`): `h = sigmoid(conv3x3(BN(F)) + linear(BN(avg_pool(F))))`, a per-position
  logit from a 3x3 convolution with one output channel plus a per-image logit from the pooled
  features (the official code starts the bias at -3). A position halts after the first unit `N` where
  `h_1 + ... + h_N >= 1 - eps` (the last unit has `h = 1`). The stage output at each position is the
  halting-weighted mixture `sum_{l<N} h_l F_l + R F_N`, `R = 1 - sum_{l<N} h_l`.
- **When:** per position, at every stage, in train and eval. The first unit of a stage (which may
  change the resolution) runs everywhere.
  - `train()`: every unit runs densely and the residual is masked to the running positions (as the
    official code does); the ponder cost `tau * sum_stages mean_{n,i,j} (N + R)` is the `aux_loss`.
  - `eval()`: executed with `kernels.sparse_conv2d`. For a basic block the first 3x3 conv is computed
    at the running positions dilated by the second conv's 3x3 window (what the second conv reads),
    the second only at the running positions (for a bottleneck: the 1x1 reduce at the dilated set,
    the 3x3 and the 1x1 expand at the running set); BatchNorm is folded into the sparse convolutions,
    and the halting unit's 3x3 conv is also evaluated only at the running positions. A unit with no
    running position in the whole batch is not called. The kernel's `auto` path falls back to the
    dense convolution (counted dense) where the active fraction is above its break-even density.

`info` holds `units` (a list with one `(N, H_s, W_s)` map of executed units per position and stage:
the ponder maps), `ponder` (the same with `N + R`), `unit_rate` (executed fraction of the residual
units, each stage weighted equally, which is about the MAC fraction since every unit of a ResNet
costs about the same) and `aux_loss`.

## Operating point

- `tau` sets the trained compute (the released models: 0.01 on CIFAR-10, 0.005 on ImageNet); the
  released CIFAR-10 ResNet-32 SACT model runs about 41 M MACs (8.2e7 FLOPs) of the dense 69 M, i.e.
  about 0.6 of the dense MACs; the released ImageNet ResNet-101 about 0.71.
- Untrained models (what `catalog bench` measures): with `unit_rate_init` set, `build` gives the
  halting units' BatchNorms the statistics of a fixed calibration batch (photo crops) and bisects one
  shared halting bias so that about that fraction of the (position, unit) pairs of the stages runs;
  the random 3x3 halting conv keeps the decision input-dependent, so the ponder map varies over the
  image. Executed MACs grow monotonically with `unit_rate_init`. The entry's first operating point
  is ours: an ImageNet ResNet-50 (supported by the official code) at 224x224 with 60 % of the
  position-units; the second is the released CIFAR ResNet-32's fraction.
- `eps`: a position halts when its cumulative halting probability reaches `1 - eps` (0.01).

## Simplifications against the paper

- The catalog's post-activation ResNets (ReLU after the addition; CIFAR ResNets with option-A
  shortcuts, torchvision-layout ImageNet ResNets) instead of the pre-activation ResNets with leaky
  ReLU of the official code.
- The halting unit's 3x3 conv runs as nine 1x1 taps plus a shifted sum in eval (same values, same
  MACs per position, no im2col of the whole map).
- For the short digits run: halting bias -1 at init (official: -3), `tau` 0.1 and a 10x
  learning-rate multiplier on the halting units (`halting_lr_mult`, see `implementations/depth/act.py`).
- Untrained operating points are calibrated, not trained; `decision_figure` shows an untrained
  model's ponder map (input-dependent but not meaningful like a trained one's).
- `example_input` is a batch of crops of the two scikit-learn sample photos (real images), not noise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.fold import bn_affine, bn_tensors, cached, folded
from implementations.common.losses import ponder_cost
from implementations.common.resnet import BasicBlock, Bottleneck
from implementations.common.train import TrainSettings
from implementations.depth.act import (
    IMAGENET_DEPTHS,
    INIT_BIAS,
    backbone,
    calibrate,
    halting_step,
    normalize_photos,
    photo_batch,
    scale_down_,
)
from kernels.sparse_conv import sparse_conv2d

SACT_KERNEL_SIZE = 3  # the halting unit's local conv (official code)


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
    backend: str | None = None  # sparse_conv2d backend (None: $DYNNET_KERNEL_BACKEND or auto)


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


class SpatialHalting(nn.Module):
    """`(N, C, H, W) -> (N, H, W)` halting probabilities: local 3x3 conv logit + global logit, sigmoid.

    `local_conv` and `global_fc` are stored divided by `lr_mult` (`act.scale_down_`: a learning-rate
    multiplier); the logit is multiplied back."""

    def __init__(self, channels: int, bias: float = INIT_BIAS, lr_mult: float = 1.0) -> None:
        super().__init__()
        self.local_bn = nn.BatchNorm2d(channels)
        self.local_conv = nn.Conv2d(channels, 1, SACT_KERNEL_SIZE, padding=SACT_KERNEL_SIZE // 2)
        self.global_bn = nn.BatchNorm1d(channels)
        self.global_fc = nn.Linear(channels, 1, bias=False)  # the bias sits in the local logit
        self.lr_mult = lr_mult
        nn.init.constant_(self.local_conv.bias, bias)
        scale_down_(self.local_conv, lr_mult)
        scale_down_(self.global_fc, lr_mult)

    def global_logit(self, x: Tensor) -> Tensor:
        """`(N, C, H, W) -> (N, 1, 1, 1)`, before the `lr_mult` scale."""
        return self.global_fc(self.global_bn(x.mean(dim=(2, 3)))).view(-1, 1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.lr_mult * (self.local_conv(self.local_bn(x)) + self.global_logit(x))).squeeze(1)

    def set_bias(self, bias: float) -> None:
        with torch.no_grad():
            self.local_conv.bias.fill_(bias / self.lr_mult)

    def sparse(self, x: Tensor, read: Tensor, backend: str | None) -> Tensor:
        """Eval: the same, with the local 3x3 conv executed only where its windows read, `read (N, H, W)`.

        The 3x3 conv is run as nine 1x1 "tap" convolutions (BatchNorm folded in) at the `read`
        positions, `kernels.sparse_conv2d` with a `(9, C, 1, 1)` weight, followed by a shifted sum of
        the nine tap maps; exact at every position whose 3x3 window lies inside `read` (garbage
        elsewhere). Same MACs per position as the 3x3 conv, without an im2col of the whole map.
        """
        w, b = folded_taps(self.local_conv, self.local_bn)
        z = F.pad(sparse_conv2d(x, read, w, b, backend=backend), (1, 1, 1, 1))  # (N, 9, H + 2, W + 2)
        hh, ww = x.shape[-2:]
        local = self.local_conv.bias.view(1, 1, 1) + sum(
            z[:, 3 * ky + kx, ky : ky + hh, kx : kx + ww] for ky in range(3) for kx in range(3)
        )
        return torch.sigmoid(self.lr_mult * (local + self.global_logit(x).view(-1, 1, 1)))


# --------------------------------------------------------------------------------------------------
# Sparse residual branches (eval)


def folded_taps(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """`conv(bn(x))` (one output channel, 3x3) as nine 1x1 taps: weight `(9, C, 1, 1)`, bias `(9,)`."""

    def make() -> tuple[Tensor, Tensor]:
        scale, shift = bn_affine(bn)
        taps = conv.weight[0].permute(1, 2, 0).reshape(9, -1)  # row ky * 3 + kx
        return (taps * scale).view(9, -1, 1, 1), taps @ shift

    return cached(conv, (conv.weight, *bn_tensors(bn)), make)


def conv_bn_at(x: Tensor, mask: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, backend: str | None,
               residual: Tensor | None = None) -> Tensor:
    """`bn(conv(x))` at the `mask (N, H, W)` positions, exactly 0 elsewhere; plus `residual` if given
    (added by the kernel at the active positions of a copy of it)."""
    w, b = folded(conv, bn)
    return sparse_conv2d(x, mask, w, b, conv.stride, conv.padding, conv.dilation, conv.groups, backend=backend,
                         residual=residual)


def dilate(mask: Tensor, kernel: int) -> Tensor:
    """Positions a stride-1 `kernel x kernel` conv reads to produce the outputs in `mask (N, H, W)`."""
    if kernel == 1:
        return mask
    return F.max_pool2d(mask.unsqueeze(1).float(), kernel, stride=1, padding=kernel // 2).squeeze(1) > 0


def sparse_residual(block: nn.Module, x: Tensor, active: Tensor, read: Tensor, backend: str | None,
                    shortcut: Tensor | None = None) -> Tensor:
    """`block.residual(x)` at the `active (N, H, W)` positions, exactly 0 elsewhere (stride-1 units); plus
    `shortcut` if given (the last conv adds into a copy of it: the unit's add in the same pass).

    `read = dilate(active, 3)`: where the 3x3 conv's windows read, i.e. where the conv before it runs.
    """
    if block.conv2.kernel_size != (3, 3) or block.conv2.stride != (1, 1):
        raise ValueError("sparse_residual: expects a stride-1 unit with a 3x3 conv2")
    if isinstance(block, BasicBlock):
        r = F.relu_(conv_bn_at(x, read, block.conv1, block.bn1, backend))
        return conv_bn_at(r, active, block.conv2, block.bn2, backend, shortcut)
    if isinstance(block, Bottleneck):
        r = F.relu_(conv_bn_at(x, read, block.conv1, block.bn1, backend))
        r = F.relu_(conv_bn_at(r, active, block.conv2, block.bn2, backend))
        return conv_bn_at(r, active, block.conv3, block.bn3, backend, shortcut)
    raise TypeError(f"sparse_residual: unsupported block {type(block).__name__}")


# --------------------------------------------------------------------------------------------------
# The model


class SACTResNet(nn.Module):
    """ResNet with spatially adaptive computation time in every stage; `forward(x) -> (logits, info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = backbone(cfg)  # type: ignore[arg-type]
        self.halting = nn.ModuleList(
            nn.ModuleList(SpatialHalting(stage[0].out_channels, cfg.halting_bias, cfg.halting_lr_mult) for _ in range(len(stage) - 1))
            for stage in self.net.stages
        )

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self._forward(x, masked=self.training)

    def masked_forward(self, x: Tensor) -> tuple[Tensor, dict]:
        """The training relaxation (every unit dense, residuals masked); the eval path's test oracle."""
        return self._forward(x, masked=True)

    def _forward(self, x: Tensor, masked: bool) -> tuple[Tensor, dict]:
        h = self.net.stem(x)
        units, rems = [], []
        for stage, heads in zip(self.net.stages, self.halting, strict=True):
            h, n_units, rem = self._stage(list(stage), heads, h, masked)
            units.append(n_units)
            rems.append(rem)
        rates = [u.float().mean() / len(s) for u, s in zip(units, self.net.stages, strict=True)]
        info = {
            "units": units,
            "ponder": [(u.to(r.dtype) + r).detach() for u, r in zip(units, rems, strict=True)],
            "unit_rate": torch.stack(rates).mean(),
            "aux_loss": self.cfg.tau * sum(ponder_cost(u.flatten(), r.flatten()) for u, r in zip(units, rems, strict=True)),
        }
        return self.net.head(h), info

    def _stage(self, units: list[nn.Module], heads: nn.ModuleList, x: Tensor, masked: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
        """SACT over one stage: `x (N, C, H, W)` -> output, units per position `(N, H', W')`, remainders."""
        x = units[0](x)  # the first unit runs everywhere (it may change the resolution)
        n, _, hh, ww = x.shape
        cum, rem = x.new_zeros(n, hh, ww), x.new_zeros(n, hh, ww)
        active = torch.ones(n, hh, ww, dtype=torch.bool, device=x.device)
        n_units = torch.zeros(n, hh, ww, dtype=torch.long, device=x.device)
        out = torch.zeros_like(x)
        for k, unit in enumerate(units):
            if k > 0:
                if not masked and not bool(active.any()):  # every position halted: unit never called
                    break
                if masked:  # halted positions are copied
                    x = torch.where(active.unsqueeze(1), F.relu(x + unit.residual(x)), x)
                else:  # the residual is exactly 0 at halted positions and x >= 0 (a ReLU output or a
                    # convex mix of them), so relu(x + residual) copies them: no select needed
                    read = dilate(active, 3)
                    x = sparse_residual(unit, x, active, read, self.cfg.backend, shortcut=x).relu_()
            last = k == len(units) - 1
            if last:
                h = x.new_ones(n, hh, ww)
            elif masked:
                h = heads[k](x)
            else:
                h = heads[k].sparse(x, active if k == 0 else read, self.cfg.backend)
            p, halt, cum_next = halting_step(cum, h, self.cfg.eps, last)
            p = torch.where(active, p, torch.zeros_like(p))
            out.addcmul_(p.unsqueeze(1), x)
            n_units += active
            rem = torch.where(active & halt, p, rem)
            active, cum = active & ~halt, cum_next
        return out, n_units, rem

    def set_halting_bias(self, bias: float) -> None:
        with torch.no_grad():
            for heads in self.halting:
                for head in heads:
                    head.set_bias(bias)


class DenseResNet(nn.Module):
    """The same ResNet with every unit executed at every position; parameters under `net.`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = backbone(cfg)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(x), {}


def build(cfg: Config | None = None) -> SACTResNet:
    cfg = cfg or Config()
    _check(cfg)
    model = SACTResNet(cfg)
    if cfg.unit_rate_init is not None:
        norms = [bn for heads in model.halting for head in heads for bn in (head.local_bn, head.global_bn)]
        # the relaxed path takes the same decisions and is cheaper for the 14 bisection steps
        calibrate(model, cfg, lambda x: float(model.masked_forward(x)[1]["unit_rate"]), cfg.unit_rate_init, norms)
    return model


def build_baseline(cfg: Config | None = None) -> DenseResNet:
    cfg = cfg or Config()
    _check(cfg)
    return DenseResNet(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    return photo_batch(batch_size, cfg.image_size, cfg.in_channels, seed=0)


def summarize(info: dict) -> dict:
    """Executed fraction of the (position, unit) pairs and the mean ponder map value per stage."""
    if "units" not in info:
        return {"executed_units": 1.0}
    return {
        "executed_units": round(float(info["unit_rate"]), 4),
        "mean_units_per_position": " ".join(f"{float(u.float().mean()):.2f}" for u in info["units"]),
        "mean_ponder_cost": round(sum(float(p.mean()) for p in info["ponder"]), 4),
    }


def decision_figure(cfg: Config | None = None, size: int | None = None) -> Any:
    """Ponder maps of the model at `cfg`'s operating point on the scikit-learn temple photo.

    The model is built (and calibrated) at `size x size`: by default `cfg.image_size`, or 160 for
    inputs smaller than 96 (the ResNets are fully convolutional, so a CIFAR model runs on a larger
    photo). Returns a matplotlib Figure: the photo, then the per-position number of executed units of
    every stage over it.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from implementations.common.data import sample_photos  # noqa: PLC0415

    cfg = cfg or Config(unit_rate_init=0.6)
    size = size or (cfg.image_size if cfg.image_size >= 96 else 160)
    cfg = dataclasses.replace(cfg, image_size=size)
    torch.manual_seed(0)
    model = build(cfg).eval()
    photo = sample_photos(size)[:1]
    x = normalize_photos(photo, cfg.in_channels)
    with torch.no_grad():
        _, info = model(x)
    maps = info["units"]
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(3.2 * (len(maps) + 1), 3.4))
    axes[0].imshow(photo[0].permute(1, 2, 0).numpy())
    axes[0].set_title("input")
    for s, (ax, units) in enumerate(zip(axes[1:], maps, strict=True)):
        n_max = len(model.net.stages[s])
        ax.imshow(photo[0].permute(1, 2, 0).numpy())
        im = ax.imshow(units[0].float().numpy(), cmap="viridis", alpha=0.65, vmin=1, vmax=n_max,
                       extent=(-0.5, size - 0.5, size - 0.5, -0.5), interpolation="nearest")
        ax.set_title(f"stage {s + 1}: units run (1-{n_max})")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"SACT ponder maps (untrained, executed fraction {float(info['unit_rate']):.2f})")
    fig.tight_layout()
    return fig
