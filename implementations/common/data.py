"""Small real datasets shipped with scikit-learn (no downloads, ever).

- `load_digits_split`: the 1797 8x8 handwritten digits, upsampled to CIFAR's input format
  `(N, C, S, S)`, normalized with the training set's statistics, split deterministically.
- `sample_photos`: the two real photos of `load_sample_images` (a Chinese temple and a flower) as
  `(2, 3, H, W)` floats in [0, 1], for spatial and video demos.
- `batches`: a minimal mini-batch iterator.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def load_digits_split(
    image_size: int = 32,
    channels: int = 3,
    seed: int = 0,
    test_fraction: float = 0.25,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fixed train/test split of scikit-learn's digits in an image-classifier's input format.

    Images are scaled to [0, 1], upsampled bilinearly from 8x8 to `image_size`, standardized with the
    training split's mean and std, and replicated to `channels`. The same arguments give the same
    tensors on every call.

    Returns:
        `x_train (N_tr, C, S, S)`, `y_train (N_tr,)`, `x_test (N_te, C, S, S)`, `y_test (N_te,)`;
        float32 images, int64 labels in [0, 10).
    """
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    images, labels = _digits()
    x = torch.from_numpy(images).unsqueeze(1)  # (N, 1, 8, 8)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.from_numpy(labels)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(len(y) * test_fraction))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = ((x - mean) / std).expand(-1, channels, -1, -1).contiguous()
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def sample_photos(size: int | tuple[int, int] | None = None) -> Tensor:
    """The two photos of `sklearn.datasets.load_sample_images` as a float batch.

    Args:
        size: None keeps the original 427x640; an int resizes the shorter side to `size` and
            center-crops a `size x size` square; a pair `(H, W)` resizes to exactly that shape.
    Returns:
        `(2, 3, H, W)` float32 in [0, 1].
    """
    from sklearn.datasets import load_sample_images

    arr = np.stack(load_sample_images().images).astype(np.float32) / 255.0  # (2, H, W, 3)
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    if size is None:
        return x
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size!r}")
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top : top + size, left : left + size]
    elif isinstance(size, tuple) and len(size) == 2 and all(isinstance(s, int) and s >= 1 for s in size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    else:
        raise ValueError(f"size must be None, a positive int or a pair of positive ints, got {size!r}")
    return x.clamp(0.0, 1.0).contiguous()


def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield `(x[i], y[i])` mini-batches of at most `batch_size` rows (the last one may be smaller)."""
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]
