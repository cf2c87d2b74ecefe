"""Streaming evaluators, fed by predict_instances: full-resolution S3DIS rooms give the metrics of
explicitly expanded masks, and the diagnostics read the masks, not the class head."""

import pytest
import torch

from ifsearch.evaluation import PointCloudEvaluator
from ifsearch.inference import predict_instances
from ifsearch.metrics import instance_ap, instance_diagnostics
from ifsearch.metrics.coverage import s3dis_coverage


def room(seed, num_voxels=40, num_points=150, num_instances=4, num_queries=6):
    """One room: GT instances partition the points, the model's outputs are per voxel.

    Instances mostly follow voxels, and query q leans towards instance q % num_instances (queries
    4 and 5 duplicate 0 and 1), so the metrics are neither 0 nor 1.
    """
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(num_voxels, (num_points,), generator=g)
    voxel_ids = torch.randint(-1, num_instances, (num_voxels,), generator=g)  # -1: unlabelled
    ids = torch.where(torch.rand(num_points, generator=g) < 0.8, voxel_ids[index],
                      torch.randint(-1, num_instances, (num_points,), generator=g))
    gt_masks = ids[None, :] == torch.arange(num_instances)[:, None]
    target = torch.arange(num_queries) % num_instances
    lean = (voxel_ids[:, None] == target[None, :]).float() * 6 - 3
    mask_logits = lean + torch.randn(num_voxels, num_queries, generator=g) * 2
    outputs = {"pred_logits": torch.randn(1, num_queries, 4, generator=g) * 2,
               "pred_masks": [mask_logits]}
    eval_target = {"index": index, "masks": gt_masks,
                   "labels": torch.randint(3, (num_instances,), generator=g)}
    return outputs, eval_target


@pytest.mark.parametrize("dedup_iou", [0.0, 0.3])
def test_full_resolution_rooms_match_expanded_masks(dedup_iou):
    rooms = [room(seed) for seed in range(3)]
    preds = [predict_instances(o, topk=10, dedup_iou=dedup_iou)[0] for o, _ in rooms]
    evaluator = PointCloudEvaluator(["a", "b", "c"], min_region_size=5, score_threshold=0.3,
                                    coverage=True)
    evaluator.process({"eval_targets": [t for _, t in rooms[:2]]}, {}, preds[:2])
    evaluator.process({"eval_targets": [rooms[2][1]]}, {}, preds[2:])
    got = evaluator.evaluate()

    pairs = [{"masks": p["masks"][:, t["index"]], "scores": p["scores"], "labels": p["labels"]}
             for p, (_, t) in zip(preds, rooms, strict=True)]
    claims = [{"masks": p["claims"]["masks"][:, t["index"]], "scores": p["claims"]["scores"],
               "kept": p["claims"]["kept"]} for p, (_, t) in zip(preds, rooms, strict=True)]
    kept = [{k: c[k][c["kept"]] for k in ("masks", "scores")} for c in claims]
    gts = [{"masks": t["masks"], "labels": t["labels"]} for _, t in rooms]
    ap = instance_ap(pairs, gts, min_region_size=5, num_classes=3)
    agnostic = instance_ap(kept, gts, min_region_size=5, num_classes=3, class_agnostic=True)
    diag = instance_diagnostics(claims, gts)
    confident = [{k: v[p["scores"] >= 0.3] for k, v in p.items()} for p in pairs]
    cov = s3dis_coverage(confident, gts, num_classes=3)
    for key in ("AP", "AP50", "AP25"):
        assert got[key] == pytest.approx(ap[key] if ap[key] == ap[key] else 0.0)
        assert got[f"{key}_agnostic"] == pytest.approx(agnostic[key])
    for key in ("duplicate_rate", "unclaimed_rate", "active_queries"):
        assert got[key] == pytest.approx(diag[key])
    for key in ("mCov", "mWCov", "mPrec", "mRec"):
        assert got[key] == pytest.approx(cov[key])
    # the random case is not trivially empty, and some query is listed under two classes
    assert 0 < got["mCov"] < 1 and 0 < got["AP50_agnostic"] < 1
    assert any(len(p["queries"].unique()) < len(p["queries"]) for p in preds)
    if dedup_iou:
        assert not all(bool(c["kept"].all()) for c in claims)


def test_no_object_head_with_perfect_masks_claims_every_instance():
    """Class head: "no object" everywhere; masks: exactly the instances. The claims are perfect."""
    num_points, num_queries = 60, 6
    instances = [(0, 20), (20, 40), (40, 50)]  # points 50-59 are background
    gt_masks = torch.zeros(len(instances), num_points, dtype=torch.bool)
    mask_logits = torch.full((num_points, num_queries), -8.0)  # queries 3-5: empty masks
    for k, (a, b) in enumerate(instances):
        gt_masks[k, a:b] = True
        mask_logits[a:b, k] = 8.0
    class_logits = torch.zeros(1, num_queries, 4)
    class_logits[..., -1] = 12.0  # p(no object) > 0.9999 for every query
    outputs = {"pred_logits": class_logits, "pred_masks": [mask_logits]}
    batch = {"targets": [{"masks": gt_masks, "labels": torch.tensor([0, 1, 2])}]}

    evaluator = PointCloudEvaluator(["a", "b", "c"], min_region_size=5, score_threshold=0.5)
    evaluator.process(batch, outputs, predict_instances(outputs))
    got = evaluator.evaluate()
    assert (got["unclaimed_rate"], got["duplicate_rate"], got["active_queries"]) == (0.0, 0.0, 3)
    assert got["AP_agnostic"] == got["AP50_agnostic"] == got["AP25_agnostic"] == 1.0


def test_train_evaluate_passes_the_eval_config_to_inference(monkeypatch):
    """eval.topk / eval.assign / eval.dedup_iou reach predict_instances; the metrics come back."""
    from torch.utils.data import DataLoader

    import ifsearch.train as train
    from ifsearch.config import config_from_dict
    from ifsearch.data import collate_scenes
    from ifsearch.losses import build_criterion

    config = config_from_dict({
        "data": {"num_points": 128, "train_scenes": 2, "val_scenes": 2, "max_instances": 3,
                 "batch_size": 2},
        "model": {"embed_dim": 16, "num_queries": 4, "decoder_layers": 1, "ffn_dim": 32},
        "eval": {"topk": 3, "assign": "argmax", "dedup_iou": 0.7},
    }, source="test")
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return predict_instances(*args, **kwargs)

    monkeypatch.setattr(train, "predict_instances", recording)
    _, val_set = train.build_datasets(config)
    num_classes = len(val_set.class_names)
    metrics = train.evaluate(train.build_model(config, num_classes),
                             build_criterion(config.loss, num_classes=num_classes),
                             DataLoader(val_set, batch_size=2, collate_fn=collate_scenes), config,
                             torch.device("cpu"))
    assert calls and all(
        (c["topk"], c["assign"], c["dedup_iou"]) == (3, "argmax", 0.7) for c in calls)
    for key in ("AP50", "AP50_agnostic", "AP_agnostic", "AP25_agnostic", "duplicate_rate",
                "unclaimed_rate", "active_queries"):
        assert key in metrics
