"""# A-ViT: Adaptive Tokens for Efficient Vision Transformer

[Yin, Vahdat, Alvarez, Mallya, Kautz and Molchanov, CVPR 2022](https://openaccess.thecvf.com/content/CVPR2022/html/Yin_A-ViT_Adaptive_Tokens_for_Efficient_Vision_Transformer_CVPR_2022_paper.html)
([arXiv 2112.07658](https://arxiv.org/abs/2112.07658), official code: [NVlabs/A-ViT](https://github.com/NVlabs/A-ViT)).

## What is dynamic

- **Unit:** a patch token at a transformer block (attention and MLP rows of that token, and its share of
  the attention products).
- **Decided by:** Adaptive Computation Time on tokens, with no extra parameters. After every block the
  first embedding channel of each token gives its halting score `h = sigmoid(gate_scale * e_0 -
  gate_center)` (the paper's `sigmoid(gamma e_0 + beta)`, `beta = -gate_center`); the scores accumulate
  over blocks and a token halts after the first block where its sum reaches `1 - eps` (`h = 1` at the
  last block). The class token never halts and is read by the classifier after the last block.
- **When:** per token of every image, after every block, in train and eval.
  - `train()`: the official code's masked relaxation: every block runs on all tokens, halted tokens are
    left out of the attention keys and keep their state. `aux_loss = ponder_weight * L_ponder +
    distr_weight * KL(prior || H)`: the ponder cost `mean_k (N_k + r_k)` of the patch tokens (gradient
    through the remainders `r_k`) and the distributional prior, the KL from a Gaussian over the blocks
    centred at the target depth `budget * depth` to `H`, the mean halting score of every block
    normalized over blocks.
  - `eval()`: halted tokens are **removed**: the live tokens of the whole batch are one packed `(T, C)`
    matrix in image order (re-packed with one row `index_select` after a block where some token
    halted), the linear layers run on those rows only and attention runs per image on its own live
    tokens (`2 n_b^2 C` MACs per image, `kernels.packed_attention`). Images keep different numbers of
    tokens. The halting bookkeeping stays packed with the rows (cumulative score, source index), so a
    block costs a handful of small ops beyond the ViT block itself and one host sync (`nonzero`).

`info` holds `depth (B, 1 + P)` (the number of blocks each token ran; the class token runs all),
`token_layers` (the executed fraction of token-blocks) and, in train mode, `aux_loss`, `ponder` and
`distr_kl`.

## Operating point

`budget` is the fraction of token-blocks to execute. With `calibrate=True` (default) `build` sets
`gate_center` by bisection so that the untrained model executes `budget` of its token-blocks on a
fixed calibration batch (8 crops of the two `sample_photos()`, the same images as `example_input`):
one dense pass records every token's `e_0` at every block, the bisection runs on those, and up to
three real halting passes correct the estimate. Higher `budget` executes monotonically more. With
`calibrate=False`, `gate_center` is used as given (larger: later halting, more MACs); training also
uses `budget` as the prior's target depth. The entry's operating point is DeiT-Ti-like at 224x224
with `budget=0.62`, A-ViT-T's 0.8 G of DeiT-T's 1.3 G (DeiT-S does not run at batch 8 in 0.5 s on
2 CPU cores).

## Simplifications against the paper

- **We really skip halted tokens** (ragged packing); the public code only masks them (its README
  lists run-time "token zipping" as not yet released). Re-packing drops rows of the already packed
  matrix with `index_select` rather than `kernels.pack_tokens`, whose `(B, N)` mask interface would
  need a second `nonzero` and a custom-op call per block for the same gather.
- The class token never halts, so the output is the class token after the last block. The official
  code also halts the class token and reads the mean-field sum `sum_l p_c^l t_c^l` of its states.
- Trained from scratch on the digits (the paper fine-tunes a pretrained DeiT for 100 epochs), with the
  gate center calibrated at build (the paper fixes `gamma, beta` per model: 10 and -30 for A-ViT-T).
- The prior is a Gaussian (std 1) over blocks `1..L` normalized to sum 1 and the halting-score
  distribution averages the patch tokens of all images (the official code averages a batch slice
  and rescales the target to sum `0.98` over its first `target_depth` entries).
- By default a small ViT (32x32, patch 4, dim 64, 6 blocks) so that tests and the digits run are fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.train import TrainSettings
from implementations.common.vit import Attention, VisionTransformer, vit
from kernels import packed_attention

_MEAN = (0.485, 0.456, 0.406)  # ImageNet normalization of the photos
_STD = (0.229, 0.224, 0.225)


@dataclass
class Config:
    image_size: int = 32
    patch: int = 4
    dim: int = 64
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    in_channels: int = 3
    budget: float = 0.62  # fraction of token-blocks: calibration target and the prior's target depth / L
    calibrate: bool = True  # set gate_center in build so an untrained model executes `budget`
    gate_scale: float = 10.0  # gamma (official A-ViT-T: 10)
    gate_center: float = 30.0  # -beta (official A-ViT-T: 30); used as given when calibrate is False
    eps: float = 0.01  # a token halts once its cumulative score reaches 1 - eps
    ponder_weight: float = 5e-4  # official ponder_token_scale
    distr_weight: float = 0.1  # weight of the distributional prior's KL


TRAIN = TrainSettings(epochs=15, lr=2e-3, batch_size=64, image_size=16)  # digits at 16x16: 16 patches


def _check(cfg: Config) -> None:
    if not 0.0 < cfg.budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {cfg.budget!r}")
    if not 0.0 < cfg.eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {cfg.eps!r}")
    if not cfg.gate_scale > 0:
        raise ValueError(f"gate_scale must be > 0, got {cfg.gate_scale!r}")
    if cfg.depth < 1:
        raise ValueError(f"depth must be >= 1, got {cfg.depth!r}")


def backbone(cfg: Config) -> VisionTransformer:
    """The plain ViT both models share (`stem`, `blocks`, `norm`, `fc`)."""
    return vit(cfg.image_size, cfg.patch, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.num_classes,
               cfg.in_channels)


def prior(depth: int, target_depth: float, device: torch.device | None = None) -> Tensor:
    """`(L,)` Gaussian (std 1) over blocks `1..L` centred at `target_depth`, normalized to sum 1."""
    blocks = torch.arange(1, depth + 1, dtype=torch.float32, device=device)
    p = torch.exp(-0.5 * (blocks - target_depth) ** 2)
    return p / p.sum()


def halting_depths(scores: Tensor, eps: float) -> Tensor:
    """ACT halting: `scores (L, ...)` -> `(...)` first block (1-based) whose cumulative score >= 1 - eps.

    The last block's score is taken as 1, so every token halts by block L.
    """
    h = scores.clone()
    h[-1] = 1.0
    reached = h.cumsum(0) >= 1 - eps
    return reached.float().argmax(0) + 1


def packed_self_attention(attn: Attention, rows: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Attention of `rows (T, C)` (normed) within each image's slice of `cu_seqlens (B+1,)`: `(T, C)`.

    `kernels.packed_attention`: varlen SDPA on CUDA, one fused SDPA per image on CPU.
    """
    t, c = rows.shape
    q, k, v = attn.qkv(rows).reshape(t, 3, attn.heads, attn.head_dim).unbind(1)
    return attn.proj(packed_attention(q, k, v, cu_seqlens).reshape(t, c))


class AViT(nn.Module):
    """ViT with per-token halting; `forward(x) -> (logits (B, K), info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = backbone(cfg)
        self.gate_center = cfg.gate_center

    def scores(self, tokens: Tensor) -> Tensor:
        """Halting scores `sigmoid(gate_scale * e_0 - gate_center)` of `tokens (..., C)`: `(...)`."""
        return tokens.select(-1, 0).mul(self.cfg.gate_scale).sub_(self.gate_center).sigmoid_()

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self._forward_train(x) if self.training else self._forward_eval(x)

    def _forward_eval(self, x: Tensor) -> tuple[Tensor, dict]:
        tokens = self.net.stem(x)
        b, n, c = tokens.shape
        n_blocks, threshold = len(self.net.blocks), 1 - self.cfg.eps
        rows = tokens.reshape(b * n, c)  # the live tokens of all images, packed in image order
        starts = torch.arange(b + 1, device=x.device) * n  # flat index of every image's class token
        cu = starts.to(torch.int32)
        source = torch.arange(b * n, device=x.device)  # flat (image, token) index of every live row
        cum = rows.new_zeros(b, n)
        cum[:, 0] = -math.inf  # the class token never halts
        cum = cum.view(b * n)
        depth = torch.empty(b * n, dtype=torch.long, device=x.device)
        for i, block in enumerate(self.net.blocks):
            rows = rows + packed_self_attention(block.attn, block.norm1(rows), cu)
            rows = rows + block.mlp_residual(rows)
            if i == n_blocks - 1:
                break
            live = (cum.add_(self.scores(rows)) >= threshold).logical_not_().nonzero().view(-1)  # not halted
            if live.shape[0] < rows.shape[0]:  # some token halted: drop its row, keep the order
                depth.index_fill_(0, source, i + 1)  # every live row ran block i; survivors are raised later
                rows, cum, source = rows.index_select(0, live), cum.index_select(0, live), source.index_select(0, live)
                cu = torch.searchsorted(source, starts, out_int32=True)  # first row of every image
        depth.index_fill_(0, source, n_blocks)
        logits = self.net.fc(self.net.norm(rows.index_select(0, cu[:-1])))  # the class token opens every slice
        depth = depth.view(b, n)
        return logits, {"depth": depth, "token_layers": depth.float().mean() / n_blocks}

    def _forward_train(self, x: Tensor) -> tuple[Tensor, dict]:
        h = self.net.stem(x)
        b, n, _ = h.shape
        n_blocks = len(self.net.blocks)
        live = torch.ones(b, n, dtype=torch.bool, device=x.device)
        cum, remainder, rho = h.new_zeros(b, n), h.new_ones(b, n), h.new_zeros(b, n)
        depth = torch.full((b, n), n_blocks, dtype=torch.long, device=x.device)
        mean_scores = []
        for i, block in enumerate(self.net.blocks):
            out = block(h, live[:, None, None, :])  # halted tokens are no keys
            h = torch.where(live.unsqueeze(-1), out, h)  # and keep their state
            score = self.scores(h)
            mean_scores.append(score[:, 1:].mean())
            if i == n_blocks - 1:
                score = torch.ones_like(score)
            cum = cum + score
            rho = rho + live.float()
            reached = (cum >= 1 - self.cfg.eps) & live
            rho = rho + remainder * reached.float()  # N_k + r_k once token k halts
            remainder = remainder - score * (~reached & live).float()
            depth = torch.where(reached & (depth == n_blocks), torch.full_like(depth, i + 1), depth)
            live = live & ~reached
            live[:, 0] = True  # the class token never halts
        depth[:, 0] = n_blocks
        ponder = rho[:, 1:].mean()
        dist = torch.stack(mean_scores)
        dist = (dist / dist.sum()).clamp(0.01, 0.99)
        target = prior(n_blocks, self.cfg.budget * n_blocks, x.device)
        kl = (target * (target.log() - dist.log())).sum()
        info = {
            "depth": depth,
            "token_layers": depth.float().mean().detach() / n_blocks,
            "ponder": ponder.detach(),
            "distr_kl": kl.detach(),
            "aux_loss": self.cfg.ponder_weight * ponder + self.cfg.distr_weight * kl,
        }
        return self.net.head(h), info

    @torch.no_grad()
    def calibrate(self, x: Tensor, budget: float, real_passes: int = 3) -> float:
        """Set `gate_center` so that the eval path executes `budget` of the token-blocks on `x`."""
        was_training = self.training
        self.eval()
        h, e0 = self.net.stem(x), []
        for block in self.net.blocks:
            h = block(h)
            e0.append(h[..., 1:, 0])
        e0 = torch.stack(e0)  # (L, B, P): every patch token's e_0, all tokens present
        n_blocks, n_tokens = e0.shape[0], e0.shape[2] + 1
        best, goal = (math.inf, self.gate_center), budget
        for _ in range(real_passes + 1):
            patch_goal = (goal * n_tokens - 1) / (n_tokens - 1)  # the class token runs all blocks
            self.gate_center = self._bisect(e0, patch_goal * n_blocks)
            got = float(self(x)[1]["token_layers"])
            if abs(got - budget) < best[0]:
                best = (abs(got - budget), self.gate_center)
            if abs(got - budget) < 0.005:
                break
            goal = min(max(goal + budget - got, 0.0), 1.0)
        self.gate_center = best[1]
        self.train(was_training)
        return self.gate_center

    def _bisect(self, e0: Tensor, mean_depth: float, steps: int = 40) -> float:
        """Gate center whose halting depths on the recorded `e0 (L, B, P)` average `mean_depth`."""
        scale, eps = self.cfg.gate_scale, self.cfg.eps
        lo, hi = scale * float(e0.min()) - 20.0, scale * float(e0.max()) + 20.0
        for _ in range(steps):
            mid = (lo + hi) / 2
            depth = halting_depths(torch.sigmoid(scale * e0 - mid), eps).float().mean()
            lo, hi = (mid, hi) if depth < mean_depth else (lo, mid)
        return (lo + hi) / 2


class DenseViT(nn.Module):
    """The same ViT with every token in every block; parameters under `net.` as in `AViT`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = backbone(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(x), {}


@lru_cache(maxsize=1)
def _photos() -> Tensor:
    from implementations.common.data import sample_photos  # noqa: PLC0415 - sklearn only when used

    return sample_photos()


def photo_crops(cfg: Config, n: int) -> Tensor:
    """`(n, 3, S, S)` normalized square crops of the two sample photos (fixed sizes and positions)."""
    photos = _photos()
    height, width = photos.shape[-2:]
    crops = []
    for i in range(n):
        j = i // 2
        side = height - 48 * (j % 4)
        top, left = (37 * j) % (height - side + 1), (97 * j) % (width - side + 1)
        crop = photos[i % 2, :, top : top + side, left : left + side].unsqueeze(0)
        crops.append(F.interpolate(crop, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                                   align_corners=False, antialias=True))
    mean, std = torch.tensor(_MEAN).view(1, 3, 1, 1), torch.tensor(_STD).view(1, 3, 1, 1)
    return ((torch.cat(crops) - mean) / std).contiguous()


def calibration_batch(cfg: Config) -> Tensor:
    """The fixed batch `build` calibrates on: 8 photo crops (Gaussian noise unless 3 input channels)."""
    return example_input(cfg, 8)


def build(cfg: Config | None = None) -> AViT:
    cfg = cfg or Config()
    _check(cfg)
    model = AViT(cfg)
    if cfg.calibrate:
        model.calibrate(calibration_batch(cfg), cfg.budget)
    return model


def build_baseline(cfg: Config | None = None) -> DenseViT:
    cfg = cfg or Config()
    _check(cfg)
    return DenseViT(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    if cfg.in_channels == 3:
        return photo_crops(cfg, batch_size)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def summarize(info: dict) -> dict:
    """Executed token-block fraction, the patch tokens' mean halting depth and its histogram."""
    if "depth" not in info:
        return {"executed_token_layers": 1.0}
    patch = info["depth"][:, 1:]
    hist = torch.bincount(patch.flatten(), minlength=int(info["depth"].max()) + 1)[1:]
    return {
        "executed_token_layers": round(float(info["token_layers"]), 4),
        "mean_patch_depth": round(float(patch.float().mean()), 3),
        "depth_histogram": " ".join(str(c) for c in hist.tolist()),
    }


def decision_figure(cfg: Config | None = None):
    """Per-token halting depth over the patches of a real photo, next to the photo (a Figure).

    The model is `build(cfg)` (untrained, gate center calibrated to `cfg.budget`): its halting follows
    the first channel of the patch embedding, i.e. a fixed linear filter of the patch's pixels.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cfg = cfg or Config()
    torch.manual_seed(0)
    model = build(cfg).eval()
    x = photo_crops(cfg, 1)
    with torch.no_grad():
        _, info = model(x)
    grid = cfg.image_size // cfg.patch
    depth = info["depth"][0, 1:].reshape(grid, grid).numpy()
    image = (x[0] * torch.tensor(_STD).view(3, 1, 1) + torch.tensor(_MEAN).view(3, 1, 1)).clamp(0, 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 4))
    left.imshow(image.permute(1, 2, 0).numpy())
    left.set_title("input")
    shown = right.imshow(depth, cmap="viridis", vmin=1, vmax=cfg.depth)
    right.set_title(f"halting depth per token ({float(info['token_layers']):.0%} of token-blocks)")
    for ax in (left, right):
        ax.axis("off")
    fig.colorbar(shown, ax=right, fraction=0.046, label="blocks executed")
    fig.tight_layout()
    return fig

