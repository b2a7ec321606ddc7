"""GFNet (Glance and Focus): policy-chosen crops, confident samples leave the batch in eval."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from catalog.costs import count_macs
from implementations.common.train import digits_for, train_and_compare
from implementations.spatial import gfnet_glance as gf

TINY = gf.Config(width_mult=0.5, image_size=24, patch_size=12, steps=3, exit_fractions=(0.4, 0.3), hidden=32,
                 policy_hidden=16)


def _model(cfg: gf.Config = TINY, seed: int = 0) -> gf.GlanceFocus:
    torch.manual_seed(seed)
    return gf.build(cfg).eval()


def _x(n: int, cfg: gf.Config = TINY, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))


def _all_steps(model: gf.GlanceFocus, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked dense oracle: every step on every sample. Returns logits `(T, N, K)`, top-left `(N, T-1, 2)`."""
    cfg = model.cfg
    fmap, pooled = model.encode(model.glance, model.downsample(x))
    z, h = model.classify(pooled, None)
    logits, locs, ph = [z], [], None
    for _ in range(1, cfg.steps):
        mean, ph = model.policy(fmap, ph)
        loc = gf.to_pixels(mean, cfg.image_size, cfg.patch_size)
        fmap, pooled = model.encode(model.focus, gf.crop(x, loc, cfg.patch_size))
        z, h = model.classify(pooled, h)
        logits.append(z)
        locs.append(loc)
    return torch.stack(logits), torch.stack(locs, 1)


@torch.no_grad()
def test_eval_path_equals_masked_dense_oracle():
    model, x = _model(), _x(20)
    model.calibrate(x)  # 8 leave after the glance, 6 after the first crop, 6 run all three steps
    out, info = model(x)
    logits, locs = _all_steps(model, x)
    conf = torch.stack([gf.confidence(z) for z in logits])
    fire = torch.cat([conf[:-1] > model.exit_thresholds[:, None], torch.ones(1, len(x), dtype=torch.bool)])
    exit_step = fire.float().argmax(dim=0)  # the first step whose confidence passes its threshold
    assert torch.equal(info["exit_step"], exit_step)
    assert info["exit_counts"].tolist() == [8, 6, 6]  # every step is taken: the test has teeth
    torch.testing.assert_close(out, logits[exit_step, torch.arange(len(x))], atol=1e-5, rtol=1e-5)
    for i, s in enumerate(exit_step.tolist()):  # crops where the sample was still there, -1 after it left
        assert torch.equal(info["locations"][i, :s], locs[i, :s])
        assert info["locations"][i, s:].eq(-1).all()


@torch.no_grad()
def test_exited_samples_leave_the_batch_and_later_steps_are_skipped():
    model, x = _model(), _x(20)
    model.calibrate(x)
    seen: list[tuple[str, int]] = []
    for name in ("glance", "focus", "policy"):
        getattr(model, name).register_forward_pre_hook(lambda m, a, n=name: seen.append((n, a[0].shape[0])))
    model.glance.features.register_forward_pre_hook(lambda m, a: seen.append(("glance_size", a[0].shape[-1])))
    model.focus.features.register_forward_pre_hook(lambda m, a: seen.append(("focus", a[0].shape[0])))
    _, info = model(x)
    assert info["exit_counts"].tolist() == [8, 6, 6]
    assert seen == [("glance_size", 12), ("policy", 12), ("focus", 12), ("policy", 6), ("focus", 6)]
    seen.clear()
    model.exit_thresholds.fill_(-1.0)  # everyone leaves after the glance: no policy, no focus step
    out, info = model(x)
    assert seen == [("glance_size", 12)] and info["exit_step"].eq(0).all() and torch.isfinite(out).all()


@torch.no_grad()
def test_glance_on_the_full_image_equals_baseline_with_the_same_weights():
    cfg = replace(TINY, patch_size=TINY.image_size, steps=1, exit_fractions=())
    model, baseline = _model(cfg), gf.build_baseline(cfg).eval()
    baseline.load_state_dict({f"net.{k}": v for k, v in model.glance.state_dict().items()})
    x = _x(6)
    _, pooled = model.encode(model.glance, model.downsample(x))
    torch.testing.assert_close(pooled, baseline.net.features(x).mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)
    out, info = model(x)
    torch.testing.assert_close(out, model.fc(model.gru(pooled)), atol=1e-5, rtol=1e-5)
    assert info["exit_step"].eq(0).all()
    # same backbone MACs; the GFNet classifier (GRU + fc) replaces the baseline's linear classifier
    head = count_macs(model.gru, pooled) + count_macs(model.fc, model.gru(pooled))
    assert count_macs(model, x) == count_macs(baseline, x) - count_macs(baseline.net.classifier, pooled) + head


@torch.no_grad()
def test_never_exiting_runs_every_step_like_the_oracle():
    model, x = _model(replace(TINY, thresholds=(2.0, 2.0))), _x(7)
    out, info = model(x)
    logits, locs = _all_steps(model, x)
    assert info["exit_step"].eq(2).all()
    torch.testing.assert_close(out, logits[-1], atol=1e-5, rtol=1e-5)
    assert torch.equal(info["locations"], locs)


@torch.no_grad()
def test_executed_macs_equal_per_sample_analytic_count():
    model, x = _model(), _x(20, seed=5)
    model.calibrate(x)
    _, info = model(x)
    c = info["exit_counts"].tolist()
    reach = [len(x), len(x) - c[0], len(x) - c[0] - c[1]]  # samples running step 1, 2, 3
    x1 = x[:1]
    fmap, pooled = model.encode(model.glance, model.downsample(x1))
    classify = count_macs(model.gru, pooled) + count_macs(model.fc, model.gru(pooled))
    glance = count_macs(model.glance.features, model.downsample(x1)) + classify
    patch = gf.crop(x1, torch.zeros(1, 2, dtype=torch.long), TINY.patch_size)
    focus = count_macs(lambda f: model.policy(f, None), fmap) + count_macs(model.focus.features, patch) + classify
    assert count_macs(model, x) == glance * reach[0] + focus * (reach[1] + reach[2])
    assert count_macs(model, x) < count_macs(gf.build_baseline(TINY).eval(), x)


@torch.no_grad()
def test_exit_fraction_moves_executed_macs_monotonically():
    model, x = _model(), _x(20)
    macs = []
    for f in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        model.calibrate(x, (f, 0.0))
        _, info = model(x)
        assert info["exit_counts"][0] == round(f * len(x))
        macs.append(count_macs(model, x))
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == 6


def test_thresholds_for_hits_the_fractions():
    conf = torch.rand(3, 50, generator=torch.Generator().manual_seed(0))
    thr = gf.thresholds_for(conf, (0.2, 0.5))
    first = conf[0] > thr[0]
    second = ~first & (conf[1] > thr[1])
    assert int(first.sum()) == 10 and int(second.sum()) == 25
    assert gf.thresholds_for(conf, (0.0, 1.0))[0] > 1.0 and gf.thresholds_for(conf, (0.0, 1.0))[1] < 0.0


def test_gradients_reach_policy_and_encoders_in_train_mode():
    torch.manual_seed(0)
    model = gf.build(TINY).train()
    x, y = _x(8), torch.arange(8) % 10
    out, info = model(x)
    assert len(info["step_logits"]) == 3 and torch.equal(out, info["step_logits"][-1])
    assert info["log_probs"].shape == (8, 2) and info["log_probs"].requires_grad
    total = gf.loss(out, info, y)
    ce = sum(F.cross_entropy(z, y) for z in info["step_logits"]) / 3
    assert not torch.isclose(total, ce)  # the REINFORCE term is there
    total.backward()
    for p in (model.policy.actor.weight, model.policy.reduce.weight, model.glance.stem[0].weight,
              model.focus.stem[0].weight, model.gru.weight_hh, model.fc.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert torch.isclose(gf.loss(out.detach(), {}, y), F.cross_entropy(out.detach(), y))


@torch.no_grad()
def test_train_mode_tracks_the_thresholds():
    torch.manual_seed(0)
    model = gf.build(replace(TINY, threshold_momentum=0.0)).train()
    x = _x(20)
    _, info = model(x)
    conf = torch.stack([gf.confidence(z) for z in info["step_logits"]])
    assert model.exit_thresholds.tolist() == pytest.approx(gf.thresholds_for(conf, TINY.exit_fractions))
    fixed = gf.build(replace(TINY, thresholds=(0.3, 0.4))).train()
    fixed(x)
    assert fixed.exit_thresholds.tolist() == pytest.approx([0.3, 0.4])


def test_config_validation_and_summary():
    with pytest.raises(ValueError, match="arch"):
        gf.build(replace(TINY, arch="vgg"))
    with pytest.raises(ValueError, match="patch_size"):
        gf.build(replace(TINY, patch_size=48))
    with pytest.raises(ValueError, match="exit_fractions"):
        gf.build(replace(TINY, exit_fractions=(0.5,)))
    with pytest.raises(ValueError, match="exit_fractions"):
        gf.build(replace(TINY, exit_fractions=(0.8, 0.5)))
    with pytest.raises(ValueError, match="thresholds"):
        gf.build(replace(TINY, thresholds=(0.5,)))
    assert gf.summarize({"exit_counts": torch.tensor([2, 1, 1])}) == {
        "exit_histogram": "2 1 1", "mean_steps": 1.75, "glance_exit_fraction": 0.5}
    out, info = gf.build().eval()(gf.example_input(gf.Config(), batch_size=2))
    assert out.shape == (2, 10) and info["exit_step"].shape == (2,)


def test_decision_figure_returns_a_figure():
    from matplotlib.figure import Figure

    fig = gf.decision_figure(replace(TINY, image_size=48, patch_size=16))
    assert isinstance(fig, Figure) and len(fig.axes) == 2


@pytest.fixture
def one_thread():
    """Tiny models train faster on one intra-op thread (and suffer less from a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_digits_training_keeps_accuracy_at_the_configured_exit_budget(one_thread):
    cfg = gf.Config()
    res = train_and_compare(gf, cfg)
    model, x, y = res["model_dynamic"], res["x_test"], res["y_test"]
    running = [round(t, 3) for t in model.exit_thresholds.tolist()]
    model.calibrate(digits_for(cfg)[0][:512])  # eval-mode thresholds for the budget on training images
    with torch.no_grad():
        out, info = model(x)
    accuracy = float((out.argmax(1) == y).float().mean())
    fractions = (info["exit_counts"].float() / len(x)).tolist()
    target = [*cfg.exit_fractions, 1 - sum(cfg.exit_fractions)]
    macs_dyn, macs_dense = count_macs(model, x) / len(x), count_macs(res["model_dense"], x) / len(x)
    print(f"\ngfnet_glance digits: accuracy dense {res['accuracy_dense']:.4f}, dynamic {res['accuracy_dynamic']:.4f} "
          f"(running thresholds {running}), {accuracy:.4f} (recalibrated {model.exit_thresholds.tolist()}); "
          f"{gf.summarize(info)} (target {target}); MACs {macs_dyn / 1e6:.2f} M vs dense {macs_dense / 1e6:.2f} M; "
          f"train s {res['train_seconds_dense']:.1f} + {res['train_seconds_dynamic']:.1f}")
    assert all(abs(a - b) < 0.12 for a, b in zip(fractions, target, strict=True))
    assert accuracy >= res["accuracy_dense"] - 0.05 and res["accuracy_dynamic"] >= res["accuracy_dense"] - 0.05
