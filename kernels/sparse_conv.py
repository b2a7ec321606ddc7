"""Spatially sparse 2-D convolution: compute only the output positions a mask selects.

``sparse_conv2d(x, mask, weight, ...)`` equals ``F.conv2d(x, weight, bias, stride, padding, dilation,
groups)`` where ``mask`` (bool ``(N, Hout, Wout)``) is true and exactly 0 elsewhere (no bias there);
``residual=r`` returns ``r`` plus that (a residual block's add, fused into the CPU kernel's pass).

Paths (``kernels._backend``):
- ``reference`` / ``dense``: the dense conv, then zero outside the mask (counted dense). ``reference`` is
  the oracle (``masked_fill``); ``dense``, what ``auto`` falls back to, writes zeros only at the inactive
  positions (``zero_outside``); both give the same result.
- ``cpu``: float32 inputs with ``groups=1`` (NCHW or channels_last) run a native direct-conv kernel (``_native.c``, built
  on first use; AVX-512): it reads the mask itself, and per register tile of 6 active pixels x 64
  output channels accumulates over every input channel and tap straight from ``x`` (outputs whose
  receptive field crosses the border run only their taps inside the image, grouped by that tap window;
  a window with few outputs and a large weight runs on zero-padded copies of their receptive fields),
  writing the output in the input's layout; no padded copy, no active list and no patch matrix is
  materialized. With ``residual``, it adds into a copy of the residual instead of a zero-filled output.
  Otherwise (no compiler or AVX-512, other dtypes, groups) it gathers the ``kh*kw`` receptive field of
  every active output into a patch matrix, runs one GEMM against the weight and scatters the results into
  a zero output. NCHW inputs (``CPU_ROUTE =
  "nchw"``) gather channel-major columns ``[Cin*kh*kw, n_active]`` from a zero-bordered ``(C, N, H, W)``
  copy, so neither the input nor the output is transposed; channels_last inputs gather NHWC rows
  ``[n_active, kh*kw*Cin]``. Groups use a batched GEMM (NCHW) or ``F.conv2d`` on the patches (NHWC).
  Index tables are cached per geometry; the padded copy and the patch matrix live in a small
  per-thread workspace, because fresh allocations of that size cost page faults on every call.
- ``triton``: a dense-in / sparse-out implicit GEMM over the active pixels of the whole batch,
  compacted on the device without a host sync, with the scatter fused into the epilogue.

The registered MAC formula counts ``active_positions x Cout x Cin/groups x kh x kw`` for the sparse
paths and the dense MACs for ``reference``/``dense`` (what actually executed). In plain eager inference
(no autograd, no dispatch mode such as FlopCounterMode, no torch.compile) the wrapper calls the
implementation directly instead of going through the custom-op dispatcher (``dispatch_free``), which
saves tens of microseconds per call; everything else goes through ``torch.ops.dynnet.sparse_conv2d``.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from kernels import _backend, _native, _plans
from kernels._backend import dispatch_free
from kernels._checks import (
    FLOAT_DTYPES,
    check_bool_mask,
    check_device,
    check_divisible,
    check_int,
    check_pair,
    check_same_device,
    check_same_dtype,
    check_tensor,
)

# Density (active fraction of output positions) above which ``auto`` runs the dense conv instead.
# cpu: measured on the development machine (Intel Xeon, AVX-512, shared by other jobs, so 1 thread and
# per-thread CPU time: ``python -m benchmarks.bench_conv --quick --threads 1 --clock thread``; fp32,
# 3x3 conv 64->64, 56x56, batch 1, random masks): the cpu path and F.conv2d cross at density ~0.43.
# cuda: on an H200 (fp16, channels_last, C in {64, 256}, 28/56 px, batch 1/8) the Triton path was
# slower than cuDNN at every measured density down to 0.05 (its ~0.22 ms per call is launch and
# Python overhead), so ``auto`` always runs dense on CUDA; ``backend="triton"`` still forces it.
SPARSE_CONV2D_BREAK_EVEN = {"cpu": 0.4, "cuda": 0.0}
# The same where the CPU path is the fused native kernel, by the dense conv's size. The stored sweep
# (``catalog/results/kernels/conv-cpu.json``: ``python -m benchmarks.bench_conv --repeats 10`` at 755a3c8,
# 2 threads, wall clock, C in {64, 256}, 28/56 px, batch 1/8, random and clustered masks): convs of up
# to ~460 M dense MACs (C=64 at 56 px batch 1, C=256 at 28 px batch 1, C=64 at 28 px batch 8) never lost
# to oneDNN (1.00-1.25x at density 0.9), so ``auto`` never falls back there; from ~900 M MACs (C=64 at
# 56 px batch 8, C=256 at 56 px, C=256 at 28 px batch 8) the kernel crossed the dense conv at densities
# 0.61-0.92 (median 0.72).
FUSED_BREAK_EVEN = 1.0
FUSED_LARGE_BREAK_EVEN = 0.72
FUSED_LARGE_MACS = 700_000_000  # dense MACs from which FUSED_LARGE_BREAK_EVEN applies (between the two groups)

# CPU route for NCHW inputs: "fused" runs the native direct-conv kernel (``_native.c``: float32,
# groups=1, AVX-512; otherwise "nchw" runs); "nchw" gathers channel-major patches from an NCHW copy
# (no transposes) for one GEMM; "nhwc" converts to NHWC rows (channels_last inputs always take it).
CPU_ROUTE = "fused"


# --------------------------------------------------------------------------------------------------
# Geometry and validation (shared with block_conv)


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes of one conv call: input ``(N, Cin, H, W)``, weight ``(Cout, Cin/groups, kh, kw)``."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    out_height: int
    out_width: int


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one axis (``F.conv2d``'s formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_conv_args(
    x: object,
    weight: object,
    bias: object,
    stride: object,
    padding: object,
    dilation: object,
    groups: object,
) -> ConvGeometry:
    """Validate the dense-conv arguments; return the geometry. Errors name the argument.

    Tensor kinds, dtypes and devices are checked on every call; the shape checks are a pure function
    of the shapes and conv parameters and are cached.
    """
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=4, dtypes=FLOAT_DTYPES)
    assert isinstance(x, Tensor) and isinstance(weight, Tensor)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
    named = [("x", x), ("weight", weight), ("bias", bias)]
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):  # type: ignore[attr-defined]
        check_same_dtype(named)  # type: ignore[arg-type]
    if weight.device != x.device or (bias is not None and bias.device != x.device):  # type: ignore[attr-defined]
        check_same_device(named)  # type: ignore[arg-type]
    args = (x.shape, weight.shape, None if bias is None else bias.shape,  # type: ignore[attr-defined]
            stride, padding, dilation, groups)
    if all(_plain(a) for a in args[3:]):
        return _conv_geometry(*(tuple(a) if isinstance(a, list) else a for a in args))
    return _conv_geometry.__wrapped__(*args)


def check_residual(residual: object, x: Tensor, g: ConvGeometry) -> None:
    """``residual``: a tensor of the conv output's shape, with ``x``'s dtype and device."""
    check_tensor("residual", residual, ndim=4, dtypes=FLOAT_DTYPES)
    assert isinstance(residual, Tensor)
    want = (g.batch, g.out_channels, g.out_height, g.out_width)
    if tuple(residual.shape) != want:
        raise ValueError(f"residual: expected shape {want} (the conv output), got {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        check_same_dtype([("x", x), ("residual", residual)])
    if residual.device != x.device:
        check_same_device([("x", x), ("residual", residual)])


def _plain(value: object) -> bool:
    """An int or a short tuple/list of ints (safe, unambiguous cache keys; bools are not ints here)."""
    if type(value) is int:
        return True
    return type(value) in (tuple, list) and len(value) <= 2 and all(type(v) is int for v in value)  # type: ignore[arg-type]


@lru_cache(maxsize=512)
def _conv_geometry(
    x_shape: tuple[int, ...], w_shape: tuple[int, ...], b_shape: tuple[int, ...] | None,
    stride: object, padding: object, dilation: object, groups: object,
) -> ConvGeometry:
    stride_ = check_pair("stride", stride, minimum=1)
    padding_ = check_pair("padding", padding, minimum=0)
    dilation_ = check_pair("dilation", dilation, minimum=1)
    groups_ = check_int("groups", groups, minimum=1)
    n, cin, h, w = x_shape
    cout, cin_g, kh, kw = w_shape
    check_divisible("x", cin, groups_, "groups")
    check_divisible("weight", cout, groups_, "groups")
    if cin_g != cin // groups_:
        raise ValueError(f"weight: expected shape (*, {cin // groups_}, *, *) for Cin/groups = {cin}/{groups_}, "
                         f"got {w_shape}")
    if kh < 1 or kw < 1 or cout < 1:
        raise ValueError(f"weight: expected a non-empty kernel, got shape {w_shape}")
    if b_shape is not None and b_shape != (cout,):
        raise ValueError(f"bias: expected shape ({cout},) for one bias per output channel, got {b_shape}")
    ho = conv_output_size(h, kh, stride_[0], padding_[0], dilation_[0])
    wo = conv_output_size(w, kw, stride_[1], padding_[1], dilation_[1])
    if ho < 1 or wo < 1:
        raise ValueError(
            f"x: spatial size {(h, w)} is too small for a {kh}x{kw} kernel with padding {padding_} "
            f"and dilation {dilation_} (output would be {(ho, wo)})"
        )
    if n < 1 or cin < 1:
        raise ValueError(f"x: expected a non-empty batch and channels, got shape {x_shape}")
    return ConvGeometry(n, cin, h, w, cout, (kh, kw), stride_, padding_, dilation_, groups_, ho, wo)


def output_format(x: Tensor) -> torch.memory_format:
    """Memory format of the result: channels_last when ``x`` is (only) channels_last, else NCHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def auto_density(backend: str | None, break_even: float, executed: Callable[[], float]) -> float | None:
    """Executed fraction for ``auto``'s dense fallback, computed only when it can change the choice.

    None unless ``auto`` was asked for and ``0 < break_even < 1``; ``executed()`` (one host sync on
    CUDA) is not called when the break-even alone decides (<= 0: always dense; >= 1: never).
    """
    if _backend.requested(backend) != "auto" or break_even >= 1.0:
        return None
    return 0.0 if break_even <= 0.0 else executed()


# --------------------------------------------------------------------------------------------------
# MAC formulas (pure functions)


def conv2d_macs(batch: int, out_height: int, out_width: int, weight_shape: Sequence[int]) -> int:
    """MACs of the dense conv: every output position x Cout x Cin/groups x kh x kw."""
    return batch * out_height * out_width * math.prod(int(s) for s in weight_shape)


def sparse_conv2d_macs(active: Tensor | int, weight_shape: Sequence[int]) -> int:
    """MACs of the sparse paths: active output positions (a count or a bool mask) x Cout x Cin/g x kh x kw."""
    count = int(active.sum()) if isinstance(active, Tensor) else int(active)
    return count * math.prod(int(s) for s in weight_shape)


# --------------------------------------------------------------------------------------------------
# CPU path helpers (shared with block_conv)


class _Workspace(threading.local):
    """Per-thread scratch buffers: an LRU of zero-bordered inputs plus growable flat buffers."""

    max_padded = 8

    def __init__(self) -> None:
        self.padded: OrderedDict[tuple, Tensor] = OrderedDict()
        self.flat: dict[tuple, Tensor] = {}


_WORKSPACE = _Workspace()


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat per-thread scratch tensor of ``numel`` elements (contents undefined); grows as needed."""
    key = (name, dtype, device, torch.is_inference_mode_enabled())  # inference tensors stay in that mode
    buf = _WORKSPACE.flat.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, int(1.25 * (0 if buf is None else buf.numel()))), dtype=dtype, device=device)
        _WORKSPACE.flat[key] = buf
    return buf[:numel]


def padded_nhwc(x: Tensor, top: int, left: int, rows: int, cols: int) -> Tensor:
    """``x (N, C, H, W)`` as NHWC inside a zero frame: ``(N, rows, cols, C)`` with x at ``(top, left)``.

    Rows/cols of ``x`` beyond ``rows``/``cols`` are dropped (the conv never reads them). The frame is
    a cached per-thread buffer whose border stays zero, so only the interior is written per call.
    """
    n, c, h, w = x.shape
    nhwc = x.permute(0, 2, 3, 1)
    if top == 0 and left == 0 and rows == h and cols == w and nhwc.is_contiguous():
        return nhwc
    key = (n, c, h, w, top, left, rows, cols, x.dtype, x.device, torch.is_inference_mode_enabled())
    buf = _WORKSPACE.padded.pop(key, None)
    if buf is None:
        buf = torch.zeros(n, rows, cols, c, dtype=x.dtype, device=x.device)
    _WORKSPACE.padded[key] = buf
    while len(_WORKSPACE.padded) > _WORKSPACE.max_padded:
        _WORKSPACE.padded.popitem(last=False)
    hh, ww = min(h, rows - top), min(w, cols - left)
    buf[:, top : top + hh, left : left + ww].copy_(nhwc[:, :hh, :ww])
    return buf


def padded_cnhw(x: Tensor, top: int, left: int, rows: int, cols: int) -> Tensor:
    """``x (N, C, H, W)`` as ``(C, N, rows, cols)`` inside a zero frame (cached per-thread buffer).

    Channel-major, so one ``index_select`` along dim 1 gathers a pixel's channels for the whole batch;
    the copy keeps image rows contiguous (no transpose of the inner dimensions).
    """
    n, c, h, w = x.shape
    key = ("cnhw", n, c, h, w, top, left, rows, cols, x.dtype, x.device, torch.is_inference_mode_enabled())
    buf = _WORKSPACE.padded.pop(key, None)
    if buf is None:
        buf = torch.zeros(c, n, rows, cols, dtype=x.dtype, device=x.device)
    _WORKSPACE.padded[key] = buf
    while len(_WORKSPACE.padded) > _WORKSPACE.max_padded:
        _WORKSPACE.padded.popitem(last=False)
    hh, ww = min(h, rows - top), min(w, cols - left)
    buf[:, :, top : top + hh, left : left + ww].copy_(x.permute(1, 0, 2, 3)[:, :, :hh, :ww])
    return buf


def packed_weight(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``weight (Cout, Cin, kh, kw)`` in the fused kernel's layout (``_native.pack_conv``: column blocks of
    ``(Cin*kh*kw, Cout16)``) and bias as ``(Cout16,)``, cached until either changes (``_native.packed``)."""
    return _native.packed(weight, bias, _native.pack_conv)


def fused_applies(x: Tensor, weight: Tensor, groups: int) -> bool:
    """Whether the cpu path of these arguments is the fused native kernel (float32, groups=1, NCHW or NHWC)."""
    return CPU_ROUTE == "fused" and groups == 1 and _native.usable(x, weight)  # (usable: float32 on the CPU)


def cpu_break_even(x: Tensor, weight: Tensor, groups: int, table: dict[str, float], fused: bool | None = None,
                   dense_macs: int = 0) -> float:
    """``auto``'s break-even density for these arguments: the fused kernel's (by ``dense_macs``, the dense
    conv's MACs), or the op's per device. ``fused``: ``fused_applies(x, weight, groups)`` where the caller
    has it already."""
    if fused_applies(x, weight, groups) if fused is None else fused:  # (CPU only)
        return fused_break_even(dense_macs)
    return table.get(x.device.type, 1.0)


def fused_break_even(dense_macs: int) -> float:
    """The fused kernel's break-even density for a conv of ``dense_macs`` dense MACs (a pure function)."""
    return FUSED_LARGE_BREAK_EVEN if dense_macs >= FUSED_LARGE_MACS else FUSED_BREAK_EVEN


def fused_route(x: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None, g: ConvGeometry,
                block_size: int = 0, residual: Tensor | None = None) -> Tensor | None:
    """The conv at the active pixels by the native AVX-512 kernel, in ``x``'s layout (NCHW or
    channels_last, as ``output_format``); None if unavailable. ``block_size > 0``: ``mask`` is a block
    mask ``(N, ceil(Hout/B), ceil(Wout/B))``, read by the kernel as such (never expanded to pixels).
    ``residual``: the result starts as a copy of it and the kernel adds the conv at the active pixels (no
    zero fill and no separate add pass)."""
    wt, bt = packed_weight(weight, bias)
    fmt = output_format(x)
    out = torch.empty(g.batch, g.out_channels, g.out_height, g.out_width, dtype=x.dtype, device=x.device,
                      memory_format=fmt)
    if residual is not None:
        out.copy_(residual)
    nhwc = fmt == torch.channels_last
    done = _native.sparse_conv(x.contiguous(memory_format=fmt), mask.contiguous(), g, wt, bt, out, nhwc, block_size,
                               residual is not None)
    return out if done else None


def padded_extent(g: ConvGeometry, out_rows: int, out_cols: int) -> tuple[int, int]:
    """Rows and columns of the zero-framed input that ``out_rows x out_cols`` outputs read."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = g.kernel, g.stride, g.dilation, g.padding
    rows = max(ph + g.height, (out_rows - 1) * sh + (kh - 1) * dh + 1)
    cols = max(pw + g.width, (out_cols - 1) * sw + (kw - 1) * dw + 1)
    return rows, cols


@lru_cache(maxsize=128)
def _tap_table(g: ConvGeometry, device: torch.device) -> Tensor:
    """Pixel of the zero-framed input read by every (output position, tap): ``(N*Hout*Wout, kh*kw)`` int64.

    Pixels are numbered ``(n*rows + r)*cols + c`` over the frame of ``padded_extent``.
    """
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.stride, g.dilation
    rows, cols = padded_extent(g, g.out_height, g.out_width)
    n = torch.arange(g.batch, device=device).view(-1, 1, 1, 1)
    ho = torch.arange(g.out_height, device=device).view(1, -1, 1, 1)
    wo = torch.arange(g.out_width, device=device).view(1, 1, -1, 1)
    ty = torch.arange(kh, device=device).repeat_interleave(kw).view(1, 1, 1, -1)
    tx = torch.arange(kw, device=device).repeat(kh).view(1, 1, 1, -1)
    table = (n * rows + ho * sh + ty * dh) * cols + wo * sw + tx * dw
    return table.reshape(-1, kh * kw)


def gather_patches(x: Tensor, g: ConvGeometry, active: Tensor) -> Tensor:
    """Receptive fields of the active outputs as rows: ``[n_active, kh*kw*Cin]`` (tap-major, NHWC order).

    ``active``: flat indices ``n*Hout*Wout + ho*Wout + wo`` of the active outputs (int64).
    """
    rows, cols = padded_extent(g, g.out_height, g.out_width)
    xp = padded_nhwc(x, g.padding[0], g.padding[1], rows, cols).reshape(-1, g.in_channels)
    index = _tap_table(g, x.device).index_select(0, active).reshape(-1)
    out = scratch("patches", index.numel() * g.in_channels, x.dtype, x.device).view(-1, g.in_channels)
    torch.index_select(xp, 0, index, out=out)
    return out.view(active.numel(), -1)


def patch_matmul(patches: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """Rows of conv outputs from gathered patches: ``[n, kh*kw*Cin] -> [n, Cout]``."""
    cout, cin_g, kh, kw = weight.shape
    n = patches.shape[0]
    if groups == 1:
        w2 = weight.permute(2, 3, 1, 0).reshape(kh * kw * cin_g, cout)
        out = scratch("rows", n * cout, patches.dtype, patches.device).view(n, cout)
        if bias is None:
            return torch.mm(patches, w2, out=out)
        return torch.addmm(bias, patches, w2, out=out)
    p4 = patches.view(n, kh, kw, cin_g * groups).permute(0, 3, 1, 2)
    return F.conv2d(p4, weight, bias, groups=groups).view(n, cout)


def gather_patches_t(x: Tensor, g: ConvGeometry, active: Tensor) -> Tensor:
    """Receptive fields of the active outputs as columns: ``[Cin*kh*kw, n_active]`` (NCHW weight order)."""
    rows, cols = padded_extent(g, g.out_height, g.out_width)
    xp = padded_cnhw(x, g.padding[0], g.padding[1], rows, cols).view(g.in_channels, -1)
    index = _tap_table(g, x.device).index_select(0, active).t().reshape(-1)  # tap-major
    out = scratch("patches_t", g.in_channels * index.numel(), x.dtype, x.device).view(g.in_channels, -1)
    torch.index_select(xp, 1, index, out=out)
    return out.view(-1, active.numel())


def patch_matmul_t(patches_t: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """Conv outputs as columns from transposed patches: ``[Cin*kh*kw, n] -> [Cout, n]``."""
    cout = weight.shape[0]
    k_g = weight[0].numel()
    n = patches_t.shape[1]
    w2 = weight.reshape(groups, cout // groups, k_g)
    out = scratch("cols", cout * n, patches_t.dtype, patches_t.device).view(groups, cout // groups, n)
    a = patches_t.view(groups, k_g, n)
    if bias is None:
        torch.bmm(w2, a, out=out)
    else:
        torch.baddbmm(bias.view(groups, cout // groups, 1), w2, a, out=out)
    return out.view(cout, n)


def _nhwc_route(x: Tensor, active: Tensor, weight: Tensor, bias: Tensor | None, g: ConvGeometry) -> Tensor:
    """Rows route: NHWC patches, one GEMM, rows into a zero NHWC output (channels_last result)."""
    rows = patch_matmul(gather_patches(x, g, active), weight, bias, g.groups)
    out = rows.new_zeros(g.batch * g.out_height * g.out_width, g.out_channels)
    out.index_copy_(0, active, rows)
    return out.view(g.batch, g.out_height, g.out_width, g.out_channels).permute(0, 3, 1, 2)


def _nchw_route(
    x: Tensor, active: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None, g: ConvGeometry
) -> Tensor:
    """Columns route, one image at a time (its zero-framed copy stays in cache while it is gathered):
    channel-major patches, one GEMM, columns into a zero NCHW output; no transposes."""
    hw = g.out_height * g.out_width
    out = x.new_zeros(g.batch, g.out_channels, hw)
    one = replace(g, batch=1)
    counts = [active.numel()] if g.batch == 1 else mask.reshape(g.batch, -1).sum(dim=1).tolist()
    start = 0
    for i, count in enumerate(counts):  # ``active`` is sorted: each image owns one run of it
        if count:
            pos = active[start : start + count] - i * hw
            cols = patch_matmul_t(gather_patches_t(x[i : i + 1], one, pos), weight, bias, g.groups)
            out[i].index_copy_(1, pos, cols)
        start += count
    return out.view(g.batch, g.out_channels, g.out_height, g.out_width)


def cpu_sparse_conv(x: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None, g: ConvGeometry,
                    fused: bool | None = None) -> Tensor:
    """The cpu path: the fused native kernel where it applies, else gather the active outputs' receptive
    fields, one GEMM, scatter into a zero output. ``fused``: ``fused_applies`` if the caller has it."""
    fmt = output_format(x)
    if fused_applies(x, weight, g.groups) if fused is None else fused:
        out = fused_route(x, mask, weight, bias, g)
        if out is not None:
            return out
    active = mask.reshape(-1).nonzero().squeeze(1)
    if active.numel() == 0:
        return x.new_zeros(g.batch, g.out_channels, g.out_height, g.out_width).contiguous(memory_format=fmt)
    if fmt == torch.channels_last or CPU_ROUTE == "nhwc":
        return _nhwc_route(x, active, weight, bias, g).contiguous(memory_format=fmt)
    return _nchw_route(x, active, mask, weight, bias, g).contiguous(memory_format=fmt)


def zero_outside(out: Tensor, pixels: Tensor, exact: bool) -> Tensor:
    """Zero ``out (N, C, H, W)`` where ``pixels (N, H, W)`` is false, in place.

    ``exact``: ``masked_fill`` (the oracle). Otherwise only the inactive positions are written: their
    flat offsets (from ``out``'s strides, NCHW or channels_last) go to one ``index_fill_``, several
    times cheaper than a pass over the whole output (broadcast ``masked_fill`` is slow on CPU). Both
    give exactly 0 outside the mask, even where the dense output was inf/NaN.
    """
    dense_layout = out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)
    if exact or not dense_layout:
        return out.masked_fill_(~pixels.unsqueeze(1), 0)
    off = (~pixels).nonzero()  # (k, 3): sample, row, column
    if off.numel() == 0:
        return out
    sn, sc, sh, sw = out.stride()
    base = off[:, 0] * sn + off[:, 1] * sh + off[:, 2] * sw
    index = (base.unsqueeze(1) + torch.arange(out.shape[1], device=out.device) * sc).reshape(-1)
    out.as_strided((out.numel(),), (1,)).index_fill_(0, index, 0)
    return out


def _dense_masked(
    x: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None, g: ConvGeometry, exact: bool
) -> Tensor:
    out = F.conv2d(x, weight, bias, g.stride, g.padding, g.dilation, g.groups)
    return zero_outside(out, mask, exact).contiguous(memory_format=output_format(x))


# --------------------------------------------------------------------------------------------------
# The custom op


def _geometry(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int], groups: int) -> ConvGeometry:
    """Geometry of already validated arguments (the ops' view; cached unless shapes are symbolic)."""
    args = (x.shape, weight.shape, None, tuple(stride), tuple(padding), tuple(dilation), groups)
    try:
        return _conv_geometry(*args)
    except TypeError:  # SymInts (fake tensors with dynamic shapes) are not hashable
        return _conv_geometry.__wrapped__(*args)


def _sparse_conv2d_impl(
    x: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None, g: ConvGeometry, path: str,
    residual: Tensor | None = None, fused: bool | None = None,
) -> Tensor:
    """The op's body; ``fused``: ``fused_applies(x, weight, g.groups)`` where the wrapper has it already."""
    if path == "cpu" and fused is None:
        fused = fused_applies(x, weight, g.groups)
    if residual is not None:
        if path == "cpu" and fused:
            out = fused_route(x, mask, weight, bias, g, residual=residual)
            if out is not None:
                return out
        out = _sparse_conv2d_impl(x, mask, weight, bias, g, path, fused=fused)
        return torch.add(out, residual).contiguous(memory_format=output_format(x))
    if path in ("reference", "dense"):
        return _dense_masked(x, mask, weight, bias, g, exact=path == "reference")
    if path == "cpu":
        return cpu_sparse_conv(x, mask, weight, bias, g, fused)
    if path == "triton":
        from kernels._triton_conv import sparse_conv2d_triton  # noqa: PLC0415 - Triton only when used

        return sparse_conv2d_triton(x, mask, weight, bias, g).contiguous(memory_format=output_format(x))
    raise ValueError(f"path: unknown resolved path {path!r}; expected one of {', '.join(_backend.RESOLVED)}")


@torch.library.custom_op("dynnet::sparse_conv2d", mutates_args=())
def _sparse_conv2d_op(
    x: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    path: str,
    residual: Tensor | None = None,
) -> Tensor:
    """The op behind ``sparse_conv2d``; ``path`` is the resolved backend name."""
    g = _geometry(x, weight, stride, padding, dilation, groups)
    return _sparse_conv2d_impl(x, mask, weight, bias, g, path, residual)


@_sparse_conv2d_op.register_fake
def _(x, mask, weight, bias, stride, padding, dilation, groups, path, residual=None):
    g = _geometry(x, weight, stride, padding, dilation, groups)
    shape = (g.batch, g.out_channels, g.out_height, g.out_width)
    return x.new_empty(shape).contiguous(memory_format=output_format(x))


def masked_conv_backward(ctx, grad: Tensor, pixel_mask: Tensor) -> tuple:
    """Dense conv gradients of ``grad`` zeroed outside ``pixel_mask (N, Hout, Wout)``."""
    x, weight = ctx.saved_tensors[0], ctx.saved_tensors[1]
    grad = grad.masked_fill(~pixel_mask.unsqueeze(1), 0)
    want = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.has_bias and ctx.needs_input_grad[3])
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if ctx.has_bias else None,
        ctx.stride, ctx.padding, ctx.dilation, False, [0, 0], ctx.groups, list(want),
    )
    return gx, gw, (gb if ctx.has_bias else None)


def _setup_context(ctx, inputs, output) -> None:
    x, mask, weight, bias, stride, padding, dilation, groups, _path, residual = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
    ctx.stride, ctx.padding, ctx.dilation, ctx.groups = list(stride), list(padding), list(dilation), groups


def _backward(ctx, grad: Tensor):
    gx, gw, gb = masked_conv_backward(ctx, grad, ctx.saved_tensors[2])
    g_residual = grad if ctx.has_residual and ctx.needs_input_grad[9] else None
    return gx, None, gw, gb, None, None, None, None, None, g_residual


_sparse_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.dynnet.sparse_conv2d, get_raw=True)
def _sparse_conv2d_flops(x, mask, weight, bias, stride, padding, dilation, groups, path, residual=None,
                         out_val=None) -> int:
    """FLOPs (2 x MACs) of what the path executed: active positions, or dense for reference/dense."""
    if path in ("reference", "dense"):
        return 2 * conv2d_macs(mask.shape[0], mask.shape[1], mask.shape[2], weight.shape)
    return 2 * sparse_conv2d_macs(mask, weight.shape)


# --------------------------------------------------------------------------------------------------
# Public wrapper


def sparse_conv2d(
    x: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    backend: str | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """``F.conv2d`` at the outputs where ``mask`` is true, exactly 0 elsewhere; plus ``residual`` if given.

    x ``(N, Cin, H, W)``; mask bool ``(N, Hout, Wout)``; weight ``(Cout, Cin/groups, kh, kw)``;
    bias ``(Cout,)`` or None. Returns ``(N, Cout, Hout, Wout)`` (channels_last if ``x`` is).
    ``backend``: reference | cpu | triton | auto (default: ``$DYNNET_KERNEL_BACKEND`` or auto).
    ``residual`` ``(N, Cout, Hout, Wout)`` (not modified): returns ``residual + sparse_conv2d(...)``, which
    the fused CPU kernel computes by adding the conv into a copy of ``residual`` at the active outputs
    (a residual block's add without a zero-filled output and a separate pass over it).
    """
    key = _plans.signature((x, mask, weight, bias, residual, stride, padding, dilation, groups, backend),
                           (CPU_ROUTE, FUSED_BREAK_EVEN, FUSED_LARGE_BREAK_EVEN, FUSED_LARGE_MACS,
                            tuple(SPARSE_CONV2D_BREAK_EVEN.items())))
    plan = _plans.get(key)
    if plan is None:
        plan = _plans.store(key, _sparse_plan(x, mask, weight, bias, residual, stride, padding, dilation, groups,
                                              backend))
    g, fused, name, break_even, path = plan
    if path is None:  # auto's dense fallback: a function of this mask's density
        path = _backend.resolve(name, x.device, float(mask.sum()) / max(1, mask.numel()), break_even)
    if dispatch_free(x, mask, weight, bias, residual):
        return _sparse_conv2d_impl(x, mask, weight, bias, g, path, residual, fused)
    return torch.ops.dynnet.sparse_conv2d(
        x, mask, weight, bias, list(g.stride), list(g.padding), list(g.dilation), g.groups, path, residual
    )


def _sparse_plan(x: object, mask: object, weight: object, bias: object, residual: object, stride: object,
                 padding: object, dilation: object, groups: object, backend: str | None) -> tuple:
    """Validate a ``sparse_conv2d`` call (errors name the argument) and choose its path:
    ``(geometry, fused, backend name, break-even, path)``; path None where ``auto``'s dense fallback
    depends on the mask's density. A pure function of the call's signature (``kernels._plans``)."""
    g = check_conv_args(x, weight, bias, stride, padding, dilation, groups)
    assert isinstance(x, Tensor) and isinstance(weight, Tensor)
    check_bool_mask("mask", mask, (g.batch, g.out_height, g.out_width), "the conv output")
    assert isinstance(mask, Tensor)
    if mask.device != x.device:
        check_device("mask", mask, x.device)
    if residual is not None:
        check_residual(residual, x, g)
    name = _backend.requested(backend)
    fused = fused_applies(x, weight, g.groups)
    macs = conv2d_macs(g.batch, g.out_height, g.out_width, weight.shape)
    break_even = cpu_break_even(x, weight, g.groups, SPARSE_CONV2D_BREAK_EVEN, fused, macs) if name == "auto" else 1.0
    return g, fused, name, break_even, planned_path(name, x.device, break_even)


def planned_path(name: str, device: torch.device, break_even: float) -> str | None:
    """The path of a plan: fixed unless ``auto`` must compare the density with ``0 < break_even < 1``."""
    if name == "auto" and 0.0 < break_even < 1.0:
        return None
    return _backend.resolve(name, device, auto_density(name, break_even, lambda: 0.0), break_even)
