"""InfluencerFormer: point encoder + mask decoder, the Mask2Former architecture on point clouds."""

from __future__ import annotations

import torch
from torch import nn

from ifsearch.config import ModelConfig
from ifsearch.models.mask_decoder import MaskDecoder
from ifsearch.models.point_encoder import PointEncoder


class InfluencerFormer(nn.Module):
    """Scenes (list of (N_i, 6) xyz+rgb) -> Mask2Former outputs.

    The architecture is the same whichever criterion trains it, so the Influencer Loss and the
    Hungarian baseline are compared on identical models.

    Args:
        config: model section of the config.
        num_classes: C real classes.
        in_dim: input channels per point.
    """

    def __init__(self, config: ModelConfig, num_classes: int, in_dim: int = 6) -> None:
        super().__init__()
        self.encoder = PointEncoder(in_dim, config.embed_dim, config.encoder_layers,
                                    config.k_neighbors)
        self.decoder = MaskDecoder(
            dim=config.embed_dim,
            num_classes=num_classes,
            num_queries=config.num_queries,
            num_layers=config.decoder_layers,
            num_heads=config.num_heads,
            ffn_dim=config.ffn_dim,
            dropout=config.dropout,
            masked_attention=config.masked_attention,
        )

    def forward(self, points: list[torch.Tensor]) -> dict:
        """points: per scene (N_i, in_dim) -> {"pred_logits", "pred_masks", "aux_outputs"}."""
        embeddings = [self.encoder(p) for p in points]  # B x (N_i, D)
        return self.decoder(embeddings, [p[:, :3] for p in points])
