"""SegBlocks: high-res and low-res blocks as two stacks with BlockPad, equal to the dense emulation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from catalog.costs import count_macs
from implementations.common.train import TrainSettings, train_and_compare
from implementations.spatial import segblocks as sb

TINY = sb.Config(width=4, image_size=32, block_size=8, policy_width=4)
TINY_R18 = sb.Config(arch="resnet18", width=4, image_size=128, block_size=64, policy_width=4)


def _model(cfg: sb.Config = TINY, seed: int = 0) -> sb.SegBlocks:
    torch.manual_seed(seed)
    model = sb.build(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
    return model.eval()


def _oracle(model: sb.SegBlocks, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Both resolutions computed densely everywhere, re-composed per block before every padded layer."""
    engine = sb.DenseEngine(grid)
    feats, side = sb.run_network(model.net, engine.split(x, model.cfg.block_size), engine, model.cfg.block_size)
    return model.net.fc(engine.final_map(feats, side).mean(dim=(2, 3)))


@pytest.mark.parametrize("cfg", [TINY, replace(TINY, image_size=48, block_size=16), TINY_R18],
                         ids=["cifar", "cifar-3x3", "resnet18"])
@torch.no_grad()
def test_eval_path_equals_dense_emulation(cfg):
    model = _model(cfg)
    x = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    out, info = model(x)
    grid = info["grid"]
    assert bool(grid.any()) and not bool(grid.all())
    torch.testing.assert_close(out, _oracle(model, x, grid), atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_random_grids_equal_dense_emulation():
    model = _model()
    x = torch.randn(4, 3, 32, 32)
    for seed in range(3):
        grid = torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(seed)) < 0.5
        engine = sb.StackEngine(grid)
        feats, _ = sb.run_network(model.net, engine.split(x, 8), engine, 8)
        torch.testing.assert_close(model.net.fc(engine.pooled(feats)), _oracle(model, x, grid), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cfg", [TINY, TINY_R18], ids=["cifar", "resnet18"])
@torch.no_grad()
def test_all_high_res_equals_baseline_and_all_low_res_equals_baseline_at_half_size(cfg):
    model = _model(cfg)
    baseline = sb.build_baseline(cfg).eval()
    missing, unexpected = baseline.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("policy.") for k in unexpected)
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    model.cfg = replace(cfg, hr_fraction=1.0)
    out, info = model(x)
    assert bool(info["grid"].all())
    torch.testing.assert_close(out, baseline(x)[0], atol=1e-5, rtol=1e-4)
    model.cfg = replace(cfg, hr_fraction=0.0)
    out, info = model(x)
    assert not bool(info["grid"].any())
    torch.testing.assert_close(out, baseline(F.avg_pool2d(x, 2))[0], atol=1e-5, rtol=1e-4)


def _analytic_macs(model: sb.SegBlocks, x: torch.Tensor, grid: torch.Tensor) -> int:
    """Policy, then every layer at full resolution on the high-res blocks' share and at half resolution
    (a quarter of the MACs) on the low-res blocks' share; the classifier once per image."""
    n = len(x)
    share_hr = float(grid.float().mean())
    backbone = count_macs(model.net, x) - count_macs(model.net.fc, torch.zeros(n, model.net.fc.in_features))
    g = model.cfg.image_size // model.cfg.block_size
    expected = count_macs(lambda t: model.policy(t, (g, g)), x) + count_macs(model.net.fc, torch.zeros(n, model.net.fc.in_features))
    return round(expected + backbone * (share_hr + (1 - share_hr) / 4))


@pytest.mark.parametrize("cfg", [TINY, TINY_R18], ids=["cifar", "resnet18"])
@torch.no_grad()
def test_executed_macs_equal_per_block_analytic_count(cfg):
    model = _model(cfg, seed=2)
    x = torch.randn(5, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(2))
    _, info = model(x)
    assert count_macs(model, x) == _analytic_macs(model, x, info["grid"])


@torch.no_grad()
def test_knob_moves_executed_macs_monotonically():
    x = sb.example_input(TINY, batch_size=3)
    macs = []
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        model = _model(replace(TINY, hr_fraction=fraction))
        _, info = model(x)
        assert abs(float(info["grid"].float().mean()) - fraction) < 1e-6
        macs.append(count_macs(model, x))
    assert macs == sorted(macs) and macs[0] < macs[-1]
    dense = count_macs(sb.build_baseline(TINY).eval(), x)
    assert macs[0] < 0.4 * dense  # low-res everywhere: about a quarter of the backbone


def test_blockpad_reads_neighbours_at_their_resolution():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(1, 2, 8, 8).contiguous(memory_format=torch.channels_last)
    grid = torch.tensor([[[True, False], [False, True]]])
    engine = sb.StackEngine(grid)
    stacks = engine.split(x, 4)
    padded = sb.block_pad(stacks, engine.grid, 4, 1)
    hr_pad, lr_pad = padded.hr, padded.lr
    dense = sb.DenseEngine(grid).compose(sb.DualRes(x, F.avg_pool2d(x, 2)), 4)
    ref_hr, ref_lr = F.pad(dense.hr, (1, 1, 1, 1)), F.pad(dense.lr, (1, 1, 1, 1))
    torch.testing.assert_close(hr_pad[0], ref_hr[0, :, 0:6, 0:6])  # top-left high-res block
    torch.testing.assert_close(hr_pad[1], ref_hr[0, :, 4:10, 4:10])  # bottom-right high-res block
    torch.testing.assert_close(lr_pad[0], ref_lr[0, :, 0:4, 2:6])  # top-right low-res block
    torch.testing.assert_close(lr_pad[1], ref_lr[0, :, 2:6, 0:4])  # bottom-left low-res block


def test_policy_gets_reinforce_gradients_and_the_reward_follows_the_paper():
    torch.manual_seed(0)
    model = sb.build(TINY).train()
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6) % 10
    out, info = model(x)
    assert info["log_probs"].requires_grad and info["grid"].dtype == torch.bool
    sb.loss(out, info, y).backward()
    assert model.policy.layers[0].weight.grad.abs().sum() > 0
    assert model.net.layer1[0].conv1.weight.grad.abs().sum() > 0
    # the policy term: -mean(log_prob * advantage), advantage flipped on low-res blocks
    cam = info["cam_logits"].detach()
    per_pixel = F.cross_entropy(cam, y.view(-1, 1, 1).expand(-1, cam.shape[2], cam.shape[3]), reduction="none")
    per_block = F.adaptive_avg_pool2d(per_pixel.unsqueeze(1), (4, 4)).squeeze(1)
    adv = per_block - per_block.mean() + 1.0 * (0.4 - info["grid"].float().mean())
    adv = torch.where(info["grid"], adv, -adv)
    policy_term = sb.loss(out, info, y) - F.cross_entropy(out, y)
    torch.testing.assert_close(policy_term, -(info["log_probs"] * adv).mean())


def test_sparsity_reward_pushes_the_high_res_rate_to_the_target():
    """Policy-only REINFORCE on a fixed batch: the rate moves from ~0.5 towards a low target."""
    torch.manual_seed(0)
    model = sb.build(replace(TINY, target_rate=0.1, sparsity_weight=5.0)).train()
    model.net.requires_grad_(False)
    opt = torch.optim.Adam(model.policy.parameters(), lr=0.05)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    rates = []
    for _ in range(15):
        out, info = model(x)
        loss = sb.loss(out, info, y) - F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rates.append(float(info["hr_rate"]))
    assert sum(rates[-3:]) / 3 < 0.3 < sum(rates[:3]) / 3, rates


def test_config_validation_and_summary():
    with pytest.raises(ValueError, match="block_size"):
        sb.build(replace(TINY, block_size=4))
    with pytest.raises(ValueError, match="hr_fraction"):
        sb.build(replace(TINY, hr_fraction=2.0))
    with pytest.raises(ValueError, match="arch"):
        sb.build(replace(TINY, arch="vgg"))
    info = {"grid": torch.tensor([[[True, False], [False, False]], [[True, True], [False, False]]])}
    assert sb.summarize(info) == {"high_res_blocks": 0.375, "per_image": "0.25 0.50"}
    out, info = sb.build().eval()(sb.example_input(sb.Config(), batch_size=2))
    assert out.shape == (2, 10) and info["grid"].shape == (2, 4, 4)


def test_decision_figure_returns_a_figure():
    from matplotlib.figure import Figure

    fig = sb.decision_figure(TINY)
    assert isinstance(fig, Figure) and len(fig.axes) == 2


@pytest.mark.slow
def test_training_on_digits_learns_the_target_rate_and_keeps_accuracy():
    cfg = replace(sb.Config(), hr_fraction=None)  # the paper's eval rule: logit > 0
    result = train_and_compare(sb, cfg)
    x_test = result["x_test"]
    with torch.no_grad():
        _, info = result["model_dynamic"](x_test)
    rate = float(info["hr_rate"])
    assert abs(rate - cfg.target_rate) < 0.15, rate
    dense_macs = count_macs(result["model_dense"], x_test)
    assert count_macs(result["model_dynamic"], x_test) < 0.8 * dense_macs
    assert result["accuracy_dynamic"] >= result["accuracy_dense"] - 0.05, result
    assert isinstance(sb.TRAIN, TrainSettings)
