"""Executed-MAC counter and parameter counts.

Units, stated once: **1 MAC = one multiply-accumulate; FLOPs = 2 x MACs.** Every cost in the catalog is
in MACs. Counted: convolutions (any groups, stride, dilation; transposed too), linear layers and matrix
products (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``matmul``, ``mv``, ``dot``), the two products of
attention (``F.scaled_dot_product_attention``: ``Q K^T`` and ``A V``), and the custom ops of
``kernels/`` through the formulas they register (executed work only). Not counted: element-wise ops,
bias adds, norms, pooling, activations, softmax. That is why our numbers sit slightly below ptflops'
(which counts BN, ReLU, pooling and bias adds) and match torchvision's ``_ops`` metadata and fvcore.

How: the callable runs once, for real, under ``torch.utils.flop_counter.FlopCounterMode`` (a
``TorchDispatchMode``) and ``torch.no_grad()``. It sees every aten op that executes, with its actual
shapes: a block skipped by a Python ``if`` counts 0, a gathered smaller tensor counts its reduced size,
an early-exited sample is gone from later shapes. Nothing is traced, so data-dependent control flow is
counted as it ran. A masked dense op is counted dense, because the dense op is what ran. Counting under
``no_grad`` keeps autograd backward ops out. Custom ops without a registered formula would count 0
silently in plain ``FlopCounterMode``; here they are listed in ``MacReport.uncounted_ops`` and
``count_macs`` warns about them; so are aten ops whose name says they multiply matrices but which
have no formula. Compared with plain ``FlopCounterMode`` (torch 2.13) we add formulas for the CPU
flash-attention kernel of ``F.scaled_dot_product_attention`` (counted 0 there whenever q, k and v share
the head dim, i.e. always in a ViT), matrix-vector products, and the fused inference fast paths of
``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``. Causal masks are not discounted.
"""

from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

# Op namespaces whose ops are PyTorch's own: an unregistered op there does no MACs (element-wise, norm,
# pooling, view, ...) by our convention, unless its name says otherwise (``_does_macs``).
_BUILTIN_NAMESPACES = frozenset({"aten", "prim", "prims", "c10d", "_c10d_functional", "profiler"})

aten = torch.ops.aten


def _mv_flops(mat_shape, vec_shape, *args, out_shape=None, **kwargs) -> int:
    m, k = mat_shape
    return 2 * m * k


def _addmv_flops(self_shape, mat_shape, vec_shape, *args, out_shape=None, **kwargs) -> int:
    return _mv_flops(mat_shape, vec_shape)


def _dot_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0]


def _addbmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    b, n, k = a_shape
    return 2 * b * n * k * b_shape[2]


def _sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _rows(shape) -> int:
    """Number of token rows of a ``(..., E)`` tensor."""
    return prod(shape[:-1])


def _native_mha_flops(q_shape, k_shape, v_shape, embed_dim, *args, out_shape=None, **kwargs) -> int:
    """nn.MultiheadAttention's inference fast path: q/k/v projections, QK^T, AV, output projection."""
    lq, lk, e = q_shape[-2], k_shape[-2], embed_dim
    batch = prod(q_shape[:-2])
    macs = 2 * _rows(q_shape) * e * e + 2 * _rows(k_shape) * e * e + 2 * batch * lq * lk * e
    return 2 * macs


def _encoder_layer_flops(src_shape, embed_dim, *args, out_shape=None, **kwargs) -> int:
    """nn.TransformerEncoderLayer's inference fast path: attention as above, then the two FFN linears.

    ``args`` follow the op's schema: heads, qkv weight/bias, proj weight/bias, use_gelu, norm_first, eps,
    two norms' weight/bias, then ``ffn_weight_1`` of shape ``(hidden, embed_dim)`` at index 12.
    """
    hidden = args[12][0]
    macs = _native_mha_flops(src_shape, src_shape, src_shape, embed_dim) // 2
    macs += 2 * _rows(src_shape) * embed_dim * hidden
    return 2 * macs


# Ops FlopCounterMode leaves out (torch 2.13): matrix-vector products (``matmul`` with 1-D operands), the
# CPU flash-attention kernel that ``F.scaled_dot_product_attention`` picks for equal head dims, and the
# fused inference paths of nn.MultiheadAttention / nn.TransformerEncoderLayer. Formulas return FLOPs,
# like FlopCounterMode's own; they are passed per counter, not registered globally. Ops missing from
# the running torch version are left out.
_EXTRA_FORMULAS = {
    getattr(aten, name): formula
    for name, formula in {
        "mv": _mv_flops,
        "addmv": _addmv_flops,
        "dot": _dot_flops,
        "vdot": _dot_flops,
        "addbmm": _addbmm_flops,
        "_scaled_dot_product_flash_attention_for_cpu": _sdpa_flops,
        "_scaled_dot_product_fused_attention_overrideable": _sdpa_flops,
        "_scaled_dot_product_attention_math_for_mps": _sdpa_flops,
        "_native_multi_head_attention": _native_mha_flops,
        "_transformer_encoder_layer_fwd": _encoder_layer_flops,
    }.items()
    if hasattr(aten, name)
}

# An executed aten op with one of these words in its name (split at "_") but no formula does MACs we
# would miss: it is reported as uncounted instead of silently counting 0.
_MAC_WORD = re.compile(
    r"conv|conv[123]d|convolution|mm|bmm|addmm|baddbmm|addbmm|matmul|linear|einsum|dot|vdot|mv|addmv|"
    r"gemm|attention|lstm|gru|rnn"
)


def _does_macs(op: str) -> bool:
    return any(_MAC_WORD.fullmatch(word) for word in op.split("_"))


_kernels_import_error: str | None = None
_kernels_imported = False


def _import_kernels() -> None:
    """Import the ``kernels`` package so that its custom ops' flop formulas are registered.

    Tolerates an incomplete package (it is work in progress): the failure is remembered and reported
    once as a warning; custom ops that then run without a formula show up in ``uncounted_ops``.
    """
    global _kernels_imported, _kernels_import_error
    if _kernels_imported:
        return
    _kernels_imported = True
    try:
        importlib.import_module("kernels")
    except Exception as exc:  # noqa: BLE001 - any failure means "formulas unavailable"
        _kernels_import_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"catalog.costs: could not import the kernels package ({_kernels_import_error}); "
            "custom ops without a registered formula will count 0 MACs",
            RuntimeWarning,
            stacklevel=3,
        )


def _op_name(packet: Any) -> str:
    """``aten.mm``-style name of an op packet (or the repr of anything else, e.g. a Triton kernel)."""
    qualified = getattr(packet, "_qualified_op_name", None)
    return qualified.replace("::", ".") if qualified else str(packet)


class _Counter(FlopCounterMode):
    """FlopCounterMode that also remembers executed non-builtin ops that have no flop formula."""

    def __init__(self) -> None:
        super().__init__(display=False, custom_mapping=_EXTRA_FORMULAS)
        self.uncounted: set[str] = set()

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet not in self.flop_registry:
            name = _op_name(func_packet)
            namespace, _, op = name.partition(".")
            if namespace not in _BUILTIN_NAMESPACES or _does_macs(op):
                self.uncounted.add(name)
        return super()._count_flops(func_packet, out, args, kwargs)


@dataclass(frozen=True)
class MacReport:
    """MACs executed by one call, with a breakdown.

    ``total``: all MACs. ``by_op``: MACs per op (``aten.convolution``, ``dynnet.sparse_conv2d``, ...).
    ``by_module``: MACs per module, keyed by FlopCounterMode's names: the root module's class name,
    then dotted child names (``ResNet``, ``ResNet.layer1``, ``ResNet.layer1.0.conv1``); a module called
    several times accumulates. ``uncounted_ops``: custom ops that ran without a registered formula
    (their MACs are missing from ``total``).
    """

    total: int
    by_op: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, int] = field(default_factory=dict)
    uncounted_ops: tuple[str, ...] = ()

    @property
    def flops(self) -> int:
        """FLOPs = 2 x MACs."""
        return 2 * self.total

    def modules(self, depth: int = 1) -> dict[str, int]:
        """MACs of the modules ``depth`` levels below the root (1: the root's children)."""
        if depth < 0:
            raise ValueError(f"depth: must be >= 0, got {depth}")
        return {name: macs for name, macs in self.by_module.items() if name.count(".") == depth}


def _check_callable(fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"fn: expected an nn.Module or a callable, got {type(fn).__name__}")


def count_macs_detailed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> MacReport:
    """Run ``fn(*args, **kwargs)`` once under the counter and return the executed MACs with a breakdown.

    ``fn`` is an ``nn.Module`` or any callable; its train/eval mode is left as the caller set it.
    Runs under ``torch.no_grad()``. Input tensors may live on any device, ``meta`` included (shapes
    suffice for the aten formulas; data-dependent methods need real data).
    """
    _check_callable(fn)
    _import_kernels()
    counter = _Counter()
    with torch.no_grad(), counter:
        fn(*args, **kwargs)
    counts = counter.get_flop_counts()
    by_op = {_op_name(op): flops // 2 for op, flops in counts.get("Global", {}).items()}
    by_module = {name: sum(ops.values()) // 2 for name, ops in counts.items() if name != "Global"}
    uncounted = tuple(sorted(counter.uncounted))
    return MacReport(
        total=counter.get_total_flops() // 2, by_op=by_op, by_module=by_module, uncounted_ops=uncounted
    )


def count_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """MACs executed by ``fn(*args, **kwargs)`` (whole batch; see ``macs_per_sample``).

    Warns when a custom op without a registered formula ran (its work is missing from the count).
    """
    report = count_macs_detailed(fn, *args, **kwargs)
    if report.uncounted_ops:
        warnings.warn(
            "catalog.costs: custom ops ran without a registered flop formula and count 0 MACs: "
            + ", ".join(report.uncounted_ops),
            RuntimeWarning,
            stacklevel=2,
        )
    return report.total


def count_params(module: nn.Module | Iterable[nn.Module]) -> int:
    """Number of parameter elements; a parameter shared by several modules counts once.

    Accepts one module or several (e.g. a backbone plus a separately held policy network).
    """
    if isinstance(module, nn.Module):
        modules = [module]
    else:
        try:
            modules = list(module)
        except TypeError:
            modules = []
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise TypeError("module: expected an nn.Module or a non-empty iterable of nn.Modules")
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():  # parameters() already dedups within one module
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def macs_per_sample(total: int | float, batch_size: int) -> float:
    """Average MACs per sample: ``total / batch_size``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size: expected an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if total < 0:
        raise ValueError(f"total: must be >= 0, got {total}")
    return total / batch_size
