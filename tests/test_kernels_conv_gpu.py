"""Triton path of sparse_conv2d / block_conv2d on CUDA against the dense oracle (run with ``-m gpu``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from kernels.block_conv import block_conv2d, block_conv2d_macs, expand_block_mask
from kernels.sparse_conv import sparse_conv2d, sparse_conv2d_macs

pytestmark = pytest.mark.gpu

# (N, Cin, Cout, H, W, k, stride, padding, dilation, groups, block)
SHAPES = [
    (8, 64, 64, 56, 56, 3, 1, 1, 1, 1, 8),
    (2, 256, 256, 28, 28, 3, 1, 1, 1, 1, 8),
    (3, 48, 80, 17, 23, 3, 2, 1, 1, 1, 4),
    (2, 32, 32, 15, 15, 3, 1, 2, 2, 4, 5),
    (2, 32, 32, 20, 20, 3, 1, 1, 1, 32, 8),
    (4, 96, 40, 14, 14, 1, 1, 0, 1, 1, 16),
]
TOL = {torch.float16: 2e-3, torch.float32: 1e-4}


@pytest.fixture(scope="module")
def device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("these tests need CUDA (they are deselected by default; run them on a GPU machine)")
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _fixed_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed tiles keep the many-shape tests fast; test_autotuned_* turn autotuning back on."""
    monkeypatch.setenv("DYNNET_TRITON_AUTOTUNE", "0")


def _case(shape, dtype, device, channels_last=True):
    n, cin, cout, h, w, k, s, p, d, g, bs = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, w, generator=gen).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, cin // g, k, k, generator=gen) / (k * (cin // g) ** 0.5)).to(device, dtype)
    bias = torch.randn(cout, generator=gen).to(device, dtype)
    conv = dict(stride=s, padding=p, dilation=d, groups=g)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), **conv)
    return x, weight, bias, conv, ref, bs


def _assert_close(out, want, dtype):
    scale = float(want.abs().max()) or 1.0
    torch.testing.assert_close(out.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[1]}x{s[3]}x{s[4]}k{s[5]}s{s[6]}g{s[9]}" for s in SHAPES])
def test_triton_sparse_conv2d_matches_reference(shape, dtype, device) -> None:
    x, weight, bias, conv, ref, _ = _case(shape, dtype, device)
    n, _, ho, wo = ref.shape
    for density in (0.0, 0.1, 0.5, 1.0):
        mask = torch.rand(n, ho, wo, device=device) < density
        mask[0] = False if density < 1.0 else mask[0]
        out = sparse_conv2d(x, mask, weight, bias, **conv, backend="triton")
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
        _assert_close(out, ref * mask[:, None], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[1]}x{s[3]}x{s[4]}k{s[5]}s{s[6]}g{s[9]}" for s in SHAPES])
def test_triton_block_conv2d_matches_reference(shape, dtype, device) -> None:
    x, weight, bias, conv, ref, bs = _case(shape, dtype, device)
    n, _, ho, wo = ref.shape
    for density in (0.0, 0.3, 1.0):
        block_mask = torch.rand(n, -(-ho // bs), -(-wo // bs), device=device) < density
        out = block_conv2d(x, block_mask, weight, bias, **conv, block_size=bs, backend="triton")
        _assert_close(out, ref * expand_block_mask(block_mask, ho, wo, bs)[:, None], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=["8x64x56", "2x256x28"])
def test_autotuned_kernels_match_reference(shape, dtype, device, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNNET_TRITON_AUTOTUNE", "1")
    x, weight, bias, conv, ref, bs = _case(shape, dtype, device)
    n, _, ho, wo = ref.shape
    mask = torch.rand(n, ho, wo, device=device) < 0.3
    _assert_close(sparse_conv2d(x, mask, weight, bias, **conv, backend="triton"), ref * mask[:, None], dtype)
    block_mask = torch.rand(n, -(-ho // bs), -(-wo // bs), device=device) < 0.3
    out = block_conv2d(x, block_mask, weight, bias, **conv, block_size=bs, backend="triton")
    _assert_close(out, ref * expand_block_mask(block_mask, ho, wo, bs)[:, None], dtype)


def test_triton_nchw_input_and_no_bias(device) -> None:
    x, weight, _, conv, _, bs = _case(SHAPES[2], torch.float32, device, channels_last=False)
    ref = F.conv2d(x.double(), weight.double(), None, **conv)
    mask = torch.rand(ref.shape[0], *ref.shape[2:], device=device) < 0.4
    out = sparse_conv2d(x, mask, weight, None, **conv, backend="triton")
    assert out.is_contiguous()
    _assert_close(out, ref * mask[:, None], torch.float32)


def test_triton_path_has_no_host_sync(device) -> None:
    x, weight, bias, conv, _, bs = _case(SHAPES[0], torch.float16, device)
    mask = torch.rand(8, 56, 56, device=device) < 0.3
    block_mask = torch.rand(8, 7, 7, device=device) < 0.3
    sparse_conv2d(x, mask, weight, bias, **conv, backend="triton")  # compile outside the check
    block_conv2d(x, block_mask, weight, bias, **conv, block_size=bs, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sparse_conv2d(x, mask, weight, bias, **conv, backend="triton")
        block_conv2d(x, block_mask, weight, bias, **conv, block_size=bs, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_triton_flops_and_gradients(device) -> None:
    x, weight, bias, conv, ref, bs = _case(SHAPES[2], torch.float32, device)
    n, _, ho, wo = ref.shape
    mask = torch.rand(n, ho, wo, device=device) < 0.3
    block_mask = torch.rand(n, -(-ho // bs), -(-wo // bs), device=device) < 0.3
    with FlopCounterMode(display=False) as counter:
        sparse_conv2d(x, mask, weight, bias, **conv, backend="triton")
        block_conv2d(x, block_mask, weight, bias, **conv, block_size=bs, backend="triton")
    want = sparse_conv2d_macs(mask, weight.shape) + block_conv2d_macs(block_mask, (ho, wo), bs, weight.shape)
    assert counter.get_total_flops() // 2 == want
    leaf = x.detach().clone().requires_grad_()
    out = sparse_conv2d(leaf, mask, weight, bias, **conv, backend="triton")
    out.sum().backward()
    oracle = x.detach().clone().requires_grad_()
    (F.conv2d(oracle, weight, bias, **conv) * mask[:, None]).sum().backward()
    torch.testing.assert_close(leaf.grad, oracle.grad, rtol=1e-4, atol=1e-4)


def test_auto_on_cuda_follows_the_break_even(device, monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels import sparse_conv as sparse_mod

    x, weight, bias, conv, ref, _ = _case(SHAPES[0], torch.float16, device)
    mask = torch.zeros(8, 56, 56, dtype=torch.bool, device=device)
    mask[:, :10] = True  # density 10/56
    for break_even, want in ((0.5, sparse_conv2d_macs(mask, weight.shape)), (0.1, 8 * 56 * 56 * weight.numel())):
        monkeypatch.setitem(sparse_mod.SPARSE_CONV2D_BREAK_EVEN, "cuda", break_even)
        with FlopCounterMode(display=False) as counter:
            out = sparse_conv2d(x, mask, weight, bias, **conv)
        assert counter.get_total_flops() // 2 == want
        _assert_close(out, ref * mask[:, None], torch.float16)
