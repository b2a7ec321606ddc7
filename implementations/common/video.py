"""Short real video clips for video methods (no downloads, ever).

`panning_clip` makes a clip from one real photo of `sample_photos()` by sliding a square crop across
it: the camera pans right by `step` pixels and drifts down by `step // 2` pixels per frame. Shifts are
whole pixels on one resized photo, so consecutive frames share all but a thin border of their content
exactly (`frame[t + 1][:, :S - dy, :S - dx] == frame[t][:, dy:, dx:]`), as in real footage with a
moving camera: the frame residual `x_t - x_{t-1}` is large at edges and texture and small on flat
regions (sky, walls, petals).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from implementations.common.data import sample_photos


@lru_cache(maxsize=8)
def _resized_photo(photo: int, height: int, width: int) -> Tensor:
    return sample_photos((height, width))[photo]


def panning_clip(num_frames: int = 8, size: int = 64, step: int = 2, photo: int = 0) -> Tensor:
    """A clip panning a `size x size` window across photo `photo` (0: temple, 1: flower).

    The photo (427x640) is resized, keeping its aspect ratio, so that its height is `2 * size` (or
    more, where the path of the window needs it); the window starts so that its path is centered and
    moves by `(dy, dx) = (step // 2, step)` pixels per frame.

    Args:
        num_frames: T >= 1 frames.
        size: side S >= 8 of every frame in pixels.
        step: horizontal shift in pixels between consecutive frames (>= 0; 0 gives a static clip).
        photo: 0 or 1, which photo of `sample_photos()`.
    Returns:
        `(T, 3, S, S)` float32 in [0, 1]; the same arguments give the same tensor on every call.
    """
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if photo not in (0, 1):
        raise ValueError(f"photo must be 0 or 1, got {photo!r}")
    dy, dx = step // 2, step
    span_y, span_x = size + (num_frames - 1) * dy, size + (num_frames - 1) * dx
    h0, w0 = 427, 640
    scale = max(2 * size / h0, span_y / h0, span_x / w0)
    height, width = max(span_y, round(h0 * scale)), max(span_x, round(w0 * scale))
    img = _resized_photo(photo, height, width)
    top0, left0 = (height - span_y) // 2, (width - span_x) // 2
    frames = [
        img[:, top0 + t * dy : top0 + t * dy + size, left0 + t * dx : left0 + t * dx + size]
        for t in range(num_frames)
    ]
    return torch.stack(frames).contiguous()
