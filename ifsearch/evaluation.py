"""Validation metrics per dataset, as streaming evaluators (detectron2's process/evaluate split).

Every dataset reports its class-aware AP on the (query, class) pairs of ``predict_instances``,
the class-agnostic ``AP_agnostic``/``AP50_agnostic``/``AP25_agnostic`` on the claims (one
prediction per query with a non-empty mask, NMS-kept when ``eval.dedup_iou`` > 0), and the query
diagnostics ``duplicate_rate``/``unclaimed_rate``/``active_queries`` on every claim.

* Point clouds (synthetic, S3DIS): ScanNet-protocol AP / AP50 / AP25; S3DIS adds the coverage
  metrics mCov, mWCov, mPrec, mRec (pairs with score >= a threshold), all on every original room
  point.
* Images (COCO): pycocotools mask AP (AP, AP50, AP75, APs, APm, APl; agnostic: AP, AP50, AP75,
  AP25) on masks resampled to each image's original size; the diagnostics at the model's mask
  resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ifsearch.data.coco import masks_to_original
from ifsearch.losses.common import per_scene_target_masks
from ifsearch.metrics import instance_ap, instance_diagnostics
from ifsearch.metrics.coco_eval import coco_mask_ap, coco_mask_ap_agnostic, encode_results
from ifsearch.metrics.coverage import s3dis_coverage

DIAGNOSTIC_KEYS = ("duplicate_rate", "unclaimed_rate", "active_queries")


def finite(value: float | None) -> float:
    """AP is NaN when no class has ground truth; report 0 so schedulers can compare trials."""
    return 0.0 if value is None or math.isnan(value) else float(value)


def _diagnostics(claims: Sequence[dict], ground_truth: Sequence[dict]) -> dict:
    diag = instance_diagnostics(claims, ground_truth)
    return {k: diag[k] for k in DIAGNOSTIC_KEYS}


def _claim_rows(pred: dict) -> torch.Tensor:
    """(P,) row of each pair's query among the claims (their queries ascend)."""
    return torch.searchsorted(pred["claims"]["queries"].cpu(), pred["queries"].cpu())


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
    """ScanNet AP (class-aware and agnostic) + diagnostics (+ S3DIS coverage) over point clouds.

    Each scene keeps its claims' masks once; pairs refer to them by row (a pair's mask is its
    query's). Scenes evaluated at full resolution (``batch["eval_targets"]``: the model saw
    voxels) keep their masks per voxel, the voxel of every original point and the ground truth as
    one instance id per point; full masks are rebuilt one room at a time while the metrics run.

    Args:
        class_names: the dataset's classes, in class-index order.
        min_region_size: ScanNet's minimum instance size for AP.
        score_threshold: pairs counted by the coverage metrics (unused without ``coverage``).
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
        """Keep one batch's predictions (``predict_instances``) and ground truth, on CPU."""
        full = batch.get("eval_targets")
        for i, pred in enumerate(predictions):
            claims = pred["claims"]
            kept = {"masks": claims["masks"].cpu(), "claim_scores": claims["scores"].cpu(),
                    "kept": claims["kept"].cpu(), "rows": _claim_rows(pred),
                    "scores": pred["scores"].cpu(), "labels": pred["labels"].cpu()}
            if full is None:
                gt = {k: batch["targets"][i][k].cpu() for k in ("masks", "labels")}
            else:  # instances of a room partition its points: one id per point is exact
                masks = full[i]["masks"].cpu()
                ids = torch.full((masks.shape[1],), -1, dtype=torch.int32)
                rows, cols = masks.nonzero(as_tuple=True)
                ids[cols] = rows.int()
                gt = {"ids": ids, "labels": full[i]["labels"].cpu(), "num": len(masks)}
                kept["index"] = full[i]["index"].cpu()
            self.scenes.append((kept, gt))

    def _sequences(self, kind: str, min_score: float | None = None) -> tuple[_Lazy, _Lazy]:
        """Lazy (predictions, ground truth); kind: "pairs", "claims" or "kept claims"."""
        def prediction(p: dict) -> dict:
            if kind == "pairs":
                keep = slice(None) if min_score is None else p["scores"] >= min_score
                out = {"masks": p["masks"][p["rows"][keep]], "scores": p["scores"][keep],
                       "labels": p["labels"][keep]}
            else:
                keep = p["kept"] if kind == "kept claims" else slice(None)
                out = {"masks": p["masks"][keep], "scores": p["claim_scores"][keep]}
            if "index" in p:  # each original point takes its voxel's prediction
                out["masks"] = out["masks"][:, p["index"]]
            return out

        def ground_truth(gt: dict) -> dict:
            if "ids" not in gt:
                return gt
            masks = gt["ids"][None, :] == torch.arange(gt["num"], dtype=torch.int32)[:, None]
            return {"masks": masks, "labels": gt["labels"]}

        return (_Lazy([p for p, _ in self.scenes], prediction),
                _Lazy([g for _, g in self.scenes], ground_truth))

    def evaluate(self) -> dict[str, float]:
        pairs, ground_truth = self._sequences("pairs")
        ap = instance_ap(pairs, ground_truth, min_region_size=self.min_region_size,
                         class_names=self.class_names)
        kept, _ = self._sequences("kept claims")
        agnostic = instance_ap(kept, ground_truth, min_region_size=self.min_region_size,
                               class_names=self.class_names, class_agnostic=True)
        metrics = {k: finite(ap[k]) for k in ("AP", "AP50", "AP25")}
        metrics.update({f"{k}_agnostic": finite(agnostic[k]) for k in ("AP", "AP50", "AP25")})
        metrics.update(_diagnostics(self._sequences("claims")[0], ground_truth))
        if self.coverage:
            # No size filter: the published coverage metrics (SGPN/ASIS) count every instance.
            confident, _ = self._sequences("pairs", min_score=self.score_threshold)
            cov = s3dis_coverage(confident, ground_truth, num_classes=len(self.class_names))
            metrics.update({k: finite(cov[k]) for k in ("mCov", "mWCov", "mPrec", "mRec")})
        return metrics


class CocoEvaluator:
    """COCO mask AP (class-aware and agnostic) via pycocotools at the original image size.

    Each image's claims are resampled and RLE-encoded once; pairs reuse their query's encoding.
    Class-agnostic results carry the first evaluated category id (``coco_mask_ap_agnostic``).

    Args:
        dataset: the ``CocoInstances`` evaluated (its ``coco`` ground truth and category ids).
        mask_threshold: probability above which a resampled pixel is in the mask (0.5 for the 0/1
            masks of ``assign="argmax"``).
    """

    def __init__(self, dataset, mask_threshold: float) -> None:
        self.dataset = dataset
        self.mask_threshold = mask_threshold
        self.results: list[dict] = []
        self.agnostic_results: list[dict] = []
        self.image_ids: list[int] = []
        self.low_res_claims: list[dict] = []
        self.low_res_ground_truth: list[dict] = []

    def process(self, batch: dict, outputs: dict, predictions: list[dict]) -> None:
        size = outputs["pred_masks"].shape[-2:]  # (H', W')
        targets = per_scene_target_masks(batch["targets"], outputs["pred_masks"])
        category_ids = torch.tensor(self.dataset.category_ids)
        for i, pred in enumerate(predictions):
            image_id = batch["image_ids"][i]
            claims = {k: v.cpu() for k, v in pred["claims"].items()}
            masks = masks_to_original(claims["probs"].float().view(-1, *size),
                                      batch["resized_sizes"][i], batch["orig_sizes"][i],
                                      threshold=self.mask_threshold)  # (Q, H, W)
            encoded = encode_results(image_id, masks, claims["scores"],
                                     [self.dataset.category_ids[0]] * len(masks))
            cats = category_ids[pred["labels"].cpu()].tolist()
            self.results += [{**encoded[r], "category_id": c, "score": s} for r, c, s in
                             zip(_claim_rows(pred).tolist(), cats, pred["scores"].tolist(),
                                 strict=True)]
            self.agnostic_results += [encoded[r] for r in claims["kept"].nonzero()[:, 0].tolist()]
            self.image_ids.append(image_id)
            self.low_res_claims.append({"masks": claims["masks"]})
            self.low_res_ground_truth.append({"masks": targets[i].cpu()})

    def evaluate(self) -> dict[str, float]:
        # Only the categories trained on (data.classes may pick a subset of the json's).
        subset = {"image_ids": self.image_ids, "category_ids": list(self.dataset.category_ids)}
        ap = coco_mask_ap(self.dataset.coco, self.results, **subset)
        agnostic = coco_mask_ap_agnostic(self.dataset.coco, self.agnostic_results, **subset)
        # AP/AP50/AP75 drive the search: 0 when undefined. Size buckets without GT stay NaN.
        metrics = {k: finite(v) if k in ("AP", "AP50", "AP75") else v for k, v in ap.items()}
        metrics.update({f"{k}_agnostic": finite(v) for k, v in agnostic.items()})
        metrics.update(_diagnostics(self.low_res_claims, self.low_res_ground_truth))
        return metrics
