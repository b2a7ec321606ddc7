"""DS-Net: per-sample stage widths as prefix slices, samples grouped by width, two-stage training."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from catalog.costs import count_macs
from implementations.channel import ds_net as ds
from implementations.common.train import train_and_compare

TINY = ds.Config(depth=8, width=8, image_size=16)
TINY_R50 = ds.Config(backbone="resnet50", width=8, image_size=32)
DIGITS_EPOCHS = 16


def _model(cfg: ds.Config = TINY, seed: int = 0) -> ds.DSResNet:
    """An untrained model whose gates pick input-dependent, mixed widths; random BN statistics; float64."""
    torch.manual_seed(seed)
    model = ds.build(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for g in model.gates:
            g.fc2.weight.copy_(torch.randn(g.fc2.weight.shape, generator=gen) * 3.0)
            g.fc2.bias.copy_(torch.randn(g.fc2.bias.shape, generator=gen) * 3.0)
        for m in model.net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.double().eval()


def _input(cfg: ds.Config, n: int, seed: int = 1) -> torch.Tensor:
    """Samples of very different scales, so that untrained gates pick different widths."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen, dtype=torch.float64)
    return x * torch.logspace(-1.5, 1.5, n, dtype=torch.float64).view(-1, 1, 1, 1)


def _masked_dense_oracle(model: ds.DSResNet, x: torch.Tensor, choices: torch.Tensor):
    """Full-width network, every tensor times the prefix mask of the recorded width."""
    k = len(model.cfg.widths)

    def recorded(s: int, logits: torch.Tensor) -> torch.Tensor:
        assert torch.equal(logits.argmax(dim=1), choices[s])  # the gate's own decision
        return F.one_hot(choices[s], k).to(logits)

    out, _, _ = model.forward_masked(x, recorded)
    return out


@pytest.mark.parametrize("cfg", [TINY, TINY_R50, replace(TINY, kernel_for_uniform=True)],
                         ids=["cifar", "resnet50", "cifar_kernel_everywhere"])
@torch.no_grad()
def test_eval_path_equals_masked_dense_oracle(cfg):
    model = _model(cfg, seed=1)
    x = _input(cfg, 8)
    out, info = model(x)
    assert sum(len(c.unique()) > 1 for c in info["choices"]) >= 2  # mixed widths: grouping is exercised
    torch.testing.assert_close(out, _masked_dense_oracle(model, x, info["choices"]), atol=1e-10, rtol=1e-10)
    alone = torch.cat([model(x[i : i + 1])[0] for i in range(len(x))])
    torch.testing.assert_close(out, alone, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cfg", [TINY, TINY_R50], ids=["cifar", "resnet50"])
@torch.no_grad()
def test_full_width_equals_baseline(cfg):
    torch.manual_seed(0)
    model = ds.build(replace(cfg, width_init=1.0)).double().eval()
    baseline = ds.build_baseline(cfg).double().eval()
    missing, unexpected = baseline.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("gates.") for k in unexpected)
    x = _input(cfg, 3)
    out, info = model(x)
    assert bool((info["widths"] == 1.0).all())
    torch.testing.assert_close(out, baseline(x)[0], atol=1e-10, rtol=1e-10)


@torch.no_grad()
def test_executed_macs_equal_per_sample_analytic_count():
    model = _model(seed=2)
    x = _input(TINY, 8, seed=2)
    n = len(x)
    _, info = model(x)
    assert sum(len(c.unique()) > 1 for c in info["choices"]) >= 2
    ratios = info["widths"]  # (S, N)
    h = model.net.stem(x[:1])
    expected = count_macs(model.net.stem, x)
    c_in = torch.full((n,), h.shape[1])  # live input channels of every sample
    hidden = model.cfg.gate_hidden
    for s, stage in enumerate(model.net.stages):
        expected += n * (int(c_in.max()) * hidden + hidden * len(model.cfg.widths))  # gate on the widest
        for block in stage:
            y = block.conv1(h)
            hw = y.shape[2] * y.shape[3]
            mid = torch.tensor([ds.live(block.conv1.out_channels, float(r)) for r in ratios[s]])
            expected += int((mid * c_in).sum()) * 9 * hw + int((mid * mid).sum()) * 9 * hw
            c_in = mid
            h = block(h)
    expected += int(c_in.sum()) * model.cfg.num_classes
    assert count_macs(model, x) == expected


@torch.no_grad()
def test_width_knob_moves_executed_macs_monotonically():
    x = ds.example_input(TINY, batch_size=4)
    macs = []
    for w in (0.25, 0.5, 0.75, 1.0):
        torch.manual_seed(0)
        model = ds.build(replace(TINY, width_init=w)).eval()
        _, info = model(x)
        assert bool((info["widths"] == w).all())
        macs.append(count_macs(model, x))
    assert macs == sorted(macs) and len(set(macs)) == 4
    dense = count_macs(ds.build_baseline(TINY).eval(), x)
    assert macs[0] < 0.2 * dense  # about r^2 of the stage MACs (the stem stays dense)


def test_two_stage_training_gradients():
    torch.manual_seed(0)
    cfg = replace(TINY, gate_start_step=1)
    model = ds.build(cfg).train()
    x, y = ds.example_input(cfg, batch_size=6), torch.arange(6) % 10
    out, info = model(x)  # stage 1: supernet only (sandwich rule), gates untouched
    assert info["stage"] == 1
    ds.loss(out, info, y).backward()
    assert all(g.fc2.weight.grad is None for g in model.gates)
    assert model.net.conv1.weight.grad.abs().sum() > 0
    model.zero_grad()
    out, info = model(x)  # stage 2: gated network, SGS and budget losses too
    assert info["stage"] == 2 and info["expected_mac_fraction"].shape == (6,)
    assert all(set(o.detach().unique().tolist()) <= {0.0, 1.0} for o in info["gate_onehots"])
    ds.loss(out, info, y).backward()
    for g in model.gates:
        assert g.fc2.weight.grad is not None and g.fc2.weight.grad.abs().sum() > 0
    assert torch.isclose(ds.loss(out, {}, y), F.cross_entropy(out, y))  # the baseline's loss


def test_config_validation_and_summary():
    with pytest.raises(ValueError, match="widths"):
        ds.build(replace(TINY, widths=(0.5, 0.25, 1.0)))
    with pytest.raises(ValueError, match="widths"):
        ds.build(replace(TINY, widths=(0.25, 0.5)))
    with pytest.raises(ValueError, match="width_init"):
        ds.build(replace(TINY, width_init=0.0))
    info = {"choices": torch.tensor([[0, 1], [3, 3]]), "widths": torch.tensor([[0.25, 0.5], [1.0, 1.0]]),
            "gate_logits": [torch.zeros(2, 4)]}
    assert ds.summarize(info) == {"mean_width": 0.6875, "stage_widths": "0.38 1.00", "width_histogram": "1 1 0 2"}
    out, info = ds.build().eval()(ds.example_input(ds.Config(), 2))
    assert out.shape == (2, 10) and info["choices"].shape == (3, 2)


@pytest.mark.slow
def test_digits_two_stage_training_meets_the_budget_and_keeps_accuracy():
    cfg = replace(ds.Config(), width=16, image_size=8, target=0.5)  # width 8 leaves 2 channels at r = 0.25
    res = train_and_compare(ds, cfg, settings=replace(ds.TRAIN, epochs=DIGITS_EPOCHS))
    x = res["x_test"]
    with torch.no_grad():
        _, info = res["model_dynamic"](x)
        executed = count_macs(res["model_dynamic"], x) / count_macs(res["model_dense"], x)
    print(f"\nds_net digits: accuracy dense {res['accuracy_dense']:.4f} dynamic {res['accuracy_dynamic']:.4f}, "
          f"executed MACs {executed:.3f} of the baseline's (target {cfg.target}), {ds.summarize(info)}, "
          f"train s {res['train_seconds_dense']:.1f} + {res['train_seconds_dynamic']:.1f}")
    assert abs(executed - cfg.target) < 0.15
    assert res["accuracy_dynamic"] >= res["accuracy_dense"] - 0.05
