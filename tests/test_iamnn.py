"""IamNN: weight-shared iterations with ACT halting; executed eval path, oracle, MACs, knobs, training."""

from __future__ import annotations

import pytest
import torch

from catalog.costs import count_macs
from implementations.depth import iamnn
from implementations.depth.iamnn import Config, build, build_baseline, example_input

TINY = Config(width=4, max_iterations=4, image_size=16)


def _calibrated(rate: float = 0.55, **knobs: float) -> iamnn.IamNN:
    torch.manual_seed(0)
    return build(Config(width=4, max_iterations=4, image_size=16, iter_rate_init=rate, **knobs)).eval()


def test_convolutions_are_shared_across_iterations() -> None:
    model = build(TINY)
    dense = build_baseline(TINY)
    shared = sum(p.numel() for n, p in dense.named_parameters() if ".block.conv" in n)
    assert shared == sum(2 * 9 * c * c for c in (4, 8, 16))  # one pair of convs per stage, not per iteration
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in dense.parameters())


def test_eval_equals_masked_oracle_with_mixed_decisions() -> None:
    model = _calibrated()
    x = example_input(model.cfg, 8)
    with torch.no_grad():
        out, info = model(x)
        ref, ref_info = model.masked_forward(x)
    assert torch.equal(info["units"], ref_info["units"])
    assert len(set(info["units"].flatten().tolist())) > 1
    scale = ref.abs().max()
    assert torch.allclose(out / scale, ref / scale, atol=1e-5)


def test_stopped_samples_leave_the_batch() -> None:
    model = _calibrated(0.4)
    x = example_input(model.cfg, 8)
    seen: list[tuple[int, int]] = []
    originals = []
    for s, stage in enumerate(model.net.stages):
        original = stage.block.forward
        originals.append((stage.block, original))

        def spy(h: torch.Tensor, t: int, s: int = s, original=original) -> torch.Tensor:
            seen.append((s, t, len(h)))
            return original(h, t)

        stage.block.forward = spy  # type: ignore[method-assign]
    with torch.no_grad():
        _, info = model(x)
    for block, original in originals:
        block.forward = original  # type: ignore[method-assign]
    expected = [(s, t, int((info["units"][s] > t).sum())) for s in range(3) for t in range(4)
                if (info["units"][s] > t).any()]
    assert seen == expected
    assert any(b < 8 for *_, b in seen)


def test_all_iterations_equal_the_baseline() -> None:
    torch.manual_seed(0)
    model = build(TINY).eval()
    for halting in model.halting:
        torch.nn.init.zeros_(halting.fc.weight)
        torch.nn.init.constant_(halting.fc.bias, -30.0)
    dense = build_baseline(TINY).eval()
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("halting.") for k in unexpected)
    x = example_input(TINY, 4)
    with torch.no_grad():
        out, info = model(x)
        ref, _ = dense(x)
    assert float(info["unit_rate"]) == 1.0
    scale = ref.abs().max()
    assert torch.allclose(out / scale, ref / scale, atol=1e-5)


def test_count_macs_matches_the_recorded_decisions() -> None:
    model = _calibrated()
    cfg = model.cfg
    x = example_input(cfg, 8)
    with torch.no_grad():
        _, info = model(x)
    size = cfg.image_size
    per_sample = torch.full((8,), float(size * size * model.net.conv1.weight.numel() + model.net.fc.weight.numel()))
    for s, stage in enumerate(model.net.stages):
        size //= 1 if s == 0 else 2
        t = stage.transition
        per_sample += size * size * (t.conv1.weight.numel() + t.conv2.weight.numel())
        block_macs = size * size * (stage.block.conv1.weight.numel() + stage.block.conv2.weight.numel())
        for it in range(cfg.max_iterations):
            ran = (info["units"][s] > it).float()
            halting_macs = stage.block.conv1.out_channels if it < cfg.max_iterations - 1 else 0
            per_sample += ran * (block_macs + halting_macs)
    assert count_macs(model, x) == pytest.approx(float(per_sample.sum()), rel=1e-9)


def test_threshold_and_rate_move_executed_macs_monotonically() -> None:
    x = example_input(TINY, 8)
    by_threshold = [count_macs(_calibrated(0.8, threshold=th), x) for th in (0.99, 0.6, 0.3, 0.1)]
    assert by_threshold == sorted(by_threshold, reverse=True) and by_threshold[-1] < 0.8 * by_threshold[0]
    by_rate = [count_macs(_calibrated(rate), x) for rate in (0.3, 0.6, 1.0)]
    assert by_rate == sorted(by_rate) and by_rate[0] < 0.7 * by_rate[-1]


def test_gradients_reach_the_halting_units() -> None:
    torch.manual_seed(0)
    model = build(TINY).train()
    x, y = example_input(TINY, 8), torch.arange(8) % 10
    out, info = model(x)
    (torch.nn.functional.cross_entropy(out, y) + info["aux_loss"]).backward()
    for halting in model.halting:
        assert halting.fc.weight.grad is not None and halting.fc.weight.grad.abs().sum() > 0


def test_config_errors_and_summary() -> None:
    with pytest.raises(ValueError, match="threshold"):
        build(Config(threshold=0.0))
    with pytest.raises(ValueError, match="max_iterations"):
        build(Config(max_iterations=0))
    model = _calibrated()
    with torch.no_grad():
        _, info = model(example_input(model.cfg, 4))
    summary = iamnn.summarize(info)
    assert 0 < summary["executed_iterations"] <= 1
    assert len(summary["mean_iterations_per_stage"].split()) == 3


@pytest.mark.slow
def test_training_on_digits_learns_to_stop_early() -> None:
    from implementations.common.train import train_and_compare

    result = train_and_compare(iamnn, Config())
    model, x_test = result["model_dynamic"], result["x_test"]
    with torch.no_grad():
        _, info = model(x_test)
    assert float(info["unit_rate"]) < 0.9
    assert count_macs(model, x_test) / count_macs(result["model_dense"], x_test) < 0.95
    assert result["accuracy_dynamic"] >= result["accuracy_dense"] - 0.05
