"""Standard backbones: published MAC and parameter counts, an independent counter, reusable pieces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from catalog.costs import count_macs, count_params
from implementations.common.backbones import (
    BasicBlock,
    Bottleneck,
    InvertedResidual,
    PadShortcut,
    cifar_resnet,
    deit_small,
    mobilenet_v2,
    resnet18,
    resnet50,
    vit,
)

# name -> (constructor, input size, published MACs, tolerance, torchvision/timm params, our exact MACs)
PUBLISHED = {
    "resnet18": (resnet18, 224, 1.814e9, 0.005, 11_689_512, 1_814_073_344),
    "resnet50": (resnet50, 224, 4.089e9, 0.005, 25_557_032, 4_089_184_256),
    "mobilenet_v2": (mobilenet_v2, 224, 0.301e9, 0.005, 3_504_872, 300_774_272),
    "deit_small": (deit_small, 224, 4.6e9, 0.01, 22_050_664, 4_598_882_304),
    "cifar_resnet32": (lambda: cifar_resnet(32), 32, 69e6, 0.005, 464_154, 68_862_592),
    "cifar_resnet110": (lambda: cifar_resnet(110), 32, 253e6, 0.005, 1_727_962, 252_887_680),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_dense_counts_match_published_figures(name) -> None:
    build, size, published, tol, params, exact = PUBLISHED[name]
    model = build().eval()
    macs = count_macs(model, torch.randn(1, 3, size, size))  # a real CPU forward, batch 1
    assert abs(macs - published) / published < tol, f"{name}: {macs:,} MACs"
    assert macs == exact  # pinned: our counts cannot drift silently
    assert count_params(model) == params


def test_published_param_figures_in_millions() -> None:
    assert round(count_params(cifar_resnet(32)) / 1e6, 2) == 0.46  # He et al. 2016, Table 6
    assert round(count_params(cifar_resnet(110)) / 1e6, 1) == 1.7


def test_count_agrees_with_ptflops_where_conventions_agree() -> None:
    from ptflops import get_model_complexity_info

    model = resnet18(num_classes=10).eval()
    ours = count_macs(model, torch.randn(1, 3, 64, 64))
    ignored = [nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d]  # not MACs by our convention
    theirs, params = get_model_complexity_info(
        model,
        (3, 64, 64),
        as_strings=False,
        print_per_layer_stat=False,
        backend="pytorch",
        ignore_modules=ignored,
        backend_specific_config={"count_functional": False},
    )
    assert params == count_params(model)
    assert abs(theirs - ours) / ours < 1e-3
    assert theirs - ours == 10  # exactly the fc bias adds, which ptflops counts and we do not


# --- reusable pieces -----------------------------------------------------------------------------


def make_blocks() -> list[nn.Module]:
    projection = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    return [
        BasicBlock(8, 8),  # identity shortcut
        BasicBlock(8, 16, 2, PadShortcut(8, 16, 2)),  # option A
        Bottleneck(16, 4),  # identity shortcut
        Bottleneck(8, 4, 2, projection),  # 1x1 projection, stride on the 3x3
    ]


@pytest.mark.parametrize("index", range(4))
def test_block_is_relu_of_residual_plus_shortcut(index) -> None:
    block = make_blocks()[index].eval()
    x = torch.randn(2, block.in_channels, 9, 9)
    out = block(x)
    side = -(-9 // block.stride)
    assert out.shape == (2, block.out_channels, side, side)
    torch.testing.assert_close(out, F.relu(block.residual(x) + block.shortcut(x)))


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 4, 7, 7)
    y = PadShortcut(4, 10, 2)(x)
    assert y.shape == (2, 10, 4, 4)
    torch.testing.assert_close(y[:, :4], x[:, :, ::2, ::2])
    assert not y[:, 4:].any()
    with pytest.raises(ValueError, match="out_ch"):
        PadShortcut(8, 4, 1)


@pytest.mark.parametrize(
    ("model", "size"),
    [
        (resnet18(num_classes=5, width=8), 64),
        (cifar_resnet(8, 5, 1, width=4), 8),
        (cifar_resnet(14, 5, shortcut="B"), 8),
    ],
)
def test_resnets_compose_from_stem_stages_head(model, size) -> None:
    model.eval()
    x = torch.randn(2, model.conv1.in_channels, size, size)
    h = model.stem(x)
    for stage in model.stages:
        h = stage(h)
    torch.testing.assert_close(model.head(h), model(x))
    assert model(x).shape == (2, 5)
    assert len(list(model.blocks())) == sum(len(s) for s in model.stages)


def test_skipping_a_block_removes_exactly_its_macs() -> None:
    """The counter and the pieces together: a block skipped by a Python ``if`` costs nothing."""
    model = cifar_resnet(8, width=4).eval()
    x = torch.randn(1, 3, 8, 8)
    blocks = list(model.blocks())

    def run(skip: int | None) -> torch.Tensor:
        h = model.stem(x)
        for i, block in enumerate(blocks):
            h = block.shortcut(h) if i == skip else block(h)
        return model.head(h)

    dense = count_macs(run, None)
    assert dense == count_macs(model, x)
    skipped = count_macs(run, 0)  # layer1's only block: two 3x3 convs, 4 -> 4 channels, 8x8
    assert dense - skipped == 2 * (8 * 8 * 4 * 4 * 9)


def test_torchvision_parameter_names() -> None:
    r50 = set(resnet50().state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer2.0.downsample.1.bias",
            "layer4.2.conv3.weight", "layer4.2.bn3.num_batches_tracked", "fc.bias"} <= r50  # fmt: skip
    assert resnet50().layer2[0].conv2.stride == (2, 2)  # v1.5: the stride sits on the 3x3
    mb = set(mobilenet_v2().state_dict())
    assert {"features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
            "features.2.conv.0.0.weight", "features.2.conv.3.running_var", "features.18.0.weight",
            "classifier.1.weight"} <= mb  # fmt: skip


def test_mobilenet_v2_blocks_and_residual_pieces() -> None:
    model = mobilenet_v2(
        num_classes=7, width_mult=0.5, setting=((1, 8, 1, 1), (6, 16, 2, 2)), last_channel=32
    )
    model.eval()
    assert len(mobilenet_v2().blocks) == 17
    assert [b.use_res_connect for b in model.blocks] == [False, False, True]
    x = torch.randn(2, 3, 16, 16)
    block = model.blocks[2]
    h = model.blocks[1](model.blocks[0](model.stem(x)))
    torch.testing.assert_close(block(h), block.residual(h) + block.shortcut(h))
    with pytest.raises(RuntimeError, match="shortcut"):
        model.blocks[0].shortcut(h)
    torch.testing.assert_close(model.head(model.forward_features(x)), model(x))
    assert model(x).shape == (2, 7)
    with pytest.raises(ValueError, match="stride"):
        InvertedResidual(8, 8, 3, 6)


def test_vit_pieces_and_token_subsets() -> None:
    model = vit(img_size=16, patch=4, dim=32, depth=2, heads=4, num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    tokens = model.stem(x)
    assert tokens.shape == (2, 17, 32)
    block = model.blocks[0]
    mid = tokens + block.attn_residual(tokens)
    torch.testing.assert_close(block(tokens), mid + block.mlp_residual(mid))
    torch.testing.assert_close(model.head(model.forward_features(x)), model(x))
    # the MLP branch is token-wise: running it on a subset gives the subset of the full result
    keep = torch.tensor([0, 3, 5])
    torch.testing.assert_close(block.mlp_residual(mid[:, keep]), block.mlp_residual(mid)[:, keep])
    # attention on fewer tokens costs quadratically less: 2 N^2 dim MACs per block
    full, fewer = count_macs(block, tokens), count_macs(block, tokens[:, :9])
    per_token = 4 * 32 * 32 + 2 * 4 * 32 * 32  # qkv + proj, fc1 + fc2
    assert full == 2 * (17 * per_token + 2 * 17 * 17 * 32)
    assert fewer == 2 * (9 * per_token + 2 * 9 * 9 * 32)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: cifar_resnet(33), ValueError, "depth"),
        (lambda: cifar_resnet(2), ValueError, "depth"),
        (lambda: cifar_resnet(20, shortcut="C"), ValueError, "shortcut"),
        (lambda: vit(img_size=30, patch=4), ValueError, "img_size"),
        (lambda: vit(dim=30, heads=4), ValueError, "heads"),
        (lambda: vit(img_size=16)(torch.randn(1, 3, 32, 32)), ValueError, "x"),
        (lambda: mobilenet_v2(width_mult=0), ValueError, "width_mult"),
    ],
)
def test_bad_configurations_give_clear_errors(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()
