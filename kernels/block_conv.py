"""Block-sparse 2-D convolution (SBNet / SegBlocks style): compute only the output blocks a mask selects.

``block_conv2d(x, block_mask, weight, ..., block_size=B)`` equals ``F.conv2d(...)`` inside the active
``B x B`` output blocks (``block_mask`` bool ``(N, ceil(Hout/B), ceil(Wout/B))``; partial blocks at the
bottom/right border included) and exactly 0 elsewhere.

Paths (``kernels._backend``):
- ``reference`` / ``dense``: the dense conv, then zero outside the active blocks (counted dense; the
  ``dense`` fallback of ``auto`` zeroes through ``sparse_conv.zero_outside``).
- ``cpu`` (``CPU_ROUTE``): ``im2col`` runs sparse_conv2d's gather-GEMM-scatter over the pixels of the
  active blocks (border blocks clipped, so exactly the counted MACs run); ``windows`` gathers each
  active block's input window with its halo (NHWC rows of a zero-bordered copy of ``x``), runs
  ``F.conv2d(padding=0)`` on the stacked windows and scatters the output blocks (outputs past the
  border land in a dump row that is dropped; that clipped-away work is not counted).
- ``triton``: one program per (active block, Cout tile): an implicit GEMM with ``M = B*B`` rows whose
  halo is read straight from ``x``; the active-block list is compacted on the device.

The MAC formula counts every output position inside an active block, clipped at the border
(``block_conv2d_macs``), or the dense MACs for ``reference``/``dense``.

``reduce_mask`` turns a pixel mask into a block mask (SBNet's ``reduce_mask``: max- or avg-pool per
block, then a threshold).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from kernels import _backend, _plans, sparse_conv
from kernels._backend import dispatch_free
from kernels._checks import check_bool_mask, check_device, check_int, check_tensor
from kernels.sparse_conv import (
    ConvGeometry,
    _geometry,
    check_conv_args,
    conv2d_macs,
    cpu_break_even,
    cpu_sparse_conv,
    fused_applies,
    fused_route,
    masked_conv_backward,
    output_format,
    padded_extent,
    padded_nhwc,
    planned_path,
    scratch,
    zero_outside,
)

# Executed density (positions inside active blocks) above which ``auto`` runs the dense conv instead,
# measured like SPARSE_CONV2D_BREAK_EVEN (cpu: crossing at ~0.36-0.5 depending on layout; cuda:
# the Triton path never beat cuDNN on an H200 at the measured sizes).
BLOCK_CONV2D_BREAK_EVEN = {"cpu": 0.4, "cuda": 0.0}

# CPU route: "im2col" runs sparse_conv2d's gather-GEMM-scatter on the pixels of the active blocks;
# "windows" gathers each block's halo window and runs F.conv2d(padding=0) on the stacked windows;
# "auto": im2col wherever sparse_conv2d's fused native kernel serves it (any layout); otherwise
# windows for channels_last inputs (NHWC rows gather cheaply), im2col for NCHW inputs (no
# transposes). Chosen from 1-thread CPU-time measurements on the development machine.
CPU_ROUTE = "auto"


def block_grid(out_height: int, out_width: int, block_size: int) -> tuple[int, int]:
    """Blocks along each axis: ``(ceil(Hout/B), ceil(Wout/B))``."""
    return -(-out_height // block_size), -(-out_width // block_size)


def block_positions(block_mask: Tensor, out_height: int, out_width: int, block_size: int) -> Tensor:
    """Output positions inside active blocks, clipped at the border, per sample: ``(N,)`` int64."""
    hb, wb = block_mask.shape[-2:]
    start_h = torch.arange(hb, device=block_mask.device) * block_size
    start_w = torch.arange(wb, device=block_mask.device) * block_size
    rows = (out_height - start_h).clamp(max=block_size)
    cols = (out_width - start_w).clamp(max=block_size)
    return (block_mask.to(torch.int64) * rows[:, None] * cols[None, :]).sum(dim=(-2, -1))


def block_conv2d_macs(
    block_mask: Tensor, out_size: tuple[int, int], block_size: int, weight_shape: Sequence[int]
) -> int:
    """MACs of the sparse paths: output positions in active blocks (clipped) x Cout x Cin/g x kh x kw."""
    positions = int(block_positions(block_mask, out_size[0], out_size[1], block_size).sum())
    cout, cin_g, kh, kw = (int(s) for s in weight_shape)
    return positions * cout * cin_g * kh * kw


def expand_block_mask(block_mask: Tensor, out_height: int, out_width: int, block_size: int) -> Tensor:
    """Pixel mask ``(N, Hout, Wout)`` of a block mask ``(N, Hb, Wb)`` (border blocks clipped)."""
    pixels = block_mask.repeat_interleave(block_size, dim=1).repeat_interleave(block_size, dim=2)
    return pixels[:, :out_height, :out_width]


def reduce_mask(mask: Tensor, block_size: int, tol: float = 0.0, mode: str = "max") -> Tensor:
    """Block mask of a pixel mask (SBNet's ``reduce_mask``): a block is active if its pooled value > tol.

    mask ``(N, H, W)`` bool or float in [0, 1]; ``mode`` max | avg (avg over the pixels inside the
    image, so border blocks are not diluted). Returns bool ``(N, ceil(H/B), ceil(W/B))``.
    """
    check_tensor("mask", mask, ndim=3)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"mask: expected a bool or floating tensor, got {mask.dtype}")
    check_int("block_size", block_size, minimum=1)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 <= tol < 1.0:
        raise ValueError(f"tol: expected a number in [0, 1), got {tol!r}")
    if mode not in ("max", "avg"):
        raise ValueError(f"mode: expected 'max' or 'avg', got {mode!r}")
    n, h, w = mask.shape
    hb, wb = block_grid(h, w, block_size)
    m = F.pad(mask.float(), (0, wb * block_size - w, 0, hb * block_size - h))
    blocks = m.view(n, hb, block_size, wb, block_size)
    if mode == "max":
        pooled = blocks.amax(dim=(2, 4))
    else:
        inside = F.pad(mask.new_ones(1, h, w, dtype=torch.float32), (0, wb * block_size - w, 0, hb * block_size - h))
        pooled = blocks.sum(dim=(2, 4)) / inside.view(1, hb, block_size, wb, block_size).sum(dim=(2, 4))
    return pooled > tol


# --------------------------------------------------------------------------------------------------
# CPU path


def _window_rows(g: ConvGeometry, block_size: int) -> tuple[int, int, int, int]:
    """Input window of one output block ``(win_h, win_w)`` and the padded input extent ``(rows, cols)``."""
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.stride, g.dilation
    hb, wb = block_grid(g.out_height, g.out_width, block_size)
    win_h, win_w = (block_size - 1) * sh + (kh - 1) * dh + 1, (block_size - 1) * sw + (kw - 1) * dw + 1
    rows, cols = padded_extent(g, hb * block_size, wb * block_size)
    return win_h, win_w, rows, cols


@lru_cache(maxsize=64)
def _window_table(g: ConvGeometry, block_size: int, device: torch.device) -> Tensor:
    """Padded-input row of every window pixel of every block: ``(N*Hb*Wb, win_h*win_w)`` int64."""
    win_h, win_w, rows, cols = _window_rows(g, block_size)
    hb, wb = block_grid(g.out_height, g.out_width, block_size)
    (sh, sw) = g.stride
    n = torch.arange(g.batch, device=device).view(-1, 1, 1, 1, 1)
    by = torch.arange(hb, device=device).view(1, -1, 1, 1, 1)
    bx = torch.arange(wb, device=device).view(1, 1, -1, 1, 1)
    iy = torch.arange(win_h, device=device).view(1, 1, 1, -1, 1)
    ix = torch.arange(win_w, device=device).view(1, 1, 1, 1, -1)
    table = (n * rows + by * block_size * sh + iy) * cols + bx * block_size * sw + ix
    return table.reshape(g.batch * hb * wb, win_h * win_w)


@lru_cache(maxsize=64)
def _block_dest_table(g: ConvGeometry, block_size: int, device: torch.device) -> Tensor:
    """Flat output row of every pixel of every block, ``N*Hout*Wout`` (a dump row) past the border."""
    hb, wb = block_grid(g.out_height, g.out_width, block_size)
    n = torch.arange(g.batch, device=device).view(-1, 1, 1, 1, 1)
    ho = (torch.arange(hb, device=device) * block_size).view(1, -1, 1, 1, 1) + torch.arange(
        block_size, device=device
    ).view(1, 1, 1, -1, 1)
    wo = (torch.arange(wb, device=device) * block_size).view(1, 1, -1, 1, 1) + torch.arange(
        block_size, device=device
    ).view(1, 1, 1, 1, -1)
    dest = (n * g.out_height + ho) * g.out_width + wo
    dump = g.batch * g.out_height * g.out_width
    dest = torch.where((ho < g.out_height) & (wo < g.out_width), dest, dump)
    return dest.reshape(g.batch * hb * wb, block_size * block_size)


def _cpu_block_route(x: Tensor, weight: Tensor, groups: int, fused: bool | None = None) -> str:
    """The CPU route that runs: ``CPU_ROUTE``; ``auto``: im2col where sparse_conv2d's fused kernel serves
    it (any layout), else windows for channels_last and im2col for NCHW. ``fused``: ``fused_applies``
    where the caller has it already."""
    if CPU_ROUTE != "auto":
        return CPU_ROUTE
    if fused_applies(x, weight, groups) if fused is None else fused:
        return "im2col"
    return "windows" if output_format(x) == torch.channels_last else "im2col"


def block_break_even(x: Tensor, weight: Tensor, groups: int, fused: bool | None = None, dense_macs: int = 0) -> float:
    """``auto``'s break-even density for these arguments: the fused kernel's (by ``dense_macs``, the dense
    conv's MACs) where the im2col route runs it, else the per-device value of ``BLOCK_CONV2D_BREAK_EVEN``."""
    if x.is_cpu and _cpu_block_route(x, weight, groups, fused) == "im2col":
        return cpu_break_even(x, weight, groups, BLOCK_CONV2D_BREAK_EVEN, fused, dense_macs)
    return BLOCK_CONV2D_BREAK_EVEN.get(x.device.type, 1.0)


def _cpu_block_conv(
    x: Tensor, block_mask: Tensor, weight: Tensor, bias: Tensor | None, g: ConvGeometry, block_size: int,
    fused: bool | None = None,
) -> Tensor:
    if fused is None:
        fused = fused_applies(x, weight, g.groups)
    if _cpu_block_route(x, weight, g.groups, fused) == "im2col":
        if fused:
            out = fused_route(x, block_mask, weight, bias, g, block_size)
            if out is not None:
                return out
        pixels = expand_block_mask(block_mask, g.out_height, g.out_width, block_size)
        return cpu_sparse_conv(x, pixels, weight, bias, g, fused)
    return _cpu_block_conv_windows(x, block_mask, weight, bias, g, block_size)


def _cpu_block_conv_windows(
    x: Tensor, block_mask: Tensor, weight: Tensor, bias: Tensor | None, g: ConvGeometry, block_size: int
) -> Tensor:
    fmt = output_format(x)
    blocks = block_mask.reshape(-1).nonzero().squeeze(1)
    nb = blocks.numel()
    positions = g.batch * g.out_height * g.out_width
    if nb == 0:
        return x.new_zeros(g.batch, g.out_channels, g.out_height, g.out_width).contiguous(memory_format=fmt)
    win_h, win_w, rows, cols = _window_rows(g, block_size)
    xp = padded_nhwc(x, g.padding[0], g.padding[1], rows, cols).reshape(-1, g.in_channels)
    index = _window_table(g, block_size, x.device).index_select(0, blocks).reshape(-1)
    windows = scratch("windows", index.numel() * g.in_channels, x.dtype, x.device).view(-1, g.in_channels)
    torch.index_select(xp, 0, index, out=windows)
    windows = windows.view(nb, win_h, win_w, g.in_channels).permute(0, 3, 1, 2)
    y = F.conv2d(windows, weight, bias, g.stride, 0, g.dilation, g.groups)  # (nb, Cout, B, B)
    dest = _block_dest_table(g, block_size, x.device).index_select(0, blocks).reshape(-1)
    out = x.new_zeros(positions + 1, g.out_channels)
    out.index_copy_(0, dest, y.permute(0, 2, 3, 1).reshape(-1, g.out_channels))
    out = out[:positions].view(g.batch, g.out_height, g.out_width, g.out_channels).permute(0, 3, 1, 2)
    return out.contiguous(memory_format=fmt)


def _dense_block_masked(
    x: Tensor, block_mask: Tensor, weight: Tensor, bias: Tensor | None, g: ConvGeometry, block_size: int,
    exact: bool,
) -> Tensor:
    out = F.conv2d(x, weight, bias, g.stride, g.padding, g.dilation, g.groups)
    pixels = expand_block_mask(block_mask, g.out_height, g.out_width, block_size)
    return zero_outside(out, pixels, exact).contiguous(memory_format=output_format(x))


# --------------------------------------------------------------------------------------------------
# The custom op


def _block_conv2d_impl(
    x: Tensor, block_mask: Tensor, weight: Tensor, bias: Tensor | None, g: ConvGeometry, block_size: int, path: str,
    fused: bool | None = None,
) -> Tensor:
    """The op's body; ``fused``: ``fused_applies(x, weight, g.groups)`` where the wrapper has it already."""
    if path in ("reference", "dense"):
        return _dense_block_masked(x, block_mask, weight, bias, g, block_size, exact=path == "reference")
    if path == "cpu":
        return _cpu_block_conv(x, block_mask, weight, bias, g, block_size, fused)
    if path == "triton":
        from kernels._triton_conv import block_conv2d_triton  # noqa: PLC0415 - Triton only when used

        out = block_conv2d_triton(x, block_mask, weight, bias, g, block_size)
        return out.contiguous(memory_format=output_format(x))
    raise ValueError(f"path: unknown resolved path {path!r}; expected one of {', '.join(_backend.RESOLVED)}")


@torch.library.custom_op("dynnet::block_conv2d", mutates_args=())
def _block_conv2d_op(
    x: Tensor,
    block_mask: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    block_size: int,
    path: str,
) -> Tensor:
    """The op behind ``block_conv2d``; ``path`` is the resolved backend name."""
    g = _geometry(x, weight, stride, padding, dilation, groups)
    return _block_conv2d_impl(x, block_mask, weight, bias, g, block_size, path)


@_block_conv2d_op.register_fake
def _(x, block_mask, weight, bias, stride, padding, dilation, groups, block_size, path):
    g = _geometry(x, weight, stride, padding, dilation, groups)
    shape = (g.batch, g.out_channels, g.out_height, g.out_width)
    return x.new_empty(shape).contiguous(memory_format=output_format(x))


def _setup_context(ctx, inputs, output) -> None:
    x, block_mask, weight, bias, stride, padding, dilation, groups, block_size, _path = inputs
    ctx.save_for_backward(x, weight, block_mask)
    ctx.has_bias = bias is not None
    ctx.stride, ctx.padding, ctx.dilation, ctx.groups = list(stride), list(padding), list(dilation), groups
    ctx.block_size = block_size
    ctx.out_size = tuple(output.shape[-2:])


def _backward(ctx, grad: Tensor):
    pixels = expand_block_mask(ctx.saved_tensors[2], ctx.out_size[0], ctx.out_size[1], ctx.block_size)
    gx, gw, gb = masked_conv_backward(ctx, grad, pixels)
    return gx, None, gw, gb, None, None, None, None, None, None


_block_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.dynnet.block_conv2d, get_raw=True)
def _block_conv2d_flops(
    x, block_mask, weight, bias, stride, padding, dilation, groups, block_size, path, out_val=None
) -> int:
    """FLOPs (2 x MACs) of what the path executed: clipped active blocks, or dense for reference/dense."""
    out_h, out_w = out_val.shape[-2:]
    if path in ("reference", "dense"):
        return 2 * conv2d_macs(x.shape[0], out_h, out_w, weight.shape)
    return 2 * block_conv2d_macs(block_mask, (out_h, out_w), block_size, weight.shape)


# --------------------------------------------------------------------------------------------------
# Public wrapper


def block_conv2d(
    x: Tensor,
    block_mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    block_size: int = 8,
    backend: str | None = None,
) -> Tensor:
    """``F.conv2d`` inside the active ``block_size`` x ``block_size`` output blocks, exactly 0 elsewhere.

    x ``(N, Cin, H, W)``; block_mask bool ``(N, ceil(Hout/B), ceil(Wout/B))``; weight
    ``(Cout, Cin/groups, kh, kw)``; bias ``(Cout,)`` or None. Returns ``(N, Cout, Hout, Wout)``
    (channels_last if ``x`` is). ``backend``: reference | cpu | triton | auto.
    """
    key = _plans.signature(
        (x, block_mask, weight, bias, stride, padding, dilation, groups, block_size, backend),
        (CPU_ROUTE, sparse_conv.CPU_ROUTE, sparse_conv.FUSED_BREAK_EVEN, sparse_conv.FUSED_LARGE_BREAK_EVEN,
         sparse_conv.FUSED_LARGE_MACS, tuple(BLOCK_CONV2D_BREAK_EVEN.items()),
         output_format(x) if isinstance(x, Tensor) else None),  # (the route outside the fused kernel: layout)
    )
    plan = _plans.get(key)
    if plan is None:
        plan = _plans.store(key, _block_plan(x, block_mask, weight, bias, stride, padding, dilation, groups,
                                             block_size, backend))
    g, fused, name, break_even, path = plan
    if path is None:  # auto's dense fallback: a function of the executed fraction of this mask
        positions = block_positions(block_mask, g.out_height, g.out_width, block_size).sum()
        path = _backend.resolve(name, x.device, float(positions) / (g.batch * g.out_height * g.out_width), break_even)
    if dispatch_free(x, block_mask, weight, bias):
        return _block_conv2d_impl(x, block_mask, weight, bias, g, block_size, path, fused)
    return torch.ops.dynnet.block_conv2d(
        x, block_mask, weight, bias, list(g.stride), list(g.padding), list(g.dilation), g.groups, block_size, path
    )


def _block_plan(x: object, block_mask: object, weight: object, bias: object, stride: object, padding: object,
                dilation: object, groups: object, block_size: object, backend: str | None) -> tuple:
    """Validate a ``block_conv2d`` call (errors name the argument) and choose its path:
    ``(geometry, fused, backend name, break-even, path)``; path None where ``auto``'s dense fallback
    depends on the mask. A pure function of the call's signature (``kernels._plans``)."""
    g = check_conv_args(x, weight, bias, stride, padding, dilation, groups)
    assert isinstance(x, Tensor) and isinstance(weight, Tensor)
    block_size = check_int("block_size", block_size, minimum=1)
    hb, wb = block_grid(g.out_height, g.out_width, block_size)
    check_bool_mask("block_mask", block_mask, (g.batch, hb, wb), f"the conv output in {block_size}x{block_size} blocks")
    assert isinstance(block_mask, Tensor)
    if block_mask.device != x.device:
        check_device("block_mask", block_mask, x.device)
    name = _backend.requested(backend)
    fused = fused_applies(x, weight, g.groups)
    macs = conv2d_macs(g.batch, g.out_height, g.out_width, weight.shape)
    break_even = block_break_even(x, weight, g.groups, fused, macs) if name == "auto" else 1.0
    return g, fused, name, break_even, planned_path(name, x.device, break_even)
