"""Shared method pieces: gates and estimators, budget losses, data, training loop."""

from __future__ import annotations

import json
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from implementations.common import data, gates, losses, train
from implementations.common.layout import ChannelsLastInEval

# ---------------------------------------------------------------- gates


def test_gumbel_softmax_hard_is_one_hot_with_soft_gradient():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, requires_grad=True)
    y = gates.gumbel_softmax(logits, tau=0.5, hard=True)
    assert set(y.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(y.detach().sum(-1), torch.ones(5))
    (y * torch.arange(4.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_gumbel_softmax_without_noise_is_softmax_and_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    soft = gates.gumbel_softmax(logits, tau=2.0, hard=False, noise=False)
    assert torch.allclose(soft, torch.softmax(logits / 2.0, -1))
    hard = gates.gumbel_softmax(logits, hard=True, noise=False)
    assert hard.argmax(-1).tolist() == [1, 0]


def test_gumbel_softmax_sample_frequencies_follow_softmax():
    logits = torch.tensor([0.0, 1.0, -1.0]).expand(20000, 3)
    gen = torch.Generator().manual_seed(0)
    freq = gates.gumbel_softmax(logits, hard=True, generator=gen).mean(0)
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.015)


def test_gumbel_sigmoid_frequency_is_sigmoid_of_logit():
    gen = torch.Generator().manual_seed(1)
    g = gates.gumbel_sigmoid(torch.full((20000,), 0.8), hard=True, generator=gen)
    assert set(g.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(g.mean()) - float(torch.sigmoid(torch.tensor(0.8)))) < 0.015


def test_gumbel_rejects_bad_tau():
    with pytest.raises(ValueError, match="tau"):
        gates.gumbel_softmax(torch.zeros(2, 2), tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        gates.gumbel_sigmoid(torch.zeros(2), tau=-1.0)


def test_straight_through_estimators():
    x = torch.tensor([-0.5, 0.0, 0.3, 2.0], requires_grad=True)
    y = gates.ste_threshold(x, 0.1)
    assert y.tolist() == [0.0, 0.0, 1.0, 1.0]
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))
    x.grad = None
    s = gates.ste_sign(x)
    assert s.tolist() == [-1.0, 1.0, 1.0, 1.0]
    (s * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((4,), 3.0))
    with pytest.raises(ValueError, match="same shape"):
        gates.straight_through(torch.zeros(2), torch.zeros(3))


def test_hard_gate_is_deterministic_threshold():
    p = torch.tensor([0.2, 0.5, 0.51, 0.9])
    assert gates.hard_gate(p, 0.5).tolist() == [False, False, True, True]
    assert gates.hard_gate(p, 0.1).all()


def test_reinforce_baseline_loss_and_update():
    rb = gates.ReinforceBaseline(momentum=0.5)
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    reward = torch.tensor([1.0, 3.0])
    loss = rb.loss(logp, reward)  # first call: baseline = batch mean 2 -> advantages (-1, 1)
    assert torch.isclose(loss, torch.tensor(-(1.0 - 2.0) / 2))
    loss.backward()
    assert logp.grad.tolist() == [0.5, -0.5]
    assert rb.baseline == 2.0
    rb.loss(torch.zeros(2), torch.tensor([4.0, 4.0]))
    assert rb.baseline == 3.0
    with pytest.raises(ValueError, match="momentum"):
        gates.ReinforceBaseline(momentum=1.0)


# ---------------------------------------------------------------- losses


def test_target_rate_loss_matches_definition_and_has_gradient():
    g = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]], requires_grad=True)
    loss = losses.target_rate_loss(g, 0.5)
    assert torch.isclose(loss, torch.tensor(((0.5 - 0.75) ** 2 + (0.5 - 0.25) ** 2) / 2))
    loss.backward()
    assert g.grad.abs().sum() > 0
    as_list = losses.target_rate_loss([g[0], g[1]], torch.tensor([0.75, 0.25]))
    assert float(as_list.detach()) == 0.0
    with pytest.raises(ValueError, match="target"):
        losses.target_rate_loss(g, 1.5)
    with pytest.raises(ValueError, match="gates"):
        losses.target_rate_loss([], 0.5)


def test_mac_budget_loss_and_ponder_cost():
    macs = torch.tensor([50.0, 70.0])
    assert torch.isclose(losses.mac_budget_loss(macs, 100.0, 0.5), torch.tensor(0.01))
    assert float(losses.mac_budget_loss(macs, 100.0, 0.7, one_sided=True)) == 0.0
    with pytest.raises(ValueError, match="dense_macs"):
        losses.mac_budget_loss(macs, 0.0, 0.5)
    r = torch.tensor([0.2, 0.4], requires_grad=True)
    cost = losses.ponder_cost(torch.tensor([2, 3]), r)
    assert torch.isclose(cost, torch.tensor(2.8))
    cost.backward()
    assert r.grad.tolist() == [0.5, 0.5]


# ---------------------------------------------------------------- data


def test_digits_split_is_fixed_and_well_formed():
    a = data.load_digits_split(image_size=16, channels=3, seed=0, test_fraction=0.25)
    b = data.load_digits_split(image_size=16, channels=3, seed=0, test_fraction=0.25)
    for t, u in zip(a, b, strict=True):
        assert torch.equal(t, u)
    x_tr, y_tr, x_te, y_te = a
    assert x_tr.shape == (1348, 3, 16, 16) and x_te.shape == (449, 3, 16, 16)
    assert y_tr.dtype == torch.int64 and set(y_te.tolist()) == set(range(10))
    assert torch.equal(x_tr[:, 0], x_tr[:, 2])
    assert abs(float(x_tr.mean())) < 1e-4 and abs(float(x_tr.std()) - 1) < 1e-3
    c = data.load_digits_split(image_size=16, seed=1)
    assert not torch.equal(c[1], y_tr)
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits_split(test_fraction=1.0)
    with pytest.raises(ValueError, match="image_size"):
        data.load_digits_split(image_size=4)


def test_sample_photos_shapes_and_range():
    full = data.sample_photos()
    assert full.shape == (2, 3, 427, 640)
    sq = data.sample_photos(size=64)
    assert sq.shape == (2, 3, 64, 64) and sq.dtype == torch.float32
    assert 0.0 <= float(sq.min()) and float(sq.max()) <= 1.0 and float(sq.std()) > 0.05
    assert data.sample_photos(size=(24, 40)).shape == (2, 3, 24, 40)
    with pytest.raises(ValueError, match="size"):
        data.sample_photos(size=0)


def test_batches_cover_every_row_once():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    seen = [yb for _, yb in data.batches(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0))]
    assert [len(b) for b in seen] == [4, 4, 2]
    assert sorted(torch.cat(seen).tolist()) == list(range(10))
    assert torch.cat([yb for _, yb in data.batches(x, y, 3)]).tolist() == list(range(10))
    with pytest.raises(ValueError, match="batch_size"):
        list(data.batches(x, y, 0))


# ---------------------------------------------------------------- training loop


class _Tiny(nn.Module):
    def __init__(self, aux: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
        self.aux = aux

    def forward(self, x):
        out = self.net(x)
        return out, {"aux_loss": self.aux * out.pow(2).mean()}


def test_fit_and_evaluate_learn_digits():
    x_tr, y_tr, x_te, y_te = data.load_digits_split(image_size=8)
    torch.manual_seed(0)
    model = _Tiny()
    seen = []
    hist = train.fit(model, (x_tr, y_tr), epochs=3, lr=1e-2, batch_size=64,
                     progress=lambda e, n, v: seen.append((e, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)] and hist[-1] < hist[0]
    assert not model.training
    assert train.evaluate(model, x_te, y_te) > 0.85


def test_fit_uses_aux_loss_and_custom_loss():
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    torch.manual_seed(0)
    plain = train.fit(_Tiny(0.0), (x, y), epochs=1, lr=1e-3, batch_size=32, schedule="constant")
    torch.manual_seed(0)
    with_aux = train.fit(_Tiny(5.0), (x, y), epochs=1, lr=1e-3, batch_size=32, schedule="constant")
    assert with_aux[0] > plain[0]
    calls = []

    def my_loss(output, info, target):
        calls.append(output.shape)
        return F.cross_entropy(output, target)

    train.fit(_Tiny(), (x, y), epochs=1, lr=1e-3, batch_size=16, loss_fn=my_loss, optimizer="sgd")
    assert calls == [(16, 10), (16, 10)]
    with pytest.raises(ValueError, match="optimizer"):
        train.fit(_Tiny(), (x, y), epochs=1, lr=1e-3, batch_size=16, optimizer="lbfgs")


@dataclass
class _StubConfig:
    image_size: int = 32  # replaced by TRAIN.image_size (the stub network only takes 8x8)
    in_channels: int = 3
    num_classes: int = 10


def _stub_module(epochs: int = 2) -> types.SimpleNamespace:
    """A method module stand-in (a namespace, so it has no ``__name__``)."""
    return types.SimpleNamespace(
        Config=_StubConfig, build=lambda cfg=None: _Tiny(0.1), build_baseline=lambda cfg=None: _Tiny(),
        TRAIN=train.TrainSettings(epochs=epochs, lr=1e-2, image_size=8),
    )


def test_train_and_compare_on_a_stub_method_module(monkeypatch):
    monkeypatch.delenv("DYNNET_TRAIN_LOG", raising=False)
    Config = _StubConfig
    mod = _stub_module()
    res = train.train_and_compare(mod)
    assert res["epochs"] == 2 and res["n_train"] + res["n_test"] == 1797 and res["image_size"] == 8
    assert res["accuracy_dense"] > 0.8 and res["accuracy_dynamic"] > 0.8
    assert res["x_test"].shape == (res["n_test"], 3, 8, 8)
    assert isinstance(res["model_dynamic"], _Tiny) and not res["model_dynamic"].training
    with pytest.raises(ValueError, match="num_classes"):
        train.train_and_compare(mod, Config(num_classes=5))
    with pytest.raises(ValueError, match="image_size"):
        train.train_and_compare(mod, types.SimpleNamespace(image_size=32))


def test_train_log_hook_appends_one_line_per_run(tmp_path, monkeypatch):
    log = tmp_path / "train.jsonl"
    monkeypatch.setenv("DYNNET_TRAIN_LOG", str(log))
    train.train_and_compare(_stub_module(epochs=1))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 1 and "namespace" in lines[0]["module"]
    assert 0.0 < lines[0]["executed_mac_fraction"] <= 1.0 and lines[0]["epochs"] == 1


class _Convs(ChannelsLastInEval):
    def __init__(self, switch: bool = True) -> None:
        super().__init__()
        self.switch = switch
        self.conv = nn.Conv2d(3, 8, 3)

    def eval_channels_last(self) -> bool:
        return self.switch


def test_channels_last_in_eval_switches_the_weights_layout_and_keeps_the_parameters():
    model = _Convs()
    param = model.conv.weight
    model.eval()
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv.weight.is_contiguous()
    model.train()
    assert model.conv.weight.is_contiguous()
    assert model.conv.weight is param  # the same Parameter object: an optimizer built before keeps it
    off = _Convs(switch=False).eval()
    assert off.conv.weight.is_contiguous()
