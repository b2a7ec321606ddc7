"""The executed-MAC counter: exact analytic counts, executed-only semantics, custom-op formulas."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from catalog import costs
from catalog.costs import count_macs, count_macs_detailed, count_params, macs_per_sample

# --- a test-only custom op with a flop formula, and one without -------------------------------------
# ``costs_test::first_rows_linear(x, w, n)``: ``x[:n] @ w.T`` (rows past n are zero), i.e. a kernel
# that skips work; its formula counts only the executed rows, from the arguments' values.


@torch.library.custom_op("costs_test::first_rows_linear", mutates_args=())
def first_rows_linear(x: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], w.shape[0])
    out[:n] = x[:n] @ w.T
    return out


@first_rows_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@register_flop_formula(torch.ops.costs_test.first_rows_linear)
def _first_rows_flops(x_shape, w_shape, n, *args, out_shape=None, **kwargs) -> int:
    return 2 * n * x_shape[1] * w_shape[0]  # FLOPs = 2 x executed MACs, as kernels/ formulas do


@torch.library.custom_op("costs_test::no_formula", mutates_args=())
def no_formula(x: torch.Tensor) -> torch.Tensor:
    return x @ x


@no_formula.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


# --- analytic counts ---------------------------------------------------------------------------------


def conv_out(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "padding", "dilation", "groups", "bias"),
    [
        (3, 8, 3, 1, 1, 1, 1, False),  # plain 3x3
        (4, 6, 3, 2, 1, 1, 1, True),  # stride, bias (bias adds not counted)
        (6, 6, 3, 1, 2, 2, 1, False),  # dilation
        (8, 8, 3, 2, 1, 1, 8, False),  # depthwise
        (8, 12, 1, 1, 0, 1, 4, False),  # grouped 1x1
        (3, 5, 5, 3, 0, 1, 1, False),  # stride 3, no padding
    ],
)
def test_conv2d_counts_exact_macs(cin, cout, k, stride, padding, dilation, groups, bias) -> None:
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias)
    n, h, w = 2, 11, 9
    ho, wo = conv_out(h, k, stride, padding, dilation), conv_out(w, k, stride, padding, dilation)
    expected = n * cout * ho * wo * (cin // groups) * k * k
    assert count_macs(conv, torch.randn(n, cin, h, w)) == expected


def test_conv1d_and_conv_transpose2d_count_exact_macs() -> None:
    conv1d = nn.Conv1d(4, 6, 3, stride=2)
    assert count_macs(conv1d, torch.randn(2, 4, 15)) == 2 * 6 * 7 * 4 * 3
    # transposed: every input pixel is multiplied by the whole (Cout/groups) x k x k kernel slice
    deconv = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    assert count_macs(deconv, torch.randn(2, 4, 5, 7)) == 2 * 5 * 7 * 4 * (6 // 2) * 9


def test_linear_counts_exact_macs_with_and_without_bias() -> None:
    x = torch.randn(2, 7, 10)
    assert count_macs(nn.Linear(10, 3), x) == 2 * 7 * 10 * 3
    assert count_macs(nn.Linear(10, 3, bias=False), x) == 2 * 7 * 10 * 3
    assert count_macs(nn.Linear(10, 3), torch.randn(10)) == 10 * 3  # 1-D input: a matrix-vector product


@pytest.mark.parametrize(
    ("name", "fn", "expected"),
    [
        ("mm", lambda: torch.randn(4, 5) @ torch.randn(5, 6), 4 * 5 * 6),
        ("addmm", lambda: torch.addmm(torch.randn(4, 6), torch.randn(4, 5), torch.randn(5, 6)), 4 * 5 * 6),
        ("bmm", lambda: torch.bmm(torch.randn(3, 4, 5), torch.randn(3, 5, 6)), 3 * 4 * 5 * 6),
        (
            "baddbmm",
            lambda: torch.baddbmm(torch.randn(3, 4, 6), torch.randn(3, 4, 5), torch.randn(3, 5, 6)),
            3 * 4 * 5 * 6,
        ),
        ("matmul 4-D", lambda: torch.randn(2, 3, 4, 5) @ torch.randn(2, 3, 5, 6), 2 * 3 * 4 * 5 * 6),
        ("matmul broadcast", lambda: torch.randn(2, 4, 5) @ torch.randn(5, 6), 2 * 4 * 5 * 6),
        ("mv", lambda: torch.randn(4, 5) @ torch.randn(5), 4 * 5),
        ("dot", lambda: torch.randn(5) @ torch.randn(5), 5),
        (
            "einsum",
            lambda: torch.einsum("bij,bjk->bik", torch.randn(3, 4, 5), torch.randn(3, 5, 6)),
            3 * 4 * 5 * 6,
        ),
    ],
)
def test_matrix_products_count_exact_macs(name, fn, expected) -> None:
    assert count_macs(fn) == expected, name


@pytest.mark.parametrize(("e", "ev"), [(8, 8), (8, 4)])  # equal head dims take the CPU flash kernel
@pytest.mark.parametrize("masked", [False, True])
def test_scaled_dot_product_attention_counts_both_products(e, ev, masked) -> None:
    b, h, lq, lk = 2, 3, 5, 7
    q, k, v = torch.randn(b, h, lq, e), torch.randn(b, h, lk, e), torch.randn(b, h, lk, ev)
    mask = torch.rand(lq, lk) > 0.3 if masked else None
    expected = b * h * lq * lk * e + b * h * lq * lk * ev  # Q K^T, then A V; a mask saves nothing
    assert count_macs(F.scaled_dot_product_attention, q, k, v, attn_mask=mask) == expected


def test_multihead_attention_fast_path_counted_like_the_slow_path() -> None:
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 10, 32)
    expected = 2 * 10 * 4 * 32 * 32 + 2 * 4 * 10 * 10 * 8 * 2  # q, k, v, out projections; QK^T and AV
    assert count_macs(mha.train(), x, x, x) == expected
    report = count_macs_detailed(mha.eval(), x, x, x)  # eval + no_grad: the fused native kernel
    assert report.total == expected
    assert "aten._native_multi_head_attention" in report.by_op
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    assert count_macs(layer.eval(), x) == count_macs(layer.train(), x) == expected + 2 * 10 * 32 * 64 * 2


# --- executed-only semantics -------------------------------------------------------------------------


class Skippy(nn.Module):
    """Two linears; the second runs only on the rows the gate selects (gather, compute, scatter)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(16, 16)
        self.second = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        idx = keep.nonzero().flatten()
        if idx.numel() == 0:
            return x
        out = x.clone()
        out[idx] = x[idx] + self.second(x[idx])
        return out


@pytest.mark.parametrize("kept", [0, 1, 3, 8])
def test_only_executed_work_is_counted(kept) -> None:
    keep = torch.zeros(8, dtype=torch.bool)
    keep[:kept] = True
    assert count_macs(Skippy(), torch.randn(8, 16), keep) == 8 * 16 * 16 + kept * 16 * 16


def test_counting_runs_under_no_grad_and_restores_grad_mode() -> None:
    seen = []
    count_macs(lambda: seen.append(torch.is_grad_enabled()))
    assert seen == [False]
    assert torch.is_grad_enabled()


def test_counting_works_inside_inference_mode() -> None:
    with torch.inference_mode():
        assert count_macs(nn.Linear(4, 2), torch.randn(3, 4)) == 3 * 4 * 2


def test_meta_tensors_count_like_real_ones() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    real = count_macs(model, torch.randn(2, 3, 6, 6))
    assert (
        count_macs(model.to("meta"), torch.empty(2, 3, 6, 6, device="meta"))
        == real
        == 2 * (8 * 36 * 27 + 288 * 4)
    )


# --- custom ops --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 2, 5])
def test_custom_op_counted_through_its_registered_formula(n) -> None:
    x, w = torch.randn(5, 6), torch.randn(3, 6)
    report = count_macs_detailed(first_rows_linear, x, w, n)
    assert report.total == n * 6 * 3
    assert report.by_op == {"costs_test.first_rows_linear": n * 6 * 3}
    assert report.uncounted_ops == ()


def test_custom_op_without_formula_is_reported_not_silently_zero() -> None:
    x = torch.randn(4, 4)
    with pytest.warns(RuntimeWarning, match="costs_test.no_formula"):
        assert count_macs(lambda: no_formula(x) @ x) == 4 * 4 * 4  # only the aten matmul counts
    assert count_macs_detailed(no_formula, x).uncounted_ops == ("costs_test.no_formula",)


def test_aten_ops_named_like_products_are_flagged_when_unregistered() -> None:
    assert costs._does_macs("_int_mm") and costs._does_macs("mkldnn_linear") and costs._does_macs("conv_tbc")
    assert not any(costs._does_macs(n) for n in ("cummax", "native_batch_norm", "_convert_indices_from_coo"))


def test_broken_kernels_package_is_tolerated(monkeypatch) -> None:
    monkeypatch.setattr(costs, "_kernels_imported", False)
    monkeypatch.setitem(sys.modules, "kernels", None)  # makes ``import kernels`` raise ImportError
    with pytest.warns(RuntimeWarning, match="could not import the kernels package"):
        assert count_macs(nn.Linear(4, 2), torch.randn(3, 4)) == 3 * 4 * 2


def test_kernels_package_is_imported_before_counting(monkeypatch) -> None:
    imported = []
    monkeypatch.setattr(costs, "_kernels_imported", False)
    monkeypatch.setattr(costs.importlib, "import_module", lambda name: imported.append(name))
    count_macs(lambda: None)
    count_macs(lambda: None)
    assert imported == ["kernels"]  # once per process


# --- the report, params, per-sample helper, bad input ------------------------------------------------


def test_detailed_report_breaks_down_by_op_and_module() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.Flatten(), nn.Linear(4 * 9, 3))
    report = count_macs_detailed(model, torch.randn(1, 2, 3, 3))
    conv, lin = 4 * 9 * 2, 36 * 3
    assert report.total == conv + lin and report.flops == 2 * (conv + lin)
    assert report.by_op == {"aten.convolution": conv, "aten.addmm": lin}
    assert report.modules(0) == {"Sequential": conv + lin}
    assert report.modules(1) == {"Sequential.0": conv, "Sequential.2": lin}
    with pytest.raises(ValueError, match="depth"):
        report.modules(-1)


def test_count_params_counts_shared_weights_once() -> None:
    a, b = nn.Linear(4, 3), nn.Linear(4, 3, bias=False)
    b.weight = a.weight
    tied = nn.Sequential(a, b)
    assert count_params(tied) == 4 * 3 + 3
    assert count_params([tied, a]) == 4 * 3 + 3  # across modules too
    assert count_params([tied, nn.Linear(2, 2)]) == 15 + 6


def test_macs_per_sample() -> None:
    assert macs_per_sample(12, 4) == 3.0
    assert macs_per_sample(10, 4) == 2.5


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: count_macs(42), TypeError, "fn"),
        (lambda: count_macs_detailed("model"), TypeError, "fn"),
        (lambda: count_params(42), TypeError, "module"),
        (lambda: count_params([]), TypeError, "module"),
        (lambda: macs_per_sample(10, 0), ValueError, "batch_size"),
        (lambda: macs_per_sample(10, 2.0), TypeError, "batch_size"),
        (lambda: macs_per_sample(-1, 2), ValueError, "total"),
    ],
)
def test_bad_arguments_give_clear_errors(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()
