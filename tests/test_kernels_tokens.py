"""Token gather/scatter, pack/unpack and packed attention: paths, MACs, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from kernels.tokens import (
    gather_tokens,
    pack_tokens,
    packed_attention,
    packed_attention_macs,
    scatter_tokens,
    unpack_tokens,
)

PATHS = ["cpu", "reference"]


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def keep_mask(batch, tokens, seed=0, p=0.5):
    keep = torch.rand(batch, tokens, generator=torch.Generator().manual_seed(seed)) < p
    keep[0] = False  # a sample that keeps nothing
    if batch > 1:
        keep[1] = True  # and one that keeps everything
    return keep


# ---------------------------------------------------------------- gather / scatter
@pytest.mark.parametrize("path", PATHS)
def test_gather_matches_loop_with_duplicates(path):
    x = rand(3, 7, 5)
    idx = torch.tensor([[6, 0, 0], [1, 2, 3], [4, 4, 4]])
    want = torch.stack([x[b, idx[b]] for b in range(3)])
    torch.testing.assert_close(gather_tokens(x, idx, backend=path), want)
    torch.testing.assert_close(gather_tokens(x, idx.int(), backend=path), want)


@pytest.mark.parametrize("path", PATHS)
def test_scatter_matches_loop(path):
    base, src = rand(2, 6, 3), rand(2, 2, 3, seed=1)
    idx = torch.tensor([[5, 0], [2, 3]])
    want = base.clone()
    for b in range(2):
        want[b, idx[b]] = src[b]
    got = scatter_tokens(base, idx, src, backend=path)
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, base)  # out of place: base unchanged
    torch.testing.assert_close(base, rand(2, 6, 3))


def test_gather_then_scatter_roundtrip():
    x = rand(2, 9, 4)
    idx = torch.tensor([[8, 1, 4], [0, 2, 7]])
    kept = gather_tokens(x, idx)
    torch.testing.assert_close(scatter_tokens(torch.zeros_like(x), idx, kept), torch.where(
        torch.zeros(2, 9, 1, dtype=torch.bool).scatter(1, idx.unsqueeze(-1), True), x, 0.0))


def test_scatter_rejects_duplicate_indices():
    with pytest.raises(ValueError, match="^idx:.*unique"):
        scatter_tokens(rand(1, 4, 2), torch.tensor([[1, 1]]), rand(1, 2, 2))


@pytest.mark.parametrize("path", PATHS)
def test_gather_scatter_gradcheck(path):
    x = rand(2, 5, 3).requires_grad_()
    idx = torch.tensor([[0, 0, 4], [3, 1, 2]])
    assert torch.autograd.gradcheck(lambda x: gather_tokens(x, idx, backend=path), (x,))
    base, src = rand(2, 5, 3).requires_grad_(), rand(2, 3, 3, seed=2).requires_grad_()
    uidx = torch.tensor([[0, 4, 2], [3, 1, 2]])
    assert torch.autograd.gradcheck(lambda b, s: scatter_tokens(b, uidx, s, backend=path), (base, src))


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(1, 8), keep=st.integers(0, 8), seed=st.integers(0, 999))
def test_property_gather_cpu_equals_reference(batch, tokens, keep, seed):
    x = rand(batch, tokens, 3, seed=seed)
    idx = torch.randint(0, tokens, (batch, keep), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(gather_tokens(x, idx, backend="cpu"), gather_tokens(x, idx, backend="reference"))


# ---------------------------------------------------------------- pack / unpack
@pytest.mark.parametrize("path", PATHS)
def test_pack_layout_and_cu_seqlens(path):
    x = rand(4, 6, 3)
    keep = keep_mask(4, 6)
    packed, cu = pack_tokens(x, keep, backend=path)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0] + torch.cumsum(keep.sum(1), 0).tolist()
    for b in range(4):
        torch.testing.assert_close(packed[cu[b] : cu[b + 1]], x[b][keep[b]])


@pytest.mark.parametrize("batch", [1, 4])
def test_pack_cpu_row_gather_equals_boolean_indexing(batch):
    """The cpu path gathers with one index_select over (B*N, C) and finds cu_seqlens by searchsorted;
    inputs whose samples cannot be merged into rows without a copy take boolean indexing."""
    keep = keep_mask(batch, 7, seed=2)
    keep[-1, ::2] = False
    base = rand(7, batch, 3, seed=3)
    for x in (base.transpose(0, 1).contiguous(), base.transpose(0, 1)):  # mergeable, then not (batch > 1)
        packed, cu = pack_tokens(x, keep, backend="cpu")
        want, want_cu = pack_tokens(x, keep, backend="reference")
        assert packed.is_contiguous() and cu.dtype == torch.int32
        assert torch.equal(packed, x[keep]) and torch.equal(packed, want) and torch.equal(cu, want_cu)
    none = torch.zeros(batch, 7, dtype=torch.bool)
    packed, cu = pack_tokens(base.transpose(0, 1).contiguous(), none, backend="cpu")
    assert packed.shape == (0, 3) and cu.tolist() == [0] * (batch + 1)


@pytest.mark.parametrize("path", PATHS)
def test_unpack_replaces_kept_rows_only(path):
    x, base = rand(3, 5, 2), rand(3, 5, 2, seed=1)
    keep = keep_mask(3, 5, seed=4)
    packed, _ = pack_tokens(x, keep)
    got = unpack_tokens(base, packed * 2, keep, backend=path)
    torch.testing.assert_close(got, torch.where(keep.unsqueeze(-1), 2 * x, base))


@pytest.mark.parametrize("path", PATHS)
def test_pack_unpack_gradcheck(path):
    keep = keep_mask(3, 4, seed=2)
    x = rand(3, 4, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: pack_tokens(x, keep, backend=path)[0], (x,))
    base = rand(3, 4, 2, seed=5).requires_grad_()
    packed = rand(int(keep.sum()), 2, seed=6).requires_grad_()
    assert torch.autograd.gradcheck(lambda b, p: unpack_tokens(b, p, keep, backend=path), (base, packed))


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 4), tokens=st.integers(1, 7), seed=st.integers(0, 999))
def test_property_pack_unpack_roundtrip(batch, tokens, seed):
    x = rand(batch, tokens, 2, seed=seed)
    keep = torch.rand(batch, tokens, generator=torch.Generator().manual_seed(seed)) < 0.5
    packed, cu = pack_tokens(x, keep)
    assert packed.shape == (int(keep.sum()), 2) and int(cu[-1]) == packed.shape[0]
    torch.testing.assert_close(unpack_tokens(torch.zeros_like(x), packed, keep), x * keep.unsqueeze(-1))
    torch.testing.assert_close(pack_tokens(x, keep, backend="reference")[0], packed)


# ---------------------------------------------------------------- packed attention
def per_sample_attention(q, k, v, cu):
    out = torch.zeros_like(q)
    for b in range(len(cu) - 1):
        s, e = int(cu[b]), int(cu[b + 1])
        if e > s:
            att = torch.einsum("nhd,mhd->hnm", q[s:e], k[s:e]) / q.shape[-1] ** 0.5
            out[s:e] = torch.einsum("hnm,mhd->nhd", att.softmax(-1), v[s:e])
    return out


@pytest.mark.parametrize("path", PATHS)
def test_packed_attention_matches_einsum(path):
    cu = torch.tensor([0, 0, 3, 7, 8], dtype=torch.int32)  # an empty sequence, a single token
    q, k, v = (rand(8, 2, 3, seed=s) for s in range(3))
    torch.testing.assert_close(packed_attention(q, k, v, cu, backend=path), per_sample_attention(q, k, v, cu))


@pytest.mark.parametrize("bounds", [[0, 6], [0, 0, 6, 6], [0, 2, 6]])
def test_packed_attention_cpu_single_sequence_is_not_copied(bounds):
    """One sequence holding every row (batch 1) returns SDPA's output directly (contiguous, no cat)."""
    cu = torch.tensor(bounds, dtype=torch.int32)
    qkv = rand(6, 3, 2, 4, seed=4).unbind(1)  # strided views, as a qkv projection yields them
    out = packed_attention(*qkv, cu, backend="cpu")
    torch.testing.assert_close(out, per_sample_attention(*qkv, cu))
    assert out.is_contiguous() and out.shape == (6, 2, 4)


def test_packed_attention_equals_dense_attention_on_full_sequences():
    x = rand(2, 5, 2, 4)  # (B, N, H, D)
    packed, cu = pack_tokens(x.reshape(2, 5, 8), torch.ones(2, 5, dtype=torch.bool))
    packed = packed.view(-1, 2, 4)
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2),) * 3).transpose(1, 2).reshape(10, 2, 4)
    torch.testing.assert_close(packed_attention(packed, packed, packed, cu), dense)


@pytest.mark.parametrize("path", PATHS)
def test_packed_attention_gradcheck(path):
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    q, k, v = (rand(5, 1, 2, seed=s).requires_grad_() for s in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: packed_attention(q, k, v, cu, backend=path), (q, k, v))


def test_macs_count_real_attention_products_and_zero_for_moves():
    x = rand(3, 6, 8, dtype=torch.float32)
    keep = keep_mask(3, 6, seed=1)
    with FlopCounterMode(display=False) as counter:
        packed, cu = pack_tokens(x, keep)
        qkv = packed.view(-1, 2, 4)
        out = packed_attention(qkv, qkv, qkv, cu)
        unpack_tokens(x, out.reshape(-1, 8), keep)
        gather_tokens(x, torch.zeros(3, 2, dtype=torch.long))
    lens = keep.sum(1).tolist()
    assert packed_attention_macs(lens, 8) == sum(2 * n * n * 8 for n in lens)
    assert counter.get_total_flops() == 2 * packed_attention_macs(lens, 8)
    with FlopCounterMode(display=False) as padded:
        packed_attention(qkv, qkv, qkv, cu, backend="reference")
    assert padded.get_total_flops() == 2 * packed_attention_macs([max(lens)] * 3, 8)


# ---------------------------------------------------------------- errors and switch
def _bad_cases():
    x = rand(2, 4, 3, dtype=torch.float32)
    idx = torch.tensor([[0, 1], [2, 3]])
    keep = torch.ones(2, 4, dtype=torch.bool)
    return [
        (gather_tokens, (x[0], idx), ValueError, "x"),
        (gather_tokens, (x, idx.float()), TypeError, "idx"),
        (gather_tokens, (x, idx[:1]), ValueError, "idx"),
        (gather_tokens, (x, idx + 3), ValueError, "idx"),
        (gather_tokens, (x, -idx - 1), ValueError, "idx"),
        (scatter_tokens, (x, idx, x), ValueError, "src"),
        (scatter_tokens, (x, idx, x[:, :2].double()), TypeError, "src"),
        (pack_tokens, (x, keep.int()), TypeError, "keep"),
        (pack_tokens, (x, keep[:, :3]), ValueError, "keep"),
        (unpack_tokens, (x, x[0], keep), ValueError, "packed"),
        (unpack_tokens, (x, x.reshape(8, 3).long(), keep), TypeError, "packed"),
        (pack_tokens, (x.numpy(), keep), TypeError, "x"),
        (pack_tokens, (x.long(), keep), TypeError, "x"),
        (packed_attention, (x, x, x[:1], torch.tensor([0, 2])), ValueError, "v"),
        (packed_attention, (x[0], x[0], x[0], torch.tensor([0, 4])), ValueError, "q"),
        (packed_attention, (x, x.double(), x, torch.tensor([0, 2])), TypeError, "k"),
        (packed_attention, (x, x, x, torch.tensor([[0, 2]])), ValueError, "cu_seqlens"),
        (packed_attention, (x, x, x, torch.tensor([0, 1])), ValueError, "cu_seqlens"),
        (packed_attention, (x, x, x, torch.tensor([0, 2.0])), TypeError, "cu_seqlens"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise_naming_the_argument(case):
    fn, args, error, name = _bad_cases()[case]
    with pytest.raises(error, match=f"^{name}:"):
        fn(*args, backend="cpu")


def test_backend_switch(monkeypatch):
    x = rand(1, 3, 2)
    monkeypatch.setenv("DYNNET_KERNEL_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DYNNET_KERNEL_BACKEND"):
        gather_tokens(x, torch.tensor([[0]]))
    monkeypatch.setenv("DYNNET_KERNEL_BACKEND", "reference")
    q = x.view(3, 1, 2)
    with FlopCounterMode(display=False) as counter:
        packed_attention(q, q, q, torch.tensor([0, 1, 3]))  # reference pads to the longest
    assert counter.get_total_flops() == 2 * packed_attention_macs([2, 2], 2)
