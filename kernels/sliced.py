"""Channel-sliced conv/linear (DS-Net style dynamic width): per-sample prefix widths, no weight copies.

Sample ``n`` uses the input channels ``[:in_width[n]]`` and the weight prefix
``weight[:out_width[n], :in_width[n]]``; its output channels ``>= out_width[n]`` are 0 and its inputs
beyond ``in_width[n]`` are ignored (never read, so even NaN there cannot leak).

Paths:

- ``reference``: masking (zero the ignored inputs, run the full dense op on every sample, zero the
  outputs past the width); the oracle, counted as the dense MACs it executes;
- ``cpu`` (and ``triton``: there is no Triton kernel, the same torch path runs on CUDA): samples with
  equal ``(in, out)`` widths form one group; one ``conv2d``/``linear`` per group on the weight view
  ``weight[:o, :i]`` (a view, not a copy; the backend library may still repack it), written into a
  zero output. A batch of one width is a single call on the slice ``x[:, :i]``.

Supported convs: ``groups=1`` and depthwise (``groups == Cin == Cout``, weight ``(C, 1, kh, kw)``) with
``in_width == out_width`` per sample. Widths are host values (the grouping needs them): CUDA width
tensors are copied to the CPU (one sync).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from kernels import _backend
from kernels._backend import dispatch_free
from kernels._checks import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_pair,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)

Group = tuple[int, int, Tensor | None]  # (in width, out width, sample indices or None for all)


def width_groups(in_width: Tensor, out_width: Tensor) -> list[Group]:
    """Samples grouped by equal ``(in, out)`` width; indices are None when one group holds everything."""
    if in_width.numel() == 0:
        return []
    key = in_width.long() * (int(out_width.max()) + 1) + out_width.long()
    order = torch.argsort(key, stable=True)
    keys, counts = torch.unique_consecutive(key[order], return_counts=True)
    if keys.numel() == 1:
        return [(int(in_width[0]), int(out_width[0]), None)]
    groups, start = [], 0
    for n in counts.tolist():
        first = int(order[start])
        groups.append((int(in_width[first]), int(out_width[first]), order[start : start + n]))
        start += n
    return groups


def sliced_linear_macs(in_width: Sequence[int] | Tensor, out_width: Sequence[int] | Tensor) -> int:
    """Sum over samples of ``in_width[n] x out_width[n]``."""
    ins = in_width.tolist() if isinstance(in_width, Tensor) else list(in_width)
    outs = out_width.tolist() if isinstance(out_width, Tensor) else list(out_width)
    return sum(int(i) * int(o) for i, o in zip(ins, outs, strict=True))


def sliced_conv2d_macs(
    in_width: Sequence[int] | Tensor,
    out_width: Sequence[int] | Tensor,
    kernel_size: tuple[int, int],
    out_size: tuple[int, int],
    depthwise: bool = False,
) -> int:
    """Sum over samples of ``o x (1 if depthwise else i) x kh x kw x Hout x Wout``."""
    outs = out_width.tolist() if isinstance(out_width, Tensor) else list(out_width)
    per_position = kernel_size[0] * kernel_size[1] * out_size[0] * out_size[1]
    if depthwise:
        return sum(int(o) for o in outs) * per_position
    return sliced_linear_macs(in_width, out_width) * per_position


def _conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _channel_mask(width: Tensor, channels: int, device: torch.device) -> Tensor:
    """(N, channels) bool, true below each sample's width."""
    return torch.arange(channels, device=device).unsqueeze(0) < width.to(device).unsqueeze(1)


def _select(x: Tensor, rows: Tensor | None, width: int) -> Tensor:
    return x[:, :width] if rows is None else x[rows.to(x.device), :width]


# ---------------------------------------------------------------- sliced_linear
def _linear_forward(x, in_width, out_width, weight, bias, path: str) -> Tensor:
    if path == "reference":
        x_in = torch.where(_channel_mask(in_width, x.shape[1], x.device), x, 0)
        y = F.linear(x_in, weight, bias)
        return torch.where(_channel_mask(out_width, weight.shape[0], x.device), y, 0)
    out = x.new_zeros(x.shape[0], weight.shape[0])
    for i, o, rows in width_groups(in_width, out_width):
        y = F.linear(_select(x, rows, i), weight[:o, :i], None if bias is None else bias[:o])
        if rows is None:
            out[:, :o] = y
        else:
            out[rows.to(x.device), :o] = y
    return out


@torch.library.custom_op("dynnet::sliced_linear", mutates_args=())
def _sliced_linear_op(
    x: Tensor, in_width: Tensor, out_width: Tensor, weight: Tensor, bias: Tensor | None, path: str
) -> Tensor:
    """x (N, Cin), widths (N,), weight (Cout, Cin), bias (Cout,) or None -> (N, Cout)."""
    return _linear_forward(x, in_width, out_width, weight, bias, path)


@_sliced_linear_op.register_fake
def _(x, in_width, out_width, weight, bias, path):
    return x.new_empty(x.shape[0], weight.shape[0])


def _linear_setup(ctx, inputs, output) -> None:
    x, in_width, out_width, weight, bias, path = inputs
    ctx.save_for_backward(x, in_width, out_width, weight, bias)
    ctx.path = path


def _linear_backward(ctx, grad: Tensor):
    x, in_width, out_width, weight, bias = ctx.saved_tensors
    if ctx.path == "reference":
        return _recompute_grads(_linear_forward, (x, in_width, out_width, weight, bias), grad, ctx.path)
    grad_x, grad_w = torch.zeros_like(x), torch.zeros_like(weight)
    grad_b = None if bias is None else torch.zeros_like(bias)
    for i, o, rows in width_groups(in_width, out_width):
        g = _select(grad, rows, o)
        gx = g @ weight[:o, :i]
        if rows is None:
            grad_x[:, :i] = gx
        else:
            grad_x[rows.to(x.device), :i] = gx
        grad_w[:o, :i] += g.t() @ _select(x, rows, i)
        if grad_b is not None:
            grad_b[:o] += g.sum(0)
    return grad_x, None, None, grad_w, grad_b, None


def _recompute_grads(forward, inputs: tuple, grad: Tensor, path: str, *extra) -> tuple:
    """Gradients of the reference (masking) path: re-run it under autograd, take the VJP."""
    x, in_width, out_width, weight, bias = inputs
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
    with torch.enable_grad():
        out = forward(leaves[0], in_width, out_width, leaves[1], leaves[2], *extra, path)
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, wanted, grad))
    gx, gw = next(grads), next(grads)
    gb = next(grads) if bias is not None else None
    return (gx, None, None, gw, gb, *([None] * len(extra)), None)


_sliced_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


@register_flop_formula(torch.ops.dynnet.sliced_linear, get_raw=True)
def _sliced_linear_flops(x, in_width, out_width, weight, bias=None, path="cpu", *args, out_val=None, **kw) -> int:
    """2 x executed MACs: the per-sample slices, or the full dense layer on the reference path."""
    if path == "reference":
        return 2 * x.shape[0] * weight.shape[0] * weight.shape[1]
    return 2 * sliced_linear_macs(in_width, out_width)


# ---------------------------------------------------------------- sliced_conv2d
def _conv_forward(x, in_width, out_width, weight, bias, stride, padding, dilation, groups, path) -> Tensor:
    depthwise = groups > 1
    if path == "reference":
        x_in = torch.where(_channel_mask(in_width, x.shape[1], x.device)[:, :, None, None], x, 0)
        y = F.conv2d(x_in, weight, bias, stride, padding, dilation, groups)
        return torch.where(_channel_mask(out_width, weight.shape[0], x.device)[:, :, None, None], y, 0)
    out_hw = [_conv_out_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) for d in (0, 1)]
    out = x.new_zeros(x.shape[0], weight.shape[0], *out_hw)
    for i, o, rows in width_groups(in_width, out_width):
        w = weight[:o] if depthwise else weight[:o, :i]
        y = F.conv2d(_select(x, rows, i), w, None if bias is None else bias[:o], stride, padding, dilation,
                     i if depthwise else 1)
        if rows is None:
            out[:, :o] = y
        else:
            out[rows.to(x.device), :o] = y
    return out


@torch.library.custom_op("dynnet::sliced_conv2d", mutates_args=())
def _sliced_conv2d_op(
    x: Tensor, in_width: Tensor, out_width: Tensor, weight: Tensor, bias: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, path: str,
) -> Tensor:
    """x (N, Cin, H, W), widths (N,), weight (Cout, Cin/groups, kh, kw) -> (N, Cout, Hout, Wout)."""
    return _conv_forward(x, in_width, out_width, weight, bias, stride, padding, dilation, groups, path)


@_sliced_conv2d_op.register_fake
def _(x, in_width, out_width, weight, bias, stride, padding, dilation, groups, path):
    out_hw = [_conv_out_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) for d in (0, 1)]
    return x.new_empty(x.shape[0], weight.shape[0], *out_hw)


def _conv_setup(ctx, inputs, output) -> None:
    x, in_width, out_width, weight, bias, stride, padding, dilation, groups, path = inputs
    ctx.save_for_backward(x, in_width, out_width, weight, bias)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.path = path


def _conv_backward(ctx, grad: Tensor):
    x, in_width, out_width, weight, bias = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    if ctx.path == "reference":
        return _recompute_grads(_conv_forward, (x, in_width, out_width, weight, bias), grad, ctx.path, *ctx.conv)
    depthwise = groups > 1
    grad_x, grad_w = torch.zeros_like(x), torch.zeros_like(weight)
    grad_b = None if bias is None else torch.zeros_like(bias)
    for i, o, rows in width_groups(in_width, out_width):
        w = weight[:o] if depthwise else weight[:o, :i]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            _select(grad, rows, o).contiguous(), _select(x, rows, i).contiguous(), w.contiguous(),
            [o] if bias is not None else None, stride, padding, dilation, False, [0, 0],
            i if depthwise else 1, [True, True, bias is not None],
        )
        if rows is None:
            grad_x[:, :i] = gx
        else:
            grad_x[rows.to(x.device), :i] = gx
        if depthwise:
            grad_w[:o] += gw
        else:
            grad_w[:o, :i] += gw
        if grad_b is not None:
            grad_b[:o] += gb
    return grad_x, None, None, grad_w, grad_b, None, None, None, None, None


_sliced_conv2d_op.register_autograd(_conv_backward, setup_context=_conv_setup)


@register_flop_formula(torch.ops.dynnet.sliced_conv2d, get_raw=True)
def _sliced_conv2d_flops(
    x, in_width, out_width, weight, bias, stride, padding, dilation, groups, path, *args, out_val=None, **kw
) -> int:
    """2 x executed MACs: the per-sample slices, or the full dense conv on the reference path."""
    out_hw = [_conv_out_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) for d in (0, 1)]
    kernel = (weight.shape[2], weight.shape[3])
    if path == "reference":
        return 2 * x.shape[0] * weight.shape[0] * weight.shape[1] * kernel[0] * kernel[1] * out_hw[0] * out_hw[1]
    return 2 * sliced_conv2d_macs(in_width, out_width, kernel, tuple(out_hw), depthwise=groups > 1)


# ---------------------------------------------------------------- public wrappers
def _check_width(name: str, width: object, samples: int, channels: int, device: torch.device) -> Tensor:
    """Widths as a CPU int64 tensor ``(N,)`` with values in [1, channels]."""
    if isinstance(width, Tensor):
        if width.dtype not in INT_DTYPES:
            raise TypeError(f"{name}: expected an integer tensor, got dtype {str(width.dtype).replace('torch.', '')}")
        if width.device.type not in ("cpu", device.type):
            raise ValueError(f"{name}: expected a tensor on the cpu or on {device}, got one on {width.device}")
        width = width.detach().to("cpu", torch.int64)
    elif isinstance(width, Sequence) and not isinstance(width, str):
        try:
            width = torch.tensor(width)  # one C loop; floats and bools give a non-integer dtype below
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name}: expected integer widths, got {width!r}") from error
        if width.dtype not in INT_DTYPES or width.dtype == torch.uint8:
            raise TypeError(f"{name}: expected integer widths, got dtype {str(width.dtype).replace('torch.', '')}")
    else:
        raise TypeError(f"{name}: expected an integer tensor or a sequence of ints, got {type(width).__name__}")
    check_shape(name, width, (samples,), "one width per sample")
    if samples and (int(width.min()) < 1 or int(width.max()) > channels):
        raise ValueError(f"{name}: widths must lie in [1, {channels}], got min {int(width.min())} and max {int(width.max())}")
    return width


def sliced_linear(
    x: Tensor,
    in_width: Tensor | Sequence[int],
    out_width: Tensor | Sequence[int],
    weight: Tensor,
    bias: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Per-sample prefix-width linear: x (N, Cin), widths (N,) ints, weight (Cout, Cin) -> (N, Cout).

    ``y[n, :o] = weight[:o, :i] @ x[n, :i] + bias[:o]`` with ``i, o = in_width[n], out_width[n]``;
    ``y[n, o:] = 0``.
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_shape("weight", weight, (None, x.shape[1]), f"x with {x.shape[1]} input features")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
        check_shape("bias", bias, (weight.shape[0],), "weight (Cout, Cin)")
    check_same_dtype([("x", x), ("weight", weight), ("bias", bias)])
    check_same_device([("x", x), ("weight", weight), ("bias", bias)])
    in_w = _check_width("in_width", in_width, x.shape[0], x.shape[1], x.device)
    out_w = _check_width("out_width", out_width, x.shape[0], weight.shape[0], x.device)
    path = _backend.resolve(backend, x.device)
    if dispatch_free(x, weight, bias):  # plain eager inference: the op's body, no dispatcher
        return _linear_forward(x, in_w, out_w, weight, bias, path)
    return torch.ops.dynnet.sliced_linear(x, in_w, out_w, weight, bias, path)


def sliced_conv2d(
    x: Tensor,
    in_width: Tensor | Sequence[int],
    out_width: Tensor | Sequence[int],
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    backend: str | None = None,
) -> Tensor:
    """Per-sample prefix-width conv: x (N, Cin, H, W), widths (N,), weight (Cout, Cin/groups, kh, kw).

    Sample n equals ``F.conv2d(x[n:n+1, :i], weight[:o, :i], bias[:o], ...)`` in its first ``o``
    channels and 0 after. ``groups`` is 1, or ``Cin == Cout`` (depthwise, ``in_width == out_width``).
    """
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=4, dtypes=FLOAT_DTYPES)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups: expected an int, got {type(groups).__name__}")
    channels, out_channels = x.shape[1], weight.shape[0]
    if groups == 1:
        check_shape("weight", weight, (None, channels, None, None), f"x with {channels} channels")
    elif groups == channels and out_channels == channels:
        check_shape("weight", weight, (channels, 1, None, None), f"a depthwise conv over {channels} channels")
    else:
        raise ValueError(f"groups: sliced_conv2d supports groups=1 or depthwise groups == Cin == Cout, got {groups}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
        check_shape("bias", bias, (out_channels,), "weight's output channels")
    check_same_dtype([("x", x), ("weight", weight), ("bias", bias)])
    check_same_device([("x", x), ("weight", weight), ("bias", bias)])
    stride_, padding_, dilation_ = check_pair("stride", stride, 1), check_pair("padding", padding, 0), check_pair(
        "dilation", dilation, 1
    )
    for d in (0, 1):
        if _conv_out_size(x.shape[2 + d], weight.shape[2 + d], stride_[d], padding_[d], dilation_[d]) < 1:
            raise ValueError(f"x: spatial size {tuple(x.shape[2:])} is too small for the kernel {tuple(weight.shape[2:])}")
    in_w = _check_width("in_width", in_width, x.shape[0], channels, x.device)
    out_w = _check_width("out_width", out_width, x.shape[0], out_channels, x.device)
    if groups > 1 and not torch.equal(in_w, out_w):
        raise ValueError("out_width: a depthwise sliced conv needs out_width == in_width for every sample")
    path = _backend.resolve(backend, x.device)
    if dispatch_free(x, weight, bias):  # plain eager inference: the op's body, no dispatcher
        return _conv_forward(x, in_w, out_w, weight, bias, list(stride_), list(padding_), list(dilation_), groups, path)
    return torch.ops.dynnet.sliced_conv2d(
        x, in_w, out_w, weight, bias, list(stride_), list(padding_), list(dilation_), groups, path
    )
