"""The native CPU loops (``kernels/_native.c``): the fused sparse conv and the gather/scatter helpers.

Float32 against the dense oracle (the fused kernel sums in another order than oneDNN, so to 1e-4),
the pure-PyTorch fallback when the library is off, and weight-cache invalidation.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import _native
from kernels import sparse_conv as sparse_mod
from kernels.block_conv import block_conv2d, expand_block_mask
from kernels.routed import routed_linear
from kernels.sparse_conv import _conv_geometry, packed_weight, sparse_conv2d

ROOT = Path(__file__).resolve().parent.parent
TOL = dict(rtol=1e-4, atol=1e-4)


def _has_avx512() -> bool:
    try:
        return " avx512f " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


def fused_ran(x, mask, weight, bias, **conv) -> bool:
    """Whether the fused kernel (not a fallback route) serves this call."""
    g = _conv_geometry(tuple(x.shape), tuple(weight.shape), None, conv.get("stride", 1), conv.get("padding", 0),
                       conv.get("dilation", 1), conv.get("groups", 1))
    return sparse_mod.fused_route(x, mask, weight, bias, g) is not None


def test_library_builds_where_a_compiler_and_avx512_exist() -> None:
    """On a machine with a C compiler and AVX-512 (this project's CI kind) the fused kernel must run."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        assert _native.lib() is None
        return
    assert _native.lib() is not None
    x, weight = torch.randn(1, 4, 6, 6), torch.randn(20, 4, 3, 3)
    assert fused_ran(x, torch.ones(1, 6, 6, dtype=torch.bool), weight, None, padding=1) == _has_avx512()


@pytest.mark.parametrize(
    "shape",
    [  # (N, Cin, Cout, H, W, k, stride, padding, dilation)
        (2, 5, 20, 9, 7, 3, 1, 1, 1),  # Cout not a multiple of 16
        (1, 16, 80, 11, 13, 3, 2, 1, 1),  # stride 2, two register tiles of output channels
        (2, 3, 7, 9, 9, 3, 1, 2, 2),  # dilation 2
        (1, 8, 16, 8, 9, 1, 1, 0, 1),  # 1x1
        (1, 3, 33, 9, 8, 5, 1, 0, 1),  # 5x5 without padding
        (3, 64, 64, 12, 12, 3, 1, 1, 1),  # enough channels for several input-channel passes
        (1, 4, 24, 20, 20, 3, 1, 1, 1),  # border rows/columns run their valid taps in place, corners as patches
        (2, 5, 8, 12, 12, 3, 1, 3, 1),  # padding 3: outputs on the outer ring read only zero padding
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_kernel_matches_masked_dense(shape, channels_last) -> None:
    n, cin, cout, h, w, k, s, p, d = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, cin, h, w, generator=gen)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    weight = torch.randn(cout, cin, k, k, generator=gen) / (cin * k * k) ** 0.5
    bias = torch.randn(cout, generator=gen)
    ref = F.conv2d(x, weight, bias, s, p, d)
    ho, wo = ref.shape[2:]
    one_empty = torch.rand(n, ho, wo, generator=gen) < 0.5
    one_empty[0] = False
    for kind, mask in {"random": torch.rand(n, ho, wo, generator=gen) < 0.3, "full": torch.ones(n, ho, wo, dtype=torch.bool),
                       "one_sample_empty": one_empty, "single": torch.arange(n * ho * wo).view(n, ho, wo) == 5}.items():
        for b in (bias, None):
            out = sparse_conv2d(x, mask, weight, b, stride=s, padding=p, dilation=d, backend="cpu")
            expected = F.conv2d(x, weight, b, s, p, d).masked_fill(~mask.unsqueeze(1), 0)
            torch.testing.assert_close(out, expected, **TOL, msg=kind)
            assert bool((out[~mask.unsqueeze(1).expand_as(out)] == 0).all()), kind
            assert out.is_contiguous(memory_format=fmt)
    if _native.lib() is not None and _has_avx512():
        assert fused_ran(x, mask, weight, bias, stride=s, padding=p, dilation=d)


@pytest.mark.parametrize(
    "shape",
    [  # (N, Cin, Cout, H, W, density): work split over threads by (tile, column block)
        (2, 24, 200, 20, 20, 0.6),  # more than one group of 16 tiles, four column blocks (the last narrower)
        (1, 40, 144, 3, 3, 1.0),  # a late 3x3 map: one interior output < Cout, so every output is patched
        (1, 40, 136, 6, 6, 0.4),  # interior and border outputs, few tiles, three column blocks
        (1, 8, 16, 40, 40, 0.3),  # many tiles, one column block
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_kernel_split_over_threads(shape, channels_last, monkeypatch) -> None:
    n, cin, cout, h, w, density = shape
    monkeypatch.setattr(_native, "PARALLEL_MACS", 0)  # every call multi-threaded, however small
    gen = torch.Generator().manual_seed(cout)
    x = torch.randn(n, cin, h, w, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    weight = torch.randn(cout, cin, 3, 3, generator=gen) / (cin * 9) ** 0.5
    bias = torch.randn(cout, generator=gen)
    mask = torch.rand(n, h, w, generator=gen) < density
    with torch.inference_mode():  # as the methods are measured; the weight is then packed per call
        out = sparse_conv2d(x, mask, weight, bias, padding=1, backend="cpu")
    expected = F.conv2d(x, weight, bias, padding=1).masked_fill(~mask.unsqueeze(1), 0)
    torch.testing.assert_close(out, expected, **TOL)
    if _native.lib() is not None and _has_avx512():
        assert fused_ran(x, mask, weight, bias, padding=1)


@pytest.mark.parametrize("cout", [20, 32, 80])  # a narrow last column block; full 16-lane stores (NHWC)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_kernel_adds_into_a_copy_of_the_residual(cout, channels_last) -> None:
    gen = torch.Generator().manual_seed(cout)
    x = torch.randn(2, 12, 11, 10, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    weight, bias = torch.randn(cout, 12, 3, 3, generator=gen) / 10, torch.randn(cout, generator=gen)
    mask = torch.rand(2, 11, 10, generator=gen) < 0.4
    residual = torch.randn(2, cout, 11, 10, generator=gen)
    out = sparse_conv2d(x, mask, weight, bias, padding=1, backend="cpu", residual=residual)
    expected = residual + F.conv2d(x, weight, bias, padding=1).masked_fill(~mask.unsqueeze(1), 0)
    torch.testing.assert_close(out, expected, **TOL)
    assert torch.equal(out.masked_select(~mask.unsqueeze(1)), residual.masked_select(~mask.unsqueeze(1)))
    if _native.lib() is not None and _has_avx512():
        g = _conv_geometry(tuple(x.shape), tuple(weight.shape), None, 1, 1, 1, 1)
        assert sparse_mod.fused_route(x, mask, weight, bias, g, residual=residual) is not None


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3), cin=st.integers(1, 20), cout=st.integers(1, 40), h=st.integers(3, 12), w=st.integers(3, 12),
    k=st.sampled_from([1, 2, 3]), stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
    density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), channels_last=st.booleans(),
)
def test_property_fused_kernel(n, cin, cout, h, w, k, stride, padding, dilation, density, seed, channels_last) -> None:
    if h + 2 * padding - dilation * (k - 1) - 1 < 0 or w + 2 * padding - dilation * (k - 1) - 1 < 0:
        return
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, k, k, generator=gen)
    ref = F.conv2d(x, weight, None, stride, padding, dilation)
    mask = torch.rand(n, *ref.shape[2:], generator=gen) < density
    out = sparse_conv2d(x, mask, weight, stride=stride, padding=padding, dilation=dilation, backend="cpu")
    torch.testing.assert_close(out, ref * mask.unsqueeze(1), **TOL)


@pytest.mark.parametrize("block_size,stride", [(8, 1), (4, 2), (3, 1)])  # border blocks clipped in each
@pytest.mark.parametrize("channels_last", [False, True])
def test_block_conv2d_float32_runs_the_fused_kernel_exactly_on_active_blocks(block_size, stride, channels_last) -> None:
    gen = torch.Generator().manual_seed(block_size)
    x, weight, bias = torch.randn(2, 8, 17, 15, generator=gen), torch.randn(24, 8, 3, 3, generator=gen) / 8, torch.randn(24)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ho, wo = -(-17 // stride), -(-15 // stride)
    block_mask = torch.rand(2, -(-ho // block_size), -(-wo // block_size), generator=gen) < 0.5
    out = block_conv2d(x, block_mask, weight, bias, stride=stride, padding=1, block_size=block_size, backend="cpu")
    pixels = expand_block_mask(block_mask, ho, wo, block_size)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, stride, 1) * pixels.unsqueeze(1), **TOL)
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    if _native.lib() is not None and _has_avx512():  # the kernel reads the block mask itself
        g = _conv_geometry(tuple(x.shape), tuple(weight.shape), None, stride, 1, 1, 1)
        assert sparse_mod.fused_route(x, block_mask, weight, bias, g, block_size) is not None


def test_packed_weight_follows_in_place_updates() -> None:
    weight, bias = torch.randn(20, 3, 3, 3), torch.randn(20)
    wt, bt = packed_weight(weight, bias)
    assert wt.shape == (27 * 32,) and bt.shape == (32,)  # one column block: (K, Cout16) row-major
    wt2 = wt.view(27, 32)
    assert bool((wt2[:, 20:] == 0).all()) and bool((bt[20:] == 0).all())
    torch.testing.assert_close(wt2[:, :20], weight.reshape(20, -1).t())
    assert packed_weight(weight, bias)[0] is wt  # cached
    with torch.no_grad():
        weight.mul_(2.0)  # e.g. an optimizer step
    torch.testing.assert_close(packed_weight(weight, bias)[0].view(27, 32)[:, :20], weight.reshape(20, -1).t())
    x, mask = torch.randn(1, 3, 6, 6), torch.rand(1, 6, 6) < 0.5
    out = sparse_conv2d(x, mask, weight, bias, padding=1, backend="cpu")
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, padding=1) * mask.unsqueeze(1), **TOL)


def test_switched_off_library_falls_back_to_pytorch_routes() -> None:
    """``DYNNET_NATIVE=0`` (checked on first use, so in a fresh process): same results, no library."""
    code = (
        "import torch, torch.nn.functional as F\n"
        "from kernels import _native\n"
        "from kernels.sparse_conv import sparse_conv2d\n"
        "assert _native.lib() is None\n"
        "x, w = torch.randn(2, 4, 9, 7), torch.randn(6, 4, 3, 3)\n"
        "m = torch.rand(2, 9, 7) < 0.4\n"
        "out = sparse_conv2d(x, m, w, padding=1, backend='cpu')\n"
        "torch.testing.assert_close(out, F.conv2d(x, w, padding=1) * m.unsqueeze(1), rtol=1e-4, atol=1e-4)\n"
        "print('ok')\n"
    )
    env = {"DYNNET_NATIVE": "0", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_missing_compiler_warns_once_and_falls_back(tmp_path) -> None:
    code = (
        "import warnings, torch, torch.nn.functional as F\n"
        "from kernels import _native\n"
        "from kernels.sparse_conv import sparse_conv2d\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert _native.lib() is None and _native.lib() is None\n"
        "assert len(caught) == 1 and 'native CPU kernel unavailable' in str(caught[0].message), caught\n"
        "x, w = torch.randn(1, 4, 6, 6), torch.randn(5, 4, 3, 3)\n"
        "m = torch.rand(1, 6, 6) < 0.5\n"
        "out = sparse_conv2d(x, m, w, padding=1, backend='cpu')\n"
        "torch.testing.assert_close(out, F.conv2d(x, w, padding=1) * m.unsqueeze(1), rtol=1e-4, atol=1e-4)\n"
        "print('ok')\n"
    )
    env = {"CC": str(tmp_path / "no-such-cc"), "DYNNET_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_packed_weight_is_not_reused_for_a_new_tensor_at_a_freed_address() -> None:
    """A fresh weight that happens to get a dead weight's memory (same shape, version 0) is repacked."""
    x, mask = torch.randn(1, 3, 6, 6), torch.ones(1, 6, 6, dtype=torch.bool)
    for _ in range(20):
        weight = torch.randn(8, 3, 3, 3)
        out = sparse_conv2d(x, mask, weight, padding=1, backend="cpu")
        torch.testing.assert_close(out, F.conv2d(x, weight, padding=1), **TOL)
        del weight


# --------------------------------------------------------------------------------------------------
# routed_linear


@pytest.mark.parametrize("tokens,cin,cout,experts", [(37, 20, 24, 5), (64, 100, 16, 8), (200, 33, 70, 3), (6, 8, 8, 4)])
def test_native_routed_linear_matches_reference(tokens, cin, cout, experts) -> None:
    gen = torch.Generator().manual_seed(tokens + cin)
    x = torch.randn(tokens, cin, generator=gen)
    weight = torch.randn(experts, cout, cin, generator=gen) / cin**0.5
    bias = torch.randn(experts, cout, generator=gen)
    route = torch.randint(0, experts, (tokens,), generator=gen)
    route[: experts - 1] = torch.arange(experts - 1)  # most experts used; the last one maybe not
    for b in (bias, None):
        for r in (route, route.sort().values, route.to(torch.int32)):
            out = routed_linear(x, r, weight, b, backend="cpu")
            expected = routed_linear(x, r, weight, b, backend="reference")
            torch.testing.assert_close(out, expected, **TOL)
    if _native.lib() is not None and _has_avx512():
        wt, bt = _native.packed(weight, bias, _native.pack_routed)
        out = torch.full((tokens, cout), float("nan"))
        assert _native.routed_linear(x, route, wt, bt, out)
        torch.testing.assert_close(out, routed_linear(x, route, weight, bias, backend="reference"), **TOL)


def test_native_routed_linear_rejects_routes_out_of_range_before_writing() -> None:
    if _native.lib() is None or not _has_avx512():
        return  # no native kernel here: routed_linear's own validation covers the error
    x, weight = torch.randn(10, 8), torch.randn(3, 16, 8)
    wt, _ = _native.packed(weight, None, _native.pack_routed)
    out = torch.zeros(10, 16)
    with pytest.raises(ValueError, match="route"):
        _native.routed_linear(x, torch.tensor([0, 1, 2, 3, 0, 0, 0, 0, 0, 0]), wt, None, out)
    assert bool((out == 0).all())


def test_packed_routed_weights_follow_updates() -> None:
    weight = torch.randn(4, 20, 6)
    wt, _ = _native.packed(weight, None, _native.pack_routed)
    assert wt.shape == (4, 6 * 32) and bool((wt.view(4, 6, 32)[..., 20:] == 0).all())
    assert _native.packed(weight, None, _native.pack_routed)[0] is wt
    with torch.no_grad():
        weight.add_(1.0)
    repacked = _native.packed(weight, None, _native.pack_routed)[0].view(4, 6, 32)
    torch.testing.assert_close(repacked[..., :20], weight.transpose(1, 2))


def test_inference_tensors_are_packed_fresh_on_every_call() -> None:
    with torch.inference_mode():
        weight = torch.randn(8, 3, 3, 3)
        first = packed_weight(weight, None)[0]
        weight.mul_(2.0)  # untracked in inference mode: the cache must not serve the old packing
        torch.testing.assert_close(packed_weight(weight, None)[0].view(27, 16)[:, :8], weight.reshape(8, -1).t())
        assert first is not packed_weight(weight, None)[0]


def test_column_blocks_layout() -> None:
    """Blocks of 64 output channels (the last narrower), each (K, width) row-major, one after the other."""
    w_t = torch.arange(5 * 80.0).view(5, 80)
    flat = _native.column_blocks(w_t)
    assert flat.shape == (400,)
    torch.testing.assert_close(flat[:320], w_t[:, :64].reshape(-1))
    torch.testing.assert_close(flat[320:], w_t[:, 64:].reshape(-1))
    batched = _native.column_blocks(torch.stack([w_t, w_t + 1]))
    torch.testing.assert_close(batched[1], flat + 1)
