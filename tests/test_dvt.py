"""DVT: a cascade of ViTs on finer token grids whose confident images really leave the batch in eval."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from catalog.costs import count_macs
from implementations.common.train import train_and_compare
from implementations.transformer import dvt

TINY = dvt.Config(image_size=8, patch=2, token_grids=(2, 3, 4), dim=16, depth=2, heads=2, reuse_dim=8,
                  calibration_size=16)
MIXED = (0.4, 0.3, 0.3)  # every stage is taken: the tests have teeth


def _model(cfg: dvt.Config = TINY, seed: int = 0) -> dvt.DynamicViT:
    """An untrained cascade with spread-out confidences (scaled heads) and non-zero feature reuse."""
    torch.manual_seed(seed)
    model = dvt.build(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for vit in model.stages:
            vit.fc.weight.copy_(torch.randn(vit.fc.weight.shape, generator=gen) * 2.0)
        for reuse in model.reuse or []:
            reuse.to_layers.weight.copy_(torch.randn(reuse.to_layers.weight.shape, generator=gen) * 0.2)
    return model.eval()


def _x(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _calibrated(fractions: tuple[float, ...], x: torch.Tensor, cfg: dvt.Config = TINY) -> dvt.DynamicViT:
    model = _model(replace(cfg, exit_fractions=fractions))
    model.calibrate(x)
    return model


def _masked_dense_oracle(model: dvt.DynamicViT, x: torch.Tensor):
    """Every stage on every image (reuse from the full previous stage); each image takes its first exit."""
    logits, prev = [], None
    for k, vit in enumerate(model.stages):
        tokens = model.stage(k, x, prev)
        logits.append(vit.head(tokens))
        prev = tokens[:, 0]
    fire = torch.stack([dvt.confidence(z) >= t for z, t in zip(logits[:-1], model.thresholds, strict=True)]
                       + [torch.ones(len(x), dtype=torch.bool)])
    exit_index = fire.float().argmax(dim=0)  # the first stage that is confident enough
    return torch.stack(logits)[exit_index, torch.arange(len(x))], exit_index


@torch.no_grad()
def test_eval_path_equals_masked_dense_oracle():
    x = _x(20)
    model = _calibrated(MIXED, x)
    out, info = model(x)
    ref, exit_index = _masked_dense_oracle(model, x)
    assert info["exit_counts"].tolist() == [8, 6, 6]  # the calibrated fractions, exactly
    assert torch.equal(info["exit_index"], exit_index)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(info["confidence"], dvt.confidence(out), atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_exited_images_leave_the_batch_and_later_stages_are_skipped():
    x = _x(20)
    model = _calibrated(MIXED, x)
    seen: dict[int, int] = {}
    for k, vit in enumerate(model.stages):
        vit.patch_embed.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, i[0].shape[0]))
    _, info = model(x)
    c = info["exit_counts"].tolist()
    assert seen == {0: 20, 1: 20 - c[0], 2: 20 - c[0] - c[1]}
    seen.clear()
    model.thresholds = (0.0, 0.0)  # everyone leaves after the coarsest stage
    out, info = model(x)
    assert seen == {0: 20} and info["exit_index"].eq(0).all() and torch.isfinite(out).all()


@torch.no_grad()
@pytest.mark.parametrize("feature_reuse", [True, False])
def test_never_exiting_untrained_cascade_equals_the_largest_stage(feature_reuse):
    cfg = replace(TINY, exit_fractions=(0.0, 0.0, 1.0), feature_reuse=feature_reuse)
    torch.manual_seed(0)
    model = dvt.build(cfg).eval()  # untrained: the reused context enters through zero weights
    baseline = dvt.build_baseline(cfg).eval()
    last = f"stages.{len(cfg.token_grids) - 1}."
    baseline.load_state_dict({"vit." + k[len(last):]: v for k, v in model.state_dict().items() if k.startswith(last)})
    x = _x(6)
    out, info = model(x)
    assert info["exit_index"].eq(2).all()
    torch.testing.assert_close(out, baseline(x)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_model(cfg)(x)[0], baseline(x)[0]) or not feature_reuse  # reuse matters


@torch.no_grad()
def test_executed_macs_equal_per_image_analytic_count():
    x = _x(20, seed=5)
    model = _calibrated(MIXED, x)
    _, info = model(x)
    c = info["exit_counts"].tolist()
    reach = [20, 20 - c[0], 20 - c[0] - c[1]]  # images running stage 1, 2, 3
    x1, prev, expected = x[:1], None, 0
    for k, vit in enumerate(model.stages):
        tokens = model.stage(k, x1, prev)
        per_image = count_macs(model.stage, k, x1, prev) + count_macs(vit.head, tokens)
        expected += per_image * reach[k]
        prev = tokens[:, 0]
    reuse_macs = count_macs(model.reuse[0], prev)
    assert reuse_macs > 0  # the reuse MLP is counted, inside `stage`
    assert count_macs(model, x) == expected
    assert count_macs(model, x) < count_macs(dvt.build_baseline(TINY).eval(), x)


@torch.no_grad()
def test_exit_fractions_move_executed_macs_monotonically():
    x = _x(16)
    macs = []
    for fractions in ((1.0, 0.0, 0.0), (0.75, 0.25, 0.0), (0.5, 0.25, 0.25), (0.25, 0.25, 0.5), (0.0, 0.0, 1.0)):
        model = _calibrated(fractions, x)
        _, info = model(x)
        assert info["exit_counts"].tolist() == [round(16 * f) for f in fractions]
        macs.append(count_macs(model, x))
    assert macs == sorted(macs) and len(set(macs)) == 5


def test_joint_training_reaches_every_stage_and_the_reuse():
    torch.manual_seed(0)
    model = dvt.build(TINY).train()
    x, y = _x(6), torch.arange(6) % 10
    out, info = model(x)
    assert len(info["exit_logits"]) == 3 and torch.equal(out, info["exit_logits"][-1])
    total = dvt.loss(out, info, y)
    assert torch.isclose(total, sum(F.cross_entropy(z, y) for z in info["exit_logits"]))
    total.backward()
    for vit in model.stages:
        assert vit.fc.weight.grad.abs().sum() > 0 and vit.patch_embed.proj.weight.grad.abs().sum() > 0
    for reuse in model.reuse:  # zero-initialized context weights still learn
        assert reuse.to_layers.weight.grad.abs().sum() > 0
    assert torch.isclose(dvt.loss(out.detach(), {}, y), F.cross_entropy(out.detach(), y))


def test_eval_after_training_recalibrates_on_recent_training_images():
    torch.manual_seed(0)
    model = dvt.build(replace(TINY, recalibration_size=12)).train()
    with torch.no_grad():
        for seed in range(3):
            model(_x(6, seed=seed))
        model.eval()
        ref = dvt.build(replace(TINY, thresholds=(0.5, 0.5)))
        ref.load_state_dict(model.state_dict())
        assert model.thresholds == ref.calibrate(torch.cat([_x(6, seed=1), _x(6, seed=2)]))
        before = model.thresholds
        model.eval()  # already calibrated: no change
        assert model.thresholds == before


def test_config_validation_and_summary():
    for bad, match in (({"token_grids": (3, 2, 4)}, "token_grids"), ({"image_size": 10}, "image_size"),
                       ({"exit_fractions": (0.5, 0.4, 0.2)}, "exit_fractions"),
                       ({"exit_fractions": (1.0, 0.0)}, "exit_fractions"),
                       ({"thresholds": (0.5,)}, "thresholds"), ({"calibration_size": 0}, "calibration_size")):
        with pytest.raises(ValueError, match=match):
            dvt.build(replace(TINY, **bad))
    assert dvt.summarize({"exit_counts": torch.tensor([3, 1, 4]), "thresholds": (0.5, 0.25)}) == {
        "exit_histogram": "3 1 4", "exit_fractions": "0.38 0.12 0.50", "thresholds": "0.5 0.25"}
    out, info = dvt.build().eval()(dvt.example_input(dvt.Config(), batch_size=2))
    assert out.shape == (2, 10) and info["exit_index"].shape == (2,)


def test_decision_figure_on_the_sample_photos():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = dvt.decision_figure(replace(TINY, num_classes=5))
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 6 and all(t.startswith("exit at stage") for t in titles)


@pytest.fixture
def one_thread():
    """Tiny models train faster on one intra-op thread (and suffer less from a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_digits_training_meets_the_exit_budget_at_baseline_accuracy(one_thread):
    cfg = dvt.Config()
    res = train_and_compare(dvt, cfg)
    model, x = res["model_dynamic"], res["x_test"]
    with torch.no_grad():
        _, info = model(x)
        x1, prev, per_stage = x[:1], None, []
        for k, vit in enumerate(model.stages):  # MACs of stage k (with its reuse MLP and head) per image
            per_stage.append(count_macs(lambda k=k, vit=vit, p=prev: vit.head(model.stage(k, x1, p))))
            prev = model.stage(k, x1, prev)[:, 0]
        executed = count_macs(model, x) / len(x)
    fractions = (info["exit_counts"].float() / len(x)).tolist()
    full_cascade = sum(per_stage)
    budget = sum(f * sum(per_stage[: k + 1]) for k, f in enumerate(cfg.exit_fractions))
    print(f"\ndvt digits: accuracy cascade {res['accuracy_dynamic']:.4f}, largest stage alone "
          f"{res['accuracy_dense']:.4f}; {dvt.summarize(info)}; executed {executed / 1e6:.2f} M MACs, budget "
          f"{budget / 1e6:.2f} M, full cascade {full_cascade / 1e6:.2f} M; "
          f"train s {res['train_seconds_dense']:.1f} + {res['train_seconds_dynamic']:.1f}")
    assert res["accuracy_dense"] > 0.7
    assert res["accuracy_dynamic"] >= res["accuracy_dense"] - 0.05
    assert all(abs(f - t) < 0.1 for f, t in zip(fractions, cfg.exit_fractions, strict=True))
    assert abs(executed / budget - 1) < 0.15
