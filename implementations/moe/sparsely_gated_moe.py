"""# Sparsely-Gated Mixture-of-Experts (noisy top-k gating)

[Shazeer, Mirhoseini, Maziarz, Davis, Le, Hinton and Dean, ICLR 2017](https://arxiv.org/abs/1701.06538)
(no official code; an unofficial PyTorch port:
[davidmrau/mixture-of-experts](https://github.com/davidmrau/mixture-of-experts)).

## What is dynamic

- **Unit:** an *expert*, a feed-forward network with one ReLU hidden layer. An MoE layer of `E` experts
  replaces the MLP of the blocks of a small Vision Transformer (every `moe_every`-th block; the paper
  places its MoE layers between stacked LSTM layers, applied "convolutionally" to every position; here
  every token, class token included, is a position).
- **Decided by:** the paper's gating network on the token itself, `G(x) = softmax(KeepTopK(H(x), k))`
  with `H(x) = x W_g + StandardNormal() * softplus(x W_noise)`: the `k` experts with the largest
  (noisy) logits are kept, their softmax weights combine their outputs.
- **When:** per token, at every MoE layer, in train and eval.
  - `train()`: noisy top-k routing; the kept experts run (through the same grouped kernel) and the
    gradient reaches `W_g` through the kept gate values (and `W_noise` through the load estimator), as
    in the paper. `aux_loss` is the paper's balancing loss `w_importance * CV(Importance)^2 +
    w_load * CV(Load)^2` summed over the MoE layers, with `Importance` the per-expert sum of gate
    values and `Load` the smooth estimator of the number of tokens per expert (the normal CDF of the
    margin of each logit to the k-th largest of the others, Appendix A).
  - `eval()`: no noise; the rows `(token, chosen expert)` are grouped by expert and each expert's two
    linear layers run only on its rows through `kernels.routed_linear` (a grouped GEMM: per expert one
    gather, one GEMM, one scatter). Experts with no token are never touched.

`info` holds, for the `L` MoE layers, `experts (L, N, T, k)` (expert ids), `gates (L, N, T, k)`
(combination weights, 0 where a row was dropped for capacity), `expert_load (L, E)` (rows per
expert), the `dropped_fraction`, `exec_fraction` (expert rows run / (tokens x E)) and `aux_loss`. The
gating network counts on the dynamic side.

## Operating point

- `top_k` (the paper's `k`) of `num_experts` experts run per token, so the expert MACs are `k / E` of
  the dense layer's; any model, trained or not, executes exactly that fraction (top-k always keeps
  `k`). The paper's flat MoE layers keep `k = 4` experts (MoE-32: 4 of 32). `top_k = num_experts` is
  the dense network.
- `capacity_factor` (not in this paper; GShard's buffer) caps every expert at
  `ceil(capacity_factor * T * k / E)` rows per batch; overflowing rows are dropped (the token keeps
  its residual stream). `None` (default) drops nothing, as in the paper.
- The baseline (`build_baseline`) is the same network with every expert executed on every token and
  combined with the full softmax of the clean gate logits, computed as two large GEMMs over the
  concatenated experts (the fastest dense form, not a loop over experts).

## Simplifications against the paper

- Vision instead of language: the MoE layers sit in a small ViT (DeiT layout) instead of between LSTM
  layers; the token is the position.
- Flat MoE only (no hierarchical MoE), no batch/model parallelism (one device holds every expert).
  The paper's answer to the *shrinking batch problem* (each expert sees about `k T / E` rows) is to
  pool huge batches across devices; with one image of 197 tokens an expert here gets ~25 rows, and
  its small GEMMs run well below the dense GEMM's efficiency on a CPU.
- The default `Config` is a 4-block ViT (dim 64, 8x8 patches, 8 experts, top-2) on 32x32 digits; the
  operating points use a DeiT-Ti-sized ViT at 224 px.
- `W_g` starts from small random weights (std 0.02) instead of zeros, so an untrained router already
  spreads tokens over the experts as a balanced trained router does (measurement of untrained models);
  `W_noise` starts at zero as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.train import TrainSettings
from implementations.common.vit import VisionTransformer, vit
from kernels import routed_linear

_NOISE_EPS = 1e-2  # floor of the noise std (as in common ports of the paper's gate)


@dataclass
class Config:
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    patch: int = 8  # (image_size / patch)^2 patch tokens + 1 class token
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0  # the dense MLPs of blocks without an MoE layer
    moe_every: int = 1  # blocks i with (i + 1) % moe_every == 0 carry an MoE layer (V-MoE uses 2)
    num_experts: int = 8
    top_k: int = 2  # experts kept per token
    expert_hidden: int = 64  # hidden units of every expert
    capacity_factor: float | None = None  # None: no expert capacity limit, nothing dropped (paper)
    noisy_gating: bool = True  # train-time noise `StandardNormal() * softplus(x W_noise)`
    w_importance: float = 0.1  # the paper's w_importance
    w_load: float = 0.1  # the paper's w_load


TRAIN = TrainSettings(epochs=20, lr=3e-3, batch_size=64)  # a ViT from scratch needs more steps than a CNN


def _check(cfg: Config) -> None:
    if cfg.num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {cfg.num_experts!r}")
    if not 1 <= cfg.top_k <= cfg.num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={cfg.num_experts}], got {cfg.top_k!r}")
    if cfg.capacity_factor is not None and not cfg.capacity_factor > 0:
        raise ValueError(f"capacity_factor must be None or > 0, got {cfg.capacity_factor!r}")
    if cfg.moe_every < 1 or cfg.moe_every > cfg.depth:
        raise ValueError(f"moe_every must be in [1, depth={cfg.depth}], got {cfg.moe_every!r}")
    if cfg.expert_hidden < 1:
        raise ValueError(f"expert_hidden must be >= 1, got {cfg.expert_hidden!r}")


def cv_squared(v: Tensor) -> Tensor:
    """Squared coefficient of variation `var(v) / mean(v)^2` of a `(E,)` vector (0 for one expert)."""
    if v.numel() < 2:
        return v.new_zeros(())
    return v.float().var() / (v.float().mean() ** 2 + 1e-10)


def load_estimate(clean: Tensor, noisy: Tensor, noise_std: Tensor, top_vals: Tensor, k: int) -> Tensor:
    """The paper's smooth load `(E,)`: `sum_t P(noisy_{t,e} > k-th largest of the others)`.

    `clean, noisy, noise_std (T, E)`, `top_vals (T, k + 1)` the largest noisy logits. For an expert in
    the top k the threshold is the (k+1)-th value, otherwise the k-th (Appendix A).
    """
    threshold_in, threshold_out = top_vals[:, k : k + 1], top_vals[:, k - 1 : k]
    is_in = noisy > threshold_in
    normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
    prob_in = normal.cdf((clean - threshold_in) / noise_std)
    prob_out = normal.cdf((clean - threshold_out) / noise_std)
    return torch.where(is_in, prob_in, prob_out).sum(dim=0)


def capacity_keep(experts: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Bool `(T, k)`: rows within their expert's capacity (slot-major order: first choices first)."""
    flat = experts.t().reshape(-1)  # (k * T,) slot 0 of every token, then slot 1, ...
    one_hot = F.one_hot(flat, num_experts)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1
    return (position < capacity).view(experts.shape[1], experts.shape[0]).t()


class NoisyTopKMoE(nn.Module):
    """MoE layer: `(..., dim) -> ((..., dim), stats)`; `E` ReLU experts `dim -> hidden -> dim`.

    Expert weights are stacked for `routed_linear`: `fc1_weight (E, hidden, dim)` and `fc2_weight`
    stored transposed, `(E, hidden, dim)`, so that both are read without copies and with contiguous
    rows: the dense baseline as one `(E * hidden, dim)` matrix each, the routed path as `E` contiguous
    per-expert blocks (fc2 through the view `(E, dim, hidden)`). A `(dim, E, hidden)` layout would also
    give the dense view, but its per-expert blocks have rows `E * hidden` floats apart (32 KiB at the
    paper point), which measured about 1.5x slower in the small per-expert GEMMs.
    """

    def __init__(self, dim: int, hidden: int, cfg: Config) -> None:
        super().__init__()
        e = cfg.num_experts
        self.cfg, self.dim, self.hidden, self.num_experts, self.k = cfg, dim, hidden, e, cfg.top_k
        self.w_gate = nn.Parameter(torch.randn(dim, e) * 0.02)
        self.w_noise = nn.Parameter(torch.zeros(dim, e))
        self.fc1_weight = nn.Parameter(nn.init.trunc_normal_(torch.empty(e, hidden, dim), std=0.02))
        self.fc1_bias = nn.Parameter(torch.zeros(e, hidden))
        fc2 = nn.init.trunc_normal_(torch.empty(dim, e, hidden), std=0.02)  # drawn as (dim, E, hidden)
        self.fc2_weight = nn.Parameter(fc2.permute(1, 2, 0).contiguous())  # stored (E, hidden, dim)
        self.fc2_bias = nn.Parameter(torch.zeros(e, dim))

    def forward(self, x: Tensor, dense: bool = False) -> tuple[Tensor, dict]:
        shape = x.shape
        x = x.reshape(-1, self.dim)
        clean = x @ self.w_gate  # (T, E): the gating network
        y, stats = self._dense(x, clean) if dense else self._routed(x, clean)
        return y.view(shape), stats

    def _dense(self, x: Tensor, clean: Tensor) -> tuple[Tensor, dict]:
        """Every expert on every token, combined with `softmax(clean)`: two GEMMs over stacked experts."""
        t, e, h = x.shape[0], self.num_experts, self.hidden
        g = torch.softmax(clean, dim=1)
        hid = F.relu(F.linear(x, self.fc1_weight.view(e * h, self.dim), self.fc1_bias.view(-1)))
        hid = (hid.view(t, e, h) * g.unsqueeze(-1)).view(t, e * h)
        y = torch.mm(hid, self.fc2_weight.view(e * h, self.dim)) + g @ self.fc2_bias
        return y, {"rows": t * e, "expert_load": torch.full((e,), t, device=x.device)}

    def _route(self, x: Tensor, clean: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Noisy top-k: expert ids `(T, k)`, gate values `(T, k)` and the balancing loss (scalar)."""
        k, e = self.k, self.num_experts
        noisy_train = self.training and self.cfg.noisy_gating and k < e
        if noisy_train:
            noise_std = F.softplus(x @ self.w_noise) + _NOISE_EPS
            logits = clean + torch.randn_like(clean) * noise_std
        else:
            logits = clean
        top_vals, top_idx = logits.topk(min(k + 1, e) if noisy_train else k, dim=1)  # k+1: load estimate
        experts, gates = top_idx[:, :k], torch.softmax(top_vals[:, :k], dim=1)
        if not self.training:
            return experts, gates, clean.new_zeros(())
        importance = clean.new_zeros(clean.shape).scatter(1, experts, gates).sum(dim=0)
        if noisy_train:
            load = load_estimate(clean, logits, noise_std, top_vals, k)
        else:
            load = torch.bincount(experts.flatten(), minlength=e).to(clean.dtype)
        aux = self.cfg.w_importance * cv_squared(importance) + self.cfg.w_load * cv_squared(load)
        return experts, gates, aux

    def _routed(self, x: Tensor, clean: Tensor) -> tuple[Tensor, dict]:
        """Only the kept `(token, expert)` rows run, grouped by expert in `routed_linear`."""
        t, k = x.shape[0], self.k
        experts, gates, aux = self._route(x, clean)
        slot_route = experts.reshape(-1)  # (T k,): expert of row (token, slot)
        if self.cfg.capacity_factor is not None:
            capacity = math.ceil(self.cfg.capacity_factor * t * k / self.num_experts)
            gates = gates * capacity_keep(experts, self.num_experts, capacity)
            rows = (gates.reshape(-1) > 0).nonzero().flatten()
            route, order = torch.sort(slot_route.index_select(0, rows), stable=True)
            rows = rows.index_select(0, order)
        else:  # every (token, slot) row runs
            route, rows = torch.sort(slot_route, stable=True)
        # rows sorted by expert: every expert's rows are one contiguous slice in the kernel (no copies)
        token = rows.div(k, rounding_mode="floor")
        y = self._experts(x.index_select(0, token), route)
        weight = gates.reshape(-1).index_select(0, rows).unsqueeze(-1)
        out = x.new_zeros(t, self.dim).index_add_(0, token, y * weight)
        load = torch.bincount(route, minlength=self.num_experts)
        stats = {"experts": experts, "gates": gates, "rows": int(route.numel()), "expert_load": load,
                 "aux_loss": aux}
        return out, stats

    def _experts(self, xr: Tensor, route: Tensor) -> Tensor:
        """`(R, dim) -> (R, dim)`: row r through expert `route[r]` (two grouped GEMMs)."""
        # routes come from topk (always in range): no value check
        hid = routed_linear(xr, route, self.fc1_weight, self.fc1_bias, check_values=False).relu_()
        return routed_linear(hid, route, self.fc2_weight.transpose(1, 2), self.fc2_bias, check_values=False)


class MoEViT(nn.Module):
    """ViT whose MLPs (every `moe_every`-th block) are MoE layers; `forward(x) -> (logits (N, K), info)`.

    `dense=True` is the baseline: the same parameters, every expert on every token.
    """

    def __init__(self, cfg: Config, dense: bool = False) -> None:
        super().__init__()
        self.cfg, self.dense = cfg, dense
        self.net: VisionTransformer = vit(cfg.image_size, cfg.patch, cfg.dim, cfg.depth, cfg.heads,
                                          cfg.mlp_ratio, cfg.num_classes, cfg.in_channels)
        self.moe_blocks = [i for i in range(cfg.depth) if (i + 1) % cfg.moe_every == 0]
        for i in self.moe_blocks:
            self.net.blocks[i].mlp = NoisyTopKMoE(cfg.dim, cfg.expert_hidden, cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        h = self.net.stem(x)
        layers = []
        for i, block in enumerate(self.net.blocks):
            h = h + block.attn_residual(h)
            if i in self.moe_blocks:
                y, stats = block.mlp(block.norm2(h), dense=self.dense)
                h = h + y
                layers.append(stats)
            else:
                h = h + block.mlp_residual(h)
        return self.net.head(h), self._info(layers, h.shape[:2])

    def _info(self, layers: list[dict], batch_tokens: torch.Size) -> dict:
        tokens = batch_tokens[0] * batch_tokens[1]
        rows = sum(s["rows"] for s in layers)
        info = {"expert_load": torch.stack([s["expert_load"] for s in layers]),
                "exec_fraction": rows / (tokens * self.cfg.num_experts * len(layers))}
        if self.dense:
            return info
        info["experts"] = torch.stack([s["experts"].view(*batch_tokens, -1) for s in layers])
        info["gates"] = torch.stack([s["gates"].view(*batch_tokens, -1) for s in layers])
        info["dropped_fraction"] = 1.0 - rows / (tokens * self.cfg.top_k * len(layers))
        info["aux_loss"] = sum(s["aux_loss"] for s in layers)
        return info


def build(cfg: Config | None = None) -> MoEViT:
    cfg = cfg or Config()
    _check(cfg)
    return MoEViT(cfg)


def build_baseline(cfg: Config | None = None) -> MoEViT:
    cfg = cfg or Config()
    _check(cfg)
    return MoEViT(cfg, dense=True)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def summarize(info: dict) -> dict:
    """Fraction of expert work executed, dropped rows and how evenly the experts were used."""
    load = info["expert_load"].float()
    share = load / load.sum(dim=1, keepdim=True).clamp_min(1)
    cv = (load.std(dim=1) / load.mean(dim=1).clamp_min(1e-9)).mean() if load.shape[1] > 1 else 0.0
    out = {
        "expert_work_executed": round(float(info["exec_fraction"]), 4),
        "load_cv": round(float(cv), 4),
        "expert_share_layer0": " ".join(f"{s:.2f}" for s in share[0].tolist()),
    }
    if "dropped_fraction" in info:
        out["dropped_rows"] = round(float(info["dropped_fraction"]), 4)
    return out
