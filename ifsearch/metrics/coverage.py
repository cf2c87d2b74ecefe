"""S3DIS instance-segmentation coverage, precision and recall (mCov, mWCov, mPrec, mRec).

S3DIS papers (SGPN introduced the metrics; ASIS, JSNet, 3D-BoNet, SoftGroup report them) do not
use ScanNet's AP but the numbers of ASIS's ``models/ASIS/eval_iou_accuracy.py``. This module
re-implements that script, vectorised, so results are comparable with published S3DIS tables.

Definitions, per class c (instances are compared only with instances of the same class):

* Coverage of a ground-truth (GT) instance = its largest IoU with any prediction of class c in the
  same room (0 when there is none).
* Per room with GT of class c: ``Cov = mean`` of its GT coverages and
  ``WCov = sum(cov * |gt|) / sum(|gt|)`` (weighted by GT point counts).
  ``Cov(c)`` and ``WCov(c)`` are the means over the rooms that have GT of class c.
* A prediction of class c is a true positive (TP) when its largest IoU with a GT instance of
  class c in its room is ``>= iou_threshold`` (note ``>=``; ScanNet AP uses ``>``). Matching is
  *not* one-to-one: two predictions that both overlap one GT enough are both TPs.
* ``Prec(c) = TP / #predictions`` and ``Rec(c) = TP / #GT``, both pooled over all rooms. The
  published script counts TP *predictions* in the recall numerator (``rec = tp / total_gt_ins``),
  not covered GT instances; this is implemented as published. With disjoint predictions (the
  script's per-point instance ids) the two counts agree except in IoU = 0.5 ties; with
  overlapping prediction masks, as a query-based model produces, several predictions can match
  one GT, and recall can then exceed 1. Remove duplicates (e.g. mask NMS) before evaluating if
  that matters.
* ``mCov``, ``mWCov``, ``mPrec``, ``mRec`` average the classes that have GT (NaN entries left out);
  they are NaN when no class has GT.

Departures from the script, which would crash or propagate NaN here:

* A class with GT but no prediction has precision 0.0, not the script's 0/0 = NaN (which made its
  ``np.mean`` over classes NaN): as in ``instance_ap``, finding nothing scores 0, and leaving the
  class out would let a model that predicts one class well score mPrec 1.
* A class without GT has NaN coverage and recall and is left out of every mean; its precision is
  still reported in ``per_class`` (0 when it has predictions, which are all false positives; NaN
  otherwise).
* GT instances with fewer than ``min_region_size`` points are dropped before evaluation (the
  script has no such filter; 0, the default, reproduces it). A prediction overlapping only such a
  GT is a false positive. Empty masks (0 points) are always dropped, and labels outside
  ``[0, num_classes)`` are void (GT) or dropped (predictions).
* Classes come from the ``labels`` given, not from a per-point majority vote: with (P, N) masks
  each instance already has one label.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from ifsearch.errors import DataError
from ifsearch.metrics.instance_ap import align_point_counts, as_numpy, mask_intersections

__all__ = ["s3dis_coverage"]


def _masks_and_labels(scene: Mapping[str, Any], what: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (M, N) bool masks and (M,) int64 labels; an empty input of any shape is (0, 0)."""
    masks = as_numpy(scene.get("masks", [])).astype(bool, copy=False)
    if masks.size == 0 and masks.ndim != 2:
        masks = np.zeros((0, 0), dtype=bool)
    if masks.ndim != 2:
        raise DataError(
            f"{what} masks must be a (num_instances, num_points) array, got shape {masks.shape}; "
            "stack one row per instance"
        )
    labels = as_numpy(scene.get("labels", []), np.int64).reshape(-1)
    if len(labels) != len(masks):
        raise DataError(
            f"got {len(masks)} {what} masks but {len(labels)} labels; every mask needs one label"
        )
    return masks, labels


def _room_stats(
    pred: Mapping[str, Any], gt: Mapping[str, Any], num_classes: int, t: float, min_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One room's contribution: per class ``(cov, wcov, tp, num_pred, num_gt)``, each (C,).

    ``cov`` and ``wcov`` are NaN for classes without GT in this room.
    """
    gt_masks, gt_labels = _masks_and_labels(gt, "ground-truth")
    pred_masks, pred_labels = _masks_and_labels(pred, "prediction")
    gt_masks, pred_masks = align_point_counts(
        gt_masks, pred_masks,
        hint=" (map predictions on voxels to the full room with masks[:, eval_index] first)",
    )
    gt_size = gt_masks.sum(1)
    keep = (gt_labels >= 0) & (gt_labels < num_classes) & (gt_size >= max(min_size, 1))
    gt_masks, gt_labels, gt_size = gt_masks[keep], gt_labels[keep], gt_size[keep]
    pred_size = pred_masks.sum(1)
    keep = (pred_labels >= 0) & (pred_labels < num_classes) & (pred_size > 0)
    pred_masks, pred_labels, pred_size = pred_masks[keep], pred_labels[keep], pred_size[keep]

    inter = mask_intersections(pred_masks, gt_masks).astype(np.float64)  # (P, K)
    union = pred_size[:, None] + gt_size[None, :] - inter  # > 0: both masks are non-empty
    same = pred_labels[:, None] == gt_labels[None, :]
    iou = np.where(same, inter / np.maximum(union, 1.0), 0.0)  # other-class pairs never match

    cov = iou.max(0, initial=0.0)  # (K,) coverage of each GT
    best = iou.max(1, initial=0.0)  # (P,) best same-class IoU of each prediction
    tp = (best >= t) & same.any(1)

    c = num_classes
    num_gt = np.bincount(gt_labels, minlength=c).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        room_cov = np.bincount(gt_labels, weights=cov, minlength=c) / num_gt
        room_wcov = np.bincount(gt_labels, weights=cov * gt_size, minlength=c) / np.bincount(
            gt_labels, weights=gt_size.astype(np.float64), minlength=c
        )
    num_tp = np.bincount(pred_labels, weights=tp.astype(np.float64), minlength=c)
    num_pred = np.bincount(pred_labels, minlength=c).astype(np.float64)
    return room_cov, room_wcov, num_tp, num_pred, num_gt


def _nanmean(x: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """Mean of the non-NaN entries; NaN (without a RuntimeWarning) where there are none."""
    valid = ~np.isnan(x)
    total = np.where(valid, x, 0.0).sum(axis)
    count = valid.sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total / count
    return float(out) if axis is None else out


def s3dis_coverage(
    predictions: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]],
    num_classes: int,
    iou_threshold: float = 0.5,
    min_region_size: int = 0,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """S3DIS instance metrics of ASIS's ``eval_iou_accuracy.py`` over a list of rooms.

    Args:
        predictions: one dict per room with ``"masks"`` (P, N) bool and ``"labels"`` (P,) class
            indices (``"scores"`` is accepted and ignored: the metrics do not rank). Torch tensors
            (any device) or numpy arrays. Evaluate on the full room: map voxel predictions with
            ``masks[:, eval_index]``.
        ground_truth: one dict per room with ``"masks"`` (K, N) bool and ``"labels"`` (K,).
        num_classes: number of evaluated classes C; other labels are ignored.
        iou_threshold: IoU a prediction needs (``>=``) to be a true positive; 0.5 in the papers.
        min_region_size: GT instances with fewer points are ignored (0: none, as the script).
        class_names: keys of ``per_class``; class indices when omitted.

    Returns:
        ``{"mCov", "mWCov", "mPrec", "mRec", "per_class": {name_or_id: {"Cov", "WCov", "Prec",
        "Rec", "num_gt", "num_pred", "num_tp"}}}``; see the module docstring for NaN rules.

    Raises:
        DataError: if the room lists differ in length or a room's arrays are inconsistent.
        ValueError: for an invalid ``num_classes``, ``iou_threshold`` or ``class_names``.
    """
    if len(predictions) != len(ground_truth):
        raise DataError(
            f"got predictions for {len(predictions)} rooms but ground truth for "
            f"{len(ground_truth)}; pass one entry per room, in the same order"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(
            f"num_classes={num_classes} but {len(class_names)} class_names were given; "
            "pass one name per class"
        )

    c = int(num_classes)
    covs, wcovs = [], []
    tp, num_pred, num_gt = np.zeros(c), np.zeros(c), np.zeros(c)
    for p, g in zip(predictions, ground_truth, strict=True):
        room_cov, room_wcov, room_tp, room_pred, room_gt = _room_stats(
            p, g, c, float(iou_threshold), int(min_region_size)
        )
        covs.append(room_cov)
        wcovs.append(room_wcov)
        tp += room_tp
        num_pred += room_pred
        num_gt += room_gt

    empty = np.full((0, c), np.nan)
    cov = _nanmean(np.array(covs) if covs else empty, axis=0)  # (C,), NaN: no GT anywhere
    wcov = _nanmean(np.array(wcovs) if wcovs else empty, axis=0)
    has_gt = num_gt > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(num_pred > 0, tp / num_pred, np.where(has_gt, 0.0, np.nan))
        rec = np.where(has_gt, tp / num_gt, np.nan)

    keys: list[Hashable] = list(range(c)) if class_names is None else list(class_names)
    per_class = {
        k: {
            "Cov": float(cov[i]),
            "WCov": float(wcov[i]),
            "Prec": float(prec[i]),
            "Rec": float(rec[i]),
            "num_gt": int(num_gt[i]),
            "num_pred": int(num_pred[i]),
            "num_tp": int(tp[i]),
        }
        for i, k in enumerate(keys)
    }
    gt_prec = np.where(has_gt, prec, np.nan)  # classes without GT are left out of mPrec
    return {
        "mCov": _nanmean(cov),
        "mWCov": _nanmean(wcov),
        "mPrec": _nanmean(gt_prec),
        "mRec": _nanmean(rec),
        "per_class": per_class,
    }
