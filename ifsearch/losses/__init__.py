"""Criteria: the Influencer Loss and the Mask2Former Hungarian baseline, one calling convention."""

from __future__ import annotations

from torch import nn

from ifsearch.config import LossConfig
from ifsearch.losses.criterion import InfluencerCriterion
from ifsearch.losses.hungarian import HungarianCriterion, HungarianMatcher
from ifsearch.losses.influencer import MaskInfluencerLoss, mask_log_probs

__all__ = [
    "HungarianCriterion",
    "HungarianMatcher",
    "InfluencerCriterion",
    "MaskInfluencerLoss",
    "build_criterion",
    "mask_log_probs",
]


def build_criterion(config: LossConfig, num_classes: int) -> nn.Module:
    """The criterion named by ``config.name`` ("influencer" | "hungarian") with its weights."""
    if config.name == "influencer":
        return InfluencerCriterion(
            num_classes=num_classes,
            attr_weight=config.attr_weight,
            rep_weight=config.rep_weight,
            bg_weight=config.bg_weight,
            margin=config.margin,
            temperature=config.temperature,
            mask_prob=config.mask_prob,
            class_weight=config.class_weight,
            no_object_weight=config.no_object_weight,
            claim_threshold=config.claim_threshold,
            deep_supervision=config.deep_supervision,
            class_target=config.class_target,
            mean=config.mean,
            spill_weight=config.spill_weight,
            duplicate_weight=config.duplicate_weight,
        )
    if config.name == "hungarian":
        matcher = HungarianMatcher(
            cost_class=config.cost_class,
            cost_mask=config.cost_mask,
            cost_dice=config.cost_dice,
            num_points=config.num_points,
        )
        return HungarianCriterion(
            num_classes=num_classes,
            matcher=matcher,
            class_weight=config.class_weight,
            mask_weight=config.mask_weight,
            dice_weight=config.dice_weight,
            no_object_weight=config.no_object_weight,
            num_points=config.num_points,
            deep_supervision=config.deep_supervision,
        )
    raise ValueError(f"loss.name must be 'influencer' or 'hungarian', got {config.name!r}")
