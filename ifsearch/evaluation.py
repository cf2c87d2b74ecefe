"""Validation metrics per dataset, as streaming evaluators (detectron2's process/evaluate split).

* Point clouds (synthetic, S3DIS): ScanNet-protocol AP / AP50 / AP25 and the query diagnostics;
  S3DIS adds the coverage metrics mCov, mWCov, mPrec, mRec, all on every original room point.
* Images (COCO): pycocotools mask AP (AP, AP50, AP75, APs, APm, APl) on masks resampled to each
  image's original size, plus the same query diagnostics at the model's mask resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ifsearch.data.coco import masks_to_original
from ifsearch.losses.common import per_scene_target_masks
from ifsearch.metrics import instance_ap, instance_diagnostics
from ifsearch.metrics.coco_eval import coco_mask_ap, encode_results
from ifsearch.metrics.coverage import s3dis_coverage


def finite(value: float | None) -> float:
    """AP is NaN when no class has ground truth; report 0 so schedulers can compare trials."""
    return 0.0 if value is None or math.isnan(value) else float(value)


def _diagnostics(predictions: list[dict], ground_truth: list[dict], threshold: float) -> dict:
    diag = instance_diagnostics(predictions, ground_truth, score_threshold=threshold)
    return {k: diag[k] for k in ("duplicate_rate", "unclaimed_rate", "active_queries")}


class _Lazy(Sequence):
    """A sequence whose items are built when read, so at most one full room is in memory.

    The metrics iterate scene by scene; whole S3DIS rooms (up to ~1M points x ~100 masks) would
    need gigabytes if every room's full-resolution masks were kept for the whole split.
    """

    def __init__(self, items: list, build: Callable[[Any], dict]) -> None:
        self.items, self.build = items, build

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.build(self.items[index])


class PointCloudEvaluator:
    """ScanNet AP + diagnostics (+ S3DIS coverage) over point-cloud scenes.

    Scenes evaluated at full resolution (``batch["eval_targets"]``: the model saw voxels) keep
    their predictions per voxel, the voxel of every original point and the ground truth as one
    instance id per point; full masks are rebuilt one room at a time while the metrics run.

    Args:
        class_names: the dataset's classes, in class-index order.
        min_region_size: ScanNet's minimum instance size for AP.
        score_threshold: predictions counted by the diagnostics and the coverage metrics.
        coverage: also compute the S3DIS coverage metrics.
    """

    def __init__(self, class_names: list[str], min_region_size: int, score_threshold: float,
                 coverage: bool = False) -> None:
        self.class_names = list(class_names)
        self.min_region_size = min_region_size
        self.score_threshold = score_threshold
        self.coverage = coverage
        self.scenes: list[tuple[dict, dict]] = []  # (prediction, ground truth), compact

    def process(self, batch: dict, outputs: dict, predictions: list[dict]) -> None:
        """Keep one batch's predictions and ground truth (on CPU)."""
        full = batch.get("eval_targets")
        for i, pred in enumerate(predictions):
            pred = {k: pred[k].cpu() for k in ("masks", "scores", "labels")}
            if full is None:
                gt = {k: batch["targets"][i][k].cpu() for k in ("masks", "labels")}
            else:  # instances of a room partition its points: one id per point is exact
                masks = full[i]["masks"].cpu()
                ids = torch.full((masks.shape[1],), -1, dtype=torch.int32)
                rows, cols = masks.nonzero(as_tuple=True)
                ids[cols] = rows.int()
                gt = {"ids": ids, "labels": full[i]["labels"].cpu(), "num": len(masks)}
                pred["index"] = full[i]["index"].cpu()
            self.scenes.append((pred, gt))

    def _sequences(self, min_score: float | None = None) -> tuple[_Lazy, _Lazy]:
        def prediction(pred: dict) -> dict:
            keep = slice(None) if min_score is None else pred["scores"] >= min_score
            masks = pred["masks"][keep]
            if "index" in pred:  # each original point takes its voxel's prediction
                masks = masks[:, pred["index"]]
            return {"masks": masks, "scores": pred["scores"][keep], "labels": pred["labels"][keep]}

        def ground_truth(gt: dict) -> dict:
            if "ids" not in gt:
                return gt
            masks = gt["ids"][None, :] == torch.arange(gt["num"], dtype=torch.int32)[:, None]
            return {"masks": masks, "labels": gt["labels"]}

        return (_Lazy([p for p, _ in self.scenes], prediction),
                _Lazy([g for _, g in self.scenes], ground_truth))

    def evaluate(self) -> dict[str, float]:
        predictions, ground_truth = self._sequences()
        ap = instance_ap(predictions, ground_truth, min_region_size=self.min_region_size,
                         class_names=self.class_names)
        metrics = {"AP": finite(ap["AP"]), "AP50": finite(ap["AP50"]), "AP25": finite(ap["AP25"])}
        metrics.update(_diagnostics(predictions, ground_truth, self.score_threshold))
        if self.coverage:
            # No size filter: the published coverage metrics (SGPN/ASIS) count every instance.
            confident, ground_truth = self._sequences(min_score=self.score_threshold)
            cov = s3dis_coverage(confident, ground_truth, num_classes=len(self.class_names))
            metrics.update({k: finite(cov[k]) for k in ("mCov", "mWCov", "mPrec", "mRec")})
        return metrics


class CocoEvaluator:
    """COCO mask AP via pycocotools on the original image resolution, plus diagnostics.

    Args:
        dataset: the ``CocoInstances`` evaluated (its ``coco`` ground truth and category ids).
        mask_threshold: probability above which a resampled pixel is in the mask.
        score_threshold: predictions counted by the diagnostics.
    """

    def __init__(self, dataset, mask_threshold: float, score_threshold: float) -> None:
        self.dataset = dataset
        self.mask_threshold = mask_threshold
        self.score_threshold = score_threshold
        self.results: list[dict] = []
        self.image_ids: list[int] = []
        self.low_res_predictions: list[dict] = []
        self.low_res_ground_truth: list[dict] = []

    def process(self, batch: dict, outputs: dict, predictions: list[dict]) -> None:
        size = outputs["pred_masks"].shape[-2:]  # (H', W')
        targets = per_scene_target_masks(batch["targets"], outputs["pred_masks"])
        category_ids = torch.tensor(self.dataset.category_ids)
        for i, pred in enumerate(predictions):
            pred = {k: v.cpu() for k, v in pred.items()}
            masks = masks_to_original(pred["probs"].float().view(-1, *size),
                                      batch["resized_sizes"][i], batch["orig_sizes"][i],
                                      threshold=self.mask_threshold)
            self.results += encode_results(batch["image_ids"][i], masks, pred["scores"],
                                           category_ids[pred["labels"]])
            self.image_ids.append(batch["image_ids"][i])
            self.low_res_predictions.append({"masks": pred["masks"], "scores": pred["scores"]})
            self.low_res_ground_truth.append({"masks": targets[i].cpu()})

    def evaluate(self) -> dict[str, float]:
        # Only the categories trained on (data.classes may pick a subset of the json's).
        ap = coco_mask_ap(self.dataset.coco, self.results, image_ids=self.image_ids,
                          category_ids=list(self.dataset.category_ids))
        # AP/AP50/AP75 drive the search: 0 when undefined. Size buckets without GT stay NaN.
        metrics = {k: finite(v) if k in ("AP", "AP50", "AP75") else v for k, v in ap.items()}
        metrics.update(_diagnostics(self.low_res_predictions, self.low_res_ground_truth,
                                    self.score_threshold))
        return metrics
