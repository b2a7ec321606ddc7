"""routed_linear's Triton path on CUDA (fp16 and fp32) against the reference; run with ``-m gpu``."""

from __future__ import annotations

import pytest
import torch

from kernels.routed import routed_linear

pytestmark = pytest.mark.gpu

CASES = [  # tokens, cin, cout, experts, routing
    (1000, 256, 256, 8, "random"),
    (513, 96, 200, 3, "empty"),
    (4096, 64, 128, 32, "skewed"),
    (300, 130, 70, 1, "random"),
    (257, 256, 512, 4, "one"),
]


def _route(tokens, experts, kind, device):
    g = torch.Generator(device="cpu").manual_seed(tokens + experts)
    if kind == "random":
        route = torch.randint(0, experts, (tokens,), generator=g)
    elif kind == "empty":
        route = (torch.arange(tokens) % 2) * (experts - 1)
    elif kind == "one":
        route = torch.full((tokens,), experts - 1)
    else:  # skewed: half of the rows on expert 0
        route = torch.where(torch.rand(tokens, generator=g) < 0.5, 0, torch.randint(0, experts, (tokens,), generator=g))
    return route.to(device)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_matches_reference_on_cuda(case, dtype):
    tokens, cin, cout, experts, kind = case
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, cin, generator=g).cuda()
    w = (torch.randn(experts, cout, cin, generator=g) / cin**0.5).cuda()
    b = torch.randn(experts, cout, generator=g).cuda()
    route = _route(tokens, experts, kind, "cuda")
    want = routed_linear(x.double(), route, w.double(), b.double(), backend="cpu")
    got = routed_linear(x.to(dtype), route, w.to(dtype), b.to(dtype), backend="triton")
    assert got.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 2e-3  # fp32 may use TF32 when matmul precision allows it
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_triton_backward_matches_cpu_path_on_cuda():
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(300, 48, generator=g).cuda()
    w = torch.randn(4, 40, 48, generator=g).cuda()
    route = _route(300, 4, "random", "cuda")
    grads = {}
    for backend in ("cpu", "triton"):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        (routed_linear(xs, route, ws, backend=backend) ** 2).sum().backward()
        grads[backend] = (xs.grad, ws.grad)
    for got, want in zip(grads["triton"], grads["cpu"], strict=True):
        torch.testing.assert_close(got, want, atol=5e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("lengths", [[5, 17, 1, 64], [3, 0, 9]])
def test_packed_attention_varlen_on_cuda(dtype, lengths):
    from kernels.tokens import packed_attention  # noqa: PLC0415

    g = torch.Generator(device="cpu").manual_seed(2)
    total = sum(lengths)
    q, k, v = (torch.randn(total, 4, 32, generator=g).cuda().to(dtype).requires_grad_() for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    got = packed_attention(q, k, v, cu, backend="triton")
    want = packed_attention(*(t.double() for t in (q, k, v)), cu, backend="cpu")
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    assert all(torch.isfinite(gr).all() for gr in grads)
