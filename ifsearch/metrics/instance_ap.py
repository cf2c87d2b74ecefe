"""ScanNet-benchmark instance segmentation AP (AP, AP50, AP25), computed in memory.

This re-implements the protocol of ScanNet's ``BenchmarkScripts/3d_evaluation/
evaluate_semantic_instance.py`` (itself adapted from Cityscapes) so that numbers reported by the
search are comparable with published ScanNet results, without writing per-mask text files.

Protocol, per class and per IoU threshold ``t`` (0.50:0.05:0.90 for AP, 0.25 for AP25):

* A prediction *matches* a ground-truth (GT) instance of the same class when IoU > t (strict).
* GT instances with fewer than ``min_region_size`` points are not evaluated; predictions with fewer
  than ``min_region_size`` points are discarded before evaluation (ScanNet drops them on load).
* Greedy assignment, GT instances in order: each GT takes every not-yet-assigned prediction that
  matches it. The highest score among them is a true positive (TP) and every other one is a
  false positive (FP, "duplicate"). Only the first matching prediction (in prediction order) is
  marked as assigned, exactly as ScanNet does; this matters only when one prediction matches
  several GT instances, which is possible at t = 0.25. A GT with no match is a false negative.
* A prediction that matches no GT of its class (valid or too small) is an FP, unless the fraction
  of its points that are *ignored* exceeds t. Ignored points are void points (in no GT instance of
  an evaluated class) plus points of too-small GT instances of the prediction's class. Points of GT
  instances of other classes are *not* ignored, so a wrong-class prediction is an FP.
  This is the current official rule, ``void = ~isin(gt_ids // 1000, VALID_CLASS_IDS)``; early
  versions of the script tested ``isin(gt_ids, VALID_CLASS_IDS)``, which marked almost no point
  as void.
* AP integrates ScanNet's precision/recall curve: scores sorted ascending, one point per unique
  score, an artificial last point (recall 0, precision 1), step widths from
  ``np.convolve(recall, [-0.5, 0, 0.5], "valid")`` and ``AP = precision . widths``.
* A class with GT and predictions gets that AP; GT but no predictions gives 0; no GT gives NaN,
  which is left out of the means. AP is the mean over the nine thresholds from 0.5 to 0.9.
* Class-agnostic AP (``class_agnostic=True``, not part of the benchmark) runs the same protocol
  with every GT instance of an evaluated class and every prediction in one class, so it measures
  the masks alone; beside the class-aware AP it shows what the classes cost.

Departures, only where the official script would crash or cannot express the input:

* If a class has GT and predictions but every prediction is ignored or absorbed by a too-small GT
  (no TP or FP at all), the official script raises ``IndexError``; here the AP is 0.0 (nothing
  found).
* Empty masks (0 points) are dropped whatever ``min_region_size`` is: ScanNet cannot represent an
  empty GT instance, and an empty prediction would divide by zero.
* If no class has any GT, the overall AP, AP50 and AP25 are NaN ("undefined"), not 0, so an empty
  validation split cannot be mistaken for a model that found nothing.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ifsearch.errors import DataError

__all__ = ["AP_THRESHOLDS", "AP25_THRESHOLD", "as_numpy", "instance_ap", "mask_intersections"]

#: IoU thresholds averaged into AP: 0.50, 0.55, ..., 0.90 (0.95 is not included, as in ScanNet).
AP_THRESHOLDS: np.ndarray = np.arange(0.5, 0.95, 0.05)
#: Extra threshold reported as AP25.
AP25_THRESHOLD: float = 0.25


def as_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """Return ``x`` as a numpy array, accepting torch tensors on any device.

    The metrics run on CPU in numpy so they do not hold GPU memory between validation steps and
    give bit-identical results whatever device the model ran on.
    """
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    return arr if dtype is None else arr.astype(dtype, copy=False)


def mask_intersections(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the (A, B) int64 point counts of ``a[i] & b[j]`` for bool masks (A, N) and (B, N).

    One BLAS matrix product instead of a loop over mask pairs. float32 halves the memory traffic
    and is still exact: every partial sum is an integer below 2**24 when N < 2**24.
    """
    dtype = np.float32 if a.shape[1] < 2**24 else np.float64
    return np.rint(a.astype(dtype) @ b.astype(dtype).T).astype(np.int64)


def align_point_counts(gt_masks: np.ndarray, pred_masks: np.ndarray,
                       hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(K, N) and (P, N) masks of one scene over the same N points.

    An empty set of masks carries no point count, so it takes the other side's; different
    counts are a DataError (``hint`` says how to fix it).
    """
    num_points = max(gt_masks.shape[1], pred_masks.shape[1])
    if len(gt_masks) == 0:
        gt_masks = gt_masks.reshape(0, num_points)
    if len(pred_masks) == 0:
        pred_masks = pred_masks.reshape(0, num_points)
    if pred_masks.shape[1] != gt_masks.shape[1]:
        raise DataError(
            f"prediction masks cover {pred_masks.shape[1]} points but ground-truth masks cover "
            f"{gt_masks.shape[1]}; both must index the same points of the scene{hint}"
        )
    return gt_masks, pred_masks


def _as_masks(x: Any, what: str) -> np.ndarray:
    """Return a (M, N) bool array; an empty input of any shape, e.g. ``[]``, becomes (0, 0)."""
    masks = as_numpy(x).astype(bool, copy=False)
    if masks.size == 0 and masks.ndim != 2:
        return np.zeros((0, 0), dtype=bool)
    if masks.ndim != 2:
        raise DataError(
            f"{what} must be a (num_instances, num_points) array, got shape {masks.shape}; "
            "stack one row per instance"
        )
    return masks


@dataclass
class _ClassScene:
    """Everything one (scene, class) pair contributes, independent of the IoU threshold."""

    iou: np.ndarray  # (P, K) IoU of kept predictions with all GT of this class
    scores: np.ndarray  # (P,) float64
    gt_valid: np.ndarray  # (K,) bool: large enough to be evaluated
    ignore_fraction: np.ndarray  # (P,) fraction of each prediction's points that are ignored


def _prepare_scene(
    pred: Mapping[str, Any], gt: Mapping[str, Any], num_classes: int, min_region_size: int,
    class_agnostic: bool = False,
) -> dict[int, _ClassScene]:
    """Compute intersections, IoUs and ignore fractions for one scene, all classes at once."""
    gt_masks = _as_masks(gt["masks"], "ground_truth masks")
    pred_masks = _as_masks(pred.get("masks", []), "prediction masks")
    gt_masks, pred_masks = align_point_counts(gt_masks, pred_masks)
    gt_labels = as_numpy(gt["labels"], np.int64).reshape(-1)
    scores = as_numpy(pred.get("scores", []), np.float64).reshape(-1)
    if class_agnostic:  # one class: GT of evaluated classes -> 0, the others stay void
        gt_labels = np.where((gt_labels >= 0) & (gt_labels < num_classes), 0, -1)
        pred_labels = np.zeros(len(pred_masks), dtype=np.int64)
        num_classes = 1
    else:
        pred_labels = as_numpy(pred.get("labels", []), np.int64).reshape(-1)
    if len(gt_labels) != len(gt_masks) or not len(scores) == len(pred_labels) == len(pred_masks):
        raise DataError(
            f"got {len(pred_masks)} prediction masks, {len(scores)} scores, {len(pred_labels)} "
            f"labels and {len(gt_masks)} GT masks with {len(gt_labels)} labels; "
            "every mask needs exactly one label (and predictions one score)"
        )

    # GT of unknown classes (e.g. -1 / 255 "ignore" labels) are void, like non-benchmark classes.
    gt_count = gt_masks.sum(1)
    gt_keep = (gt_labels >= 0) & (gt_labels < num_classes) & (gt_count > 0)
    gt_masks, gt_labels, gt_count = gt_masks[gt_keep], gt_labels[gt_keep], gt_count[gt_keep]
    pred_count = pred_masks.sum(1)
    pred_keep = (pred_labels >= 0) & (pred_labels < num_classes)
    pred_keep &= pred_count >= max(min_region_size, 1)
    pred_masks, pred_labels = pred_masks[pred_keep], pred_labels[pred_keep]
    scores, pred_count = scores[pred_keep], pred_count[pred_keep]

    void = ~gt_masks.any(0)
    counts = mask_intersections(pred_masks, np.vstack([gt_masks, void[None]]))
    inter, void_inter = counts[:, :-1].astype(np.float64), counts[:, -1]  # (P, K), (P,)
    union = gt_count[None, :] + pred_count[:, None] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    gt_valid = gt_count >= min_region_size

    out: dict[int, _ClassScene] = {}
    for c in np.union1d(np.unique(gt_labels), np.unique(pred_labels)):
        p_idx = np.flatnonzero(pred_labels == c)
        g_idx = np.flatnonzero(gt_labels == c)
        small = ~gt_valid[g_idx]
        ignored = void_inter[p_idx] + inter[np.ix_(p_idx, g_idx[small])].sum(1)
        out[int(c)] = _ClassScene(
            iou=iou[np.ix_(p_idx, g_idx)],
            scores=scores[p_idx],
            gt_valid=gt_valid[g_idx],
            ignore_fraction=ignored / pred_count[p_idx],
        )
    return out


def _score_scene(cs: _ClassScene, t: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Return (y_true, y_score, hard_false_negatives) of one (scene, class) at threshold ``t``."""
    match = cs.iou > t  # (P, K), all GT of the class (small ones absorb predictions too)
    cand = match[:, cs.gt_valid]  # (P, Kv)
    tp_scores: list[float] = []
    fp_scores: list[np.ndarray] = []
    if cand.size == 0:
        matched = np.zeros(cand.shape[1], dtype=bool)
    elif (cand.sum(1) <= 1).all():
        # Fast path: no prediction is a candidate of two GT, so the greedy order cannot matter.
        matched = cand.any(0)
        score_mat = np.where(cand, cs.scores[:, None], -np.inf)
        best = score_mat.argmax(0)
        cols = np.flatnonzero(matched)
        tp_scores = list(cs.scores[best[cols]])
        dup = cand.copy()
        dup[best[cols], cols] = False
        fp_scores.append(cs.scores[np.nonzero(dup)[0]])
    else:
        # ScanNet's greedy loop: GT in order; the first (in prediction order) candidate is
        # marked assigned, the best-scoring candidate is the TP, the other candidates are FPs.
        assigned = np.zeros(cand.shape[0], dtype=bool)
        matched = np.zeros(cand.shape[1], dtype=bool)
        for k in range(cand.shape[1]):
            idx = np.flatnonzero(cand[:, k] & ~assigned)
            if idx.size == 0:
                continue
            matched[k] = True
            assigned[idx[0]] = True
            s = cs.scores[idx]
            best = int(s.argmax())
            tp_scores.append(float(s[best]))
            fp_scores.append(np.delete(s, best))
    unmatched = ~match.any(1)
    fp_scores.append(cs.scores[unmatched & (cs.ignore_fraction <= t)])
    fp = np.concatenate(fp_scores)
    y_score = np.concatenate([np.asarray(tp_scores, dtype=np.float64), fp])
    y_true = np.concatenate([np.ones(len(tp_scores)), np.zeros(len(fp))])
    return y_true, y_score, int((~matched).sum())


def _average_precision(y_true: np.ndarray, y_score: np.ndarray, hard_fn: int) -> float:
    """ScanNet's area under the precision/recall curve (not the interpolated VOC/COCO variant)."""
    if y_score.size == 0:
        return 0.0  # official script crashes here; nothing was found, so AP is 0
    order = np.argsort(y_score)
    y_score, y_true = y_score[order], y_true[order]
    cumsum = np.cumsum(y_true)
    _, first = np.unique(y_score, return_index=True)
    num_true = cumsum[-1]
    below = np.concatenate(([0.0], cumsum))[first]  # TPs scoring strictly below each threshold
    tp = num_true - below
    fp = len(y_score) - first - tp
    precision = np.append(tp / (tp + fp), 1.0)
    recall = np.append(tp / (num_true + hard_fn), 0.0)
    recall_for_conv = np.concatenate(([recall[0]], recall, [0.0]))
    step_widths = np.convolve(recall_for_conv, [-0.5, 0.0, 0.5], "valid")
    return float(np.dot(precision, step_widths))


def _nanmean(x: np.ndarray) -> float:
    """Mean of the non-NaN entries, NaN (without a RuntimeWarning) when there are none."""
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def _infer_num_classes(
    predictions: Sequence[Mapping[str, Any]], ground_truth: Sequence[Mapping[str, Any]]
) -> int:
    labels = [as_numpy(g["labels"], np.int64).reshape(-1) for g in ground_truth]
    labels += [as_numpy(p.get("labels", []), np.int64).reshape(-1) for p in predictions]
    top = max((int(x.max()) for x in labels if x.size), default=-1)
    return top + 1


def instance_ap(
    predictions: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]],
    min_region_size: int = 100,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    class_agnostic: bool = False,
) -> dict[str, Any]:
    """ScanNet-benchmark instance segmentation AP over a list of scenes.

    Args:
        predictions: one dict per scene with ``"masks"`` (P, N) bool, ``"scores"`` (P,) and
            ``"labels"`` (P,) class indices. Torch tensors (any device) or numpy arrays.
        ground_truth: one dict per scene with ``"masks"`` (K, N) bool and ``"labels"`` (K,).
            Points in no GT mask are void. GT labels outside ``[0, num_classes)`` are treated as
            void too, so an ignore label such as -1 or 255 can mark "do not care" regions.
        min_region_size: GT instances and predictions with fewer points are not evaluated
            (ScanNet uses 100 mesh vertices).
        num_classes: number of evaluated classes; predictions with labels outside the range are
            dropped. Defaults to ``len(class_names)``, else to the largest label seen plus one.
        class_names: keys for ``per_class``; class indices are used when omitted.
        class_agnostic: the same protocol with every GT instance of an evaluated class and every
            prediction in one class (prediction labels are ignored and may be absent): whether
            the masks are right, whatever the classes. GT of other labels stay void.

    Returns:
        ``{"AP", "AP50", "AP25", "per_class": {name_or_id: {"AP", "AP50", "AP25"}}}``. Per-class
        values are NaN for classes without (large enough) GT; the overall values average the
        classes that have GT and are NaN when none has. With ``class_agnostic`` ``per_class``
        has the single key ``"agnostic"``.

    Raises:
        DataError: if the scene lists differ in length or a scene's arrays are inconsistent.
    """
    if len(predictions) != len(ground_truth):
        raise DataError(
            f"got predictions for {len(predictions)} scenes but ground truth for "
            f"{len(ground_truth)}; pass one entry per scene, in the same order"
        )
    if class_names is not None:
        if num_classes is not None and num_classes != len(class_names):
            raise DataError(
                f"num_classes={num_classes} but {len(class_names)} class_names were given; "
                "pass one name per class or omit num_classes"
            )
        num_classes = len(class_names)
    if num_classes is None:
        num_classes = _infer_num_classes(predictions, ground_truth)

    scenes = [
        _prepare_scene(p, g, num_classes, min_region_size, class_agnostic)
        for p, g in zip(predictions, ground_truth, strict=True)
    ]
    keys: list[Hashable] = list(range(num_classes)) if class_names is None else list(class_names)
    if class_agnostic:
        num_classes, keys = 1, ["agnostic"]
    thresholds = np.append(AP_THRESHOLDS, AP25_THRESHOLD)
    ap = np.full((num_classes, len(thresholds)), np.nan)
    for c in range(num_classes):
        parts = [s[c] for s in scenes if c in s]
        has_gt = any(cs.gt_valid.any() for cs in parts)
        has_pred = any(len(cs.scores) for cs in parts)
        if not has_gt:
            continue
        if not has_pred:
            ap[c] = 0.0
            continue
        for ti, t in enumerate(thresholds):
            results = [_score_scene(cs, float(t)) for cs in parts]
            y_true = np.concatenate([r[0] for r in results])
            y_score = np.concatenate([r[1] for r in results])
            ap[c, ti] = _average_precision(y_true, y_score, sum(r[2] for r in results))

    n_ap = len(AP_THRESHOLDS)
    i50 = 0  # AP_THRESHOLDS[0] == 0.5; column n_ap holds 0.25
    class_ap = ap[:, :n_ap].mean(1)  # NaN rows stay NaN
    per_class = {
        k: {"AP": float(class_ap[c]), "AP50": float(ap[c, i50]), "AP25": float(ap[c, n_ap])}
        for c, k in enumerate(keys)
    }
    return {
        "AP": _nanmean(class_ap),
        "AP50": _nanmean(ap[:, i50]),
        "AP25": _nanmean(ap[:, n_ap]),
        "per_class": per_class,
    }
