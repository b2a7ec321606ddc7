"""BranchyNet: entropy-based early exits that really leave the batch in eval."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from catalog.costs import count_macs
from implementations.common.train import train_and_compare
from implementations.depth import branchynet as bn

TINY = bn.Config(depth=14, width=4, image_size=8)
DIGITS_EPOCHS = 8  # digits at their native 8x8, width 8


def _model(cfg: bn.Config = TINY, seed: int = 0) -> bn.BranchyResNet:
    """An untrained model whose exits have spread-out confidences (scaled exit classifiers)."""
    torch.manual_seed(seed)
    model = bn.build(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ex in model.exits:
            ex.fc.weight.copy_(torch.randn(ex.fc.weight.shape, generator=gen) * 3.0)
    return model.eval()


def _x(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _thresholds_with_mixed_exits(model: bn.BranchyResNet, x: torch.Tensor) -> tuple[float, float]:
    """Per-exit thresholds at the median normalized entropy, so some samples leave at each side exit."""
    h, ts = model.net.stem(x), []
    for s, stage in enumerate(model.net.stages, start=1):
        h = stage(h)
        if s in model.cfg.exits_after:
            ts.append(float(bn.normalized_entropy(model.exits[len(ts)](h)).median()))
    return tuple(ts)


def _masked_dense_oracle(model: bn.BranchyResNet, x: torch.Tensor):
    """Every stage and exit on every sample; each sample takes the first exit whose rule fires."""
    h, logits = model.net.stem(x), []
    for s, stage in enumerate(model.net.stages, start=1):
        h = stage(h)
        if s in model.cfg.exits_after:
            logits.append(model.exits[len(logits)](h))
    logits.append(model.net.head(h))
    n_exits = len(logits)
    fire = torch.stack([bn.exits_here(z, t) for z, t in zip(logits[:-1], model.thresholds, strict=True)]
                       + [torch.ones(len(x), dtype=torch.bool)])
    exit_index = fire.float().argmax(dim=0)  # the first exit that fires
    out = torch.stack(logits)[exit_index, torch.arange(len(x))]
    return out, exit_index, n_exits


@torch.no_grad()
def test_eval_path_equals_masked_dense_oracle():
    model = _model()
    x = _x(16)
    model.thresholds = _thresholds_with_mixed_exits(model, x)
    out, info = model(x)
    ref, exit_index, n_exits = _masked_dense_oracle(model, x)
    assert torch.equal(info["exit_index"], exit_index)
    assert (torch.bincount(exit_index, minlength=n_exits) > 0).all()  # every exit is taken: the test has teeth
    assert info["exit_counts"].tolist() == torch.bincount(exit_index, minlength=n_exits).tolist()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_exited_samples_leave_the_batch_and_later_stages_are_skipped():
    model = _model()
    x = _x(16)
    model.thresholds = _thresholds_with_mixed_exits(model, x)
    seen = {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(model.net, name).register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, i[0].shape[0]))
    _, info = model(x)
    c = info["exit_counts"].tolist()
    assert seen == {"layer1": 16, "layer2": 16 - c[0], "layer3": 16 - c[0] - c[1]}
    seen.clear()
    model.thresholds = (1.0, 1.0)  # everyone leaves at the first exit
    out, info = model(x)
    assert seen == {"layer1": 16} and info["exit_index"].eq(0).all()
    assert torch.isfinite(out).all()


@torch.no_grad()
def test_never_exiting_equals_baseline():
    model = _model(replace(TINY, threshold=0.0))
    baseline = bn.build_baseline(TINY).eval()
    missing, unexpected = baseline.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("exits.") for k in unexpected)
    x = _x(6)
    out, info = model(x)
    assert info["exit_index"].eq(2).all()
    torch.testing.assert_close(out, baseline(x)[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_executed_macs_equal_per_sample_analytic_count():
    model = _model()
    x = _x(12, seed=5)
    model.thresholds = _thresholds_with_mixed_exits(model, x)
    _, info = model(x)
    reach = [len(x)]  # samples reaching stage 1, 2, 3 (and the final head)
    c = info["exit_counts"].tolist()
    reach += [reach[-1] - c[0], reach[-1] - c[0] - c[1]]
    h = model.net.stem(x[:1])
    expected = count_macs(model.net.stem, x[:1]) * len(x)
    for s, stage in enumerate(model.net.stages, start=1):
        expected += count_macs(stage, h) * reach[s - 1]
        h = stage(h)
        if s in model.cfg.exits_after:
            expected += count_macs(model.exits[s - 1], h) * reach[s - 1]
    expected += count_macs(model.net.head, h) * reach[2]
    assert count_macs(model, x) == expected
    assert count_macs(model, x) < count_macs(bn.build_baseline(TINY).eval(), x)


@torch.no_grad()
def test_threshold_moves_executed_macs_monotonically():
    model = _model()
    x = _x(16)
    macs = []
    for t in (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0):
        model.thresholds = (t, t)
        macs.append(count_macs(model, x))
    assert macs == sorted(macs, reverse=True) and len(set(macs)) >= 3


def test_joint_training_loss_reaches_every_exit():
    torch.manual_seed(0)
    model = bn.build(replace(TINY, exit_weights=(0.5, 1.0, 2.0))).train()
    x, y = _x(6), torch.arange(6) % 10
    out, info = model(x)
    assert len(info["exit_logits"]) == 3 and torch.equal(out, info["exit_logits"][-1])
    total = bn.loss(out, info, y)
    expected = sum(w * F.cross_entropy(z, y) for w, z in zip((0.5, 1.0, 2.0), info["exit_logits"], strict=True))
    assert torch.isclose(total, expected)
    total.backward()
    for ex in model.exits:
        assert ex.fc.weight.grad is not None and ex.fc.weight.grad.abs().sum() > 0
    assert torch.isclose(bn.loss(out.detach(), {}, y), F.cross_entropy(out.detach(), y))


def test_config_validation_and_summary():
    with pytest.raises(ValueError, match="threshold"):
        bn.build(replace(TINY, threshold=1.5))
    with pytest.raises(ValueError, match="thresholds"):
        bn.build(replace(TINY, thresholds=(0.1,)))
    with pytest.raises(ValueError, match="thresholds"):
        bn.build(replace(TINY, thresholds=(0.1, 2.0)))
    with pytest.raises(ValueError, match="exits_after"):
        bn.build(replace(TINY, exits_after=(2, 1)))
    with pytest.raises(ValueError, match="exit_weights"):
        bn.build(replace(TINY, exit_weights=(1.0,)))
    assert bn.summarize({"exit_counts": torch.tensor([3, 1, 4])}) == {
        "exit_histogram": "3 1 4", "early_exit_fraction": 0.5}
    out, info = bn.build().eval()(bn.example_input(bn.Config(), batch_size=2))
    assert out.shape == (2, 10) and info["exit_index"].shape == (2,)


@pytest.fixture
def one_thread():
    """Tiny models train faster on one intra-op thread (and suffer less from a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_digits_training_sends_most_samples_out_early_at_last_exit_accuracy(one_thread):
    cfg = replace(bn.Config(), width=8, image_size=8)
    res = train_and_compare(bn, cfg, settings=replace(bn.TRAIN, epochs=DIGITS_EPOCHS))
    model, x, y = res["model_dynamic"], res["x_test"], res["y_test"]
    with torch.no_grad():
        _, info = model(x)
        model.thresholds = (0.0, 0.0)  # never exit early: the last exit's accuracy
        last_exit = float((model(x)[0].argmax(1) == y).float().mean())
    early = 1 - float(info["exit_counts"][-1]) / len(x)
    print(f"\nbranchynet digits: accuracy early-exit {res['accuracy_dynamic']:.4f}, last exit {last_exit:.4f}, "
          f"separately trained baseline {res['accuracy_dense']:.4f}; {bn.summarize(info)}, "
          f"train s {res['train_seconds_dense']:.1f} + {res['train_seconds_dynamic']:.1f}")
    assert early >= 0.5
    assert res["accuracy_dynamic"] >= last_exit - 0.02
