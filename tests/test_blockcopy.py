"""BlockCopy: per-frame block execution with feature copying from the previous frame, RL policy."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from catalog.costs import count_macs
from implementations.common.train import TrainSettings, train_and_compare
from implementations.spatial import blockcopy as bc

TINY = bc.Config(width=4, image_size=32, block_size=8, clip_len=4, policy_width=4)


def _model(cfg: bc.Config = TINY, seed: int = 0) -> bc.BlockCopy:
    torch.manual_seed(seed)
    model = bc.build(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
    return model.eval()


def _baseline_like(model: bc.BlockCopy) -> bc.Baseline:
    baseline = bc.build_baseline(model.cfg).eval()
    missing, unexpected = baseline.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("policy.") for k in unexpected)
    return baseline


def _mix(cur: dict, prev: dict | None, grid: torch.Tensor, name: str, new: torch.Tensor, side: int) -> torch.Tensor:
    """The map a layer leaves: its new output on executed blocks, the previous frame's map elsewhere."""
    if prev is not None:
        on = grid.repeat_interleave(side, 1).repeat_interleave(side, 2).unsqueeze(1)
        new = torch.where(on, new, prev[name])
    cur[name] = new
    return new


def _oracle(model: bc.BlockCopy, clips: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """Dense per layer and frame: every map is `where(executed, layer(mixed input), previous frame's map)`."""
    net, size, prev, logits = model.net, model.cfg.block_size, None, []
    for k in range(clips.shape[1]):
        cur: dict[str, torch.Tensor] = {}
        img = _mix(cur, prev, grids[k], "img", clips[:, k], size)
        h, side = _mix(cur, prev, grids[k], "stem", F.relu(net.bn1(net.conv1(img))), size), size
        for i, block in enumerate(net.blocks()):
            side //= block.stride
            mid = _mix(cur, prev, grids[k], f"mid{i}", F.relu(block.bn1(block.conv1(h))), side)
            out = F.relu(block.bn2(block.conv2(mid)) + block.shortcut(h))
            h = _mix(cur, prev, grids[k], f"out{i}", out, side)
        logits.append(net.fc(h.mean(dim=(2, 3))))
        prev = cur
    return torch.stack(logits)


@torch.no_grad()
def test_eval_path_equals_masked_dense_oracle_on_a_real_clip():
    model = _model()
    x = bc.example_input(TINY, batch_size=3)
    out, info = model(x)
    grids = info["grids"]
    assert bool(grids[0].all()) and abs(float(grids[1:].float().mean()) - 0.5) < 1e-6
    assert not torch.equal(grids[1], grids[2])  # the policy sees each frame: decisions change over time
    torch.testing.assert_close(info["frame_logits"], _oracle(model, x, grids), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, info["frame_logits"].mean(dim=0))


@torch.no_grad()
def test_every_block_executed_equals_dense_per_frame_processing():
    model = _model(replace(TINY, exec_fraction=1.0))
    x = bc.example_input(TINY, batch_size=2)
    out, info = model(x)
    assert bool(info["grids"].all())
    torch.testing.assert_close(out, _baseline_like(model)(x)[0], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_output_stays_close_to_dense_processing():
    """Copied features are exact on a static clip; on a panning clip the error is bounded and grows as
    fewer blocks run. Stated tolerance: mean relative error of the frame logits <= 0.15 at 50 %."""
    model = _model()
    baseline = _baseline_like(model)
    still = bc.pan(bc.example_input(TINY, batch_size=2)[:, 0], 4, 0)
    torch.testing.assert_close(model(still)[0], baseline(still)[0], atol=1e-5, rtol=1e-4)
    x = bc.example_input(TINY, batch_size=4)
    dense = torch.stack([baseline.net(x[:, k]) for k in range(x.shape[1])])
    errors = []
    for fraction in (0.75, 0.5, 0.25):
        model.cfg = replace(TINY, exec_fraction=fraction)
        frames = model(x)[1]["frame_logits"]
        errors.append(float(((frames - dense).norm(dim=-1) / dense.norm(dim=-1)).mean()))
    assert errors[1] <= 0.15, errors
    assert errors[0] < errors[2], errors


def _analytic_macs(model: bc.BlockCopy, x: torch.Tensor, grids: torch.Tensor) -> int:
    """Per clip: frame 0 dense plus its output map; every later frame: the policy, the backbone's convs on
    the executed share of the blocks (all blocks cost the same) and the output map on those positions;
    the classifier on every frame."""
    n, t = x.shape[:2]
    net, fc = model.net, model.net.fc
    frame = x[:, 0]
    convs = count_macs(net, frame) - count_macs(fc, torch.zeros(n, fc.in_features))
    positions = n * (model.cfg.image_size // 4) ** 2
    cam = positions * fc.in_features * fc.out_features
    head = count_macs(fc, torch.zeros(n, fc.in_features)) * t
    g = model.cfg.image_size // model.cfg.block_size
    policy_in = torch.zeros(n, 2 * model.cfg.in_channels + model.cfg.num_classes + 1, 8 * g, 8 * g)
    expected = convs + cam + head + (t - 1) * count_macs(model.policy, policy_in)
    for k in range(1, t):
        share = float(grids[k].float().mean())
        expected += round(share * (convs + cam))
    return expected


@torch.no_grad()
def test_executed_macs_equal_per_block_analytic_count():
    model = _model(seed=2)
    x = bc.example_input(TINY, batch_size=3)
    _, info = model(x)
    assert count_macs(model, x) == _analytic_macs(model, x, info["grids"])
    assert count_macs(model, x) < count_macs(_baseline_like(model), x)


@torch.no_grad()
def test_knob_moves_executed_macs_monotonically_and_skipped_blocks_cost_nothing():
    x = bc.example_input(TINY, batch_size=2)
    macs = []
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        model = _model(replace(TINY, exec_fraction=fraction))
        macs.append(count_macs(model, x))
    assert macs == sorted(macs) and macs[0] < macs[-1]
    model = _model(replace(TINY, exec_fraction=0.0))
    _, info = model(x)
    assert count_macs(model, x) == _analytic_macs(model, x, info["grids"])


def test_train_mode_trains_the_frame_network_like_the_baseline_and_the_policy_with_reinforce():
    model = _model()
    model.train()
    baseline = _baseline_like(model).train()
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    out, info = model(x)
    torch.testing.assert_close(out, baseline(x)[0])  # dense frames, same loss: same backbone updates
    assert info["aux_loss"].requires_grad and info["grids"].shape == (4, 4, 4, 4)
    (F.cross_entropy(out, y) + info["aux_loss"]).backward()
    assert model.policy.layers[0].weight.grad.abs().sum() > 0
    assert model.net.conv1.weight.grad.abs().sum() > 0


def test_reward_is_information_gain_plus_complexity_flipped_on_skipped_blocks():
    model = _model(replace(TINY, target_rate=0.3, complexity_weight=2.0))
    model.running_cost = 0.5
    grid = torch.tensor([[[True, False], [False, True]]])
    cam_prev = torch.zeros(1, 4, 4, 10)
    cam = cam_prev.clone()
    cam[0, :2, :2, 0] = 3.0  # the output changed in the top-left block only
    log_probs = torch.full((1, 2, 2), -0.5, requires_grad=True)
    loss = model._reinforce(log_probs, grid, cam, cam_prev)
    gap = (0.9 * 0.5 + 0.1 * 0.5) - 0.3
    ig = F.adaptive_max_pool2d(bc.information_gain(cam, cam_prev).unsqueeze(1), (2, 2)).squeeze(1)
    reward = ig + 2.0 * (-gap * abs(gap))
    reward = torch.where(grid, reward, -reward)
    torch.testing.assert_close(loss, -(log_probs * reward).mean())
    assert float(ig[0, 0, 0]) > 0 and float(ig[0, 1, 1]) == 0.0
    assert float(bc.information_gain(cam, cam).abs().max()) == 0.0


def test_online_policy_updates_only_where_autograd_is_on():
    model = _model(replace(TINY, online=True, online_lr=1e-2))
    x = bc.example_input(TINY, batch_size=2)
    before = model.policy.layers[0].weight.detach().clone()
    with torch.no_grad():
        model(x)
    assert torch.equal(model.policy.layers[0].weight, before)
    model(x)
    assert not torch.equal(model.policy.layers[0].weight, before)


def test_pan_turns_still_images_into_clips():
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    clip = bc.pan(img, 3, 2)
    assert clip.shape == (2, 3, 3, 8, 8) and torch.equal(clip[:, 0], img)
    assert torch.equal(clip[:, 1, :, :7, :6], img[:, :, 1:, 2:])


def test_config_validation_and_summary():
    with pytest.raises(ValueError, match="block_size"):
        bc.build(replace(TINY, block_size=6))
    with pytest.raises(ValueError, match="exec_fraction"):
        bc.build(replace(TINY, exec_fraction=-0.1))
    grids = torch.ones(3, 1, 2, 2, dtype=torch.bool)
    grids[1, 0, 0, 0] = False
    info = {"grids": grids, "exec_fraction": grids[1:].float().mean()}
    assert bc.summarize(info) == {"executed_blocks": 0.875, "per_frame": "1.00 0.75 1.00"}
    out, info = bc.build().eval()(bc.example_input(bc.Config(), batch_size=2))
    assert out.shape == (2, 10) and info["grids"].shape == (4, 2, 4, 4)


def test_decision_figure_returns_a_figure():
    from matplotlib.figure import Figure

    fig = bc.decision_figure(TINY)
    assert isinstance(fig, Figure) and len(fig.axes) == TINY.clip_len


@pytest.mark.slow
def test_training_on_digit_clips_learns_the_target_rate_and_keeps_accuracy():
    # decisions from the trained policy (logit > 0); a narrower network and 3-frame clips keep it short
    cfg = replace(bc.Config(), width=8, clip_len=3, exec_fraction=None)
    result = train_and_compare(bc, cfg)
    x_test = result["x_test"]
    with torch.no_grad():
        _, info = result["model_dynamic"](x_test)
    rate = float(info["exec_fraction"])
    assert abs(rate - cfg.target_rate) < 0.15, rate
    dense_macs = count_macs(result["model_dense"], x_test)
    assert count_macs(result["model_dynamic"], x_test) < 0.85 * dense_macs
    assert result["accuracy_dynamic"] >= result["accuracy_dense"] - 0.05, result
    assert isinstance(bc.TRAIN, TrainSettings)
