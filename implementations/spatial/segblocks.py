"""# SegBlocks: Block-Based Dynamic Resolution Networks for Real-Time Segmentation

[Verelst and Tuytelaars, TPAMI 2023](https://doi.org/10.1109/TPAMI.2022.3162528)
([arXiv 2011.12025](https://arxiv.org/abs/2011.12025), official code, PyTorch + CUDA:
[thomasverelst/segblocks-segmentation-pytorch](https://github.com/thomasverelst/segblocks-segmentation-pytorch)).

## What is dynamic

- **Unit:** square blocks of `block_size x block_size` input pixels. Each block is processed by the
  whole network either at **high resolution** or at **half resolution** (its pixels averaged 2x2 at the
  input), and stays at that resolution through every layer (a block of side `b` is `b / stride` pixels
  high-res or `b / (2 stride)` low-res at a layer of that stride).
- **Decided by:** a lightweight policy network on a downscaled image (8 pixels per block; three
  strided 3x3 convs, as the official policy's strided 7x7/5x5 stack) giving one logit per block.
- **When:** per image and block, once, before the network runs.
  - `train()`: the grid is sampled (Bernoulli of the sigmoid of each logit) and the policy is trained
    with the paper's **REINFORCE** rule (`loss`): the per-block task loss minus its batch mean, plus
    `sparsity_weight * (target_rate - executed high-res fraction)`, with the sign flipped for low-res
    blocks, so a block is rewarded for high resolution where the loss is high and for low resolution
    where it is low. A classifier has no per-pixel loss: ours applies the classifier to every position
    of the last feature map (a class activation map) and takes the cross-entropy against the image's
    label per position, averaged per block. The network itself trains on the sampled mixed-resolution
    grid (a dense emulation of the block execution, equal to it; see below).
  - `eval()`: the top `hr_fraction` of blocks by logit are high-res (`None`: the paper's `logit > 0`).
    The network runs on **two stacks of blocks** (the official `DualResTensor`): high-res blocks
    `(n_hr, C, s, s)` and low-res blocks `(n_lr, C, s/2, s/2)`. Every convolution and pooling with
    padding first applies **BlockPad**: each block is padded with the border pixels of its neighbours
    (taken as they are from a block of the same resolution, nearest-upsampled from a low-res neighbour,
    2x2-averaged from a high-res one; zeros at the image border), then the layer runs unpadded on the
    stacked blocks. BatchNorm, ReLU and shortcuts run per stack (ReLU outputs are written straight into
    bordered buffers, so BlockPad only fills the border). Where the high-res tiles are 4 px or smaller
    (the deepest stages), both stacks run as **one GEMM** on their im2col rows, so the weights are read
    once. The low-res blocks really run at half resolution (a quarter of the MACs); nothing runs twice.

The classifier's global average pool over the re-assembled map is computed from the stacks directly
(a low-res block counts its sum four times), equal to pooling the full-resolution map with the low-res
blocks upsampled. `info` holds `grid` (bool `(N, GH, GW)`, True = high-res), `policy_logits`,
`hr_rate` and, in train mode, `log_probs`, `cam_logits`, `target_rate`, `sparsity_weight`.

## Operating point

- Paper: SwiftNet-RN18 on Cityscapes with the `reinforce40` policy of the official code (40 % of the
  blocks at high resolution, 128 px blocks), 60 % fewer FLOPs and 50 % faster on a GTX 1080 Ti. Here:
  ResNet-18 (the SwiftNet-RN18 encoder) as a 256x256 classifier with 64 px blocks (4x4 blocks, so a
  block is 2 px high-res and 1 px low-res at the last stage), `hr_fraction=0.4`.
- `hr_fraction` is the top-k share of high-res blocks of every image; untrained models run exactly
  that share, and executed MACs grow monotonically with it (from a quarter of the dense MACs at 0 to
  the dense MACs at 1, plus the policy). `target_rate` is the training target.

## Simplifications against the paper

- Classification (digits, or a pooled ResNet-18) instead of segmentation with SwiftNet's decoder;
  the per-block task loss comes from a class activation map (see above).
- BlockPad, split and stacks are PyTorch index ops instead of the official CUDA kernels; the shared
  `kernels.block_conv2d` is not used: its per-conv semantics (0 outside the active blocks of a full
  map) cannot express the padding from a neighbour of another resolution.
- Training runs the mixed-resolution network as two dense passes (full and half resolution) whose
  inputs are re-composed per block before every padded layer: equal to the block execution (tested),
  but without its savings; BatchNorm statistics are taken over both passes.
- No quantization of the number of high-res blocks (the official code rounds it to 1/16 of the grid
  for cuDNN's benchmark mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.layout import ChannelsLastInEval
from implementations.common.resnet import BasicBlock, CifarResNet, ResNet, cifar_resnet, resnet18
from implementations.common.train import TrainSettings
from implementations.spatial.sbnet import draw_blocks, photo_input, tile_blocks, topk_blocks


@dataclass
class Config:
    arch: Literal["cifar", "resnet18"] = "cifar"  # CIFAR ResNet (`depth`) or ImageNet ResNet-18
    depth: int = 14
    width: int = 16
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    block_size: int = 8  # block side in input pixels; a multiple of 2 x the network's total stride
    hr_fraction: float | None = 0.4  # eval: top-k share of high-res blocks; None: logit > 0 (paper)
    target_rate: float = 0.4  # training: the REINFORCE sparsity target (percent_target)
    sparsity_weight: float = 1.0  # weight of the sparsity reward (official default)
    policy_width: int = 32


TRAIN = TrainSettings(epochs=4, lr=3e-3, batch_size=64)
POLICY_PX = 8  # pixels per block seen by the policy network (three stride-2 convs)
GEMM_MAX_SIDE = 4  # high-res tiles this small (output side) run both stacks as one im2col GEMM


def total_stride(cfg: Config) -> int:
    return 4 if cfg.arch == "cifar" else 32


def _check(cfg: Config) -> None:
    if cfg.arch not in ("cifar", "resnet18"):
        raise ValueError(f"arch must be 'cifar' or 'resnet18', got {cfg.arch!r}")
    if cfg.hr_fraction is not None and not 0.0 <= cfg.hr_fraction <= 1.0:
        raise ValueError(f"hr_fraction must be None or in [0, 1], got {cfg.hr_fraction!r}")
    if not 0.0 <= cfg.target_rate <= 1.0:
        raise ValueError(f"target_rate must be in [0, 1], got {cfg.target_rate!r}")
    step = 2 * total_stride(cfg)
    if cfg.block_size % step or cfg.image_size % cfg.block_size:
        raise ValueError(
            f"block_size must be a multiple of {step} (2 x the total stride of {cfg.arch}) and divide "
            f"image_size; got block_size={cfg.block_size}, image_size={cfg.image_size}"
        )


def make_backbone(cfg: Config) -> CifarResNet | ResNet:
    if cfg.arch == "cifar":
        return cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width)
    return resnet18(cfg.num_classes, cfg.in_channels, cfg.width)


class DualRes(NamedTuple):
    """A mixed-resolution feature map: high-res part and low-res part (stacks or dense maps).

    `padded`, when set, holds the stacks' NHWC buffers with a 1-pixel border around them (the stacks are
    their interiors), so that the next BlockPad only fills the border.
    """

    hr: Tensor
    lr: Tensor
    padded: tuple[Tensor, Tensor] | None = None


def _rows(t: Tensor) -> Tensor:
    """`(n, C, s, s) -> (n s s, C)` NHWC rows (a view for channels_last tensors)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


@lru_cache(maxsize=64)
def _ring(full: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates `(i, j)` of the border pixels of a `full x full` tile with a `pad`-pixel border."""
    i, j = np.meshgrid(np.arange(full), np.arange(full), indexing="ij")
    border = (i < pad) | (i >= full - pad) | (j < pad) | (j >= full - pad)
    return i[border], j[border]


class Grid:
    """One forward's block layout: `hr (N, GH, GW)` bool, the stacks' order and BlockPad index tables.

    The tables are a few hundred to a few thousand indices each, built with NumPy on a host copy of the
    grid (an op there costs about a microsecond, a PyTorch op on tensors this small several: with ~35
    ops per table and 14 tables per ResNet-18 forward, building them took ~14 % of the eval time at batch
    1, profiled: 10.5 of 77 ms).
    """

    def __init__(self, hr: Tensor) -> None:
        self.hr = hr
        self.hr_idx, self.lr_idx = hr.nonzero(as_tuple=True), (~hr).nonzero(as_tuple=True)
        self._hr = hr.cpu().numpy()
        flat = self._hr.reshape(-1)
        self._slot = np.empty(flat.shape, dtype=np.int64)  # position of each block in its stack
        self._slot[flat] = np.arange(int(flat.sum()))
        self._slot[~flat] = np.arange(int((~flat).sum()))
        self._tables: dict[tuple[int, int, bool], dict[str, Tensor]] = {}

    def tables(self, side: int, pad: int, hr_target: bool, src_pad: int = 0) -> dict[str, Tensor]:
        """Where each border pixel of every padded block of one stack comes from (cached).

        `side` is the high-res block side at this layer; the source stacks are stored with a border of
        `src_pad` pixels. Keys: `zero` (destinations outside the image), `dst_hr`/`src_hr` (from a
        high-res neighbour; `src_hr` is `(k, 4)` for a low-res target, whose pixel is the 2x2 average),
        `dst_lr`/`src_lr` (from a low-res neighbour). All are rows of NHWC stacks.
        """
        key = (side, pad, hr_target, src_pad)
        if key not in self._tables:
            self._tables[key] = self._build(side, pad, hr_target, src_pad)
        return self._tables[key]

    def _build(self, side: int, pad: int, hr_target: bool, src_pad: int) -> dict[str, Tensor]:
        n, gy, gx = (t[:, None] for t in np.nonzero(self._hr if hr_target else ~self._hr))
        _, gh, gw = self._hr.shape
        st = side if hr_target else side // 2  # side of the target blocks
        full = st + 2 * pad
        ri, rj = _ring(full, pad)
        y, x = gy * st + ri - pad, gx * st + rj - pad  # (nb, P) pixel of the target's resolution
        inside = (y >= 0) & (y < gh * st) & (x >= 0) & (x < gw * st)
        y, x = y.clip(0, gh * st - 1), x.clip(0, gw * st - 1)
        cell = (n * gh + y // st) * gw + x // st
        yl, xl = y % st, x % st  # pixel inside the neighbour, at the target's resolution
        from_hr, slot = self._hr.reshape(-1)[cell], self._slot[cell]
        dst = np.arange(n.shape[0])[:, None] * full * full + ri * full + rj
        take_hr, take_lr = inside & from_hr, inside & ~from_hr

        def row(block_side: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:  # pixel (yy, xx) of block `slot`
            stored = block_side + 2 * src_pad
            return (slot * stored + yy + src_pad) * stored + xx + src_pad

        if hr_target:
            src_hr, src_lr = row(st, yl, xl), row(st // 2, yl // 2, xl // 2)
        else:
            src_hr = np.stack([row(2 * st, 2 * yl + dy, 2 * xl + dx) for dy in (0, 1) for dx in (0, 1)], axis=-1)
            src_lr = row(st, yl, xl)
        tables = {"zero": dst[~inside], "dst_hr": dst[take_hr], "src_hr": src_hr[take_hr],
                  "dst_lr": dst[take_lr], "src_lr": src_lr[take_lr]}
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)).to(self.hr.device) for k, v in tables.items()}


def block_pad(x: DualRes, grid: Grid, side: int, pad: int) -> DualRes:
    """BlockPad both stacks by `pad` pixels: `(n, C, s, s) -> (n, C, s + 2 pad, s + 2 pad)` (channels_last).

    Reuses `x.padded` (interiors already in place) when `pad` is 1; otherwise copies the interiors first.
    """
    c = x.hr.shape[1]
    if x.padded is not None:  # read the neighbours from the bordered buffers (no copy of the stacks)
        hr_rows, lr_rows, src_pad = x.padded[0].view(-1, c), x.padded[1].view(-1, c), 1
    else:
        hr_rows, lr_rows, src_pad = _rows(x.hr), _rows(x.lr), 0
    out = []
    for k, (stack, hr_target) in enumerate(((x.hr, True), (x.lr, False))):
        nb, _, st, _ = stack.shape
        if x.padded is not None and pad == 1:
            padded = x.padded[k]
        else:
            padded = stack.new_empty(nb, st + 2 * pad, st + 2 * pad, c)
            padded[:, pad : pad + st, pad : pad + st] = stack.permute(0, 2, 3, 1)
        flat, t = padded.view(-1, c), grid.tables(side, pad, hr_target, src_pad)
        flat.index_fill_(0, t["zero"], 0.0)
        src = hr_rows.index_select(0, t["src_hr"]) if hr_target else hr_rows[t["src_hr"]].mean(dim=1)
        flat.index_copy_(0, t["dst_hr"], src)
        flat.index_copy_(0, t["dst_lr"], lr_rows.index_select(0, t["src_lr"]))
        out.append(padded.permute(0, 3, 1, 2))
    return DualRes(*out)


def _into_padded(stacks: list[Tensor], write) -> DualRes:
    """Allocate 1-pixel-bordered NHWC buffers and let `write(k, interior (n, C, s, s))` fill the interiors."""
    buffers, interiors = [], []
    for k, t in enumerate(stacks):
        n, c, s, _ = t.shape
        buf = t.new_empty(n, s + 2, s + 2, c)
        inner = buf[:, 1 : s + 1, 1 : s + 1].permute(0, 3, 1, 2)
        write(k, inner)
        buffers.append(buf)
        interiors.append(inner)
    return DualRes(interiors[0], interiors[1], (buffers[0], buffers[1]))


class StackEngine:
    """Eval: the two resolutions as stacks of blocks; padded layers go through BlockPad."""

    def __init__(self, grid: Tensor, weights: dict | None = None) -> None:
        self.grid = Grid(grid)
        self.weights = {} if weights is None else weights  # permuted GEMM weights, reused across calls

    def split(self, image: Tensor, side: int) -> DualRes:
        """Image `(N, C, H, W)` -> high-res blocks and 2x2-averaged low-res blocks."""
        full = image.permute(0, 2, 3, 1).contiguous()
        half = F.avg_pool2d(image, 2).permute(0, 2, 3, 1).contiguous()
        hr = tile_blocks(full, side, 0)[self.grid.hr_idx].permute(0, 3, 1, 2)
        lr = tile_blocks(half, side // 2, 0)[self.grid.lr_idx].permute(0, 3, 1, 2)
        return DualRes(hr, lr)

    def padded(self, x: DualRes, side: int, pad: int, fn) -> DualRes:
        """`fn(padded block stack)` for a layer with zero padding `pad` (run unpadded after BlockPad)."""
        if pad:
            x = block_pad(x, self.grid, side, pad)
        if isinstance(fn, _Conv) and side // fn.conv.stride[0] <= GEMM_MAX_SIDE:
            return fn.merged(x, self.weights)
        return DualRes(fn(x.hr), fn(x.lr))

    @staticmethod
    def each(fn, *xs: DualRes) -> DualRes:
        return DualRes(fn(*(x.hr for x in xs)), fn(*(x.lr for x in xs)))

    @staticmethod
    def bn_relu(bn: nn.BatchNorm2d, x: DualRes) -> DualRes:
        """`relu(bn(x))`, written straight into bordered buffers (the next padded layer skips a copy)."""
        normed = [bn(x.hr), bn(x.lr)]
        if torch.is_grad_enabled() and normed[0].requires_grad:  # out= does not support autograd
            return _into_padded(normed, lambda k, out: out.copy_(F.relu(normed[k])))
        return _into_padded(normed, lambda k, out: torch.clamp_min(normed[k], 0, out=out))

    @staticmethod
    def add_relu(a: DualRes, b: DualRes) -> DualRes:
        """`relu(a + b)` into bordered buffers."""
        if torch.is_grad_enabled() and a.hr.requires_grad:
            return _into_padded([a.hr, a.lr], lambda k, out: out.copy_(F.relu(a[k] + b[k])))
        return _into_padded([a.hr, a.lr], lambda k, out: torch.add(a[k], b[k], out=out).relu_())

    def pooled(self, x: DualRes) -> Tensor:
        """Global average over the re-assembled full-res map: `(N, C)`."""
        n, gh, gw = self.grid.hr.shape
        side = x.hr.shape[-1] if x.hr.numel() else 2 * x.lr.shape[-1]
        total = x.hr.new_zeros(n, x.hr.shape[1])
        total.index_add_(0, self.grid.hr_idx[0], x.hr.sum(dim=(2, 3)))
        total.index_add_(0, self.grid.lr_idx[0], 4 * x.lr.sum(dim=(2, 3)))
        return total / (gh * gw * side * side)


class DenseEngine:
    """Train / test oracle: both resolutions as full maps, re-composed per block before padded layers."""

    def __init__(self, grid: Tensor) -> None:
        self.grid = grid

    def _hr_pixels(self, side: int) -> Tensor:
        n, gh, gw = self.grid.shape
        return self.grid.repeat_interleave(side, 1).repeat_interleave(side, 2).unsqueeze(1)

    def compose(self, x: DualRes, side: int) -> DualRes:
        """Full-res input of the high-res blocks and half-res input of the low-res ones, neighbours included."""
        hr = torch.where(self._hr_pixels(side), x.hr, F.interpolate(x.lr, scale_factor=2, mode="nearest"))
        lr = torch.where(self._hr_pixels(side // 2), F.avg_pool2d(x.hr, 2), x.lr)
        return DualRes(hr, lr)

    def split(self, image: Tensor, side: int) -> DualRes:
        return DualRes(image, F.avg_pool2d(image, 2))

    def padded(self, x: DualRes, side: int, pad: int, fn) -> DualRes:
        x = self.compose(x, side)
        return DualRes(fn(x.hr, pad), fn(x.lr, pad))

    each = staticmethod(StackEngine.each)

    @staticmethod
    def bn_relu(bn: nn.BatchNorm2d, x: DualRes) -> DualRes:
        return DualRes(F.relu(bn(x.hr)), F.relu(bn(x.lr)))

    @staticmethod
    def add_relu(a: DualRes, b: DualRes) -> DualRes:
        return DualRes(F.relu(a.hr + b.hr), F.relu(a.lr + b.lr))

    def final_map(self, x: DualRes, side: int) -> Tensor:
        """The re-assembled full-res map `(N, C, h, w)` (low-res blocks nearest-upsampled)."""
        return torch.where(self._hr_pixels(side), x.hr, F.interpolate(x.lr, scale_factor=2, mode="nearest"))


class _Conv:
    """A conv as `fn(x, pad=0)`: stacks come pre-padded (pad 0), dense maps pass their own padding."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv

    def __call__(self, x: Tensor, pad: int = 0) -> Tensor:
        return F.conv2d(x, self.conv.weight, self.conv.bias, self.conv.stride, pad)

    def merged(self, x: DualRes, cache: dict) -> DualRes:
        """Both padded stacks as **one** GEMM: im2col rows of both resolutions, the weights read once.

        Columns are in `(kh, kw, C)` order (a view for 1-pixel outputs of NHWC tiles), so the weight is
        permuted to `(kh, kw, C, Cout)` (a row-major `(K, Cout)` matrix: MKL ran the few-row product 1.6x
        faster than against a transposed `(Cout, K)` view) once and cached in `cache` (keyed by the conv,
        checked against the weight's version).
        """
        w = self.conv.weight
        cout, k, s = w.shape[0], w.shape[-1], self.conv.stride[0]
        key = (w.data_ptr(), w._version)
        if cache.get(id(self.conv), (None,))[0] != key:
            cache[id(self.conv)] = (key, w.detach().permute(2, 3, 1, 0).reshape(-1, cout).contiguous())
        wk = cache[id(self.conv)][1]
        cols, shapes = [], []
        for t in (x.hr, x.lr):
            n, c, p, _ = t.shape
            o = (p - k) // s + 1
            patches = t.permute(0, 2, 3, 1).unfold(1, k, s).unfold(2, k, s)  # (n, o, o, C, k, k)
            cols.append(patches.permute(0, 1, 2, 4, 5, 3).reshape(n * o * o, k * k * c))
            shapes.append((n, o))
        y = torch.cat(cols) @ wk
        if self.conv.bias is not None:
            y = y + self.conv.bias
        (nh, oh), (nl, ol) = shapes
        hr, lr = y.split([nh * oh * oh, nl * ol * ol])
        return DualRes(hr.view(nh, oh, oh, cout).permute(0, 3, 1, 2), lr.view(nl, ol, ol, cout).permute(0, 3, 1, 2))


_conv = _Conv


def run_block(block: BasicBlock, x: DualRes, engine, side: int) -> tuple[DualRes, int]:
    """A basic block on a mixed-resolution map; returns the output and its high-res block side."""
    r = engine.padded(x, side, block.conv1.padding[0], _conv(block.conv1))
    out_side = side // block.stride
    r = engine.bn_relu(block.bn1, r)
    r = engine.padded(r, out_side, block.conv2.padding[0], _conv(block.conv2))
    r = engine.each(block.bn2, r)
    shortcut = x if block.downsample is None else engine.each(block.downsample, x)
    return engine.add_relu(r, shortcut), out_side


def run_network(net: CifarResNet | ResNet, x: DualRes, engine, side: int) -> tuple[DualRes, int]:
    """Stem and every stage of the backbone on a mixed-resolution map."""
    x = engine.padded(x, side, net.conv1.padding[0], _conv(net.conv1))
    side //= net.conv1.stride[0]
    x = engine.bn_relu(net.bn1, x)
    if isinstance(net, ResNet):
        pool = net.maxpool
        x = engine.padded(x, side, pool.padding, lambda t, pad=0: F.max_pool2d(t, pool.kernel_size, pool.stride, pad))
        side //= pool.stride
    for block in net.blocks():
        x, side = run_block(block, x, engine, side)
    return x, side


class PolicyNet(nn.Module):
    """`(N, C, H, W) -> (N, GH, GW)` logits: the image at 8 px per block, three stride-2 3x3 convs."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 1, 3, stride=2, padding=1),
        )

    def forward(self, x: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        size = (grid_hw[0] * POLICY_PX, grid_hw[1] * POLICY_PX)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.layers(x).squeeze(1)


class SegBlocks(ChannelsLastInEval):
    """Backbone + policy; `forward(x) -> (logits (N, K), info)` with per-block resolutions."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = make_backbone(cfg)
        self.policy = PolicyNet(cfg.in_channels, cfg.policy_width)
        self._gemm_weights: dict = {}

    def decide(self, logits: Tensor) -> Tensor:
        """Eval decision: bool `(N, GH, GW)`, True = high-res."""
        if self.cfg.hr_fraction is None:
            return logits > 0
        return topk_blocks(logits, self.cfg.hr_fraction)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        x = x.contiguous(memory_format=torch.channels_last)
        g = self.cfg.image_size // self.cfg.block_size
        logits = self.policy(x, (g, g))
        info: dict = {"policy_logits": logits}
        if self.training:
            dist = torch.distributions.Bernoulli(logits=logits)
            grid = dist.sample().bool()
            info.update(log_probs=dist.log_prob(grid.float()), target_rate=self.cfg.target_rate,
                        sparsity_weight=self.cfg.sparsity_weight)
            engine = DenseEngine(grid)
            feats, side = run_network(self.net, engine.split(x, self.cfg.block_size), engine, self.cfg.block_size)
            fmap = engine.final_map(feats, side)
            out = self.net.fc(fmap.mean(dim=(2, 3)))
            info["cam_logits"] = torch.einsum("nchw,kc->nkhw", fmap, self.net.fc.weight) + self.net.fc.bias.view(
                1, -1, 1, 1)
        else:
            grid = self.decide(logits)
            engine = StackEngine(grid, self._gemm_weights)
            feats, _ = run_network(self.net, engine.split(x, self.cfg.block_size), engine, self.cfg.block_size)
            out = self.net.fc(engine.pooled(feats))
        info.update(grid=grid, hr_rate=grid.float().mean())
        return out, info


class Baseline(ChannelsLastInEval):
    """The backbone at full resolution everywhere; parameters under `net.` as in `SegBlocks`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = make_backbone(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(x.contiguous(memory_format=torch.channels_last)), {}


def loss(output: Tensor, info: dict, target: Tensor) -> Tensor:
    """Cross-entropy plus, in train mode, SegBlocks' REINFORCE loss of the policy.

    Per block: `advantage = task_loss_block - mean(task_loss) + w (target_rate - hr_rate)`, negated for
    low-res blocks; policy loss `-mean(log_prob * advantage)` (advantage detached).
    """
    ce = F.cross_entropy(output, target)
    if "log_probs" not in info:
        return ce
    cam = info["cam_logits"]
    labels = target.view(-1, 1, 1).expand(-1, cam.shape[2], cam.shape[3])
    per_pixel = F.cross_entropy(cam, labels, reduction="none").detach()  # (N, h, w)
    grid = info["grid"]
    per_block = F.adaptive_avg_pool2d(per_pixel.unsqueeze(1), grid.shape[1:]).squeeze(1)
    advantage = per_block - per_block.mean() + info["sparsity_weight"] * (info["target_rate"] - grid.float().mean())
    advantage = torch.where(grid, advantage, -advantage)
    return ce - (info["log_probs"] * advantage).mean()


def build(cfg: Config | None = None) -> SegBlocks:
    cfg = cfg or Config()
    _check(cfg)
    return SegBlocks(cfg)


def build_baseline(cfg: Config | None = None) -> Baseline:
    cfg = cfg or Config()
    _check(cfg)
    return Baseline(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def summarize(info: dict) -> dict:
    """Share of high-res blocks, overall and per image (first eight)."""
    if "grid" not in info:
        return {"high_res_blocks": 1.0}
    per_image = info["grid"].float().mean(dim=(1, 2))
    return {
        "high_res_blocks": round(float(per_image.mean()), 4),
        "per_image": " ".join(f"{r:.2f}" for r in per_image[:8].tolist()),
    }


@torch.no_grad()
def decision_figure(cfg: Config | None = None):
    """The two photos with the blocks the policy keeps at high resolution (the rest run at half)."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - only where a figure is drawn

    cfg = cfg or Config(arch="resnet18", width=64, image_size=256, block_size=64)
    torch.manual_seed(0)
    model = build(cfg).eval()
    photos, x = photo_input(cfg, cfg.image_size)
    _, info = model(x)
    fig = Figure(figsize=(2.8 * len(photos), 3.1), layout="constrained")
    axes = fig.subplots(1, len(photos), squeeze=False)[0]
    for i, photo in enumerate(photos):
        share = float(info["grid"][i].float().mean())
        draw_blocks(axes[i], photo, info["grid"][i], color="red", title=f"{100 * share:.0f}% blocks high-res")
    fig.suptitle(f"SegBlocks: high-res {cfg.block_size} px blocks (red), the others at half resolution "
                 "(untrained policy unless loaded)", fontsize=9)
    return fig
