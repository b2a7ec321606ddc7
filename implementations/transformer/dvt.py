"""# DVT: Dynamic Vision Transformer ("Not All Images are Worth 16x16 Words")

[Wang, Huang, Song, Huang and Huang, NeurIPS 2021](https://arxiv.org/abs/2105.15075)
(official code: [blackfeather-wang/Dynamic-Vision-Transformer](https://github.com/blackfeather-wang/Dynamic-Vision-Transformer)).

## What is dynamic

- **Unit:** the number of tokens an image is split into. DVT cascades `S` transformers of the same
  architecture that see the same image as increasingly fine token grids (the paper: 7x7, 10x10,
  14x14); stage `k` embeds the image resized to `grid_k * patch` pixels.
- **Decided by:** the confidence of each stage's prediction, its maximum softmax probability: an
  image whose confidence reaches the stage's threshold leaves with that stage's prediction; the last
  stage always answers.
- **When:** per image, in eval, after each stage. Training runs every stage on every image and
  minimizes the sum of the stages' cross-entropies (the module's `loss`).

In `eval()` exited images **leave the batch for real**: stage `k + 1` embeds and runs only the images
that stayed (gathered with `index_select`); when none stays the later stages are not called.

**Feature reuse** (as in the paper): the class token of the previous stage's last layer goes through a
small MLP (LayerNorm, linear to `reuse_dim`, GELU) and is concatenated to the input of the FFN of
every layer of the next stage. The concatenation is written as its equivalent sum: the context's own
`reuse_dim x hidden` slice of `fc1` is applied once per image (not once per token, the same result
for fewer MACs) and added to `fc1` of every token. Those per-layer slices start at zero, so an
untrained cascade's last stage computes exactly the plain ViT.

`info` holds `exit_index (N,)` (0 .. S-1), `exit_counts (S,)`, `confidence (N,)` (of the stage each
image left at) and, in train mode, `exit_logits` (a list of S `(N, K)` tensors).

## Operating point

Thresholds come from `exit_fractions` (one fraction per stage, summing to 1): `build` calibrates them
on a fixed calibration batch (`calibration_size` random images, seed `calibration_seed`) so that those
fractions of the images leave at each stage, as the paper picks thresholds on held-out data for a
compute budget. With the default seed the calibration batch is `example_input(cfg, calibration_size)`,
the measured input, so an untrained model measured at batch `calibration_size` leaves at exactly the
configured fractions (on other inputs, the fractions hold only approximately: the confidences of an
untrained cascade differ little from image to image). Moving mass to earlier stages lowers executed MACs
monotonically. `thresholds` overrides the calibration. After training, the first `eval()` recalibrates
on the last `recalibration_size` training images (the trained confidences are far from the untrained
ones); `model.calibrate(x)` recalibrates on any batch.

The measured operating point (ours: the paper does not state exit fractions; its budgets put most
ImageNet images in the first stage) is DeiT-S at 224 px with the paper's 7x7, 10x10 and 14x14 grids
and exit fractions 0.6 / 0.3 / 0.1. The dense baseline is the largest stage alone (a DeiT-S on 14x14
tokens), the paper's comparison.

## Simplifications against the paper

- DeiT-S stages (the paper's DeiT experiments; its headline models are T2T-ViT-12/14); the default
  `Config` is a small ViT (dim 64, depth 4) on 32x32 images with 2x2, 3x3 and 4x4 token grids of
  8 px patches (the digits are 8x8 images upsampled: a token covers 2x2 of their pixels at 4x4).
- No relationship reuse (the previous stage's attention logits added to the next stage's); feature
  reuse only, with a context width `reuse_dim` of our choice.
- Stages are trained jointly from scratch with equal weights; the paper trains on ImageNet with its
  own recipe. Thresholds are calibrated by quantiles of the confidence on a batch (training images
  after `--train`), not searched on a validation set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.train import TrainSettings
from implementations.common.vit import VisionTransformer


@dataclass
class Config:
    image_size: int = 32  # the input; must equal token_grids[-1] * patch
    patch: int = 8
    token_grids: tuple[int, ...] = (2, 3, 4)  # tokens per side of each stage (the paper: 7, 10, 14)
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    in_channels: int = 3
    exit_fractions: tuple[float, ...] = (0.6, 0.3, 0.1)  # share of images leaving at each stage (sum 1)
    thresholds: tuple[float, ...] | None = None  # confidence thresholds of stages 1 .. S-1; overrides
    feature_reuse: bool = True
    reuse_dim: int = 32  # width of the reused class-token context
    calibration_size: int = 64  # images of the fixed calibration batch used by `build`
    calibration_seed: int = 0  # of the calibration batch (0: the first images of `example_input`)
    recalibration_size: int = 512  # training images kept to recalibrate after training (0: never)


TRAIN = TrainSettings(epochs=10, lr=1e-3, batch_size=32)  # small batches: a ViT needs the steps


def _check(cfg: Config) -> None:
    s = len(cfg.token_grids)
    if s < 2 or list(cfg.token_grids) != sorted(set(cfg.token_grids)) or cfg.token_grids[0] < 1:
        raise ValueError(f"token_grids must be >= 2 increasing positive sizes, got {cfg.token_grids!r}")
    if cfg.token_grids[-1] * cfg.patch != cfg.image_size:
        raise ValueError(f"image_size must equal token_grids[-1] * patch = {cfg.token_grids[-1] * cfg.patch}, "
                         f"got {cfg.image_size!r}")
    if len(cfg.exit_fractions) != s or any(f < 0 for f in cfg.exit_fractions) \
            or abs(sum(cfg.exit_fractions) - 1) > 1e-6:
        raise ValueError(f"exit_fractions must hold {s} non-negative values summing to 1, got {cfg.exit_fractions!r}")
    if cfg.thresholds is not None and len(cfg.thresholds) != s - 1:
        raise ValueError(f"thresholds must hold one value per stage but the last ({s - 1}), got {cfg.thresholds!r}")
    if cfg.calibration_size < 1 or cfg.recalibration_size < 0:
        raise ValueError("calibration_size must be >= 1 and recalibration_size >= 0, "
                         f"got {cfg.calibration_size!r} and {cfg.recalibration_size!r}")


def confidence(logits: Tensor) -> Tensor:
    """DVT's exit score: `(N, K) -> (N,)` maximum softmax probability."""
    return logits.softmax(dim=1).amax(dim=1)


def threshold_for(conf: Tensor, n_exit: int) -> float:
    """A threshold letting exactly the `n_exit` most confident of `conf (n,)` pass `conf >= t`."""
    if n_exit <= 0:
        return 2.0  # no confidence reaches it
    if n_exit >= len(conf):
        return 0.0
    c = conf.sort(descending=True).values
    return float((c[n_exit - 1] + c[n_exit]) / 2)


class FeatureReuse(nn.Module):
    """Previous stage's class token `(N, dim)` -> per-layer FFN context `(N, depth, hidden)`."""

    def __init__(self, dim: int, reuse_dim: int, depth: int, hidden: int) -> None:
        super().__init__()
        self.depth, self.hidden = depth, hidden
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, reuse_dim)
        self.to_layers = nn.Linear(reuse_dim, depth * hidden, bias=False)  # fc1's slice for the context
        nn.init.zeros_(self.to_layers.weight)

    def forward(self, cls_token: Tensor) -> Tensor:
        c = F.gelu(self.proj(self.norm(cls_token)))
        return self.to_layers(c).view(len(cls_token), self.depth, self.hidden)


def make_stage(cfg: Config, grid: int) -> VisionTransformer:
    """One cascade stage: a ViT on `grid x grid` patches of `patch` px (image resized to `grid * patch`)."""
    return VisionTransformer(grid * cfg.patch, cfg.patch, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio,
                             cfg.num_classes, cfg.in_channels)


def run_stage(vit: VisionTransformer, x: Tensor, context: Tensor | None) -> Tensor:
    """Tokens `(N, 1 + g^2, dim)` after the last block; `context (N, depth, hidden)` joins every FFN."""
    h = vit.stem(x)
    for layer, block in enumerate(vit.blocks):
        h = h + block.attn_residual(h)
        if context is None:
            h = h + block.mlp_residual(h)
        else:
            mlp = block.mlp
            h = h + mlp.fc2(mlp.act(mlp.fc1(block.norm2(h)) + context[:, layer, None]))
    return h


class DynamicViT(nn.Module):
    """DVT cascade; `forward(x (N, C, S, S)) -> (logits (N, K), info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.stages = nn.ModuleList(make_stage(cfg, g) for g in cfg.token_grids)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.reuse = nn.ModuleList(FeatureReuse(cfg.dim, cfg.reuse_dim, cfg.depth, hidden)
                                   for _ in cfg.token_grids[1:]) if cfg.feature_reuse else None
        self.thresholds: tuple[float, ...] = tuple(cfg.thresholds or (2.0,) * (len(cfg.token_grids) - 1))
        self._recent: list[Tensor] = []  # last training inputs, for recalibration after training
        self._trained_since_calibration = False

    def stage(self, k: int, x: Tensor, prev_cls: Tensor | None) -> Tensor:
        """Tokens of stage `k` on `x` at full resolution (resized here); `prev_cls (N, dim)` or None."""
        size = self.cfg.token_grids[k] * self.cfg.patch
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        context = None if self.reuse is None or prev_cls is None else self.reuse[k - 1](prev_cls)
        return run_stage(self.stages[k], x, context)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self._forward_train(x) if self.training else self._forward_eval(x)

    def train(self, mode: bool = True) -> DynamicViT:
        if not mode and self._trained_since_calibration and self._recent:
            super().train(False)
            self.calibrate(torch.cat(self._recent)[-self.cfg.recalibration_size:])
            self._recent, self._trained_since_calibration = [], False
        return super().train(mode)

    def _forward_train(self, x: Tensor) -> tuple[Tensor, dict]:
        if self.cfg.recalibration_size:
            self._recent = [*self._recent, x.detach()][-(self.cfg.recalibration_size // max(len(x), 1) + 1):]
            self._trained_since_calibration = True
        exit_logits, prev = [], None
        for k, vit in enumerate(self.stages):
            tokens = self.stage(k, x, prev)
            exit_logits.append(vit.head(tokens))
            prev = tokens[:, 0]
        s = len(self.stages)
        exit_index = torch.full((len(x),), s - 1, dtype=torch.long, device=x.device)
        info = {"exit_logits": exit_logits, "exit_index": exit_index,
                "exit_counts": torch.bincount(exit_index, minlength=s)}
        return exit_logits[-1], info

    def _forward_eval(self, x: Tensor) -> tuple[Tensor, dict]:
        n, s = len(x), len(self.stages)
        out = x.new_empty(n, self.cfg.num_classes)
        conf_out = x.new_empty(n)
        exit_index = torch.full((n,), s - 1, dtype=torch.long, device=x.device)
        rows = torch.arange(n, device=x.device)  # original row of each remaining image
        xs, prev = x, None
        for k, vit in enumerate(self.stages):
            tokens = self.stage(k, xs, prev)
            logits = vit.head(tokens)
            conf = confidence(logits)
            if k == s - 1:
                out[rows], conf_out[rows] = logits, conf
                break
            leave = conf >= self.thresholds[k]
            out[rows[leave]], conf_out[rows[leave]] = logits[leave], conf[leave]
            exit_index[rows[leave]] = k
            stay = (~leave).nonzero().flatten()
            if stay.numel() == 0:  # everyone left: later stages are never called
                break
            if stay.numel() < len(xs):
                xs, rows, tokens = xs.index_select(0, stay), rows[stay], tokens.index_select(0, stay)
            prev = tokens[:, 0]
        info = {"exit_index": exit_index, "exit_counts": torch.bincount(exit_index, minlength=s),
                "confidence": conf_out, "thresholds": self.thresholds}
        return out, info

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> tuple[float, ...]:
        """Set the thresholds so that `exit_fractions` of `x (n, C, S, S)` leave at each stage (eval mode)."""
        was_training = self.training
        nn.Module.train(self, False)
        n, ts, prev, exited = len(x), [], None, 0
        for k, vit in enumerate(self.stages[:-1]):
            tokens = self.stage(k, x, prev)
            conf = confidence(vit.head(tokens))
            target = round(sum(self.cfg.exit_fractions[: k + 1]) * n) - exited
            ts.append(threshold_for(conf, min(max(target, 0), len(x))))
            stay = (conf < ts[-1]).nonzero().flatten()
            exited += len(x) - len(stay)
            x, prev = x.index_select(0, stay), tokens.index_select(0, stay)[:, 0]
            if len(x) == 0:
                ts += [2.0] * (len(self.stages) - 2 - k)
                break
        nn.Module.train(self, was_training)
        self.thresholds = tuple(ts)
        return self.thresholds


class DenseViT(nn.Module):
    """The largest stage alone (the paper's baseline); its weights are those of `stages.<S-1>.`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.vit = make_stage(cfg, cfg.token_grids[-1])

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.vit(x), {}


def loss(output: Tensor, info: dict, target: Tensor) -> Tensor:
    """Joint training: the sum of every stage's cross-entropy (plain CE for the baseline)."""
    return sum(F.cross_entropy(z, target) for z in info.get("exit_logits") or [output])


def build(cfg: Config | None = None) -> DynamicViT:
    """The cascade; thresholds calibrated to `exit_fractions` on a fixed batch unless `thresholds` is set."""
    cfg = cfg or Config()
    _check(cfg)
    model = DynamicViT(cfg)
    if cfg.thresholds is None:
        model.calibrate(random_images(cfg, cfg.calibration_size, cfg.calibration_seed))
    return model


def build_baseline(cfg: Config | None = None) -> DenseViT:
    cfg = cfg or Config()
    _check(cfg)
    return DenseViT(cfg)


def random_images(cfg: Config, n: int, seed: int = 0) -> Tensor:
    """`(n, C, S, S)` standard normal images; seed 0 gives `example_input`'s (the first `n` of any larger batch)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    return random_images(cfg, batch_size)


def summarize(info: dict) -> dict:
    """Exit histogram, share of images per stage and the thresholds in use."""
    counts = info["exit_counts"].tolist() if "exit_counts" in info else [1]
    total = max(sum(counts), 1)
    out = {"exit_histogram": " ".join(str(c) for c in counts),
           "exit_fractions": " ".join(f"{c / total:.2f}" for c in counts)}
    if "thresholds" in info:
        out["thresholds"] = " ".join(f"{t:.4g}" for t in info["thresholds"])
    return out


FIGURE_CONFIG = Config(image_size=224, patch=16, token_grids=(7, 10, 14), dim=192, depth=12, heads=3,
                       num_classes=1000, reuse_dim=48, calibration_size=8)


def photo_crops(size: int, per_photo: int = 3) -> Tensor:
    """`(2 * per_photo, 3, size, size)` square crops (left to right) of the two sample photos, in [0, 1]."""
    from implementations.common.data import sample_photos  # noqa: PLC0415

    photos = sample_photos()  # (2, 3, 427, 640)
    h, w = photos.shape[-2:]
    side = min(h, w) * 3 // 4
    crops = []
    for photo in photos:
        for i in range(per_photo):
            left = round(i * (w - side) / max(per_photo - 1, 1))
            top = (h - side) // 2
            crop = photo[None, :, top : top + side, left : left + side]
            crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0])
    return torch.stack(crops).clamp(0, 1)


@torch.no_grad()
def decision_figure(cfg: Config | None = None):
    """Crops of the real photos, each with the token grid of the stage it left at.

    Default: a DeiT-Tiny-wide cascade (7x7, 10x10, 14x14 tokens at 224 px), untrained unless loaded;
    thresholds calibrated on these crops to the configured exit fractions.
    """
    from matplotlib.figure import Figure  # noqa: PLC0415 - only where a figure is drawn

    cfg = cfg or FIGURE_CONFIG
    torch.manual_seed(0)
    model = build(cfg).eval()
    crops = photo_crops(cfg.image_size)
    mean, std = crops.mean(dim=(0, 2, 3), keepdim=True), crops.std(dim=(0, 2, 3), keepdim=True)
    x = ((crops - mean) / std)[:, : cfg.in_channels]
    model.calibrate(x)
    _, info = model(x)
    cols = 3
    rows = math.ceil(len(crops) / cols)
    fig = Figure(figsize=(2.6 * cols, 2.8 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    colors = ("tab:green", "tab:orange", "tab:red", "tab:purple")
    for i, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(crops):
            ax.axis("off")
            continue
        k = int(info["exit_index"][i])
        g, size = cfg.token_grids[k], cfg.image_size
        ax.imshow(crops[i].permute(1, 2, 0).numpy(), extent=(0, size, size, 0))
        for j in range(1, g):
            ax.axhline(j * size / g, color=colors[k % len(colors)], linewidth=0.6)
            ax.axvline(j * size / g, color=colors[k % len(colors)], linewidth=0.6)
        ax.set_title(f"exit at stage {k + 1}: {g}x{g} tokens\nconfidence {float(info['confidence'][i]):.3f}",
                     fontsize=8)
    fig.suptitle("DVT: the stage each image left at and its token grid\n(untrained cascade unless loaded; "
                 "thresholds calibrated on these crops)", fontsize=9)
    return fig
