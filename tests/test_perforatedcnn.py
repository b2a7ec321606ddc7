"""PerforatedCNN: sparse eval equals the masked oracle, MAC count, the rate knob, masks, fine-tuning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from catalog.costs import count_macs
from implementations.common.train import TrainSettings, train_and_compare
from implementations.spatial import perforatedcnn as pc


def tiny(**kw) -> pc.Config:
    return pc.Config(**{"width": 8, "image_size": 32, "backend": "cpu", **kw})


def oracle(model: pc.VGG, x: torch.Tensor) -> torch.Tensor:
    """Dense conv everywhere, then every perforated pixel copies its nearest kept pixel (brute force)."""
    h = x
    for layer in model.features:
        if not isinstance(layer, pc.PerforatedConv):
            h = layer(h)
            continue
        y = F.conv2d(h, layer.conv.weight, padding=1)
        if layer.mask is not None:
            hh, ww = layer.mask.shape
            kept = layer.mask.nonzero().float()  # (K, 2)
            grid = torch.stack(torch.meshgrid(torch.arange(hh), torch.arange(ww), indexing="ij"), -1).view(-1, 2)
            d = ((grid.float().unsqueeze(1) - kept.unsqueeze(0)) ** 2).sum(-1)
            src = kept[d.argmin(1)].long()  # (H*W, 2)
            y = y[:, :, src[:, 0], src[:, 1]].view_as(y)
        h = F.relu(layer.bn(y))
    return model.fc(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("pattern", pc.PATTERNS)
def test_eval_equals_masked_dense_oracle(pattern):
    cfg = tiny(pattern=pattern)
    model = pc.build(cfg).eval()
    x = pc.example_input(cfg, 3)
    with torch.no_grad():
        out, info = model(x)
        assert len(info["masks"]) == 10 and all(m.dtype == torch.bool for m in info["masks"])
        torch.testing.assert_close(out, oracle(model, x), atol=1e-5, rtol=1e-4)


def test_rate_zero_equals_baseline():
    cfg = tiny(rate=0.0)
    model, dense = pc.build(cfg).eval(), pc.build_baseline(cfg).eval()
    dense.load_state_dict(model.state_dict())
    x = pc.example_input(cfg, 2)
    with torch.no_grad():
        out, info = model(x)
        assert info == {} and all(c.mask is None for c in model.convs())
        torch.testing.assert_close(out, dense(x)[0], atol=1e-6, rtol=1e-6)


def test_counted_macs_equal_what_ran():
    cfg = tiny()
    model = pc.build(cfg).eval()
    x = pc.example_input(cfg, 2)
    expected = 0
    for conv, side in zip(model.convs(), pc.conv_sizes(cfg), strict=True):
        pixels = int(conv.mask.sum()) if conv.mask is not None else side * side
        expected += len(x) * pixels * conv.conv.weight.numel()
    expected += len(x) * model.fc.weight.numel()
    with torch.no_grad():
        assert count_macs(model, x) == expected


def test_masks_follow_the_rate_and_are_input_independent():
    gen = torch.Generator().manual_seed(0)
    for pattern in pc.PATTERNS:
        for rate in (0.25, 0.5, 0.75):
            mask = pc.perforation_mask(40, 40, rate, pattern, gen)
            assert abs(float(mask.float().mean()) - (1 - rate)) < 0.05, (pattern, rate)
    grid = pc.perforation_mask(20, 20, 0.5, "grid", gen)
    rows, cols = grid.any(1), grid.any(0)
    assert torch.equal(grid, rows.view(-1, 1) & cols.view(1, -1)), "a grid mask is a product of rows and columns"
    model = pc.build(tiny()).eval()
    with torch.no_grad():
        _, a = model(pc.example_input(tiny(), 2))
        _, b = model(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(m, n) for m, n in zip(a["masks"], b["masks"], strict=True))


def test_nearest_kept_maps_to_the_closest_kept_pixel():
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[0, 0] = mask[4, 5] = mask[2, 3] = True
    index = pc.nearest_kept(mask)
    kept = {0: (0, 0), 29: (4, 5), 15: (2, 3)}
    assert set(index.tolist()) <= set(kept) and index[0] == 0 and index[29] == 29 and index[15] == 15
    for p, k in enumerate(index.tolist()):
        y, x = divmod(p, 6)
        best = min((y - a) ** 2 + (x - b) ** 2 for a, b in kept.values())
        assert (y - kept[k][0]) ** 2 + (x - kept[k][1]) ** 2 == best


def test_rate_moves_executed_macs_monotonically():
    x = pc.example_input(tiny(), 2)
    macs = []
    for rate in (0.0, 0.25, 0.5, 0.75, 0.9):
        with torch.no_grad():
            macs.append(count_macs(pc.build(tiny(rate=rate)).eval(), x))
    assert all(a > b for a, b in zip(macs, macs[1:], strict=False)), macs
    assert macs[2] < 0.6 * macs[0]


def test_fine_tuning_gradients_pass_the_perforation():
    model = pc.build(tiny()).train()
    x, y = pc.example_input(tiny(), 4), torch.randint(0, 10, (4,))
    out, _ = model(x)
    F.cross_entropy(out, y).backward()
    for conv in model.convs():
        assert conv.conv.weight.grad is not None and conv.conv.weight.grad.abs().sum() > 0


def test_summary_figure_and_bad_config():
    from matplotlib.figure import Figure

    with torch.no_grad():
        _, info = pc.build(tiny()).eval()(pc.example_input(tiny(), 1))
    assert pc.summarize(info)["perforated_layers"] == 10
    assert isinstance(pc.decision_figure(tiny()), Figure)
    for bad in ({"rate": 1.0}, {"pattern": "impact"}, {"image_size": 16}):
        with pytest.raises(ValueError):
            pc.build(tiny(**bad))


@pytest.mark.slow
def test_fine_tuning_on_digits_keeps_accuracy():
    result = train_and_compare(pc, pc.Config(), TrainSettings(epochs=4, lr=3e-3, batch_size=64))
    model, x = result["model_dynamic"], result["x_test"]
    with torch.no_grad():
        _, info = model(x[:4])
    assert float(info["kept"].mean()) == pytest.approx(0.5, abs=0.06)
    assert result["accuracy_dynamic"] >= result["accuracy_dense"] - 0.05
