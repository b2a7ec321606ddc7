"""`implementations.common.video.panning_clip`: shapes, determinism, shared content between frames."""

from __future__ import annotations

import pytest
import torch

from implementations.common.video import panning_clip


def test_shape_range_and_determinism():
    clip = panning_clip(num_frames=5, size=48, step=2, photo=1)
    assert clip.shape == (5, 3, 48, 48) and clip.dtype == torch.float32
    assert 0.0 <= float(clip.min()) and float(clip.max()) <= 1.0
    assert torch.equal(clip, panning_clip(num_frames=5, size=48, step=2, photo=1))
    assert float(clip.std()) > 0.05  # a real photo, not a constant


@pytest.mark.parametrize("step", [1, 2, 4])
def test_consecutive_frames_share_shifted_content(step):
    clip = panning_clip(num_frames=4, size=32, step=step)
    dy, dx = step // 2, step
    for t in range(3):
        assert torch.equal(clip[t + 1][:, : 32 - dy, : 32 - dx], clip[t][:, dy:, dx:])
        assert not torch.equal(clip[t + 1], clip[t])


def test_residual_is_sparse_but_not_zero():
    clip = panning_clip()
    assert clip.shape == (8, 3, 64, 64)
    res = (clip[1:] - clip[:-1]).abs().amax(dim=1)  # (T-1, S, S)
    small = (res < 0.05).float().mean()
    assert 0.2 < float(small) < 0.95  # flat regions barely change, edges do


def test_static_clip_and_photos_differ():
    clip = panning_clip(num_frames=3, step=0)
    assert torch.equal(clip[0], clip[2])
    assert not torch.equal(panning_clip(photo=0)[0], panning_clip(photo=1)[0])


def test_bad_arguments():
    for kwargs in ({"num_frames": 0}, {"size": 4}, {"step": -1}, {"photo": 2}):
        with pytest.raises(ValueError):
            panning_clip(**kwargs)
