"""Models: EdgeConv point encoder and Mask2Former-style mask decoder."""

from ifsearch.models.influencerformer import InfluencerFormer
from ifsearch.models.mask_decoder import MaskDecoder
from ifsearch.models.point_encoder import PointEncoder, knn_indices

__all__ = ["InfluencerFormer", "MaskDecoder", "PointEncoder", "knn_indices"]
