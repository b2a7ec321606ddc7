"""Channel-sliced linear/conv: per-sample oracle, masking reference, MACs, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from kernels.sliced import sliced_conv2d, sliced_conv2d_macs, sliced_linear, sliced_linear_macs, width_groups

PATHS = ["cpu", "reference"]


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def linear_oracle(x, iw, ow, w, b):
    out = x.new_zeros(x.shape[0], w.shape[0])
    for n, (i, o) in enumerate(zip(iw, ow, strict=True)):
        out[n, :o] = w[:o, :i] @ x[n, :i] + (b[:o] if b is not None else 0)
    return out


def conv_oracle(x, iw, ow, w, b, groups=1, **conv):
    outs = []
    for n, (i, o) in enumerate(zip(iw, ow, strict=True)):
        wn = w[:o] if groups > 1 else w[:o, :i]
        y = F.conv2d(x[n : n + 1, :i], wn, None if b is None else b[:o], groups=i if groups > 1 else 1, **conv)
        outs.append(F.pad(y, (0, 0, 0, 0, 0, w.shape[0] - o)))
    return torch.cat(outs)


def test_width_groups_is_a_partition():
    iw, ow = torch.tensor([3, 1, 3, 2, 1]), torch.tensor([4, 4, 4, 1, 4])
    groups = width_groups(iw, ow)
    assert sorted((i, o, r.tolist()) for i, o, r in groups) == [(1, 4, [1, 4]), (2, 1, [3]), (3, 4, [0, 2])]
    assert width_groups(torch.tensor([2, 2]), torch.tensor([5, 5])) == [(2, 5, None)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("iw", "ow"), [([1, 8, 4, 4, 8], [5, 1, 3, 3, 5]), ([8, 8], [5, 5]), ([1], [1])])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_per_sample_oracle(path, iw, ow, bias):
    x, w = rand(len(iw), 8), rand(5, 8, seed=1)
    b = rand(5, seed=2) if bias else None
    torch.testing.assert_close(sliced_linear(x, iw, ow, w, b, backend=path), linear_oracle(x, iw, ow, w, b))


CONVS = [
    dict(stride=1, padding=1, dilation=1),
    dict(stride=2, padding=0, dilation=1),
    dict(stride=(2, 1), padding=(2, 1), dilation=(2, 1)),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("conv", CONVS)
def test_conv_matches_per_sample_oracle(path, conv):
    iw, ow = [1, 6, 3, 3, 6], [5, 2, 1, 1, 5]  # minimum widths, a repeated pair, full width
    x, w, b = rand(5, 6, 7, 9), rand(5, 6, 3, 3, seed=1), rand(5, seed=2)
    got = sliced_conv2d(x, iw, ow, w, b, backend=path, **conv)
    torch.testing.assert_close(got, conv_oracle(x, iw, ow, w, b, **conv))


@pytest.mark.parametrize("path", PATHS)
def test_depthwise_conv(path):
    iw = [1, 4, 2, 4]
    x, w, b = rand(4, 4, 6, 5), rand(4, 1, 3, 3, seed=1), rand(4, seed=2)
    got = sliced_conv2d(x, iw, torch.tensor(iw), w, b, padding=1, groups=4, backend=path)
    torch.testing.assert_close(got, conv_oracle(x, iw, iw, w, b, groups=4, padding=1))


def test_ignored_inputs_are_never_read_on_the_cpu_path():
    x = rand(2, 4, 5, 5)
    x[:, 2:] = float("nan")
    w = rand(3, 4, 3, 3, seed=1)
    y = sliced_conv2d(x, [2, 1], [3, 2], w, backend="cpu")
    assert torch.isfinite(y).all()
    assert (y[1, 2:] == 0).all()
    assert torch.isfinite(sliced_linear(x[:, :, 0, 0], [2, 2], [1, 3], w[:, :, 0, 0], backend="cpu")).all()
    assert torch.isfinite(sliced_conv2d(x, [2, 1], [3, 2], w, backend="reference")).all()


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 5), cin=st.integers(1, 6), cout=st.integers(1, 6), seed=st.integers(0, 999))
def test_property_cpu_equals_reference(n, cin, cout, seed):
    g = torch.Generator().manual_seed(seed)
    iw, ow = torch.randint(1, cin + 1, (n,), generator=g), torch.randint(1, cout + 1, (n,), generator=g)
    x, w, b = rand(n, cin, 5, 4, seed=seed), rand(cout, cin, 3, 2, seed=seed + 1), rand(cout, seed=seed + 2)
    torch.testing.assert_close(
        sliced_conv2d(x, iw, ow, w, b, padding=1, backend="cpu"),
        sliced_conv2d(x, iw, ow, w, b, padding=1, backend="reference"),
    )
    torch.testing.assert_close(
        sliced_linear(x[..., 0, 0], iw, ow, w[..., 0, 0], b, backend="cpu"),
        sliced_linear(x[..., 0, 0], iw, ow, w[..., 0, 0], b, backend="reference"),
    )


@pytest.mark.parametrize("path", PATHS)
def test_gradcheck(path):
    iw, ow = [1, 3, 2, 2], [3, 1, 2, 2]
    x, w, b = rand(4, 3).requires_grad_(), rand(3, 3, seed=1).requires_grad_(), rand(3, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: sliced_linear(x, iw, ow, w, b, backend=path), (x, w, b))
    xc, wc = rand(4, 3, 4, 3).requires_grad_(), rand(3, 3, 3, 3, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, b: sliced_conv2d(x, iw, ow, w, b, stride=2, padding=1, backend=path), (xc, wc, b), fast_mode=True
    )
    wd = rand(3, 1, 3, 3, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w: sliced_conv2d(x, iw, iw, w, None, padding=1, groups=3, backend=path), (xc, wd), fast_mode=True
    )


def test_cpu_gradients_equal_reference_gradients():
    iw, ow = [2, 6, 6, 1], [4, 4, 1, 4]
    grads = {}
    for path in PATHS:
        leaves = [t.requires_grad_() for t in (rand(4, 6, 5, 5), rand(4, 6, 3, 3, seed=1), rand(4, seed=2))]
        (sliced_conv2d(leaves[0], iw, ow, *leaves[1:], padding=1, backend=path) ** 2).sum().backward()
        grads[path] = [t.grad for t in leaves]
    for got, want in zip(grads["cpu"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want)


def test_macs_counted_by_flop_counter_are_the_executed_macs():
    iw, ow = [1, 6, 3, 3], [5, 2, 1, 5]
    x, w = rand(4, 6, 8, 8, dtype=torch.float32), rand(5, 6, 3, 3, dtype=torch.float32)
    macs = sliced_conv2d_macs(iw, ow, (3, 3), (4, 4))
    assert macs == (1 * 5 + 6 * 2 + 3 * 1 + 3 * 5) * 9 * 16
    with FlopCounterMode(display=False) as counter:
        sliced_conv2d(x, iw, ow, w, stride=2, padding=1, backend="cpu")
    assert counter.get_total_flops() == 2 * macs
    with FlopCounterMode(display=False) as dense:
        sliced_conv2d(x, iw, ow, w, stride=2, padding=1, backend="reference")
    assert dense.get_total_flops() == 2 * 4 * 5 * 6 * 9 * 16  # masking executes the full conv
    with FlopCounterMode(display=False) as counter:
        sliced_linear(x[:, :, 0, 0], iw, ow, w[:, :, 0, 0], backend="cpu")
    assert counter.get_total_flops() == 2 * sliced_linear_macs(iw, ow) == 2 * 35
    dw = rand(6, 1, 3, 3, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        sliced_conv2d(x, iw, iw, dw, padding=1, groups=6, backend="cpu")
    assert counter.get_total_flops() == 2 * sliced_conv2d_macs(iw, iw, (3, 3), (8, 8), depthwise=True)


def _bad_cases():
    x, w = rand(2, 4, 5, 5, dtype=torch.float32), rand(3, 4, 3, 3, dtype=torch.float32)
    xl, wl = x[:, :, 0, 0], w[:, :, 0, 0]
    return [
        (sliced_conv2d, (x, [0, 4], [3, 3], w), {}, ValueError, "in_width"),
        (sliced_conv2d, (x, [5, 4], [3, 3], w), {}, ValueError, "in_width"),
        (sliced_conv2d, (x, [4, 4], [3, 4], w), {}, ValueError, "out_width"),
        (sliced_conv2d, (x, [4, 4, 4], [3, 3], w), {}, ValueError, "in_width"),
        (sliced_conv2d, (x, [4.0, 4], [3, 3], w), {}, TypeError, "in_width"),
        (sliced_conv2d, (x, torch.tensor([4.0, 4.0]), [3, 3], w), {}, TypeError, "in_width"),
        (sliced_conv2d, (x, 4, [3, 3], w), {}, TypeError, "in_width"),
        (sliced_conv2d, (x[0], [4, 4], [3, 3], w), {}, ValueError, "x"),
        (sliced_conv2d, (x, [4, 4], [3, 3], w[:, :3]), {}, ValueError, "weight"),
        (sliced_conv2d, (x, [4, 4], [3, 3], w.double()), {}, TypeError, "weight"),
        (sliced_conv2d, (x, [4, 4], [3, 3], w, w[0, 0, 0, :2]), {}, ValueError, "bias"),
        (sliced_conv2d, (x, [4, 4], [3, 3], w), {"groups": 2}, ValueError, "groups"),
        (sliced_conv2d, (x, [4, 2], [4, 1], rand(4, 1, 3, 3, dtype=torch.float32)), {"groups": 4}, ValueError,
         "out_width"),
        (sliced_conv2d, (x, [4, 4], [3, 3], w), {"stride": 0}, ValueError, "stride"),
        (sliced_conv2d, (x, [4, 4], [3, 3], rand(3, 4, 7, 7, dtype=torch.float32)), {}, ValueError, "x"),
        (sliced_linear, (xl, [4, 4], [3, 3], wl.long()), {}, TypeError, "weight"),
        (sliced_linear, (xl, [4, 4], [3, 3], wl.t()), {}, ValueError, "weight"),
        (sliced_linear, (xl, [4, 4], [3, 9], wl), {}, ValueError, "out_width"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise_naming_the_argument(case):
    fn, args, kwargs, error, name = _bad_cases()[case]
    with pytest.raises(error, match=f"^{name}:"):
        fn(*args, backend="cpu", **kwargs)


def test_backend_switch(monkeypatch):
    x, w = rand(2, 4, dtype=torch.float32), rand(3, 4, dtype=torch.float32)
    monkeypatch.setenv("DYNNET_KERNEL_BACKEND", "reference")
    with FlopCounterMode(display=False) as counter:
        sliced_linear(x, [1, 1], [1, 1], w)
    assert counter.get_total_flops() == 2 * 2 * 3 * 4  # the masking reference ran
    with FlopCounterMode(display=False) as counter:
        sliced_linear(x, [1, 1], [1, 1], w, backend="cpu")
    assert counter.get_total_flops() == 2 * 2
