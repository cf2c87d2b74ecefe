"""InfluencerFormer: the Mask2Former architecture on point clouds and on images."""

from __future__ import annotations

import torch
from torch import nn

from ifsearch.config import ModelConfig
from ifsearch.models.image_encoder import ImageBackbone, PixelDecoder, sine_position_2d
from ifsearch.models.mask_decoder import MaskDecoder
from ifsearch.models.point_encoder import PointEncoder


def _decoder(config: ModelConfig, num_classes: int, num_feature_levels: int = 0,
             mask_prob: str = "sigmoid") -> MaskDecoder:
    return MaskDecoder(
        dim=config.embed_dim,
        num_classes=num_classes,
        num_queries=config.num_queries,
        num_layers=config.decoder_layers,
        num_heads=config.num_heads,
        ffn_dim=config.ffn_dim,
        dropout=config.dropout,
        masked_attention=config.masked_attention,
        num_feature_levels=num_feature_levels,
        mask_prob=mask_prob,
    )


class InfluencerFormer(nn.Module):
    """Scenes (list of (N_i, 6) xyz+rgb) -> Mask2Former outputs.

    The architecture is the same whichever criterion trains it, so the Influencer Loss and the
    Hungarian baseline are compared on identical models.

    Args:
        config: model section of the config.
        num_classes: C real classes.
        in_dim: input channels per point.
        mask_prob: how masked attention reads the mask logits, as the criterion does ("sigmoid"
            or "softmax"; ``train.inference_mask_prob``).
    """

    def __init__(self, config: ModelConfig, num_classes: int, in_dim: int = 6,
                 mask_prob: str = "sigmoid") -> None:
        super().__init__()
        self.encoder = PointEncoder(in_dim, config.embed_dim, config.encoder_layers,
                                    config.k_neighbors)
        self.decoder = _decoder(config, num_classes, mask_prob=mask_prob)

    def forward(self, points: list[torch.Tensor]) -> dict:
        """points: per scene (N_i, in_dim) -> {"pred_logits", "pred_masks", "aux_outputs"}."""
        embeddings = [self.encoder(p) for p in points]  # B x (N_i, D)
        return self.decoder(embeddings, [p[:, :3] for p in points])


class ImageInfluencerFormer(nn.Module):
    """Images (B, 3, H, W) -> Mask2Former outputs with ``pred_masks`` (B, M, H/4, W/4).

    Backbone (``model.backbone_channels``, ``model.backbone_blocks``) + FPN pixel decoder + the
    same mask decoder as the point model, trained by the same criteria.

    Args:
        config: model section of the config.
        num_classes: C real classes.
        mask_prob: how masked attention reads the mask logits (see ``InfluencerFormer``).
    """

    def __init__(self, config: ModelConfig, num_classes: int, mask_prob: str = "sigmoid") -> None:
        super().__init__()
        channels = list(config.backbone_channels)
        self.backbone = ImageBackbone(channels, config.backbone_blocks)
        self.pixel_decoder = PixelDecoder(channels, config.embed_dim)
        self.decoder = _decoder(config, num_classes, num_feature_levels=len(channels) - 1,
                                mask_prob=mask_prob)

    def forward(self, images: torch.Tensor) -> dict:
        """images (B, 3, H, W), H and W divisible by 4 * 2**(stages - 1) for exact strides."""
        mask_features, levels = self.pixel_decoder(self.backbone(images))
        dim = mask_features.shape[1]
        positions = [sine_position_2d(*f.shape[-2:], dim, images.device).to(f.dtype)
                     for f in levels]
        return self.decoder.forward_images(levels, positions, mask_features)
