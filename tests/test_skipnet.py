"""SkipNet: the executing eval path, its MAC count, the knobs, the gradients and a short training run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from catalog.costs import count_macs
from implementations.common.train import train_and_compare
from implementations.depth import skipnet

TINY = dict(depth=14, width=4, in_channels=1, image_size=8)


def tiny(**kw) -> skipnet.Config:
    return skipnet.Config(**{**TINY, **kw})


def spread_gates(model: skipnet.SkipNet, scale: float = 200.0) -> skipnet.SkipNet:
    """Make the untrained gates input-dependent, so that decisions differ between samples."""
    with torch.no_grad():
        model.gate.proj.weight.mul_(scale)
    return model


def oracle(model: skipnet.SkipNet, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Masked dense run: every block on every sample, then select block or shortcut by `gates (G, N)`."""
    blocks = list(model.net.blocks())
    h = blocks[0](model.net.stem(x))
    for g, block in enumerate(blocks[1:]):
        on = gates[g].view(-1, 1, 1, 1)
        h = torch.where(on, block(h), block.shortcut(h))
    return model.net.head(h)


def analytic_macs(cfg: skipnet.Config, gates: torch.Tensor) -> int:
    """MACs of what ran, from the decisions `gates (G, N)`: stem, first block, gates, shortcuts, executed
    residual branches, classifier."""
    n, s, w = gates.shape[1], cfg.image_size, cfg.width
    total = n * cfg.in_channels * w * 9 * s * s
    g = -1
    for stage, width in enumerate((w, 2 * w, 4 * w)):
        for i in range((cfg.depth - 2) // 6):
            stride = 2 if stage > 0 and i == 0 else 1
            cin = width // stride if stride == 2 else width
            side = s // 2 ** stage
            residual = (cin * width + width * width) * 9 * side * side
            shortcut = cin * width * side * side if cin != width else 0
            if g < 0:
                total += n * (residual + shortcut)
            else:
                gate = cin * cfg.embed_dim + 4 * cfg.hidden_dim * (cfg.embed_dim + cfg.hidden_dim) + cfg.hidden_dim
                total += n * (gate + shortcut) + int(gates[g].sum()) * residual
            g += 1
    return total + n * 4 * w * cfg.num_classes


def test_eval_equals_masked_dense_oracle():
    cfg = tiny()
    model = spread_gates(skipnet.build(cfg)).eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        out, info = model(x)
        gates = info["gates"]
        assert gates.dtype == torch.bool and gates.shape == (5, 16)
        assert 0 < gates.float().mean() < 1, "decisions should differ between samples"
        assert any(0 < int(row.sum()) < 16 for row in gates), "some block should run on part of the batch"
        torch.testing.assert_close(out, oracle(model, x, gates), atol=1e-5, rtol=1e-5)



def test_batch_of_one_equals_its_row_in_a_batch():
    model = spread_gates(skipnet.build(tiny())).eval()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        out, info = model(x)
        for i in range(len(x)):
            out_i, info_i = model(x[i : i + 1])
            torch.testing.assert_close(out_i, out[i : i + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(info_i["gates"].flatten(), info["gates"][:, i].flatten())

@pytest.mark.parametrize("knobs", [{"exec_rate_init": 1.0}, {"gate_threshold": 0.0}])
def test_all_gates_open_equals_baseline(knobs):
    cfg = tiny(**knobs)
    model = skipnet.build(cfg).eval()
    dense = skipnet.build_baseline(cfg).eval()
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("gate.") for k in unexpected)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        out, info = model(x)
        assert bool(info["gates"].all())
        torch.testing.assert_close(out, dense(x)[0], atol=1e-5, rtol=1e-5)


def test_counted_macs_equal_what_ran():
    cfg = tiny()
    model = spread_gates(skipnet.build(cfg)).eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        _, info = model(x)
        assert count_macs(model, x) == analytic_macs(cfg, info["gates"])
    all_on = skipnet.build(tiny(exec_rate_init=1.0)).eval()
    dense = skipnet.build_baseline(cfg).eval()
    gate_macs = count_macs(all_on, x) - count_macs(dense, x)
    assert 0 < gate_macs < 0.05 * count_macs(dense, x), "the gates count on the dynamic side, and cost little"


def test_skipped_blocks_are_not_called():
    model = skipnet.build(tiny(exec_rate_init=0.0)).eval()
    calls = []
    for block in list(model.net.blocks())[1:]:
        block.conv1.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        _, info = model(torch.randn(4, 1, 8, 8))
    assert not info["gates"].any() and not calls


def _macs(cfg: skipnet.Config, spread: bool = False) -> float:
    torch.manual_seed(0)
    model = skipnet.build(cfg).eval()
    if spread:
        spread_gates(model)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return count_macs(model, x)


def test_knobs_move_executed_macs_monotonically():
    by_rate = [_macs(tiny(exec_rate_init=r)) for r in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]
    assert all(a < b for a, b in zip(by_rate, by_rate[1:], strict=False))
    by_threshold = [_macs(tiny(gate_threshold=t), spread=True) for t in (0.0, 0.2, 0.5, 0.8, 0.99)]
    assert all(a >= b for a, b in zip(by_threshold, by_threshold[1:], strict=False))
    assert by_threshold[0] > by_threshold[-1]


def test_paper_operating_point_runs_the_configured_fraction():
    cfg = skipnet.Config(depth=110, width=4, exec_rate_init=0.5)
    model = skipnet.build(cfg).eval()
    with torch.no_grad():
        _, info = model(skipnet.example_input(cfg, batch_size=4))
    assert info["gates"].sum(dim=0).tolist() == [round(0.5 * 53)] * 4


def test_default_config_and_validation():
    model = skipnet.build().eval()
    x = skipnet.example_input(skipnet.Config(), batch_size=2)
    with torch.no_grad():
        out, info = model(x)
    assert out.shape == (2, 10) and info["gates"].shape == (5, 2)
    summary = skipnet.summarize(info)
    assert set(summary) == {"executed_gated_blocks", "gate_rates"} and len(summary["gate_rates"].split()) == 5
    for bad in ({"gate_threshold": 1.0}, {"exec_rate_init": 1.5}, {"sp_steps": -1}, {"gamma": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            skipnet.build(tiny(**bad))


@pytest.mark.parametrize("phase", ["sp", "rl"])
def test_gradients_reach_the_gate(phase):
    cfg = tiny(sp_steps=10 if phase == "sp" else 0, alpha=0.5)
    model = spread_gates(skipnet.build(cfg), scale=5.0).train()
    assert model.phase == phase
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    out, info = model(x)
    assert ("log_probs" in info) == (phase == "rl")
    skipnet.loss(out, info, y).backward()
    for name in ("proj.weight", "lstm.weight_ih", "lstm.weight_hh", "embed.0.weight", "embed.4.weight"):
        grad = model.gate.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.net.fc.weight.grad.abs().sum() > 0


def test_rl_loss_rewards_skipping():
    """With a constant cross-entropy, the policy gradient alone lowers the execution probability."""
    cfg = tiny(sp_steps=0, alpha=1.0, rl_weight=1.0)
    model = skipnet.build(cfg).train()
    out, info = model(torch.randn(64, 1, 8, 8))
    probs = info["gate_probs"]
    info["aux_loss"].backward()
    # d loss / d logit summed over all gates: positive means gradient descent lowers the logits
    grad_logit = model.gate.proj.bias.grad
    assert grad_logit is not None and float(grad_logit) > 0, (float(grad_logit), float(probs.mean()))


def test_train_phase_switches_after_sp_steps():
    model = skipnet.build(tiny(sp_steps=2)).train()
    x = torch.randn(4, 1, 8, 8)
    phases = []
    for _ in range(4):
        phases.append(model.phase)
        model(x)
    assert phases == ["sp", "sp", "rl", "rl"]


def test_loss_is_cross_entropy_in_supervised_phase():
    model = skipnet.build(tiny()).train()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    out, info = model(x)
    torch.testing.assert_close(skipnet.loss(out, info, y), F.cross_entropy(out, y))


@pytest.mark.slow
def test_training_on_digits_skips_blocks_and_keeps_accuracy():
    """Supervised pre-training, then hybrid RL (TRAIN: 8 epochs) on 16x16 digits with a width-8 ResNet-14."""
    cfg = skipnet.Config(width=8, image_size=16)
    result = train_and_compare(skipnet, cfg)
    x_test = result["x_test"]
    with torch.no_grad():
        _, info = result["model_dynamic"](x_test)
    executed = float(info["gates"].float().mean())
    assert 0.2 <= executed < 1.0, executed  # the policy learned to skip some blocks, not all
    assert count_macs(result["model_dynamic"], x_test) < count_macs(result["model_dense"], x_test)
    assert result["accuracy_dynamic"] >= result["accuracy_dense"] - 0.05, result
