"""Per-signature plans of the conv wrappers: their validation and path choice, memoized.

A wrapper's checks and its choice of path are a pure function of the call's *signature*: the tensors'
types, shapes, dtypes and devices, the conv parameters, the backend request, the environment switches
and the module settings it reads; never of tensor values, except ``auto``'s density fallback, which a
plan leaves to each call. In eager inference those checks cost ~100 us a call measured right after a
dense conv (the Python runs with cold caches there, about four times slower than in a tight loop):
15-20 % of a 64-channel 3x3 conv at 56x56 and density 0.25 on a 2-core CPU. A plan lookup costs a
fraction of that. Only calls that passed every check are stored, so a bad call always reaches the
checks and their error; values the key cannot hold exactly (bools, floats in conv parameters, other
tensor subclasses such as fake tensors) are never planned.
"""

from __future__ import annotations

import os

from torch import Tensor
from torch.nn import Parameter

SIZE = 4096  # plans kept (a deep network at a few input sizes needs a few hundred); cleared when full
SWITCHES = ("DYNNET_KERNEL_BACKEND", "DYNNET_NATIVE", "TRITON_INTERPRET")  # environment the paths read

_PLANS: dict[tuple, tuple] = {}


def signature(items: tuple, settings: tuple = ()) -> tuple | None:
    """The hashable signature of a call's arguments, or None when one of them cannot be keyed exactly.

    Tensors (plain or Parameters) become ``(type, shape, dtype, device)``; None, ints and strings stay as
    they are; tuples and lists of ints become tuples. The environment switches and ``settings`` (the
    module settings the wrapper reads, hashable) are appended.
    """
    key: list = []
    for v in items:
        kind = type(v)
        if kind is Tensor or kind is Parameter:
            key.append((kind, v.shape, v.dtype, v.device))
        elif v is None or kind is int or kind is str:
            key.append(v)
        elif (kind is tuple or kind is list) and all(type(e) is int for e in v):
            key.append(tuple(v))
        else:
            return None
    key.extend(os.environ.get(name) for name in SWITCHES)
    key.append(settings)
    return tuple(key)


def get(key: tuple | None) -> tuple | None:
    """The stored plan of ``key`` (None when absent or when the call has no key)."""
    return None if key is None else _PLANS.get(key)


def store(key: tuple | None, plan: tuple) -> tuple:
    """Remember ``plan`` for ``key`` (a call that passed every check); returns ``plan``."""
    if key is not None:
        if len(_PLANS) >= SIZE:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan
