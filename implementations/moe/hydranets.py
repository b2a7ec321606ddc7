"""# HydraNets: Specialized Dynamic Architectures for Efficient Inference

[Mullapudi, Mark, Shazeer and Fatahalian, CVPR 2018](https://openaccess.thecvf.com/content_cvpr_2018/html/Mullapudi_HydraNets_Specialized_Dynamic_CVPR_2018_paper.html)
(no public code).

## What is dynamic

- **Unit:** a *branch*, a copy of the later part of the network (here the second and third stages of
  a CIFAR ResNet plus global pooling and a linear projection) specialized on a group of classes. A
  shared *stem* (the first stage) feeds every branch; a *combiner* sums the selected branches'
  projected features, weighted by their gate scores, and a shared linear classifier reads the sum.
- **Decided by:** a gate on the stem features (a strided 3x3 conv, BatchNorm, ReLU, global average
  pooling, BatchNorm, a linear layer: one logit per branch, sigmoid scores); the `k` branches with
  the highest scores run. At build time the gate's BatchNorm statistics are set from a fixed random
  calibration batch, so an untrained gate already spreads images over the branches (as a trained
  gate does by class group) instead of sending every image to the same `k`.
- **When:** per image, in eval. Training uses the paper's *soft gating*: every branch runs on every
  image and the combiner weights its features by the gate's sigmoid score; the gate is trained at
  the same time to predict which branch owns the image's class (binary cross-entropy on the branch
  memberships, `gate_weight`), which pulls each branch's gradient towards its class group and so
  specializes it.

In `eval()` the images are grouped by branch: each selected branch runs once on the stacked images
that chose it (`index_select`), a branch chosen by no image is not called, and the branches' final
linear projections run as one grouped GEMM over the `(image, branch)` rows through
`kernels.routed_linear` (rows already sorted by branch, so the kernel needs no permutation). `info`
holds `branches (N, k)` (chosen ids), `scores (N, B)` (sigmoid
scores), `branch_counts (B,)` (images per branch), and `gate_logits` and `class_branch` (the branch
that owns each class) for the gate loss.

## Operating point

`top_k` (`k`) of `num_branches` branches run per image: the branch MACs are `k / B` of the
all-branches network (any model, trained or not, runs exactly `k`). `top_k = num_branches` is the
baseline: every branch on every image (`build_baseline`, the same parameters).

## Simplifications against the paper

- Class groups are fixed (class `c` belongs to branch `c mod B`, or `class_groups`) instead of being
  found by clustering a trained network's features or confusion matrix.
- The branches are the last two stages of a CIFAR ResNet with option-A shortcuts (the paper builds
  HydraNets from ResNets and DenseNets on CIFAR-100 and an efficient ImageNet network); the combiner is
  a gate-weighted sum of per-branch linear projections followed by one linear classifier.
- Stem, gate and branches are trained jointly from scratch in one stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.resnet import BasicBlock, PadShortcut, conv1x1, conv3x3
from implementations.common.train import TrainSettings
from kernels import routed_linear


@dataclass
class Config:
    depth: int = 8  # CIFAR ResNet 6n+2: stage 1 is the stem, stages 2 and 3 are copied into every branch
    width: int = 8  # stem channels
    branch_width: int = 8  # channels of a branch's first stage (its second stage has twice as many)
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    num_branches: int = 4
    top_k: int = 2  # branches run per image
    feature_dim: int = 32  # width of the combiner (each branch projects its pooled features to it)
    gate_weight: float = 3.0  # weight of the gate's binary cross-entropy on the branch memberships
    class_groups: tuple[int, ...] | None = None  # branch of each class; None: class c -> c mod B


TRAIN = TrainSettings(epochs=6, lr=3e-3, batch_size=64)


def _check(cfg: Config) -> None:
    if isinstance(cfg.depth, bool) or cfg.depth < 8 or (cfg.depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1, got {cfg.depth!r}")
    if cfg.num_branches < 1:
        raise ValueError(f"num_branches must be >= 1, got {cfg.num_branches!r}")
    if not 1 <= cfg.top_k <= cfg.num_branches:
        raise ValueError(f"top_k must be in [1, num_branches={cfg.num_branches}], got {cfg.top_k!r}")
    groups = cfg.class_groups
    valid = groups is None or (len(groups) == cfg.num_classes
                               and all(0 <= g < cfg.num_branches for g in groups))
    if not valid:
        raise ValueError(f"class_groups must give a branch in [0, {cfg.num_branches}) for each of the "
                         f"{cfg.num_classes} classes, got {groups!r}")


def class_to_branch(cfg: Config) -> Tensor:
    """`(K,)` long: the branch that owns each class."""
    if cfg.class_groups is not None:
        return torch.tensor(cfg.class_groups, dtype=torch.long)
    return torch.arange(cfg.num_classes) % cfg.num_branches


def _stage(in_ch: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """CIFAR ResNet stage: option-A shortcut when channels grow, a 1x1 projection when they shrink."""
    down: nn.Module | None = None
    if stride != 1 or in_ch != planes:
        down = PadShortcut(in_ch, planes, stride) if planes >= in_ch else nn.Sequential(
            conv1x1(in_ch, planes, stride), nn.BatchNorm2d(planes))
    rest = (BasicBlock(planes, planes) for _ in range(blocks - 1))
    return nn.Sequential(BasicBlock(in_ch, planes, stride, down), *rest)


class Branch(nn.Module):
    """`(n, width, H, W) -> (n, 4 branch_width)`: two strided CIFAR stages and global average pooling."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        n, b = (cfg.depth - 2) // 6, cfg.branch_width
        self.stages = nn.Sequential(_stage(cfg.width, 2 * b, n, 2), _stage(2 * b, 4 * b, n, 2))
        self.out_features = 4 * b

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(x).mean(dim=(2, 3))


class Gate(nn.Module):
    """`(N, width, H, W) -> (N, B)` logits: strided 3x3 conv, BN, ReLU, global pooling, BN, linear."""

    def __init__(self, width: int, branches: int) -> None:
        super().__init__()
        self.conv, self.bn = conv3x3(width, width, stride=2), nn.BatchNorm2d(width)
        self.norm, self.fc = nn.BatchNorm1d(width), nn.Linear(width, branches)

    def features(self, s: Tensor) -> Tensor:
        """`(N, width, H, W) -> (N, width)` pooled gate features."""
        return F.relu(self.bn(self.conv(s))).mean(dim=(2, 3))

    def forward(self, s: Tensor) -> Tensor:
        return self.fc(self.norm(self.features(s)))


class HydraNet(nn.Module):
    """Stem, gate, `B` branches, combiner; `forward(x) -> (logits (N, K), info)`.

    `dense=True` is the baseline: every branch on every image (the same parameters).
    """

    def __init__(self, cfg: Config, dense: bool = False) -> None:
        super().__init__()
        self.cfg, self.dense = cfg, dense
        n, b = (cfg.depth - 2) // 6, cfg.num_branches
        self.conv1, self.bn1 = conv3x3(cfg.in_channels, cfg.width), nn.BatchNorm2d(cfg.width)
        self.layer1 = _stage(cfg.width, cfg.width, n, 1)
        self.gate = Gate(cfg.width, b)
        self.branches = nn.ModuleList(Branch(cfg) for _ in range(b))
        c = self.branches[0].out_features
        self.proj_weight = nn.Parameter(torch.empty(b, cfg.feature_dim, c))  # per-branch linear, stacked
        self.proj_bias = nn.Parameter(torch.zeros(b, cfg.feature_dim))
        nn.init.kaiming_uniform_(self.proj_weight.view(b * cfg.feature_dim, c), a=5**0.5)
        self.fc = nn.Linear(cfg.feature_dim, cfg.num_classes)
        self.register_buffer("class_branch", class_to_branch(cfg), persistent=False)
        for m in self.modules():  # torchvision's ResNet init for the convs
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self._calibrate_gate()

    @torch.no_grad()
    def _calibrate_gate(self, batch: int = 64) -> None:
        """Set the gate's BN statistics from a fixed calibration batch (what training would do), so an
        untrained gate already routes images by their features instead of sending all to the same k."""
        gen = torch.Generator().manual_seed(1234)
        cfg = self.cfg
        x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
        was_training = self.training
        self.eval()
        pooled = self.gate.features(self.stem(x))
        bn = self.gate.norm
        bn.running_mean.copy_(pooled.mean(dim=0))
        bn.running_var.copy_(pooled.var(dim=0, unbiased=True))
        self.train(was_training)

    def stem(self, x: Tensor) -> Tensor:
        """`(N, C, H, W) -> (N, width, H, W)`."""
        return self.layer1(F.relu(self.bn1(self.conv1(x))))

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        s = self.stem(x)
        gate_logits = self.gate(s)
        scores = torch.sigmoid(gate_logits)
        if self.dense or self.training:  # soft gating: every branch, weighted by its score
            combined, branches = self._all_branches(s, scores), None
        else:
            branches = gate_logits.topk(self.cfg.top_k, dim=1).indices
            combined = self._selected_branches(s, scores, branches)
        info = {"scores": scores, "gate_logits": gate_logits, "class_branch": self.class_branch,
                "gate_weight": self.cfg.gate_weight}
        if branches is not None:
            info["branches"] = branches
            info["branch_counts"] = torch.bincount(branches.flatten(), minlength=self.cfg.num_branches)
        return self.fc(combined), info

    def _all_branches(self, s: Tensor, scores: Tensor) -> Tensor:
        """`sum_b score_b * proj_b(branch_b(s))`: `(N, feature_dim)`."""
        out = 0
        for b, branch in enumerate(self.branches):
            feat = F.linear(branch(s), self.proj_weight[b], self.proj_bias[b])
            out = out + scores[:, b : b + 1] * feat
        return out

    def _selected_branches(self, s: Tensor, scores: Tensor, branches: Tensor) -> Tensor:
        """Only the chosen branches run, each on the stacked images that chose it; `(N, feature_dim)`."""
        n, k = branches.shape
        route, order = torch.sort(branches.flatten(), stable=True)  # (N k,) rows (image, slot) by branch
        counts = torch.bincount(route, minlength=self.cfg.num_branches).tolist()
        image = order.div(k, rounding_mode="floor")  # image of each row, rows grouped by branch
        feats = [self.branches[b](s if count == n else s.index_select(0, rows))
                 for b, (rows, count) in enumerate(zip(image.split(counts), counts, strict=True)) if count]
        if len(feats) != 1:  # several branches (or an empty batch): one (N k, C) block
            feats = [torch.cat(feats) if feats else s.new_empty(0, self.branches[0].out_features)]
        pooled = feats[0]
        # rows are sorted by branch: the grouped GEMM uses them in place; routes come from topk (in range)
        feat = routed_linear(pooled, route, self.proj_weight, self.proj_bias, check_values=False)
        weight = scores.gather(1, branches).flatten().index_select(0, order)
        return s.new_zeros(n, self.cfg.feature_dim).index_add_(0, image, feat * weight.unsqueeze(1))


def loss(output: Tensor, info: dict, target: Tensor) -> Tensor:
    """Cross-entropy plus the gate's binary cross-entropy on the branch that owns each class."""
    ce = F.cross_entropy(output, target)
    if "gate_logits" not in info:
        return ce
    owner = F.one_hot(info["class_branch"][target], info["gate_logits"].shape[1]).to(output.dtype)
    return ce + info["gate_weight"] * F.binary_cross_entropy_with_logits(info["gate_logits"], owner)


def build(cfg: Config | None = None) -> HydraNet:
    cfg = cfg or Config()
    _check(cfg)
    return HydraNet(cfg)


def build_baseline(cfg: Config | None = None) -> HydraNet:
    cfg = cfg or Config()
    _check(cfg)
    return HydraNet(cfg, dense=True)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def summarize(info: dict) -> dict:
    """Branches run per image and how many images each branch served."""
    if "branch_counts" not in info:
        return {"branches_per_image": info["scores"].shape[1]}
    counts = info["branch_counts"]
    n = info["branches"].shape[0]
    return {
        "branches_per_image": info["branches"].shape[1],
        "branch_fraction": round(info["branches"].shape[1] / counts.numel(), 4),
        "images_per_branch": " ".join(str(c) for c in counts.tolist()),
        "batch": n,
    }
