"""Sparsely-Gated MoE (implementations/moe/sparsely_gated_moe.py): routing executes only the kept experts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from catalog.costs import count_macs
from implementations.common.train import train_and_compare
from implementations.moe import sparsely_gated_moe as moe

TINY = moe.Config(image_size=16, patch=4, dim=32, depth=2, heads=2, num_experts=4, top_k=2, expert_hidden=16)


def _pair(cfg: moe.Config) -> tuple[moe.MoEViT, moe.MoEViT]:
    """Dynamic model and the all-experts baseline with the same weights, both in eval mode."""
    dyn = moe.build(cfg).eval()
    dense = moe.build_baseline(cfg).eval()
    dense.load_state_dict(dyn.state_dict())
    return dyn, dense


def _oracle(layer: moe.NoisyTopKMoE, x: Tensor, experts: Tensor, gates: Tensor) -> Tensor:
    """Every expert on every token, then only the chosen experts' outputs kept with their gate values."""
    w1, b1 = layer.fc1_weight, layer.fc1_bias
    w2, b2 = layer.fc2_weight.transpose(1, 2), layer.fc2_bias  # (E, dim, hidden)
    hid = F.relu(torch.einsum("td,ehd->teh", x, w1) + b1)
    out = torch.einsum("teh,edh->ted", hid, w2) + b2  # (T, E, dim): all experts
    mask = torch.zeros(x.shape[0], layer.num_experts).scatter(1, experts, gates)
    return (mask.unsqueeze(-1) * out).sum(dim=1)


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_layer_equals_masked_dense_oracle(capacity_factor):
    cfg = dataclasses.replace(TINY, num_experts=6, top_k=2, capacity_factor=capacity_factor)
    layer = moe.NoisyTopKMoE(cfg.dim, cfg.expert_hidden, cfg).eval()
    x = torch.randn(40, cfg.dim)
    with torch.no_grad():
        y, stats = layer(x)
        clean = x @ layer.w_gate
    top = clean.topk(cfg.top_k, dim=1)
    assert torch.equal(stats["experts"], top.indices)
    expected_gates = torch.softmax(top.values, dim=1)
    if capacity_factor is None:
        torch.testing.assert_close(stats["gates"], expected_gates)
    else:  # dropped rows have gate 0, kept rows keep their softmax weight
        dropped = stats["gates"] == 0
        assert dropped.any() and (stats["expert_load"] <= math.ceil(capacity_factor * 40 * 2 / 6)).all()
        torch.testing.assert_close(stats["gates"][~dropped], expected_gates[~dropped])
    torch.testing.assert_close(y, _oracle(layer, x, stats["experts"], stats["gates"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 3])
def test_few_tokens_equal_masked_dense_oracle(tokens):
    """One or a few tokens: most experts empty, the kept rows sorted by expert go to the kernel in place."""
    cfg = dataclasses.replace(TINY, num_experts=6, top_k=2)
    layer = moe.NoisyTopKMoE(cfg.dim, cfg.expert_hidden, cfg).eval()
    x = torch.randn(tokens, cfg.dim)
    with torch.no_grad():
        y, stats = layer(x)
    assert int(stats["expert_load"].sum()) == tokens * cfg.top_k
    torch.testing.assert_close(y, _oracle(layer, x, stats["experts"], stats["gates"]), atol=1e-5, rtol=1e-5)


def test_all_experts_on_equals_baseline():
    dyn, dense = _pair(TINY)
    everything = moe.build(dataclasses.replace(TINY, top_k=TINY.num_experts)).eval()
    everything.load_state_dict(dyn.state_dict())
    x = moe.example_input(TINY, 4)
    with torch.no_grad():
        torch.testing.assert_close(everything(x)[0], dense(x)[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(dyn(x)[0], dense(x)[0], atol=1e-5)  # top-2 of 4 really differs


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_macs_equal_analytic_count_of_what_ran(capacity_factor):
    cfg = dataclasses.replace(TINY, capacity_factor=capacity_factor)
    dyn, dense = _pair(cfg)
    x = moe.example_input(cfg, 3)
    with torch.no_grad():
        _, info = dyn(x)
    tokens = 3 * ((cfg.image_size // cfg.patch) ** 2 + 1)
    layers = len(dyn.moe_blocks)
    per_row = 2 * cfg.dim * cfg.expert_hidden  # fc1 + fc2 of one expert on one token
    dense_moe = layers * tokens * cfg.num_experts * (per_row + cfg.dim)  # + the dense mix of output biases
    rows = int(info["expert_load"].sum())
    routes = layers * tokens * cfg.top_k
    assert rows == routes if capacity_factor is None else rows < routes
    assert count_macs(dyn, x) == count_macs(dense, x) - dense_moe + rows * per_row


def test_k_moves_macs_monotonically():
    x = moe.example_input(TINY, 2)
    macs = []
    for k in range(1, TINY.num_experts + 1):
        torch.manual_seed(0)
        macs.append(count_macs(moe.build(dataclasses.replace(TINY, top_k=k)).eval(), x))
    assert all(a < b for a, b in zip(macs, macs[1:], strict=False)), macs
    torch.manual_seed(0)
    bias_mix = 2 * 17 * TINY.num_experts * TINY.dim * TINY.depth  # the dense layer's `softmax @ fc2_bias`
    assert macs[-1] + bias_mix == count_macs(moe.build_baseline(TINY).eval(), x)  # k = E: the dense cost


def test_untrained_router_spreads_tokens_and_summarize():
    dyn, _ = _pair(dataclasses.replace(TINY, num_experts=8, top_k=2))
    with torch.no_grad():
        _, info = dyn(moe.example_input(TINY, 4))
    assert (info["expert_load"] > 0).all()  # no expert starves at init (random W_g)
    summary = moe.summarize(info)
    assert summary["expert_work_executed"] == pytest.approx(2 / 8)
    assert summary["dropped_rows"] == 0.0


def test_gradients_reach_router_noise_and_experts_in_train_mode():
    model = moe.build(TINY).train()
    out, info = model(moe.example_input(TINY, 4))
    assert info["aux_loss"] > 0
    (F.cross_entropy(out, torch.tensor([0, 1, 2, 3])) + info["aux_loss"]).backward()
    layer = model.net.blocks[0].mlp
    for p in (layer.w_gate, layer.w_noise, layer.fc1_weight, layer.fc2_weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_balancing_losses():
    assert float(moe.cv_squared(torch.ones(4))) == pytest.approx(0.0)
    assert float(moe.cv_squared(torch.tensor([4.0, 0, 0, 0]))) > 1.0
    clean = torch.randn(50, 5)
    std = torch.full_like(clean, 0.5)
    noisy = clean + torch.randn_like(clean) * std
    load = moe.load_estimate(clean, noisy, std, noisy.topk(3, dim=1).values, k=2)
    assert load.shape == (5,) and float(load.sum()) == pytest.approx(100, rel=0.35)  # about k rows per token


def test_capacity_keep_is_first_come_first_served():
    experts = torch.tensor([[0, 1], [0, 2], [0, 1]])
    keep = moe.capacity_keep(experts, 3, capacity=2)
    assert keep.tolist() == [[True, True], [True, True], [False, True]]


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="top_k must be"):
        moe.build(dataclasses.replace(TINY, top_k=5))
    with pytest.raises(ValueError, match="capacity_factor"):
        moe.build(dataclasses.replace(TINY, capacity_factor=0.0))


@pytest.mark.slow
def test_training_on_digits_keeps_accuracy_and_balances_load():
    result = train_and_compare(moe, moe.Config())  # the module's TRAIN settings
    assert result["accuracy_dense"] > 0.8
    assert result["accuracy_dynamic"] >= result["accuracy_dense"] - 0.05
    with torch.no_grad():
        _, info = result["model_dynamic"](result["x_test"])
    cfg = moe.Config()
    assert info["exec_fraction"] == pytest.approx(cfg.top_k / cfg.num_experts)  # the budget, exactly
    assert float(moe.summarize(info)["load_cv"]) < 0.5  # the balancing losses kept every expert in use
