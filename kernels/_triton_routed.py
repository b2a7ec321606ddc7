"""Triton grouped GEMM for ``routed_linear`` (imported only when the triton path runs).

Design (reference notes, section (b) design 5):

- rows are sorted by expert on the device (``torch.sort``, stable) and ``offsets (E+1,)`` gives each
  expert's slice of the sorted rows (``searchsorted``); no host sync, no padded copies;
- every expert's slice is cut into tiles of ``BLOCK_M`` rows (the last one padded by masking); a
  program finds its ``(expert, row_start)`` from the per-expert tile counts (a cumulative sum over at
  most ``E_PAD`` experts in registers), so the tile table is built on the device inside the kernel;
- the grid is an upper bound ``cdiv(T, BLOCK_M) + min(E, T)`` tiles, programs past the last tile exit;
- the weights stay stacked behind one base pointer ``W[E, Cout, Cin]`` (any strides): no pointer
  arrays, so the kernel runs under ``TRITON_INTERPRET=1``;
- the row gather of ``x`` happens in the operand loads and the scatter back in the epilogue;
- fp32 accumulation; fp32 inputs use TF32 only where ``torch.get_float32_matmul_precision()`` allows
  it on CUDA (``ieee`` in the interpreter).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._backend import interpreting


@triton.jit
def _routed_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, order_ptr, offsets_ptr,
    N, K, E,
    stride_xt, stride_xk,
    stride_we, stride_wn, stride_wk,
    stride_be, stride_bn,
    stride_yt, stride_yn,
    HAS_BIAS: tl.constexpr,
    E_PAD: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # tile table: tile -> (expert, row_start), from the per-expert offsets
    experts = tl.arange(0, E_PAD)
    begin = tl.load(offsets_ptr + experts, mask=experts < E, other=0).to(tl.int32)
    end = tl.load(offsets_ptr + experts + 1, mask=experts < E, other=0).to(tl.int32)
    tiles = (end - begin + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), 0)
    if expert >= E:
        return
    mine = experts == expert
    row_begin = tl.sum(tl.where(mine, begin, 0), 0)
    row_end = tl.sum(tl.where(mine, end, 0), 0)
    first_tile = tl.sum(tl.where(mine, tiles_end - tiles, 0), 0)

    rows = row_begin + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    token = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = x_ptr + token[:, None] * stride_xt + ks[None, :].to(tl.int64) * stride_xk
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    b_ptrs = w_base + cols[None, :].to(tl.int64) * stride_wn + ks[:, None].to(tl.int64) * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + ks) < K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        bias = tl.load(b_ptr + expert.to(tl.int64) * stride_be + cols * stride_bn, mask=col_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + token[:, None] * stride_yt + cols[None, :].to(tl.int64) * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# Opt-in autotuning (DYNNET_ROUTED_AUTOTUNE=1): every new (N, K, BLOCK_M) compiles and times each config,
# which costs seconds per shape; the default is the heuristic config below.
_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=5),
]
_autotuned = triton.autotune(configs=_CONFIGS, key=["N", "K", "BLOCK_M"])(_routed_kernel)

# Fixed tiny tiles in the interpreter: tl.dot needs >= 16 per side; autotuning there is meaningless.
_INTERPRETER = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


def block_m_for(tokens: int, experts: int) -> int:
    """Rows per tile: 128 when experts get >= 128 rows on average, else 64 (padding waste vs reuse)."""
    return 128 if tokens >= 128 * experts else 64


def launch_config(tokens: int, experts: int, dtype: torch.dtype) -> dict:
    """Heuristic tiles for Hopper/Ampere: a pure function of the problem (no device query)."""
    block_m = block_m_for(tokens, experts)
    block_k = 32 if dtype == torch.float32 else 64
    return {
        "BLOCK_M": block_m, "BLOCK_N": 128, "BLOCK_K": block_k,
        "num_warps": 8 if block_m == 128 else 4, "num_stages": 3 if block_m == 128 else 4,
    }


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not interpreting() and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def routing_offsets(route: Tensor, experts: int) -> tuple[Tensor, Tensor]:
    """Stable row order by expert ``(T,)`` int64 and each expert's slice ``offsets (E+1,)`` int64."""
    sorted_route, order = torch.sort(route, stable=True)
    bounds = torch.arange(experts + 1, device=route.device, dtype=route.dtype)
    return order, torch.searchsorted(sorted_route, bounds)


def routed_linear(
    x: Tensor, route: Tensor, weight: Tensor, bias: Tensor | None, routing: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """x (T, Cin), route (T,), weight (E, Cout, Cin), bias (E, Cout) or None -> (T, Cout), dtype of x.

    ``routing``: a precomputed ``routing_offsets(route, E)`` (e.g. shared by the two GEMMs of an MoE
    MLP); computed here otherwise.
    """
    tokens, in_features = x.shape
    experts, out_features = weight.shape[0], weight.shape[1]
    y = x.new_empty(tokens, out_features)
    if tokens == 0 or out_features == 0:
        return y
    if in_features == 0:
        return y.copy_(bias.index_select(0, route.long())) if bias is not None else y.zero_()
    order, offsets = routing if routing is not None else routing_offsets(route, experts)
    b = bias if bias is not None else weight  # placeholder pointer, never read without HAS_BIAS
    b_strides = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)
    args = (
        x, weight, b, y, order, offsets,
        out_features, in_features, experts,
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1), weight.stride(2),
        *b_strides,
        y.stride(0), y.stride(1),
    )
    flags = dict(HAS_BIAS=bias is not None, E_PAD=triton.next_power_of_2(experts), PRECISION=_precision(x.dtype))
    if interpreting():
        cfg = dict(_INTERPRETER)
    elif os.environ.get("DYNNET_ROUTED_AUTOTUNE", "0") == "1":
        block_m = block_m_for(tokens, experts)
        n_tiles = triton.cdiv(tokens, block_m) + min(experts, tokens)

        def grid(meta):
            return (n_tiles, triton.cdiv(out_features, meta["BLOCK_N"]))

        _autotuned[grid](*args, **flags, EVEN_K=in_features % 64 == 0, BLOCK_M=block_m)
        return y
    else:
        cfg = launch_config(tokens, experts, x.dtype)
    grid = (triton.cdiv(tokens, cfg["BLOCK_M"]) + min(experts, tokens), triton.cdiv(out_features, cfg["BLOCK_N"]))
    _routed_kernel[grid](*args, **flags, EVEN_K=in_features % cfg["BLOCK_K"] == 0, **cfg)
    return y
