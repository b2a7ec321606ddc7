"""# SkipNet: Learning Dynamic Routing in Convolutional Networks

[Wang, Yu, Dou, Darrell and Gonzalez, ECCV 2018](https://openaccess.thecvf.com/content_ECCV_2018/html/Xin_Wang_SkipNet_Learning_Dynamic_ECCV_2018_paper.html)
([arXiv 1711.09485](https://arxiv.org/abs/1711.09485), official code:
[ucbdrive/skipnet](https://github.com/ucbdrive/skipnet)).

## What is dynamic

- **Unit:** a whole residual block of a CIFAR ResNet. A skipped block outputs its shortcut
  (the identity, or the 1x1 projection where the shape changes); an executed block outputs
  `relu(residual(x) + shortcut(x))`. The first block always runs.
- **Decided by:** the paper's *recurrent gate*, looking at the previous block's output: global
  average pool -> a per-block linear embedding (10 units; the official 1x1 conv on the pooled map) ->
  one LSTM cell (10 hidden units) **shared by all blocks**, whose state carries over from block to
  block -> a shared linear layer -> sigmoid, the probability `p` of executing the next block.
- **When:** per sample, before every block but the first, in train and eval.
  - `train()`, first `sp_steps` steps, **supervised pre-training**: the forward value is the hard
    decision `p > 0.5`, the gradient is that of `p` (straight-through), the loss is the
    cross-entropy alone.
  - `train()`, afterwards, **hybrid reinforcement learning**: each decision is sampled,
    `a ~ Bernoulli(p)`; skipping block `g` earns the reward `alpha / G` and the final reward is the
    negative cross-entropy of the sample, summed into discounted returns (`gamma`). REINFORCE on the
    decisions (weight `rl_weight`) is added to the supervised cross-entropy of the network. The
    skip-reward part of the policy gradient is `info["aux_loss"]`; the module's `loss` adds the
    cross-entropy and its policy-gradient part (it needs the labels).
  - `eval()`: deterministic decision `p > gate_threshold`. The block runs **only on the samples whose
    gate is on**, gathered into a smaller batch and written back in place (`index_copy`); the others
    keep the shortcut; a block with no active sample is not called at all.

`info` holds `gates (G, N)` (bool in eval; 0/1 floats in train), `gate_probs (G, N)`, `exec_rate`
(fraction of gated blocks executed), `aux_loss`, and in the RL phase `log_probs (G, N)`. The gates'
MACs (embedding, LSTM cell, projection) count on the dynamic side.

## Operating point

- The paper's: ResNet-110 on CIFAR-10, where SkipNet+HRL executes 49.5 % of the computation at
  93.3 % accuracy (official README). `exec_rate_init` puts an untrained model there: a fixed
  per-block logit offset of `+5` on `round(exec_rate_init * G)` evenly spread gates and `-5` on the
  others (the shared projection starts near zero), so exactly that fraction of blocks runs and
  executed MACs grow monotonically with it. `None` (default) adds no offset: the paper's gate, whose
  untrained probabilities sit near 0.5, so before training it opens an arbitrary set of blocks.
- `gate_threshold` moves the eval decision: higher runs fewer blocks.
- In training, `alpha` trades accuracy against computation (the paper's knob; the official code's
  default is 0.1). Ours is 2.5 for the short digits run, where every block of the small ResNet
  matters more than in a ResNet-110.

## Simplifications against the paper

- A small CIFAR ResNet (depth 14, option-B projection shortcuts as in the official code) by default;
  the operating point uses ResNet-110.
- Both training stages run inside one short schedule from scratch (`sp_steps` switches from
  supervised pre-training to hybrid RL), with Adam instead of SGD, hence `rl_weight = 1` (the
  official 0.01 assumes SGD; with Adam it mostly scales the policy's step size after pre-training).
- A batch-mean baseline is subtracted from each gate's return (the official code uses none).
- The per-block logit offset exists only to place an untrained model at an operating point; it is
  zero for the paper's configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.gates import straight_through
from implementations.common.resnet import BasicBlock, CifarResNet, cifar_resnet
from implementations.common.train import TrainSettings

_OFFSET = 5.0  # |logit offset| of an untrained gate placed open or closed by `exec_rate_init`


@dataclass
class Config:
    depth: int = 14  # CIFAR ResNet 6n+2: 3n blocks, the first always runs, 3n - 1 gated
    width: int = 16
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    embed_dim: int = 10  # per-block embedding of the pooled features (paper: 10)
    hidden_dim: int = 10  # shared LSTM cell (paper: 10)
    gate_threshold: float = 0.5  # eval: execute where p > gate_threshold
    exec_rate_init: float | None = None  # untrained operating point: fraction of gates opened
    sp_steps: int = 22  # training steps of supervised pre-training before hybrid RL (one digits epoch)
    alpha: float = 2.5  # reward for skipping, shared by the G gates (ours; official default 0.1)
    rl_weight: float = 1.0  # weight of the policy-gradient loss (ours, with Adam; official 0.01 with SGD)
    gamma: float = 1.0  # discount of the returns (official default)


TRAIN = TrainSettings(epochs=8, lr=1e-2, batch_size=64)


def _check(cfg: Config) -> None:
    if not 0.0 <= cfg.gate_threshold < 1.0:
        raise ValueError(f"gate_threshold must be in [0, 1), got {cfg.gate_threshold!r}")
    if cfg.exec_rate_init is not None and not 0.0 <= cfg.exec_rate_init <= 1.0:
        raise ValueError(f"exec_rate_init must be None or in [0, 1], got {cfg.exec_rate_init!r}")
    if cfg.sp_steps < 0:
        raise ValueError(f"sp_steps must be >= 0, got {cfg.sp_steps!r}")
    if not 0.0 <= cfg.gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {cfg.gamma!r}")
    if cfg.embed_dim < 1 or cfg.hidden_dim < 1:
        raise ValueError(f"embed_dim and hidden_dim must be >= 1, got {cfg.embed_dim!r}, {cfg.hidden_dim!r}")


def open_gate_pattern(num_gates: int, rate: float) -> list[bool]:
    """Which gates start open: `round(rate * G)` of them, evenly spread."""
    k = round(rate * num_gates)
    return [((g + 1) * k) // num_gates > (g * k) // num_gates for g in range(num_gates)]


class RecurrentGate(nn.Module):
    """SkipNet's recurrent gate: per-block embeddings, one shared LSTM cell and projection.

    `step(x (N, C, H, W), g, state) -> (raw logit (N,), state)`; `state` is the LSTM's `(h, c)`,
    `None` before the first gate. Gate g's logit is `raw + offset[g]` (`offsets` as Python floats too).
    """

    def __init__(self, channels: list[int], embed_dim: int, hidden_dim: int, offsets: list[float]) -> None:
        super().__init__()
        self.embed = nn.ModuleList(nn.Linear(c, embed_dim) for c in channels)
        self.lstm = nn.LSTMCell(embed_dim, hidden_dim)
        self.proj = nn.Linear(hidden_dim, 1)
        self.register_buffer("offset", torch.tensor(offsets))
        self.offsets = list(offsets)
        for lin in [*self.embed, self.proj]:  # official init: N(0, sqrt(2 / (out * in))), zero bias
            nn.init.normal_(lin.weight, std=(2.0 / lin.weight.numel()) ** 0.5)
            nn.init.zeros_(lin.bias)
        if any(offsets):  # untrained operating point: the offsets decide, not the features
            nn.init.normal_(self.proj.weight, std=0.001)

    def step(self, x: Tensor, g: int, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        # Functional calls on the modules' parameters: the same ops as calling the modules, without their
        # Python overhead, which matters here (one gate per block, on tiny tensors).
        emb, cell = self.embed[g], self.lstm
        e = F.linear(x.mean(dim=(2, 3)), emb.weight, emb.bias)  # (N, embed_dim)
        if state is None:
            zeros = e.new_zeros(len(e), cell.hidden_size)
            state = (zeros, zeros)
        h, c = torch.lstm_cell(e, state, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        return F.linear(h, self.proj.weight, self.proj.bias).squeeze(1), (h, c)


def skip_block_train(block: BasicBlock, x: Tensor, gate: Tensor) -> Tensor:
    """Relaxed block: `gate * block(x) + (1 - gate) * shortcut(x)`; `gate (N,)` 0/1."""
    sc = block.shortcut(x)
    full = F.relu(block.residual(x) + sc)
    g = gate.view(-1, 1, 1, 1)
    return g * full + (1 - g) * sc


def skip_block_eval(block: BasicBlock, x: Tensor, on: Tensor) -> Tensor:
    """Executing block: `relu(residual + shortcut)` on the rows where `on (N,)` is True, shortcut elsewhere."""
    if len(x) == 1:
        return block(x) if bool(on) else block.shortcut(x)
    idx = on.nonzero().flatten()
    if idx.numel() == len(x):
        return block(x)
    out = block.shortcut(x)
    if idx.numel() == 0:
        return out
    sub = F.relu(block.residual(x.index_select(0, idx)) + out.index_select(0, idx))
    return out.index_copy(0, idx, sub)


class SkipNet(nn.Module):
    """CIFAR ResNet whose blocks 1 .. B-1 are gated by a recurrent gate; `forward(x) -> (logits, info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net: CifarResNet = cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width, shortcut="B")
        gated = list(self.net.blocks())[1:]  # the first block always runs
        if cfg.exec_rate_init is None:
            offsets = [0.0] * len(gated)
        else:
            offsets = [_OFFSET if p else -_OFFSET for p in open_gate_pattern(len(gated), cfg.exec_rate_init)]
        self.gate = RecurrentGate([b.in_channels for b in gated], cfg.embed_dim, cfg.hidden_dim, offsets)
        self.blocks: list[BasicBlock] = list(self.net.blocks())  # a plain list: the modules live in `net`
        self.steps = 0  # train-mode forward calls: supervised pre-training, then hybrid RL

    @property
    def phase(self) -> str:
        """'sp' (supervised pre-training) or 'rl' (hybrid RL) for the next training step."""
        return "sp" if self.steps < self.cfg.sp_steps else "rl"

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self._forward_train(x) if self.training else self._forward_eval(x)

    def _forward_eval(self, x: Tensor) -> tuple[Tensor, dict]:
        thr = self.cfg.gate_threshold
        cut = math.log(thr / (1 - thr)) if thr > 0 else -math.inf  # p > thr  <=>  logit > cut
        h = self.blocks[0](self.net.stem(x))
        state, decisions, raws = None, [], []
        for g, block in enumerate(self.blocks[1:]):
            raw, state = self.gate.step(h, g, state)
            on = raw > cut - self.gate.offsets[g]  # the offset moves the cut, one op fewer per gate
            h = skip_block_eval(block, h, on)
            decisions.append(on)
            raws.append(raw)
        gates = torch.stack(decisions)
        logits = torch.stack(raws) + self.gate.offset[:, None]
        info = {"gates": gates, "gate_probs": torch.sigmoid(logits),
                "exec_rate": gates.float().mean(), "aux_loss": x.new_zeros(())}
        return self.net.head(h), info

    def _forward_train(self, x: Tensor) -> tuple[Tensor, dict]:
        rl = self.phase == "rl"
        self.steps += 1
        h = self.blocks[0](self.net.stem(x))
        state, decisions, logits, log_probs = None, [], [], []
        for g, block in enumerate(self.blocks[1:]):
            raw, state = self.gate.step(h, g, state)
            logit = raw + self.gate.offset[g]
            p = torch.sigmoid(logit)
            if rl:  # hybrid RL: sample the decision, keep its log-probability for REINFORCE
                d = torch.bernoulli(p.detach())
                log_probs.append(d * F.logsigmoid(logit) + (1 - d) * F.logsigmoid(-logit))
            else:  # supervised pre-training: hard decision forward, gradient of p backward
                d = straight_through(p, (p > 0.5).to(p.dtype))
            h = skip_block_train(block, h, d)
            decisions.append(d)
            logits.append(logit)
        gates = torch.stack(decisions)
        info = {"gates": gates, "gate_probs": torch.sigmoid(torch.stack(logits)),
                "exec_rate": gates.detach().mean(), "aux_loss": x.new_zeros(())}
        if rl:
            info["log_probs"] = torch.stack(log_probs)
            info["aux_loss"] = self._skip_reward_loss(info["log_probs"], gates)
            exponents = torch.arange(len(gates), 0, -1, dtype=x.dtype, device=x.device)
            info["final_reward_weights"] = self.cfg.rl_weight * self.cfg.gamma**exponents  # (G,)
        return self.net.head(h), info

    def _skip_reward_loss(self, log_probs: Tensor, actions: Tensor) -> Tensor:
        """REINFORCE on the skip rewards: `-rl_weight * sum_g mean_n log p(a_g) (S_g - mean S_g)`.

        `S_g = sum_{j >= g} gamma^(j-g) alpha / G [a_j = 0]` is the skip part of gate g's return.
        """
        rewards = (1 - actions) * self.cfg.alpha / len(actions)  # (G, N)
        returns, running = [], torch.zeros_like(rewards[0])
        for r in reversed(rewards):
            running = r + self.cfg.gamma * running
            returns.insert(0, running)
        adv = torch.stack(returns)
        adv = adv - adv.mean(dim=1, keepdim=True)
        return -self.cfg.rl_weight * (log_probs * adv).mean(dim=1).sum()


class DenseResNet(nn.Module):
    """The same CIFAR ResNet with every block executed; parameters under `net.` as in `SkipNet`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width, shortcut="B")

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(x), {}


def loss(output: Tensor, info: dict, target: Tensor) -> Tensor:
    """Hybrid loss: cross-entropy + `aux_loss` + REINFORCE on the final reward `-CE` (RL phase only).

    The final reward reaches gate g with the weight `rl_weight * gamma^(G-g)`
    (`info["final_reward_weights"] (G,)`); a batch-mean baseline is subtracted.
    """
    ce = F.cross_entropy(output, target, reduction="none")  # (N,)
    total = ce.mean() + info.get("aux_loss", 0.0)
    if "log_probs" not in info:
        return total
    adv = -(ce.detach() - ce.detach().mean())  # (N,) final reward -CE minus its batch mean
    pg = (info["log_probs"] * adv).mean(dim=1)  # (G,)
    return total - (info["final_reward_weights"] * pg).sum()


def build(cfg: Config | None = None) -> SkipNet:
    cfg = cfg or Config()
    _check(cfg)
    return SkipNet(cfg)


def build_baseline(cfg: Config | None = None) -> DenseResNet:
    cfg = cfg or Config()
    _check(cfg)
    return DenseResNet(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def summarize(info: dict) -> dict:
    """Executed fraction of the gated blocks and the execution rate of every gate."""
    if "gates" not in info:
        return {"executed_gated_blocks": 1.0}
    rates = info["gates"].float().mean(dim=1)
    return {
        "executed_gated_blocks": round(float(rates.mean()), 4),
        "gate_rates": " ".join(f"{r:.2f}" for r in rates.tolist()),
    }
