"""# FBS: Dynamic Channel Pruning with Feature Boosting and Suppression

[Gao, Zhao, Dudziak, Mullins and Xu, ICLR 2019](https://arxiv.org/abs/1810.05331)
(official code, TensorFlow: [deep-fry/mayo](https://github.com/deep-fry/mayo)).

## What is dynamic

- **Unit:** the output channels of every convolution of a residual branch (and therefore the input
  channels of the next one). The stem, the 1x1 downsample shortcuts and the classifier stay dense.
- **Decided by:** a saliency predictor per convolution, computed from that convolution's input:
  `g(x) = relu(W ss(x) + b)`, where `ss` subsamples every input channel to its mean absolute value
  (the paper's L1-norm subsampling). A k-winners-take-all keeps the `k = ceil(d C)` most salient
  output channels; they are **boosted** (multiplied by their saliency), the others **suppressed** (0).
- **When:** per sample, at every gated convolution, in train and eval.
  - `train()`: the paper's training: the convolution runs dense, the winners-take-all mask times the
    saliency multiplies its BatchNorm output, everything is trained end to end with SGD; the L1
    penalty `l1_weight * sum_l mean_n ||g_l(x)||_1` on the saliencies is returned as `aux_loss`.
  - `eval()`: only the `k` winning output channels are computed, and the next convolution reads only
    the `k` channels its input kept: sample `n` uses the weight block `W[out_n][:, in_n]` (a gather of
    rows and columns). **Batch > 1:** the per-sample weight blocks are stacked and the whole batch runs
    as *one grouped convolution* (`groups = N`, input viewed as `(1, N k_in, H, W)`) on maps of at least
    16x16, and as one convolution per sample on smaller maps (where oneDNN's grouped convolution is
    slow); either way every sample does exactly `k_out x k_in x kh x kw` MACs per output pixel and no
    dense work is masked. The BatchNorm of the kept channels and the saliency are applied as one
    per-channel scale and shift; the branch output is scatter-added into the shortcut.

`info` holds `channels` (one `(N, k)` index tensor per gated convolution, in order), `saliency` (the
winners' saliencies, same shapes), `density` (kept fraction of each gated convolution) and `aux_loss`.
The predictors' MACs count on the dynamic side.

## Operating point

`density` is the paper's `d`, the fraction of output channels kept by every gated convolution (fixed
per layer, as in the paper). It moves the executed MACs directly and needs no training: the first
convolution of a branch costs about `d` of its dense MACs (dense input), the second `d^2` (both
sides pruned). `density = 1` keeps everything (the network is then the baseline, with the channels
scaled by their saliencies). The predictors start with small weights and bias 1, so an untrained
model boosts little (saliencies near 1, no activation blow-up) while its winners already depend on
the input. The paper sweeps `d`; `0.5` (ours) sits in the range where it reports its ResNet-18
saving of about 2x.

## Simplifications against the paper

- A small CIFAR ResNet by default; `backbone="resnet18"` gives the paper's ImageNet ResNet-18 (used
  at the operating point, 224x224).
- What limits the measured speedup: every sample copies its selected weights (`k_out x k_in x kh x kw`
  per layer), which costs about as much as the convolution itself on the 7x7 maps of the last stage,
  and at batch > 1 the per-sample convolutions lose the batching of the dense one. The paper reports
  savings in compute only.
- The saliency multiplies the output of a full BatchNorm (the paper replaces BN's scale by the
  saliency); trained from scratch on the digits instead of fine-tuned from a pretrained network with
  a progressively reduced `d`.
- `l1_weight` is ours (the paper's 1e-8 is tied to its ImageNet loss scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.resnet import BasicBlock, cifar_resnet, resnet18
from implementations.common.train import TrainSettings


@dataclass
class Config:
    backbone: Literal["cifar", "resnet18"] = "cifar"  # CIFAR ResNet (depth, width) or ImageNet ResNet-18
    depth: int = 14  # CIFAR ResNet 6n+2 (ignored by resnet18)
    width: int = 16  # channels of the first stage (64 for the standard ResNet-18)
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    density: float = 0.5  # d: fraction of output channels kept by every gated convolution
    l1_weight: float = 1e-4  # weight of the L1 penalty on the saliencies


TRAIN = TrainSettings(epochs=4, lr=3e-3, batch_size=64)


def _check(cfg: Config) -> None:
    if not 0.0 < cfg.density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {cfg.density!r}")
    if cfg.backbone not in ("cifar", "resnet18"):
        raise ValueError(f"backbone must be 'cifar' or 'resnet18', got {cfg.backbone!r}")
    if cfg.l1_weight < 0:
        raise ValueError(f"l1_weight must be >= 0, got {cfg.l1_weight!r}")


def make_backbone(cfg: Config) -> nn.Module:
    """The network FBS gates: CIFAR ResNet (depth, width) or ImageNet-layout ResNet-18."""
    if cfg.backbone == "resnet18":
        return resnet18(cfg.num_classes, cfg.in_channels, cfg.width)
    return cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width)


def kept(channels: int, density: float) -> int:
    """The paper's `ceil(d C)` winners (at least one)."""
    return max(1, math.ceil(density * channels - 1e-9))


def subsample(x: Tensor) -> Tensor:
    """The paper's `ss`: `(N, C, H, W) -> (N, C)` mean absolute value of every channel."""
    return x.abs().mean(dim=(2, 3))


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def gather_weight(weight: Tensor, out_idx: Tensor | None, in_idx: Tensor | None) -> Tensor:
    """Per-sample weight blocks `weight[out_idx[n]][:, in_idx[n]]`: `(N, Co, Ci, kh, kw)` (a copy).

    One `index_select` of whole filters (or of input channels), or of `kh x kw` taps at flat (out, in)
    positions when both sides are pruned (about 3x faster on the CPU than advanced indexing). Either way
    the cost is a copy of the selected weights per sample and layer: on small feature maps, where a
    convolution reads about as many weights as activations, this copy is what limits the speedup.
    """
    cout, cin, kh, kw = weight.shape
    if in_idx is None:
        return weight.index_select(0, out_idx.flatten()).view(*out_idx.shape, cin, kh, kw)
    if out_idx is None:  # whole filters, a subset of their input channels
        if len(in_idx) == 1:
            return weight.index_select(1, in_idx[0]).unsqueeze(0)
        return torch.stack([weight.index_select(1, idx) for idx in in_idx])
    flat = (out_idx.unsqueeze(2) * cin + in_idx.unsqueeze(1)).flatten()
    return weight.reshape(cout * cin, kh * kw).index_select(0, flat).view(*out_idx.shape, in_idx.shape[1], kh, kw)


def gathered_conv2d(
    x: Tensor,
    weight: Tensor,
    out_idx: Tensor | None,
    in_idx: Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] = 0,
) -> Tensor:
    """Per-sample channel subsets of one convolution: each sample runs only its own weight block.

    Args:
        x: `(N, Ci, H, W)`; sample n holds the input channels `in_idx[n]` (all `Cin` when None).
        weight: `(Cout, Cin, kh, kw)` dense weight of the layer.
        out_idx: `(N, Co)` int64, the output channels sample n computes (all `Cout` when None).
        in_idx: `(N, Ci)` int64 or None.
    Returns:
        `(N, Co, Ho, Wo)`: sample n's output channels `out_idx[n]`, computed from its own weight block
        `weight[out_idx[n]][:, in_idx[n]]` only (`N Co Ci kh kw Ho Wo` MACs in all). Batch > 1: the
        samples are stacked along the channels (`(1, N Ci, H, W)`) and run as one convolution with
        `groups = N` when the output is at least `16 x 16`; on smaller maps, where oneDNN's grouped
        convolution is slow, one convolution per sample (the same MACs).
    """
    n, ci, h, w = x.shape
    if out_idx is None and in_idx is None:
        return F.conv2d(x, weight, None, stride, padding)
    blocks = gather_weight(weight, out_idx, in_idx)  # (N, Co, Ci, kh, kw)
    co, kh, kw = blocks.shape[1], weight.shape[2], weight.shape[3]
    if n == 1:
        return F.conv2d(x, blocks[0], None, stride, padding)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    if ((h + 2 * ph - kh) // sh + 1) * ((w + 2 * pw - kw) // sw + 1) < 256:
        return torch.cat([F.conv2d(x[i : i + 1], blocks[i], None, stride, padding) for i in range(n)])
    y = F.conv2d(x.reshape(1, n * ci, h, w), blocks.reshape(n * co, ci, kh, kw), None, stride, padding, 1, n)
    return y.view(n, co, *y.shape[2:])


def bn_scale_shift(bn: nn.BatchNorm2d, idx: Tensor, gain: Tensor) -> tuple[Tensor, Tensor]:
    """Eval BatchNorm of the channels `idx (N, k)` times `gain (N, k)` as `(N, k, 1, 1)` scale and shift."""
    inv = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * inv
    return (inv[idx] * gain)[..., None, None], (shift[idx] * gain)[..., None, None]


def wta_mask(idx: Tensor, channels: int) -> Tensor:
    """`(N, k)` winner indices -> `(N, channels)` 0/1 float mask."""
    return torch.zeros(idx.shape[0], channels, device=idx.device).scatter_(1, idx, 1.0)


def winners(g: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """k-winners-take-all on saliencies `g (N, C)`: indices `(N, k)` in increasing order and their values."""
    idx = g.topk(k, dim=1).indices.sort(dim=1).values
    return idx, g.gather(1, idx)


class Saliency(nn.Module):
    """FBS saliency predictor `g = relu(W ss(x) + b)`: `(N, Cin)` subsampled input -> `(N, Cout)`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, out_channels)
        nn.init.normal_(self.fc.weight, std=0.01)  # ours: saliencies start near 1 (no boost yet) ...
        nn.init.constant_(self.fc.bias, 1.0)  # ... while their ranking already depends on the input

    def forward(self, s: Tensor) -> Tensor:
        return F.relu(self.fc(s))


class FBSResNet(nn.Module):
    """ResNet whose residual-branch convolutions are pruned per sample; `forward(x) -> (logits, info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = make_backbone(cfg)
        self.saliency = nn.ModuleList()
        for b in self.blocks():
            self.saliency.append(Saliency(b.conv1.in_channels, b.conv1.out_channels))
            self.saliency.append(Saliency(b.conv2.in_channels, b.conv2.out_channels))

    def blocks(self) -> list[BasicBlock]:
        return list(self.net.blocks())

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        h = self.net.stem(x)
        channels, values, l1 = [], [], []
        for i, block in enumerate(self.blocks()):
            run = self._block_masked if self.training else self._block_sparse
            h, decisions, g_sum = run(block, self.saliency[2 * i], self.saliency[2 * i + 1], h)
            for idx, val in decisions:
                channels.append(idx)
                values.append(val)
            l1.append(g_sum)
        density = [c.shape[1] / b for c, b in zip(channels, self._widths(), strict=True)]
        info = {
            "channels": channels,
            "saliency": values,
            "density": density,
            "aux_loss": self.cfg.l1_weight * torch.stack(l1).sum(),
        }
        return self.net.head(h), info

    def _widths(self) -> list[int]:
        return [c for b in self.blocks() for c in (b.conv1.out_channels, b.conv2.out_channels)]

    def _block_masked(self, block: BasicBlock, sal1: Saliency, sal2: Saliency, x: Tensor):
        """Training (and oracle) form: dense convolutions, BN output times the winners' saliencies."""
        d = self.cfg.density
        g1 = sal1(subsample(x))
        idx1, s1 = winners(g1, kept(g1.shape[1], d))
        pi1 = g1 * wta_mask(idx1, g1.shape[1])
        h = F.relu(block.bn1(block.conv1(x)) * pi1[..., None, None])
        g2 = sal2(subsample(h))
        idx2, s2 = winners(g2, kept(g2.shape[1], d))
        pi2 = g2 * wta_mask(idx2, g2.shape[1])
        out = F.relu(block.shortcut(x) + block.bn2(block.conv2(h)) * pi2[..., None, None])
        l1 = g1.sum(1).mean() + g2.sum(1).mean()
        return out, [(idx1, s1), (idx2, s2)], l1

    def _block_sparse(self, block: BasicBlock, sal1: Saliency, sal2: Saliency, x: Tensor):
        """Executing form: only the winners of conv1 are computed; conv2 reads only them."""
        d = self.cfg.density
        g1 = sal1(subsample(x))
        idx1, s1 = winners(g1, kept(g1.shape[1], d))
        h = gathered_conv2d(x, block.conv1.weight, idx1, None, block.conv1.stride, block.conv1.padding)
        scale, shift = bn_scale_shift(block.bn1, idx1, s1)
        h = torch.addcmul(shift, h, scale).relu_()  # (N, k1, H', W'): the kept channels only
        s_in = x.new_zeros(len(x), g1.shape[1]).scatter_(1, idx1, subsample(h))
        g2 = sal2(s_in)
        idx2, s2 = winners(g2, kept(g2.shape[1], d))
        r = gathered_conv2d(h, block.conv2.weight, idx2, idx1, block.conv2.stride, block.conv2.padding)
        scale, shift = bn_scale_shift(block.bn2, idx2, s2)
        r = torch.addcmul(shift, r, scale)
        out = block.shortcut(x).scatter_add(1, idx2[..., None, None].expand_as(r), r)
        l1 = g1.sum(1).mean() + g2.sum(1).mean()
        return out.relu_(), [(idx1, s1), (idx2, s2)], l1


class DenseResNet(nn.Module):
    """The same ResNet with every channel computed and no predictors; parameters under `net.`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = make_backbone(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(x), {}


def build(cfg: Config | None = None) -> FBSResNet:
    cfg = cfg or Config()
    _check(cfg)
    return FBSResNet(cfg)


def build_baseline(cfg: Config | None = None) -> DenseResNet:
    cfg = cfg or Config()
    _check(cfg)
    return DenseResNet(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def summarize(info: dict) -> dict:
    """Kept-channel fraction and how input-dependent the choices are (distinct channel sets per layer)."""
    if "channels" not in info:
        return {"kept_channels": 1.0}
    distinct = [len({tuple(row) for row in idx.tolist()}) / max(len(idx), 1) for idx in info["channels"]]
    return {
        "kept_channels": round(sum(info["density"]) / len(info["density"]), 4),
        "distinct_channel_sets": round(sum(distinct) / len(distinct), 4),
        "mean_winner_saliency": round(float(torch.cat([v.flatten() for v in info["saliency"]]).mean()), 4),
    }
