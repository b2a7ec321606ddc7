"""ACT over the residual units of a ResNet: executed eval path, oracle, MACs, knob, gradients, training."""

from __future__ import annotations

import pytest
import torch

from catalog.costs import count_macs
from implementations.depth import act
from implementations.depth.act import Config, build, build_baseline, example_input, halting_step

TINY = Config(depth=20, width=4, image_size=16)  # three stages of three units


def _calibrated(rate: float = 0.55) -> act.ACTResNet:
    torch.manual_seed(0)
    return build(Config(depth=20, width=4, image_size=16, unit_rate_init=rate)).eval()


def test_halting_step_follows_act() -> None:
    cum = torch.tensor([0.0, 0.5, 0.9])
    p, halt, new = halting_step(cum, torch.tensor([0.3, 0.6, 0.05]), eps=0.01, last=False)
    assert halt.tolist() == [False, True, False]
    assert torch.allclose(p, torch.tensor([0.3, 0.5, 0.05]))  # the remainder 1 - cum where it halts
    assert torch.allclose(new, torch.tensor([0.3, 1.1, 0.95]))
    p, halt, _ = halting_step(cum, torch.zeros(3), eps=0.01, last=True)
    assert halt.all() and torch.allclose(p, 1 - cum)


def test_eval_equals_masked_oracle_with_mixed_decisions() -> None:
    model = _calibrated()
    x = example_input(model.cfg, 8)
    with torch.no_grad():
        out, info = model(x)
        ref, ref_info = model.masked_forward(x)
    assert torch.equal(info["units"], ref_info["units"])
    assert len(set(info["units"].flatten().tolist())) > 1  # samples and stages halt at different units
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(info["ponder"], ref_info["ponder"], atol=1e-6)


def test_halted_samples_leave_the_batch() -> None:
    model = _calibrated(0.4)
    x = example_input(model.cfg, 8)
    seen: list[tuple[int, int]] = []
    hooks = [unit.register_forward_hook(lambda m, i, o, k=k: seen.append((k, len(i[0]))))
             for k, unit in enumerate(model.net.blocks())]
    with torch.no_grad():
        _, info = model(x)
    for hook in hooks:
        hook.remove()
    units = info["units"]  # (S, N)
    n = len(model.net.stages[0])
    expected = [(s * n + k, int((units[s] > k).sum())) for s in range(3) for k in range(n) if (units[s] > k).any()]
    assert seen == expected  # unit k of stage s ran on exactly the samples that had not halted
    assert any(b < 8 for _, b in seen)


def test_all_units_equal_the_baseline() -> None:
    torch.manual_seed(0)
    model = build(TINY).eval()
    for heads in model.halting:
        for head in heads:
            torch.nn.init.zeros_(head.fc.weight)
            torch.nn.init.constant_(head.fc.bias, -30.0)  # h ~ 1e-13: nobody halts before the last unit
    dense = build_baseline(TINY).eval()
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("halting.") for k in unexpected)
    x = example_input(TINY, 4)
    with torch.no_grad():
        out, info = model(x)
        ref, _ = dense(x)
    assert float(info["unit_rate"]) == 1.0
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


def _conv_macs(conv: torch.nn.Conv2d, out_hw: int) -> int:
    return out_hw * out_hw * conv.weight.numel()


def test_count_macs_matches_the_recorded_decisions() -> None:
    model = _calibrated()
    cfg = model.cfg
    x = example_input(cfg, 8)
    with torch.no_grad():
        _, info = model(x)
    per_sample = torch.full((8,), float(_conv_macs(model.net.conv1, cfg.image_size) + model.net.fc.weight.numel()))
    size = cfg.image_size
    for s, stage in enumerate(model.net.stages):
        size //= 1 if s == 0 else 2
        for k, unit in enumerate(stage):
            ran = (info["units"][s] > k).float()
            unit_macs = _conv_macs(unit.conv1, size) + _conv_macs(unit.conv2, size)
            halting_macs = unit.out_channels if k < len(stage) - 1 else 0
            per_sample += ran * (unit_macs + halting_macs)
    assert count_macs(model, x) == pytest.approx(float(per_sample.sum()), rel=1e-9)


def test_unit_rate_init_moves_executed_macs_monotonically() -> None:
    x = example_input(TINY, 8)
    macs = []
    for rate in (0.35, 0.6, 0.8, 1.0):
        torch.manual_seed(0)
        model = build(Config(depth=20, width=4, image_size=16, unit_rate_init=rate)).eval()
        macs.append(count_macs(model, x))
    assert macs == sorted(macs) and macs[0] < 0.7 * macs[-1]
    assert macs[-1] <= count_macs(build_baseline(TINY).eval(), x) * 1.01


def test_gradients_reach_the_halting_units() -> None:
    torch.manual_seed(0)
    model = build(TINY).train()
    x, y = example_input(TINY, 8), torch.arange(8) % 10
    out, info = model(x)
    (torch.nn.functional.cross_entropy(out, y) + info["aux_loss"]).backward()
    for heads in model.halting:
        for head in heads:
            assert head.fc.weight.grad is not None and head.fc.weight.grad.abs().sum() > 0
    assert info["aux_loss"].requires_grad


def test_config_errors_and_summary() -> None:
    with pytest.raises(ValueError, match="eps"):
        build(Config(eps=1.5))
    with pytest.raises(ValueError, match="unit_rate_init"):
        build(Config(unit_rate_init=0.0))
    model = _calibrated()
    with torch.no_grad():
        _, info = model(example_input(model.cfg, 4))
    summary = act.summarize(info)
    assert 0 < summary["executed_units"] <= 1 and len(summary["mean_units_per_stage"].split()) == 3
    assert act.summarize({}) == {"executed_units": 1.0}


@pytest.mark.slow
def test_training_on_digits_learns_to_halt() -> None:
    from implementations.common.train import train_and_compare

    result = train_and_compare(act, Config())
    model, x_test = result["model_dynamic"], result["x_test"]
    with torch.no_grad():
        _, info = model(x_test)
    rate = float(info["unit_rate"])
    assert rate < 0.9  # the ponder cost made the network stop before the last unit
    macs_ratio = count_macs(model, x_test) / count_macs(result["model_dense"], x_test)
    assert macs_ratio < 0.95
    assert result["accuracy_dynamic"] >= result["accuracy_dense"] - 0.05
