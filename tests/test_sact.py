"""SACT: per-position halting executed with sparse_conv2d; oracle, MACs, knob, gradients, figure, training."""

from __future__ import annotations

import pytest
import torch

from catalog.costs import count_macs
from implementations.spatial import sact
from implementations.spatial.sact import Config, build, build_baseline, dilate, example_input

TINY = Config(depth=20, width=4, image_size=16)  # three stages of three units


def _calibrated(rate: float = 0.55, **knobs) -> sact.SACTResNet:
    torch.manual_seed(0)
    return build(Config(depth=20, width=4, image_size=16, unit_rate_init=rate, **knobs)).eval()


@pytest.mark.parametrize("backend", ["cpu", None])
def test_eval_equals_masked_oracle(backend: str | None) -> None:
    model = _calibrated(backend=backend)
    x = example_input(model.cfg, 4)
    with torch.no_grad():
        out, info = model(x)
        ref, ref_info = model.masked_forward(x)
    for units, ref_units in zip(info["units"], ref_info["units"], strict=True):
        assert torch.equal(units, ref_units)
    assert any(len(u.unique()) > 1 for u in info["units"])  # positions halt after different units
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_imagenet_bottlenecks_equal_the_masked_oracle() -> None:
    torch.manual_seed(0)
    model = build(Config(arch="imagenet", depth=50, width=8, image_size=64, unit_rate_init=0.5, backend="cpu"))
    model.eval()
    x = example_input(model.cfg, 2)
    with torch.no_grad():
        out, info = model(x)
        ref, ref_info = model.masked_forward(x)
    assert all(torch.equal(a, b) for a, b in zip(info["units"], ref_info["units"], strict=True))
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_residuals_run_only_at_running_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[int, ...], int]] = []
    original = sact.sparse_conv2d

    def spy(x, mask, weight, *args, **kwargs):
        calls.append((tuple(weight.shape), int(mask.sum())))
        return original(x, mask, weight, *args, **kwargs)

    monkeypatch.setattr(sact, "sparse_conv2d", spy)
    model = _calibrated(0.4, backend="cpu")
    with torch.no_grad():
        _, info = model(example_input(model.cfg, 4))
    conv2_counts = [n for shape, n in calls if shape[1:] == (shape[0], 3, 3)][1::2]  # every second: conv2
    expected = [int((units > k).sum()) for units, stage in zip(info["units"], model.net.stages, strict=True)
                for k in range(1, len(stage)) if (units > k).any()]
    assert conv2_counts == expected


def test_all_units_equal_the_baseline() -> None:
    torch.manual_seed(0)
    model = build(TINY).eval()
    for heads in model.halting:
        for head in heads:
            torch.nn.init.zeros_(head.local_conv.weight)
            torch.nn.init.zeros_(head.global_fc.weight)
            torch.nn.init.constant_(head.local_conv.bias, -30.0)
    dense = build_baseline(TINY).eval()
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("halting.") for k in unexpected)
    x = example_input(TINY, 2)
    with torch.no_grad():
        out, info = model(x)
        ref, _ = dense(x)
    assert float(info["unit_rate"]) == 1.0
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_count_macs_matches_the_recorded_ponder_maps() -> None:
    model = _calibrated(backend="cpu")
    cfg = model.cfg
    x = example_input(cfg, 4)
    with torch.no_grad():
        _, info = model(x)
    size = cfg.image_size
    expected = 4 * (size * size * model.net.conv1.weight.numel() + model.net.fc.weight.numel())
    for s, (stage, units) in enumerate(zip(model.net.stages, info["units"], strict=True)):
        size //= 1 if s == 0 else 2
        c = stage[0].out_channels
        first = stage[0]
        expected += 4 * size * size * (first.conv1.weight.numel() + first.conv2.weight.numel() + 9 * c)
        expected += 4 * c  # the global halting logit
        for k in range(1, len(stage)):
            active = units > k
            if not active.any():
                break
            read = int(dilate(active, 3).sum())
            expected += read * stage[k].conv1.weight.numel() + int(active.sum()) * stage[k].conv2.weight.numel()
            if k < len(stage) - 1:
                expected += read * 9 * c + 4 * c  # halting taps where the 3x3 window reads, global logit
    assert count_macs(model, x) == pytest.approx(expected, rel=1e-9)


def test_unit_rate_init_moves_executed_macs_monotonically(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNNET_KERNEL_BACKEND", "cpu")
    x = example_input(TINY, 4)
    macs = [count_macs(_calibrated(rate), x) for rate in (0.35, 0.6, 0.8, 1.0)]
    assert macs == sorted(macs) and macs[0] < 0.75 * macs[-1]


def test_gradients_reach_the_halting_units() -> None:
    torch.manual_seed(0)
    model = build(TINY).train()
    x, y = example_input(TINY, 4), torch.arange(4)
    out, info = model(x)
    (torch.nn.functional.cross_entropy(out, y) + info["aux_loss"]).backward()
    for heads in model.halting:
        for head in heads:
            assert head.local_conv.weight.grad is not None and head.local_conv.weight.grad.abs().sum() > 0
            assert head.global_fc.weight.grad is not None and head.global_fc.weight.grad.abs().sum() > 0


def test_decision_figure_draws_the_ponder_maps() -> None:
    from matplotlib.image import AxesImage

    fig = sact.decision_figure(Config(depth=14, width=4, unit_rate_init=0.5), size=48)
    images = [a for ax in fig.axes for a in ax.get_children() if isinstance(a, AxesImage)]
    assert len(images) >= 2
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_config_errors_and_summary() -> None:
    with pytest.raises(ValueError, match="arch"):
        build(Config(arch="vgg"))
    with pytest.raises(ValueError, match="unit_rate_init"):
        build(Config(unit_rate_init=1.5))
    model = _calibrated()
    with torch.no_grad():
        _, info = model(example_input(model.cfg, 2))
    summary = sact.summarize(info)
    assert 0 < summary["executed_units"] <= 1 and len(summary["mean_units_per_position"].split()) == 3


@pytest.mark.slow
def test_training_on_digits_learns_to_halt() -> None:
    from implementations.common.train import train_and_compare

    result = train_and_compare(sact, Config())
    model, x_test = result["model_dynamic"], result["x_test"]
    with torch.no_grad():
        _, info = model(x_test)
    assert float(info["unit_rate"]) < 0.9
    assert count_macs(model, x_test) / count_macs(result["model_dense"], x_test) < 0.95
    assert result["accuracy_dynamic"] >= result["accuracy_dense"] - 0.05
