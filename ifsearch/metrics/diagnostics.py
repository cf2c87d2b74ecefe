"""Class-agnostic query diagnostics: duplicates, unclaimed instances, active queries.

AP alone hides *why* a set-prediction model is weak. The Influencer Loss, unlike Hungarian
matching, does not force a one-to-one assignment, so several queries may claim the same instance
(duplicates, which AP only punishes as lower-ranked false positives) while other instances are
claimed by none. These rates separate the two failure modes and are cheap enough to log every
validation step.
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
    score_threshold: float = 0.5,
) -> dict[str, float | int]:
    """Measure how confident queries cover the GT instances, ignoring class labels.

    Args:
        predictions: one dict per scene with ``"masks"`` (P, N) bool and ``"scores"`` (P,);
            torch tensors or numpy arrays. Labels, if present, are ignored; ``{}`` means no
            prediction in that scene.
        ground_truth: one dict per scene with ``"masks"`` (K, N) bool.
        iou_threshold: a prediction claims a GT instance when IoU > this value (strict, as in AP).
        score_threshold: only predictions with score >= this value count, i.e. the queries a
            deployed model would actually output.

    Returns:
        ``duplicate_rate``: fraction of GT instances claimed by more than one prediction.
        ``unclaimed_rate``: fraction of GT instances claimed by no prediction.
        ``active_queries``: mean number of kept predictions per scene.
        ``num_gt`` and ``num_pred``: totals over all scenes (kept predictions only).
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
        keep = as_numpy(pred.get("scores", []), np.float64).reshape(-1) >= score_threshold
        num_pred += int(keep.sum())
        if gt_masks.size and gt_masks.ndim != 2:
            raise DataError(f"GT masks must be (instances, num_points), got {gt_masks.shape}")
        if gt_masks.size:
            gt_masks = gt_masks[gt_masks.any(1)]  # empty instances: instance_ap drops them too
        if gt_masks.size == 0:
            continue  # no GT instance in this scene: nothing to claim
        num_gt += len(gt_masks)
        if not keep.any():
            num_unclaimed += len(gt_masks)
            continue
        if pred_masks.shape != (len(keep), gt_masks.shape[1]):
            raise DataError(
                f"got prediction masks of shape {pred_masks.shape} for {len(keep)} scores and GT "
                f"masks of shape {gt_masks.shape}; both must be (instances, num_points) arrays "
                "over the same points, with one score per prediction"
            )
        claims = (_pair_iou(pred_masks[keep], gt_masks) > iou_threshold).sum(0)  # per GT
        num_dup += int((claims > 1).sum())
        num_unclaimed += int((claims == 0).sum())
    return {
        "duplicate_rate": num_dup / num_gt if num_gt else 0.0,
        "unclaimed_rate": num_unclaimed / num_gt if num_gt else 0.0,
        "active_queries": num_pred / len(predictions) if len(predictions) else 0.0,
        "num_gt": num_gt,
        "num_pred": num_pred,
    }
