"""Vision Transformer (DeiT layout) in plain PyTorch; attention through ``F.scaled_dot_product_attention``.

``deit_small()`` is DeiT-S (Touvron et al. 2021): patch 16, dim 384, depth 12, 6 heads, MLP ratio 4,
a class token, learned position embeddings, 224x224 input; 22,050,664 params and 4.60 G MACs.
Module names follow timm (``patch_embed.proj``, ``blocks.0.attn.qkv``, ``blocks.0.mlp.fc1``, ``norm``)
except the classifier, ``fc`` (``head(tokens)`` is the method below). Stochastic depth and dropout are
left out (inference-time reference).

For dynamic methods (token pruning, halting, early exit, MoE): ``stem(x)`` embeds the image into tokens,
``blocks`` is an ``nn.ModuleList``, and each ``Block`` exposes ``attn_residual(x)`` and
``mlp_residual(x)`` (the two branches before their residual adds), so a method can run them on a
gathered subset of tokens; ``head(tokens)`` reads the class token (index 0) only, so any token
subset that keeps index 0 works. Attention costs ``2 N^2 dim`` MACs per block and shrinks with N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Non-overlapping patches (a ``p x p``, stride-``p`` conv): ``(B, C, H, W) -> (B, HW/p^2, dim)``."""

    def __init__(self, img_size: int, patch: int, in_channels: int, dim: int) -> None:
        super().__init__()
        if img_size % patch:
            raise ValueError(f"img_size: {img_size} is not a multiple of patch={patch}")
        self.img_size, self.patch = img_size, patch
        self.num_patches = (img_size // patch) ** 2
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"x: expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: ``(B, N, dim) -> (B, N, dim)``; ``mask`` as in SDPA's ``attn_mask``."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: dim={dim} is not divisible by heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2``: ``(..., dim) -> (..., dim)`` through ``hidden`` units."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``+ mlp(norm2(x))``; ``(B, N, dim)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def attn_residual(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The attention branch, before its residual add."""
        return self.attn(self.norm1(x), mask)

    def mlp_residual(self, x: Tensor) -> Tensor:
        """The MLP branch, before its residual add (token-wise: any token subset may be passed)."""
        return self.mlp(self.norm2(x))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn_residual(x, mask)
        return x + self.mlp_residual(x)


class VisionTransformer(nn.Module):
    """ViT with a class token: ``(B, in_channels, img_size, img_size) -> (B, num_classes)``."""

    def __init__(
        self,
        img_size: int = 224,
        patch: int = 16,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        in_channels: int = 3,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth: must be >= 1, got {depth}")
        self.dim = self.num_features = dim
        self.patch_embed = PatchEmbed(img_size, patch, in_channels, dim)
        self.num_tokens = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        self._init()

    def _init(self) -> None:
        """DeiT's init: truncated normal (std 0.02) for embeddings and Linear weights, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, 1 + N, dim)``: patch embedding, class token prepended, positions added."""
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed

    def head(self, tokens: Tensor) -> Tensor:
        """``(B, n, dim) -> (B, num_classes)`` from the class token (index 0) after the final norm."""
        return self.fc(self.norm(tokens[:, 0]))

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, 1 + N, dim)`` tokens after the last block (before the final norm)."""
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def vit(
    img_size: int = 32,
    patch: int = 4,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 4.0,
    num_classes: int = 10,
    in_channels: int = 3,
    qkv_bias: bool = True,
) -> VisionTransformer:
    """A configurable ViT; the defaults are a small CPU-friendly model (64 tokens + class token)."""
    return VisionTransformer(
        img_size, patch, dim, depth, heads, mlp_ratio, num_classes, in_channels, qkv_bias
    )


def deit_small(num_classes: int = 1000, img_size: int = 224, in_channels: int = 3) -> VisionTransformer:
    """DeiT-S: patch 16, dim 384, depth 12, 6 heads, MLP ratio 4 (22,050,664 params, 4.60 G MACs at 224)."""
    return VisionTransformer(img_size, 16, 384, 12, 6, 4.0, num_classes, in_channels)
