"""Token gather/scatter (DynamicViT / EViT style, rectangular) and packing (A-ViT style, ragged).

Rectangular: every sample keeps the same number ``K`` of tokens, so the batch stays ``(B, K, C)`` and
later layers are dense GEMMs. Ragged: each sample keeps its own tokens; the kept rows of the whole
batch are packed into ``(T_active, C)`` with ``cu_seqlens (B+1,)`` marking each sample's slice, and
``packed_attention`` runs attention per sample on its slice.

Paths: ``reference`` (advanced indexing / Python loops, the oracle) and ``cpu`` (one
``index_select`` / ``index_copy`` / boolean-mask copy over the flattened ``(B*N, C)`` rows). These are
memory moves, so there is no Triton kernel: the ``triton`` path (chosen by ``auto`` on CUDA) runs the
same torch indexing, which is already one bandwidth-bound kernel per call. Gather/scatter/pack/unpack
execute 0 MACs; ``packed_attention`` executes ``2 x n_b^2 x C`` per sample (QK^T and AV): per-sequence
SDPA on the cpu path, varlen SDPA on jagged nested tensors on the triton path (CUDA), padding to the
longest sequence only on the reference path (counted as the padded products it executes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from kernels import _backend
from kernels._backend import dispatch_free
from kernels._checks import (
    FLOAT_DTYPES,
    check_bool_mask,
    check_range,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)

INDEX_DTYPES = (torch.int32, torch.int64)


def gather_tokens_macs() -> int:
    """Gathering rows moves data: 0 MACs."""
    return 0


def scatter_tokens_macs() -> int:
    """Scattering rows moves data: 0 MACs."""
    return 0


def pack_tokens_macs() -> int:
    """Packing kept rows moves data: 0 MACs."""
    return 0


def unpack_tokens_macs() -> int:
    """Unpacking kept rows moves data: 0 MACs."""
    return 0


def packed_attention_macs(seqlens: list[int] | Tensor, channels: int) -> int:
    """MACs of attention over ragged sequences: ``2 x n_b^2 x C`` per sequence (QK^T and AV)."""
    lens = seqlens.tolist() if isinstance(seqlens, Tensor) else list(seqlens)
    return sum(2 * int(n) * int(n) * int(channels) for n in lens)


def _flat_index(idx: Tensor, tokens: int) -> Tensor:
    """Rows of ``(B*N, C)`` for ``idx (B, K)``: ``b * N + idx[b, k]``, int64, flattened."""
    offsets = torch.arange(idx.shape[0], device=idx.device, dtype=torch.int64).unsqueeze(1) * tokens
    return (idx.long() + offsets).reshape(-1)


# ---------------------------------------------------------------- gather_tokens
def _gather(x: Tensor, idx: Tensor, path: str) -> Tensor:
    """x (B, N, C), idx (B, K) -> (B, K, C)."""
    batch, tokens, channels = x.shape
    if path == "reference":
        return x[torch.arange(batch, device=x.device).unsqueeze(1), idx.long()]
    rows = x.reshape(batch * tokens, channels).index_select(0, _flat_index(idx, tokens))
    return rows.view(batch, idx.shape[1], channels)


@torch.library.custom_op("dynnet::gather_tokens", mutates_args=())
def _gather_op(x: Tensor, idx: Tensor, path: str) -> Tensor:
    """x (B, N, C), idx (B, K) -> (B, K, C)."""
    return _gather(x, idx, path)


@_gather_op.register_fake
def _(x: Tensor, idx: Tensor, path: str) -> Tensor:
    return x.new_empty(x.shape[0], idx.shape[1], x.shape[2])


def _gather_setup(ctx, inputs, output) -> None:
    x, idx, _ = inputs
    ctx.save_for_backward(idx)
    ctx.x_shape = x.shape


def _gather_backward(ctx, grad: Tensor):
    (idx,) = ctx.saved_tensors
    batch, tokens, channels = ctx.x_shape
    grad_x = grad.new_zeros(batch * tokens, channels)
    grad_x.index_add_(0, _flat_index(idx, tokens), grad.reshape(-1, channels))
    return grad_x.view(batch, tokens, channels), None, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


# ---------------------------------------------------------------- scatter_tokens
@torch.library.custom_op("dynnet::scatter_tokens", mutates_args=())
def _scatter_op(base: Tensor, idx: Tensor, src: Tensor, path: str) -> Tensor:
    """Copy of base (B, N, C) with rows idx (B, K) replaced by src (B, K, C)."""
    out = base.clone()
    batch, tokens, channels = base.shape
    if path == "reference":
        out[torch.arange(batch, device=base.device).unsqueeze(1), idx.long()] = src
        return out
    out.view(batch * tokens, channels).index_copy_(0, _flat_index(idx, tokens), src.reshape(-1, channels))
    return out


@_scatter_op.register_fake
def _(base: Tensor, idx: Tensor, src: Tensor, path: str) -> Tensor:
    return torch.empty_like(base)


def _scatter_setup(ctx, inputs, output) -> None:
    _, idx, _, _ = inputs
    ctx.save_for_backward(idx)


def _scatter_backward(ctx, grad: Tensor):
    (idx,) = ctx.saved_tensors
    batch, tokens, channels = grad.shape
    rows = _flat_index(idx, tokens)
    flat = grad.reshape(batch * tokens, channels)
    grad_src = flat.index_select(0, rows).view(batch, idx.shape[1], channels)
    grad_base = flat.index_fill(0, rows, 0).view(batch, tokens, channels)
    return grad_base, None, grad_src, None


_scatter_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


# ---------------------------------------------------------------- pack_tokens / unpack_tokens
def _pack(x: Tensor, keep: Tensor, path: str) -> tuple[Tensor, Tensor]:
    """x (B, N, C), keep (B, N) bool -> packed (T_active, C), cu_seqlens (B+1,) int32."""
    batch, tokens = keep.shape
    if path == "reference" or (batch > 1 and x.stride(0) != x.stride(1) * tokens):
        counts = keep.sum(1, dtype=torch.int32)
        cu_seqlens = F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
        if path == "reference":
            packed = torch.cat([x[b][keep[b]] for b in range(batch)], 0) if batch else x[keep]
            return packed.reshape(-1, x.shape[2]), cu_seqlens
        return x[keep], cu_seqlens  # rows of different samples cannot be merged without copying x
    # one index_select over the (B*N, C) rows (about 2x faster on CPU than boolean indexing); sample b's
    # slice starts at the number of kept rows before its first token b*N
    rows = keep.reshape(-1).nonzero().squeeze(1)
    firsts = torch.arange(batch + 1, device=keep.device) * tokens
    return x.flatten(0, 1).index_select(0, rows), torch.searchsorted(rows, firsts, out_int32=True)


@torch.library.custom_op("dynnet::pack_tokens", mutates_args=())
def _pack_op(x: Tensor, keep: Tensor, path: str) -> tuple[Tensor, Tensor]:
    """x (B, N, C), keep (B, N) bool -> packed (T_active, C), cu_seqlens (B+1,) int32."""
    return _pack(x, keep, path)


@_pack_op.register_fake
def _(x: Tensor, keep: Tensor, path: str) -> tuple[Tensor, Tensor]:
    active = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(active, x.shape[2]), x.new_empty(x.shape[0] + 1, dtype=torch.int32)


def _pack_setup(ctx, inputs, output) -> None:
    x, keep, _ = inputs
    ctx.save_for_backward(keep)
    ctx.mark_non_differentiable(output[1])


def _pack_backward(ctx, grad_packed: Tensor, grad_cu: Tensor | None):
    (keep,) = ctx.saved_tensors
    grad_x = grad_packed.new_zeros(*keep.shape, grad_packed.shape[1])
    grad_x[keep] = grad_packed
    return grad_x, None, None


_pack_op.register_autograd(_pack_backward, setup_context=_pack_setup)


@torch.library.custom_op("dynnet::unpack_tokens", mutates_args=())
def _unpack_op(base: Tensor, packed: Tensor, keep: Tensor, path: str) -> Tensor:
    """Copy of base (B, N, C) whose kept rows (keep (B, N) bool, row-major) are the rows of packed."""
    out = base.clone()
    if path == "reference":
        start = 0
        for b in range(base.shape[0]):
            n = int(keep[b].sum())
            out[b][keep[b]] = packed[start : start + n]
            start += n
        return out
    out[keep] = packed
    return out


@_unpack_op.register_fake
def _(base: Tensor, packed: Tensor, keep: Tensor, path: str) -> Tensor:
    return torch.empty_like(base)


def _unpack_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[2])


def _unpack_backward(ctx, grad: Tensor):
    (keep,) = ctx.saved_tensors
    return grad.masked_fill(keep.unsqueeze(-1), 0), grad[keep], None, None


_unpack_op.register_autograd(_unpack_backward, setup_context=_unpack_setup)


# ---------------------------------------------------------------- packed_attention
def _attention_per_sequence(q: Tensor, k: Tensor, v: Tensor, bounds: list[int], scale: float) -> Tensor:
    """One SDPA per sequence on its slice of the packed rows: exactly sum_b 2 n_b^2 C MACs."""
    # (1, H, T, D) views: 4-D inputs take the fused CPU SDPA kernel (3-D ones a ~2x slower fallback)
    qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if q.shape[0] and max(lens) == q.shape[0]:  # one sequence holds every row (batch 1): no slice, no copy
        return F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1)
    parts = [
        F.scaled_dot_product_attention(qb, kb, vb, scale=scale)[0].transpose(0, 1)
        for qb, kb, vb in zip(qs.split(lens, 2), ks.split(lens, 2), vs.split(lens, 2), strict=True)
        if qb.shape[2]
    ]
    return torch.cat(parts) if parts else torch.zeros_like(q)


def _attention_padded(q: Tensor, k: Tensor, v: Tensor, bounds: list[int], scale: float) -> Tensor:
    """Pad every sequence to the longest, one batched SDPA with a key mask: B x n_max^2 products."""
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    batch, longest = len(lens), max(lens, default=0)
    heads, dim = q.shape[1], q.shape[2]
    if longest == 0:
        return torch.zeros_like(q)
    valid = torch.arange(longest, device=q.device).unsqueeze(0) < torch.tensor(lens, device=q.device).unsqueeze(1)

    def pad(t: Tensor) -> Tensor:
        dense = t.new_zeros(batch, longest, heads, dim)
        dense[valid] = t
        return dense.transpose(1, 2)  # (B, H, n_max, D)

    # queries past a sequence's end attend to everything (no all-masked rows, no NaN); they are dropped
    mask = (valid.unsqueeze(1) | ~valid.unsqueeze(2)).unsqueeze(1)
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)[valid]


def _attention_varlen(q: Tensor, k: Tensor, v: Tensor, bounds: list[int], scale: float) -> Tensor:
    """CUDA: jagged nested tensors into SDPA, which runs varlen flash/efficient attention (cu_seqlens)."""
    if q.shape[0] == 0:
        return torch.zeros_like(q)
    offsets = torch.tensor(bounds, dtype=torch.int64).to(q.device, non_blocking=True)
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    nested = [
        torch.nested.nested_tensor_from_jagged(t, offsets, min_seqlen=min(lens), max_seqlen=max(lens)).transpose(1, 2)
        for t in (q, k, v)
    ]
    out = F.scaled_dot_product_attention(*nested, scale=scale)
    return out.transpose(1, 2).values().contiguous()


def _attention_path(path: str, has_empty: bool):
    """The implementation a path runs: varlen SDPA on CUDA (triton path, no empty sequence), per sequence
    on the cpu path (and triton with an empty sequence), padded on the reference path."""
    if path == "reference":
        return _attention_padded
    if path == "triton" and not has_empty:
        return _attention_varlen
    return _attention_per_sequence


def _attention(q: Tensor, k: Tensor, v: Tensor, bounds: list[int], scale: float, path: str) -> Tensor:
    """The op's body: ``bounds`` is ``cu_seqlens`` as a list."""
    has_empty = any(b == a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return _attention_path(path, has_empty)(q, k, v, bounds, scale)


@torch.library.custom_op("dynnet::packed_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float, path: str) -> Tensor:
    """q, k, v (T_active, H, D) packed rows, cu_seqlens (B+1,) -> (T_active, H, D)."""
    return _attention(q, k, v, cu_seqlens.tolist(), scale, path)


@_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float, path: str) -> Tensor:
    return torch.empty_like(q)


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, scale, path = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)
    ctx.scale, ctx.path = scale, path


def _attention_backward(ctx, grad: Tensor):
    """Recompute the same path under autograd and take its vector-Jacobian product."""
    q, k, v, cu_seqlens = ctx.saved_tensors
    inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    bounds = cu_seqlens.tolist()
    run = _attention_path(ctx.path, any(b == a for a, b in zip(bounds[:-1], bounds[1:], strict=True)))
    with torch.enable_grad():
        out = run(*inputs, bounds, ctx.scale)
    grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs, strict=True)]
    return grads[0], grads[1], grads[2], None, None, None


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


@register_flop_formula(torch.ops.dynnet.packed_attention, get_raw=True)
def _packed_attention_flops(q, k, v, cu_seqlens, scale=1.0, path="cpu", *args, out_val=None, **kwargs) -> int:
    """2 x MACs actually executed: per-sequence on the cpu path, padded to the longest on reference."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    channels = q.shape[1] * q.shape[2]
    if path == "reference":
        lens = [max(lens, default=0)] * len(lens)
    return 2 * packed_attention_macs(lens, channels)


@register_flop_formula(
    [torch.ops.dynnet.gather_tokens, torch.ops.dynnet.scatter_tokens, torch.ops.dynnet.pack_tokens,
     torch.ops.dynnet.unpack_tokens],
    get_raw=True,
)
def _data_movement_flops(*args, out_val=None, **kwargs) -> int:
    """Gathers, scatters, packs and unpacks move data: 0."""
    return 0


# ---------------------------------------------------------------- public wrappers
def _path(backend: str | None, device: torch.device) -> str:
    return _backend.resolve(backend, device)


def _check_tokens(name: str, x: object) -> Tensor:
    return check_tensor(name, x, ndim=3, dtypes=FLOAT_DTYPES)


def _plain_pack_inputs(x: object, keep: object) -> bool:
    """True when ``pack_tokens``' checks pass, tested at once: the wrappers run once per layer of a
    dynamic model, where a dozen check calls cost as much as the packing itself."""
    return (isinstance(x, Tensor) and isinstance(keep, Tensor) and x.dim() == 3 and x.dtype in FLOAT_DTYPES
            and keep.dtype == torch.bool and keep.shape == x.shape[:2] and keep.device == x.device)


def _plain_attention_inputs(q: object, k: object, v: object, cu_seqlens: object) -> bool:
    """True when ``packed_attention``'s tensor checks pass, tested at once (see ``_plain_pack_inputs``)."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
            and isinstance(cu_seqlens, Tensor)):
        return False
    shape, dtype, device = q.shape, q.dtype, q.device
    return (len(shape) == 3 and dtype in FLOAT_DTYPES and k.shape == shape and v.shape == shape
            and k.dtype == dtype and v.dtype == dtype and k.device == device and v.device == device
            and cu_seqlens.dim() == 1 and cu_seqlens.dtype in INDEX_DTYPES and cu_seqlens.device == device)


def _check_idx(idx: object, batch: int, tokens: int) -> Tensor:
    check_tensor("idx", idx, ndim=2, dtypes=INDEX_DTYPES)
    check_shape("idx", idx, (batch, None), "one row of token indices per sample")
    check_range("idx", idx, 0, tokens)
    return idx


def gather_tokens(x: Tensor, idx: Tensor, backend: str | None = None) -> Tensor:
    """Rows ``idx`` of every sample: x (B, N, C), idx (B, K) int32/int64 in [0, N) -> (B, K, C).

    Duplicate indices are allowed (the row is copied twice; gradients add up).
    """
    _check_tokens("x", x)
    _check_idx(idx, x.shape[0], x.shape[1])
    check_same_device([("x", x), ("idx", idx)])
    if dispatch_free(x, idx):  # plain eager inference: the op's body, no dispatcher
        return _gather(x, idx, _path(backend, x.device))
    return torch.ops.dynnet.gather_tokens(x, idx, _path(backend, x.device))


def scatter_tokens(base: Tensor, idx: Tensor, src: Tensor, backend: str | None = None) -> Tensor:
    """Copy of base (B, N, C) with rows idx (B, K) replaced by src (B, K, C); out of place.

    ``idx`` must be unique within each sample (else which write wins is undefined): duplicates raise
    ValueError (checked with one sort; a host sync on CUDA).
    """
    _check_tokens("base", base)
    _check_idx(idx, base.shape[0], base.shape[1])
    _check_tokens("src", src)
    check_shape("src", src, (base.shape[0], idx.shape[1], base.shape[2]), "(B, K, C) of base and idx")
    check_same_dtype([("base", base), ("src", src)])
    check_same_device([("base", base), ("idx", idx), ("src", src)])
    if idx.shape[1] > 1:
        ordered = idx.sort(dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("idx: indices must be unique within each sample for scatter_tokens")
    return torch.ops.dynnet.scatter_tokens(base, idx, src, _path(backend, base.device))


def pack_tokens(x: Tensor, keep: Tensor, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Kept rows of every sample, packed: x (B, N, C), keep (B, N) bool -> (T_active, C), cu_seqlens.

    ``cu_seqlens (B+1,)`` int32: sample b's rows are ``packed[cu_seqlens[b]:cu_seqlens[b+1]]`` in
    token order. A sample may keep nothing (an empty slice).
    """
    if not _plain_pack_inputs(x, keep):  # the detailed checks name the offending argument
        _check_tokens("x", x)
        check_bool_mask("keep", keep, x.shape[:2], "(B, N) of x")
        check_same_device([("x", x), ("keep", keep)])
    if dispatch_free(x, keep):  # plain eager inference: the op's body, no dispatcher
        return _pack(x, keep, _path(backend, x.device))
    return torch.ops.dynnet.pack_tokens(x, keep, _path(backend, x.device))


def unpack_tokens(base: Tensor, packed: Tensor, keep: Tensor, backend: str | None = None) -> Tensor:
    """Copy of base (B, N, C) whose kept rows (keep (B, N) bool) are replaced by packed (T_active, C)."""
    _check_tokens("base", base)
    check_bool_mask("keep", keep, base.shape[:2], "(B, N) of base")
    check_tensor("packed", packed, ndim=2, dtypes=FLOAT_DTYPES)
    active = int(keep.sum())
    check_shape("packed", packed, (active, base.shape[2]), "(keep.sum(), C)")
    check_same_dtype([("base", base), ("packed", packed)])
    check_same_device([("base", base), ("packed", packed), ("keep", keep)])
    return torch.ops.dynnet.unpack_tokens(base, packed, keep, _path(backend, base.device))


def packed_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float | None = None, backend: str | None = None
) -> Tensor:
    """Softmax attention within each packed sequence: q, k, v (T_active, H, D) -> (T_active, H, D).

    The cpu path runs one SDPA per sequence on its slice and the triton path (CUDA) one varlen SDPA on
    jagged nested tensors (flash/efficient kernels with cu_seqlens); both execute exactly
    ``2 n_b^2 H D`` MACs per sequence. The reference path pads to the longest sequence (``B n_max^2``
    products, counted as such). ``benchmarks/bench_routing.py`` times them against each other.
    """
    if not _plain_attention_inputs(q, k, v, cu_seqlens):  # the detailed checks name the offending argument
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_tensor(name, t, ndim=3, dtypes=FLOAT_DTYPES)
            check_shape(name, t, tuple(q.shape), "q (T_active, H, D)")
        check_same_dtype([("q", q), ("k", k), ("v", v)])
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=INDEX_DTYPES)
        check_same_device([("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)])
    bounds = cu_seqlens.tolist()
    if not bounds or bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens: expected to start at 0 and end at T_active={q.shape[0]}, got {bounds}")
    if any(b < a for a, b in zip(bounds[:-1], bounds[1:], strict=True)):
        raise ValueError("cu_seqlens: expected a non-decreasing sequence")
    scale = float(q.shape[-1] ** -0.5) if scale is None else float(scale)
    path = _path(backend, q.device)
    if dispatch_free(q, k, v, cu_seqlens):  # plain eager inference: the op's body, no dispatcher
        return _attention(q, k, v, bounds, scale, path)
    return torch.ops.dynnet.packed_attention(q, k, v, cu_seqlens, scale, path)
