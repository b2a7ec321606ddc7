"""# RS-Nets: Resolution Switchable Networks

[Wang, Sun, Li and Yao, ECCV 2020](https://arxiv.org/abs/2007.09558)
(official code, PyTorch: [yikaiw/RS-Nets](https://github.com/yikaiw/RS-Nets)).

## What is dynamic

- **Unit:** the input resolution of the whole network: one set of convolution and fully connected
  weights is shared by every resolution, and every resolution has its own (*private*) BatchNorm
  layers (statistics and affine parameters).
- **Decided by:** nobody inside the network. The resolution is a **runtime switch** (`resolution`),
  set from outside to fit the available compute; it is **not** input-conditional: every image of a
  batch runs at the same resolution and no policy is learned. The image is resized (bilinear,
  antialiased) from its native `image_size` to the chosen size and the backbone runs with that
  resolution's BatchNorms; the MACs shrink with the square of the side.
- **When:** per call (per deployment), in eval.

Training is the paper's joint training over all resolutions with *multi-resolution ensemble
distillation* (MRED, as in the official code): every batch runs at every resolution; the loss is the
sum of the resolutions' cross-entropies, plus the cross-entropy of the ensemble teacher
`sum_j softmax(alpha)_j * logits_j` (learned importance `alpha`, the logits detached), plus the
distillation of every resolution from the teacher and, top-down, from every larger resolution
(KL divergences, weighted `2 / (R + 1)`: the full `ens_topdown` variant; `distill="ens"` keeps only
the teacher term, `"none"` none).

`info` holds `resolution (N,)` and `resolution_index (N,)` (all equal: a switch, not a decision per
image) and, in train mode, `logits` (one `(N, K)` tensor per resolution) and `alpha`.

## Operating point

`resolution` (one of `resolutions`) is the switch; executed MACs fall about as
`(resolution / image_size)^2`. The paper's resolutions are 224, 192, 160, 128 and 96 px (ResNet-18/50,
MobileNetV2 on ImageNet). The baseline (`build_baseline`) is the same backbone with ordinary
BatchNorms at the native resolution; `resolution = image_size` runs exactly that computation.

## Simplifications against the paper

- The default `Config` is a small CIFAR ResNet on 32x32 digits with five sizes of the paper's ratios;
  `arch` selects the ImageNet backbones for measurement.
- No quantized variants (the paper also trains low-bit RS-Nets).
- Per-resolution data augmentation (random resized crops at each size) is replaced by resizing the
  same batch to every size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.data import sample_photos
from implementations.common.mobilenet import mobilenet_v2
from implementations.common.resnet import cifar_resnet, resnet18, resnet50
from implementations.common.train import TrainSettings

ARCHS = ("cifar", "resnet18", "resnet50", "mobilenet_v2")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Config:
    arch: str = "cifar"  # cifar (CIFAR ResNet of `depth`, `width`) | resnet18 | resnet50 | mobilenet_v2
    depth: int = 8
    width: int = 8
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32  # native input size (the largest resolution)
    resolutions: tuple[int, ...] = (32, 28, 24, 20, 16)  # trained sizes, largest first (paper: 224 ... 96)
    resolution: int = 24  # the runtime switch: the size the eval forward runs at
    distill: str = "ens_topdown"  # MRED variant: ens_topdown (full) | ens (teacher only) | none


TRAIN = TrainSettings(epochs=6, lr=3e-3, batch_size=64)


def _check(cfg: Config) -> None:
    if cfg.arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {cfg.arch!r}")
    res = tuple(cfg.resolutions)
    if not res or list(res) != sorted(set(res), reverse=True) or res[-1] < 8:
        raise ValueError(f"resolutions must be distinct sizes >= 8, largest first, got {res!r}")
    if res[0] != cfg.image_size:
        raise ValueError(f"resolutions must start at image_size={cfg.image_size}, got {res!r}")
    if cfg.resolution not in res:
        raise ValueError(f"resolution must be one of {res!r}, got {cfg.resolution!r}")
    if cfg.distill not in ("ens_topdown", "ens", "none"):
        raise ValueError(f"distill must be 'ens_topdown', 'ens' or 'none', got {cfg.distill!r}")


# -- private BatchNorm per resolution (shared with DRNet's "resolution-aware BN") ---------------------


class Switch:
    """The active resolution index, shared by every switchable BatchNorm of one network."""

    def __init__(self) -> None:
        self.index = 0


class SwitchableBatchNorm2d(nn.BatchNorm2d):
    """One BatchNorm per resolution: index 0 is this module's own (inherited) parameters and
    statistics, so a plain network's `bn.weight`, `bn.running_mean`, ... load unchanged; index `j > 0`
    is `others[j - 1]`. `(N, C, H, W) -> (N, C, H, W)`."""

    def __init__(self, bn: nn.BatchNorm2d, num_resolutions: int, switch: Switch) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.others = nn.ModuleList(
            nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
            for _ in range(num_resolutions - 1)
        )
        for other in self.others:
            other.load_state_dict(bn.state_dict())
        self.switch = switch

    def forward(self, x: Tensor) -> Tensor:
        i = self.switch.index
        return super().forward(x) if i == 0 else self.others[i - 1](x)


def private_batchnorms(model: nn.Module, num_resolutions: int) -> Switch:
    """Replace every `nn.BatchNorm2d` of `model` in place by a `SwitchableBatchNorm2d`; return the switch."""
    switch = Switch()
    parents = [m for m in model.modules() if not isinstance(m, nn.BatchNorm2d)]
    for parent in parents:
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(parent, name, SwitchableBatchNorm2d(child, num_resolutions, switch))
    return switch


def make_backbone(cfg) -> nn.Module:
    """The plain backbone named by `cfg.arch` (ordinary BatchNorms)."""
    if cfg.arch == "cifar":
        return cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width)
    if cfg.arch == "resnet18":
        return resnet18(cfg.num_classes, cfg.in_channels)
    if cfg.arch == "resnet50":
        return resnet50(cfg.num_classes, cfg.in_channels)
    return mobilenet_v2(cfg.num_classes, in_channels=cfg.in_channels)


def resize(x: Tensor, size: int, antialias: bool = True) -> Tensor:
    """`(N, C, H, W) -> (N, C, size, size)` bilinear; the input itself when it already has that size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


# -- the method ---------------------------------------------------------------------------------------


class RSNet(nn.Module):
    """Backbone with shared weights and private BatchNorms per resolution; `forward(x) -> (logits, info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.resolutions = tuple(cfg.resolutions)
        self.net = make_backbone(cfg)
        self.switch = private_batchnorms(self.net, len(self.resolutions))
        self.alpha = nn.Parameter(torch.ones(len(self.resolutions)))  # MRED ensemble importance

    def run_at(self, x: Tensor, j: int) -> Tensor:
        """Logits `(N, K)` of `x` resized to `resolutions[j]`, with that resolution's BatchNorms."""
        self.switch.index = j
        return self.net(resize(x, self.resolutions[j]))

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        j = self.resolutions.index(self.cfg.resolution)
        index = torch.full((len(x),), j, dtype=torch.long, device=x.device)
        info = {"resolution_index": index, "resolution": torch.full_like(index, self.cfg.resolution)}
        if not self.training:
            return self.run_at(x, j), info
        logits = [self.run_at(x, i) for i in range(len(self.resolutions))]
        info.update(logits=logits, alpha=self.alpha, distill=self.cfg.distill)
        return logits[j], info


class Baseline(nn.Module):
    """The plain backbone at the native resolution; parameter names as in `RSNet.net`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = make_backbone(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(x), {}


def mred_loss(logits: list[Tensor], alpha: Tensor, target: Tensor, distill: str) -> Tensor:
    """Multi-resolution ensemble distillation; `logits` largest resolution first, each `(N, K)`."""
    loss = sum(F.cross_entropy(z, target) for z in logits)
    w = torch.softmax(alpha, dim=0)
    ensemble = sum(w[j] * z.detach() for j, z in enumerate(logits))
    loss = loss + F.cross_entropy(ensemble, target)
    if distill == "none":
        return loss
    teacher = torch.softmax(ensemble.detach(), dim=1)
    kd = 0.0
    for j, z in enumerate(logits):
        logp = F.log_softmax(z, dim=1)
        kd = kd + F.kl_div(logp, teacher, reduction="batchmean")
        if distill == "ens_topdown":
            for bigger in logits[:j]:
                kd = kd + F.kl_div(logp, torch.softmax(bigger.detach(), dim=1), reduction="batchmean")
    scale = 2.0 / (len(logits) + 1) if distill == "ens_topdown" else 1.0
    return loss + scale * kd


def loss(output: Tensor, info: dict, target: Tensor) -> Tensor:
    """MRED over all resolutions in training (plain cross-entropy for the baseline)."""
    if "logits" not in info:
        return F.cross_entropy(output, target)
    return mred_loss(info["logits"], info["alpha"], target, info["distill"])


def build(cfg: Config | None = None) -> RSNet:
    cfg = cfg or Config()
    _check(cfg)
    return RSNet(cfg)


def build_baseline(cfg: Config | None = None) -> Baseline:
    cfg = cfg or Config()
    _check(cfg)
    return Baseline(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def summarize(info: dict) -> dict:
    """The resolution the batch ran at (the same for every image: a runtime switch)."""
    res = info["resolution"] if "resolution" in info else None
    return {"resolution": int(res[0]) if res is not None and res.numel() else "native"}


def photo_batch(cfg, size: int | None = None) -> tuple[Tensor, Tensor]:
    """The two `sample_photos()` at `cfg.image_size`: `(display in [0, 1], normalized network input)`."""
    photos = sample_photos(size or cfg.image_size)
    mean, std = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    x = (photos - mean) / std
    if cfg.in_channels != 3:
        x = x.mean(dim=1, keepdim=True).expand(-1, cfg.in_channels, -1, -1)
    return photos, x


def resolution_grid(photos: Tensor, resolutions: tuple[int, ...], chosen: list[int], macs: list[float],
                    title: str, antialias: bool = True):
    """Figure: one row per photo, one column per resolution (resized as the network resizes), the
    chosen one framed in red."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - only where a figure is drawn

    rows, cols = len(photos), len(resolutions)
    fig = Figure(figsize=(2.1 * cols, 2.3 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        for j, r in enumerate(resolutions):
            ax = axes[i][j]
            img = resize(photos[i : i + 1], r, antialias).clamp(0, 1)[0].permute(1, 2, 0).numpy()
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            cost = f"{macs[j] / 1e9:.2f} G" if macs[j] >= 1e8 else f"{macs[j] / 1e6:.1f} M"
            ax.set_title(f"{r} px, {cost} MACs", fontsize=8)
            pick = j == chosen[i]
            for spine in ax.spines.values():
                spine.set_color("red" if pick else "lightgray")
                spine.set_linewidth(3 if pick else 0.5)
    fig.suptitle(title, fontsize=9)
    return fig


def macs_per_resolution(run_at, x: Tensor, count: int) -> list[float]:
    """Executed MACs per image of `run_at(x, j)` for each resolution index `j < count`."""
    from catalog.costs import count_macs  # noqa: PLC0415 - the catalog's counter, only for the figure

    return [count_macs(lambda j=j: run_at(x[:1], j)) for j in range(count)]


FIGURE_CONFIG = Config(arch="resnet18", num_classes=1000, image_size=224,
                       resolutions=(224, 192, 160, 128, 96), resolution=128)


@torch.no_grad()
def decision_figure(cfg: Config | None = None):
    """The two real photos at every resolution as the network sees them; the switched-on one framed.

    Default: ResNet-18 at the paper's resolutions, switched to 128 px.
    """
    cfg = cfg or FIGURE_CONFIG
    torch.manual_seed(0)
    model = build(cfg).eval()
    photos, x = photo_batch(cfg)
    _, info = model(x)
    macs = macs_per_resolution(model.run_at, x, len(model.resolutions))
    chosen = info["resolution_index"].tolist()
    return resolution_grid(photos, model.resolutions, chosen, macs,
                           f"RS-Net switched to {cfg.resolution} px (the same for every image)")
