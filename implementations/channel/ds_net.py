"""# DS-Net: Dynamic Slimmable Network

[Li, Wang, Wang, Liang, Li and Chang, CVPR 2021](https://arxiv.org/abs/2103.13258)
(official code: [changlin31/DS-Net](https://github.com/changlin31/DS-Net)).

## What is dynamic

- **Unit:** the width of every stage of a ResNet, always as a *leading slice* of the stored filters
  (dynamic weight slicing): a stage at ratio `r` uses the first `round(r C)` channels of every tensor
  inside it, i.e. the weight views `W[:o, :i]`; nothing is copied, indexed or masked.
- **Decided by:** a gate per stage (the *slimming head* of DS-Net's double-headed gate), computed from
  the stage's input: global average pool -> fully connected layer -> ReLU -> fully connected layer
  with one logit per width candidate.
- **When:** per sample, at every stage, in eval (and in the second training stage).
  - `train()`, two stages as in the paper. **Stage 1** (the first `gate_start_step` training steps)
    trains the weight-sharing supernet with the **sandwich rule** and **in-place distillation**: every
    step runs the largest, the smallest and one random width; the largest learns from the labels, the
    others from the largest's detached predictions (KL). **Stage 2** keeps that and also trains the
    gates: a straight-through Gumbel-Softmax picks each sample's width (channel masks with the
    one-hot's gradient), with the **sandwich gate sparsification** target of the official code (the
    smallest width where the smallest sub-network is right, the largest otherwise; cross-entropy on
    the gate logits) and a MAC-budget loss (`target`) on the MACs of the width the eval rule would
    pick (the argmax, with the softmax's gradient).
  - `eval()`: the gate's argmax picks the width. **Samples are grouped by width**: each group runs
    the stage on tensors that hold only its live channels: one convolution per group on the weight
    view `W[:o, :i]`, then a BatchNorm on the channel prefix. Where a group's samples arrive with
    different widths from the previous stage (its first convolutions), and for the classifier of a
    mixed batch, the layers are `kernels.sliced_conv2d` / `kernels.sliced_linear`; a group of one
    width calls the convolution on the weight view directly, which is exactly the kernel's one-group
    path without its per-call checks and zero-filled output (`kernel_for_uniform=True` routes those
    layers through the kernel too). A batch of one width (always at batch 1) is one dense
    convolution per layer on contiguous activations.

`info` holds `choices` (`(S, N)` candidate index of every stage and sample), `widths` (the ratios),
`gate_logits` and, in training, the supernet's logits. The gates' MACs count on the dynamic side.

## Operating point

- `widths` are the candidate ratios (the official code's gate chooses among 4); `target` is the MAC
  budget (fraction of the dense network) of the trained gates.
- Without training, `width_init` sets it: every gate is initialized to pick the candidate closest to
  it for every input (small last-layer weights, a large bias on that candidate), so executed MACs
  follow the chosen width (about `r^2` of the stages' MACs). `None` keeps the default random
  initialization, under which the untrained gates pick input-dependent, mixed widths.

## Simplifications against the paper

- ResNet backbones (a small CIFAR ResNet by default, ResNet-50 at the operating point, at a reduced
  image size for the CPU); one gate per stage; the stem and the classifier's outputs are never sliced.
- What limits the measured speedup: the stem (and its max-pool) stays dense, and BatchNorm, ReLU and
  the residual adds shrink with the width `r`, not with `r^2` as the MACs do; the weight views of
  a slice are not contiguous, so the convolution copies them (a few percent at batch 1).
- Only the slimming head of the double-headed gate (no SE attention head, so the full-width supernet
  is exactly the baseline ResNet); in-place distillation from the largest network instead of in-place
  ensemble bootstrapping (no EMA teacher); BatchNorm statistics are shared by all widths (no BN
  recalibration); both training stages run inside one short training run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from implementations.common.gates import gumbel_softmax, straight_through
from implementations.common.losses import mac_budget_loss
from implementations.common.resnet import Bottleneck, PadShortcut, cifar_resnet, resnet50
from implementations.common.train import TrainSettings
from kernels.sliced import sliced_conv2d, sliced_linear


@dataclass
class Config:
    backbone: Literal["cifar", "resnet50"] = "cifar"
    depth: int = 14  # CIFAR ResNet 6n+2 (ignored by resnet50)
    width: int = 16  # channels of the first stage (64 for the standard ResNet-50)
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # width ratio candidates, increasing
    gate_hidden: int = 16
    target: float = 0.5  # stage 2: MAC budget of the gated network (fraction of dense)
    budget_weight: float = 10.0
    sgs_weight: float = 1.0  # weight of the sandwich-gate-sparsification cross-entropy
    gate_start_step: int = 60  # training steps of stage 1 (supernet only) before the gates train
    tau: float = 1.0  # Gumbel-Softmax temperature
    width_init: float | None = None  # untrained operating point: every gate picks this width
    kernel_for_uniform: bool = False  # also route single-width groups through the sliced kernels


TRAIN = TrainSettings(epochs=5, lr=3e-3, batch_size=64)


def _check(cfg: Config) -> None:
    if cfg.backbone not in ("cifar", "resnet50"):
        raise ValueError(f"backbone must be 'cifar' or 'resnet50', got {cfg.backbone!r}")
    w = cfg.widths
    if len(w) < 2 or list(w) != sorted(set(w)) or not (0 < w[0] and w[-1] == 1.0):
        raise ValueError(f"widths must be increasing ratios in (0, 1] ending with 1.0, got {w!r}")
    if cfg.width_init is not None and not 0 < cfg.width_init <= 1:
        raise ValueError(f"width_init must be None or in (0, 1], got {cfg.width_init!r}")
    if not 0 < cfg.target <= 1:
        raise ValueError(f"target must be in (0, 1], got {cfg.target!r}")
    if not cfg.tau > 0:
        raise ValueError(f"tau must be > 0, got {cfg.tau!r}")


def make_backbone(cfg: Config) -> nn.Module:
    """CIFAR ResNet (depth, width; basic blocks) or ImageNet-layout ResNet-50 (bottlenecks)."""
    if cfg.backbone == "resnet50":
        return resnet50(cfg.num_classes, cfg.in_channels, cfg.width)
    return cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width)


def live(channels: int, ratio: float) -> int:
    """Channels a tensor of `channels` keeps at width ratio `ratio` (at least one)."""
    return max(1, round(ratio * channels))


def _convs(block: nn.Module) -> list[nn.Conv2d]:
    return [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck) else [])


def _bns(block: nn.Module) -> list[nn.BatchNorm2d]:
    return [block.bn1, block.bn2] + ([block.bn3] if isinstance(block, Bottleneck) else [])


class SlimmingGate(nn.Module):
    """Slimming head: stage input `(N, C, H, W)` -> `(N, K)` logits over the width candidates."""

    def __init__(self, in_channels: int, choices: int, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, choices)

    def forward(self, pooled: Tensor) -> Tensor:
        """`pooled (N, c)` with `c <= in_channels` live channels (the others are zero)."""
        return self.fc2(F.relu(F.linear(pooled, self.fc1.weight[:, : pooled.shape[1]], self.fc1.bias)))

    def prefer(self, index: int) -> None:
        """Make the gate pick candidate `index` for every input (untrained operating point)."""
        with torch.no_grad():
            self.fc2.weight.mul_(0.01)
            self.fc2.bias.zero_()
            self.fc2.bias[index] = 5.0


def _bn(bn: nn.BatchNorm2d, x: Tensor, relu: bool) -> Tensor:
    """Eval BatchNorm of the leading `x.shape[1]` channels (the live prefix), then ReLU."""
    c = x.shape[1]
    y = F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c], bn.bias[:c], False, 0.0, bn.eps)
    return y.relu_() if relu else y


def _sliced(conv: nn.Conv2d, x: Tensor, in_w: Tensor | None, out: int, kernel: bool) -> Tensor:
    """`conv` on the leading `out` output channels: `(N, c, H, W) -> (N, out, H', W')`.

    `in_w (N,)` holds per-sample input widths (a group whose samples came from different widths);
    None means every sample uses all `c` channels of `x`. Per-sample widths go through
    `kernels.sliced_conv2d`; a single width is the kernel's own one-group path, a plain convolution on
    the weight view `W[:out, :c]`, called directly unless `kernel` (the kernel's per-call checks and
    zero-filled output cost about 0.2 ms per layer on the CPU).
    """
    w = conv.weight[:out, : x.shape[1]]
    if in_w is None and not kernel:
        return F.conv2d(x, w, None, conv.stride, conv.padding)
    if in_w is None:
        in_w = torch.full((len(x),), x.shape[1], dtype=torch.long, device=x.device)
    return sliced_conv2d(x, in_w, torch.full_like(in_w, out), w, None, conv.stride, conv.padding)


def _shortcut_eval(block: nn.Module, x: Tensor, in_w: Tensor | None, out: int, kernel: bool) -> Tensor:
    """The block's shortcut restricted to the first `out` output channels."""
    ds = block.downsample
    if ds is None or isinstance(ds, PadShortcut):
        if isinstance(ds, PadShortcut):
            x = x[:, :, :: ds.stride, :: ds.stride]
        c = x.shape[1]
        return x[:, :out] if c >= out else F.pad(x, (0, 0, 0, 0, 0, out - c))
    return _bn(ds[1], _sliced(ds[0], x, in_w, out, kernel), relu=False)


def block_eval(block: nn.Module, x: Tensor, in_w: Tensor | None, ratio: float, kernel: bool = False) -> Tensor:
    """Executing block at width `ratio`: `x (N, c, H, W)` -> `(N, out, H', W')`.

    `in_w (N,)`: per-sample live input widths (channels past them are zero), or None for all `c`.
    """
    convs, bns = _convs(block), _bns(block)
    h, w = x, in_w
    for i, (conv, bn) in enumerate(zip(convs, bns, strict=True)):
        h = _bn(bn, _sliced(conv, h, w, live(conv.out_channels, ratio), kernel), relu=i < len(convs) - 1)
        w = None
    return (h + _shortcut_eval(block, x, in_w, h.shape[1], kernel)).relu_()


def block_masked(block: nn.Module, x: Tensor, masks: dict[int, Tensor]) -> Tensor:
    """Relaxed (and oracle) block: dense convolutions, every tensor times its `(N, C)` channel mask."""
    def m(t: Tensor) -> Tensor:
        return t * masks[t.shape[1]][..., None, None]

    convs, bns = _convs(block), _bns(block)
    h = x
    for i, (conv, bn) in enumerate(zip(convs, bns, strict=True)):
        h = bn(conv(h))
        h = m(F.relu(h) if i < len(convs) - 1 else h)
    return F.relu(h + m(block.shortcut(x)))


class DSResNet(nn.Module):
    """ResNet with a width gate per stage; `forward(x) -> (logits (N, K), info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = make_backbone(cfg)
        self.gates = nn.ModuleList(
            SlimmingGate(stage[0].in_channels, len(cfg.widths), cfg.gate_hidden) for stage in self.net.stages
        )
        if cfg.width_init is not None:
            best = min(range(len(cfg.widths)), key=lambda k: abs(cfg.widths[k] - cfg.width_init))
            for g in self.gates:
                g.prefer(best)
        self.train_steps = 0
        self._stage_macs: Tensor | None = None  # (S, K) dense-conv MACs of every stage at every width

    # ---------------------------------------------------------------- eval: sliced execution
    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self._forward_train(x) if self.training else self._forward_eval(x)

    def _forward_eval(self, x: Tensor) -> tuple[Tensor, dict]:
        kernel = self.cfg.kernel_for_uniform
        h, in_w = self.net.stem(x), None  # in_w None: every sample uses every channel of h
        choices, gate_logits = [], []
        for stage, gate in zip(self.net.stages, self.gates, strict=True):
            logits = gate(h.mean(dim=(2, 3)))  # channels past a sample's width are zero
            choice = logits.argmax(dim=1)
            h, in_w = self._stage_eval(stage, h, in_w, choice)
            choices.append(choice)
            gate_logits.append(logits)
        pooled = h.mean(dim=(2, 3))
        fc = self.net.fc
        weight = fc.weight[:, : pooled.shape[1]]
        if in_w is None and not kernel:
            out = F.linear(pooled, weight, fc.bias)
        else:
            in_w = torch.full((len(x),), pooled.shape[1], dtype=torch.long, device=x.device) if in_w is None else in_w
            out = sliced_linear(pooled, in_w, torch.full_like(in_w, fc.out_features), weight, fc.bias)
        return out, self._info(choices, gate_logits)

    def _stage_eval(
        self, stage: nn.Sequential, h: Tensor, in_w: Tensor | None, choice: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """Run one stage with the samples grouped by their width.

        Returns the output `(N, widest, H', W')` (channels past a sample's width are zero) and the
        per-sample widths, or None when every sample has the same width.
        """
        values = choice.unique().tolist()
        outs = []
        for k in values:
            rows = None if len(values) == 1 else (choice == k).nonzero().flatten()
            xg = h if rows is None else h.index_select(0, rows)
            wg = None if in_w is None else (in_w if rows is None else in_w[rows])
            if wg is not None and bool((wg == xg.shape[1]).all()):
                wg = None
            for block in stage:
                xg = block_eval(block, xg, wg, self.cfg.widths[k], self.cfg.kernel_for_uniform)
                wg = None
            outs.append((rows, xg))
        if len(outs) == 1:
            return outs[0][1], None
        widest = max(y.shape[1] for _, y in outs)
        out = outs[0][1].new_zeros(len(h), widest, *outs[0][1].shape[2:])
        out_w = torch.empty(len(h), dtype=torch.long, device=h.device)
        for rows, y in outs:
            out[rows, : y.shape[1]] = y
            out_w[rows] = y.shape[1]
        return out, out_w

    # ---------------------------------------------------------------- train: masked supernet
    def masks_for(self, stage: nn.Sequential, onehot: Tensor) -> dict[int, Tensor]:
        """Channel masks `(N, C)` of every tensor size in `stage` from width one-hots `(N, K)`."""
        sizes = {c.out_channels for b in stage for c in _convs(b)}
        masks = {}
        for c in sizes:
            prefix = torch.stack([torch.arange(c) < live(c, r) for r in self.cfg.widths]).to(onehot)
            masks[c] = onehot @ prefix
        return masks

    def forward_masked(self, x: Tensor, choose) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Dense network with channel masks; `choose(stage_index, gate_logits) -> (N, K) one-hot`."""
        h = self.net.stem(x)
        onehots, all_logits = [], []
        for s, (stage, gate) in enumerate(zip(self.net.stages, self.gates, strict=True)):
            logits = gate(h.mean(dim=(2, 3)))
            onehot = choose(s, logits)
            masks = self.masks_for(stage, onehot)
            for block in stage:
                h = block_masked(block, h, masks)
            onehots.append(onehot)
            all_logits.append(logits)
        return self.net.head(h), onehots, all_logits

    def _fixed(self, k: int):
        def choose(s: int, logits: Tensor) -> Tensor:
            return F.one_hot(torch.full((len(logits),), k), len(self.cfg.widths)).to(logits)
        return choose

    def _forward_train(self, x: Tensor) -> tuple[Tensor, dict]:
        k_max = len(self.cfg.widths) - 1
        largest, _, _ = self.forward_masked(x, self._fixed(k_max))
        smallest, _, _ = self.forward_masked(x, self._fixed(0))
        middle, _, _ = self.forward_masked(x, self._fixed(random.randrange(1, k_max) if k_max > 1 else 0))
        info = {"supernet_logits": (largest, smallest, middle), "stage": 1}
        output = largest
        if self.train_steps >= self.cfg.gate_start_step:
            def gumbel(s: int, logits: Tensor) -> Tensor:
                return gumbel_softmax(logits, self.cfg.tau, hard=True, dim=1)

            output, onehots, logits = self.forward_masked(x, gumbel)
            # the budget prices the eval decision (argmax), with the softmax's gradient
            decided = [straight_through(F.softmax(z, dim=1), F.one_hot(z.argmax(1), z.shape[1]).to(z)) for z in logits]
            info.update(stage=2, gate_onehots=onehots, gate_logits=logits,
                        expected_mac_fraction=self._mac_fraction(decided, x), target=self.cfg.target,
                        budget_weight=self.cfg.budget_weight, sgs_weight=self.cfg.sgs_weight)
        self.train_steps += 1
        info["aux_loss"] = torch.zeros((), device=x.device)
        return output, info

    def _mac_fraction(self, onehots: list[Tensor], x: Tensor) -> Tensor:
        """`(N,)` executed fraction of the stages' conv MACs implied by the width one-hots."""
        if self._stage_macs is None:
            self._stage_macs = self._measure_stage_macs(x[:1])
        macs = sum(oh @ self._stage_macs[s].to(oh) for s, oh in enumerate(onehots))
        return macs / self._stage_macs[:, -1].sum()

    @torch.no_grad()
    def _measure_stage_macs(self, x: Tensor) -> Tensor:
        """MACs of every stage at every uniform width, counted on one sliced pass per width (one sample)."""
        was = self.training
        self.eval()
        table = torch.zeros(len(self.net.stages), len(self.cfg.widths))
        for k, r in enumerate(self.cfg.widths):
            h = self.net.stem(x)
            for s, stage in enumerate(self.net.stages):
                for block in stage:
                    with FlopCounterMode(display=False) as counter:
                        h = block_eval(block, h, None, r)
                    table[s, k] += counter.get_total_flops() / 2
        self.train(was)
        return table

    def _info(self, choices: list[Tensor], gate_logits: list[Tensor]) -> dict:
        ch = torch.stack(choices)
        ratios = torch.tensor(self.cfg.widths, device=ch.device)[ch]
        return {"choices": ch, "widths": ratios, "gate_logits": gate_logits}


def loss(output: Tensor, info: dict, target: Tensor) -> Tensor:
    """Sandwich rule + in-place distillation; in stage 2 also the gated network, SGS and the budget."""
    if "supernet_logits" not in info:
        return F.cross_entropy(output, target)
    largest, smallest, middle = info["supernet_logits"]
    teacher = F.softmax(largest.detach(), dim=1)
    total = F.cross_entropy(largest, target)
    for student in (smallest, middle):
        total = total + F.kl_div(F.log_softmax(student, dim=1), teacher, reduction="batchmean")
    if info.get("stage") == 2:
        easy = smallest.argmax(dim=1) == target
        k_max = info["gate_logits"][0].shape[1] - 1
        gate_target = torch.where(easy, 0, k_max)
        sgs = torch.stack([F.cross_entropy(z, gate_target) for z in info["gate_logits"]]).mean()
        budget = mac_budget_loss(info["expected_mac_fraction"], 1.0, info["target"])
        total = total + F.cross_entropy(output, target) + info["sgs_weight"] * sgs + info["budget_weight"] * budget
    return total


class DenseResNet(nn.Module):
    """The same ResNet at full width, no gates; parameters under `net.`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = make_backbone(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(x), {}


def build(cfg: Config | None = None) -> DSResNet:
    cfg = cfg or Config()
    _check(cfg)
    return DSResNet(cfg)


def build_baseline(cfg: Config | None = None) -> DenseResNet:
    cfg = cfg or Config()
    _check(cfg)
    return DenseResNet(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def summarize(info: dict) -> dict:
    """Mean width ratio, per stage, and the histogram of chosen candidates."""
    if "widths" not in info:
        return {"mean_width": 1.0}
    w = info["widths"].float()
    counts = torch.bincount(info["choices"].flatten(), minlength=len(info["gate_logits"][0][0]))
    return {
        "mean_width": round(float(w.mean()), 4),
        "stage_widths": " ".join(f"{v:.2f}" for v in w.mean(dim=1).tolist()),
        "width_histogram": " ".join(str(c) for c in counts.tolist()),
    }
