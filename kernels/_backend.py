"""Backend selection for the sparse kernels: one switch for every op.

Backends:
- ``reference``: the plain-PyTorch semantics (dense op, then zero outside the mask); a test oracle.
- ``cpu``: the CPU path that really skips work (gather, GEMM, scatter).
- ``triton``: the Triton path (CUDA, or the CPU interpreter under ``TRITON_INTERPRET=1``).
- ``dense``: not selectable by users; what ``auto`` picks when the active fraction is so high that
  skipping would be slower than the dense op (the dense op runs, then the mask is applied, and the
  MAC formula counts it as dense, because that is what executed).
- ``auto`` (default): ``triton`` on CUDA tensors, ``cpu`` on CPU tensors, ``dense`` above the op's
  break-even density.

The choice comes from the ``backend=`` argument of each op, else the environment variable
``DYNNET_KERNEL_BACKEND``, else ``auto``. Nothing here imports Triton or queries a device.
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "DYNNET_KERNEL_BACKEND"
CHOICES = ("auto", "reference", "cpu", "triton")
RESOLVED = ("reference", "cpu", "triton", "dense")


def requested(backend: str | None = None) -> str:
    """The backend asked for: the argument if given, else the environment variable, else auto."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower()
    if name not in CHOICES:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}: unknown kernel backend {name!r}; expected one of {', '.join(CHOICES)}")
    return name


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(
    backend: str | None,
    device: torch.device,
    density: float | None = None,
    break_even: float = 1.0,
) -> str:
    """Pick the path that runs: a pure function of the request, the device and the density.

    ``density`` is the active fraction of the work (None when unknown); ``break_even`` is the
    density above which the op's sparse path is slower than dense (1.0 disables the fallback).
    Forced backends are honoured as asked; only ``auto`` may fall back to ``dense``.
    """
    name = requested(backend)
    if name == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError("backend: 'triton' needs CUDA tensors or TRITON_INTERPRET=1")
    if name != "auto":
        return name
    if density is not None and density >= break_even:
        return "dense"
    return "triton" if device.type == "cuda" else "cpu"


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a module's weights are Parameters: plain storage, no dispatch hooks


def dispatch_free(*tensors: torch.Tensor | None) -> bool:
    """True when calling an op's implementation directly is indistinguishable from dispatching it.

    That holds in plain eager inference: no torch.compile tracing, no dispatch mode (FlopCounterMode,
    FakeTensorMode, ...), plain tensors or a module's Parameters only, and no gradient to record. The
    wrappers then skip the custom-op dispatch, which costs tens of microseconds per call (it dominates
    small GPU calls and small CPU layers).
    """
    if torch._C._len_torch_dispatch_stack() > 0 or torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # one plain loop: this runs on every op call
        if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad)):
            return False  # subclasses (fake, functional, ...) need dispatch; so does a gradient to record
    return True
