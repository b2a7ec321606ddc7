"""Channel gating: base partial sums always, the remaining channels only at open positions (sparse_conv2d)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from catalog.costs import count_macs
from implementations.channel import channel_gating as cg
from implementations.common.train import train_and_compare
from kernels import sparse_conv as sparse_mod

TINY = cg.Config(depth=8, width=8, image_size=16)
TINY_G2 = cg.Config(backbone="resnet18", width=8, image_size=32, gate_groups=2, threshold=0.5)
DIGITS_EPOCHS = 16


@pytest.fixture(autouse=True)
def _sparse_cpu_path(monkeypatch):
    """Force the skipping CPU path of sparse_conv2d (no dense fallback), so MACs are exactly the open ones."""
    monkeypatch.setenv("DYNNET_KERNEL_BACKEND", "cpu")


def _model(cfg: cg.Config = TINY, seed: int = 0) -> cg.ChannelGatedResNet:
    """An untrained model with random BN statistics in the backbone, in float64."""
    torch.manual_seed(seed)
    model = cg.build(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.double().eval()


def _input(cfg: cg.Config, n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen, dtype=torch.float64)


def _gated_oracle(gate: cg.GatedConv, conv: torch.nn.Conv2d, x: torch.Tensor):
    """The full dense convolution where the gate is open, the base partial sum elsewhere."""
    full = F.conv2d(x, conv.weight, None, conv.stride, conv.padding)
    cb = gate.base_channels
    yp = F.conv2d(x[:, :cb], conv.weight[:, :cb], None, conv.stride, conv.padding)
    on = gate.score(yp) > 0
    return torch.where(gate.expand(on, full.shape[1]), full, yp), on


def _masked_dense_oracle(model: cg.ChannelGatedResNet, x: torch.Tensor):
    h = model.net.stem(x)
    decisions = []
    for i, block in enumerate(model.net.blocks()):
        y, d1 = _gated_oracle(model.gate[2 * i], block.conv1, h)
        y, d2 = _gated_oracle(model.gate[2 * i + 1], block.conv2, F.relu(block.bn1(y)))
        h = F.relu(block.shortcut(h) + block.bn2(y))
        decisions += [d1, d2]
    return model.net.head(h), decisions


@pytest.mark.parametrize("cfg", [TINY, TINY_G2], ids=["cifar", "resnet18_2groups"])
@torch.no_grad()
def test_eval_path_equals_masked_dense_oracle(cfg):
    model = _model(cfg)
    x = _input(cfg, 5)
    out, info = model(x)
    ref, decisions = _masked_dense_oracle(model, x)
    for got, want in zip(info["gates"], decisions, strict=True):
        assert torch.equal(got, want)
    assert 0.05 < float(info["exec_rate"]) < 0.6  # some positions open, most closed
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@torch.no_grad()
def test_all_positions_open_equals_baseline():
    model = _model()
    for g in model.gate:
        g.delta.fill_(-1e9)
    baseline = cg.build_baseline(TINY).double().eval()
    missing, unexpected = baseline.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("gate.") for k in unexpected)
    x = _input(TINY, 4)
    out, info = model(x)
    assert float(info["exec_rate"]) == 1.0
    torch.testing.assert_close(out, baseline(x)[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cfg", [TINY, TINY_G2], ids=["cifar", "resnet18_2groups"])
@torch.no_grad()
def test_executed_macs_equal_per_position_analytic_count(cfg):
    model = _model(cfg, seed=2)
    x = _input(cfg, 4, seed=2)
    n = len(x)
    _, info = model(x)
    h = model.net.stem(x[:1])
    expected = count_macs(model.net.stem, x)
    for i, block in enumerate(model.net.blocks()):
        for j, conv in ((2 * i, block.conv1), (2 * i + 1, block.conv2)):
            gate, on = model.gate[j], info["gates"][j]
            ho, wo = on.shape[2:]
            cb, cin, cout = gate.base_channels, conv.in_channels, conv.out_channels
            expected += n * cout * cb * 9 * ho * wo  # base path everywhere
            expected += int(on.sum()) * (cout // gate.groups) * (cin - cb) * 9  # the rest at open positions
        expected += count_macs(block.shortcut, h) * n
        h = block(h)
    expected += count_macs(model.net.head, h) * n
    assert count_macs(model, x) == expected


@torch.no_grad()
def test_threshold_moves_executed_macs_monotonically_and_follows_the_normal_tail():
    x = cg.example_input(TINY, batch_size=8)
    macs = []
    for t in (2.0, 1.0, 0.5, 0.0, -1.0):
        torch.manual_seed(0)
        model = cg.build(replace(TINY, threshold=t)).eval()
        _, info = model(x)
        tail = 0.5 * math.erfc(t / math.sqrt(2))  # BN(Yp) ~ N(0, 1) after calibration
        assert abs(float(info["exec_rate"]) - tail) < 0.15
        macs.append(count_macs(model, x))
    assert macs == sorted(macs) and macs[0] < macs[-1]


def test_gradients_reach_thresholds_in_train_mode():
    torch.manual_seed(0)
    model = cg.build(TINY).train()
    out, info = model(cg.example_input(TINY, batch_size=6))
    assert all(set(d.detach().unique().tolist()) <= {0.0, 1.0} for d in info["gates"])
    with torch.no_grad():
        for g in model.gate:
            g.delta.add_(0.3)  # away from the target, so the gating loss has a gradient too
    out, info = model(cg.example_input(TINY, batch_size=6))
    assert float(info["aux_loss"].detach()) > 0
    (F.cross_entropy(out, torch.arange(6) % 10) + info["aux_loss"]).backward()
    for g in model.gate:
        assert g.delta.grad is not None and g.delta.grad.abs().sum() > 0


def test_auto_backend_falls_back_to_dense_when_most_positions_open(monkeypatch):
    monkeypatch.setenv("DYNNET_KERNEL_BACKEND", "auto")
    # The fused native kernel never loses to the dense conv (break-even 1.0); use the PyTorch routes' value.
    monkeypatch.setattr(sparse_mod, "FUSED_BREAK_EVEN", sparse_mod.SPARSE_CONV2D_BREAK_EVEN["cpu"])
    torch.manual_seed(0)
    model = cg.build(replace(TINY, threshold=-3.0)).eval()  # nearly every position open
    baseline = cg.build_baseline(TINY).eval()
    x = cg.example_input(TINY, batch_size=2)
    with torch.no_grad():
        assert count_macs(model, x) >= count_macs(baseline, x)  # dense fallback is counted dense


def test_config_validation_and_summary():
    with pytest.raises(ValueError, match="partitions"):
        cg.build(replace(TINY, partitions=1))
    with pytest.raises(ValueError, match="gate_groups"):
        cg.build(replace(TINY, gate_groups=3))
    info = {"gates": [torch.ones(1, 1, 2, 2, dtype=torch.bool)], "exec_rate": torch.tensor(0.25),
            "open_fraction": [0.25, 0.5]}
    assert cg.summarize(info) == {"open_positions": 0.25, "layer_open_fractions": "0.25 0.50"}
    out, info = cg.build().eval()(cg.example_input(cg.Config(), 2))
    assert out.shape == (2, 10) and len(info["gates"]) == 12


@pytest.mark.slow
def test_digits_training_keeps_the_open_fraction_and_accuracy():
    cfg = replace(cg.Config(), width=8, image_size=8)
    res = train_and_compare(cg, cfg, settings=replace(cg.TRAIN, epochs=DIGITS_EPOCHS))
    x = res["x_test"]
    with torch.no_grad():
        _, info = res["model_dynamic"](x)
        executed = count_macs(res["model_dynamic"], x) / count_macs(res["model_dense"], x)
    tail = 0.5 * math.erfc(cfg.threshold / math.sqrt(2))
    print(f"\nchannel_gating digits: accuracy dense {res['accuracy_dense']:.4f} dynamic {res['accuracy_dynamic']:.4f}, "
          f"executed MACs {executed:.3f} of the baseline's (open target {tail:.3f}), {cg.summarize(info)}, "
          f"train s {res['train_seconds_dense']:.1f} + {res['train_seconds_dynamic']:.1f}")
    assert abs(float(info["exec_rate"]) - tail) < 0.12
    assert executed < 0.6
    assert res["accuracy_dynamic"] >= res["accuracy_dense"] - 0.05
