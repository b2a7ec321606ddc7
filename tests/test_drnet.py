"""DRNet (implementations/resolution/drnet.py): each image runs only at its predicted resolution."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from catalog.costs import count_macs
from implementations.common.train import train_and_compare
from implementations.resolution import drnet as dr

TINY = dr.Config(width=4, predictor_width=4, resolution_mix=(0.3, 0.4, 0.3))


def _pair(cfg: dr.Config) -> tuple[dr.DRNet, dr.Baseline]:
    """Dynamic model and the native-resolution baseline sharing the classifier's weights (eval mode)."""
    dyn = dr.build(cfg).eval()
    dense = dr.build_baseline(cfg).eval()
    state = dyn.state_dict()
    dense.load_state_dict({k: state[k] for k in dense.state_dict()})  # BN index 0 is the native one
    return dyn, dense


def test_eval_equals_masked_dense_oracle():
    dyn, _ = _pair(TINY)
    x = dr.example_input(TINY, 12)
    with torch.no_grad():
        out, info = dyn(x)
        every = torch.stack([dyn.run_at(x, j) for j in range(3)], dim=1)  # (N, R, K): all candidates
    assert len(set(info["resolution_index"].tolist())) >= 2  # a real mix of resolutions in the batch
    oracle = every[torch.arange(12), info["resolution_index"]]
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-5)
    assert info["resolution"].tolist() == [TINY.resolutions[j] for j in info["resolution_index"].tolist()]


def test_full_resolution_for_everyone_equals_baseline():
    dyn, dense = _pair(dataclasses.replace(TINY, resolution_mix=(1.0, 0.0, 0.0)))
    x = dr.example_input(TINY, 6)
    with torch.no_grad():
        out, info = dyn(x)
        assert (info["resolution_index"] == 0).all()
        torch.testing.assert_close(out, dense(x)[0], atol=1e-5, rtol=1e-5)


def test_macs_equal_analytic_count_of_what_ran():
    dyn, _ = _pair(TINY)
    x = dr.example_input(TINY, 10)
    with torch.no_grad():
        _, info = dyn(x)
        predictor = count_macs(dyn.predict, x)
        per_res = [count_macs(lambda j=j: dyn.run_at(x[:1], j)) for j in range(3)]
    counts = torch.bincount(info["resolution_index"], minlength=3).tolist()
    assert count_macs(dyn, x) == predictor + sum(c * m for c, m in zip(counts, per_res, strict=True))
    assert per_res[0] > per_res[1] > per_res[2]


def test_resolution_mix_moves_macs_monotonically():
    x = dr.example_input(TINY, 64)
    macs = []
    for mix in [(1.0, 0.0, 0.0), (0.5, 0.5, 0.0), (0.0, 1.0, 0.0), (0.0, 0.5, 0.5), (0.0, 0.0, 1.0)]:
        torch.manual_seed(0)
        macs.append(count_macs(dr.build(dataclasses.replace(TINY, resolution_mix=mix)).eval(), x))
    assert all(a > b for a, b in zip(macs, macs[1:], strict=False)), macs


def test_calibrate_bias_hits_the_mix():
    logits = torch.randn(400, 3) * 0.1 + torch.tensor([1.0, 0.0, -1.0])
    mix = torch.tensor([0.2, 0.5, 0.3])
    share = torch.bincount((logits + dr.calibrate_bias(logits, mix)).argmax(1), minlength=3).float() / 400
    assert (share - mix).abs().max() < 0.03


def test_gradients_reach_predictor_in_train_mode():
    model = dr.build(TINY).train()
    out, info = model(dr.example_input(TINY, 4))
    assert info["aux_loss"] >= 0 and set(info["cost"].tolist()) <= {1.0, 0.5625, 0.25}
    F.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()  # through the Gumbel straight-through sample
    assert model.predictor.fc.weight.grad.abs().sum() > 0
    model.zero_grad()
    _, info = model(dr.example_input(TINY, 4))
    (info["aux_loss"] + 1.0 * info["cost"].mean()).backward()  # through the FLOPs regularizer
    assert model.predictor.fc.weight.grad.abs().sum() > 0


def test_summarize_and_bad_config():
    dyn, _ = _pair(TINY)
    with torch.no_grad():
        _, info = dyn(dr.example_input(TINY, 8))
    summary = dr.summarize(info)
    assert sum(int(c) for c in summary["images_per_resolution"].split()) == 8
    assert 0.25 <= summary["classifier_mac_fraction"] <= 1.0
    with pytest.raises(ValueError, match="resolution_mix"):
        dr.build(dataclasses.replace(TINY, resolution_mix=(0.5, 0.5)))
    with pytest.raises(ValueError, match="resolutions"):
        dr.build(dataclasses.replace(TINY, resolutions=(16, 32)))


def test_decision_figure_on_the_sample_photos():
    from matplotlib.figure import Figure

    fig = dr.decision_figure(TINY)
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * len(TINY.resolutions)


@pytest.mark.slow
def test_training_on_digits_meets_the_budget():
    cfg = dr.Config()
    result = train_and_compare(dr, cfg)  # the module's TRAIN settings
    assert result["accuracy_dense"] > 0.8
    assert result["accuracy_dynamic"] >= result["accuracy_dense"] - 0.05
    with torch.no_grad():
        _, info = result["model_dynamic"](result["x_test"])
    assert abs(float(info["cost"].mean()) - cfg.budget) < 0.15  # executed classifier MACs near the budget
    assert len(set(info["resolution_index"].tolist())) >= 2  # the choice depends on the image
