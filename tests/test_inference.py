"""Inference: one instance per non-empty query mask, Mask2Former scores, optional mask NMS."""

import pytest
import torch

from ifsearch.inference import predict_instances


def outputs_for(mask_logits, class_logits):
    return {"pred_logits": class_logits[None], "pred_masks": [mask_logits]}


def test_scores_labels_and_empty_masks_dropped():
    masks = torch.full((6, 3), -10.0)  # (N, M)
    masks[:3, 0] = 10.0   # query 0: points 0-2
    masks[3:, 1] = 0.0    # query 1: p = 0.5 exactly -> not above the threshold: empty
    masks[3:, 2] = 10.0   # query 2: points 3-5
    classes = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # C = 2
    (pred,) = predict_instances(outputs_for(masks, classes), mask_prob="sigmoid")
    assert pred["queries"].tolist() == [0, 2]
    assert pred["labels"].tolist() == [1, 0]
    assert pred["masks"].tolist() == [[True] * 3 + [False] * 3, [False] * 3 + [True] * 3]
    # score = best real-class probability x mean mask probability over the mask
    class_prob = torch.softmax(classes, -1)
    expected = [class_prob[0, 1] * torch.sigmoid(torch.tensor(10.0)),
                class_prob[2, :2].max() * torch.sigmoid(torch.tensor(10.0))]
    assert pred["scores"].tolist() == pytest.approx([float(e) for e in expected], rel=1e-5)


def test_softmax_masks_are_exclusive():
    logits = torch.randn(200, 5)
    (pred,) = predict_instances(outputs_for(logits, torch.zeros(5, 3)), mask_prob="softmax")
    assert pred["masks"].sum(0).max() <= 1  # p > 0.5 for at most one query per point


def test_mask_nms_removes_duplicates():
    masks = torch.full((10, 3), -10.0)
    masks[:5, 0] = 10.0
    masks[:5, 1] = 9.0      # duplicate of query 0, slightly less confident
    masks[:4, 1] = 9.0
    masks[5:, 2] = 10.0
    classes = torch.zeros(3, 3)
    (kept,) = predict_instances(outputs_for(masks, classes), mask_prob="sigmoid", dedup_iou=0.5)
    (all_,) = predict_instances(outputs_for(masks, classes), mask_prob="sigmoid")
    assert sorted(all_["queries"].tolist()) == [0, 1, 2]
    assert sorted(kept["queries"].tolist()) == [0, 2]


def test_image_outputs_are_flattened_per_pixel():
    out = {"pred_logits": torch.zeros(2, 4, 3), "pred_masks": torch.randn(2, 4, 5, 6)}
    preds = predict_instances(out)
    assert len(preds) == 2 and all(p["masks"].shape[1] == 30 for p in preds)
