"""# Skip-Convolutions for efficient video processing

[Habibian, Abati, Cohen and Ehteshami Bejnordi, CVPR 2021](https://openaccess.thecvf.com/content/CVPR2021/html/Habibian_Skip-Convolutions_for_Efficient_Video_Processing_CVPR_2021_paper.html)
([arXiv 2104.11487](https://arxiv.org/abs/2104.11487), official code:
[Qualcomm-AI-research/Skip-Conv](https://github.com/Qualcomm-AI-research/Skip-Conv)).

## What is dynamic

- **Unit:** the output pixels of every convolution of a frame-based network, frame by frame.
- **Decided by:** a gate on the layer's **input residual** `r_t = x_t - x_{t-1}` (this layer's input
  now minus its input at the previous frame). Convolution is linear, so
  `W * x_t = W * x_{t-1} + W * r_t`: the layer keeps its previous output `z_{t-1}` and adds `W * r_t`
  **only at the pixels the gate opens**; elsewhere the previous output is reused.
  - Norm gate (the paper's output norm gate, Eq. 7, no training): the score of an output pixel is the
    mean absolute residual over the input channels and the kernel window (average pooling with the
    conv's kernel, stride and padding) times the mean absolute weight of the layer; the gate opens
    where the score exceeds the layer's threshold.
- **When:** per clip, per frame, per layer, in eval. The first frame of a clip (and every
  `reset_every`-th) is a reference frame computed densely. On the other frames each layer runs
  `kernels.sparse_conv2d` on the residual at the open pixels only (always its sparse path, never the
  `auto` dense fallback, unless `backend` asks) and adds the result to its previous output;
  BatchNorm, ReLU, the residual adds and pooling run densely on every frame, as in the dense network
  (both networks in channels_last memory). Skipped residuals are lost, so the output drifts from the dense one until the next
  reference frame: the approximation the paper accepts.

`forward` takes clips `(N, T, C, H, W)` and returns per-frame logits `(N, T, K)`; `info` holds `gates`
(one bool `(N, T - 1, H_l, W_l)` per conv layer: the open pixels on every non-reference frame; on a
reset frame all True), `density` (open fraction per layer on the non-reference frames) and `features`
(the last feature map of every frame, `(N, T, C, h, w)`, for the fidelity checks). A 4-D input is a
one-frame clip (all dense), so the digits training of `catalog run --train` still runs; there is no
trained policy and no `aux_loss`.

## Operating point

- `target` (default 0.25): `build` calibrates one threshold per layer, layer by layer in forward
  order, on fixed calibration clips (the example clips mirrored left-right: the same motion, other
  pixels) so that the gate opens `target` of each layer's output pixels on the non-reference frames;
  executed MACs grow monotonically with it, `target=1` opens everything and equals dense per-frame
  processing. The paper reports 3-4x fewer
  operations without accuracy loss; with 8-frame clips and one reference frame, `target=0.25` executes
  about `(1 + 7 * 0.25) / 8 = 0.34` of the dense conv MACs (2.9x).
- `target=None` uses the global `threshold` for every layer instead (the paper's single epsilon).
- Fidelity, stated for the tests (default CIFAR ResNet-8, untrained, 32x32, the two 8-frame example
  clips): `threshold=0` (every pixel with a non-zero residual) gives per-frame logits equal to dense
  per-frame processing within 1e-4 (relative); `target=0.9` keeps the last feature maps within 15 %
  relative L2 error of the dense ones on every frame, `target=0.5` within 65 %. The error is drift:
  a skipped residual is lost until the next reference frame, and it grows frame by frame (the paper
  accepts it on trained networks, where it costs no accuracy at 3-4x; an untrained network has no
  accuracy to measure, so we bound the drift instead).
- The dense baseline processes the same clips frame by frame (a stream of `N` videos, one frame at a
  time), as an online video network does.

## Simplifications against the paper

- Backbones: a CIFAR ResNet (default, 32x32) or ResNet-18 on panning clips of the two real photos of
  `sample_photos()` (`implementations.common.video.panning_clip`), instead of EfficientDet and HRNet on
  ImageNet-VID and JHMDB; untrained (ImageNet-normalized photo frames).
- Only the norm gate; the learned Gumbel gate (a conv on the residual, trained with a sparsity loss)
  and the block-structured gates are not implemented.
- The channel norm of the gate is a mean over channels (the official code divides the L1 norm by the
  feature height); thresholds are calibrated per layer for the untrained operating point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.layout import ChannelsLastInEval
from implementations.common.resnet import cifar_resnet, resnet18
from implementations.common.train import TrainSettings
from implementations.common.video import panning_clip
from implementations.spatial.dynconv import sparse_backend
from kernels.sparse_conv import sparse_conv2d

ARCHS = ("cifar", "resnet18")
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Config:
    arch: str = "cifar"  # cifar (CIFAR ResNet `depth`) | resnet18
    depth: int = 8  # cifar only: 6n+2
    width: int | None = None  # cifar: 16, resnet18: 64
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    num_frames: int = 8  # frames per clip of `example_input`
    reset_every: int = 8  # a dense reference frame every `reset_every` frames
    target: float | None = 0.25  # calibrated open fraction per layer (None: use `threshold`)
    threshold: float = 0.1  # global norm-gate threshold when `target` is None
    pan_step: int = 2  # pixels per frame of the example clips
    backend: str | None = None  # kernel backend (None: $DYNNET_KERNEL_BACKEND, else the sparse path)
    channels_last: bool = True  # both networks run frames in NHWC memory


TRAIN = TrainSettings(epochs=3, lr=3e-3, batch_size=64)


def _check(cfg: Config) -> None:
    if cfg.arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {cfg.arch!r}")
    if cfg.target is not None and not 0.0 < cfg.target <= 1.0:
        raise ValueError(f"target must be None or in (0, 1], got {cfg.target!r}")
    if cfg.threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {cfg.threshold!r}")
    if cfg.num_frames < 1 or cfg.reset_every < 1:
        raise ValueError(f"num_frames and reset_every must be >= 1, got {cfg.num_frames!r}, {cfg.reset_every!r}")


# ---------------------------------------------------------------- the skip-convolution


def norm_gate_score(r: Tensor, conv: nn.Conv2d, weight_scale: Tensor | None = None) -> Tensor:
    """Output norm gate score (Eq. 7): `(N, C, H, W)` residual -> `(N, Ho, Wo)`.

    Mean |r| over channels, averaged over the conv's window (kernel, stride, padding), times the mean
    |weight| (`weight_scale`, computed when None). Element-wise and pooling only: no MACs.
    """
    a = r.abs().mean(dim=1, keepdim=True)
    s = F.avg_pool2d(a, conv.kernel_size, conv.stride, conv.padding) if conv.kernel_size != (1, 1) else a
    if conv.kernel_size == (1, 1) and conv.stride != (1, 1):
        s = s[:, :, :: conv.stride[0], :: conv.stride[1]]
    return s[:, 0] * (conv.weight.abs().mean() if weight_scale is None else weight_scale)


class SkipConv2d(nn.Conv2d):
    """A conv that, between `reset()` calls, computes `z_t = z_{t-1} + W * (x_t - x_{t-1})` at the pixels
    its norm gate opens. Same parameters as `nn.Conv2d` (no bias: a BatchNorm follows).

    `mode`: `dense` (plain conv; starts a clip), `skip` (the executing path through `sparse_conv2d`),
    `oracle` (dense conv of the residual, masked with the gate, or with the gates queued in `replay`:
    the test oracle), `calibrate` (dense conv, records gate scores).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("gate_threshold", torch.tensor(0.1))
        self.mode = "dense"
        self.backend: str | None = None
        self.replay: list[Tensor] = []  # oracle mode: gates to reuse instead of computing them
        self._scale: tuple[tuple, Tensor] | None = None  # (weight version and address, mean |W|)
        self.reset()

    def reset(self) -> None:
        self.x0: Tensor | None = None
        self.z0: Tensor | None = None
        self.gates: list[Tensor] = []
        self.scores: list[Tensor] = []

    def weight_scale(self) -> Tensor:
        """Mean |W| (the gate's weight norm), kept until the weight changes: a 512-channel 3x3 layer's
        weights are 2.4 M values, and recomputing their mean for every clip cost ~10 ms per ResNet-18 clip."""
        key = (self.weight._version, self.weight.data_ptr(), self.weight.dtype)
        if self._scale is None or self._scale[0] != key:
            self._scale = (key, self.weight.detach().abs().mean())
        return self._scale[1]

    def _conv(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode in ("dense", "calibrate") or self.x0 is None:
            z = self._conv(x)
            if self.x0 is not None:
                self.gates.append(torch.ones(z.shape[0], *z.shape[2:], dtype=torch.bool, device=z.device))
            if self.mode == "calibrate" and self.x0 is not None:
                self.scores.append(norm_gate_score(x - self.x0, self, self.weight_scale()).flatten())
        else:
            r = x - self.x0
            if self.mode == "oracle" and self.replay:
                gate = self.replay.pop(0)
            else:
                gate = norm_gate_score(r, self, self.weight_scale()) > self.gate_threshold
            self.gates.append(gate)
            if self.mode == "oracle":
                z = self.z0 + self._conv(r) * gate.unsqueeze(1)
            elif bool(gate.any()):  # z0 + the conv of r at the open pixels, added by the kernel in its pass
                z = sparse_conv2d(r, gate, self.weight, None, self.stride, self.padding, self.dilation,
                                  self.groups, backend=sparse_backend(self.backend, r), residual=self.z0)
            else:
                z = self.z0
        self.x0, self.z0 = x, z
        return z


def swap_convs(module: nn.Module) -> nn.Module:
    """Replace every `nn.Conv2d` of `module` (in place) by a `SkipConv2d` with the same weights."""
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            skip = SkipConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                              child.padding, child.dilation, child.groups, bias=child.bias is not None)
            skip.load_state_dict(child.state_dict(), strict=False)
            setattr(module, name, skip)
        else:
            swap_convs(child)
    return module


# ---------------------------------------------------------------- the video networks


def backbone(cfg: Config) -> nn.Module:
    if cfg.arch == "cifar":
        return cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width or 16, shortcut="B")
    return resnet18(cfg.num_classes, cfg.in_channels, cfg.width or 64)


def _as_clip(x: Tensor) -> Tensor:
    """`(N, T, C, H, W)` clips; a 4-D `(N, C, H, W)` batch is a batch of one-frame clips."""
    if x.dim() == 4:
        return x.unsqueeze(1)
    if x.dim() != 5:
        raise ValueError(f"expected clips (N, T, C, H, W) or frames (N, C, H, W), got shape {tuple(x.shape)}")
    return x


def _frame(clip: Tensor, t: int, channels_last: bool) -> Tensor:
    x = clip[:, t]
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _frames(net: nn.Module, clip: Tensor, channels_last: bool) -> tuple[Tensor, Tensor]:
    """Run `net` frame by frame: `(N, T, C, H, W)` -> logits `(N, T, K)`, last features `(N, T, C', h, w)`."""
    logits, feats = [], []
    for t in range(clip.shape[1]):
        f = net.forward_features(_frame(clip, t, channels_last))
        feats.append(f)
        logits.append(net.head(f))
    return torch.stack(logits, 1), torch.stack(feats, 1)


class _NHWCInEval(ChannelsLastInEval):
    """Runs in channels_last memory in eval only, where `cfg.channels_last` (`ChannelsLastInEval`)."""

    cfg: Config

    def eval_channels_last(self) -> bool:
        return self.cfg.channels_last

    @property
    def nhwc(self) -> bool:
        return self.cfg.channels_last and not self.training


class SkipConvNet(_NHWCInEval):
    """Backbone whose convs are `SkipConv2d`; `forward(clips) -> (logits (N, T, K), info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = swap_convs(backbone(cfg))
        self.mode = "skip"  # eval path: skip | oracle
        for conv in self.convs():
            conv.backend = cfg.backend
            conv.gate_threshold.fill_(cfg.threshold)

    def convs(self) -> list[SkipConv2d]:
        return [m for m in self.net.modules() if isinstance(m, SkipConv2d)]

    def _set(self, mode: str) -> None:
        for conv in self.convs():
            conv.mode = mode

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        clip = _as_clip(x)
        convs = self.convs()
        for conv in convs:
            conv.reset()
        mode = "dense" if self.training else self.mode
        logits, feats = [], []
        try:
            for t in range(clip.shape[1]):
                self._set("dense" if t % self.cfg.reset_every == 0 else mode)
                f = self.net.forward_features(_frame(clip, t, self.nhwc))
                feats.append(f)
                logits.append(self.net.head(f))
        finally:
            self._set("dense")
        gates = [torch.stack(c.gates, 1) for c in convs] if clip.shape[1] > 1 else []
        info = {
            "gates": gates,
            "density": torch.stack([g.float().mean() for g in gates]) if gates else torch.ones(0),
            "features": torch.stack(feats, 1).detach(),
        }
        for conv in convs:
            conv.reset()
        return torch.stack(logits, 1).squeeze(1) if x.dim() == 4 else torch.stack(logits, 1), info

    @torch.no_grad()
    def calibrate(self, clip: Tensor, target: float) -> None:
        """Per-layer thresholds, layer by layer in forward order: with the layers before it already
        gated, a layer's threshold is the `1 - target` quantile of its gate scores on `clip`'s
        non-reference frames (so each layer opens `target` of its pixels on this clip)."""
        convs = self.convs()
        for conv in convs:
            conv.gate_threshold.fill_(-1.0)  # open everything until calibrated
        for layer, conv in enumerate(convs):
            for c in convs:
                c.reset()
            for t in range(clip.shape[1]):
                ref = t % self.cfg.reset_every == 0
                for k, c in enumerate(convs):  # gated before `layer`, recording at it, dense after
                    c.mode = "dense" if ref or k > layer else ("skip" if k < layer else "calibrate")
                self.net.forward_features(_frame(clip, t, self.cfg.channels_last))
            self._set("dense")
            if conv.scores:
                s = torch.cat(conv.scores).sort().values
                k = round((1.0 - target) * len(s))  # pixels to keep closed
                if k == 0:
                    conv.gate_threshold.fill_(-1.0)
                elif k >= len(s):
                    conv.gate_threshold.fill_(float(s[-1]) + 1.0)
                else:
                    conv.gate_threshold.fill_(float(s[k - 1] + s[k]) / 2)
        for conv in convs:
            conv.reset()


class DenseVideoNet(_NHWCInEval):
    """The same backbone applied to every frame independently (plain convs)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = backbone(cfg)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        clip = _as_clip(x)
        logits, feats = _frames(self.net, clip, self.nhwc)
        return (logits.squeeze(1) if x.dim() == 4 else logits), {"features": feats}


# ---------------------------------------------------------------- Contract 2


def clips(batch_size: int, cfg: Config, seed: int = 0) -> Tensor:
    """`(N, T, C, S, S)` ImageNet-normalized panning clips: clip i pans photo `(i + seed) % 2` at
    `pan_step + (i // 2) % 2` pixels per frame."""
    out = []
    for i in range(batch_size):
        clip = panning_clip(cfg.num_frames, cfg.image_size, cfg.pan_step + (i // 2) % 2, (i + seed) % 2)
        clip = (clip - torch.tensor(_MEAN).view(1, 3, 1, 1)) / torch.tensor(_STD).view(1, 3, 1, 1)
        out.append(clip.mean(1, keepdim=True).expand(-1, cfg.in_channels, -1, -1) if cfg.in_channels != 3 else clip)
    return torch.stack(out).contiguous()


def build(cfg: Config | None = None) -> SkipConvNet:
    cfg = cfg or Config()
    _check(cfg)
    model = SkipConvNet(cfg)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.target is not None:
        model.eval()
        model.calibrate(clips(2, cfg).flip(-1), cfg.target)  # mirrored example clips: same motion
    return model


def build_baseline(cfg: Config | None = None) -> DenseVideoNet:
    cfg = cfg or Config()
    _check(cfg)
    model = DenseVideoNet(cfg)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    """`batch_size` panning clips `(N, num_frames, in_channels, image_size, image_size)` of real photos."""
    return clips(batch_size, cfg)


def summarize(info: dict) -> dict:
    """Open fraction of the gates per layer on the non-reference frames."""
    if not len(info.get("density", [])):
        return {"open_fraction": 1.0}
    d = info["density"]
    return {
        "open_fraction": round(float(d.mean()), 4),
        "open_per_layer": " ".join(f"{v:.2f}" for v in d.tolist()),
    }


def decision_figure(cfg: Config | None = None):
    """Frames of a panning clip, the open pixels of the first conv and of a middle conv per frame."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cfg = cfg or Config(arch="resnet18", image_size=112, num_frames=6, reset_every=6)
    torch.manual_seed(0)
    model = build(cfg).eval()
    frames = panning_clip(cfg.num_frames, cfg.image_size, cfg.pan_step, 0)
    x = clips(1, cfg)
    with torch.no_grad():
        _, info = model(x)
    layers = [0, len(info["gates"]) // 2]
    fig, axes = plt.subplots(1 + len(layers), cfg.num_frames, figsize=(2.2 * cfg.num_frames, 2.3 * (1 + len(layers))))
    for t in range(cfg.num_frames):
        axes[0, t].imshow(frames[t].permute(1, 2, 0).numpy())
        axes[0, t].set_title("reference" if t % cfg.reset_every == 0 else f"frame {t}", fontsize=9)
        for row, layer in enumerate(layers, start=1):
            if t == 0:
                axes[row, t].text(0.5, 0.5, f"conv {layer}\ndense", ha="center", va="center")
            else:
                g = info["gates"][layer][0, t - 1].float()
                axes[row, t].imshow(g.numpy(), cmap="Reds", vmin=0, vmax=1, interpolation="nearest")
                axes[row, t].set_title(f"conv {layer}: {100 * float(g.mean()):.0f}%", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("Skip-Convolutions: pixels where the residual is convolved (red); elsewhere the previous "
                 "output is reused")
    fig.tight_layout()
    return fig
