"""Skip-Convolutions: the executing path against the masked oracle, counts, the target knob, and
fidelity to dense per-frame processing on real panning clips."""

from __future__ import annotations

import pytest
import torch

from catalog.costs import count_macs
from implementations.spatial import skip_conv as sc


def tiny(**kw) -> sc.Config:
    return sc.Config(**{"depth": 8, "width": 8, "image_size": 32, "num_frames": 5, "backend": "cpu", **kw})


def build_pair(cfg: sc.Config) -> tuple[sc.SkipConvNet, sc.DenseVideoNet]:
    model = sc.build(cfg).eval()
    dense = sc.build_baseline(cfg).eval()
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.endswith("gate_threshold") for k in unexpected)
    return model, dense


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative L2 error per (clip, frame): `(N, T, ...) -> (N, T)`."""
    return (a - b).flatten(2).norm(dim=2) / b.flatten(2).norm(dim=2)


def test_eval_equals_masked_dense_oracle():
    cfg = tiny(target=0.3)
    model, _ = build_pair(cfg)
    x = sc.example_input(cfg, 2)
    with torch.no_grad():
        out, info = model(x)
        gates = info["gates"]
        assert len(gates) == len(model.convs()) and all(g.shape[:2] == (2, 4) for g in gates)
        assert 0.15 < float(info["density"].mean()) < 0.45
        model.mode = "oracle"
        for conv, g in zip(model.convs(), gates, strict=True):
            conv.replay = list(g.unbind(1))
        want, _ = model(x)
        model.mode = "skip"
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)


def test_everything_open_equals_dense_per_frame_processing():
    cfg = tiny(target=1.0)
    model, dense = build_pair(cfg)
    x = sc.example_input(cfg, 2)
    with torch.no_grad():
        out, info = model(x)
        ref, ref_info = dense(x)
    assert all(bool(g.all()) for g in info["gates"])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(info["features"], ref_info["features"], atol=1e-4, rtol=1e-4)


def test_fidelity_to_dense_stays_within_the_stated_tolerance():
    """Docstring: threshold 0 -> logits within 1e-4 relative; target 0.9 / 0.5 -> last feature maps
    within 15 % / 65 % relative L2 on every frame (default CIFAR ResNet-8, 32x32, 8-frame clips)."""
    errors = {}
    for name, knobs in {"zero": dict(target=None, threshold=0.0), "most": dict(target=0.9),
                        "half": dict(target=0.5)}.items():
        cfg = sc.Config(**knobs)
        model, dense = build_pair(cfg)
        x = sc.example_input(cfg, 2)
        with torch.no_grad():
            out, info = model(x)
            ref, ref_info = dense(x)
        errors[name] = (rel_err(out, ref).max(), rel_err(info["features"], ref_info["features"]).max())
    assert errors["zero"][0] < 1e-4
    assert errors["most"][1] < 0.15 and errors["half"][1] < 0.65
    assert errors["half"][1] > errors["most"][1] > errors["zero"][1], "skipping more drifts more"


def test_counted_macs_equal_what_ran():
    cfg = tiny(target=0.3)
    model, dense = build_pair(cfg)
    x = sc.example_input(cfg, 2)
    with torch.no_grad():
        _, info = model(x)
        n, t = x.shape[:2]
        expected = n * t * model.net.fc.weight.numel()
        for conv, g in zip(model.convs(), info["gates"], strict=True):
            h, w = g.shape[-2:]
            expected += (n * h * w + int(g.sum())) * conv.weight.numel()  # reference frame + open pixels
        assert count_macs(model, x) == expected
        assert count_macs(model, x) < 0.5 * count_macs(dense, x)


def test_target_moves_executed_macs_monotonically():
    x = sc.example_input(tiny(), 2)
    macs = []
    for target in (0.1, 0.25, 0.5, 0.75, 1.0):
        with torch.no_grad():
            macs.append(count_macs(sc.build(tiny(target=target)).eval(), x))
    assert all(a < b for a, b in zip(macs, macs[1:], strict=False)), macs


def test_untrained_operating_point_opens_the_target():
    for target in (0.25, 0.5):
        cfg = tiny(target=target)
        with torch.no_grad():
            _, info = sc.build(cfg).eval()(sc.example_input(cfg, 2))
        assert float(info["density"].mean()) == pytest.approx(target, abs=0.1)


def test_threshold_knob_and_reference_frames():
    cfg = tiny(target=None, threshold=0.05, reset_every=2)
    model, _ = build_pair(cfg)
    with torch.no_grad():
        _, info = model(sc.example_input(cfg, 1))
    for g in info["gates"]:
        assert bool(g[:, 1].all()) and bool(g[:, 3].all()), "frames 2 and 4 are dense reference frames"
    macs = [count_macs(sc.build(tiny(target=None, threshold=th)).eval(), sc.example_input(cfg, 1))
            for th in (0.0, 0.01, 0.05, 1.0)]
    assert all(a >= b for a, b in zip(macs, macs[1:], strict=False)) and macs[0] > macs[-1]


def test_single_frames_run_densely_and_train():
    cfg = tiny()
    model, dense = build_pair(cfg)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out, info = model(x)
        torch.testing.assert_close(out, dense(x)[0], atol=1e-5, rtol=1e-5)
    assert out.shape == (3, 10) and info["gates"] == []
    model.train()
    out, _ = model(x)
    out.sum().backward()
    assert model.net.fc.weight.grad is not None


def test_clips_summary_figure_and_bad_config():
    from matplotlib.figure import Figure

    clip = sc.example_input(tiny(), 3)
    assert clip.shape == (3, 5, 3, 32, 32)
    with torch.no_grad():
        _, info = sc.build(tiny()).eval()(clip)
    assert 0 < sc.summarize(info)["open_fraction"] < 1
    assert isinstance(sc.decision_figure(tiny(num_frames=3)), Figure)
    for bad in ({"arch": "hrnet"}, {"target": 0.0}, {"threshold": -1.0}, {"num_frames": 0}):
        with pytest.raises(ValueError):
            sc.build(tiny(**bad))
