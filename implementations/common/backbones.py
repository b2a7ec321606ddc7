"""Standard backbones in one import: ResNet-18/50, CIFAR ResNets, MobileNetV2, DeiT-S-like ViT.

The code lives in ``resnet.py``, ``mobilenet.py`` and ``vit.py``; this module only gathers the names.
"""

from implementations.common.mobilenet import ConvBNAct, InvertedResidual, MobileNetV2, mobilenet_v2
from implementations.common.resnet import (
    BasicBlock,
    Bottleneck,
    CifarResNet,
    PadShortcut,
    ResNet,
    cifar_resnet,
    resnet18,
    resnet50,
)
from implementations.common.vit import Attention, Block, Mlp, PatchEmbed, VisionTransformer, deit_small, vit

__all__ = [
    "Attention",
    "BasicBlock",
    "Block",
    "Bottleneck",
    "CifarResNet",
    "ConvBNAct",
    "InvertedResidual",
    "Mlp",
    "MobileNetV2",
    "PadShortcut",
    "PatchEmbed",
    "ResNet",
    "VisionTransformer",
    "cifar_resnet",
    "deit_small",
    "mobilenet_v2",
    "resnet18",
    "resnet50",
    "vit",
]
