"""# GFNet: Glance and Focus, a Dynamic Approach to Reducing Spatial Redundancy in Image Classification

[Wang, Lv, Huang, Song, Yang and Huang, NeurIPS 2020](https://arxiv.org/abs/2010.05300)
(official code: [blackfeather-wang/GFNet-Pytorch](https://github.com/blackfeather-wang/GFNet-Pytorch)).

## What is dynamic

- **Unit:** a step of a sequential classifier. Step 1 (*glance*) runs a glance CNN on the whole image
  downsampled to `patch_size x patch_size`; each later step (*focus*) runs a second CNN on one
  `patch_size x patch_size` crop of the full-resolution image. A GRU over the steps' pooled features
  predicts the class after every step.
- **Decided by:** two things. *Where to look*: a patch policy (1x1 conv to 32 channels on the previous
  step's feature map, flatten, linear, its own GRU, linear + sigmoid) proposes the crop's position in
  `[0, 1]^2`. *When to stop*: the step's softmax confidence `max_k p_k`; a sample whose confidence
  exceeds the step's threshold leaves with that step's prediction.
- **When:** per sample, in eval. Exited samples **leave the batch for real**: the later steps (crop,
  focus CNN, GRU, policy) run only on the remaining rows (gathered with `index_select`), and when no
  sample remains they are not called.
  - `train()`: every sample runs every step; the crop position is sampled from a Gaussian around the
    policy's output (`action_std`). `loss` is the mean cross-entropy of all steps (glance, focus and
    classifier networks) plus REINFORCE with a moving-average baseline per step for the policy; the
    reward of a crop is the gain it brings in the softmax probability of the true class
    (`p_t(y) - p_{t-1}(y)`, returns discounted by `gamma`), as in the paper. The reward needs the label,
    so the policy term is computed by `loss` rather than returned as `info["aux_loss"]`.
  - `eval()`: the policy's mean position (deterministic), hard exits.

`info` holds `exit_step (N,)` (0 is the glance, `steps - 1` the last focus step), `exit_counts (steps,)`,
`locations (N, steps - 1, 2)` (top-left `(row, col)` of each crop in pixels, -1 where the sample had
left) and, in train mode, `step_logits` (list of `steps` `(N, K)` tensors) and `log_probs (N, steps - 1)`.

## Operating point

Executed MACs per sample are `glance + sum over the focus steps it reached (policy + focus CNN + GRU)`,
each step costing about `(patch_size / image_size)^2` of the dense backbone on the full image.
`exit_fractions[t]` is the fraction of samples meant to leave after step `t` (for the first `steps - 1`
steps; the rest runs to the last step). `build` calibrates the per-step confidence thresholds on a fixed
calibration batch (seeded noise images) so that an untrained model exits at these rates; in `train()`
the thresholds track the same rates on each training batch (a running average, like BatchNorm's
statistics); train-mode confidences (batch statistics, sampled crops) run lower than eval ones, so after
training `model.calibrate(x_train)` resets them in eval mode to hit the budget. `thresholds` sets explicit confidence thresholds
instead (as in the paper, which picks them on validation data for a budget). Raising the fractions
(or lowering the thresholds) lets more samples leave early, so executed MACs fall monotonically.

Operating point `paper`: MobileNetV2 (width 1.0) at 224x224 with 96x96 glance and patches, as in the
paper's MobileNet experiments (96 or 128); ours: `steps=5` and exit fractions `(0.4, 0.2, 0.15, 0.1)`
(15 % reach the fifth step, 2.4 steps on average).

## Simplifications against the paper

- MobileNetV2 (torchvision layout) instead of MobileNet-V3 / ResNet-50 / EfficientNet / RegNet; the
  default `Config` is a tiny MobileNetV2 on 32x32 inputs with 16x16 patches (digits training).
- The patch policy is trained with REINFORCE and a moving-average baseline instead of PPO with a
  learned critic, and all networks are trained jointly from scratch in one stage instead of the paper's
  three stages (pretrained encoders with random patches, then the policy, then the classifier).
- Crop positions are rounded to whole pixels; the glance uses bilinear downsampling.
- Classifier GRU of 128 units (the paper: 1024); the encoders' BatchNorm statistics of an untrained
  model are set on the calibration batch (otherwise its features collapse to one vector).
- Thresholds come from exit fractions (calibrated quantiles) rather than from a budgeted search on a
  validation set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.gates import ReinforceBaseline
from implementations.common.mobilenet import IMAGENET_SETTING, MobileNetV2, mobilenet_v2
from implementations.common.train import TrainSettings

# A tiny MobileNetV2 for 16x16 patches: stride 8, 2x2 feature maps.
TINY_SETTING: tuple[tuple[int, int, int, int], ...] = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2))


@dataclass
class Config:
    arch: str = "tiny"  # "tiny" (small MobileNetV2, stride 8) | "mobilenet_v2" (ImageNet layout, stride 32)
    width_mult: float = 1.0
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    patch_size: int = 16  # side of the glance (downsampled image) and of every focus crop
    steps: int = 3  # 1 glance + (steps - 1) focus steps
    exit_fractions: tuple[float, ...] = (0.5, 0.25)  # fraction leaving after each of the first steps - 1
    thresholds: tuple[float, ...] | None = None  # explicit confidence thresholds; override the fractions
    hidden: int = 128  # classifier GRU width (the paper: 1024)
    policy_hidden: int = 64  # policy GRU width
    action_std: float = 0.1  # std of the sampled crop position in train mode (in [0, 1] units)
    gamma: float = 0.7  # discount of the policy's returns
    policy_weight: float = 1.0  # weight of the REINFORCE term in `loss`
    threshold_momentum: float = 0.9  # running average of the thresholds in train mode
    calibration_size: int = 16  # samples of the fixed calibration batch used by `build`


TRAIN = TrainSettings(epochs=8, lr=3e-3, batch_size=64)  # digits at 32x32, 16x16 glance and patches


def _check(cfg: Config) -> None:
    if cfg.arch not in ("tiny", "mobilenet_v2"):
        raise ValueError(f"arch must be 'tiny' or 'mobilenet_v2', got {cfg.arch!r}")
    if not 1 <= cfg.patch_size <= cfg.image_size:
        raise ValueError(f"patch_size must be in [1, image_size={cfg.image_size}], got {cfg.patch_size!r}")
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps!r}")
    fr = cfg.exit_fractions
    if len(fr) != cfg.steps - 1 or any(f < 0 for f in fr) or sum(fr) > 1 + 1e-9:
        raise ValueError(f"exit_fractions must hold steps - 1 = {cfg.steps - 1} values >= 0 summing to <= 1, "
                         f"got {fr!r}")
    if cfg.thresholds is not None and len(cfg.thresholds) != cfg.steps - 1:
        raise ValueError(f"thresholds must hold steps - 1 = {cfg.steps - 1} values, got {cfg.thresholds!r}")
    if not cfg.action_std > 0:
        raise ValueError(f"action_std must be > 0, got {cfg.action_std!r}")
    if not 0.0 <= cfg.threshold_momentum < 1.0:
        raise ValueError(f"threshold_momentum must be in [0, 1), got {cfg.threshold_momentum!r}")


def backbone(cfg: Config) -> MobileNetV2:
    """The MobileNetV2 that the glance and focus encoders and the dense baseline share."""
    if cfg.arch == "tiny":
        return mobilenet_v2(cfg.num_classes, cfg.width_mult, cfg.in_channels, TINY_SETTING, last_channel=128)
    return mobilenet_v2(cfg.num_classes, cfg.width_mult, cfg.in_channels, IMAGENET_SETTING)


def crop(x: Tensor, top_left: Tensor, size: int) -> Tensor:
    """Per-sample crops: `x (N, C, H, W)`, `top_left (N, 2)` int `(row, col)` -> `(N, C, size, size)`."""
    r = top_left[:, :1] + torch.arange(size, device=x.device)  # (N, size)
    c = top_left[:, 1:] + torch.arange(size, device=x.device)
    n = torch.arange(len(x), device=x.device)[:, None, None]
    return x[n, :, r[:, :, None], c[:, None, :]].permute(0, 3, 1, 2).contiguous()


def to_pixels(action: Tensor, image_size: int, patch_size: int) -> Tensor:
    """Crop position in `[0, 1]^2` `(N, 2)` -> int top-left corner `(N, 2)` in `[0, image - patch]`."""
    return (action.detach().clamp(0, 1) * (image_size - patch_size)).round().long()


def confidence(logits: Tensor) -> Tensor:
    """`(N, K) -> (N,)` the exit score: the largest softmax probability."""
    return F.softmax(logits, dim=1).amax(dim=1)


def thresholds_for(conf: Tensor, fractions: tuple[float, ...]) -> list[float]:
    """Thresholds so that `round(f_t * N)` of the samples leave after step `t` (exit where `conf > thr`).

    `conf (T, N)` holds every step's confidence for every sample (T >= len(fractions)). Exits are
    simulated in order: step t's quantile is taken among the samples still there.
    """
    n = conf.shape[1]
    stay, out, left = torch.ones(n, dtype=torch.bool), [], 0
    for t in range(len(fractions)):
        k = min(round(sum(fractions[: t + 1]) * n) - left, int(stay.sum()))
        c = conf[t][stay].sort(descending=True).values
        if k <= 0:
            thr = float(c[0]) + 1.0 if len(c) else 2.0  # nobody leaves
        elif k >= len(c):
            thr = -1.0  # everybody left leaves
        else:
            thr = 0.5 * float(c[k - 1] + c[k])
        out.append(thr)
        stay &= ~(conf[t] > thr)
        left = n - int(stay.sum())
    return out


class Policy(nn.Module):
    """Patch proposal: `(feature map (N, C, s, s), hidden (N, H) | None) -> (position (N, 2), hidden)`."""

    def __init__(self, channels: int, spatial: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, 32, 1)
        self.encode = nn.Linear(32 * spatial * spatial, hidden)
        self.gru = nn.GRUCell(hidden, hidden)
        self.actor = nn.Linear(hidden, 2)

    def forward(self, fmap: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
        s = F.relu(self.encode(F.relu(self.reduce(fmap)).flatten(1)))
        h = self.gru(s, h)
        return torch.sigmoid(self.actor(h)), h


class GlanceFocus(nn.Module):
    """GFNet: glance, then focus crops chosen by the policy; `forward(x) -> (logits (N, K), info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.glance, self.focus = backbone(cfg), backbone(cfg)
        feat = self.glance.last_channel
        spatial = self._feature_side()
        self.gru = nn.GRUCell(feat, cfg.hidden)
        self.fc = nn.Linear(cfg.hidden, cfg.num_classes)
        self.policy = Policy(feat, spatial, cfg.policy_hidden)
        self.register_buffer("exit_thresholds", torch.full((cfg.steps - 1,), 2.0))
        self.reinforce = [ReinforceBaseline() for _ in range(cfg.steps - 1)]

    def _feature_side(self) -> int:
        with torch.no_grad():
            p = self.cfg.patch_size
            return self.glance.features(torch.zeros(1, self.cfg.in_channels, p, p)).shape[-1]

    # -- pieces of a step ---------------------------------------------------------------------------
    def encode(self, net: MobileNetV2, img: Tensor) -> tuple[Tensor, Tensor]:
        """`(N, C, P, P) -> (feature map (N, F, s, s), pooled (N, F))`."""
        fmap = net.features(img)
        return fmap, fmap.mean(dim=(2, 3))

    def downsample(self, x: Tensor) -> Tensor:
        p = self.cfg.patch_size
        if x.shape[-1] == p and x.shape[-2] == p:
            return x
        return F.interpolate(x, size=(p, p), mode="bilinear", align_corners=False)

    def classify(self, pooled: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
        h = self.gru(pooled, h)
        return self.fc(h), h

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self._forward_train(x) if self.training else self._forward_eval(x)

    def _forward_train(self, x: Tensor) -> tuple[Tensor, dict]:
        cfg = self.cfg
        fmap, pooled = self.encode(self.glance, self.downsample(x))
        logits, h = self.classify(pooled, None)
        step_logits, log_probs, locs, ph = [logits], [], [], None
        for _ in range(1, cfg.steps):
            mean, ph = self.policy(fmap.detach(), ph)
            dist = torch.distributions.Normal(mean, cfg.action_std)
            action = dist.sample()
            log_probs.append(dist.log_prob(action).sum(dim=1))
            loc = to_pixels(action, cfg.image_size, cfg.patch_size)
            fmap, pooled = self.encode(self.focus, crop(x, loc, cfg.patch_size))
            logits, h = self.classify(pooled, h)
            step_logits.append(logits)
            locs.append(loc)
        self._track_thresholds(step_logits)
        n = len(x)
        exit_step = torch.full((n,), cfg.steps - 1, dtype=torch.long, device=x.device)
        info = {
            "step_logits": step_logits,
            "log_probs": torch.stack(log_probs, 1) if log_probs else x.new_zeros(n, 0),
            "reinforce": self.reinforce, "gamma": cfg.gamma, "policy_weight": cfg.policy_weight,
            "exit_step": exit_step, "exit_counts": torch.bincount(exit_step, minlength=cfg.steps),
            "locations": torch.stack(locs, 1) if locs else x.new_zeros(n, 0, 2, dtype=torch.long),
        }
        return step_logits[-1], info

    @torch.no_grad()
    def _track_thresholds(self, step_logits: list[Tensor]) -> None:
        """Running average of the batch's calibrated thresholds (unless explicit ones are configured)."""
        if self.cfg.thresholds is not None or self.cfg.steps == 1:
            return
        conf = torch.stack([confidence(z.detach()) for z in step_logits]).cpu()
        batch = torch.tensor(thresholds_for(conf, self.cfg.exit_fractions))
        m = self.cfg.threshold_momentum
        self.exit_thresholds.mul_(m).add_((1 - m) * batch.to(self.exit_thresholds))

    def _forward_eval(self, x: Tensor) -> tuple[Tensor, dict]:
        cfg = self.cfg
        n = len(x)
        out = x.new_empty(n, cfg.num_classes)
        exit_step = torch.full((n,), cfg.steps - 1, dtype=torch.long, device=x.device)
        locations = torch.full((n, cfg.steps - 1, 2), -1, dtype=torch.long, device=x.device)
        rows = torch.arange(n, device=x.device)  # original row of each remaining sample
        thr = self.exit_thresholds.tolist()
        fmap, pooled = self.encode(self.glance, self.downsample(x))
        logits, h = self.classify(pooled, None)
        ph = None
        for t in range(1, cfg.steps):
            leave = confidence(logits) > thr[t - 1]
            out[rows[leave]] = logits[leave]
            exit_step[rows[leave]] = t - 1
            stay = (~leave).nonzero().flatten()
            if stay.numel() == 0:  # everyone left: the later steps are never called
                break
            if stay.numel() < len(rows):
                rows, x, fmap, h = rows[stay], x.index_select(0, stay), fmap.index_select(0, stay), h[stay]
                ph = None if ph is None else ph[stay]
            mean, ph = self.policy(fmap, ph)
            loc = to_pixels(mean, cfg.image_size, cfg.patch_size)
            locations[rows, t - 1] = loc
            fmap, pooled = self.encode(self.focus, crop(x, loc, cfg.patch_size))
            logits, h = self.classify(pooled, h)
        else:
            out[rows] = logits
        info = {"exit_step": exit_step, "exit_counts": torch.bincount(exit_step, minlength=cfg.steps),
                "locations": locations}
        return out, info

    @torch.no_grad()
    def step_confidences(self, x: Tensor) -> Tensor:
        """`(steps, N)` every step's confidence with every sample running every step (eval policy)."""
        cfg = self.cfg
        fmap, pooled = self.encode(self.glance, self.downsample(x))
        logits, h = self.classify(pooled, None)
        conf, ph = [confidence(logits)], None
        for _ in range(1, cfg.steps):
            mean, ph = self.policy(fmap, ph)
            fmap, pooled = self.encode(self.focus, crop(x, to_pixels(mean, cfg.image_size, cfg.patch_size),
                                                        cfg.patch_size))
            logits, h = self.classify(pooled, h)
            conf.append(confidence(logits))
        return torch.stack(conf)

    @torch.no_grad()
    def estimate_norm_stats(self, x: Tensor) -> None:
        """Set the encoders' BatchNorm statistics to those of `x (N, C, H, W)` (glance: the downsampled
        images; focus: their center crops). Untrained, eval-mode MobileNets otherwise shrink activations
        layer after layer until every image gives the same features (and the same confidence)."""
        p, corner = self.cfg.patch_size, (self.cfg.image_size - self.cfg.patch_size) // 2
        center = crop(x, torch.full((len(x), 2), corner, dtype=torch.long), p)
        for net, img in ((self.glance, self.downsample(x)), (self.focus, center)):
            norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
            saved = [bn.momentum for bn in norms]
            for bn in norms:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative average: one batch gives exactly its statistics
                bn.train()
            net.features(img)
            for bn, momentum in zip(norms, saved, strict=True):
                bn.momentum = momentum
                bn.eval()

    @torch.no_grad()
    def calibrate(self, x: Tensor, fractions: tuple[float, ...] | None = None) -> list[float]:
        """Set the exit thresholds so that the fractions of `x (N, C, H, W)` leave after each step."""
        was_training = self.training
        self.eval()
        thr = thresholds_for(self.step_confidences(x).cpu(), fractions or self.cfg.exit_fractions)
        self.exit_thresholds.copy_(torch.tensor(thr))
        self.train(was_training)
        return thr


class DenseMobileNet(nn.Module):
    """The backbone on the full-resolution image; parameters under `net.`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.net = backbone(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        return self.net(x), {}


def loss(output: Tensor, info: dict, target: Tensor) -> Tensor:
    """Mean cross-entropy over the steps + `policy_weight` * REINFORCE on the true-class probability gains."""
    step_logits = info.get("step_logits")
    if not step_logits:
        return F.cross_entropy(output, target)
    ce = sum(F.cross_entropy(z, target) for z in step_logits) / len(step_logits)
    log_probs = info["log_probs"]
    if log_probs.shape[1] == 0:
        return ce
    with torch.no_grad():
        p_true = torch.stack([F.softmax(z, 1).gather(1, target[:, None])[:, 0] for z in step_logits], 1)
        rewards = p_true[:, 1:] - p_true[:, :-1]  # (N, steps - 1): gain brought by each crop
        returns = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            running = rewards[:, t] + info["gamma"] * running
            returns[:, t] = running
    pg = sum(b.loss(log_probs[:, t], returns[:, t]) for t, b in enumerate(info["reinforce"]))
    return ce + info["policy_weight"] * pg


def _calibration_batch(cfg: Config) -> Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(cfg.calibration_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def build(cfg: Config | None = None) -> GlanceFocus:
    cfg = cfg or Config()
    _check(cfg)
    model = GlanceFocus(cfg)
    if cfg.thresholds is not None:
        model.exit_thresholds.copy_(torch.tensor(cfg.thresholds, dtype=torch.float32))
    model.eval()
    calib = _calibration_batch(cfg)
    model.estimate_norm_stats(calib)
    if cfg.thresholds is None and cfg.steps > 1:
        model.calibrate(calib)
    return model


def build_baseline(cfg: Config | None = None) -> DenseMobileNet:
    cfg = cfg or Config()
    _check(cfg)
    return DenseMobileNet(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def summarize(info: dict) -> dict:
    """Exit histogram over the steps, the mean number of steps and the fraction leaving after the glance."""
    counts = info["exit_counts"].tolist() if "exit_counts" in info else [1]
    total = max(sum(counts), 1)
    return {
        "exit_histogram": " ".join(f"{c}" for c in counts),
        "mean_steps": round(sum((t + 1) * c for t, c in enumerate(counts)) / total, 4),
        "glance_exit_fraction": round(counts[0] / total, 4),
    }


@torch.no_grad()
def decision_figure(cfg: Config | None = None) -> Any:
    """The two sample photos with the glance and each focus crop, and the step at which each exited."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - only where a figure is drawn
    from matplotlib.patches import Rectangle  # noqa: PLC0415

    from implementations.common.data import sample_photos  # noqa: PLC0415

    cfg = cfg or Config(arch="mobilenet_v2", image_size=224, patch_size=96, steps=5,
                        exit_fractions=(0.4, 0.2, 0.15, 0.1))
    torch.manual_seed(0)
    model = build(cfg).eval()
    photos = sample_photos(cfg.image_size)
    mean, std = photos.mean(dim=(0, 2, 3), keepdim=True), photos.std(dim=(0, 2, 3), keepdim=True)
    x = ((photos - mean) / std)[:, : cfg.in_channels]
    if cfg.steps > 1:  # illustration: one photo leaves after the glance, the other runs every step
        model.calibrate(x, (0.5,) + (0.0,) * (cfg.steps - 2))
    _, info = model(x)
    fig = Figure(figsize=(4.2 * len(photos), 4.6), layout="constrained")
    axes = fig.subplots(1, len(photos), squeeze=False)[0]
    colors = ("tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown")
    for i, ax in enumerate(axes):
        ax.imshow(photos[i].permute(1, 2, 0).numpy())
        step = int(info["exit_step"][i])
        for t, (r, c) in enumerate(info["locations"][i].tolist()[:step]):
            col = colors[t % len(colors)]
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), cfg.patch_size, cfg.patch_size, fill=False,
                                   edgecolor=col, linewidth=1.6))
            ax.text(c + 2 + t * cfg.patch_size / 8, r + cfg.patch_size / 8, f"{t + 2}", color=col, fontsize=9,
                    weight="bold")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"glance ({cfg.patch_size} px) + {step} crop(s): exited at step {step + 1}", fontsize=9)
    fig.suptitle(f"GFNet: focus crops {cfg.patch_size}x{cfg.patch_size} of a {cfg.image_size}px image "
                 "(numbered by step; untrained policy unless loaded, thresholds set on these two photos)", fontsize=9)
    return fig
