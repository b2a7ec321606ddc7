"""Batch-shaping channel gates: per-sample open channels computed for real in eval; the shaping loss."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from scipy.special import betainc

from catalog.costs import count_macs
from implementations.channel import batch_shaping as bs
from implementations.common.train import train_and_compare

TINY = bs.Config(depth=8, width=8, image_size=16, open_rate_init=0.5)
TINY_R18 = bs.Config(backbone="resnet18", width=8, image_size=32, open_rate_init=0.5)
DIGITS_EPOCHS = 16


def _model(cfg: bs.Config = TINY, seed: int = 0) -> bs.BatchShapedResNet:
    """An untrained model (gates calibrated to open half the time) with random BN statistics, float64."""
    torch.manual_seed(seed)
    model = bs.build(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.double().eval()


def _input(cfg: bs.Config, n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen, dtype=torch.float64)


def _masked_dense_oracle(model: bs.BatchShapedResNet, x: torch.Tensor):
    """Both convolutions dense on every channel; conv1's output times the same 0/1 gates."""
    h = model.net.stem(x)
    decisions = []
    for block, gate in zip(model.net.blocks(), model.gates, strict=True):
        on = gate(h) > 0
        h = bs.gated_block_train(block, h, on.to(h.dtype))
        decisions.append(on)
    return model.net.head(h), decisions


@pytest.mark.parametrize("cfg", [TINY, TINY_R18], ids=["cifar", "resnet18"])
@torch.no_grad()
def test_eval_path_equals_masked_dense_oracle(cfg):
    model = _model(cfg)
    x = _input(cfg, 7)
    out, info = model(x)
    ref, decisions = _masked_dense_oracle(model, x)
    for got, want in zip(info["gates"], decisions, strict=True):
        assert torch.equal(got, want)
    counts = torch.cat([g.sum(1) for g in info["gates"]])
    assert len(counts.unique()) > 3  # samples open different numbers of channels: several groups
    assert 0.25 < float(info["exec_rate"]) < 0.75
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@torch.no_grad()
def test_closed_blocks_and_single_samples():
    model = _model()
    model.gates[1].fc2.bias.fill_(-100.0)  # block 1 never opens a channel: its convolutions are skipped
    calls = []
    for i, block in enumerate(model.net.blocks()):
        block.conv1.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    x = _input(TINY, 5, seed=4)
    out, info = model(x)
    assert not info["gates"][1].any() and 1 not in calls
    torch.testing.assert_close(out, _masked_dense_oracle(model, x)[0], atol=1e-10, rtol=1e-10)
    alone = torch.cat([model(x[i : i + 1])[0] for i in range(len(x))])
    torch.testing.assert_close(out, alone, atol=1e-10, rtol=1e-10)


@torch.no_grad()
def test_all_gates_open_equals_baseline():
    model = _model()
    for gate in model.gates:
        gate.fc2.weight.zero_()
        gate.fc2.bias.fill_(100.0)
    baseline = bs.build_baseline(TINY).double().eval()
    missing, unexpected = baseline.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("gates.") for k in unexpected)
    x = _input(TINY, 4)
    out, info = model(x)
    assert float(info["exec_rate"]) == 1.0
    torch.testing.assert_close(out, baseline(x)[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cfg", [TINY, TINY_R18], ids=["cifar", "resnet18"])
@torch.no_grad()
def test_executed_macs_equal_per_sample_analytic_count(cfg):
    model = _model(cfg, seed=2)
    x = _input(cfg, 6, seed=2)
    n = len(x)
    _, info = model(x)
    h = model.net.stem(x[:1])
    expected = count_macs(model.net.stem, x)
    for block, gate, on in zip(model.net.blocks(), model.gates, info["gates"], strict=True):
        y = block.conv1(h)
        hw = y.shape[2] * y.shape[3]
        cin, c1, c2 = block.conv1.in_channels, block.conv1.out_channels, block.conv2.out_channels
        k = on.sum(dim=1)  # open channels of every sample
        expected += n * (cin * gate.fc1.out_features + gate.fc1.out_features * c1)  # gating module
        expected += int(k.sum()) * (cin * 9 * hw + c2 * 9 * hw)  # conv1's open outputs, conv2's open inputs
        expected += count_macs(block.shortcut, h) * n
        h = block(h)
    expected += count_macs(model.net.head, h) * n
    assert count_macs(model, x) == expected


@torch.no_grad()
def test_open_rate_knob_moves_executed_macs_monotonically():
    x = bs.example_input(TINY, batch_size=16)
    macs = []
    for rate in (0.0, 0.25, 0.5, 0.75, 1.0):
        torch.manual_seed(0)
        model = bs.build(replace(TINY, open_rate_init=rate)).eval()
        _, info = model(x)
        assert abs(float(info["exec_rate"]) - rate) < 0.2  # calibrated on another batch, same distribution
        macs.append(count_macs(model, x))
    assert macs == sorted(macs) and macs[0] < macs[-1]


def test_batch_shaping_loss_matches_beta_cdf_and_its_gradient():
    p = torch.tensor([[0.1, 0.9], [0.5, 0.2], [0.8, 0.6]], dtype=torch.float64, requires_grad=True)
    loss = bs.batch_shaping_loss(p, 0.6, 0.4)
    sorted_p = p.detach().sort(dim=0).values.numpy()
    emp = torch.tensor([[1 / 4], [2 / 4], [3 / 4]], dtype=torch.float64)
    want = ((emp - torch.as_tensor(betainc(0.6, 0.4, sorted_p))) ** 2).mean()
    torch.testing.assert_close(loss.detach(), want)
    q = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: bs._BetaCDF.apply(t, 2.0, 3.0), (q,), eps=1e-6, atol=1e-5)


def test_gradients_reach_gates_and_l0_starts_after_warmup():
    torch.manual_seed(0)
    cfg = replace(TINY, open_rate_init=None, l0_weight=0.5, l0_after_steps=1, shaping_weight=0.0)
    model = bs.build(cfg).train()
    x = bs.example_input(cfg, batch_size=6)
    _, first = model(x)
    assert float(first["aux_loss"].detach()) == 0.0  # no shaping weight, L0 not started yet
    out, info = model(x)
    mean_p = torch.cat([p.flatten() for p in info["gate_probs"]]).mean()
    torch.testing.assert_close(info["aux_loss"], 0.5 * mean_p)
    assert all(set(g.detach().unique().tolist()) <= {0.0, 1.0} for g in info["gates"])
    (F.cross_entropy(out, torch.arange(6) % 10) + info["aux_loss"]).backward()
    for gate in model.gates:
        assert gate.fc2.weight.grad is not None and gate.fc2.weight.grad.abs().sum() > 0
        assert gate.fc1.weight.grad is not None and gate.fc1.weight.grad.abs().sum() > 0


def test_config_validation_and_summary():
    with pytest.raises(ValueError, match="beta_a"):
        bs.build(replace(TINY, beta_a=0.0))
    with pytest.raises(ValueError, match="open_rate_init"):
        bs.build(replace(TINY, open_rate_init=1.5))
    with pytest.raises(ValueError, match="backbone"):
        bs.build(replace(TINY, backbone="resnet50"))
    info = {"gates": [torch.tensor([[True, False], [True, True]])], "exec_rate": torch.tensor(0.75)}
    assert bs.summarize(info) == {"open_gates": 0.75, "block_rates": "0.75", "conditional_gates": 0.5}
    out, info = bs.build().eval()(bs.example_input(bs.Config(), 2))
    assert out.shape == (2, 10) and len(info["gates"]) == 6


@pytest.mark.slow
def test_digits_training_shapes_gates_and_keeps_accuracy():
    cfg = replace(bs.Config(), width=8, image_size=8, l0_after_steps=100)
    res = train_and_compare(bs, cfg, settings=replace(bs.TRAIN, epochs=DIGITS_EPOCHS))
    x = res["x_test"]
    with torch.no_grad():
        _, info = res["model_dynamic"](x)
        executed = count_macs(res["model_dynamic"], x) / count_macs(res["model_dense"], x)
    summary = bs.summarize(info)
    prior_open = 1 - float(betainc(cfg.beta_a, cfg.beta_b, 0.5))  # P(p > 0.5) under the prior: 0.62
    print(f"\nbatch_shaping digits: accuracy dense {res['accuracy_dense']:.4f} dynamic {res['accuracy_dynamic']:.4f}, "
          f"executed MACs {executed:.3f} of the baseline's (prior open rate {prior_open:.2f}), {summary}, "
          f"train s {res['train_seconds_dense']:.1f} + {res['train_seconds_dynamic']:.1f}")
    assert abs(float(info["exec_rate"]) - prior_open) < 0.12  # the prior sets the spend, L0 pulls it lower
    assert executed < 0.8 and summary["conditional_gates"] > 0.3  # gates depend on the input
    assert res["accuracy_dynamic"] >= res["accuracy_dense"] - 0.05
