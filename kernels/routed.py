"""``routed_linear``: one linear map per row, chosen by a route (the grouped GEMM behind MoE).

Row ``t`` of the result is ``weight[route[t]] @ x[t] (+ bias[route[t]])``: mixture-of-experts layers,
branch selection and per-sample routing in CNNs all reduce to this.

Paths (picked by ``kernels._backend.resolve``):

- ``reference``: gathers one weight matrix per row and runs a batched matrix-vector product; the
  oracle (memory ``T x Cout x Cin``: small inputs only).
- ``cpu``: float32 on a CPU with AVX-512 (and a C compiler): the native kernel (``_native.c``) groups
  the rows by expert with a counting sort (indices only, no data moves) and runs each expert's rows
  through register tiles that read them in place and write their output rows directly; weights are
  packed once per version (``_native.pack_routed``). All rows on one expert stay a single ``F.linear``
  (MKL beats the kernel there), and large groups take the grouped GEMM below (one MKL ``mm`` per
  expert): from ``MKL_ROWS`` rows per used expert on average (256 when the rows come sorted by route,
  512 otherwise) it is faster than the kernel. Otherwise (and on other devices or dtypes) a plain-PyTorch grouped GEMM that runs
  on any device: per non-empty expert one ``mm`` on
  its rows, written into a row slice of one output buffer, then one per-row bias add. Rows already
  sorted by route (as the MoE layers pass them) are used in place; otherwise one gather sorts them
  and one gather restores their order. All rows on one expert is a single ``F.linear``.
  ``counts.tolist()`` and the sortedness test are host syncs on CUDA.
- ``triton``: a grouped GEMM with every expert behind one weight pointer ``W[E, Cout, Cin]``; rows are
  sorted by expert on the device and each program looks its ``(expert, row_start)`` tile up from the
  per-expert offsets (tiles padded per expert to ``BLOCK_M``), gathering its rows of ``x`` in the
  operand loads and scattering the result in the epilogue. No pointer arrays, so it also runs under
  ``TRITON_INTERPRET=1``. Needs float16, bfloat16 (not in the interpreter) or float32; fp32 accumulation.

Every path executes ``T x Cout x Cin`` MACs; the registered flop formula reports twice that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from kernels import _backend, _native
from kernels._backend import dispatch_free
from kernels._checks import (
    FLOAT_DTYPES,
    check_range,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)

ROUTE_DTYPES = (torch.int32, torch.int64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def routed_linear_macs(tokens: int, in_features: int, out_features: int) -> int:
    """MACs of ``routed_linear`` on ``tokens`` rows: one ``Cout x Cin`` matrix-vector product per row."""
    return int(tokens) * int(out_features) * int(in_features)


def _reference(x: Tensor, route: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Oracle: gather each row's matrix ``(T, Cout, Cin)`` and multiply; exactly T x Cout x Cin MACs."""
    w = weight.index_select(0, route.long())
    y = torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        y = y + bias.index_select(0, route.long())
    return y


def is_sorted(route: Tensor) -> bool:
    """Whether ``route (T,)`` is non-decreasing, i.e. the rows already come grouped by expert."""
    return route.shape[0] < 2 or bool((route[1:] >= route[:-1]).all())


def inverse_permutation(order: Tensor) -> Tensor:
    """``inv`` with ``inv[order[i]] = i``: ``y.index_select(0, inv)`` undoes ``x.index_select(0, order)``."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))


def _sorted_mm(xs: Tensor, sizes: list[int], weight: Tensor) -> Tensor:
    """Rows grouped by expert: one ``mm`` per non-empty expert, written into its slice of one output.

    xs (T, Cin) with the first ``sizes[0]`` rows for expert 0, the next ``sizes[1]`` for expert 1, ...;
    weight (E, Cout, Cin) (any strides) -> (T, Cout). Row slices are views: no gather, no scatter.
    """
    out = xs.new_empty(xs.shape[0], weight.shape[1])
    w_t = weight.transpose(1, 2).unbind(0)  # (Cin, Cout) views, all made in one call
    for xe, ye, wt, n in zip(xs.split(sizes), out.split(sizes), w_t, sizes, strict=True):
        if n:
            torch.mm(xe, wt, out=ye)
    return out


# Rows per used expert (on average) from which one MKL GEMM per expert beats the native kernel on the
# CPU: rows already sorted by route (views, no data moves) or in any order (one gather sorts them and one
# restores their order). Measured on the development machine (2 threads, fp32, Cin = Cout = 256, 8 and
# 32 experts, 512 to 4096 rows, ratio to one dense matmul over the same rows, medians of 120 interleaved
# rounds): sorted, 512 rows per expert: MKL 1.29-1.31x against the kernel's 1.53-1.61x, 256: 1.42-1.44x
# against 1.52-1.53x, 128: even; any order, 512 rows per expert: MKL 1.77-1.80x against 2.00-2.05x.
MKL_ROWS = {"sorted": 256, "unsorted": 512}


def prefer_mkl(rows_per_expert: float, rows_sorted: bool) -> bool:
    """Whether per-expert MKL GEMMs beat the native kernel for this many rows per used expert."""
    return rows_per_expert >= MKL_ROWS["sorted" if rows_sorted else "unsorted"]


def _grouped(x: Tensor, route: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Grouped GEMM: per non-empty expert one ``mm`` on its rows, into a slice of one output buffer.

    x (T, Cin), route (T,), weight (E, Cout, Cin) (any strides), bias (E, Cout) or None -> (T, Cout).
    Fast paths: one expert taking every row is one ``F.linear``; rows already sorted by route (the MoE
    layers sort them) need no permutation at all. Otherwise one gather sorts the rows by route, the
    per-expert products fill the sorted output, and one gather restores the row order (measured on CPU:
    faster than a gather and an ``index_copy_`` per expert). The bias is added once, per row.
    """
    tokens, experts, out_features = x.shape[0], weight.shape[0], weight.shape[1]
    if tokens == 0:
        return x.new_empty(0, out_features)
    sizes = torch.bincount(route, minlength=experts).tolist()
    busiest = max(range(experts), key=sizes.__getitem__)
    if sizes[busiest] == tokens:  # one expert takes every row: no permutation at all
        return F.linear(x, weight[busiest], None if bias is None else bias[busiest])
    rows_sorted = None  # is_sorted(route), asked at most once
    if x.is_cpu and _native.usable(x, weight, *(() if bias is None else (bias,))):
        rows = tokens / sum(1 for n in sizes if n)  # per used expert, on average
        if rows >= MKL_ROWS["sorted"]:
            rows_sorted = is_sorted(route)
        if not prefer_mkl(rows, bool(rows_sorted)):
            wt, bt = _native.packed(weight, bias, _native.pack_routed)
            out = x.new_empty(tokens, out_features)
            if _native.routed_linear(x.contiguous(), route.to(torch.int64), wt, bt, out):
                return out
    if is_sorted(route) if rows_sorted is None else rows_sorted:
        out = _sorted_mm(x, sizes, weight)
    else:
        order = torch.argsort(route, stable=True)
        out = _sorted_mm(x.index_select(0, order), sizes, weight).index_select(0, inverse_permutation(order))
    return out if bias is None else out.add_(bias.index_select(0, route))


def _run(x: Tensor, route: Tensor, weight: Tensor, bias: Tensor | None, path: str) -> Tensor:
    if path == "reference":
        return _reference(x, route, weight, bias)
    if path == "triton":
        from kernels import _triton_routed  # noqa: PLC0415 - Triton only when its path runs

        return _triton_routed.routed_linear(x, route, weight, bias)
    if path in ("cpu", "dense"):
        return _grouped(x, route, weight, bias)
    raise ValueError(f"path: unknown routed_linear path {path!r}")


@torch.library.custom_op("dynnet::routed_linear", mutates_args=())
def _routed_linear_op(x: Tensor, route: Tensor, weight: Tensor, bias: Tensor | None, path: str) -> Tensor:
    """x (T, Cin), route (T,), weight (E, Cout, Cin), bias (E, Cout) or None -> (T, Cout)."""
    return _run(x, route, weight, bias, path)


@_routed_linear_op.register_fake
def _(x: Tensor, route: Tensor, weight: Tensor, bias: Tensor | None, path: str) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x, route, weight, bias, path = inputs
    ctx.save_for_backward(x, route, weight)
    ctx.path = path
    ctx.has_bias = bias is not None


def weight_grad(x: Tensor, grad_out: Tensor, route: Tensor, experts: int) -> Tensor:
    """Per-expert ``grad_out_e^T @ x_e``: x (T, Cin), grad_out (T, Cout) -> (E, Cout, Cin)."""
    grad_w = x.new_zeros(experts, grad_out.shape[1], x.shape[1])
    if x.shape[0] == 0:
        return grad_w
    if not is_sorted(route):
        order = torch.argsort(route, stable=True)
        x, grad_out = x.index_select(0, order), grad_out.index_select(0, order)
    sizes = torch.bincount(route, minlength=experts).tolist()
    for xe, ge, gw, n in zip(x.split(sizes), grad_out.split(sizes), grad_w.unbind(0), sizes, strict=True):
        if n:
            torch.mm(ge.t(), xe, out=gw)
    return grad_w


def _backward(ctx, grad_out: Tensor):
    x, route, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.dynnet.routed_linear(grad_out, route, weight.transpose(1, 2), None, ctx.path)
    if ctx.needs_input_grad[2]:
        grad_w = weight_grad(x, grad_out, route, weight.shape[0])
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_b = grad_out.new_zeros(weight.shape[0], weight.shape[1]).index_add_(0, route.long(), grad_out)
    return grad_x, None, grad_w, grad_b, None


_routed_linear_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.dynnet.routed_linear, get_raw=True)
def _routed_linear_flops(x, route, weight, bias=None, path="cpu", *args, out_val=None, **kwargs) -> int:
    """FlopCounterMode's unit: 2 x MACs, from shapes only (every path runs T x Cout x Cin MACs)."""
    return 2 * routed_linear_macs(x.shape[0], weight.shape[2], weight.shape[1])


def _validate(x: Tensor, route: Tensor, weight: Tensor, bias: Tensor | None, check_values: bool) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("route", route, ndim=1, dtypes=ROUTE_DTYPES)
    check_tensor("weight", weight, ndim=3, dtypes=FLOAT_DTYPES)
    tokens, in_features = x.shape
    experts, out_features = weight.shape[0], weight.shape[1]
    check_shape("route", route, (tokens,), "one route per row of x")
    check_shape("weight", weight, (None, None, in_features), f"x with {in_features} input features")
    if experts == 0:
        raise ValueError("weight: expected at least one expert (E >= 1), got E = 0")
    if bias is not None:
        check_tensor("bias", bias, ndim=2, dtypes=FLOAT_DTYPES)
        check_shape("bias", bias, (experts, out_features), "weight (E, Cout)")
    check_same_dtype([("x", x), ("weight", weight), ("bias", bias)])
    check_same_device([("x", x), ("route", route), ("weight", weight), ("bias", bias)])
    if check_values:
        check_range("route", route, 0, experts)


def routed_linear(
    x: Tensor,
    route: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    backend: str | None = None,
    *,
    check_values: bool = True,
) -> Tensor:
    """Row ``t`` is ``weight[route[t]] @ x[t] (+ bias[route[t]])``.

    x (T, Cin) float, route (T,) int32/int64 in [0, E), weight (E, Cout, Cin), bias (E, Cout) or
    None -> (T, Cout). ``backend``: reference | cpu | triton | auto (else ``DYNNET_KERNEL_BACKEND``).
    ``check_values=False`` skips the range check of ``route`` (one host sync on CUDA); out-of-range
    routes then give undefined rows (or a device fault) instead of a ValueError.
    """
    _validate(x, route, weight, bias, check_values)
    asked = _backend.requested(backend)
    path = _backend.resolve(backend, x.device)
    if path == "triton" and x.dtype not in TRITON_DTYPES:
        if asked == "triton":
            raise TypeError(f"x: the triton path supports float16, bfloat16 and float32, got {x.dtype}")
        path = "cpu"
    if path == "triton" and x.dtype == torch.bfloat16 and _backend.interpreting():
        raise TypeError("x: bfloat16 is not supported under TRITON_INTERPRET=1")
    if dispatch_free(x, route, weight, bias):  # plain eager inference: the op's body, no dispatcher
        return _run(x, route, weight, bias, path)
    return torch.ops.dynnet.routed_linear(x, route, weight, bias, path)
