"""Image pathway: a small ResNet-style CNN and an FPN pixel decoder feeding the mask decoder.

Mask2Former's split, scaled down to run on CPU: the backbone gives feature maps at strides 4, 8,
16, ...; the pixel decoder fuses them top-down (FPN) into per-level D-wide maps. The transformer
decoder's queries attend to the coarse levels in turn, and masks are dot products of query
embeddings with the stride-4 pixel embeddings, so ``pred_masks`` is (B, M, H/4, W/4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm: batch statistics are useless at the small per-worker batches a search uses."""
    return nn.GroupNorm(min(8, channels), channels)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection (ResNet's basic block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), _norm(channels), nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), _norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.body(x))


class ImageBackbone(nn.Module):
    """Stem to stride 4, then one stage per extra entry of ``channels``, each halving resolution.

    Args:
        channels: width of each stage; stage s has stride 4 * 2**s.
        blocks: residual blocks per stage.
    """

    def __init__(self, channels: list[int], blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, stride=2, padding=1, bias=False), _norm(channels[0]),
            nn.GELU(),
            nn.Conv2d(channels[0], channels[0], 3, stride=2, padding=1, bias=False),
            _norm(channels[0]), nn.GELU(),
        )
        stages = []
        for s, width in enumerate(channels):
            down = [] if s == 0 else [
                nn.Conv2d(channels[s - 1], width, 3, stride=2, padding=1, bias=False),
                _norm(width), nn.GELU(),
            ]
            stages.append(nn.Sequential(*down, *(ResidualBlock(width) for _ in range(blocks))))
        self.stages = nn.ModuleList(stages)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) -> feature maps, finest (stride 4) first."""
        x = self.stem(images)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class PixelDecoder(nn.Module):
    """FPN: lateral 1x1 convs to D, top-down upsample + add, a 3x3 conv per level.

    Returns the stride-4 map as mask features and the coarser maps, coarsest first, as the
    levels the transformer decoder attends to.
    """

    def __init__(self, in_channels: list[int], dim: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.output = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), _norm(dim), nn.GELU())
            for _ in in_channels
        )
        self.mask_features = nn.Conv2d(dim, dim, 1)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """features, finest first -> (mask features (B, D, H/4, W/4), coarser levels, coarsest
        first)."""
        x = None
        fused = []
        for i in reversed(range(len(features))):
            lateral = self.lateral[i](features[i])
            if x is not None:
                lateral = lateral + F.interpolate(x, size=lateral.shape[-2:], mode="nearest")
            x = self.output[i](lateral)
            fused.append(x)  # coarsest first
        return self.mask_features(fused[-1]), fused[:-1]


def sine_position_2d(height: int, width: int, dim: int, device: torch.device) -> torch.Tensor:
    """DETR's fixed 2-D sine positional encoding, (height * width, dim), rows of the flattened map.

    Half the channels encode y, half x, each as sin/cos at geometric frequencies over [0, 2 pi].
    """
    quarter = dim // 4
    freqs = 10000 ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    ey = ys[:, None] * freqs[None]  # (H, quarter)
    ex = xs[:, None] * freqs[None]  # (W, quarter)
    pos_y = torch.cat([ey.sin(), ey.cos()], dim=1)[:, None, :].expand(height, width, -1)
    pos_x = torch.cat([ex.sin(), ex.cos()], dim=1)[None, :, :].expand(height, width, -1)
    pos = torch.cat([pos_y, pos_x], dim=-1).reshape(height * width, -1)
    return F.pad(pos, (0, dim - pos.shape[1]))  # dim not divisible by 4: zero-fill the rest
