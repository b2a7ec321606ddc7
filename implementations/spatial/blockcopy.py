"""# BlockCopy: High-Resolution Video Processing with Block-Sparse Feature Propagation and Online Policies

[Verelst and Tuytelaars, ICCV 2021](https://openaccess.thecvf.com/content/ICCV2021/html/Verelst_BlockCopy_High-Resolution_Video_Processing_With_Block-Sparse_Feature_Propagation_and_Online_ICCV_2021_paper.html)
([arXiv 2108.09376](https://arxiv.org/abs/2108.09376), official code, PyTorch + CuPy:
[thomasverelst/blockcopy-video-processing-pytorch](https://github.com/thomasverelst/blockcopy-video-processing-pytorch)).

## What is dynamic

- **Unit:** square blocks of `block_size x block_size` frame pixels, in every frame of a video, through
  the whole per-frame network (a block is `block_size / stride` pixels at a layer of that stride).
- **Decided by:** a small policy network that sees, at 8 pixels per block, the frame, its difference to
  the *frame state* (each block's pixels from the last frame in which it was executed), the previous
  output (class probabilities per position) and the previous grid; one logit per block.
- **When:** per frame and block. The first frame of a clip executes every block.
  - `eval()`: the top `exec_fraction` of blocks by logit are executed (`None`: `logit > 0`). The network
    keeps, for every layer, the feature map of the previous frame (a zero-bordered NHWC buffer).
    Executed blocks are gathered with a 1-pixel halo from the layer's input map, convolved without
    padding, normalized, and written into the layer's map; **non-executed blocks keep (copy) the
    features of the previous frame**, and executed blocks next to them read those copied features as
    their halo (the official BlockPad on propagated features). Non-executed blocks are never computed.
    The frame's logits are the classifier on the global average of the last map (new and copied blocks).
  - `train()`: the per-frame network trains on every frame densely, exactly as the baseline (BlockCopy
    runs on a pretrained frame-based network), and the policy trains with the paper's **online
    reinforcement learning**: each clip is rolled out frame by frame with sampled grids (Bernoulli),
    and every block is rewarded with its **information gain** (the KL divergence between the new output
    and the previous frame's output, per output position, max-pooled per block) plus
    `complexity_weight * complexity` with `complexity = -(c - target) |c - target|` of a running
    execution rate `c` (momentum 0.9), negated for non-executed blocks; the REINFORCE loss is
    `aux_loss`.
  - With `online=True` the eval path keeps training the policy the same way on the processed clips
    (RMSprop, lr 1e-4, one step per clip), as the paper does during inference; only where autograd is
    on, so `torch.inference_mode()` / `no_grad()` measurements run a frozen policy.

A sample is a clip `(T, C, H, W)` (a batch is `(N, T, C, H, W)`); a still image `(N, C, H, W)` is turned
into a clip that pans across it (`pan_step` pixels per frame, edges replicated), which is how the
digits are used. The clip's logits are the mean of its frames' logits. The output per position
(the classifier applied to every position of the last map, a class activation map) is BlockCopy's
"output" for the information gain and the policy. `info` holds `grids (T, N, GH, GW)` (bool, frame 0
all True), `exec_fraction` (executed share of the blocks of frames 1..T-1), `frame_logits (T, N, K)`
and, in train mode, `aux_loss`.

## Operating point

- Paper: execution target 0.5 (the official semantic segmentation demo: SwiftNet-RN50 on Cityscapes
  with `--block-target 0.5`, 205.8 -> 125.8 GMACs, about 12 -> 17 FPS on a GTX 1080 Ti).
  `exec_fraction=0.5`: an untrained model executes exactly half of the blocks of every frame after the
  first, so executed MACs grow monotonically with it. Clips of `clip_len` frames; the first frame's
  full cost is counted (`clip_len=6` at the operating point, so the clip-level MAC reduction is at most
  `6 / (1 + 5 f)`; the official evaluation uses 20-frame clips).
- Ours: a CIFAR-style ResNet-14 of width 32 on 64x64 frames of real panning clips
  (`implementations.common.video.panning_clip`), 16 px blocks (4x4 blocks per frame).

## Simplifications against the paper

- Classification of clips instead of segmentation / detection (the information gain uses the class
  activation map as the output).
- The policy is a three-layer strided conv net (the official one: a ResNet-8 and three convs); the
  policy trains once per clip, not every 4 frames; frames are processed in clips, not an endless
  stream (the state is reset per forward call).
- Gather, convs and the in-place writes are PyTorch ops (index gather from the padded map, `F.conv2d`,
  indexed write) instead of the official CuPy kernels; `kernels.block_conv2d` is not used because
  BlockCopy writes into the previous frame's feature map in place instead of producing a new map that
  is 0 outside the executed blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from implementations.common.layout import ChannelsLastInEval
from implementations.common.resnet import CifarResNet, cifar_resnet
from implementations.common.train import TrainSettings
from implementations.spatial.sbnet import Tiles, draw_blocks, interior, pad_nhwc, tile_blocks, topk_blocks

POLICY_PX = 8  # policy input pixels per block
HALO = 1  # every padded layer is a 3x3 conv


@dataclass
class Config:
    depth: int = 14  # CIFAR ResNet 6n+2 (total stride 4)
    width: int = 16
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32  # frame side
    clip_len: int = 4  # frames per clip when a still image is turned into a clip
    pan_step: int = 2  # pixels per frame of the pan that turns a still image into a clip
    block_size: int = 8  # block side in frame pixels (a multiple of 4)
    exec_fraction: float | None = 0.5  # eval: top-k share of executed blocks per frame; None: logit > 0
    target_rate: float = 0.5  # RL execution target (block_target)
    complexity_weight: float = 5.0  # gamma: weight of the complexity reward (official default)
    cost_momentum: float = 0.9  # momentum of the running execution rate
    policy_width: int = 16
    online: bool = False  # eval: keep training the policy on the processed clips (where autograd is on)
    online_lr: float = 1e-4


TRAIN = TrainSettings(epochs=4, lr=3e-3, batch_size=64)


def _check(cfg: Config) -> None:
    if cfg.exec_fraction is not None and not 0.0 <= cfg.exec_fraction <= 1.0:
        raise ValueError(f"exec_fraction must be None or in [0, 1], got {cfg.exec_fraction!r}")
    if not 0.0 <= cfg.target_rate <= 1.0:
        raise ValueError(f"target_rate must be in [0, 1], got {cfg.target_rate!r}")
    if cfg.block_size % 4 or cfg.image_size % cfg.block_size:
        raise ValueError(
            f"block_size must be a multiple of 4 (the total stride) and divide image_size; got "
            f"block_size={cfg.block_size}, image_size={cfg.image_size}"
        )
    if cfg.clip_len < 1 or cfg.pan_step < 0:
        raise ValueError(f"clip_len must be >= 1 and pan_step >= 0, got {cfg.clip_len!r}, {cfg.pan_step!r}")


def pan(images: Tensor, frames: int, step: int) -> Tensor:
    """`(N, C, S, S) -> (N, T, C, S, S)`: a view panning right `step` and down `step // 2` px per frame.

    The image is edge-padded so that the window can travel; frame 0 is the image itself.
    """
    span_x, span_y = (frames - 1) * step, (frames - 1) * (step // 2)
    padded = F.pad(images, (0, span_x, 0, span_y), mode="replicate")
    s = images.shape[-1]
    return torch.stack([padded[..., t * (step // 2) : t * (step // 2) + s, t * step : t * step + s]
                        for t in range(frames)], dim=1)


class PolicyNet(nn.Module):
    """`(N, 2C + K + 1, 8 GH, 8 GW) -> (N, GH, GW)` logits: three stride-2 3x3 convs."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 1, 3, stride=2, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x).squeeze(1)


class ClipState:
    """The previous frame's maps of one clip: every layer's padded NHWC map, the output map, the grid."""

    def __init__(self) -> None:
        self.maps: dict[str, Tensor] = {}
        self.cam: Tensor | None = None  # (N, h, w, K) class logits per position
        self.grid: Tensor | None = None


class BlockCopy(ChannelsLastInEval):
    """Per-frame CIFAR ResNet with block copying and an RL policy; `forward(clips) -> (logits, info)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net: CifarResNet = cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width)
        self.policy = PolicyNet(2 * cfg.in_channels + cfg.num_classes + 1, cfg.policy_width)
        self.running_cost: float | None = None
        self._online_opt: torch.optim.Optimizer | None = None
        self._buffers_cache: dict[tuple, Tensor] = {}  # padded maps, reused by the next clip (frames stay 0)

    # ---------------------------------------------------------------------------------------------
    # one frame

    def _keyframe(self, frame: Tensor, state: ClipState) -> Tensor:
        """Every block of `frame (N, C, S, S)`: dense convs, every map stored; returns the last map."""
        net = self.net
        self._store(state, "img", frame)
        h = self._store(state, "stem", net.bn1(net.conv1(frame)).relu_())
        for i, block in enumerate(net.blocks()):
            mid = self._store(state, f"mid{i}", block.bn1(block.conv1(h)).relu_())
            h = self._store(state, f"out{i}", block.bn2(block.conv2(mid)).add_(block.shortcut(h)).relu_())
        state.cam = self._cam(h.permute(0, 2, 3, 1))
        return h

    def _store(self, state: ClipState, name: str, x: Tensor) -> Tensor:
        """Copy `x (N, C, H, W)` into the clip's padded map `name` (buffers reused across calls)."""
        key = (name, tuple(x.shape), x.dtype, x.device)
        state.maps[name] = self._buffers_cache[key] = pad_nhwc(x, HALO, self._buffers_cache.get(key))
        return x

    def _sparse_frame(self, frame: Tensor, grid: Tensor, state: ClipState) -> Tensor:
        """Only the blocks of `grid (N, GH, GW)`; the others keep the previous frame's features."""
        net, maps, size = self.net, state.maps, self.cfg.block_size
        tiles = {size >> k: Tiles(grid, size >> k, HALO) for k in range(3)}
        t = tiles[size]
        if t.count:
            frame_blocks = tile_blocks(frame.permute(0, 2, 3, 1), size, 0)[t.idx]
            tile_blocks(maps["img"], size, HALO)[t.idx] = frame_blocks
            t.scatter_(maps["stem"], net.bn1(F.conv2d(t.gather(maps["img"]), net.conv1.weight)).relu_())
            src, side = "stem", size
            for i, block in enumerate(net.blocks()):
                t_in, t_out = tiles[side], tiles[side // block.stride]
                x = t_in.gather(maps[src])  # (nb, C, side + 2, side + 2)
                mid = block.bn1(F.conv2d(x, block.conv1.weight, stride=block.stride)).relu_()
                t_out.scatter_(maps[f"mid{i}"], mid)
                y = block.bn2(F.conv2d(t_out.gather(maps[f"mid{i}"]), block.conv2.weight))
                out = y.add_(block.shortcut(x[:, :, HALO:-HALO, HALO:-HALO])).relu_()
                t_out.scatter_(maps[f"out{i}"], out)
                src, side = f"out{i}", side // block.stride
            cam = self._cam(out.permute(0, 2, 3, 1))  # (nb, side, side, K): executed positions only
            state.cam = state.cam.clone()
            tile_blocks(state.cam, side, 0)[t.idx] = cam
        return interior(maps[f"out{len(list(net.blocks())) - 1}"], HALO)

    def _cam(self, feats_nhwc: Tensor) -> Tensor:
        """Class logits per position `(..., C) -> (..., K)` (the classifier at every position)."""
        return F.linear(feats_nhwc, self.net.fc.weight, self.net.fc.bias)

    def _policy_input(self, frame: Tensor, state: ClipState) -> Tensor:
        """Frame, frame minus frame state, previous output probabilities, previous grid (8 px per block)."""
        g = self.cfg.image_size // self.cfg.block_size
        size = (g * POLICY_PX, g * POLICY_PX)
        frame_state = interior(state.maps["img"], HALO)
        probs = state.cam.softmax(dim=-1).permute(0, 3, 1, 2) - 0.5
        parts = [frame, frame - frame_state, probs, state.grid.unsqueeze(1).float() - 0.5]
        return torch.cat([F.interpolate(p, size=size, mode="nearest") for p in parts], dim=1)

    def decide(self, logits: Tensor) -> Tensor:
        """Eval decision: bool `(N, GH, GW)`, True = execute."""
        if self.cfg.exec_fraction is None:
            return logits > 0
        return topk_blocks(logits, self.cfg.exec_fraction)

    # ---------------------------------------------------------------------------------------------
    # clips

    def as_clips(self, x: Tensor) -> Tensor:
        """`(N, T, C, S, S)` clips, or still images `(N, C, S, S)` turned into panning clips."""
        return x if x.dim() == 5 else pan(x, self.cfg.clip_len, self.cfg.pan_step)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        clips = self.as_clips(x)
        if self.training:
            n, t = clips.shape[:2]
            frame_logits = self.net(clips.flatten(0, 1)).view(n, t, -1).transpose(0, 1)
            self.net.eval()  # the rollout runs the frozen frame network (running BatchNorm statistics)
            _, grids, policy_loss = self.rollout(clips, sample=True)
            self.net.train()
            info = {"aux_loss": policy_loss}
        else:
            online = self.cfg.online and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            frame_logits, grids, policy_loss = self.rollout(clips, sample=online)
            info = {}
            if online and policy_loss.requires_grad:
                self._online_step(policy_loss)
        later = grids[1:].float()
        info.update(grids=grids, frame_logits=frame_logits,
                    exec_fraction=later.mean() if len(later) else grids.float().mean())
        return frame_logits.mean(dim=0), info

    def rollout(self, clips: Tensor, sample: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Process the clips frame by frame; returns frame logits `(T, N, K)`, grids and the RL loss.

        With `sample` the grids are Bernoulli samples and the REINFORCE loss (information gain +
        complexity reward) is accumulated; otherwise decisions are deterministic and the loss is 0. The
        frame network runs without autograd; only the policy keeps its graph.
        """
        n, t = clips.shape[:2]
        g = self.cfg.image_size // self.cfg.block_size
        state, logits, grids = ClipState(), [], []
        loss = clips.new_zeros(())
        for k in range(t):
            frame = clips[:, k].contiguous(memory_format=torch.channels_last)
            if k == 0:
                grid = torch.ones(n, g, g, dtype=torch.bool, device=clips.device)
                with torch.no_grad():
                    feats = self._keyframe(frame, state)
            else:
                policy_logits = self.policy(self._policy_input(frame, state))
                if sample:
                    dist = torch.distributions.Bernoulli(logits=policy_logits)
                    grid = dist.sample().bool()
                else:
                    grid = self.decide(policy_logits)
                cam_prev = state.cam
                with torch.no_grad():
                    feats = self._sparse_frame(frame, grid, state)
                if sample:
                    loss = loss + self._reinforce(dist.log_prob(grid.float()), grid, state.cam, cam_prev) / (t - 1)
            state.grid = grid
            grids.append(grid)
            with torch.no_grad():
                logits.append(self.net.fc(feats.mean(dim=(2, 3))))
        return torch.stack(logits), torch.stack(grids), loss

    def _reinforce(self, log_probs: Tensor, grid: Tensor, cam: Tensor, cam_prev: Tensor) -> Tensor:
        """BlockCopy's policy loss for one frame: information gain plus complexity reward, REINFORCE."""
        cfg = self.cfg
        use = float(grid.float().mean())
        self.running_cost = use if self.running_cost is None else (
            cfg.cost_momentum * self.running_cost + (1 - cfg.cost_momentum) * use)
        gap = self.running_cost - cfg.target_rate
        complexity = -gap * abs(gap)
        ig = information_gain(cam, cam_prev)  # (N, h, w)
        reward = F.adaptive_max_pool2d(ig.unsqueeze(1), grid.shape[1:]).squeeze(1) + cfg.complexity_weight * complexity
        reward = torch.where(grid, reward, -reward)
        return -(log_probs * reward.detach()).mean()

    def _online_step(self, policy_loss: Tensor) -> None:
        if self._online_opt is None:
            self._online_opt = torch.optim.RMSprop(self.policy.parameters(), lr=self.cfg.online_lr, weight_decay=1e-3)
        self._online_opt.zero_grad(set_to_none=True)
        policy_loss.backward()
        self._online_opt.step()


def information_gain(cam: Tensor, cam_prev: Tensor) -> Tensor:
    """Per position `(N, h, w)`: `KL(p_prev || p_new)` averaged over classes, as in the official code."""
    logp, logq = cam.log_softmax(dim=-1), cam_prev.log_softmax(dim=-1)
    return (logq.exp() * (logq - logp)).mean(dim=-1)


class Baseline(ChannelsLastInEval):
    """Dense per-frame processing of the same clips; parameters under `net.` as in `BlockCopy`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = cifar_resnet(cfg.depth, cfg.num_classes, cfg.in_channels, cfg.width)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        clips = x if x.dim() == 5 else pan(x, self.cfg.clip_len, self.cfg.pan_step)
        if self.training:
            n, t = clips.shape[:2]
            return self.net(clips.flatten(0, 1)).view(n, t, -1).mean(dim=1), {}
        frames = [self.net(clips[:, k].contiguous(memory_format=torch.channels_last)) for k in range(clips.shape[1])]
        return torch.stack(frames).mean(dim=0), {}


def build(cfg: Config | None = None) -> BlockCopy:
    cfg = cfg or Config()
    _check(cfg)
    return BlockCopy(cfg)


def build_baseline(cfg: Config | None = None) -> Baseline:
    cfg = cfg or Config()
    _check(cfg)
    return Baseline(cfg)


def example_input(cfg: Config, batch_size: int = 2) -> Tensor:
    """`(N, T, C, S, S)` real panning clips (both photos, steps 2 and 4), standardized per clip."""
    from implementations.common.video import panning_clip  # noqa: PLC0415

    clips = torch.stack([panning_clip(cfg.clip_len, cfg.image_size, step=2 + 2 * ((i // 2) % 2), photo=i % 2)
                         for i in range(batch_size)])
    clips = (clips - clips.mean(dim=(1, 2, 3, 4), keepdim=True)) / clips.std(dim=(1, 2, 3, 4), keepdim=True)
    if cfg.in_channels != 3:
        clips = clips.mean(dim=2, keepdim=True).expand(-1, -1, cfg.in_channels, -1, -1)
    return clips.contiguous()


def summarize(info: dict) -> dict:
    """Executed share of the blocks after the first frame, and per frame."""
    if "grids" not in info:
        return {"executed_blocks": 1.0}
    per_frame = info["grids"].float().mean(dim=(1, 2, 3))
    return {
        "executed_blocks": round(float(info["exec_fraction"]), 4),
        "per_frame": " ".join(f"{r:.2f}" for r in per_frame.tolist()),
    }


@torch.no_grad()
def decision_figure(cfg: Config | None = None):
    """A real panning clip with the blocks executed in every frame (the others are copied)."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - only where a figure is drawn

    from implementations.common.video import panning_clip  # noqa: PLC0415

    cfg = cfg or Config(width=32, image_size=64, block_size=16, clip_len=6)
    torch.manual_seed(0)
    model = build(cfg).eval()
    clip = panning_clip(cfg.clip_len, cfg.image_size, step=4, photo=0)
    x = ((clip - clip.mean()) / clip.std()).unsqueeze(0)
    if cfg.in_channels != 3:
        x = x.mean(dim=2, keepdim=True).expand(-1, -1, cfg.in_channels, -1, -1)
    _, info = model(x)
    t = cfg.clip_len
    fig = Figure(figsize=(2.0 * t, 2.4), layout="constrained")
    axes = fig.subplots(1, t, squeeze=False)[0]
    for k in range(t):
        grid = info["grids"][k, 0]
        title = "frame 0: all" if k == 0 else f"frame {k}: {100 * float(grid.float().mean()):.0f}%"
        draw_blocks(axes[k], clip[k], grid, color="red", title=title)
    fig.suptitle("BlockCopy: executed blocks per frame (red); the others copy the previous frame's features "
                 "(untrained policy unless loaded)", fontsize=9)
    return fig
