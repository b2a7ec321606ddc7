"""Eval-mode BatchNorm folded into the preceding convolution, cached per module until anything changes.

A sparse conv (``kernels.sparse_conv2d``) writes its bias at the active outputs only, so ``bn(conv(x))``
folded into one conv applies the BatchNorm at those outputs alone instead of over the whole map.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn as nn
from torch import Tensor

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached(key: nn.Module, tensors: tuple[Tensor, ...], make: Callable[[], tuple[Tensor, Tensor]]
           ) -> tuple[Tensor, Tensor]:
    """``make()`` once per version of ``tensors`` (weights and BN statistics), cached per module ``key``.

    The result is built outside inference mode (ordinary tensors with version counters), so the native
    kernels' weight packing, cached per weight version, is reused across calls.
    """
    versions = tuple(t._version for t in tensors)
    hit = _CACHE.get(key)
    if hit is None or hit[0] != versions:
        with torch.no_grad(), torch.inference_mode(False):
            hit = (versions, *make())
        _CACHE[key] = hit
    return hit[1], hit[2]


def bn_tensors(bn: nn.BatchNorm2d) -> tuple[Tensor, ...]:
    """The tensors an eval-mode BatchNorm reads (their versions key the caches)."""
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var)


def bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as ``x * scale + shift``: two ``(C,)`` tensors."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight ``(Cout, Cin/g, kh, kw)`` and bias ``(Cout,)`` of ``bn(conv(x))`` as one conv (eval BatchNorm)."""

    def make() -> tuple[Tensor, Tensor]:
        scale, shift = bn_affine(bn)
        bias = shift if conv.bias is None else shift + conv.bias * scale
        return conv.weight * scale.view(-1, 1, 1, 1), bias

    extra = () if conv.bias is None else (conv.bias,)
    return cached(conv, (conv.weight, *extra, *bn_tensors(bn)), make)
