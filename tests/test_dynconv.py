"""DynConv: the executing eval path, its MAC count, the budget knob, the gradients and a short training run."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from catalog.costs import count_macs
from implementations.common.mobilenet import InvertedResidual
from implementations.common.train import TrainSettings, train_and_compare
from implementations.spatial import dynconv

TINY = {
    "cifar": dict(arch="cifar", depth=8, width=4, image_size=16),
    "resnet50": dict(arch="resnet50", width=8, image_size=32),
    "mobilenet_v2": dict(arch="mobilenet_v2", width_mult=0.25, image_size=32),
}


def tiny(arch: str = "cifar", **kw) -> dynconv.Config:
    return dynconv.Config(**{**TINY[arch], "backend": "cpu", **kw})


def oracle(model: dynconv.DynConvNet, x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Masked dense run: every branch on every pixel, then keep it only where the mask is on."""
    h = model.net.stem(x)
    it = iter(masks)
    for block, gated in zip(dynconv.blocks_of(model.net), model.gated, strict=True):
        if not gated:
            h = block(h)
            continue
        m = next(it).unsqueeze(1)
        out = block.shortcut(h) + torch.where(m, block.residual(h), torch.zeros(()))
        h = out if isinstance(block, InvertedResidual) else F.relu(out)
    return model.net.head(h)


@pytest.mark.parametrize("arch", list(TINY))
def test_eval_equals_masked_dense_oracle(arch):
    cfg = tiny(arch)
    model = dynconv.build(cfg).eval()
    x = dynconv.example_input(cfg, 4)
    with torch.no_grad():
        out, info = model(x)
        masks = info["masks"]
        assert all(m.dtype == torch.bool for m in masks)
        density = torch.stack([m.float().mean() for m in masks])
        assert 0 < float(density.mean()) < 1 and bool((density < 1).any())
        torch.testing.assert_close(out, oracle(model, x, masks), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", list(TINY))
def test_every_pixel_on_equals_baseline(arch):
    cfg = tiny(arch, budget=1.0)
    model = dynconv.build(cfg).eval()
    dense = dynconv.build_baseline(cfg).eval()
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("masks.") for k in unexpected)
    x = dynconv.example_input(cfg, 3)
    with torch.no_grad():
        out, info = model(x)
        assert all(bool(m.all()) for m in info["masks"])
        torch.testing.assert_close(out, dense(x)[0], atol=1e-5, rtol=1e-4)


def test_receptive_mask_is_what_the_conv_reads():
    """Brute force: the input pixels with a gradient from the masked outputs of a (strided) conv."""
    torch.manual_seed(0)
    for stride, k in ((1, 3), (2, 3), (2, 1), (1, 1)):
        conv = nn.Conv2d(1, 1, k, stride=stride, padding=k // 2, bias=False)
        nn.init.constant_(conv.weight, 1.0)
        x = torch.randn(2, 1, 11, 12, requires_grad=True)
        y = conv(x)
        out_mask = (torch.rand(y.shape[0], *y.shape[2:]) < 0.2).float()
        (y[:, 0] * out_mask).sum().backward()
        want = x.grad[:, 0] != 0
        got = dynconv.receptive_mask(out_mask, conv, (11, 12)) > 0
        assert torch.equal(got, want), (stride, k)


def analytic_macs(model: dynconv.DynConvNet, x: torch.Tensor, masks: list[torch.Tensor]) -> int:
    """CIFAR ResNet: dense stem, shortcuts and head; per gated block its mask unit (3x3 conv to one
    channel + linear) and the two 3x3 convs, conv1 on the 3x3-dilated mask and conv2 on the mask."""
    n, s, w = len(x), x.shape[-1], model.net.conv1.out_channels
    total = n * x.shape[1] * w * 9 * s * s + n * model.net.fc.in_features * model.net.fc.out_features
    for block, m in zip(dynconv.blocks_of(model.net), masks, strict=True):
        cin, cout = block.in_channels, block.out_channels
        side = m.shape[-1]
        total += n * (cin * 9 * side * side + cin)  # mask unit
        if block.downsample is not None:
            total += n * cin * cout * side * side
        if bool(m.any()):
            dilated = F.max_pool2d(m.float().unsqueeze(1), 3, stride=1, padding=1)
            total += int(dilated.sum()) * cin * cout * 9 + int(m.sum()) * cout * cout * 9
    return total


def test_counted_macs_equal_what_ran():
    cfg = tiny(depth=14)
    model = dynconv.build(cfg).eval()
    x = dynconv.example_input(cfg, 4)
    with torch.no_grad():
        _, info = model(x)
        assert count_macs(model, x) == analytic_macs(model, x, info["masks"])
        assert count_macs(model, x) < 0.8 * count_macs(dynconv.build_baseline(cfg).eval(), x)


def test_branch_with_no_active_pixel_is_not_called():
    cfg = tiny()
    model = dynconv.build(cfg).eval()
    for unit in model.masks:
        nn.init.constant_(unit.conv.bias, -1e4)
    calls = []
    for block in dynconv.blocks_of(model.net):
        block.conv1.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        _, info = model(dynconv.example_input(cfg, 2))
    assert not any(bool(m.any()) for m in info["masks"]) and not calls


def _macs(cfg: dynconv.Config) -> float:
    torch.manual_seed(0)
    model = dynconv.build(cfg).eval()
    return count_macs(model, dynconv.example_input(cfg, 4))


@pytest.mark.parametrize("arch", ["cifar", "mobilenet_v2"])
def test_budget_moves_executed_macs_monotonically(arch):
    macs = [_macs(tiny(arch, budget=b)) for b in (0.1, 0.25, 0.5, 0.75, 1.0)]
    assert all(a < b for a, b in zip(macs, macs[1:], strict=False)), macs


def test_untrained_operating_point_executes_the_budget():
    for budget in (0.25, 0.5):
        cfg = tiny(depth=14, budget=budget)
        model = dynconv.build(cfg).eval()
        with torch.no_grad():
            _, info = model(dynconv.photo_batch(8, cfg.image_size, seed=12345))  # the calibration batch
        assert float(info["cost_fraction"]) == pytest.approx(budget, abs=0.03)


def test_gradients_reach_the_mask_units():
    cfg = tiny()
    model = dynconv.build(cfg).train()
    x, y = dynconv.example_input(cfg, 8), torch.randint(0, 10, (8,))
    out, info = model(x)
    assert all(set(m.detach().unique().tolist()) <= {0.0, 1.0} for m in info["masks"])
    assert info["aux_loss"].requires_grad
    (F.cross_entropy(out, y) + info["aux_loss"]).backward()
    for i, unit in enumerate(model.masks):
        for p in (unit.conv.weight, unit.fc.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0, i


def test_sparsity_criterion_anneals_the_block_bounds():
    costs, totals = [torch.tensor(0.9), torch.tensor(0.1)], [1.0, 1.0]
    start = dynconv.sparsity_criterion(costs, totals, 0.5, progress=0.0)
    end = dynconv.sparsity_criterion(costs, totals, 0.5, progress=1.0)
    assert float(end) == pytest.approx(0.0)  # network at the budget, bounds [0, 1]
    assert float(start) == pytest.approx(0.5 * (0.4**2 + 0.4**2))


def test_summary_and_bad_config():
    cfg = tiny()
    with torch.no_grad():
        _, info = dynconv.build(cfg).eval()(dynconv.example_input(cfg, 2))
    summary = dynconv.summarize(info)
    assert 0 < summary["executed_fraction"] < 1 and len(summary["density_per_block"].split()) == 3
    for bad in ({"arch": "vgg"}, {"budget": 0.0}, {"tau": 0.0}):
        with pytest.raises(ValueError):
            dynconv.build(dynconv.Config(**{**TINY["cifar"], **bad}))


def test_decision_figure_returns_a_figure():
    from matplotlib.figure import Figure

    fig = dynconv.decision_figure(tiny(image_size=32))
    assert isinstance(fig, Figure) and len(fig.axes) >= 4


@pytest.mark.slow
def test_training_on_digits_reaches_the_budget():
    cfg = dynconv.Config(budget=0.5)
    result = train_and_compare(dynconv, cfg, TrainSettings(epochs=5, lr=3e-3, batch_size=64))
    model, x = result["model_dynamic"], result["x_test"]
    with torch.no_grad():
        _, info = model(x)
    assert float(info["cost_fraction"]) == pytest.approx(0.5, abs=0.1)
    assert result["accuracy_dynamic"] >= result["accuracy_dense"] - 0.05
