"""Validation metrics per dataset, as streaming evaluators (detectron2's process/evaluate split).

* Point clouds (synthetic, S3DIS): ScanNet-protocol AP / AP50 / AP25 and the query diagnostics;
  S3DIS adds the coverage metrics mCov, mWCov, mPrec, mRec, all on every original room point.
* Images (COCO): pycocotools mask AP (AP, AP50, AP75, APs, APm, APl) on masks resampled to each
  image's original size, plus the same query diagnostics at the model's mask resolution.
"""

from __future__ import annotations

import math

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


class PointCloudEvaluator:
    """ScanNet AP + diagnostics (+ S3DIS coverage) over point-cloud scenes.

    Args:
        class_names: the dataset's classes, in class-index order.
        min_region_size: ScanNet's minimum instance size, for AP and coverage.
        score_threshold: predictions counted by the diagnostics and the coverage metrics.
        coverage: also compute the S3DIS coverage metrics.
    """

    def __init__(self, class_names: list[str], min_region_size: int, score_threshold: float,
                 coverage: bool = False) -> None:
        self.class_names = list(class_names)
        self.min_region_size = min_region_size
        self.score_threshold = score_threshold
        self.coverage = coverage
        self.predictions: list[dict] = []
        self.ground_truth: list[dict] = []

    def process(self, batch: dict, outputs: dict, predictions: list[dict]) -> None:
        """Keep one batch's predictions and ground truth (on CPU, at full resolution)."""
        full = batch.get("eval_targets")
        for i, pred in enumerate(predictions):
            pred = {k: v.cpu() for k, v in pred.items() if k != "probs"}
            if full is None:
                gt = batch["targets"][i]
            else:  # the model saw voxels: give each original point its voxel's prediction
                gt = full[i]
                pred["masks"] = pred["masks"][:, gt["index"]]
            self.predictions.append(pred)
            self.ground_truth.append({"masks": gt["masks"].cpu(), "labels": gt["labels"].cpu()})

    def evaluate(self) -> dict[str, float]:
        ap = instance_ap(self.predictions, self.ground_truth,
                         min_region_size=self.min_region_size, class_names=self.class_names)
        metrics = {"AP": finite(ap["AP"]), "AP50": finite(ap["AP50"]), "AP25": finite(ap["AP25"])}
        metrics.update(_diagnostics(self.predictions, self.ground_truth, self.score_threshold))
        if self.coverage:
            confident = [
                {k: v[p["scores"] >= self.score_threshold] for k, v in p.items()}
                for p in self.predictions
            ]
            # No size filter: the published coverage metrics (SGPN/ASIS) count every instance.
            cov = s3dis_coverage(confident, self.ground_truth, num_classes=len(self.class_names))
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
