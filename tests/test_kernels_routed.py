"""routed_linear: cpu and triton (interpreter) paths against the reference, MACs, gradients, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from kernels import routed
from kernels.routed import routed_linear, routed_linear_macs

ROOT = Path(__file__).resolve().parent.parent


def make(tokens, cin, cout, experts, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cin, generator=g, dtype=dtype)
    w = torch.randn(experts, cout, cin, generator=g, dtype=dtype)
    b = torch.randn(experts, cout, generator=g, dtype=dtype) if bias else None
    return x, w, b


def loop_oracle(x, route, w, b):
    """Row by row, independent of every path."""
    rows = [w[int(r)] @ x[t] + (b[int(r)] if b is not None else 0) for t, r in enumerate(route)]
    return torch.stack(rows) if rows else x.new_empty(0, w.shape[1])


ROUTES = {
    "balanced": lambda t, e: torch.arange(t) % e,
    "empty_experts": lambda t, e: (torch.arange(t) % 2) * (e - 1),  # only experts 0 and E-1
    "one_expert_all_rows": lambda t, e: torch.full((t,), e - 1),
    "random": lambda t, e: torch.randint(0, e, (t,), generator=torch.Generator().manual_seed(3)),
}


@pytest.mark.parametrize("kind", sorted(ROUTES))
@pytest.mark.parametrize(("tokens", "cin", "cout", "experts"), [(12, 5, 7, 4), (9, 3, 2, 1), (31, 13, 9, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_matches_row_by_row_oracle(kind, tokens, cin, cout, experts, bias, backend):
    x, w, b = make(tokens, cin, cout, experts, bias=bias)
    route = ROUTES[kind](tokens, experts)
    torch.testing.assert_close(routed_linear(x, route, w, b, backend=backend), loop_oracle(x, route, w, b))


@pytest.mark.parametrize("route_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_path_dtypes(route_dtype, dtype):
    x, w, b = make(17, 8, 6, 3, dtype=torch.float32)
    route = ROUTES["random"](17, 3).to(route_dtype)
    expected = routed_linear(x, route, w, b, backend="reference")
    got = routed_linear(x.to(dtype), route, w.to(dtype), b.to(dtype), backend="cpu")
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, atol=tol * 10, rtol=tol)


def test_zero_rows():
    x, w, b = make(0, 4, 3, 2)
    route = torch.zeros(0, dtype=torch.int64)
    for backend in ("cpu", "reference"):
        assert routed_linear(x, route, w, b, backend=backend).shape == (0, 3)


@settings(max_examples=15, deadline=None)
@given(
    tokens=st.integers(1, 24),
    cin=st.integers(1, 9),
    cout=st.integers(1, 9),
    experts=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_property_cpu_equals_reference(tokens, cin, cout, experts, seed):
    x, w, b = make(tokens, cin, cout, experts, seed=seed)
    route = torch.randint(0, experts, (tokens,), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(
        routed_linear(x, route, w, b, backend="cpu"), routed_linear(x, route, w, b, backend="reference")
    )


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck(backend):
    x, w, b = make(10, 4, 3, 3)
    route = torch.tensor([2, 0, 2, 2, 0, 0, 2, 2, 0, 2])  # expert 1 empty
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: routed_linear(x, route, w, b, backend=backend), inputs)


def test_cpu_gradients_equal_reference_gradients():
    x, w, b = make(15, 6, 5, 4)
    route = ROUTES["random"](15, 4)
    grads = {}
    for backend in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        (routed_linear(*leaves[:1], route, *leaves[1:], backend=backend) ** 2).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for got, want in zip(grads["cpu"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_flop_counter_sees_exactly_the_formula(backend):
    """FlopCounterMode does not see the aten ops inside the custom op: the formula is the only count."""
    x, w, b = make(11, 7, 5, 3, dtype=torch.float32)
    route = ROUTES["empty_experts"](11, 3)
    with FlopCounterMode(display=False) as counter:
        routed_linear(x, route, w, b, backend=backend)
    assert counter.get_total_flops() == 2 * routed_linear_macs(11, 7, 5) == 2 * 11 * 5 * 7
    assert set(counter.get_flop_counts()["Global"]) == {torch.ops.dynnet.routed_linear}


def test_flop_counter_counts_backward_on_the_cpu_path():
    """Backward: grad_x through the op again (T Cin Cout) and per-expert weight grads (T Cout Cin)."""
    x, w, b = make(11, 7, 5, 3, dtype=torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    route = ROUTES["random"](11, 3)
    with FlopCounterMode(display=False) as counter:
        routed_linear(x, route, w, b, backend="cpu").sum().backward()
    assert counter.get_total_flops() == 3 * 2 * routed_linear_macs(11, 7, 5)


SORTED_ROUTES = {
    "sorted_with_empty_experts": torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 3, 5, 5, 5]),  # experts 1 and 4 empty
    "sorted_two_rows": torch.tensor([1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])[:2],  # one token, top-2
    "sorted_last_expert_only_once": torch.tensor([0] * 11 + [5]),
}


def _strided_weight(experts, cout, cin, dtype=torch.float64):
    """(E, Cout, Cin) as a transposed view of a contiguous (E, Cin, Cout) block (the MoE's fc2 layout)."""
    return torch.randn(experts, cin, cout, generator=torch.Generator().manual_seed(5), dtype=dtype).transpose(1, 2)


@pytest.mark.parametrize("kind", sorted(SORTED_ROUTES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_sorted_fast_path_equals_oracle(kind, bias, strided):
    """Routes already sorted by expert: rows used in place (no permutation), same result as the oracle."""
    route = SORTED_ROUTES[kind]
    x, w, b = make(route.shape[0], 5, 7, 6, bias=bias)
    if strided:
        w = _strided_weight(6, 7, 5)
    assert routed.is_sorted(route)
    got = routed_linear(x, route, w, b, backend="cpu")
    torch.testing.assert_close(got, loop_oracle(x, route, w, b))
    torch.testing.assert_close(got, routed_linear(x, route, w, b, backend="reference"))


def test_sorted_fast_path_gathers_nothing(monkeypatch):
    """The sorted path never gathers or scatters rows; the unsorted path gathers exactly twice."""
    calls = []
    real = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select", lambda t, *a: calls.append(t.shape) or real(t, *a))
    route = SORTED_ROUTES["sorted_with_empty_experts"]
    x, w, _ = make(route.shape[0], 5, 7, 6)
    routed._grouped(x, route, w, None)
    assert calls == []
    routed._grouped(x, route.flip(0), w, None)
    assert len(calls) == 2  # the sorting gather of x, the restoring gather of the output


def test_sorted_fast_path_macs_and_gradients():
    route = SORTED_ROUTES["sorted_with_empty_experts"]
    x, w, b = make(route.shape[0], 5, 7, 6, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        routed_linear(x, route, w, b, backend="cpu")
    assert counter.get_total_flops() == 2 * routed_linear_macs(route.shape[0], 5, 7)
    x, w, b = make(route.shape[0], 4, 3, 6)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: routed_linear(x, route, w, b, backend="cpu"), inputs)


def test_large_groups_take_one_gemm_per_expert(monkeypatch):
    """From ``MKL_ROWS`` rows per used expert (fewer when sorted) the cpu path runs one ``mm`` per expert
    instead of the native kernel; both give the oracle's result."""
    assert routed.prefer_mkl(256, True) and not routed.prefer_mkl(255, True)
    assert routed.prefer_mkl(512, False) and not routed.prefer_mkl(511, False)
    monkeypatch.setitem(routed.MKL_ROWS, "sorted", 16)
    monkeypatch.setitem(routed.MKL_ROWS, "unsorted", 32)
    calls = []
    real = routed._native.routed_linear
    monkeypatch.setattr(routed._native, "routed_linear", lambda *a: calls.append(1) or real(*a))
    x, w, b = make(60, 5, 7, 4, dtype=torch.float32)
    route = torch.arange(60) % 3  # experts 0-2 used, 20 rows each; expert 3 empty
    for r, native in ((route.sort().values, False), (route, routed._native.usable(x, w))):
        calls.clear()
        torch.testing.assert_close(routed_linear(x, r, w, b, backend="cpu"), loop_oracle(x, r, w, b))
        assert bool(calls) == native


def test_is_sorted_and_inverse_permutation():
    assert routed.is_sorted(torch.tensor([], dtype=torch.long)) and routed.is_sorted(torch.tensor([3]))
    assert routed.is_sorted(torch.tensor([0, 0, 2, 2, 7])) and not routed.is_sorted(torch.tensor([0, 2, 1]))
    order = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    x = torch.randn(50, 3)
    assert torch.equal(x.index_select(0, order).index_select(0, routed.inverse_permutation(order)), x)


@pytest.mark.parametrize("bias", [True, False])
def test_unsorted_strided_weight_equals_oracle(bias):
    route = ROUTES["random"](23, 6)
    x, _, b = make(23, 5, 7, 6, bias=bias)
    w = _strided_weight(6, 7, 5)
    torch.testing.assert_close(routed_linear(x, route, w, b, backend="cpu"), loop_oracle(x, route, w, b))


def test_backend_switch_env_and_argument(monkeypatch):
    calls = []
    real = routed._reference
    monkeypatch.setattr(routed, "_reference", lambda *a: calls.append("reference") or real(*a))
    x, w, b = make(6, 3, 2, 2)
    route = ROUTES["balanced"](6, 2)
    monkeypatch.setenv("DYNNET_KERNEL_BACKEND", "reference")
    routed_linear(x, route, w, b)
    assert calls == ["reference"]
    routed_linear(x, route, w, b, backend="cpu")  # the argument wins over the variable
    assert calls == ["reference"]
    monkeypatch.setenv("DYNNET_KERNEL_BACKEND", "auto")
    routed_linear(x, route, w, b)  # auto on CPU tensors is the cpu path
    assert calls == ["reference"]
    with pytest.raises(ValueError, match="backend"):
        routed_linear(x, route, w, b, backend="fast")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend"):
        routed_linear(x, route, w, b, backend="triton")


def _bad_cases():
    x, w, b = make(4, 3, 2, 2, dtype=torch.float32)
    r = torch.tensor([0, 1, 1, 0])
    return [
        ((x[0], r, w, b), ValueError, "x"),
        ((x.long(), r, w, b), TypeError, "x"),
        ((x, r.float(), w, b), TypeError, "route"),
        ((x, r[:3], w, b), ValueError, "route"),
        ((x, r, w[0], b), ValueError, "weight"),
        ((x, r, w[:, :, :2], b), ValueError, "weight"),
        ((x, r, w[:0], None), ValueError, "weight"),
        ((x, r, w.double(), b), TypeError, "weight"),
        ((x, r, w, b[:1]), ValueError, "bias"),
        ((x, r, w, b.double()), TypeError, "bias"),
        ((x, torch.tensor([0, 1, 2, 0]), w, b), ValueError, "route"),
        ((x, torch.tensor([0, -1, 1, 0]), w, b), ValueError, "route"),
        (("x", r, w, b), TypeError, "x"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise_naming_the_argument(case):
    args, error, name = _bad_cases()[case]
    with pytest.raises(error, match=f"^{name}:"):
        routed_linear(*args, backend="cpu")


INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from kernels.routed import routed_linear

    def check(tokens, cin, cout, experts, route, bias=True, route_dtype=torch.int64):
        g = torch.Generator().manual_seed(tokens * 7 + cin)
        x = torch.randn(tokens, cin, generator=g)
        w = torch.randn(experts, cout, cin, generator=g)
        b = torch.randn(experts, cout, generator=g) if bias else None
        route = route.to(route_dtype)
        want = routed_linear(x, route, w, b, backend="reference")
        got = routed_linear(x, route, w, b, backend="triton")
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    g = torch.Generator().manual_seed(0)
    check(40, 16, 16, 4, torch.randint(0, 4, (40,), generator=g))            # balanced-ish
    check(37, 13, 9, 3, (torch.arange(37) % 2) * 2, bias=False)             # expert 1 empty, odd sizes
    check(23, 16, 5, 4, torch.full((23,), 2), route_dtype=torch.int32)      # one expert takes all rows
    check(7, 3, 17, 1, torch.zeros(7, dtype=torch.long))                     # E = 1, K < BLOCK_K
    check(33, 32, 16, 2, torch.tensor([1] * 30 + [0] * 3))                   # several tiles, two K steps

    # backward: grad_x runs the triton kernel on the transposed (strided) weight
    x = torch.randn(21, 11)
    w = torch.randn(3, 6, 11)
    route = torch.randint(0, 3, (21,), generator=g)
    grads = {}
    for backend in ("reference", "triton"):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        (routed_linear(xs, route, ws, backend=backend) ** 2).sum().backward()
        grads[backend] = (xs.grad, ws.grad)
    for got, want in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    print("interpreter ok")
    """
)


def test_triton_path_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    env.pop("DYNNET_KERNEL_BACKEND", None)
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETER_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "interpreter ok" in done.stdout


@pytest.mark.parametrize("experts", [1, 3, 254, 255, 300])
def test_triton_routing_table_matches_argsort_and_counts(experts):
    from kernels._triton_routed import routing_offsets  # noqa: PLC0415 - imports Triton

    route = torch.randint(0, experts, (600,), generator=torch.Generator().manual_seed(experts))
    order, offsets = routing_offsets(route, experts)
    assert torch.equal(order, torch.argsort(route, stable=True))
    counts = torch.bincount(route, minlength=experts)
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
