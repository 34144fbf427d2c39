"""A tiny Vision Transformer (ViT) for the digits zoo and 32×32 CIFAR input, in the layout of timm's
``VisionTransformer`` (``timm/models/vision_transformer.py``) and DeiT's ``DistilledVisionTransformer``
(github:facebookresearch/deit ``models.py``): a patch embedding (a conv of kernel and stride ``patch_size``), a
class token, an optional distillation token, learned position embeddings, pre-norm blocks
``x + attn(norm1(x))``, ``x + mlp(norm2(x))``, a final LayerNorm and a linear head on the class token (and, with the
distillation token, a second head ``head_dist`` on it).

Feature taps (:class:`~kdkernels.distill.FeaturePoints`, ``model.kd_points``):

* ``stages``: every block's output tokens ``blocks.<i>`` ([B, tokens, dim]: class token first, then the distillation
  token where there is one, then the patches; ``model.num_prefix_tokens`` counts the leading non-patch tokens);
* ``attention``: every block's softmax attention probabilities ``blocks.<i>.attn.softmax`` ([B, heads, tokens,
  tokens], each row sums to 1);
* ``embedding``: ``head/input`` (the normalised class token); ``classifier``: ``head``.

The forward returns one logits tensor in every mode. With a distillation token it is DeiT's inference output, the
mean of the two heads, ``(head(cls) + head_dist(dist)) / 2``; DeiT's training outputs (the two heads apart, which
the official model returns as a tuple in training mode) are the taps ``head`` and ``head_dist``, which is how the
``deit`` method reads them. A method that trains the forward's output trains both heads through their mean.

Initialisation as timm's (``trunc_normal_(std=.02)`` for the tokens, the position embedding and every Linear, zero
biases, LayerNorms at (1, 0)); LayerNorm eps 1e-6 as DeiT's models; no dropout.
"""
from __future__ import annotations

import torch
from torch import nn

from kdkernels.distill.recipe import FeaturePoints


class Attention(nn.Module):
    """Multi-head self-attention: ``qkv`` (one Linear), ``softmax(q·kᵀ/√d_head)`` through the ``softmax`` module
    (its output is the attention tap), the weighted values, and the output projection ``proj``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Attention: dim ({dim}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.softmax = nn.Softmax(dim=-1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attention = self.softmax((q * self.scale) @ k.transpose(-2, -1))
        return self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (Linear, GELU, Linear)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """A ViT on ``in_channels × image_size × image_size`` images cut into ``patch_size`` patches: ``depth`` blocks of
    width ``dim`` and ``heads`` heads; ``distilled=True`` adds DeiT's distillation token and its head ``head_dist``
    (see the module docstring for the forward and the taps)."""

    def __init__(self, image_size: int = 8, patch_size: int = 2, in_channels: int = 1, num_classes: int = 10,
                 dim: int = 32, depth: int = 2, heads: int = 2, mlp_ratio: float = 2.0, distilled: bool = False):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"VisionTransformer: image_size ({image_size}) must be a multiple of patch_size "
                             f"({patch_size})")
        self.image_size, self.in_channels, self.distilled = image_size, in_channels, distilled
        self.num_patches = (image_size // patch_size) ** 2
        self.num_prefix_tokens = 2 if distilled else 1
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + self.num_prefix_tokens, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.head_dist = nn.Linear(dim, num_classes) if distilled else None
        for token in (self.cls_token, self.dist_token, self.pos_embed):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)
        self.apply(_init_weights)
        self.kd_points = FeaturePoints(stages=[f"blocks.{i}" for i in range(depth)], embedding="head/input",
                                       classifier="head",
                                       attention=[f"blocks.{i}.attn.softmax" for i in range(depth)])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised tokens after the last block, [B, prefix tokens + patches, dim]."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"VisionTransformer: expected input [B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}], got {list(x.shape)}")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*prefix, x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(x)
        logits = self.head(tokens[:, 0])
        if self.head_dist is None:
            return logits
        return (logits + self.head_dist(tokens[:, 1])) / 2


def _init_weights(module: nn.Module) -> None:
    """timm's ViT init: truncated normal (std .02) Linear weights and zero biases; LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def is_distilled(model: nn.Module) -> bool:
    """Whether ``model`` is a ViT with DeiT's distillation token and head."""
    return isinstance(model, VisionTransformer) and model.distilled


# sizes: student dim 32, 2 blocks, 2 heads; teacher dim 64, 4 blocks, 4 heads (MLP ratio 2)
STUDENT = dict(dim=32, depth=2, heads=2)
TEACHER = dict(dim=64, depth=4, heads=4)
DIGITS = dict(image_size=8, patch_size=2, in_channels=1)     # 16 patches of 2×2
CIFAR = dict(image_size=32, patch_size=4, in_channels=3)     # 64 patches of 4×4


def builder(size: dict, image: dict, distilled: bool = False):
    """``num_classes -> VisionTransformer`` for a zoo name."""
    return lambda num_classes: VisionTransformer(num_classes=num_classes, distilled=distilled, **image, **size)


MODELS = {
    "student-vit": builder(STUDENT, DIGITS),
    "student-vit-distilled": builder(STUDENT, DIGITS, distilled=True),
    "teacher-vit": builder(TEACHER, DIGITS),
    "student-vit-cifar": builder(STUDENT, CIFAR),
    "student-vit-distilled-cifar": builder(STUDENT, CIFAR, distilled=True),
    "teacher-vit-cifar": builder(TEACHER, CIFAR),
}
