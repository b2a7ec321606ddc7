"""sparse_conv2d / block_conv2d: semantics against the dense oracle, MAC formulas, gradients, errors, backends.

The Triton path runs under the CPU interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set
before the kernels are defined), on tiny shapes only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from kernels import block_conv as block_mod
from kernels import sparse_conv as sparse_mod
from kernels.block_conv import block_conv2d, block_conv2d_macs, expand_block_mask, reduce_mask
from kernels.sparse_conv import conv2d_macs, sparse_conv2d, sparse_conv2d_macs

ROOT = Path(__file__).resolve().parent.parent

# (N, Cin, Cout, H, W, kernel, stride, padding, dilation, groups)
CASES = {
    "3x3_odd": (2, 4, 6, 9, 7, (3, 3), 1, 1, 1, 1),
    "stride2": (2, 4, 6, 9, 7, (3, 3), 2, 1, 1, 1),
    "dilation2": (1, 4, 4, 9, 9, (3, 3), 1, 2, 2, 1),
    "groups2": (2, 4, 6, 8, 9, (3, 3), 1, 1, 1, 2),
    "depthwise": (2, 6, 6, 8, 9, (3, 3), 1, 1, 1, 6),
    "1x1": (2, 4, 6, 8, 9, (1, 1), 1, 0, 1, 1),
    "2x3_asym": (2, 4, 5, 8, 9, (2, 3), (2, 1), (0, 1), 1, 1),
    "5x5_pad0": (1, 3, 4, 9, 8, (5, 5), 1, 0, 1, 1),
}


def make_case(name: str, dtype: torch.dtype = torch.float64, channels_last: bool = False):
    n, cin, cout, h, w, k, s, p, d, g = CASES[name]
    x = torch.randn(n, cin, h, w, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin // g, *k, dtype=dtype)
    bias = torch.randn(cout, dtype=dtype)
    return x, weight, bias, dict(stride=s, padding=p, dilation=d, groups=g)


def dense(x, weight, bias, conv):
    return F.conv2d(x, weight, bias, **conv)


def random_mask(shape: tuple[int, ...], density: float) -> torch.Tensor:
    return torch.rand(shape) < density


def clustered_mask(shape: tuple[int, ...]) -> torch.Tensor:
    """One solid rectangle per sample (spatially clustered activity)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    n, h, w = shape
    for i in range(n):
        mask[i, i % max(1, h // 2) : i % max(1, h // 2) + max(1, h // 2), w // 3 :] = True
    return mask


def mask_variants(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    one_empty = random_mask(shape, 0.5)
    one_empty[0] = False
    return {
        "random": random_mask(shape, 0.4),
        "empty": torch.zeros(shape, dtype=torch.bool),
        "full": torch.ones(shape, dtype=torch.bool),
        "one_sample_empty": one_empty,
        "clustered": clustered_mask(shape),
    }


# --------------------------------------------------------------------------------------------------
# Semantics


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_sparse_conv2d_matches_masked_dense(case: str, channels_last: bool, backend: str) -> None:
    x, weight, bias, conv = make_case(case, channels_last=channels_last)
    ref = dense(x, weight, bias, conv)
    for kind, mask in mask_variants((ref.shape[0], ref.shape[2], ref.shape[3])).items():
        out = sparse_conv2d(x, mask, weight, bias, **conv, backend=backend)
        expected = ref.masked_fill(~mask.unsqueeze(1), 0)
        assert out.shape == ref.shape, kind
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg=kind)
        assert bool((out[~mask.unsqueeze(1).expand_as(out)] == 0).all()), kind
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt), kind


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("block_size", [1, 3, 4, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_block_conv2d_matches_masked_dense(case: str, block_size: int, backend: str) -> None:
    x, weight, bias, conv = make_case(case, channels_last=block_size == 3)
    ref = dense(x, weight, bias, conv)
    ho, wo = ref.shape[2:]
    shape = (ref.shape[0], -(-ho // block_size), -(-wo // block_size))
    for kind, block_mask in mask_variants(shape).items():
        out = block_conv2d(x, block_mask, weight, bias, **conv, block_size=block_size, backend=backend)
        pixels = expand_block_mask(block_mask, ho, wo, block_size)
        torch.testing.assert_close(out, ref.masked_fill(~pixels.unsqueeze(1), 0), rtol=1e-10, atol=1e-10, msg=kind)


@pytest.mark.parametrize("case", ["3x3_odd", "stride2", "groups2", "2x3_asym", "5x5_pad0"])
def test_every_cpu_route_matches_reference(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both CPU routes of each op (the untaken one included) on NCHW and channels_last inputs."""
    for channels_last in (False, True):
        x, weight, bias, conv = make_case(case, channels_last=channels_last)
        ref = dense(x, weight, bias, conv)
        n, _, ho, wo = ref.shape
        mask = random_mask((n, ho, wo), 0.5)
        block_mask = random_mask((n, -(-ho // 3), -(-wo // 3)), 0.5)
        pixels = expand_block_mask(block_mask, ho, wo, 3)
        for route in ("fused", "nchw", "nhwc"):
            monkeypatch.setattr(sparse_mod, "CPU_ROUTE", route)
            out = sparse_conv2d(x, mask, weight, bias, **conv, backend="cpu")
            torch.testing.assert_close(out, ref * mask.unsqueeze(1), rtol=1e-10, atol=1e-10)
        for route in ("im2col", "windows", "auto"):
            monkeypatch.setattr(block_mod, "CPU_ROUTE", route)
            out = block_conv2d(x, block_mask, weight, bias, **conv, block_size=3, backend="cpu")
            torch.testing.assert_close(out, ref * pixels.unsqueeze(1), rtol=1e-10, atol=1e-10)


def test_block_conv2d_equals_sparse_conv2d_on_expanded_mask() -> None:
    x, weight, bias, conv = make_case("3x3_odd", dtype=torch.float32)
    block_mask = random_mask((2, 3, 2), 0.5)
    pixels = expand_block_mask(block_mask, 9, 7, 4)
    a = block_conv2d(x, block_mask, weight, bias, **conv, block_size=4, backend="cpu")
    b = sparse_conv2d(x, pixels, weight, bias, **conv, backend="cpu")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_path_float32_and_workspace_reuse() -> None:
    """Repeated calls with other masks (the per-thread workspace is reused) stay exact."""
    x, weight, bias, conv = make_case("3x3_odd", dtype=torch.float32)
    ref = dense(x, weight, bias, conv)
    for density in (0.9, 0.1, 0.5):
        mask = random_mask((2, 9, 7), density)
        out = sparse_conv2d(x, mask, weight, bias, **conv, backend="cpu")
        torch.testing.assert_close(out, ref * mask.unsqueeze(1), rtol=1e-5, atol=1e-5)
        x = x + 1.0  # a new input through the same cached padded buffer
        ref = dense(x, weight, bias, conv)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 2),
    cin_per_group=st.integers(1, 3),
    cout_per_group=st.integers(1, 3),
    groups=st.integers(1, 2),
    h=st.integers(3, 9),
    w=st.integers(3, 9),
    k=st.sampled_from([1, 2, 3]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    block_size=st.integers(1, 5),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_property_cpu_path_matches_reference(
    n, cin_per_group, cout_per_group, groups, h, w, k, stride, padding, dilation, block_size, density, seed
) -> None:
    if (h + 2 * padding - dilation * (k - 1) - 1) < 0 or (w + 2 * padding - dilation * (k - 1) - 1) < 0:
        return  # output would be empty: rejected by validation (tested elsewhere)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin_per_group * groups, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(cout_per_group * groups, cin_per_group, k, k, generator=gen, dtype=torch.float64)
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    ref = F.conv2d(x, weight, None, **conv)
    ho, wo = ref.shape[2:]
    mask = torch.rand(n, ho, wo, generator=gen) < density
    out = sparse_conv2d(x, mask, weight, None, **conv, backend="cpu")
    torch.testing.assert_close(out, ref * mask.unsqueeze(1), rtol=1e-10, atol=1e-10)
    block_mask = torch.rand(n, -(-ho // block_size), -(-wo // block_size), generator=gen) < density
    out = block_conv2d(x, block_mask, weight, None, **conv, block_size=block_size, backend="cpu")
    pixels = expand_block_mask(block_mask, ho, wo, block_size)
    torch.testing.assert_close(out, ref * pixels.unsqueeze(1), rtol=1e-10, atol=1e-10)


def test_opcheck_fake_and_autograd_registrations() -> None:
    x, weight, bias, _ = make_case("3x3_odd")
    mask = random_mask((2, 9, 7), 0.5)
    block_mask = random_mask((2, 5, 4), 0.5)
    residual = torch.randn(2, 6, 9, 7, dtype=x.dtype, requires_grad=True)
    for path in ("cpu", "reference"):
        torch.library.opcheck(torch.ops.dynnet.sparse_conv2d, (x, mask, weight, bias, [1, 1], [1, 1], [1, 1], 1, path))
        torch.library.opcheck(
            torch.ops.dynnet.sparse_conv2d, (x, mask, weight, bias, [1, 1], [1, 1], [1, 1], 1, path, residual)
        )
        torch.library.opcheck(
            torch.ops.dynnet.block_conv2d, (x, block_mask, weight, None, [1, 1], [1, 1], [1, 1], 1, 2, path)
        )


@pytest.mark.parametrize("case", ["3x3_odd", "stride2", "groups2", "1x1"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
def test_residual_is_added_everywhere_and_left_unmodified(case, channels_last, backend) -> None:
    """float32 runs the native kernel's accumulate mode (groups=1), the other cases the generic add."""
    x, weight, bias, conv = make_case(case, dtype=torch.float32, channels_last=channels_last)
    ref = dense(x, weight, bias, conv)
    mask = random_mask((ref.shape[0], *ref.shape[2:]), 0.4)
    mask[0] = False  # one sample with nothing active: exactly its residual
    residual = torch.randn_like(ref)
    kept = residual.clone()
    out = sparse_conv2d(x, mask, weight, bias, **conv, backend=backend, residual=residual)
    torch.testing.assert_close(out, residual + ref * mask.unsqueeze(1), rtol=1e-4, atol=1e-4)
    assert torch.equal(out[0], residual[0]) and torch.equal(residual, kept)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_gradients_reach_the_residual_and_match_the_dense_reference() -> None:
    x, weight, bias, conv = make_case("3x3_odd")
    mask = random_mask((2, 9, 7), 0.5)
    residual = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, residual)]
    out = sparse_conv2d(leaves[0], mask, leaves[1], leaves[2], **conv, backend="cpu", residual=leaves[3])
    out.square().sum().backward()
    refs = [t.clone().requires_grad_() for t in (x, weight, bias, residual)]
    (refs[3] + dense(*refs[:3], conv) * mask.unsqueeze(1)).square().sum().backward()
    for got, want in zip(leaves, refs, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


# --------------------------------------------------------------------------------------------------
# MACs


def executed_macs(fn) -> tuple[int, dict]:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2, counter.get_flop_counts()["Global"]


@pytest.mark.parametrize("case", ["3x3_odd", "stride2", "depthwise", "2x3_asym"])
def test_flop_counter_counts_only_executed_macs(case: str) -> None:
    x, weight, bias, conv = make_case(case, dtype=torch.float32)
    ref = dense(x, weight, bias, conv)
    n, _, ho, wo = ref.shape
    mask = random_mask((n, ho, wo), 0.3)
    macs, per_op = executed_macs(lambda: sparse_conv2d(x, mask, weight, bias, **conv, backend="cpu"))
    _, cin_g, kh, kw = weight.shape
    assert macs == int(mask.sum()) * weight.shape[0] * cin_g * kh * kw == sparse_conv2d_macs(mask, weight.shape)
    # only the custom op is counted: its inner mm/conv never reach the counter
    assert set(per_op) == {torch.ops.dynnet.sparse_conv2d}
    macs, _ = executed_macs(lambda: sparse_conv2d(x, mask, weight, bias, **conv, backend="reference"))
    assert macs == conv2d_macs(n, ho, wo, weight.shape) == n * ho * wo * weight.numel()


def test_block_macs_are_clipped_at_the_border() -> None:
    # Hout=9, Wout=7, B=4: block rows hold 4, 4, 1 output rows; block cols 4, 3 output cols
    block_mask = torch.zeros(1, 3, 2, dtype=torch.bool)
    block_mask[0, 2, 1] = True  # corner block: 1 x 3 positions
    block_mask[0, 0, 0] = True  # full block: 4 x 4 positions
    weight_shape = (6, 4, 3, 3)
    assert block_conv2d_macs(block_mask, (9, 7), 4, weight_shape) == (3 + 16) * 6 * 4 * 9
    x, weight, bias, conv = make_case("3x3_odd", dtype=torch.float32)
    mask2 = block_mask.expand(2, 3, 2).clone()
    macs, per_op = executed_macs(lambda: block_conv2d(x, mask2, weight, bias, **conv, block_size=4, backend="cpu"))
    assert macs == 2 * (3 + 16) * 6 * 4 * 9
    assert set(per_op) == {torch.ops.dynnet.block_conv2d}


def test_mac_helpers_accept_counts_and_masks() -> None:
    assert sparse_conv2d_macs(10, (8, 4, 3, 3)) == 10 * 8 * 4 * 9
    assert sparse_conv2d_macs(torch.ones(2, 3, 3, dtype=torch.bool), (8, 4, 1, 1)) == 18 * 32
    assert conv2d_macs(2, 5, 5, (8, 1, 3, 3)) == 2 * 25 * 8 * 9


# --------------------------------------------------------------------------------------------------
# Gradients


def test_gradcheck_float64_cpu_path() -> None:
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    conv = dict(stride=2, padding=1, dilation=1, groups=2)
    mask = torch.tensor([[[True, False, True], [False, True, True], [True, False, False]]])
    assert torch.autograd.gradcheck(
        lambda a, b, c: sparse_conv2d(a, mask, b, c, **conv, backend="cpu"), (x, weight, bias), fast_mode=True
    )
    block_mask = torch.tensor([[[True, False], [False, True]]])
    assert torch.autograd.gradcheck(
        lambda a, b, c: block_conv2d(a, block_mask, b, c, **conv, block_size=2, backend="cpu"), (x, weight, bias),
        fast_mode=True,
    )


@pytest.mark.parametrize("op", ["sparse", "block"])
def test_gradients_match_dense_reference_on_active_outputs(op: str) -> None:
    x, weight, bias, conv = make_case("3x3_odd")
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    oracle = [t.clone().requires_grad_() for t in (x, weight, bias)]
    if op == "sparse":
        pixels = random_mask((2, 9, 7), 0.4)
        out = sparse_conv2d(*leaves[:1], pixels, *leaves[1:], **conv, backend="cpu")
    else:
        block_mask = random_mask((2, 3, 3), 0.5)
        pixels = expand_block_mask(block_mask, 9, 7, 3)
        out = block_conv2d(*leaves[:1], block_mask, *leaves[1:], **conv, block_size=3, backend="cpu")
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (dense(*oracle, conv) * pixels.unsqueeze(1) * upstream).sum().backward()
    for got, want in zip(leaves, oracle, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# Bad input


def _args(**changes):
    x, weight, bias, _ = make_case("3x3_odd", dtype=torch.float32)
    args = dict(x=x, mask=torch.ones(2, 9, 7, dtype=torch.bool), weight=weight, bias=bias, stride=1, padding=1)
    args.update(changes)
    return args


BAD_INPUTS = [
    ("x_rank", dict(x=torch.randn(4, 9, 7)), ValueError, "x: expected a 4-D tensor"),
    ("x_not_tensor", dict(x=[[1.0]]), TypeError, "x: expected a torch.Tensor"),
    ("x_int", dict(x=torch.ones(2, 4, 9, 7, dtype=torch.int64)), TypeError, "x: expected dtype"),
    ("weight_rank", dict(weight=torch.randn(6, 4, 3)), ValueError, "weight: expected a 4-D tensor"),
    ("weight_dtype", dict(weight=torch.randn(6, 4, 3, 3, dtype=torch.float64)), TypeError, "weight: expected dtype"),
    ("weight_cin", dict(weight=torch.randn(6, 3, 3, 3)), ValueError, "weight: expected shape (*, 4, *, *)"),
    ("bias_shape", dict(bias=torch.randn(5)), ValueError, "bias: expected shape (6,)"),
    ("mask_float", dict(mask=torch.ones(2, 9, 7)), TypeError, "mask: expected dtype bool"),
    ("mask_shape", dict(mask=torch.ones(2, 8, 8, dtype=torch.bool)), ValueError,
     "mask: expected shape (2, 9, 7) for the conv output, got (2, 8, 8)"),
    ("mask_rank", dict(mask=torch.ones(9, 7, dtype=torch.bool)), ValueError, "mask: expected shape (2, 9, 7)"),
    ("stride_zero", dict(stride=0), ValueError, "stride: expected values >= 1"),
    ("stride_triple", dict(stride=(1, 1, 1)), TypeError, "stride: expected an int or a pair"),
    ("padding_negative", dict(padding=-1), ValueError, "padding: expected values >= 0"),
    ("padding_float", dict(padding=1.0), TypeError, "padding: expected an int or a pair"),
    ("too_small", dict(padding=0, x=torch.randn(2, 4, 2, 2)), ValueError, "x: spatial size (2, 2) is too small"),
    ("residual_shape", dict(residual=torch.randn(2, 6, 9, 8)), ValueError,
     "residual: expected shape (2, 6, 9, 7) (the conv output), got (2, 6, 9, 8)"),
    ("residual_dtype", dict(residual=torch.randn(2, 6, 9, 7, dtype=torch.float64)), TypeError,
     "residual: expected dtype torch.float32 (the dtype of x)"),
    ("residual_not_tensor", dict(residual=1.0), TypeError, "residual: expected a torch.Tensor"),
]


@pytest.mark.parametrize("name, changes, exc, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_sparse_conv2d_rejects_bad_input(name, changes, exc, message) -> None:
    with pytest.raises(exc, match=_escape(message)):
        sparse_conv2d(**_args(**changes), backend="cpu")


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_groups_must_divide_channels() -> None:
    x = torch.randn(1, 6, 5, 5)
    with pytest.raises(ValueError, match="x: 6 is not divisible by groups=4"):
        sparse_conv2d(x, torch.ones(1, 5, 5, dtype=torch.bool), torch.randn(4, 1, 1, 1), groups=4)
    with pytest.raises(ValueError, match="weight: 5 is not divisible by groups=3"):
        sparse_conv2d(x, torch.ones(1, 5, 5, dtype=torch.bool), torch.randn(5, 2, 1, 1), groups=3)
    with pytest.raises(ValueError, match="groups: expected an int >= 1"):
        sparse_conv2d(x, torch.ones(1, 5, 5, dtype=torch.bool), torch.randn(6, 6, 1, 1), groups=0)


def test_block_conv2d_rejects_bad_input() -> None:
    x, weight, bias, _ = make_case("3x3_odd", dtype=torch.float32)
    good = torch.ones(2, 3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=_escape("block_mask: expected shape (2, 3, 2) for the conv output in 4x4")):
        block_conv2d(x, torch.ones(2, 9, 7, dtype=torch.bool), weight, bias, padding=1, block_size=4)
    with pytest.raises(TypeError, match="block_mask: expected dtype bool"):
        block_conv2d(x, good.float(), weight, bias, padding=1, block_size=4)
    with pytest.raises(ValueError, match="block_size: expected an int >= 1"):
        block_conv2d(x, good, weight, bias, padding=1, block_size=0)
    with pytest.raises(TypeError, match="block_size: expected an int"):
        block_conv2d(x, good, weight, bias, padding=1, block_size=4.0)


def test_mask_on_other_device_is_rejected() -> None:
    x, weight, bias, _ = make_case("3x3_odd", dtype=torch.float32)
    with pytest.raises(ValueError, match="mask: expected a tensor on meta"):
        sparse_conv2d(x.to("meta"), torch.ones(2, 9, 7, dtype=torch.bool), weight.to("meta"), None, padding=1)


# --------------------------------------------------------------------------------------------------
# Backend switch


def test_backend_argument_env_var_and_unknown_name(monkeypatch: pytest.MonkeyPatch) -> None:
    x, weight, bias, conv = make_case("3x3_odd", dtype=torch.float32)
    mask = random_mask((2, 9, 7), 0.3)
    sparse_macs = sparse_conv2d_macs(mask, weight.shape)
    dense_macs = conv2d_macs(2, 9, 7, weight.shape)
    monkeypatch.setenv("DYNNET_KERNEL_BACKEND", "reference")
    assert executed_macs(lambda: sparse_conv2d(x, mask, weight, bias, **conv))[0] == dense_macs
    assert executed_macs(lambda: sparse_conv2d(x, mask, weight, bias, **conv, backend="cpu"))[0] == sparse_macs
    monkeypatch.setenv("DYNNET_KERNEL_BACKEND", "CPU")
    assert executed_macs(lambda: sparse_conv2d(x, mask, weight, bias, **conv))[0] == sparse_macs
    monkeypatch.setenv("DYNNET_KERNEL_BACKEND", "cuda-fast")
    with pytest.raises(ValueError, match="DYNNET_KERNEL_BACKEND: unknown kernel backend 'cuda-fast'"):
        sparse_conv2d(x, mask, weight, bias, **conv)
    monkeypatch.delenv("DYNNET_KERNEL_BACKEND")
    with pytest.raises(ValueError, match="backend: unknown kernel backend 'fast'"):
        block_conv2d(x, torch.ones(2, 3, 2, dtype=torch.bool), weight, bias, **conv, block_size=4, backend="fast")


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, weight, bias, conv = make_case("3x3_odd", dtype=torch.float32)
    with pytest.raises(ValueError, match="backend: 'triton' needs CUDA tensors or TRITON_INTERPRET=1"):
        sparse_conv2d(x, random_mask((2, 9, 7), 0.3), weight, bias, **conv, backend="triton")


@pytest.mark.parametrize("op", ["sparse", "block"])
def test_auto_falls_back_to_dense_above_break_even(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYNNET_KERNEL_BACKEND", raising=False)
    x, weight, bias, conv = make_case("3x3_odd", dtype=torch.float32)
    ref = dense(x, weight, bias, conv)
    dense_macs = conv2d_macs(2, 9, 7, weight.shape)
    if op == "sparse":
        table, mask = sparse_mod.SPARSE_CONV2D_BREAK_EVEN, random_mask((2, 9, 7), 0.5)
        pixels = mask

        def run():
            return sparse_conv2d(x, mask, weight, bias, **conv)

        sparse_macs = sparse_conv2d_macs(mask, weight.shape)
    else:
        table, mask = block_mod.BLOCK_CONV2D_BREAK_EVEN, random_mask((2, 3, 3), 0.5)
        pixels = expand_block_mask(mask, 9, 7, 3)

        def run():
            return block_conv2d(x, mask, weight, bias, **conv, block_size=3)

        sparse_macs = block_conv2d_macs(mask, (9, 7), 3, weight.shape)
    density = float(pixels.float().mean())
    assert sparse_macs < dense_macs
    monkeypatch.setitem(table, "cpu", density - 0.01)  # above break-even: dense runs and is counted
    monkeypatch.setattr(sparse_mod, "FUSED_BREAK_EVEN", density - 0.01)  # (float32 NCHW: the fused kernel's)
    macs, _ = executed_macs(run)
    assert macs == dense_macs
    torch.testing.assert_close(run(), ref * pixels.unsqueeze(1), rtol=1e-5, atol=1e-5)
    monkeypatch.setitem(table, "cpu", density + 0.01)  # below: the cpu path
    monkeypatch.setattr(sparse_mod, "FUSED_BREAK_EVEN", density + 0.01)
    assert executed_macs(run)[0] == sparse_macs
    torch.testing.assert_close(run(), ref * pixels.unsqueeze(1), rtol=1e-5, atol=1e-5)


def test_plans_skip_no_check_and_follow_every_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stored plan (``kernels._plans``) serves only calls of the same signature: a call that differs in
    a dtype, a shape, a bool parameter, the environment or a module setting is checked and routed anew."""
    from kernels import _plans  # noqa: PLC0415

    monkeypatch.delenv("DYNNET_KERNEL_BACKEND", raising=False)
    x, weight, bias, conv = make_case("3x3_odd", dtype=torch.float32)
    mask = random_mask((2, 9, 7), 0.5)
    ref = dense(x, weight, bias, conv) * mask.unsqueeze(1)
    sparse_macs, dense_macs = sparse_conv2d_macs(mask, weight.shape), conv2d_macs(2, 9, 7, weight.shape)
    for _ in range(2):  # the second call runs on the stored plan
        assert executed_macs(lambda: sparse_conv2d(x, mask, weight, bias, **conv))[0] == sparse_macs
    assert _plans.signature((x, mask, weight, bias, None, 1, 1, 1, 1, None)) is not None
    with pytest.raises(TypeError, match="mask: expected dtype bool"):
        sparse_conv2d(x, mask.float(), weight, bias, **conv)
    with pytest.raises(ValueError, match="mask: expected shape"):
        sparse_conv2d(x, mask[:1], weight, bias, **conv)
    bad = {**conv, "groups": True}
    assert _plans.signature((x, mask, weight, bias, None, *bad.values(), None)) is None  # never planned
    with pytest.raises(TypeError, match="groups: expected an int"):
        sparse_conv2d(x, mask, weight, bias, **bad)
    monkeypatch.setenv("DYNNET_KERNEL_BACKEND", "reference")  # the environment is part of the key
    assert executed_macs(lambda: sparse_conv2d(x, mask, weight, bias, **conv))[0] == dense_macs
    monkeypatch.delenv("DYNNET_KERNEL_BACKEND")
    monkeypatch.setattr(sparse_mod, "FUSED_BREAK_EVEN", 0.0)  # a module setting too: auto now runs dense
    monkeypatch.setitem(sparse_mod.SPARSE_CONV2D_BREAK_EVEN, "cpu", 0.0)
    assert executed_macs(lambda: sparse_conv2d(x, mask, weight, bias, **conv))[0] == dense_macs
    torch.testing.assert_close(sparse_conv2d(x, mask, weight, bias, **conv), ref, rtol=1e-5, atol=1e-5)


def test_plan_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels import _plans  # noqa: PLC0415

    monkeypatch.setattr(_plans, "SIZE", 3)
    monkeypatch.setattr(_plans, "_PLANS", {})
    weight = torch.randn(2, 2, 3, 3)
    for size in range(5, 10):
        x = torch.randn(1, 2, size, size)
        sparse_conv2d(x, torch.ones(1, size, size, dtype=torch.bool), weight, padding=1)
        assert 1 <= len(_plans._PLANS) <= 3


def test_break_even_constants_are_fractions() -> None:
    for table in (sparse_mod.SPARSE_CONV2D_BREAK_EVEN, block_mod.BLOCK_CONV2D_BREAK_EVEN):
        assert set(table) == {"cpu", "cuda"}
        assert all(0.0 <= v <= 1.0 for v in table.values())
    assert 0.0 <= sparse_mod.FUSED_BREAK_EVEN <= 1.0 and 0.0 <= sparse_mod.FUSED_LARGE_BREAK_EVEN <= 1.0
    large = sparse_mod.FUSED_LARGE_MACS
    assert sparse_mod.fused_break_even(large - 1) == sparse_mod.FUSED_BREAK_EVEN
    assert sparse_mod.fused_break_even(large) == sparse_mod.FUSED_LARGE_BREAK_EVEN


def test_break_even_follows_the_route_that_would_run() -> None:
    """The fused kernel's break-even applies only where it runs (float32, groups=1, AVX-512 build)."""
    from kernels import _native  # noqa: PLC0415

    table = sparse_mod.SPARSE_CONV2D_BREAK_EVEN
    x, weight = torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3, 3)
    fused = _native.usable(x, weight)
    assert sparse_mod.cpu_break_even(x, weight, 1, table) == (sparse_mod.FUSED_BREAK_EVEN if fused else table["cpu"])
    assert sparse_mod.cpu_break_even(x.double(), weight.double(), 1, table) == table["cpu"]
    assert sparse_mod.cpu_break_even(x, torch.randn(4, 2, 3, 3), 2, table) == table["cpu"]
    cl = x.contiguous(memory_format=torch.channels_last)  # the fused kernel serves NHWC too
    assert sparse_mod.cpu_break_even(cl, weight, 1, table) == (sparse_mod.FUSED_BREAK_EVEN if fused else table["cpu"])
    large = sparse_mod.FUSED_LARGE_MACS  # a large dense conv: the fused kernel's lower break-even
    want = sparse_mod.FUSED_LARGE_BREAK_EVEN if fused else table["cpu"]
    assert sparse_mod.cpu_break_even(x, weight, 1, table, dense_macs=large) == want
    assert block_mod.block_break_even(x, weight, 1, dense_macs=large) == (
        want if fused else block_mod.BLOCK_CONV2D_BREAK_EVEN["cpu"])


def test_auto_falls_back_on_large_convs_at_high_density(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the fused kernel runs, a conv of at least FUSED_LARGE_MACS dense MACs falls back to dense above
    FUSED_LARGE_BREAK_EVEN; a smaller one never does."""
    from kernels import _native  # noqa: PLC0415

    monkeypatch.delenv("DYNNET_KERNEL_BACKEND", raising=False)
    x, weight = torch.randn(1, 4, 9, 9), torch.randn(4, 4, 3, 3)
    if not _native.usable(x, weight):
        return  # no fused kernel here: test_auto_falls_back_to_dense_above_break_even covers the routes
    mask = torch.rand(1, 9, 9, generator=torch.Generator().manual_seed(0)) < 0.9
    dense_macs, sparse_macs = conv2d_macs(1, 9, 9, weight.shape), sparse_conv2d_macs(mask, weight.shape)
    assert executed_macs(lambda: sparse_conv2d(x, mask, weight, padding=1))[0] == sparse_macs
    monkeypatch.setattr(sparse_mod, "FUSED_LARGE_MACS", dense_macs)  # this conv now counts as large
    assert float(mask.float().mean()) > sparse_mod.FUSED_LARGE_BREAK_EVEN
    assert executed_macs(lambda: sparse_conv2d(x, mask, weight, padding=1))[0] == dense_macs


# --------------------------------------------------------------------------------------------------
# reduce_mask


def test_reduce_mask_max_and_avg() -> None:
    mask = torch.zeros(1, 5, 6, dtype=torch.bool)
    mask[0, 0, 0] = True  # 1 of 4 pixels in block (0, 0)
    mask[0, 4, 4:6] = True  # the 1x2 border block (2, 2) completely
    got = reduce_mask(mask, 2, tol=0.0, mode="max")
    want = torch.zeros(1, 3, 3, dtype=torch.bool)
    want[0, 0, 0] = want[0, 2, 2] = True
    assert torch.equal(got, want)
    avg = reduce_mask(mask, 2, tol=0.5, mode="avg")  # 0.25 in block (0,0): off; 1.0 in border block: on
    want[0, 0, 0] = False
    assert torch.equal(avg, want)
    soft = torch.full((1, 4, 4), 0.3)
    assert bool(reduce_mask(soft, 4, tol=0.2, mode="avg").all())
    assert not bool(reduce_mask(soft, 4, tol=0.4, mode="max").any())


def test_reduce_mask_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode: expected 'max' or 'avg'"):
        reduce_mask(torch.ones(1, 4, 4, dtype=torch.bool), 2, mode="sum")
    with pytest.raises(ValueError, match="tol: expected a number in"):
        reduce_mask(torch.ones(1, 4, 4, dtype=torch.bool), 2, tol=1.5)
    with pytest.raises(ValueError, match="mask: expected a 3-D tensor"):
        reduce_mask(torch.ones(4, 4, dtype=torch.bool), 2)
    with pytest.raises(TypeError, match="mask: expected a bool or floating tensor"):
        reduce_mask(torch.ones(1, 4, 4, dtype=torch.int64), 2)


# --------------------------------------------------------------------------------------------------
# Triton path under the interpreter (subprocess: TRITON_INTERPRET must be set before kernels are defined)

INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode
    from kernels import _triton_conv
    from kernels.block_conv import block_conv2d, block_conv2d_macs, expand_block_mask
    from kernels.sparse_conv import sparse_conv2d, sparse_conv2d_macs

    torch.manual_seed(0)
    cases = [  # N, Cin, Cout, H, W, k, stride, padding, dilation, groups, block
        (2, 4, 6, 7, 5, 3, 1, 1, 1, 1, 4),
        (1, 4, 6, 7, 7, 3, 2, 1, 1, 2, 3),
        (1, 3, 3, 6, 7, 3, 1, 2, 2, 3, 4),
        (2, 4, 5, 5, 6, 1, 1, 0, 1, 1, 2),
    ]
    # both loop structures of the kernel (FLAT: one loop over taps x Cin chunks; else taps unrolled)
    runs = [(True, case) for case in cases] + [(False, case) for case in cases[:2]]
    for flat, (n, cin, cout, h, w, k, s, p, d, g, bs) in runs:
        _triton_conv.FIXED_FLAT = flat
        x = torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(cout, cin // g, k, k)
        bias = torch.randn(cout)
        conv = dict(stride=s, padding=p, dilation=d, groups=g)
        ref = F.conv2d(x, weight, bias, **conv)
        ho, wo = ref.shape[2:]
        mask = torch.rand(n, ho, wo) < 0.4
        mask[0] = False  # one sample with nothing active
        out = sparse_conv2d(x, mask, weight, bias, **conv, backend="triton")
        torch.testing.assert_close(out, ref * mask[:, None], rtol=1e-4, atol=1e-4)
        assert out.is_contiguous(memory_format=torch.channels_last)
        residual = torch.randn_like(ref)
        out = sparse_conv2d(x, mask, weight, bias, **conv, backend="triton", residual=residual)
        torch.testing.assert_close(out, residual + ref * mask[:, None], rtol=1e-4, atol=1e-4)
        assert out.is_contiguous(memory_format=torch.channels_last)
        block_mask = torch.rand(n, -(-ho // bs), -(-wo // bs)) < 0.5
        out = block_conv2d(x.contiguous(), block_mask, weight, None, **conv, block_size=bs, backend="triton")
        want = F.conv2d(x, weight, None, **conv) * expand_block_mask(block_mask, ho, wo, bs)[:, None]
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        assert out.is_contiguous()
    _triton_conv.FIXED_FLAT = True
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    empty = sparse_conv2d(x, torch.zeros(1, 5, 5, dtype=torch.bool), weight, None, padding=1, backend="triton")
    assert bool((empty == 0).all())
    full = torch.ones(1, 5, 5, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        out = sparse_conv2d(x, full, weight, None, padding=1, backend="triton")
        out2 = block_conv2d(x, torch.ones(1, 2, 2, dtype=torch.bool), weight, None, padding=1, block_size=3,
                            backend="triton")
    torch.testing.assert_close(out, F.conv2d(x, weight, None, padding=1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out2, out, rtol=1e-4, atol=1e-4)
    assert counter.get_total_flops() == 2 * 2 * sparse_conv2d_macs(full, weight.shape)
    print("INTERPRETER-OK")
    """
)


def test_triton_path_under_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    env.pop("DYNNET_KERNEL_BACKEND", None)
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETER_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "INTERPRETER-OK" in done.stdout


def test_auto_density_is_only_computed_when_it_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYNNET_KERNEL_BACKEND", raising=False)

    def executed() -> float:
        raise AssertionError("the density was computed although the break-even alone decides")

    assert sparse_mod.auto_density("cpu", 0.5, executed) is None
    assert sparse_mod.auto_density(None, 1.0, executed) is None
    assert sparse_mod.auto_density("auto", 0.0, executed) == 0.0  # break-even 0: always dense
    assert sparse_mod.auto_density("auto", 0.5, lambda: 0.25) == 0.25


def test_plain_eager_calls_skip_the_dispatcher_but_not_under_modes() -> None:
    x, weight, bias, conv = make_case("3x3_odd", dtype=torch.float32)
    assert sparse_mod.dispatch_free(x, weight, bias)
    with FlopCounterMode(display=False):
        assert not sparse_mod.dispatch_free(x, weight, bias)
    assert not sparse_mod.dispatch_free(x, weight.requires_grad_(), bias)
    with torch.no_grad():
        assert sparse_mod.dispatch_free(x, weight, bias)
        # a module's weights are Parameters: still plain tensors for the dispatcher
        assert sparse_mod.dispatch_free(x, torch.nn.Parameter(weight.detach()), torch.nn.Parameter(bias))
    fake = torch._subclasses.fake_tensor.FakeTensorMode().from_tensor(x)
    assert not sparse_mod.dispatch_free(fake, weight, bias)  # tensor subclasses go through the op


@pytest.mark.parametrize("op", ["sparse", "block"])
def test_workspace_filled_in_inference_mode_is_not_reused_outside_it(op):
    """The per-thread scratch buffers are kept per mode: an inference tensor cannot be written outside."""
    torch.manual_seed(0)
    x, w = torch.randn(1, 4, 16, 16), torch.randn(4, 4, 3, 3)
    if op == "sparse":
        mask = torch.rand(1, 16, 16) < 0.3
        call = lambda: sparse_conv2d(x, mask, w, None, 1, 1, backend="cpu")  # noqa: E731
    else:
        mask = torch.rand(1, 2, 2) < 0.6
        call = lambda: block_conv2d(x, mask, w, None, 1, 1, block_size=8, backend="cpu")  # noqa: E731
    with torch.inference_mode():
        inside = call()
    with torch.no_grad():
        outside = call()
    torch.testing.assert_close(outside, inside.clone())


@pytest.mark.parametrize("channels_last", [False, True])
def test_cheap_zeroing_equals_masked_fill_in_both_layouts_even_for_inf_and_nan(channels_last: bool) -> None:
    """``zero_outside(exact=False)`` (the dense fallback) writes exactly the oracle's zeros."""
    out = torch.randn(2, 5, 4, 6)
    out[0, 1, 0, 0], out[1, 3, 2, 5], out[1, 0, 3, 1] = float("inf"), float("nan"), float("-inf")
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    pixels = torch.rand(2, 4, 6) < 0.5
    pixels[0, 0, 0] = pixels[1, 2, 5] = False  # the non-finite values sit at inactive positions
    expected = out.clone().masked_fill_(~pixels.unsqueeze(1), 0)
    got = sparse_mod.zero_outside(out.clone(), pixels, exact=False)
    assert torch.equal(got.isnan(), expected.isnan())
    torch.testing.assert_close(got, expected, equal_nan=True, rtol=0, atol=0)
    assert bool((got.masked_select(~pixels.unsqueeze(1).expand_as(got)) == 0).all())
    strided = torch.randn(2, 5, 4, 12)[..., ::2]  # neither layout: the masked_fill route
    torch.testing.assert_close(sparse_mod.zero_outside(strided.clone(), pixels, exact=False),
                               strided.masked_fill(~pixels.unsqueeze(1), 0))
