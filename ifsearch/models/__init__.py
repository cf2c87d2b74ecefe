"""Models: point and image encoders feeding one Mask2Former-style mask decoder."""

from ifsearch.models.image_encoder import ImageBackbone, PixelDecoder, sine_position_2d
from ifsearch.models.influencerformer import ImageInfluencerFormer, InfluencerFormer
from ifsearch.models.mask_decoder import MaskDecoder
from ifsearch.models.point_encoder import PointEncoder, knn_indices

__all__ = [
    "ImageBackbone",
    "ImageInfluencerFormer",
    "InfluencerFormer",
    "MaskDecoder",
    "PixelDecoder",
    "PointEncoder",
    "knn_indices",
    "sine_position_2d",
]
