"""RS-Nets (implementations/resolution/rs_nets.py): shared weights, private BatchNorms, a runtime switch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from catalog.costs import count_macs
from implementations.common.train import train_and_compare
from implementations.resolution import rs_nets as rs

TINY = rs.Config(width=4)


def _pair(cfg: rs.Config) -> tuple[rs.RSNet, rs.Baseline]:
    dyn = rs.build(cfg).eval()
    dense = rs.build_baseline(cfg).eval()
    state = dyn.state_dict()
    dense.load_state_dict({k: state[k] for k in dense.state_dict()})
    return dyn, dense


def _perturb_batchnorms(model: nn.Module) -> None:
    """Give every resolution's BatchNorm different statistics and affine parameters."""
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def _plain_at(model: rs.RSNet, j: int) -> nn.Module:
    """A plain backbone holding the shared weights and resolution j's private BatchNorms."""
    plain = rs.make_backbone(model.cfg).eval()
    state = model.state_dict()
    own = {}
    for key in plain.state_dict():
        full = "net." + key
        parent, _, leaf = full.rpartition(".")
        private = f"{parent}.others.{j - 1}.{leaf}"
        own[key] = state[private] if j > 0 and private in state else state[full]
    plain.load_state_dict(own)
    return plain


@pytest.mark.parametrize("resolution", [28, 20, 16])
def test_switched_network_equals_plain_network_on_the_resized_input(resolution):
    cfg = dataclasses.replace(TINY, resolution=resolution)
    dyn, _ = _pair(cfg)
    _perturb_batchnorms(dyn)
    x = rs.example_input(cfg, 3)
    j = cfg.resolutions.index(resolution)
    with torch.no_grad():
        out, info = dyn(x)
        oracle = _plain_at(dyn, j)(rs.resize(x, resolution))
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-5)
    assert info["resolution"].tolist() == [resolution] * 3  # one switch for the whole batch


def test_native_resolution_equals_baseline():
    dyn, dense = _pair(dataclasses.replace(TINY, resolution=32))
    x = rs.example_input(TINY, 4)
    with torch.no_grad():
        torch.testing.assert_close(dyn(x)[0], dense(x)[0], atol=1e-6, rtol=1e-6)


def test_macs_equal_analytic_count_and_fall_with_resolution():
    macs = []
    x = rs.example_input(TINY, 2)
    for r in TINY.resolutions:
        dyn, dense = _pair(dataclasses.replace(TINY, resolution=r))
        macs.append(count_macs(dyn, x))
        assert macs[-1] == count_macs(dense, rs.resize(x, r))  # exactly the plain network at that size
    assert all(a > b for a, b in zip(macs, macs[1:], strict=False)), macs
    assert macs[2] / macs[0] == pytest.approx((24 / 32) ** 2, rel=0.1)


def test_training_step_reaches_shared_weights_private_batchnorms_and_alpha():
    model = rs.build(TINY).train()
    x, y = rs.example_input(TINY, 4), torch.tensor([0, 1, 2, 3])
    out, info = model(x)
    assert len(info["logits"]) == len(TINY.resolutions)
    rs.loss(out, info, y).backward()
    assert model.alpha.grad.abs().sum() > 0
    assert model.net.conv1.weight.grad.abs().sum() > 0
    bn = model.net.bn1
    assert bn.weight.grad.abs().sum() > 0 and all(o.weight.grad.abs().sum() > 0 for o in bn.others)
    stats = [bn.running_mean] + [o.running_mean for o in bn.others]  # each resolution saw its own input
    assert all(not torch.allclose(a, b) for a, b in zip(stats, stats[1:], strict=False))


def test_mred_variants():
    logits = [torch.randn(5, 10, requires_grad=True) for _ in range(3)]
    alpha, y = torch.ones(3, requires_grad=True), torch.arange(5)
    with torch.no_grad():
        full, ens, none = (rs.mred_loss(logits, alpha, y, d) for d in ("ens_topdown", "ens", "none"))
    assert float(none) < float(full) and float(none) < float(ens)
    with pytest.raises(ValueError, match="distill"):
        rs.build(dataclasses.replace(TINY, distill="x"))
    with pytest.raises(ValueError, match="resolution must be"):
        rs.build(dataclasses.replace(TINY, resolution=30))


def test_summarize_and_decision_figure():
    from matplotlib.figure import Figure

    dyn, _ = _pair(TINY)
    with torch.no_grad():
        assert rs.summarize(dyn(rs.example_input(TINY, 2))[1]) == {"resolution": 24}
    fig = rs.decision_figure(TINY)
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * len(TINY.resolutions)


@pytest.mark.slow
def test_training_on_digits_keeps_accuracy_at_the_switched_resolution():
    cfg = rs.Config()
    result = train_and_compare(rs, cfg)  # the module's TRAIN settings
    assert result["accuracy_dense"] > 0.8
    assert result["accuracy_dynamic"] >= result["accuracy_dense"] - 0.05
    model, x = result["model_dynamic"], result["x_test"][:16]
    dense_macs = count_macs(result["model_dense"], x)
    assert count_macs(model, x) / dense_macs == pytest.approx((cfg.resolution / cfg.image_size) ** 2, rel=0.1)
