"""# SBNet: Sparse Blocks Network for Fast Inference

[Ren, Pokrovsky, Yang and Urtasun, CVPR 2018](https://openaccess.thecvf.com/content_cvpr_2018/papers/Ren_SBNet_Sparse_Blocks_CVPR_2018_paper.pdf)
([arXiv 1801.02108](https://arxiv.org/abs/1801.02108), official code, TensorFlow + CUDA:
[uber-research/sbnet](https://github.com/uber-research/sbnet)).

## What is dynamic

- **Unit:** square blocks (tiles) of `block_size x block_size` pixels of the feature map, in every
  stride-1 residual block of a CIFAR-style ResNet (the stem, the two downsampling blocks and the
  classifier stay dense).
- **Decided by:** a computation mask, not by the main network. SBNet takes the mask from prior
  knowledge (a road map) or from a cheap low-resolution segmentation network; here a small *mask
  network* (average-pool the image by `mask_stride`, two 3x3 convs, one logit per low-resolution
  pixel) predicts a foreground probability map. Per stage the map is reduced to the stage's block grid:
  with `density` set, the `density` fraction of blocks with the highest mean probability are active
  (top-k per image); with `density=None`, SBNet's own rule: binarize at `mask_threshold`, then
  `kernels.reduce_mask` (average or max pooling per block, active where the pooled value `> tol`).
- **When:** per image and block, once per stage, before the stage runs (one mask for all its blocks).

In `eval()` every stride-1 residual block runs SBNet's *sparse residual block*: the active tiles are
**gathered with their overlap** (a halo of 2 pixels for the two 3x3 convs, read from a zero-bordered
NHWC copy of the stage's feature map), both convs run as ordinary dense convs **without padding** on the
stacked tiles (`(B+4)^2 -> (B+2)^2 -> B^2`; positions of the middle map that lie outside the image are
zeroed, as zero padding would), BatchNorm, the identity shortcut and the ReLU are applied to the tiles
and the results are **scattered back in place**. Inactive tiles keep the block's input: the residual
branch is never computed there. Nothing dense is computed and then masked. The halo's extra
`(B+2)^2 - B^2` outputs of the first conv are real executed work and count as such.

`train()` runs the same decisions as a masked dense computation (`where(mask, block(h), h)`, equal to
the sparse path); the mask network is trained on its own (see below). `info` holds `block_masks` (one
bool `(N, H/B, W/B)` per stage, at that stage's resolution), `mask_logits (N, 1, h, w)`, `density`
(active fraction of the sparse blocks' tiles) and, in train mode, `aux_loss`.

## Operating point

- `density` is the fraction of tiles each image executes (top-k on the predicted map), so an untrained
  model runs exactly that share of its sparse residual branches; executed MACs grow monotonically with
  it (plus the halo). The paper benchmarks sparse ResNet blocks over sparsities 0.6 to 0.99 of LiDAR
  bird's-eye-view maps and states no single operating point; ours: `density=0.3` (sparsity 0.7) with
  16x16 tiles on a 128x128 CIFAR-style ResNet-20 of width 32 (high-resolution maps, as SBNet targets;
  7 of its 9 residual blocks are sparse).
- With `density=None`, `tol` (and `mask_threshold`, `reduce_mode`) move the executed share as in SBNet:
  a higher `tol` keeps fewer blocks.
- `block_size` trades mask precision against efficiency (the halo costs `(B+2)^2 / B^2` on the first
  conv).

## Simplifications against the paper

- Classification with a CIFAR-style ResNet instead of a LiDAR 3D detector with ResNet bottleneck
  blocks; the same tile size at every stage (the grid gets coarser with depth).
- The mask network is ours: trained on the digits with a binary cross-entropy against the digit's
  foreground (pixels brighter than the image mean, at the mask's resolution), its own loss only
  (`aux_loss`; no gradient reaches the classifier), a stand-in for the paper's separately trained
  road/vehicle segmentation network. Untrained, it is a fixed random saliency map.
- Gather, convs and scatter are PyTorch ops (index gather on a strided tile view, `F.conv2d`,
  indexed write) instead of SBNet's fused CUDA gather/scatter kernels; the shared
  `kernels.block_conv2d` is not used because its per-conv semantics (exactly 0 outside the active
  blocks) cannot feed the second conv of a residual block without SBNet's overlapping tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.data import sample_photos
from implementations.common.layout import ChannelsLastInEval
from implementations.common.resnet import BasicBlock, CifarResNet, cifar_resnet
from implementations.common.train import TrainSettings
from kernels.block_conv import expand_block_mask, reduce_mask


@dataclass
class Config:
    depth: int = 14  # CIFAR ResNet 6n+2
    width: int = 16
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    block_size: int = 8  # tile side B at every stage (pixels of that stage's feature map)
    density: float | None = 0.4  # active fraction of tiles per image (top-k); None: threshold + tol rule
    tol: float = 0.0  # reduce_mask: a block is active where its pooled binary mask exceeds tol
    mask_threshold: float = 0.5  # binarization of the predicted foreground probability
    reduce_mode: Literal["avg", "max"] = "avg"  # reduce_mask pooling
    mask_stride: int = 4  # the mask network works at 1/mask_stride of the input resolution
    mask_hidden: int = 8
    mask_loss_weight: float = 1.0


TRAIN = TrainSettings(epochs=4, lr=3e-3, batch_size=64)
HALO = 2  # overlap of the gathered tiles: one pixel per 3x3 conv of a basic block


def stage_sizes(cfg: Config) -> list[int]:
    """Side of the feature map of each stage of the CIFAR ResNet (strides 1, 2, 2)."""
    return [cfg.image_size, cfg.image_size // 2, cfg.image_size // 4]


def _check(cfg: Config) -> None:
    if cfg.density is not None and not 0.0 <= cfg.density <= 1.0:
        raise ValueError(f"density must be None or in [0, 1], got {cfg.density!r}")
    if not 0.0 <= cfg.tol < 1.0:
        raise ValueError(f"tol must be in [0, 1), got {cfg.tol!r}")
    if not 0.0 < cfg.mask_threshold < 1.0:
        raise ValueError(f"mask_threshold must be in (0, 1), got {cfg.mask_threshold!r}")
    if cfg.block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {cfg.block_size!r}")
    if cfg.image_size % 4 or any(s % cfg.block_size for s in stage_sizes(cfg)):
        raise ValueError(
            f"image_size / 1, / 2 and / 4 must be multiples of block_size: got image_size={cfg.image_size}, "
            f"block_size={cfg.block_size}"
        )
    if cfg.mask_stride < 1 or cfg.image_size % cfg.mask_stride:
        raise ValueError(f"mask_stride must divide image_size, got {cfg.mask_stride!r}")


# --------------------------------------------------------------------------------------------------
# Tiles on a zero-bordered NHWC map (shared with segblocks and blockcopy)


def pad_nhwc(x: Tensor, halo: int, out: Tensor | None = None) -> Tensor:
    """`(N, C, H, W) -> (N, H + 2 halo, W + 2 halo, C)`: NHWC copy inside a zero frame.

    `out`, a buffer of that shape whose frame is zero (e.g. from an earlier call), is reused when given.
    """
    n, c, h, w = x.shape
    if out is None:
        out = x.new_zeros(n, h + 2 * halo, w + 2 * halo, c)
    out[:, halo : halo + h, halo : halo + w] = x.permute(0, 2, 3, 1)
    return out


def interior(padded: Tensor, halo: int) -> Tensor:
    """The map inside the frame as an `(N, C, H, W)` view (channels_last strides, no copy)."""
    h, w = padded.shape[1] - 2 * halo, padded.shape[2] - 2 * halo
    return padded[:, halo : halo + h, halo : halo + w].permute(0, 3, 1, 2)


def tile_blocks(padded: Tensor, block: int, halo: int) -> Tensor:
    """The non-overlapping blocks `(N, Hb, Wb, B, B, C)` inside the frame (a writable view)."""
    n, hp, wp, c = padded.shape
    hb, wb = (hp - 2 * halo) // block, (wp - 2 * halo) // block
    sn, sh, sw, sc = padded.stride()
    offset = padded.storage_offset() + halo * (sh + sw)
    return padded.as_strided((n, hb, wb, block, block, c), (sn, block * sh, block * sw, sh, sw, sc), offset)


class Tiles:
    """The active blocks of a block mask, with the index tables to gather and scatter them.

    `mask (N, Hb, Wb)` bool over a map of `(Hb B) x (Wb B)` pixels that lives in a padded NHWC buffer
    with a frame of `halo` pixels. `gather` reads every active block with `halo` pixels of overlap on
    each side; `scatter_` writes `B x B` results back into the blocks.
    """

    def __init__(self, mask: Tensor, block: int, halo: int) -> None:
        self.mask, self.block, self.halo = mask, block, halo
        self.idx = mask.nonzero(as_tuple=True)  # (n, by, bx), each (nb,)
        self.count = int(self.idx[0].numel())
        _, hb, wb = mask.shape
        hp, wp = hb * block + 2 * halo, wb * block + 2 * halo
        off = torch.arange(block + 2 * halo, device=mask.device)
        n, by, bx = (t.view(-1, 1, 1) for t in self.idx)
        rows = (n * hp + by * block + off.view(1, -1, 1)) * wp + bx * block + off.view(1, 1, -1)
        self.rows = rows.reshape(-1)  # (nb (B + 2 halo)^2,) rows of the flattened padded map

    def gather(self, padded: Tensor) -> Tensor:
        """`(nb, C, B + 2 halo, B + 2 halo)` windows (channels_last) of `padded (N, Hp, Wp, C)`."""
        side, c = self.block + 2 * self.halo, padded.shape[-1]
        win = padded.view(-1, c).index_select(0, self.rows)
        return win.view(self.count, side, side, c).permute(0, 3, 1, 2)

    def scatter_(self, padded: Tensor, tiles: Tensor) -> None:
        """Write `tiles (nb, C, B, B)` into their blocks of `padded`, in place."""
        tile_blocks(padded, self.block, self.halo)[self.idx] = tiles.permute(0, 2, 3, 1)

    def zero_outside_(self, ext: Tensor, ring: int) -> Tensor:
        """Zero the pixels of `ext (nb, C, B + 2 ring, B + 2 ring)` that lie outside the map, in place."""
        _, hb, wb = self.mask.shape
        _, by, bx = self.idx
        edges = (
            (by > 0, ext[:, :, :ring]),
            (by < hb - 1, ext[:, :, -ring:]),
            (bx > 0, ext[:, :, :, :ring]),
            (bx < wb - 1, ext[:, :, :, -ring:]),
        )
        for keep, part in edges:
            if not bool(keep.all()):
                part.mul_(keep.to(ext.dtype).view(-1, 1, 1, 1))
        return ext


def topk_blocks(scores: Tensor, fraction: float) -> Tensor:
    """Bool `(N, Hb, Wb)`: the `round(fraction * Hb * Wb)` highest-scoring blocks of each image (>= 1 if > 0)."""
    n, hb, wb = scores.shape
    total = hb * wb
    k = 0 if fraction <= 0 else max(1, min(total, round(fraction * total)))
    flat = torch.zeros(n, total, dtype=torch.bool, device=scores.device)
    if k:
        flat.scatter_(1, scores.reshape(n, total).topk(k, dim=1).indices, True)
    return flat.view(n, hb, wb)


def pixel_mask(block_mask: Tensor, block: int) -> Tensor:
    """`(N, Hb, Wb)` block mask -> `(N, 1, Hb B, Wb B)` bool pixel mask."""
    n, hb, wb = block_mask.shape
    return expand_block_mask(block_mask, hb * block, wb * block, block).unsqueeze(1)


# --------------------------------------------------------------------------------------------------
# The model


class MaskNet(nn.Module):
    """Cheap foreground predictor: `(N, C, H, W) -> (N, 1, H/s, W/s)` logits (avg-pool by s, two 3x3 convs)."""

    def __init__(self, in_channels: int, hidden: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, 1, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride)
        return self.conv2(F.relu(self.bn(self.conv1(x))))


def foreground_target(x: Tensor, stride: int) -> Tensor:
    """`(N, 1, H/s, W/s)` 0/1: pixels brighter than their image's mean (the digit's ink on the digits)."""
    lum = F.avg_pool2d(x.mean(dim=1, keepdim=True), stride) if stride > 1 else x.mean(dim=1, keepdim=True)
    return (lum > lum.mean(dim=(2, 3), keepdim=True)).float()


def sparse_residual_(block: BasicBlock, padded: Tensor, tiles: Tiles) -> None:
    """SBNet's sparse residual block, in place on `padded (N, H + 4, W + 4, C)` (a frame of `HALO`).

    Every active tile becomes `relu(x + bn2(conv2(relu(bn1(conv1(x))))))`, both convs unpadded on the
    gathered `(B + 4)^2` windows; the middle map is zeroed where it lies outside the image.
    """
    x = tiles.gather(padded)  # (nb, C, B+4, B+4)
    mid = block.bn1(F.conv2d(x, block.conv1.weight)).relu_()  # (nb, C, B+2, B+2)
    out = block.bn2(F.conv2d(tiles.zero_outside_(mid, 1), block.conv2.weight))  # (nb, C, B, B)
    tiles.scatter_(padded, out.add_(x[:, :, HALO:-HALO, HALO:-HALO]).relu_())


def is_sparse(block: BasicBlock) -> bool:
    """Stride-1 blocks with an identity shortcut run sparsely; downsampling blocks stay dense."""
    return block.downsample is None and block.stride == 1


class SBNetResNet(ChannelsLastInEval):
    """CIFAR ResNet whose stride-1 residual blocks run on active tiles; `forward(x) -> (logits, info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net: CifarResNet = cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width)
        self.mask_net = MaskNet(cfg.in_channels, cfg.mask_hidden, cfg.mask_stride)
        self._frames: dict[tuple, Tensor] = {}  # padded NHWC buffers reused across calls (frames stay 0)

    def block_masks(self, mask_logits: Tensor) -> list[Tensor]:
        """One bool `(N, S/B, S/B)` block mask per stage from the predicted map `(N, 1, h, w)`."""
        cfg, prob = self.cfg, torch.sigmoid(mask_logits.detach())
        masks = []
        for size in stage_sizes(cfg):
            grid = size // cfg.block_size
            if cfg.density is not None:
                masks.append(topk_blocks(F.adaptive_avg_pool2d(prob, grid).squeeze(1), cfg.density))
            else:
                pixels = F.interpolate((prob > cfg.mask_threshold).float(), size=(size, size), mode="nearest")
                masks.append(reduce_mask(pixels.squeeze(1), cfg.block_size, cfg.tol, cfg.reduce_mode))
        return masks

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        x = x.contiguous(memory_format=torch.channels_last)
        mask_logits = self.mask_net(x)
        masks = self.block_masks(mask_logits)
        h = self.net.stem(x)
        for stage, mask in zip(self.net.stages, masks, strict=True):
            blocks = list(stage)
            while blocks and not is_sparse(blocks[0]):
                h = blocks.pop(0)(h)
            if blocks:
                h = self._train_stage(blocks, h, mask) if self.training else self._sparse_stage(blocks, h, mask)
        info = {"block_masks": masks, "mask_logits": mask_logits, "density": self._density(masks)}
        if self.training:
            target = foreground_target(x, self.cfg.mask_stride)
            info["aux_loss"] = self.cfg.mask_loss_weight * F.binary_cross_entropy_with_logits(mask_logits, target)
        return self.net.head(h), info

    def _density(self, masks: list[Tensor]) -> Tensor:
        """Active fraction of the sparse blocks' tiles (each stage weighted by its number of sparse blocks)."""
        weights = [sum(is_sparse(b) for b in stage) for stage in self.net.stages]
        total = sum(w * m[0].numel() for w, m in zip(weights, masks, strict=True))
        active = sum(w * m.float().sum(dim=(1, 2)) for w, m in zip(weights, masks, strict=True))
        return (active / max(total, 1)).mean()

    def _train_stage(self, blocks: list[BasicBlock], h: Tensor, mask: Tensor) -> Tensor:
        """Masked dense: active tiles take the block's output, the others keep its input."""
        on = pixel_mask(mask, self.cfg.block_size)
        for block in blocks:
            h = torch.where(on, block(h), h)
        return h

    def _sparse_stage(self, blocks: list[BasicBlock], h: Tensor, mask: Tensor) -> Tensor:
        """Gather-conv-scatter on active tiles only, in place on a padded NHWC copy of the stage's map."""
        tiles = Tiles(mask, self.cfg.block_size, HALO)
        if tiles.count == 0:  # no active tile: the stage's residual branches are never called
            return h
        key = (tuple(h.shape), h.dtype, h.device)
        padded = self._frames[key] = pad_nhwc(h, HALO, self._frames.get(key))
        for block in blocks:
            sparse_residual_(block, padded, tiles)
        return interior(padded, HALO)


class DenseResNet(ChannelsLastInEval):
    """The same CIFAR ResNet with every block dense; parameters under `net.` as in `SBNetResNet`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(x.contiguous(memory_format=torch.channels_last)), {}


def build(cfg: Config | None = None) -> SBNetResNet:
    cfg = cfg or Config()
    _check(cfg)
    return SBNetResNet(cfg)


def build_baseline(cfg: Config | None = None) -> DenseResNet:
    cfg = cfg or Config()
    _check(cfg)
    return DenseResNet(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def summarize(info: dict) -> dict:
    """Active-tile fraction overall and per stage."""
    if "block_masks" not in info:
        return {"active_tiles": 1.0}
    per_stage = [float(m.float().mean()) for m in info["block_masks"]]
    return {
        "active_tiles": round(float(info["density"]), 4),
        "active_per_stage": " ".join(f"{d:.2f}" for d in per_stage),
    }


# --------------------------------------------------------------------------------------------------
# Figure


def photo_input(cfg, size: int) -> tuple[Tensor, Tensor]:
    """The two `sample_photos()` as `(display in [0, 1], standardized input with cfg.in_channels)`."""
    photos = sample_photos(size)
    x = (photos - photos.mean(dim=(1, 2, 3), keepdim=True)) / photos.std(dim=(1, 2, 3), keepdim=True)
    if cfg.in_channels != 3:
        x = x.mean(dim=1, keepdim=True).expand(-1, cfg.in_channels, -1, -1)
    return photos, x


def draw_blocks(ax, image: Tensor, mask: Tensor, color: str = "red", title: str = "") -> None:
    """`image (3, H, W)` with the active blocks of `mask (Hb, Wb)` outlined and tinted."""
    from matplotlib.patches import Rectangle  # noqa: PLC0415 - only where a figure is drawn

    h, w = image.shape[1:]
    hb, wb = mask.shape
    bh, bw = h / hb, w / wb
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    for by, bx in mask.nonzero().tolist():
        ax.add_patch(Rectangle((bx * bw - 0.5, by * bh - 0.5), bw, bh, facecolor=color, alpha=0.25,
                               edgecolor=color, linewidth=0.8))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


@torch.no_grad()
def decision_figure(cfg: Config | None = None):
    """The two photos with the predicted foreground map and each stage's active tiles."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - only where a figure is drawn

    cfg = cfg or Config(depth=20, width=32, image_size=128, block_size=16, density=0.3)
    torch.manual_seed(0)
    model = build(cfg).eval()
    photos, x = photo_input(cfg, cfg.image_size)
    _, info = model(x)
    prob = torch.sigmoid(info["mask_logits"])[:, 0]
    fig = Figure(figsize=(2.3 * 4, 2.5 * len(photos) + 0.4), layout="constrained")
    axes = fig.subplots(len(photos), 4, squeeze=False)
    for i, photo in enumerate(photos):
        axes[i][0].imshow(prob[i].numpy(), cmap="magma", vmin=0, vmax=1)
        axes[i][0].set_xticks([])
        axes[i][0].set_yticks([])
        axes[i][0].set_title("mask network output", fontsize=8)
        for s, mask in enumerate(info["block_masks"], start=1):
            size = stage_sizes(cfg)[s - 1]
            draw_blocks(axes[i][s], photo, mask[i], title=f"stage {s} ({size} px): "
                        f"{100 * float(mask[i].float().mean()):.0f}% tiles")
    fig.suptitle(f"SBNet: active {cfg.block_size}x{cfg.block_size} tiles per stage (red; untrained mask "
                 "network unless loaded)", fontsize=9)
    return fig
