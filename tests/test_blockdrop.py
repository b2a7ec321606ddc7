"""BlockDrop: the executing eval path, its MAC count, the knobs, the policy gradient and a short training run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from catalog.costs import count_macs
from implementations.common.train import train_and_compare
from implementations.depth import blockdrop

TINY = dict(depth=14, width=4, in_channels=1, image_size=8, policy_width=4, policy_size=8, keep_init=None)


def tiny(**kw) -> blockdrop.Config:
    return blockdrop.Config(**{**TINY, **kw})


def spread_policy(model: blockdrop.BlockDrop, scale: float = 50.0) -> blockdrop.BlockDrop:
    """Make the untrained policy input-dependent, so that decisions differ between images."""
    with torch.no_grad():
        model.policy.net.fc.weight.mul_(scale)
    return model


def oracle(model: blockdrop.BlockDrop, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Masked dense run: every block on every image, then select block or shortcut by `keep (N, B)`."""
    h = model.net.stem(x)
    for b, block in enumerate(model.net.blocks()):
        h = torch.where(keep[:, b].view(-1, 1, 1, 1), block(h), block.shortcut(h))
    return model.net.head(h)


def analytic_macs(cfg: blockdrop.Config, keep: torch.Tensor) -> int:
    """MACs of what ran, from the decisions `keep (N, B)`: the policy ResNet-8 on its input, then the
    stem, the kept residual branches (option-A shortcuts cost nothing) and the classifier."""
    n, num_blocks = keep.shape

    def resnet(depth: int, width: int, side: int, classes: int, kept: list[int]) -> int:
        total = n * cfg.in_channels * width * 9 * side * side
        b = 0
        for stage, w in enumerate((width, 2 * width, 4 * width)):
            for i in range((depth - 2) // 6):
                cin = w // 2 if stage > 0 and i == 0 else w
                out_side = side // 2**stage
                total += kept[b] * (cin * w + w * w) * 9 * out_side * out_side
                b += 1
        return total + n * 4 * width * classes

    policy_blocks = 3 * ((cfg.policy_depth - 2) // 6)
    policy = resnet(cfg.policy_depth, cfg.policy_width, cfg.policy_size, num_blocks, [n] * policy_blocks)
    main = resnet(cfg.depth, cfg.width, cfg.image_size, cfg.num_classes, keep.sum(dim=0).tolist())
    return policy + main


def test_eval_equals_masked_dense_oracle():
    model = spread_policy(blockdrop.build(tiny())).eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        out, info = model(x)
        keep = info["policy"]
        assert keep.dtype == torch.bool and keep.shape == (16, 6)
        assert any(0 < int(col.sum()) < 16 for col in keep.T), "some block should run on part of the batch"
        torch.testing.assert_close(out, oracle(model, x, keep), atol=1e-5, rtol=1e-5)



def test_batch_of_one_equals_its_row_in_a_batch():
    model = spread_policy(blockdrop.build(tiny())).eval()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        out, info = model(x)
        for i in range(len(x)):
            out_i, info_i = model(x[i : i + 1])
            torch.testing.assert_close(out_i, out[i : i + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(info_i["policy"].flatten(), info["policy"][i].flatten())

@pytest.mark.parametrize("knobs", [{"keep_init": 1.0}, {"threshold": 0.0}])
def test_all_blocks_kept_equals_baseline(knobs):
    cfg = tiny(**knobs)
    model = blockdrop.build(cfg).eval()
    dense = blockdrop.build_baseline(cfg).eval()
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("policy.") for k in unexpected)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        out, info = model(x)
        assert bool(info["policy"].all())
        torch.testing.assert_close(out, dense(x)[0], atol=1e-5, rtol=1e-5)


def test_counted_macs_equal_what_ran():
    cfg = tiny()
    model = spread_policy(blockdrop.build(cfg)).eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        _, info = model(x)
        assert count_macs(model, x) == analytic_macs(cfg, info["policy"])


def test_policy_sees_a_downsampled_image():
    cfg = tiny(image_size=16, policy_size=8)
    model = blockdrop.build(cfg).eval()
    x = torch.randn(2, 1, 16, 16)
    full = blockdrop.build(tiny(image_size=16, policy_size=16)).eval()
    assert count_macs(model.policy, x) * 4 == pytest.approx(count_macs(full.policy, x), rel=0.01)


def test_dropped_blocks_are_not_called():
    model = blockdrop.build(tiny(keep_init=0.0)).eval()
    calls = []
    for block in model.net.blocks():
        block.conv1.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        _, info = model(torch.randn(4, 1, 8, 8))
    assert not info["policy"].any() and not calls


def _macs(cfg: blockdrop.Config, spread: bool = False) -> float:
    torch.manual_seed(0)
    model = blockdrop.build(cfg).eval()
    if spread:
        spread_policy(model)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return count_macs(model, x)


def test_knobs_move_executed_macs_monotonically():
    by_keep = [_macs(tiny(keep_init=r)) for r in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]
    assert all(a < b for a, b in zip(by_keep, by_keep[1:], strict=False))
    by_threshold = [_macs(tiny(threshold=t), spread=True) for t in (0.0, 0.2, 0.5, 0.8, 1.0)]
    assert all(a >= b for a, b in zip(by_threshold, by_threshold[1:], strict=False))
    assert by_threshold[0] > by_threshold[-1]


def test_default_config_keeps_every_block_and_validates():
    model = blockdrop.build().eval()
    x = blockdrop.example_input(blockdrop.Config(), batch_size=2)
    with torch.no_grad():
        out, info = model(x)
    assert out.shape == (2, 10) and info["policy"].shape == (2, 6) and bool(info["policy"].all())
    assert blockdrop.summarize(info)["kept_blocks"] == 1.0
    for bad in ({"threshold": 1.5}, {"keep_init": -0.1}, {"alpha": 0.5}, {"policy_size": 4}, {"pretrain_steps": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            blockdrop.build(tiny(**bad))


def test_paper_operating_point_keeps_17_of_54_blocks():
    cfg = blockdrop.Config(depth=110, width=4, policy_size=32, keep_init=0.3135)
    model = blockdrop.build(cfg).eval()
    with torch.no_grad():
        _, info = model(blockdrop.example_input(cfg, batch_size=4))
    assert info["policy"].sum(dim=1).tolist() == [17] * 4


def test_reward_is_the_papers():
    output = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([0, 0])
    policy = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(blockdrop.reward(output, target, policy, -10.0), torch.tensor([0.75, -10.0]))


def test_curriculum_hands_over_the_last_blocks_first():
    model = blockdrop.build(tiny(pretrain_steps=2, curriculum_steps=6)).train()
    x, controlled = torch.randn(4, 1, 8, 8), []
    for _ in range(10):
        _, info = model(x)
        if "log_prob" in info:
            controlled.append(model._controlled())
            forced = model.num_blocks - model._controlled()
            assert bool((info["policy"][:, :forced] == 1).all())
    assert controlled == [1, 2, 3, 4, 5, 6, 6, 6]


def test_pretraining_runs_the_dense_network():
    model = blockdrop.build(tiny(pretrain_steps=1)).train()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    out, info = model(x)
    assert "log_prob" not in info
    torch.testing.assert_close(blockdrop.loss(out, info, y), F.cross_entropy(out, y))


def test_gradients_reach_the_policy():
    model = spread_policy(blockdrop.build(tiny(pretrain_steps=0, curriculum_steps=0)), scale=3.0).train()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    out, info = model(x)
    assert info["log_prob"].shape == (32,) and info["policy"].shape == (32, 6)
    blockdrop.loss(out, info, y).backward()
    for name, param in model.policy.named_parameters():
        if name.endswith("weight"):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.net.fc.weight.grad.abs().sum() > 0  # joint finetuning: the ResNet learns too


def test_policy_gradient_prefers_fewer_blocks_when_right():
    """All predictions right: the sampled policy that used fewer blocks than the greedy one has the larger
    reward, so the loss pushes its keep probabilities down."""
    probs = torch.full((1, 4), 0.6, requires_grad=True)
    sample, greedy = torch.tensor([[1.0, 0.0, 0.0, 1.0]]), torch.ones(1, 4)
    output, target = torch.tensor([[3.0, 0.0]]), torch.tensor([0])
    log_prob = (sample * probs.log() + (1 - sample) * (1 - probs).log()).sum(dim=1)
    info = {"log_prob": log_prob, "policy": sample, "policy_map": greedy, "map_output": output, "penalty": -10.0}
    blockdrop.loss(output.requires_grad_(), info, target).backward()
    assert probs.grad[0, 1] > 0 and probs.grad[0, 2] > 0  # descent lowers p where the sample dropped


@pytest.mark.slow
def test_training_on_digits_drops_blocks_and_keeps_accuracy():
    """Dense training, curriculum, joint finetuning (TRAIN: 8 epochs) on 16x16 digits, width-8 ResNet-14."""
    cfg = blockdrop.Config(width=8, image_size=16, policy_width=8, policy_size=8)
    result = train_and_compare(blockdrop, cfg)
    x_test = result["x_test"]
    with torch.no_grad():
        _, info = result["model_dynamic"](x_test)
    kept = float(info["policy"].float().mean())
    assert 0.2 <= kept < 1.0, kept  # the policy learned to drop some blocks, not all
    # the main ResNet runs less; at this tiny scale the policy itself costs about half of it (ResNet-110: 5 %)
    main = count_macs(result["model_dynamic"], x_test) - count_macs(result["model_dynamic"].policy, x_test)
    assert main < count_macs(result["model_dense"], x_test)
    assert result["accuracy_dynamic"] >= result["accuracy_dense"] - 0.05, result
