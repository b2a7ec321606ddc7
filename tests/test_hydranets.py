"""HydraNets (implementations/moe/hydranets.py): only the top-k branches run, images grouped per branch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from catalog.costs import count_macs
from implementations.common.train import train_and_compare
from implementations.moe import hydranets as hy

TINY = hy.Config(width=4, branch_width=4, feature_dim=8, image_size=16, num_branches=4, top_k=2)


def _pair(cfg: hy.Config) -> tuple[hy.HydraNet, hy.HydraNet]:
    """Dynamic model and the all-branches baseline with the same weights, both in eval mode."""
    dyn = hy.build(cfg).eval()
    dense = hy.build_baseline(cfg).eval()
    dense.load_state_dict(dyn.state_dict())
    return dyn, dense


def _oracle(model: hy.HydraNet, x: torch.Tensor, branches: torch.Tensor) -> torch.Tensor:
    """Every branch on every image, then only the chosen branches' features kept (masked combiner)."""
    s = model.stem(x)
    scores = torch.sigmoid(model.gate(s))
    mask = torch.zeros_like(scores).scatter(1, branches, 1.0)
    combined = 0
    for b, branch in enumerate(model.branches):
        feat = F.linear(branch(s), model.proj_weight[b], model.proj_bias[b])
        combined = combined + (mask[:, b : b + 1] * scores[:, b : b + 1]) * feat
    return model.fc(combined)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_eval_equals_masked_dense_oracle(k):
    dyn, _ = _pair(dataclasses.replace(TINY, top_k=k))
    x = hy.example_input(TINY, 6)
    with torch.no_grad():
        out, info = dyn(x)
        assert info["branches"].shape == (6, k)
        torch.testing.assert_close(out, _oracle(dyn, x, info["branches"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [0, 1, 3])
def test_small_batches_equal_oracle(batch):
    """One image (every chosen branch on the whole batch, no gather), a few images, and an empty batch."""
    dyn, _ = _pair(TINY)
    x = hy.example_input(TINY, max(batch, 1))[:batch]
    with torch.no_grad():
        out, info = dyn(x)
        assert out.shape == (batch, TINY.num_classes)
        torch.testing.assert_close(out, _oracle(dyn, x, info["branches"]), atol=1e-5, rtol=1e-5)


def test_all_branches_on_equals_baseline():
    dyn, dense = _pair(TINY)
    everything = hy.build(dataclasses.replace(TINY, top_k=TINY.num_branches)).eval()
    everything.load_state_dict(dyn.state_dict())
    x = hy.example_input(TINY, 4)
    with torch.no_grad():
        torch.testing.assert_close(everything(x)[0], dense(x)[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(dyn(x)[0], dense(x)[0], atol=1e-4)


def test_macs_equal_analytic_count_of_what_ran():
    dyn, dense = _pair(TINY)
    x = hy.example_input(TINY, 5)
    with torch.no_grad():
        _, info = dyn(x)
        one_branch = count_macs(dyn.branches[0], dyn.stem(x[:1]))
    proj = TINY.feature_dim * dyn.branches[0].out_features
    skipped = 5 * TINY.num_branches - int(info["branch_counts"].sum())
    assert int(info["branch_counts"].sum()) == 5 * TINY.top_k
    assert count_macs(dyn, x) == count_macs(dense, x) - skipped * (one_branch + proj)


def test_k_moves_macs_monotonically():
    x = hy.example_input(TINY, 4)
    macs = []
    for k in range(1, TINY.num_branches + 1):
        torch.manual_seed(0)
        macs.append(count_macs(hy.build(dataclasses.replace(TINY, top_k=k)).eval(), x))
    assert all(a < b for a, b in zip(macs, macs[1:], strict=False)), macs
    torch.manual_seed(0)
    assert macs[-1] == count_macs(hy.build_baseline(TINY).eval(), x)


def test_untrained_gate_spreads_images_and_summarize():
    dyn, _ = _pair(TINY)
    with torch.no_grad():
        _, info = dyn(hy.example_input(TINY, 16))
    assert (info["branch_counts"] > 0).sum() >= 3  # the calibrated gate spreads the images over branches
    summary = hy.summarize(info)
    assert summary["branch_fraction"] == pytest.approx(TINY.top_k / TINY.num_branches)


def test_gradients_reach_gate_and_branches_in_train_mode():
    model = hy.build(TINY).train()
    x, y = hy.example_input(TINY, 4), torch.tensor([0, 1, 2, 3])
    out, info = model(x)
    hy.loss(out, info, y).backward()
    assert model.gate.fc.weight.grad.abs().sum() > 0
    first_convs = [b.stages[0][0].conv1 for b in model.branches]
    assert all(c.weight.grad.abs().sum() > 0 for c in first_convs)  # soft gating: every branch trains
    model.zero_grad()
    F.cross_entropy(model(x)[0], y).backward()  # the classification loss alone also reaches the gate
    assert model.gate.fc.weight.grad.abs().sum() > 0


def test_class_groups_and_gate_targets():
    assert hy.class_to_branch(TINY).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    cfg = dataclasses.replace(TINY, class_groups=(0, 0, 0, 1, 1, 1, 2, 2, 3, 3))
    assert hy.class_to_branch(cfg).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="class_groups"):
        hy.build(dataclasses.replace(TINY, class_groups=(0, 9)))
    with pytest.raises(ValueError, match="top_k must be"):
        hy.build(dataclasses.replace(TINY, top_k=0))


@pytest.mark.slow
def test_training_on_digits_specializes_branches():
    cfg = hy.Config()
    result = train_and_compare(hy, cfg)  # the module's TRAIN settings
    assert result["accuracy_dense"] > 0.85
    assert result["accuracy_dynamic"] >= result["accuracy_dense"] - 0.05
    model, x, y = result["model_dynamic"], result["x_test"], result["y_test"]
    with torch.no_grad():
        _, info = model(x)
    assert info["branches"].shape[1] == cfg.top_k  # the budget: exactly k of B branches per image
    owner = hy.class_to_branch(cfg)[y]
    routed_to_owner = (info["branches"] == owner.unsqueeze(1)).any(dim=1).float().mean()
    assert routed_to_owner > 0.9  # the gate learned the class groups: images reach their specialized branch
