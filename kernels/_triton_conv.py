"""Triton kernels behind ``sparse_conv2d`` and ``block_conv2d`` (imported only when the triton path runs).

One kernel, two row modes. Each program computes a ``BLOCK_M x BLOCK_N`` tile of output rows x output
channels of one group as an implicit GEMM over ``K = kh*kw*Cin/groups`` (``FLAT``: one loop over all
(tap, Cin chunk) steps, which lets the compiler pipeline the gathers across taps; otherwise the taps are
unrolled with a loop over Cin chunks inside each; the autotuner tries both):
- pixel mode: the rows are ``BLOCK_M`` consecutive entries of the list of active output positions,
  flattened across the batch (so tiles stay full even when each image has few active pixels);
- block mode: the rows are the ``B*B`` pixels of one active output block (split into tiles of at most
  128 rows); the halo is read straight from ``x``.
Input is read as NHWC (a gathered row is a contiguous channel vector) with zero padding by masked
loads; the result rows are stored straight into a zero NHWC output (the scatter is the epilogue).

No host sync: the active list is built with ``torch.nonzero_static`` (fixed size, padded with -1);
the grid is sized for the dense case and programs whose first entry is -1 exit at once. On CUDA the
tile shape is autotuned per layer shape on the first call (``DYNNET_TRITON_AUTOTUNE=0``: fixed tiles);
the interpreter uses fixed tiles.
Under ``TRITON_INTERPRET=1`` everything runs on the CPU (fp32 dots use ``input_precision="ieee"``;
no bf16, no pointers loaded from memory, no atomics). On CUDA, fp32 also uses "ieee" (exact, not
TF32), so results match ``F.conv2d`` closely; fp16/bf16 accumulate in fp32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import _backend
from kernels.sparse_conv import ConvGeometry

AUTOTUNE_ENV = "DYNNET_TRITON_AUTOTUNE"


@triton.jit
def _tap_step(
    x_ptr, w_ptr, acc, n, ho, wo, row_ok, ky, kx, k0, cols, n_ok,
    H, W, CIN, COUT, CIN_G, SH, SW, PH, PW, DH, DW, grp,
    KW: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """acc += rows' inputs at tap (ky, kx), channels k0..k0+BLOCK_K of the group @ those weight rows."""
    hi = ho * SH - PH + ky * DH
    wi = wo * SW - PW + kx * DW
    ok = row_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    x_row = ((n * H + hi) * W + wi).to(tl.int64) * CIN + grp * CIN_G
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < CIN_G
    a = tl.load(x_ptr + x_row[:, None] + offs_k[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
    w_row = ((ky * KW + kx) * CIN_G + offs_k).to(tl.int64) * COUT
    b = tl.load(w_ptr + w_row[:, None] + cols[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _conv_rows_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, list_ptr,
    TOTAL, H, W, CIN, HO, WO, COUT, CIN_G, COUT_G,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    FLAT: tl.constexpr,
):
    """One (rows x Cout tile x group) of the gathered implicit GEMM; ``list_ptr`` holds -1 past the end."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    grp = tl.program_id(2)
    if BLOCK == 0:  # pixel mode: rows from the active-position list
        first = pid_m * BLOCK_M
        if tl.load(list_ptr + first) < 0:
            return
        offs = first + tl.arange(0, BLOCK_M)
        pos = tl.load(list_ptr + offs, mask=offs < TOTAL, other=-1)
        row_ok = pos >= 0
        pos = tl.where(row_ok, pos, 0)
        n = pos // (HO * WO)
        rem = pos - n * (HO * WO)
        ho = rem // WO
        wo = rem - ho * WO
    else:  # block mode: rows are the pixels of one active block
        tiles: tl.constexpr = (BLOCK * BLOCK + BLOCK_M - 1) // BLOCK_M
        slot = pid_m // tiles
        blk = tl.load(list_ptr + slot)
        if blk < 0:
            return
        sub = pid_m - slot * tiles
        hb = (HO + BLOCK - 1) // BLOCK
        wb = (WO + BLOCK - 1) // BLOCK
        n = blk // (hb * wb)
        rem = blk - n * (hb * wb)
        by = rem // wb
        bx = rem - by * wb
        m = sub * BLOCK_M + tl.arange(0, BLOCK_M)
        ho = by * BLOCK + m // BLOCK
        wo = bx * BLOCK + m % BLOCK
        row_ok = (m < BLOCK * BLOCK) & (ho < HO) & (wo < WO)
        pos = (n * HO + ho) * WO + wo

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < COUT_G
    cols = grp * COUT_G + offs_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT:  # one loop over (tap, Cin chunk): the compiler can pipeline loads across taps
        n_k = tl.cdiv(CIN_G, BLOCK_K)
        for step in range(0, KH * KW * n_k):
            tap = step // n_k
            k0 = (step - tap * n_k) * BLOCK_K
            ky = tap // KW
            kx = tap - ky * KW
            acc = _tap_step(x_ptr, w_ptr, acc, n, ho, wo, row_ok, ky, kx, k0, cols, n_ok,
                            H, W, CIN, COUT, CIN_G, SH, SW, PH, PW, DH, DW, grp, KW, BLOCK_K, PRECISION)
    else:  # taps unrolled, a loop over Cin chunks inside each
        for ky in tl.static_range(KH):
            for kx in tl.static_range(KW):
                for k0 in range(0, CIN_G, BLOCK_K):
                    acc = _tap_step(x_ptr, w_ptr, acc, n, ho, wo, row_ok, ky, kx, k0, cols, n_ok,
                                    H, W, CIN, COUT, CIN_G, SH, SW, PH, PW, DH, DW, grp, KW, BLOCK_K, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_off = pos.to(tl.int64)[:, None] * COUT + cols[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


# Tile shapes tried by the autotuner on CUDA (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), each with both
# loop structures (FLAT). Re-running the kernel is harmless (it stores the same values), so tuning needs
# no reset of the output.
_CONFIGS = [(32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3)]
FIXED_FLAT = True  # loop structure of the fixed tiles (interpreter, DYNNET_TRITON_AUTOTUNE=0)
_TUNED: list = []


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    """Drop tiles much wider than the layer (Cout/groups) or taller than one block; keep at least one."""
    cout_g, block = named_args["COUT_G"], kwargs.get("BLOCK", named_args.get("BLOCK", 0))
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(cout_g))
        and (not block or c.kwargs["BLOCK_M"] <= max(32, triton.next_power_of_2(block * block)))
    ]
    return kept or configs[:1]


def _tuned_kernel():
    """The autotuned kernel (built on first use on CUDA; the interpreter uses fixed tiles instead)."""
    if not _TUNED:
        configs = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "FLAT": flat}, num_warps=w, num_stages=s)
            for m, n, k, w, s in _CONFIGS for flat in (False, True)
        ]
        key = ["TOTAL", "H", "W", "CIN", "COUT", "CIN_G", "COUT_G", "SH", "DH"]
        tuner = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune})
        _TUNED.append(tuner(_conv_rows_kernel))
    return _TUNED[0]


def autotune_enabled(device: torch.device) -> bool:
    """Autotune on CUDA unless ``DYNNET_TRITON_AUTOTUNE=0`` (fixed tiles then, as under the interpreter)."""
    return device.type == "cuda" and not _backend.interpreting() and os.environ.get(AUTOTUNE_ENV, "1") != "0"


def _pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, v))))


def _active_list(flags: Tensor) -> Tensor:
    """Flat indices of the true entries of ``flags`` (int32), padded with -1 to full length; no host sync."""
    flat = flags.reshape(-1)
    return torch.nonzero_static(flat, size=flat.numel(), fill_value=-1).reshape(-1).to(torch.int32)


def _launch(x: Tensor, weight: Tensor, bias: Tensor | None, g: ConvGeometry, rows: Tensor, block_size: int) -> Tensor:
    """Run the kernel; returns the ``(N, Cout, Hout, Wout)`` result in channels_last memory."""
    if _backend.interpreting() and x.dtype == torch.bfloat16:
        raise TypeError("x: bfloat16 is not supported by the Triton interpreter (TRITON_INTERPRET=1)")
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    w_kkcc = weight.permute(2, 3, 1, 0).contiguous()  # (kh, kw, Cin/groups, Cout): Cout contiguous
    out = torch.zeros(g.batch, g.out_height, g.out_width, g.out_channels, dtype=x.dtype, device=x.device)
    cin_g, cout_g = g.in_channels // g.groups, g.out_channels // g.groups
    total = rows.numel()

    def grid(meta: dict) -> tuple[int, int, int]:
        if block_size == 0:
            grid_m = triton.cdiv(total, meta["BLOCK_M"])
        else:
            grid_m = total * triton.cdiv(block_size * block_size, meta["BLOCK_M"])
        return (grid_m, triton.cdiv(cout_g, meta["BLOCK_N"]), g.groups)

    args = (
        x_nhwc, w_kkcc, bias if bias is not None else w_kkcc, out, rows,
        total, g.height, g.width, g.in_channels, g.out_height, g.out_width, g.out_channels, cin_g, cout_g,
        g.stride[0], g.stride[1], g.padding[0], g.padding[1], g.dilation[0], g.dilation[1],
    )
    consts = dict(
        KH=g.kernel[0], KW=g.kernel[1], BLOCK=block_size, HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    if autotune_enabled(x.device):
        _tuned_kernel()[grid](*args, **consts)
    else:
        small = _backend.interpreting()  # fewer, smaller programs keep the interpreter fast
        tiles = dict(BLOCK_M=_pow2(block_size * block_size, 16, 64) if block_size else (32 if small else 64),
                     BLOCK_N=_pow2(cout_g, 16, 64 if small else 128), BLOCK_K=_pow2(cin_g, 16, 64), FLAT=FIXED_FLAT)
        _conv_rows_kernel[grid](*args, **consts, **tiles, **({} if small else dict(num_warps=4, num_stages=3)))
    return out.permute(0, 3, 1, 2)


def sparse_conv2d_triton(x: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None, g: ConvGeometry) -> Tensor:
    """Triton path of ``sparse_conv2d`` (no host sync); result in channels_last memory."""
    return _launch(x, weight, bias, g, _active_list(mask), 0)


def block_conv2d_triton(
    x: Tensor, block_mask: Tensor, weight: Tensor, bias: Tensor | None, g: ConvGeometry, block_size: int
) -> Tensor:
    """Triton path of ``block_conv2d`` (no host sync); result in channels_last memory."""
    return _launch(x, weight, bias, g, _active_list(block_mask), block_size)
