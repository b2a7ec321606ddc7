"""# BlockDrop: Dynamic Inference Paths in Residual Networks

[Wu, Nagarajan, Kumar, Rennie, Davis, Grauman and Feris, CVPR 2018](https://arxiv.org/abs/1711.08393)
(official code: [Tushar-N/blockdrop](https://github.com/Tushar-N/blockdrop)).

## What is dynamic

- **Unit:** a whole residual block of a CIFAR ResNet. A dropped block outputs its shortcut (the
  identity, or the parameter-free downsampling where the shape changes); a kept block outputs
  `relu(residual(x) + shortcut(x))`.
- **Decided by:** a separate *policy network*, a CIFAR ResNet-8 (one basic block per stage), that
  looks at the image (resized to `policy_size`) **once** and outputs one keep probability per block of
  the main ResNet (a linear layer on its pooled features, then a sigmoid).
- **When:** per image, in one shot before the main network runs, in train and eval.
  - `train()`: first `pretrain_steps` steps train the ResNet with every block (standing in for the
    pretrained ResNet the paper starts from); then the policy samples `a ~ Bernoulli(p')` with the
    exploration bound `p' = alpha p + (1 - alpha)(1 - p)` and the ResNet runs with the sampled blocks
    (masked, so gradients flow). The reward is `1 - (blocks used / blocks)^2` for a correct prediction
    and `penalty` otherwise; the advantage subtracts the reward of the greedy policy `p >= 0.5`
    (self-critical baseline, as in the official code). The module's `loss` is REINFORCE plus the
    cross-entropy of the sampled path (joint finetuning); the reward needs the labels, so
    `info["aux_loss"]` is zero. A **curriculum** hands the policy the last `k` blocks first, `k`
    growing from 1 to all blocks over `curriculum_steps` steps (the others are kept).
  - `eval()`: deterministic policy `p >= threshold`; every block runs **only on the images that keep
    it**, gathered into a smaller batch and written back in place (`index_copy`); a block that no image
    keeps is not called at all.

`info` holds `policy (N, B)` (bool in eval; 0/1 floats in train), `keep_probs (N, B)`, `keep_rate`
(fraction of blocks kept), `aux_loss`, and in the policy phase `log_prob (N,)`, `policy_map (N, B)` and
`map_output (N, K)` (the greedy policy's logits, computed without gradient). The policy network's MACs
count on the dynamic side.

## Operating point

- The paper's: ResNet-110 on CIFAR-10, where the finetuned policy keeps 16.9 of 54 blocks on average
  at 93.6 % accuracy (official README). `keep_init` puts an untrained model there: the policy's last
  layer starts with weights ~ N(0, 0.001) and a bias of `+1` (p = 0.73) on `round(keep_init * B)`
  evenly spread blocks and `-1` on the others, so exactly that fraction of blocks runs and executed
  MACs grow monotonically with it. The default `1.0` keeps every block, the full ResNet the paper's
  curriculum starts from, and is where training starts; `None` keeps PyTorch's initialization (an
  input-dependent, random choice).
- `threshold` moves the eval decision: higher keeps fewer blocks.
- In training, `penalty` trades accuracy against blocks used (the paper's knob: -10 for ResNet-110 on
  CIFAR-10, -5 for ResNet-101 on ImageNet). Ours is -2 for the short digits run, where every block of
  the small ResNet matters more.

## Simplifications against the paper

- A small CIFAR ResNet (depth 14) by default, with the policy on a 16x16 image (ours: downsampled 2x,
  as the paper's ImageNet policy); the operating point uses ResNet-110 with the paper's ResNet-8
  policy on the full 32x32 image, as the paper's CIFAR policy.
- One short schedule from scratch: dense training of the ResNet, then curriculum and joint
  finetuning of ResNet and policy at once (the paper freezes the ResNet during the curriculum). No
  entropy bonus in the curriculum.
- Option-A shortcuts subsample by the stride instead of average-pooling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.resnet import BasicBlock, CifarResNet, cifar_resnet
from implementations.common.train import TrainSettings

_BIAS = 1.0  # |bias| of an untrained policy output placed on or off by `keep_init` (p = 0.73 or 0.27)


@dataclass
class Config:
    depth: int = 14  # main CIFAR ResNet 6n+2: B = 3n droppable blocks
    width: int = 16
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    policy_depth: int = 8  # policy ResNet (paper: ResNet-8 on CIFAR)
    policy_width: int = 16
    policy_size: int | None = 16  # side of the image the policy sees (None: image_size, as on CIFAR)
    threshold: float = 0.5  # eval: keep block b where p_b >= threshold
    keep_init: float | None = 1.0  # untrained operating point: fraction of blocks kept (None: random)
    alpha: float = 0.8  # exploration bound of the sampling probabilities (official default)
    penalty: float = -2.0  # reward of a wrong prediction (ours; paper: -10 on CIFAR-10, -5 on ImageNet)
    pretrain_steps: int = 44  # training steps of the dense ResNet before the policy learns
    curriculum_steps: int = 44  # steps over which the policy takes over from the last block to all


TRAIN = TrainSettings(epochs=8, lr=1e-2, batch_size=64)


def _check(cfg: Config) -> None:
    if not 0.0 <= cfg.threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {cfg.threshold!r}")
    if cfg.keep_init is not None and not 0.0 <= cfg.keep_init <= 1.0:
        raise ValueError(f"keep_init must be None or in [0, 1], got {cfg.keep_init!r}")
    if not 0.5 < cfg.alpha <= 1.0:
        raise ValueError(f"alpha must be in (0.5, 1], got {cfg.alpha!r}")
    if cfg.policy_size is not None and cfg.policy_size < 8:
        raise ValueError(f"policy_size must be None or >= 8, got {cfg.policy_size!r}")
    if cfg.pretrain_steps < 0 or cfg.curriculum_steps < 0:
        raise ValueError(f"pretrain_steps and curriculum_steps must be >= 0, got "
                         f"{cfg.pretrain_steps!r}, {cfg.curriculum_steps!r}")


def keep_pattern(num_blocks: int, rate: float) -> list[bool]:
    """Which blocks an untrained policy keeps: `round(rate * B)` of them, evenly spread."""
    k = round(rate * num_blocks)
    return [((b + 1) * k) // num_blocks > (b * k) // num_blocks for b in range(num_blocks)]


class Policy(nn.Module):
    """BlockDrop's policy: `(N, C, H, W) -> (N, B)` keep logits (small ResNet, pool, linear)."""

    def __init__(self, cfg: Config, num_blocks: int) -> None:
        super().__init__()
        self.size = cfg.policy_size or cfg.image_size
        self.net = cifar_resnet(cfg.policy_depth, num_blocks, cfg.in_channels, cfg.policy_width)
        if cfg.keep_init is not None:
            nn.init.normal_(self.net.fc.weight, std=0.001)
            bias = [_BIAS if k else -_BIAS for k in keep_pattern(num_blocks, cfg.keep_init)]
            with torch.no_grad():
                self.net.fc.bias.copy_(torch.tensor(bias))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:  # average-pool down, as the paper's ImageNet policy
            x = F.adaptive_avg_pool2d(x, self.size)
        return self.net(x)


def drop_block_train(block: BasicBlock, x: Tensor, keep: Tensor) -> Tensor:
    """Masked block: `keep * block(x) + (1 - keep) * shortcut(x)`; `keep (N,)` 0/1."""
    sc = block.shortcut(x)
    full = F.relu(block.residual(x) + sc)
    k = keep.view(-1, 1, 1, 1)
    return k * full + (1 - k) * sc


def drop_block_eval(block: BasicBlock, x: Tensor, idx: Tensor | None) -> Tensor:
    """Executing block: `relu(residual + shortcut)` on the rows `idx (n,)`, shortcut elsewhere.

    `idx=None` means every row keeps the block; an empty `idx` means none does (the block is not called).
    """
    if idx is None:
        return block(x)
    out = block.shortcut(x)
    if idx.numel() == 0:
        return out
    sub = F.relu(block.residual(x.index_select(0, idx)) + out.index_select(0, idx))
    return out.index_copy(0, idx, sub)


def rows_per_block(keep: Tensor) -> list[Tensor | None]:
    """`keep (N, B)` bool -> for each block the rows that keep it (`None`: all rows), with one host sync."""
    counts = keep.sum(dim=0).tolist()
    n = len(keep)
    return [None if c == n else (keep[:, b].nonzero().flatten() if c else keep.new_empty(0, dtype=torch.long))
            for b, c in enumerate(counts)]


class BlockDrop(nn.Module):
    """Policy network + CIFAR ResNet whose blocks it keeps or drops; `forward(x) -> (logits, info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net: CifarResNet = cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width)
        self.blocks: list[BasicBlock] = list(self.net.blocks())  # a plain list: the modules live in `net`
        self.num_blocks = len(self.blocks)
        self.policy = Policy(cfg, self.num_blocks)
        self.steps = 0  # train-mode forward calls: dense pre-training, then curriculum and finetuning

    def run(self, x: Tensor, keep: Tensor) -> Tensor:
        """Main ResNet under the policy `keep (N, B)`: executing in eval, masked in train."""
        h = self.net.stem(x)
        if self.training:
            for b, block in enumerate(self.blocks):
                h = drop_block_train(block, h, keep[:, b])
        else:
            for block, idx in zip(self.blocks, rows_per_block(keep), strict=True):
                h = drop_block_eval(block, h, idx)
        return self.net.head(h)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        if self.training:
            self.steps += 1
            if self.steps <= self.cfg.pretrain_steps:
                return self.net(x), {"aux_loss": x.new_zeros(())}
        logits = self.policy(x)
        probs = torch.sigmoid(logits)
        if not self.training:
            keep = probs >= self.cfg.threshold
            info = {"policy": keep, "keep_probs": probs, "keep_rate": keep.float().mean(), "aux_loss": x.new_zeros(())}
            return self.run(x, keep), info
        return self._forward_policy_train(x, probs)

    def _controlled(self) -> int:
        """How many of the last blocks the policy decides at this training step (curriculum)."""
        done = self.steps - self.cfg.pretrain_steps - 1  # policy steps before this one
        if self.cfg.curriculum_steps == 0:
            return self.num_blocks
        return min(self.num_blocks, 1 + done * self.num_blocks // self.cfg.curriculum_steps)

    def _forward_policy_train(self, x: Tensor, probs: Tensor) -> tuple[Tensor, dict]:
        bounded = self.cfg.alpha * probs + (1 - self.cfg.alpha) * (1 - probs)
        sample = torch.bernoulli(bounded.detach())
        greedy = (probs.detach() >= 0.5).to(x.dtype)
        decided = torch.zeros_like(sample)
        decided[:, self.num_blocks - self._controlled():] = 1  # curriculum: earlier blocks are kept
        sample = torch.where(decided.bool(), sample, torch.ones_like(sample))
        greedy = torch.where(decided.bool(), greedy, torch.ones_like(greedy))
        log_prob = (decided * (sample * bounded.log() + (1 - sample) * (1 - bounded).log())).sum(dim=1)
        with torch.no_grad():
            map_output = self.run(x, greedy)
        info = {"policy": sample, "keep_probs": probs, "keep_rate": sample.mean(), "aux_loss": x.new_zeros(()),
                "log_prob": log_prob, "policy_map": greedy, "map_output": map_output, "penalty": self.cfg.penalty}
        return self.run(x, sample), info


class DenseResNet(nn.Module):
    """The main CIFAR ResNet with every block (no policy); parameters under `net.` as in `BlockDrop`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(x), {}


def reward(output: Tensor, target: Tensor, policy: Tensor, penalty: float) -> Tensor:
    """BlockDrop's reward `(N,)`: `1 - (blocks used / B)^2` if the prediction is right, else `penalty`."""
    used = policy.float().mean(dim=1)
    right = output.argmax(dim=1) == target
    return torch.where(right, 1 - used**2, torch.full_like(used, penalty))


def loss(output: Tensor, info: dict, target: Tensor) -> Tensor:
    """Joint finetuning: cross-entropy of the sampled path + REINFORCE with the greedy policy as baseline."""
    ce = F.cross_entropy(output, target) + info.get("aux_loss", 0.0)
    if "log_prob" not in info:
        return ce
    penalty = info["penalty"]
    with torch.no_grad():
        adv = reward(output, target, info["policy"], penalty) - reward(
            info["map_output"], target, info["policy_map"], penalty)
    return ce - (info["log_prob"] * adv).mean()


def build(cfg: Config | None = None) -> BlockDrop:
    cfg = cfg or Config()
    _check(cfg)
    return BlockDrop(cfg)


def build_baseline(cfg: Config | None = None) -> DenseResNet:
    cfg = cfg or Config()
    _check(cfg)
    return DenseResNet(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def summarize(info: dict) -> dict:
    """Fraction of blocks kept, per-block keep rates and the number of distinct policies."""
    if "policy" not in info:
        return {"kept_blocks": 1.0}
    policy = info["policy"].float()
    rates = policy.mean(dim=0)
    return {
        "kept_blocks": round(float(rates.mean()), 4),
        "blocks_per_image": round(float(policy.sum(dim=1).mean()), 2),
        "block_rates": " ".join(f"{r:.2f}" for r in rates.tolist()),
        "unique_policies": len({tuple(row) for row in policy.bool().tolist()}),
    }
