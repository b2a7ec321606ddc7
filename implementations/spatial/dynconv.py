"""# DynConv: Dynamic Convolutions, exploiting spatial sparsity for faster inference

[Verelst and Tuytelaars, CVPR 2020](https://openaccess.thecvf.com/content_CVPR_2020/html/Verelst_Dynamic_Convolutions_Exploiting_Spatial_Sparsity_for_Faster_Inference_CVPR_2020_paper.html)
([arXiv 1912.03203](https://arxiv.org/abs/1912.03203), official code:
[thomasverelst/dynconv](https://github.com/thomasverelst/dynconv)).

## What is dynamic

- **Unit:** the output pixels of the residual branch of every residual block (the shortcut always runs,
  densely). Where a pixel is off, the block passes its shortcut through.
- **Decided by:** a mask unit per block, computed from the block's input: a 3x3 convolution to one
  channel (with the block's stride, so the mask has the block's output resolution) plus a linear layer
  on the globally pooled input (the paper's "squeeze" unit), giving one logit per output pixel.
- **When:** per sample and per pixel, at every block, in train and eval.
  - `train()`: a Gumbel-sigmoid sample of every logit, hard 0/1 forward and soft gradient
    (straight-through Gumbel-Softmax, temperature `tau`; see below for the noise schedule); the
    branch output is multiplied by the mask.
    `aux_loss` is the paper's sparsity criterion: `loss_weight * (network + block)` where network
    `= (executed / total conditional MACs - budget)^2`, counting the first conv of a branch on the
    dilated mask and the others on the mask, and block `= mean over blocks of the squared distance of
    each block's MAC fraction to [lower, upper]`, bounds that start at the budget and widen to [0, 1]
    over `anneal_steps` training steps (cosine schedule, as in the official code).
  - `eval()`: a pixel is on where its logit is `>= 0` (no noise). The branch runs **only there**, with
    `kernels.sparse_conv2d` (dense input, output only at a pixel set): the convs before the last 3x3
    run on the set of pixels that 3x3 reads (the mask dilated by its receptive field, strided where
    the 3x3 has a stride), the last 3x3 and every conv after it on the mask itself. Each BatchNorm is
    folded into its conv (eval statistics: scaled weight, shift as bias; cached until they change), so
    it applies at the computed pixels only, the kernel's output being exactly 0 elsewhere;
    activations stay element-wise on the dense tensors. A block with no active pixel in the batch is
    not called at all. The kernel always takes its sparse path (`cpu`, or `triton` on CUDA), never its
    `auto` dense fallback, unless `backend` or `$DYNNET_KERNEL_BACKEND` asks otherwise. The branch is
    0 outside the mask, so shortcut plus branch is one add, like the dense network's. Both networks run
    in channels_last memory (`channels_last`), as the paper's CUDA kernels do.

`info` holds `masks` (one `(N, H_b, W_b)` per gated block: bool in eval, straight-through 0/1 floats in
train), `density` (fraction of active pixels per block), `cost_fraction` (executed share of the
conditional MACs, dilation included, as the paper counts it) and `aux_loss`.

## Operating point

- `budget` is the paper's sparsity target: the fraction of the branches' MACs to execute (the official
  code's `--budget`; CIFAR ResNet-32 at 0.3/0.5/0.7, ImageNet ResNet-101 at 0.3-0.8, pose at 0.125-0.5).
  Training drives the criterion to it.
- Without training, `build` calibrates it: on a fixed batch of real photo crops (the two photos of
  `sample_photos()`, not the measured batch) it sets each mask unit's bias so that the block executes
  `budget` of its branch MACs (dilated first convs included), block by block in order. An untrained
  model then runs about that fraction, and executed MACs grow monotonically with `budget`; `budget=1`
  opens every pixel. `calibrate=False` keeps the random initialization instead.
- `arch` picks the backbone: `cifar` (CIFAR ResNet `depth`, basic blocks, 1x1-projection shortcuts as
  in the official code), `resnet50` / `resnet101` (ImageNet bottlenecks, stride on the 3x3), or
  `mobilenet_v2` (masks on the ten inverted residuals with an identity shortcut, since a pixel can only
  be skipped where a shortcut carries it; the other seven blocks, the stem and the head stay dense).

## Simplifications against the paper

- Eval runs the shared dense-input sparse-output conv kernel for every conv of a branch (BatchNorm
  folded into it), with the activation element-wise on the dense map in between; the official CUDA
  path instead keeps gathered rows through the whole MobileNetV2 branch and fuses BN/ReLU into them.
  The dense baseline keeps PyTorch's separate eval BatchNorm.
- The default model is a small CIFAR ResNet on 32x32 digits; the bound annealing counts optimizer
  steps (`anneal_steps`) instead of a third of the epochs.
- For short runs the Gumbel noise fades to zero over `noise_steps` optimizer steps, so that the last
  steps train (and the criterion counts) the noise-free masks that eval executes; the paper keeps the
  noise and trains for hundreds of epochs. `noise_steps=None` keeps it constant.
- The untrained operating point comes from calibrated mask biases, not from a trained mask unit, so
  the masks follow random features rather than the objects.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.data import sample_photos
from implementations.common.fold import folded
from implementations.common.gates import gumbel_sigmoid
from implementations.common.mobilenet import InvertedResidual, mobilenet_v2
from implementations.common.resnet import BasicBlock, Bottleneck, ResNet, cifar_resnet, resnet50
from implementations.common.train import TrainSettings
from kernels import _backend
from kernels.sparse_conv import sparse_conv2d

ARCHS = ("cifar", "resnet50", "resnet101", "mobilenet_v2")
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics for the photos


@dataclass
class Config:
    arch: str = "cifar"  # cifar | resnet50 | resnet101 | mobilenet_v2
    depth: int = 14  # cifar only: 6n+2
    width: int | None = None  # cifar: first-stage width (16); resnet: stem width (64); None: those
    width_mult: float = 1.0  # mobilenet_v2 only
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    budget: float = 0.5  # sparsity target: executed fraction of the branches' MACs
    calibrate: bool = True  # set the mask biases at build so an untrained model executes `budget`
    loss_weight: float = 10.0  # weight of the sparsity criterion
    tau: float = 1.0  # Gumbel temperature
    anneal_steps: int = 30  # optimizer steps over which the per-block bounds widen to [0, 1]
    noise_steps: int | None = 70  # steps over which the Gumbel noise fades to 0 (None: constant, paper)
    backend: str | None = None  # kernel backend (None: $DYNNET_KERNEL_BACKEND, else the sparse path)
    channels_last: bool = True  # both networks run in NHWC memory (the kernel gathers whole pixel rows)


TRAIN = TrainSettings(epochs=5, lr=3e-3, batch_size=64)


def _check(cfg: Config) -> None:
    if cfg.arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {cfg.arch!r}")
    if not 0.0 < cfg.budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {cfg.budget!r}")
    if not cfg.tau > 0:
        raise ValueError(f"tau must be > 0, got {cfg.tau!r}")
    if cfg.anneal_steps < 0:
        raise ValueError(f"anneal_steps must be >= 0, got {cfg.anneal_steps!r}")


# ---------------------------------------------------------------- backbone and branch structure


def backbone(cfg: Config) -> nn.Module:
    """The dense network: `stem`, gated/ungated `blocks`, `head`."""
    if cfg.arch == "cifar":
        return cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width or 16, shortcut="B")
    if cfg.arch == "resnet50":
        return resnet50(cfg.num_classes, cfg.in_channels, cfg.width or 64)
    if cfg.arch == "resnet101":
        return ResNet(Bottleneck, (3, 4, 23, 3), cfg.num_classes, cfg.in_channels, cfg.width or 64)
    return mobilenet_v2(cfg.num_classes, cfg.width_mult, cfg.in_channels)


def blocks_of(net: nn.Module) -> list[nn.Module]:
    return list(net.blocks) if isinstance(net.blocks, tuple) else list(net.blocks())


def is_gated(block: nn.Module) -> bool:
    """Blocks with a shortcut to fall back on: every ResNet block, MobileNetV2's identity blocks."""
    return not isinstance(block, InvertedResidual) or block.use_res_connect


Stage = tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module | None]


def branch_stages(block: nn.Module) -> list[Stage]:
    """The residual branch as `(conv, bn, activation or None)` stages, in order."""
    if isinstance(block, BasicBlock):
        return [(block.conv1, block.bn1, block.relu), (block.conv2, block.bn2, None)]
    if isinstance(block, Bottleneck):
        return [(block.conv1, block.bn1, block.relu), (block.conv2, block.bn2, block.relu),
                (block.conv3, block.bn3, None)]
    if isinstance(block, InvertedResidual):
        layers = list(block.conv)
        return [(m[0], m[1], m[2]) for m in layers[:-2]] + [(layers[-2], layers[-1], None)]
    raise TypeError(f"no branch stages for {type(block).__name__}")


def receptive_mask(out_mask: Tensor, conv: nn.Conv2d, in_hw: tuple[int, int]) -> Tensor:
    """Input pixels a conv reads to produce the outputs in `out_mask`.

    `out_mask (N, Ho, Wo)` float 0/1 or bool -> `(N, Hi, Wi)` of the same dtype: the mask spread by the
    stride and dilated by the kernel (a separable max filter over shifted slices: no MACs).
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    if (kh, kw, sh, sw) == (1, 1, 1, 1):
        return out_mask
    n, ho, wo = out_mask.shape
    hi, wi = in_hw
    top, left = (kh - 1) * dh - ph, (kw - 1) * dw - pw
    buf = out_mask.new_zeros(n, hi + (kh - 1) * dh, wi + (kw - 1) * dw)
    buf[:, top : top + (ho - 1) * sh + 1 : sh, left : left + (wo - 1) * sw + 1 : sw] = out_mask
    rows = buf[:, :hi]
    for t in range(1, kh):
        rows = torch.maximum(rows, buf[:, t * dh : t * dh + hi])
    out = rows[:, :, :wi]
    for t in range(1, kw):
        out = torch.maximum(out, rows[:, :, t * dw : t * dw + wi])
    return out


def stage_masks(stages: list[Stage], mask: Tensor, in_hw: tuple[int, int]) -> list[Tensor]:
    """Output-pixel set of every stage (float 0/1 `(N, H_k, W_k)`): the last on `mask`, earlier ones on
    what the next stage reads. `in_hw` is the branch input's size."""
    sizes = [in_hw]
    for conv, _, _ in stages[:-1]:
        h, w = sizes[-1]
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        sizes.append(((h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1))
    masks = [mask]
    for k in range(len(stages) - 1, 0, -1):
        masks.insert(0, receptive_mask(masks[0], stages[k][0], sizes[k]))
    return masks


def stage_macs(stages: list[Stage]) -> list[int]:
    """MACs per output pixel of every stage (`Cout * Cin/groups * kh * kw`)."""
    return [conv.weight.numel() for conv, _, _ in stages]


# ---------------------------------------------------------------- mask unit and gated block


def sparse_backend(requested: str | None, x: Tensor) -> str | None:
    """Kernel backend for the executing path: `requested` if given, else `$DYNNET_KERNEL_BACKEND` if
    set, else the device's sparse path (`cpu` / `triton`). Not `auto`: its dense fallback above a
    break-even density would compute every pixel, and the method executes only what it chose."""
    if requested is not None or os.environ.get(_backend.ENV_VAR):
        return requested
    return "triton" if x.is_cuda else "cpu"




class MaskUnit(nn.Module):
    """Squeeze mask unit: `(N, C, H, W) -> (N, H/s, W/s)` logits = 3x3 conv to one channel + linear(pool).

    Without a stride the 3x3 conv runs as one matrix product of the pixels' channels with its 9 taps
    (`(N H W, C) @ (C, 9)`, a view of a channels_last input) followed by a sum over a strided view of
    the 9 zero-framed tap maps: the same `9 C` MACs per pixel, several times faster on CPU than a
    convolution with one output channel.
    """

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 3, stride=stride, padding=1, bias=True)
        self.fc = nn.Linear(channels, 1, bias=True)

    def spatial(self, x: Tensor) -> Tensor:
        """`conv(x)[:, 0]`: `(N, C, H, W) -> (N, Ho, Wo)`."""
        if self.conv.stride != (1, 1):
            return self.conv(x)[:, 0]
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view when x is channels_last
        taps = torch.mm(rows, self.conv.weight.permute(1, 2, 3, 0).reshape(c, 9))  # (N H W, 9): tap ky * 3 + kx
        framed = F.pad(taps.view(n, h, w, 9).permute(0, 3, 1, 2), (1, 1, 1, 1))  # (N, 9, H + 2, W + 2)
        sn, sk, sh, sw = framed.stride()
        # shifted[n, ky, kx, y, x] = framed[n, 3 ky + kx, y + ky, x + kx]: output (y, x) reads tap (ky, kx)
        shifted = framed.as_strided((n, 3, 3, h, w), (sn, 3 * sk + sh, sk + sw, sh, sw), framed.storage_offset())
        return shifted.sum(dim=(1, 2)) + self.conv.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial(x) + self.fc(x.mean(dim=(2, 3)))[:, :, None]


def _block_stride(block: nn.Module) -> int:
    return block.stride if isinstance(block.stride, int) else block.stride[0]


def _finish(block: nn.Module, out: Tensor) -> Tensor:
    """ResNet blocks apply ReLU after the add (in place: `out` is fresh); MobileNetV2 blocks do not."""
    return out if isinstance(block, InvertedResidual) else out.relu_()


def sparse_branch(block: nn.Module, x: Tensor, masks: list[Tensor], backend: str | None,
                  shortcut: Tensor | None = None) -> Tensor:
    """The residual branch, computed at the pixels of `masks[-1]` (bool `(N, Ho, Wo)`) only.

    `masks[k]` (bool) is the pixel set of stage k (`stage_masks`); `x (N, C, H, W)`. Every stage is one
    sparse conv with its eval BatchNorm folded in (`implementations.common.fold.folded`), so the result
    is exactly 0 outside `masks[-1]` (the last stage has no activation); with `shortcut`, the last conv
    adds the branch into a copy of it instead (`shortcut + branch` in the conv's own pass).
    """
    h = x
    stages = branch_stages(block)
    for k, ((conv, bn, act), m) in enumerate(zip(stages, masks, strict=True)):
        w, b = folded(conv, bn)
        h = sparse_conv2d(h, m, w, b, conv.stride, conv.padding, conv.dilation, conv.groups, backend=backend,
                          residual=shortcut if k == len(stages) - 1 else None)
        if act is not None:
            h = act(h)
    return h


def gated_block_eval(block: nn.Module, x: Tensor, masks: list[Tensor], backend: str | None) -> Tensor:
    """Executing block: branch only at the active pixels, shortcut everywhere; skipped when all off.

    The branch is 0 outside the mask, so `shortcut + branch` is the last sparse conv adding into a copy of
    the shortcut (a fresh tensor: the shortcut may be `x`).
    """
    out = block.shortcut(x)
    if bool(masks[-1].any()):
        out = sparse_branch(block, x, masks, backend, shortcut=out)
    return _finish(block, out)


def gated_block_train(block: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
    """Relaxed block: `shortcut(x) + mask * residual(x)` with `mask (N, Ho, Wo)` 0/1 (soft gradient)."""
    return _finish(block, block.shortcut(x) + block.residual(x) * mask.unsqueeze(1))


# ---------------------------------------------------------------- the sparsity criterion


def noisy(logits: Tensor, scale: float) -> Tensor:
    """`logits + scale * (g1 - g2)`, the difference of two Gumbels being logistic noise."""
    if scale <= 0:
        return logits
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    return logits + scale * (torch.log(u) - torch.log1p(-u))


def block_cost(stages: list[Stage], masks: list[Tensor]) -> tuple[Tensor, float]:
    """(executed MACs, dense MACs) of one branch whose stages run on `masks` (`stage_masks`; float
    masks keep the gradient of the mask unit)."""
    per_pixel = stage_macs(stages)
    cost = sum(m.sum() * f for m, f in zip(masks, per_pixel, strict=True))
    total = float(sum(m.numel() * f for m, f in zip(masks, per_pixel, strict=True)))
    return cost, total


def sparsity_criterion(costs: list[Tensor], totals: list[float], budget: float, progress: float) -> Tensor:
    """Network term `(sum cost / sum total - budget)^2` plus annealed per-block bounds.

    `progress` in [0, 1]: at 0 every block must sit at `budget`; the bounds widen to [0, 1] by 1.
    """
    p = math.cos(min(max(progress, 0.0), 1.0) * math.pi / 2) ** 2
    upper, lower = 1 - p * (1 - budget), p * budget
    fractions = torch.stack([c / t for c, t in zip(costs, totals, strict=True)])
    block = ((fractions - upper).clamp_min(0) ** 2 + (lower - fractions).clamp_min(0) ** 2).mean()
    network = (torch.stack(costs).sum() / sum(totals) - budget) ** 2
    return network + block


# ---------------------------------------------------------------- the model


class DynConvNet(nn.Module):
    """Backbone with one mask unit per gated block; `forward(x) -> (logits (N, K), info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = backbone(cfg)
        self.gated = [is_gated(b) for b in blocks_of(self.net)]
        self.masks = nn.ModuleList(
            MaskUnit(b.in_channels, _block_stride(b)) for b, g in zip(blocks_of(self.net), self.gated, strict=True)
            if g
        )
        self.steps = 0  # training steps seen (anneals the per-block bounds)
        self._calibrating: list[Tensor] | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        h = self.net.stem(_layout(x, self.cfg))
        masks, costs, totals = [], [], []
        units = iter(self.masks)
        for block, gated in zip(blocks_of(self.net), self.gated, strict=True):
            if not gated:
                h = block(h)
                continue
            unit = next(units)
            logits = unit(h)
            if self._calibrating is not None:
                self._calibrate_unit(unit, logits, block, tuple(h.shape[-2:]))
                logits = unit(h)
            stages = branch_stages(block)
            if self.training:
                m = gumbel_sigmoid(noisy(logits, self.noise_scale()), self.cfg.tau, hard=True, noise=False)
                cost, total = block_cost(stages, stage_masks(stages, m, tuple(h.shape[-2:])))
                h = gated_block_train(block, h, m)
            else:
                m = logits >= 0
                stage_sets = stage_masks(stages, m, tuple(h.shape[-2:]))
                cost, total = block_cost(stages, stage_sets)
                backend = "reference" if self._calibrating is not None else sparse_backend(self.cfg.backend, h)
                h = gated_block_eval(block, h, stage_sets, backend)
            masks.append(m)
            costs.append(cost)
            totals.append(total)
        if self.training:
            self.steps += 1
        progress = self.steps / self.cfg.anneal_steps if self.cfg.anneal_steps else 1.0
        aux = self.cfg.loss_weight * sparsity_criterion(costs, totals, self.cfg.budget, progress)
        info = {
            "masks": masks,
            "density": torch.stack([m.float().mean() for m in masks]).detach(),
            "cost_fraction": (torch.stack(costs).sum() / sum(totals)).detach(),
            "aux_loss": aux,
        }
        return self.net.head(h), info

    def noise_scale(self) -> float:
        """Scale of the logistic (two-Gumbel) noise at this step: 1, fading linearly to 0 over
        `noise_steps` when set."""
        if self.cfg.noise_steps is None:
            return 1.0
        return max(0.0, 1.0 - self.steps / max(1, self.cfg.noise_steps))

    # -- calibration of the untrained operating point

    def _calibrate_unit(self, unit: MaskUnit, logits: Tensor, block: nn.Module, in_hw: tuple[int, int]) -> None:
        """Shift `unit`'s bias so that the block executes `budget` of its branch MACs on this batch."""
        stages = branch_stages(block)
        values = logits.detach().flatten().sort().values

        def fraction(threshold: float) -> float:
            cost, total = block_cost(stages, stage_masks(stages, (logits >= threshold).to(logits.dtype), in_hw))
            return float(cost) / total

        lo, hi = 0, len(values)  # threshold = values[i]: i pixels below; fraction decreases with i
        while lo < hi:  # smallest i with fraction(values[i]) <= budget
            mid = (lo + hi) // 2
            if fraction(float(values[mid])) <= self.cfg.budget + 1e-9:
                hi = mid
            else:
                lo = mid + 1
        if lo == 0:
            threshold = float(values[0]) - 1.0  # everything on
        elif lo == len(values):
            threshold = float(values[-1]) + 1.0
        else:
            threshold = 0.5 * float(values[lo - 1] + values[lo])
        with torch.no_grad():
            unit.conv.bias.sub_(threshold)

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        """Set every mask bias, block by block, so the model executes `budget` on the batch `x`."""
        was_training = self.training
        self.eval()
        self._calibrating = []
        try:
            self(x)
        finally:
            self._calibrating = None
            self.train(was_training)


class DenseNet(nn.Module):
    """The same backbone with every pixel executed; parameters under `net.` as in `DynConvNet`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = backbone(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(_layout(x, self.cfg)), {}


def _layout(x: Tensor, cfg: Config) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def _to_layout(model: nn.Module, cfg: Config) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


# ---------------------------------------------------------------- Contract 2


@lru_cache(maxsize=1)
def _photos() -> Tensor:
    return sample_photos()


@lru_cache(maxsize=16)
def _resized_photos(side: int) -> Tensor:
    """Both photos with their shorter side resized to `side`: `(2, 3, side, side * 640 / 427)`."""
    x = _photos()
    size = (side, round(side * x.shape[-1] / x.shape[-2]))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def photo_batch(batch_size: int, size: int, channels: int = 3, seed: int = 0) -> Tensor:
    """`(N, channels, size, size)` crops of the two real photos, ImageNet-normalized, deterministic.

    Each sample takes photo `i % 2`, resized so its shorter side is `1.25 * size` to `1.75 * size`, at a
    seeded random offset, mirrored half of the time.
    """
    gen = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor(_MEAN).view(3, 1, 1), torch.tensor(_STD).view(3, 1, 1)
    out = []
    for i in range(batch_size):
        scale = 1.25 + 0.5 * float(torch.rand((), generator=gen))
        side = max(size, round(size * scale))
        img = _resized_photos(side)[i % 2]
        top = int(torch.randint(0, img.shape[1] - size + 1, (), generator=gen))
        left = int(torch.randint(0, img.shape[2] - size + 1, (), generator=gen))
        crop = img[:, top : top + size, left : left + size]
        if bool(torch.rand((), generator=gen) < 0.5):
            crop = crop.flip(-1)
        crop = (crop - mean) / std
        out.append(crop.mean(0, keepdim=True).expand(channels, -1, -1) if channels != 3 else crop)
    return torch.stack(out).contiguous()


def build(cfg: Config | None = None) -> DynConvNet:
    cfg = cfg or Config()
    _check(cfg)
    model = _to_layout(DynConvNet(cfg), cfg)
    if cfg.calibrate:
        model.calibrate(photo_batch(8, cfg.image_size, cfg.in_channels, seed=12345))
    return model


def build_baseline(cfg: Config | None = None) -> DenseNet:
    cfg = cfg or Config()
    _check(cfg)
    return _to_layout(DenseNet(cfg), cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    """Real photo crops `(N, in_channels, image_size, image_size)` (the masks have content to follow)."""
    return photo_batch(batch_size, cfg.image_size, cfg.in_channels, seed=0)


def summarize(info: dict) -> dict:
    """Active-pixel fraction per gated block and the executed share of the conditional MACs."""
    if "masks" not in info:
        return {"executed_fraction": 1.0}
    return {
        "executed_fraction": round(float(info["cost_fraction"]), 4),
        "mean_density": round(float(info["density"].mean()), 4),
        "density_per_block": " ".join(f"{d:.2f}" for d in info["density"].tolist()),
    }


def decision_figure(cfg: Config | None = None):
    """The two photos with the masks of three gated blocks (early, middle, late) overlaid."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cfg = cfg or Config(arch="resnet50", image_size=224)
    torch.manual_seed(0)
    model = build(cfg).eval()
    photos = sample_photos(cfg.image_size)
    mean, std = torch.tensor(_MEAN).view(1, 3, 1, 1), torch.tensor(_STD).view(1, 3, 1, 1)
    x = (photos - mean) / std
    if cfg.in_channels != 3:
        x = x.mean(1, keepdim=True).expand(-1, cfg.in_channels, -1, -1)
    with torch.no_grad():
        _, info = model(x)
    masks = info["masks"]
    picks = sorted({0, len(masks) // 2, len(masks) - 1})
    fig, axes = plt.subplots(2, len(picks) + 1, figsize=(3 * (len(picks) + 1), 6.2))
    for row in range(2):
        img = photos[row].permute(1, 2, 0).numpy()
        axes[row, 0].imshow(img)
        axes[row, 0].set_title("input")
        for col, b in enumerate(picks, start=1):
            m = masks[b][row].float()
            axes[row, col].imshow(img)
            axes[row, col].imshow(m.numpy(), cmap="Reds", alpha=0.55, vmin=0, vmax=1,
                                  extent=(0, img.shape[1], img.shape[0], 0), interpolation="nearest")
            axes[row, col].set_title(f"block {b}: {100 * float(m.mean()):.0f}% pixels")
        for ax in axes[row]:
            ax.axis("off")
    fig.suptitle(f"DynConv masks (untrained, budget {cfg.budget}; red = branch executed)")
    fig.tight_layout()
    return fig
