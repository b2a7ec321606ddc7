"""A-ViT: per-token halting that really removes halted tokens in eval."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from catalog.costs import count_macs
from implementations.common.train import train_and_compare
from implementations.transformer import a_vit as av

TINY = av.Config(image_size=16, patch=4, dim=32, depth=4, heads=2, budget=0.6)  # 16 patches + class token


def _model(cfg: av.Config = TINY, seed: int = 0) -> av.AViT:
    torch.manual_seed(seed)
    return av.build(cfg).eval()


def _x(n: int, cfg: av.Config = TINY) -> torch.Tensor:
    return av.example_input(cfg, n)


def _masked_dense_oracle(model: av.AViT, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block on every token; halted tokens are masked out of the keys and keep their state."""
    net, n_blocks = model.net, len(model.net.blocks)
    h = net.stem(x)
    live = torch.ones(h.shape[:2], dtype=torch.bool)
    cum = torch.zeros(h.shape[:2])
    depth = torch.full(h.shape[:2], n_blocks)
    for i, block in enumerate(net.blocks):
        h = torch.where(live.unsqueeze(-1), block(h, live[:, None, None, :]), h)
        if i < n_blocks - 1:
            cum = cum + torch.sigmoid(model.cfg.gate_scale * h[..., 0] - model.gate_center)
            halt = (cum >= 1 - model.cfg.eps) & live
            halt[:, 0] = False
            depth[halt] = i + 1
            live = live & ~halt
    return net.head(h), depth


@torch.no_grad()
def test_eval_path_equals_masked_dense_oracle():
    model = _model()
    x = _x(8)
    out, info = model(x)
    ref, depth = _masked_dense_oracle(model, x)
    assert torch.equal(info["depth"], depth)
    patch = depth[:, 1:]
    assert len(patch.unique()) >= 3 and (patch.float().mean(1).std() > 0)  # ragged: tokens and images differ
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    model.train()
    out_train, info_train = model(x)  # the relaxation takes the same hard decisions
    assert torch.equal(info_train["depth"], depth)
    torch.testing.assert_close(out_train, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_halted_tokens_leave_the_packed_rows():
    model = _model()
    x = _x(6)
    rows = []
    for block in model.net.blocks:
        block.mlp.fc1.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    _, info = model(x)
    depth = info["depth"]
    assert rows == [int((depth >= i + 1).sum()) for i in range(len(model.net.blocks))]
    assert rows[-1] < rows[0] == depth.numel()


@torch.no_grad()
def test_packed_batch_equals_each_image_alone():
    """The packed rows keep image order (cu_seqlens from the source index): batching changes nothing."""
    model = _model(seed=1)
    x = _x(5)
    out, info = model(x)
    for i in range(len(x)):
        alone, info_alone = model(x[i : i + 1])
        assert torch.equal(info_alone["depth"], info["depth"][i : i + 1])
        torch.testing.assert_close(alone, out[i : i + 1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_never_halting_equals_baseline():
    model = _model(replace(TINY, calibrate=False, gate_center=1e4))
    baseline = av.build_baseline(TINY).eval()
    baseline.load_state_dict(model.state_dict())
    x = _x(5)
    out, info = model(x)
    assert bool((info["depth"] == TINY.depth).all()) and float(info["token_layers"]) == 1.0
    torch.testing.assert_close(out, baseline(x)[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_executed_macs_equal_per_token_analytic_count():
    cfg = TINY
    model = _model(cfg, seed=3)
    x = _x(7)
    _, info = model(x)
    depth = info["depth"]
    c, hidden = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    expected = count_macs(model.net.patch_embed, x[:1]) * len(x) + count_macs(model.net.fc, torch.zeros(1, c)) * len(x)
    for i in range(cfg.depth):
        live = (depth >= i + 1).sum(dim=1)  # tokens of each image in block i
        expected += int(live.sum()) * (4 * c * c + 2 * c * hidden)  # qkv, proj, fc1, fc2
        expected += int((2 * live**2 * c).sum())  # QK^T and AV within each image
    assert count_macs(model, x) == expected
    assert count_macs(model, x) < count_macs(av.build_baseline(cfg).eval(), x)


@torch.no_grad()
def test_budget_and_gate_center_move_executed_macs_monotonically():
    x = _x(8)
    by_budget, fractions = [], []
    for budget in (0.3, 0.5, 0.7, 0.9):
        model = _model(replace(TINY, budget=budget))
        _, info = model(x)
        fractions.append(float(info["token_layers"]))
        by_budget.append(count_macs(model, x))
    assert by_budget == sorted(by_budget) and by_budget[0] < by_budget[-1]
    assert all(abs(f - b) < 0.03 for f, b in zip(fractions, (0.3, 0.5, 0.7, 0.9), strict=True)), fractions
    model = _model()
    base, by_center = model.gate_center, []
    for shift in (-4.0, -2.0, 0.0, 2.0, 4.0):
        model.gate_center = base + shift  # a larger center lowers every halting score: later halting
        by_center.append(count_macs(model, x))
    assert by_center == sorted(by_center) and by_center[0] < by_center[-1]


def test_aux_loss_is_ponder_plus_prior_and_reaches_the_halting_channel():
    torch.manual_seed(0)
    model = av.build(replace(TINY, ponder_weight=0.5, distr_weight=0.25)).train()
    x = _x(6)
    out, info = model(x)
    assert torch.isclose(info["aux_loss"].detach(), 0.5 * info["ponder"] + 0.25 * info["distr_kl"])
    patch_depth = info["depth"][:, 1:].float()
    assert 1.0 <= float(info["ponder"]) <= float(patch_depth.mean()) + 1.0  # mean of N_k + r_k, r_k in (0, 1]
    info["aux_loss"].backward()
    for block in model.net.blocks[:-1]:
        grad = block.mlp.fc2.weight.grad  # the MLP writes e_0, the borrowed halting neuron
        assert grad is not None and grad[0].abs().sum() > 0
    model.zero_grad()
    out, info = model(x)
    (F.cross_entropy(out, torch.arange(6) % 10) + info["aux_loss"]).backward()
    assert model.net.patch_embed.proj.weight.grad.abs().sum() > 0


def test_prior_and_halting_rule():
    p = av.prior(12, 7.44)
    assert torch.isclose(p.sum(), torch.tensor(1.0)) and int(p.argmax()) + 1 == 7
    scores = torch.tensor([[0.5, 0.2], [0.495, 0.2], [0.1, 0.2]])  # (L=3, 2 tokens)
    assert av.halting_depths(scores, 0.01).tolist() == [2, 3]


def test_config_validation_summary_and_figure():
    with pytest.raises(ValueError, match="budget"):
        av.build(replace(TINY, budget=0.0))
    with pytest.raises(ValueError, match="eps"):
        av.build(replace(TINY, eps=1.0))
    with pytest.raises(ValueError, match="gate_scale"):
        av.build(replace(TINY, gate_scale=0.0))
    info = {"depth": torch.tensor([[3, 1, 3], [3, 2, 1]]), "token_layers": torch.tensor(13 / 18)}
    assert av.summarize(info) == {"executed_token_layers": 0.7222, "mean_patch_depth": 1.75,
                                  "depth_histogram": "2 1 1"}
    out, info = av.build().eval()(av.example_input(av.Config(), batch_size=2))
    assert out.shape == (2, 10) and info["depth"].shape == (2, 65)
    import matplotlib.figure

    fig = av.decision_figure(TINY)
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) >= 2


@pytest.fixture
def one_thread():
    """Tiny models train faster on one intra-op thread (and suffer less from a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_digits_training_halts_tokens_near_the_budget_and_keeps_accuracy(one_thread):
    cfg = replace(av.Config(), budget=0.62)
    res = train_and_compare(av, cfg)
    model, x = res["model_dynamic"], res["x_test"]
    with torch.no_grad():
        _, info = model(x)
        executed = count_macs(model, x) / count_macs(res["model_dense"], x)
    print(f"\na_vit digits: accuracy dense {res['accuracy_dense']:.4f} dynamic {res['accuracy_dynamic']:.4f}, "
          f"executed MACs {executed:.3f} of the baseline's (budget 0.62), {av.summarize(info)}, "
          f"train s {res['train_seconds_dense']:.1f} + {res['train_seconds_dynamic']:.1f}")
    assert abs(float(info["token_layers"]) - 0.62) <= 0.15
    assert executed <= 0.8
    assert res["accuracy_dynamic"] >= res["accuracy_dense"] - 0.05
