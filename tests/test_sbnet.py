"""SBNet: sparse residual blocks on gathered tiles (with overlap) that really skip the inactive tiles."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from catalog.costs import count_macs
from implementations.common.train import TrainSettings, train_and_compare
from implementations.spatial import sbnet
from kernels.block_conv import reduce_mask

TINY = sbnet.Config(width=4, image_size=16, block_size=4)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and shifts, so that zero padding and halos matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.5)


def _model(cfg: sbnet.Config = TINY, seed: int = 0) -> sbnet.SBNetResNet:
    torch.manual_seed(seed)
    model = sbnet.build(cfg)
    _randomize(model, seed)
    return model.eval()


def _masked_dense_oracle(model: sbnet.SBNetResNet, x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Every block dense on every pixel; active tiles take the block's output, the others its input."""
    h = model.net.stem(x)
    for stage, mask in zip(model.net.stages, masks, strict=True):
        on = sbnet.pixel_mask(mask, model.cfg.block_size)
        for block in stage:
            h = torch.where(on, block(h), h) if sbnet.is_sparse(block) else block(h)
    return model.net.head(h)


@pytest.mark.parametrize("density", [0.4, None])
@torch.no_grad()
def test_eval_path_equals_masked_dense_oracle(density):
    model = _model(replace(TINY, density=density, mask_threshold=0.47))
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out, info = model(x)
    masks = info["block_masks"]
    stage1 = masks[0].float().mean()
    assert 0.1 < float(stage1) < 0.9, stage1  # tiles really differ, so the check has teeth
    torch.testing.assert_close(out, _masked_dense_oracle(model, x, masks), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_every_tile_active_equals_baseline():
    model = _model(replace(TINY, density=1.0))
    baseline = sbnet.build_baseline(TINY).eval()
    missing, unexpected = baseline.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("mask_net.") for k in unexpected)
    x = torch.randn(5, 3, 16, 16)
    out, info = model(x)
    assert all(bool(m.all()) for m in info["block_masks"])
    torch.testing.assert_close(out, baseline(x)[0], atol=1e-5, rtol=1e-5)


def _analytic_macs(model: sbnet.SBNetResNet, x: torch.Tensor, masks: list[torch.Tensor]) -> int:
    """Stem, mask network, dense blocks and head on every sample; each sparse block on its active tiles,
    its first conv on the tile plus a one-pixel ring (the halo), its second conv on the tile."""
    b = model.cfg.block_size
    expected = count_macs(model.mask_net, x) + count_macs(model.net.stem, x)
    h = model.net.stem(x)
    for stage, mask in zip(model.net.stages, masks, strict=True):
        tiles = int(mask.sum())
        for block in stage:
            if sbnet.is_sparse(block):
                c = block.conv1.weight.shape[0]
                expected += tiles * ((b + 2) ** 2 + b**2) * c * c * 9
            else:
                expected += count_macs(block, h)
            h = block(h)
    return expected + count_macs(model.net.head, h)


@torch.no_grad()
def test_executed_macs_equal_per_tile_analytic_count():
    model = _model(seed=3)
    x = torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    _, info = model(x)
    assert count_macs(model, x) == _analytic_macs(model, x, info["block_masks"])
    assert count_macs(model, x) < count_macs(sbnet.build_baseline(TINY).eval(), x)


@torch.no_grad()
def test_inactive_tiles_are_never_computed():
    model = _model(replace(TINY, density=0.0))
    x = torch.randn(3, 3, 16, 16)
    _, info = model(x)
    assert not any(bool(m.any()) for m in info["block_masks"])
    assert count_macs(model, x) == _analytic_macs(model, x, info["block_masks"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    h_in = model.net.stem(x)
    h_out = model._sparse_stage(list(model.net.layer1), h_in, info["block_masks"][0])
    assert h_out is h_in  # nothing gathered, nothing written
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@torch.no_grad()
def test_knobs_move_executed_macs_monotonically():
    x = sbnet.example_input(TINY, batch_size=4)
    by_density = []
    for density in (0.0, 0.25, 0.5, 0.75, 1.0):
        model = _model(replace(TINY, density=density))
        by_density.append(count_macs(model, x))
    assert by_density == sorted(by_density) and by_density[0] < by_density[-1]
    by_tol = []
    model = _model(replace(TINY, density=None, mask_threshold=0.45))
    for tol in (0.0, 0.25, 0.5, 0.75, 0.95):
        model.cfg = replace(model.cfg, tol=tol)
        by_tol.append(count_macs(model, x))
    assert by_tol == sorted(by_tol, reverse=True) and by_tol[0] > by_tol[-1]


@torch.no_grad()
def test_threshold_rule_is_sbnet_reduce_mask():
    cfg = replace(TINY, density=None, tol=0.3, reduce_mode="avg", mask_threshold=0.47)
    model = _model(cfg)
    x = torch.randn(4, 3, 16, 16)
    _, info = model(x)
    prob = torch.sigmoid(info["mask_logits"])
    for size, mask in zip(sbnet.stage_sizes(cfg), info["block_masks"], strict=True):
        pixels = F.interpolate((prob > 0.47).float(), size=(size, size), mode="nearest")[:, 0]
        assert torch.equal(mask, reduce_mask(pixels, cfg.block_size, 0.3, "avg"))


def test_tiles_gather_and_scatter():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, 12, generator=gen)
    mask = torch.tensor([[[True, False, False], [False, True, True]], [[False, False, True], [True, False, False]]])
    tiles = sbnet.Tiles(mask, 4, 2)
    padded = sbnet.pad_nhwc(x, 2)
    win = tiles.gather(padded)
    ref = F.pad(x, (2, 2, 2, 2))
    for k, (n, by, bx) in enumerate(zip(*tiles.idx, strict=True)):
        torch.testing.assert_close(win[k], ref[n, :, 4 * by : 4 * by + 8, 4 * bx : 4 * bx + 8])
    new = torch.randn(tiles.count, 5, 4, 4, generator=gen)
    tiles.scatter_(padded, new)
    out = sbnet.interior(padded, 2)
    on = sbnet.pixel_mask(mask, 4)
    assert torch.equal(out.masked_select(~on), x.masked_select(~on))  # inactive tiles untouched
    assert float(padded[:, :2].abs().sum() + padded[:, -2:].abs().sum()) == 0.0  # the frame stays zero
    ext = torch.ones(tiles.count, 1, 6, 6)
    tiles.zero_outside_(ext, 1)
    for k, (_, by, bx) in enumerate(zip(*tiles.idx, strict=True)):
        assert bool((ext[k, 0, 0] == 0).all()) == (by == 0)
        assert bool((ext[k, 0, :, -1] == 0).all()) == (bx == 2)


def test_gradients_reach_the_mask_network_and_the_classifier_in_train_mode():
    torch.manual_seed(0)
    model = sbnet.build(TINY).train()
    x = torch.randn(6, 3, 16, 16)
    out, info = model(x)
    assert info["aux_loss"].requires_grad
    (F.cross_entropy(out, torch.arange(6) % 10) + info["aux_loss"]).backward()
    assert model.mask_net.conv1.weight.grad is not None and model.mask_net.conv1.weight.grad.abs().sum() > 0
    assert model.net.layer1[0].conv1.weight.grad.abs().sum() > 0
    # the masks are decisions, not a relaxation: the classifier loss alone does not reach the mask net
    model.zero_grad()
    out, info = model(x)
    F.cross_entropy(out, torch.arange(6) % 10).backward()
    assert model.mask_net.conv1.weight.grad is None


def test_train_mode_equals_eval_path_with_the_same_masks():
    model = _model(TINY)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        out_eval, info = model(x)
        model.train()
        for m in model.modules():  # train mode, but running statistics: only the execution differs
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        out_train, info_train = model(x)
    for a, b in zip(info["block_masks"], info_train["block_masks"], strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(out_train, out_eval, atol=1e-5, rtol=1e-5)


def test_config_validation_and_summary():
    with pytest.raises(ValueError, match="density"):
        sbnet.build(replace(TINY, density=1.5))
    with pytest.raises(ValueError, match="block_size"):
        sbnet.build(replace(TINY, block_size=3))
    with pytest.raises(ValueError, match="tol"):
        sbnet.build(replace(TINY, tol=1.0))
    info = {"block_masks": [torch.tensor([[[True, False]]]), torch.tensor([[[True, True]]])],
            "density": torch.tensor(0.75)}
    assert sbnet.summarize(info) == {"active_tiles": 0.75, "active_per_stage": "0.50 1.00"}
    assert sbnet.summarize({}) == {"active_tiles": 1.0}
    x = sbnet.example_input(sbnet.Config(), batch_size=2)
    out, info = sbnet.build().eval()(x)
    assert out.shape == (2, 10) and [m.shape for m in info["block_masks"]] == [(2, 4, 4), (2, 2, 2), (2, 1, 1)]


def test_decision_figure_returns_a_figure():
    from matplotlib.figure import Figure

    fig = sbnet.decision_figure(replace(TINY, image_size=32, block_size=8))
    assert isinstance(fig, Figure) and len(fig.axes) == 8


@pytest.mark.slow
def test_training_on_digits_keeps_accuracy_at_the_configured_density():
    cfg = sbnet.Config()
    result = train_and_compare(sbnet, cfg)
    x_test = result["x_test"]
    with torch.no_grad():
        _, info = result["model_dynamic"](x_test)
    assert abs(float(info["block_masks"][0].float().mean()) - cfg.density) < 0.05
    dense_macs = count_macs(result["model_dense"], x_test)
    dynamic_macs = count_macs(result["model_dynamic"], x_test)
    assert dynamic_macs < 0.9 * dense_macs
    assert result["accuracy_dynamic"] >= result["accuracy_dense"] - 0.05, result
    # the mask network learned the digits' foreground: active tiles cover more ink than inactive ones
    ink = sbnet.foreground_target(x_test, cfg.mask_stride)
    on = F.interpolate(sbnet.pixel_mask(info["block_masks"][0], cfg.block_size).float(), size=ink.shape[-2:])
    assert float((ink * on).sum() / on.sum()) > float((ink * (1 - on)).sum() / (1 - on).sum())
    assert isinstance(sbnet.TRAIN, TrainSettings)
