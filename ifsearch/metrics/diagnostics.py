"""Class-agnostic query diagnostics: duplicates, unclaimed instances, active queries.

AP alone hides *why* a set-prediction model is weak. The Influencer Loss, unlike Hungarian
matching, does not force a one-to-one assignment, so several queries may claim the same instance
(duplicates, which AP only punishes as lower-ranked false positives) while other instances are
claimed by none. These rates separate the two failure modes and are cheap enough to log every
validation step.

They measure the claims, not the class head: pass every query's non-empty mask (the ``claims`` of
``predict_instances``), with no score threshold. Counting only predictions whose class x mask
score passes a threshold made a model with perfect masks but a class head that says "no object"
everywhere read "unclaimed 1.0".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ifsearch.errors import DataError
from ifsearch.metrics.instance_ap import as_numpy, mask_intersections

__all__ = ["instance_diagnostics"]


def _pair_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of every (prediction, GT) pair of bool masks via one matrix product."""
    inter = mask_intersections(pred, gt).astype(np.float64)
    union = pred.sum(1)[:, None] + gt.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def instance_diagnostics(
    predictions: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]],
    iou_threshold: float = 0.5,
) -> dict[str, float | int]:
    """Measure how the predicted masks cover the GT instances, ignoring classes and scores.

    Args:
        predictions: one dict per scene with ``"masks"`` (P, N) bool, every one of which counts
            (e.g. one per query with a non-empty mask); torch tensors or numpy arrays. Scores
            and labels, if present, are ignored; ``{}`` means no prediction in that scene.
        ground_truth: one dict per scene with ``"masks"`` (K, N) bool.
        iou_threshold: a prediction claims a GT instance when IoU > this value (strict, as in AP).

    Returns:
        ``duplicate_rate``: fraction of GT instances claimed by more than one prediction.
        ``unclaimed_rate``: fraction of GT instances claimed by no prediction.
        ``active_queries``: mean number of predictions per scene.
        ``num_gt`` and ``num_pred``: totals over all scenes.
        Rates are 0.0 when there is no GT instance, and ``active_queries`` is 0.0 without scenes.
        GT masks with no point are not instances and are not counted.

    Raises:
        DataError: if the scene lists differ in length or masks cover different point counts.
    """
    if len(predictions) != len(ground_truth):
        raise DataError(
            f"got predictions for {len(predictions)} scenes but ground truth for "
            f"{len(ground_truth)}; pass one entry per scene, in the same order"
        )
    num_gt = num_pred = num_dup = num_unclaimed = 0
    for pred, gt in zip(predictions, ground_truth, strict=True):
        gt_masks = as_numpy(gt["masks"]).astype(bool)
        pred_masks = as_numpy(pred.get("masks", [])).astype(bool)
        num_pred += len(pred_masks)
        if gt_masks.size and gt_masks.ndim != 2:
            raise DataError(f"GT masks must be (instances, num_points), got {gt_masks.shape}")
        if gt_masks.size:
            gt_masks = gt_masks[gt_masks.any(1)]  # empty instances: instance_ap drops them too
        if gt_masks.size == 0:
            continue  # no GT instance in this scene: nothing to claim
        num_gt += len(gt_masks)
        if len(pred_masks) == 0:
            num_unclaimed += len(gt_masks)
            continue
        if pred_masks.ndim != 2 or pred_masks.shape[1] != gt_masks.shape[1]:
            raise DataError(
                f"got prediction masks of shape {pred_masks.shape} and GT masks of shape "
                f"{gt_masks.shape}; both must be (instances, num_points) arrays over the same "
                "points"
            )
        claims = (_pair_iou(pred_masks, gt_masks) > iou_threshold).sum(0)  # (K,) per GT
        num_dup += int((claims > 1).sum())
        num_unclaimed += int((claims == 0).sum())
    return {
        "duplicate_rate": num_dup / num_gt if num_gt else 0.0,
        "unclaimed_rate": num_unclaimed / num_gt if num_gt else 0.0,
        "active_queries": num_pred / len(predictions) if len(predictions) else 0.0,
        "num_gt": num_gt,
        "num_pred": num_pred,
    }
