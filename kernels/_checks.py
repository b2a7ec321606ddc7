"""Input validation shared by the kernel wrappers: clear errors that name the offending argument.

Each helper raises ``TypeError`` for a wrong kind of value (not a tensor, wrong dtype) and
``ValueError`` for a wrong shape, rank, device or range, with the argument's name first in the message,
e.g. ``mask: expected shape (2, 7, 7) for the conv output, got (2, 8, 8)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor with the given rank(s), dtype(s) and device; return it.

    ``ndim`` is one rank or a sequence of allowed ranks; ``device`` compares the device type and,
    when the expected device has an index, the index too.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name}: expected a {want}-D tensor, got {t.dim()}-D with shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        raise TypeError(f"{name}: expected dtype in ({_dtype_names(dtypes)}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None:
        check_device(name, t, device)
    return t


def check_device(name: str, t: torch.Tensor, device: torch.device | str) -> None:
    """Check that ``t`` lives on ``device`` (type, and index when ``device`` has one)."""
    want = torch.device(device)
    got = t.device
    if got.type != want.type or (want.index is not None and got.index is not None and got.index != want.index):
        raise ValueError(f"{name}: expected a tensor on {want}, got one on {got}")


def check_same_device(names_and_tensors: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    """Check that every non-None tensor is on the device of the first one."""
    present = [(n, t) for n, t in names_and_tensors if t is not None]
    if not present:
        return
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: expected a tensor on {first.device} (the device of {first_name}), got {t.device}")


def check_same_dtype(names_and_tensors: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    """Check that every non-None tensor has the dtype of the first one."""
    present = [(n, t) for n, t in names_and_tensors if t is not None]
    if not present:
        return
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name}: expected dtype {first.dtype} (the dtype of {first_name}), got {t.dtype}")


def check_bool_mask(name: str, t: object, shape: Sequence[int] | None = None, what: str = "") -> torch.Tensor:
    """Check that ``t`` is a bool tensor, optionally of exactly ``shape``; ``what`` explains the shape."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a bool torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype bool, got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        check_shape(name, t, shape, what)
    return t


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int | None], what: str = "") -> None:
    """Check ``t.shape`` against ``shape`` (None entries match any size); ``what`` explains the shape."""
    shape = tuple(shape)
    ok = t.dim() == len(shape) and all(s is None or s == g for s, g in zip(shape, t.shape, strict=False))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        suffix = f" for {what}" if what else ""
        raise ValueError(f"{name}: expected shape {want}{suffix}, got {tuple(t.shape)}")


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """Check that ``value`` is a Python int (not bool), at least ``minimum``; return it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_pair(name: str, value: object, minimum: int = 0) -> tuple[int, int]:
    """Normalize an int or a pair of ints (each >= ``minimum``) to a pair; raise naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int or a pair of ints, got bool")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        pair = tuple(value)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
            raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    else:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return (int(pair[0]), int(pair[1]))


def check_divisible(name: str, value: int, divisor: int, divisor_name: str) -> None:
    """Check that ``value`` (the size named ``name``) is divisible by ``divisor`` (named ``divisor_name``)."""
    if divisor <= 0 or value % divisor != 0:
        raise ValueError(f"{name}: {value} is not divisible by {divisor_name}={divisor}")


def check_range(name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Check that every value of the integer tensor ``t`` lies in ``[low, high)`` (one host sync)."""
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi >= high:
        raise ValueError(f"{name}: values must lie in [{low}, {high}), got min {lo} and max {hi}")
