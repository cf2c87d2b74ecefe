"""COCO mask AP, computed by pycocotools' own ``COCOeval`` so numbers match published ones.

Why not reimplement: COCO AP has many conventions (101 recall points, crowd matching, area ranges
on the GT's area, 100 detections per image, interpolated precision) and papers report what
``COCOeval`` prints; a reimplementation would drift. This module only converts predictions to the
result format, keeps pycocotools quiet and handles the cases it does not (no predictions at all).
Class-agnostic AP is COCOeval too, with ``params.useCats = 0`` (COCO's proposal scoring).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Sequence

import numpy as np
import pycocotools.coco
import pycocotools.cocoeval
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

AP_KEYS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""Keys of ``coco_mask_ap``'s result, in the order of ``COCOeval.stats[0:6]``."""
AGNOSTIC_KEYS: tuple[str, ...] = ("AP", "AP50", "AP75", "AP25")
"""Keys of ``coco_mask_ap_agnostic``'s result."""


def _to_numpy(x: object) -> np.ndarray:
    """Accept tensors (any device) as well as arrays and lists."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def encode_results(
    image_id: int,
    masks: np.ndarray | torch.Tensor,
    scores: Sequence[float] | np.ndarray | torch.Tensor,
    category_ids: Sequence[int] | np.ndarray | torch.Tensor,
) -> list[dict]:
    """Turn one image's predicted masks into COCO result dicts (compressed RLE).

    The dicts have no ``"bbox"`` key on purpose: ``COCO.loadRes`` treats results that carry a bbox
    as *box* results and would evaluate the boxes. ``counts`` is a ``str`` so the results can be
    written with ``json`` as they are.

    Args:
        image_id: COCO id of the image.
        masks: (P, H, W) bool/0-1 masks at the image's original size (``masks_to_original``).
        scores: (P,) confidence per mask; COCOeval ranks by it and keeps the top 100 per image.
        category_ids: (P,) COCO category ids (not class indices: map them through
            ``CocoInstances.category_ids``).

    Returns:
        P dicts ``{"image_id", "category_id", "segmentation": {"size": [H, W], "counts": str},
        "score"}``; an empty list when P = 0.
    """
    masks_np = _to_numpy(masks)
    scores_np = _to_numpy(scores).reshape(-1)
    cats_np = _to_numpy(category_ids).reshape(-1)
    if masks_np.ndim != 3:
        raise ValueError(f"masks must be (P, H, W), got shape {masks_np.shape}")
    num = masks_np.shape[0]
    if len(scores_np) != num or len(cats_np) != num:
        raise ValueError(
            f"need one score and one category id per mask: got {num} masks, {len(scores_np)} "
            f"scores and {len(cats_np)} category ids (image {image_id})"
        )
    if num == 0:
        return []
    # pycocotools wants (H, W, P) uint8 in Fortran order (column-major RLE).
    fortran = np.asfortranarray(masks_np.astype(bool).transpose(1, 2, 0).astype(np.uint8))
    rles = mask_utils.encode(fortran)
    results = []
    for rle, score, cat in zip(rles, scores_np, cats_np, strict=True):
        counts = rle["counts"]
        results.append(
            {
                "image_id": int(image_id),
                "category_id": int(cat),
                "segmentation": {
                    "size": [int(v) for v in rle["size"]],
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
                },
                "score": float(score),
            }
        )
    return results


@contextlib.contextmanager
def quiet_pycocotools():
    """Silence pycocotools' progress prints ("creating index...", COCOeval's summary table).

    Redirecting stdout is not enough: Ray Train workers replace ``print`` itself, so the modules'
    ``print`` is shadowed too for the duration.
    """
    modules = (pycocotools.coco, pycocotools.cocoeval)
    saved = [module.__dict__.get("print") for module in modules]  # not None when nested
    for module in modules:
        module.print = lambda *args, **kwargs: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for module, previous in zip(modules, saved, strict=True):
            if previous is None:
                del module.print
            else:
                module.print = previous


def _empty_results(coco_gt: COCO) -> COCO:
    """A result set with no detections, which ``loadRes`` cannot build (it reads ``anns[0]``)."""
    res = COCO()
    res.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with quiet_pycocotools():
        res.createIndex()
    return res


def coco_mask_ap(
    coco_gt: COCO,
    results: list[dict],
    image_ids: Sequence[int] | None = None,
    category_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """COCO mask AP of ``results`` against ``coco_gt``, with pycocotools' printing captured.

    Args:
        coco_gt: ground truth, e.g. ``CocoInstances.coco``.
        results: dicts as made by ``encode_results`` (any number of images); not modified.
        image_ids: evaluate only these images (e.g. the val subset that was predicted on);
            ``None`` evaluates every image of ``coco_gt``, where images without predictions count
            as misses.
        category_ids: evaluate only these COCO categories, e.g. ``CocoInstances.category_ids`` when
            a class subset is trained, so untrained categories do not count as AP 0; ``None``
            uses every category of ``coco_gt``.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` as fractions in [0, 1] (``stats[0:6]``).
        A value is ``nan`` where COCO leaves it undefined (-1): no non-crowd GT in that area
        range among the evaluated images and categories. With no results at all, every value
        that has GT is 0.0 and the rest are nan, exactly what ``COCOeval`` gives for categories
        without detections.

    Raises:
        ValueError: ``image_ids`` or a result's ``image_id`` is not an image of ``coco_gt``, or a
            result carries a ``bbox`` (it would be evaluated as a box).
    """
    evaluator = _evaluate(coco_gt, results, image_ids, category_ids, use_cats=True)
    with quiet_pycocotools():
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats[: len(AP_KEYS)]]
    return {key: (math.nan if v < 0 else v) for key, v in zip(AP_KEYS, stats, strict=True)}


def coco_mask_ap_agnostic(
    coco_gt: COCO,
    results: list[dict],
    image_ids: Sequence[int] | None = None,
    category_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """Class-agnostic COCO mask AP: ``COCOeval`` with ``params.useCats = 0``.

    Every GT instance of ``category_ids`` and every result are one class, as in COCO's proposal
    scoring: whether the masks are right, whatever the classes. With ``useCats = 0`` pycocotools
    still keeps only GT *and results* whose category is in ``params.catIds``, so give every result
    one of ``category_ids`` (which one does not matter).

    AP25 comes from the same run: 0.25 is added to ``params.iouThrs`` (each threshold is matched
    independently) and each value is read from ``eval["precision"]`` as ``summarize`` does (area
    "all", 100 detections), AP over the standard 0.50:0.95 only.

    Args and errors as ``coco_mask_ap``.

    Returns:
        ``{"AP", "AP50", "AP75", "AP25"}`` in [0, 1]; ``nan`` where there is no non-crowd GT.
    """
    evaluator = _evaluate(coco_gt, results, image_ids, category_ids, use_cats=False,
                          extra_iou=0.25)
    params = evaluator.params
    # (T, R, K, A, M): IoU thresholds, recall points, categories, area ranges, max detections
    precision = evaluator.eval["precision"][
        :, :, :, params.areaRngLbl.index("all"), params.maxDets.index(100)]
    standard = params.iouThrs >= 0.5
    values = {
        "AP": precision[standard],
        "AP50": precision[np.isclose(params.iouThrs, 0.5)],
        "AP75": precision[np.isclose(params.iouThrs, 0.75)],
        "AP25": precision[np.isclose(params.iouThrs, 0.25)],
    }
    return {key: float(v[v > -1].mean()) if (v > -1).any() else math.nan
            for key, v in values.items()}


def _evaluate(
    coco_gt: COCO,
    results: list[dict],
    image_ids: Sequence[int] | None,
    category_ids: Sequence[int] | None,
    use_cats: bool,
    extra_iou: float | None = None,
) -> COCOeval:
    """A ``COCOeval`` (segm) after ``evaluate`` and ``accumulate``, inputs checked."""
    known = set(coco_gt.getImgIds())
    if image_ids is not None:
        image_ids = [int(i) for i in image_ids]
        unknown = sorted(set(image_ids) - known)
        if unknown:
            raise ValueError(
                f"image_ids {unknown[:10]} are not images of the ground truth ({len(unknown)} "
                "unknown); pass ids from the same annotation file"
            )
    if results:
        unknown = sorted({int(r["image_id"]) for r in results} - known)
        if unknown:
            raise ValueError(
                f"results for image ids {unknown[:10]} that are not in the ground truth "
                f"({len(unknown)} unknown); were they predicted on another split?"
            )
        if any("bbox" in r for r in results):
            raise ValueError(
                "results must not carry a 'bbox' key: COCO.loadRes would evaluate them as boxes; "
                "build them with encode_results"
            )
        # loadRes writes area/bbox/id/iscrowd into the dicts it gets: give it copies, or a second
        # evaluation of the same list would see a 'bbox' and score boxes instead of masks.
        results = [{**r, "segmentation": dict(r["segmentation"])} for r in results]
    with quiet_pycocotools():
        coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.params.useCats = int(use_cats)
        if extra_iou is not None:
            evaluator.params.iouThrs = np.append(evaluator.params.iouThrs, extra_iou)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        if category_ids is not None:
            evaluator.params.catIds = sorted({int(c) for c in category_ids})
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator
