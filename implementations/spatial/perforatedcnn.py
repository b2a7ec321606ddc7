"""# PerforatedCNNs: acceleration through elimination of redundant convolutions

[Figurnov, Ibraimova, Vetrov and Kohli, NIPS 2016](https://arxiv.org/abs/1504.08362) (official code:
[mfigurnov/perforated-cnn-matconvnet](https://github.com/mfigurnov/perforated-cnn-matconvnet),
[mfigurnov/perforated-cnn-caffe](https://github.com/mfigurnov/perforated-cnn-caffe)).

## What is dynamic

Nothing depends on the input: this is a **static** spatial-skipping baseline, listed with the per-pixel
methods because it skips the same unit (output pixels of a convolution) with the same machinery.

- **Unit:** the output pixels of every 3x3 convolution of a VGG-16-style network.
- **Decided by:** a fixed perforation mask per layer, drawn once at build time from `pattern`:
  - `grid`: the paper's grid perforation, the product of a pseudo-random increasing sequence of rows
    and one of columns (the integer sequences of fractional max-pooling, `ceil(alpha * (i + u))`), each
    keeping a fraction `sqrt(1 - rate)` of its axis;
  - `uniform`: a uniformly random subset of `(1 - rate) * H * W` pixels.
- **When:** the same mask for every sample, in train and eval. The convolution runs **only at the kept
  pixels** (`kernels.sparse_conv2d`); every perforated pixel then takes the value of its nearest kept
  pixel (Euclidean distance, the paper's nearest-neighbour interpolation), a gather with a precomputed
  index map and no MACs. BatchNorm and ReLU follow on the interpolated map, as in the dense network.
  Training fine-tunes the network with the perforation in place (the kernel's backward passes the
  gradient of the kept pixels), as the paper does after choosing the masks.

`info` holds `masks` (one bool `(H_l, W_l)` per perforated layer, shared by the batch) and `kept`
(the kept fraction of every layer). There is no policy and no `aux_loss`.

## Operating point

- `rate` is the perforation rate, the fraction of output pixels skipped in every perforated layer
  (the paper picks one rate per layer; we use one rate for all). Executed conv MACs fall as
  `1 - rate`; `rate=0` is the dense network.
- `width` scales VGG-16 (64 is the paper's network; 16, at 32x32, is the digits default).

## Simplifications against the paper

- The same rate in every layer instead of per-layer rates picked greedily by their estimated impact on
  the loss; no impact-based or pooling-structure masks.
- A VGG-16 layout with BatchNorm, global average pooling and one linear classifier (the paper's VGG-16
  and AlexNet have large fully connected heads and no BatchNorm); masks are pseudo-random with a fixed
  seed rather than tuned.
- The kernel's masked conv writes zeros at perforated pixels and the interpolation gathers afterwards;
  the paper instead reduces the im2col matrix and lets the next layer read through the index map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.train import TrainSettings
from implementations.spatial.dynconv import _MEAN, _STD, photo_batch, sample_photos, sparse_backend
from kernels.sparse_conv import sparse_conv2d

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
PATTERNS = ("grid", "uniform")


@dataclass
class Config:
    width: int = 16  # channels of the first stage (VGG-16: 64); later stages scale with it
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    rate: float = 0.5  # perforation rate: fraction of output pixels skipped in every perforated layer
    pattern: str = "grid"  # grid | uniform
    min_size: int = 4  # layers with a smaller output side are not perforated
    seed: int = 0  # seed of the pseudo-random masks
    backend: str | None = None  # kernel backend (None: $DYNNET_KERNEL_BACKEND, else the sparse path)
    channels_last: bool = True  # both networks run in NHWC memory (whole-pixel gathers and fills)


TRAIN = TrainSettings(epochs=4, lr=3e-3, batch_size=64)


def _check(cfg: Config) -> None:
    if not 0.0 <= cfg.rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {cfg.rate!r}")
    if cfg.pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {cfg.pattern!r}")
    if cfg.width < 1 or cfg.image_size < 32:
        raise ValueError(f"width must be >= 1 and image_size >= 32, got {cfg.width!r}, {cfg.image_size!r}")


# ---------------------------------------------------------------- masks and interpolation


def grid_axis(size: int, keep: int, gen: torch.Generator) -> Tensor:
    """`keep` increasing indices in [0, size): `ceil(alpha * (i + u)) - 1`, `alpha = size / keep`."""
    if keep >= size:
        return torch.arange(size)
    alpha, u = size / keep, float(torch.rand((), generator=gen)) * 0.999 + 0.0005
    return torch.tensor([min(size - 1, math.ceil(alpha * (i + u)) - 1) for i in range(keep)])


def perforation_mask(h: int, w: int, rate: float, pattern: str, gen: torch.Generator) -> Tensor:
    """Bool `(h, w)` of the kept pixels; about `(1 - rate) * h * w` of them, at least one."""
    if rate <= 0:
        return torch.ones(h, w, dtype=torch.bool)
    if pattern == "grid":
        keep = math.sqrt(1 - rate)
        rows = grid_axis(h, max(1, round(keep * h)), gen)
        cols = grid_axis(w, max(1, round(keep * w)), gen)
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[rows.view(-1, 1), cols.view(1, -1)] = True
        return mask
    n_keep = max(1, round((1 - rate) * h * w))
    mask = torch.zeros(h * w, dtype=torch.bool)
    mask[torch.randperm(h * w, generator=gen)[:n_keep]] = True
    return mask.view(h, w)


def nearest_kept(mask: Tensor) -> Tensor:
    """For every pixel of `mask (H, W)`, the flat index of the nearest kept pixel: `(H * W,)` int64
    (Euclidean distance; ties go to the lowest index). Kept pixels map to themselves."""
    h, w = mask.shape
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).view(-1, 2).float()
    kept = mask.flatten().nonzero().squeeze(1)
    dist = torch.cdist(coords, coords[kept])  # (H*W, n_kept)
    return kept[dist.argmin(dim=1)]


def interpolate(y: Tensor, index: Tensor) -> Tensor:
    """Nearest-neighbour fill: `y (N, C, H, W)` -> `y` with pixel p replaced by pixel `index[p]`.

    A gather of whole pixel rows when `y` is channels_last, else a `gather` along the flat pixel axis
    (both about one copy of `y`; `index_select` on the last axis is many times slower on CPU).
    """
    n, c, h, w = y.shape
    if not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last):
        rows = y.permute(0, 2, 3, 1).reshape(n, h * w, c).index_select(1, index)
        return rows.view(n, h, w, c).permute(0, 3, 1, 2)
    flat = y.reshape(n, c, h * w)
    return torch.gather(flat, 2, index.expand(n, c, -1)).view(n, c, h, w)


# ---------------------------------------------------------------- the network


class PerforatedConv(nn.Module):
    """3x3 conv + BN + ReLU evaluated at a fixed set of pixels, the others filled from the nearest one.

    `(N, C_in, H, W) -> (N, C_out, H, W)`. With `mask is None` it is the plain dense layer.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.backend: str | None = None
        self.register_buffer("mask", None, persistent=False)
        self.register_buffer("index", None, persistent=False)

    def perforate(self, mask: Tensor | None, backend: str | None) -> None:
        """Fix the kept pixels (`(H, W)` bool, or None for dense) and precompute the fill index."""
        self.backend = backend
        if mask is None or bool(mask.all()):
            self.mask, self.index = None, None
        else:
            self.mask, self.index = mask, nearest_kept(mask)

    def forward(self, x: Tensor) -> Tensor:
        if self.mask is None:
            y = self.conv(x)
        else:
            mask = self.mask.unsqueeze(0).expand(x.shape[0], -1, -1)
            y = sparse_conv2d(x, mask, self.conv.weight, None, 1, 1, backend=sparse_backend(self.backend, x))
            y = interpolate(y, self.index)
        return F.relu(self.bn(y), inplace=True)


class VGG(nn.Module):
    """VGG-16 layout (13 3x3 convs in five stages, max-pooling), global average pool, linear head.

    `forward(x (N, C, S, S)) -> (logits (N, K), info)`.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
        for item in VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                c_out = max(1, item * cfg.width // 64)
                layers.append(PerforatedConv(c_in, c_out))
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, cfg.num_classes)
        self.channels_last = cfg.channels_last
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def convs(self) -> list[PerforatedConv]:
        return [m for m in self.features if isinstance(m, PerforatedConv)]

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        h = self.features(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
        logits = self.fc(h.mean(dim=(2, 3)))
        masks = [c.mask for c in self.convs() if c.mask is not None]
        info = {"masks": masks, "kept": torch.tensor([float(m.float().mean()) for m in masks])} if masks else {}
        return logits, info


def conv_sizes(cfg: Config) -> list[int]:
    """Output side of every conv layer of the VGG-16 layout at `image_size`."""
    sizes, side = [], cfg.image_size
    for item in VGG16:
        if item == "M":
            side //= 2
        else:
            sizes.append(side)
    return sizes


def build(cfg: Config | None = None) -> VGG:
    cfg = cfg or Config()
    _check(cfg)
    model = VGG(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    for conv, side in zip(model.convs(), conv_sizes(cfg), strict=True):
        mask = perforation_mask(side, side, cfg.rate, cfg.pattern, gen) if side >= cfg.min_size else None
        conv.perforate(mask, cfg.backend)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def build_baseline(cfg: Config | None = None) -> VGG:
    cfg = cfg or Config()
    _check(cfg)
    model = VGG(cfg)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    """Real photo crops `(N, in_channels, image_size, image_size)`, ImageNet-normalized."""
    return photo_batch(batch_size, cfg.image_size, cfg.in_channels, seed=0)


def summarize(info: dict) -> dict:
    """Kept fraction of the output pixels of every perforated layer (the same for every sample)."""
    if "kept" not in info:
        return {"perforated_layers": 0}
    kept = info["kept"]
    return {
        "perforated_layers": len(kept),
        "mean_kept": round(float(kept.mean()), 4),
        "kept_per_layer": " ".join(f"{k:.2f}" for k in kept.tolist()),
    }


def decision_figure(cfg: Config | None = None):
    """A photo, the perforation masks of the first layer of three stages, and one feature map of the
    first perforated layer computed densely and perforated + interpolated."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cfg = cfg or Config(width=64, image_size=64)
    torch.manual_seed(0)
    model = build(cfg).eval()
    dense = build_baseline(cfg).eval()
    dense.load_state_dict(model.state_dict())
    photo = sample_photos(cfg.image_size)[1:2]
    x = (photo - torch.tensor(_MEAN).view(1, 3, 1, 1)) / torch.tensor(_STD).view(1, 3, 1, 1)
    if cfg.in_channels != 3:
        x = x.mean(1, keepdim=True).expand(-1, cfg.in_channels, -1, -1)
    perforated = [c for c in model.convs() if c.mask is not None]
    pos = list(model.features).index(perforated[0])
    with torch.no_grad():
        h = model.features[:pos](x)
        fmap_dense = dense.features[pos](h)[0, 0]
        fmap_perf = model.features[pos](h)[0, 0]
    picks = perforated[:: max(1, len(perforated) // 3)][:3]
    fig, axes = plt.subplots(1, 3 + len(picks), figsize=(3 * (3 + len(picks)), 3.4))
    axes[0].imshow(photo[0].permute(1, 2, 0).numpy())
    axes[0].set_title("input")
    for ax, conv in zip(axes[1:], picks, strict=False):
        ax.imshow(conv.mask.numpy(), cmap="Greys_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{conv.mask.shape[0]}x{conv.mask.shape[1]}: {100 * float(conv.mask.float().mean()):.0f}% kept")
    axes[-2].imshow(fmap_dense.numpy(), cmap="viridis")
    axes[-2].set_title("feature map, dense")
    axes[-1].imshow(fmap_perf.numpy(), cmap="viridis")
    axes[-1].set_title("perforated + filled")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"PerforatedCNN, {cfg.pattern} masks at rate {cfg.rate} (white = computed)")
    fig.tight_layout()
    return fig
