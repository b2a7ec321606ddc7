"""ConvNet-AIG: gated residual blocks that really skip work in eval."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from catalog.costs import count_macs
from implementations.common.train import train_and_compare
from implementations.depth import convnet_aig as aig

TINY = aig.Config(depth=14, width=4, image_size=8)
IMAGENET_TINY = aig.Config(arch="imagenet", depth=50, width=4, image_size=32)  # bottleneck blocks
DIGITS_EPOCHS = 12  # digits at their native 8x8, width 8: a short run that still learns sharp gates


def _randomize_gates(model: aig.ConvNetAIG, seed: int = 0) -> None:
    """Sample-dependent gate decisions on an untrained model (larger last-layer weights, random BN stats)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.gates:
            gate.fc2.weight.copy_(torch.randn(gate.fc2.weight.shape, generator=gen) * 2.0)
            gate.fc2.bias.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def _model(cfg: aig.Config = TINY, seed: int = 0) -> aig.ConvNetAIG:
    torch.manual_seed(seed)
    model = aig.build(cfg)
    _randomize_gates(model, seed)
    return model.eval()


def _masked_dense_oracle(model: aig.ConvNetAIG, x: torch.Tensor):
    """Every residual branch on every sample, multiplied by the same decisions."""
    h = model.net.stem(x)
    decisions = []
    for block, gate in zip(model.net.blocks(), model.gates, strict=True):
        on = torch.softmax(gate(h), 1)[:, 1] > model.cfg.gate_threshold
        h = F.relu(block.shortcut(h) + block.residual(h) * on.float().view(-1, 1, 1, 1))
        decisions.append(on)
    return model.net.head(h), torch.stack(decisions)


@pytest.mark.parametrize("cfg", [TINY, IMAGENET_TINY], ids=["cifar14", "imagenet50"])
@torch.no_grad()
def test_eval_path_equals_masked_dense_oracle(cfg):
    model = _model(cfg)
    x = torch.randn(9, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    out, info = model(x)
    ref, decisions = _masked_dense_oracle(model, x)
    assert torch.equal(info["gates"], decisions)
    rate = float(decisions.float().mean())
    assert 0.2 < rate < 0.8, rate  # the decisions really vary, so the check has teeth
    assert (decisions.any(0) & ~decisions.all(0)).any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_all_gates_open_equals_baseline():
    model = _model()
    model.cfg = replace(model.cfg, gate_threshold=0.0)
    baseline = aig.build_baseline(TINY).eval()
    missing, unexpected = baseline.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("gates.") for k in unexpected)
    x = torch.randn(5, 3, 8, 8)
    out, info = model(x)
    assert bool(info["gates"].all())
    torch.testing.assert_close(out, baseline(x)[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_branch_runs_on_active_samples_only_and_idle_blocks_are_not_called():
    model = _model()
    with torch.no_grad():
        model.gates[2].fc2.bias.copy_(torch.tensor([100.0, -100.0]))  # this gate never opens
    calls = []
    for g, block in enumerate(model.net.blocks()):
        block.conv1.register_forward_hook(lambda m, i, o, g=g: calls.append((g, i[0].shape[0])))
    _, info = model(torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(4)))
    per_block = info["gates"].sum(dim=1).tolist()
    assert 0 in per_block and any(0 < n < 8 for n in per_block)
    assert calls == [(g, n) for g, n in enumerate(per_block) if n > 0]


@torch.no_grad()
def test_executed_macs_equal_per_sample_analytic_count():
    model = _model(seed=3)
    x = torch.randn(7, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    _, info = model(x)
    decisions = info["gates"]
    h = model.net.stem(x[:1])
    expected = count_macs(model.net.stem, x[:1]) * len(x)
    for g, (block, gate) in enumerate(zip(model.net.blocks(), model.gates, strict=True)):
        # gates run on every sample; in eval one hidden layer (BatchNorm folded in) and one output row,
        # the difference of the two logits
        expected += (gate.fc1.weight.numel() + gate.fc2.in_features) * len(x)
        expected += count_macs(block.residual, h) * int(decisions[g].sum())
        h = block(h)
    expected += count_macs(model.net.head, h) * len(x)
    assert count_macs(model, x) == expected
    dense = count_macs(aig.build_baseline(TINY).eval(), x)
    assert count_macs(model, x) < dense


@torch.no_grad()
def test_knobs_move_executed_macs_monotonically():
    x = aig.example_input(TINY, batch_size=4)
    by_rate = []
    for rate in (0.0, 0.34, 0.5, 0.67, 1.0):
        torch.manual_seed(0)
        model = aig.build(replace(TINY, exec_rate_init=rate)).eval()
        _, info = model(x)
        assert abs(float(info["gates"].float().mean()) - round(rate * 6) / 6) < 1e-6
        by_rate.append(count_macs(model, x))
    assert by_rate == sorted(by_rate) and by_rate[0] < by_rate[-1]
    model = _model()
    by_threshold = []
    for t in (0.0, 0.2, 0.4, 0.6, 0.8, 0.99):
        model.cfg = replace(model.cfg, gate_threshold=t)
        by_threshold.append(count_macs(model, x))
    assert by_threshold == sorted(by_threshold, reverse=True) and by_threshold[0] > by_threshold[-1]


def test_gradients_reach_gates_in_train_mode():
    torch.manual_seed(0)
    model = aig.build(TINY).train()
    out, info = model(torch.randn(6, 3, 8, 8))
    g = info["gates"]
    assert set(g.detach().unique().tolist()) <= {0.0, 1.0}
    assert info["aux_loss"].requires_grad
    (F.cross_entropy(out, torch.arange(6) % 10) + info["aux_loss"]).backward()
    for gate in model.gates:
        assert gate.fc2.weight.grad is not None and gate.fc2.weight.grad.abs().sum() > 0
        assert gate.fc1.weight.grad is not None and gate.fc1.weight.grad.abs().sum() > 0


def test_aux_loss_is_the_target_rate_loss():
    torch.manual_seed(0)
    cfg = replace(TINY, target_rate=0.25, loss_weight=3.0)
    model = aig.build(cfg).train()
    _, info = model(torch.randn(6, 3, 8, 8))
    rates = info["gates"].detach().mean(dim=1)
    assert torch.isclose(info["aux_loss"].detach(), 3.0 * ((0.25 - rates) ** 2).mean())


def test_config_validation_and_summary():
    with pytest.raises(ValueError, match="target_rate"):
        aig.build(replace(TINY, target_rate=1.5))
    with pytest.raises(ValueError, match="gate_threshold"):
        aig.build(replace(TINY, gate_threshold=1.0))
    with pytest.raises(ValueError, match="arch"):
        aig.build(replace(TINY, arch="vit"))
    with pytest.raises(ValueError, match="depth"):
        aig.build(replace(IMAGENET_TINY, depth=34))
    with pytest.raises(ValueError, match="exec_rate_init"):
        aig.build(replace(TINY, exec_rate_init=-0.1))
    assert aig.open_gate_pattern(6, 0.5) == [False, True, False, True, False, True]
    info = {"gates": torch.tensor([[True, False], [True, True]])}
    assert aig.summarize(info) == {"executed_blocks": 0.75, "gate_rates": "0.50 1.00"}
    x = aig.example_input(aig.Config(), batch_size=2)
    out, info = aig.build().eval()(x)
    assert out.shape == (2, 10) and info["gates"].shape == (6, 2) and bool(info["gates"].all())


@pytest.fixture
def one_thread():
    """Tiny models train faster on one intra-op thread (and suffer less from a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_digits_training_at_target_rate_half_skips_blocks_and_keeps_accuracy(one_thread):
    cfg = replace(aig.Config(), width=8, image_size=8, target_rate=0.5)
    res = train_and_compare(aig, cfg, settings=replace(aig.TRAIN, epochs=DIGITS_EPOCHS))
    model, x = res["model_dynamic"], res["x_test"]
    with torch.no_grad():
        _, info = model(x)
        h, block_macs = model.net.stem(x[:1]), []
        for block in model.net.blocks():
            block_macs.append(count_macs(block.residual, h))
            h = block(h)
    block_macs = torch.tensor(block_macs, dtype=torch.float64)
    executed = float((info["gates"].double().mean(dim=1) * block_macs).sum() / block_macs.sum())
    print(f"\nconvnet_aig digits: accuracy dense {res['accuracy_dense']:.4f} dynamic {res['accuracy_dynamic']:.4f}, "
          f"executed block MACs {executed:.3f} of the baseline's, {aig.summarize(info)}, "
          f"train s {res['train_seconds_dense']:.1f} + {res['train_seconds_dynamic']:.1f}")
    assert executed <= 0.65
    assert res["accuracy_dynamic"] >= res["accuracy_dense"] - 0.03
