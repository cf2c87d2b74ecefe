"""Streaming evaluators: full-resolution S3DIS rooms give the metrics of explicitly expanded masks."""

import pytest
import torch

from ifsearch.evaluation import PointCloudEvaluator
from ifsearch.metrics import instance_ap, instance_diagnostics
from ifsearch.metrics.coverage import s3dis_coverage


def room(seed, num_voxels=40, num_points=150, num_instances=4, num_preds=6):
    """One room: GT instances partition the points, predictions are per voxel."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(num_voxels, (num_points,), generator=g)
    ids = torch.randint(-1, num_instances, (num_points,), generator=g)  # -1: unlabelled
    gt_masks = ids[None, :] == torch.arange(num_instances)[:, None]
    pred = {"masks": torch.rand(num_preds, num_voxels, generator=g) > 0.6,
            "scores": torch.rand(num_preds, generator=g),
            "labels": torch.randint(3, (num_preds,), generator=g)}
    eval_target = {"index": index, "masks": gt_masks,
                   "labels": torch.randint(3, (num_instances,), generator=g)}
    return pred, eval_target


def test_full_resolution_rooms_match_expanded_masks():
    rooms = [room(seed) for seed in range(3)]
    evaluator = PointCloudEvaluator(["a", "b", "c"], min_region_size=5, score_threshold=0.3,
                                    coverage=True)
    evaluator.process({"eval_targets": [t for _, t in rooms[:2]]}, {}, [p for p, _ in rooms[:2]])
    evaluator.process({"eval_targets": [rooms[2][1]]}, {}, [rooms[2][0]])
    got = evaluator.evaluate()

    preds = [{**p, "masks": p["masks"][:, t["index"]]} for p, t in rooms]
    gts = [{"masks": t["masks"], "labels": t["labels"]} for _, t in rooms]
    ap = instance_ap(preds, gts, min_region_size=5, num_classes=3)
    diag = instance_diagnostics(preds, gts, score_threshold=0.3)
    confident = [{k: v[p["scores"] >= 0.3] for k, v in p.items()} for p in preds]
    cov = s3dis_coverage(confident, gts, num_classes=3)
    for key in ("AP", "AP50", "AP25"):
        assert got[key] == pytest.approx(ap[key] if ap[key] == ap[key] else 0.0)
    for key in ("duplicate_rate", "unclaimed_rate", "active_queries"):
        assert got[key] == pytest.approx(diag[key])
    for key in ("mCov", "mWCov", "mPrec", "mRec"):
        assert got[key] == pytest.approx(cov[key])
    assert got["mCov"] > 0  # the random case is not trivially empty
