"""Inference: Mask2Former's top-k (query, class) pairs, per-query claims, argmax masks, mask NMS.

Expected values are computed by hand from the rule (class probability x mean mask probability
over the mask), with ``math`` on the numbers written in each test.
"""

import math

import pytest
import torch

from ifsearch.inference import predict_instances


def outputs_for(mask_logits, class_logits):
    """One scene: (N, M) mask logits, (M, C+1) class logits."""
    return {"pred_logits": class_logits[None], "pred_masks": [mask_logits]}


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def as_set(pred):
    """{(query, label): score} of a scene's pairs (the order of pairs is not part of the rule)."""
    pairs = zip(pred["queries"].tolist(), pred["labels"].tolist(), pred["scores"].tolist(),
                strict=True)
    return {(q, c): s for q, c, s in pairs}


# Three queries, three classes + "no object". Query 0 has two plausible classes.
CLASS_PROBS = torch.tensor([[0.45, 0.40, 0.05, 0.10],
                            [0.06, 0.04, 0.80, 0.10],
                            [0.02, 0.02, 0.02, 0.94]])


def three_queries():
    masks = torch.full((10, 3), -5.0)  # (N, M); sigmoid(-5) < 0.5: outside every mask
    masks[0:4, 0] = torch.tensor([2.0, 2.0, 3.0, 3.0])
    masks[4:8, 1] = torch.tensor([1.0, 1.0, 1.0, 4.0])
    masks[8:10, 2] = 0.5
    mask_scores = [(2 * sigmoid(2) + 2 * sigmoid(3)) / 4, (3 * sigmoid(1) + sigmoid(4)) / 4,
                   sigmoid(0.5)]
    return outputs_for(masks, CLASS_PROBS.log()), mask_scores


def test_topk_pairs_follow_mask2former():
    outputs, ms = three_queries()
    # Flattened (query, class) scores: .80 (1, 2), .45 (0, 0), .40 (0, 1), .06 (1, 0), .05 (0, 2),
    # .04 (1, 1), .02 x 3 (query 2). k = 0 -> as many as queries: the top 3. Query 0 appears
    # twice, query 2 (sure it is no object) not at all.
    (pred,) = predict_instances(outputs)
    assert as_set(pred) == pytest.approx({(1, 2): 0.80 * ms[1], (0, 0): 0.45 * ms[0],
                                          (0, 1): 0.40 * ms[0]}, rel=1e-5)
    assert pred["masks"].tolist() == [[4 <= i < 8 for i in range(10)],
                                      [i < 4 for i in range(10)], [i < 4 for i in range(10)]]
    (top5,) = predict_instances(outputs, topk=5)
    assert as_set(top5) == pytest.approx({(1, 2): 0.80 * ms[1], (0, 0): 0.45 * ms[0],
                                          (0, 1): 0.40 * ms[0], (1, 0): 0.06 * ms[1],
                                          (0, 2): 0.05 * ms[0]}, rel=1e-5)
    (everything,) = predict_instances(outputs, topk=100)  # at most M * C pairs
    assert len(everything["scores"]) == 9


def test_claims_are_one_per_nonempty_query_scored_by_objectness():
    outputs, ms = three_queries()
    (pred,) = predict_instances(outputs)
    claims = pred["claims"]
    assert claims["queries"].tolist() == [0, 1, 2]  # query 2 too: its mask is not empty
    # score = mask score x (1 - p_no_object)
    expected = [0.90 * ms[0], 0.90 * ms[1], 0.06 * ms[2]]
    assert claims["scores"].tolist() == pytest.approx(expected, rel=1e-5)
    assert claims["kept"].tolist() == [True] * 3
    assert claims["masks"][2].tolist() == [i >= 8 for i in range(10)]


def test_empty_masks_are_dropped_after_the_topk_selection():
    masks = torch.full((6, 3), -10.0)  # (N, M)
    masks[:3, 0] = 10.0   # query 0: points 0-2
    masks[3:, 1] = 0.0    # query 1: p = 0.5 exactly -> not above the threshold: empty
    masks[3:, 2] = 10.0   # query 2: points 3-5
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.9, 0.05, 0.05], [0.3, 0.3, 0.4]])  # C = 2
    (pred,) = predict_instances(outputs_for(masks, probs.log()))
    # top 3 pairs: (1, 0) .9, (0, 1) .7, then (2, 0) / (2, 1) tie at .3; query 1's mask is empty,
    # its pair goes and no fourth pair takes its place.
    assert sorted(pred["queries"].tolist()) == [0, 2]
    assert pred["labels"][pred["queries"] == 0].tolist() == [1]
    assert pred["claims"]["queries"].tolist() == [0, 2]


def test_softmax_threshold_masks_are_exclusive():
    logits = torch.randn(200, 5)
    (pred,) = predict_instances(outputs_for(logits, torch.zeros(5, 3)), mask_prob="softmax")
    assert pred["claims"]["masks"].sum(0).max() <= 1  # p > 0.5 for at most one query per point


def test_argmax_softmax_on_a_hand_built_matrix():
    # Per point: query logits; the background slot has logit 0.
    logits = torch.tensor([[2.0, 1.0],    # q0 .665, q1 .245, bg .090 -> q0 (threshold too)
                           [0.2, 0.1],    # q0 .367, q1 .332, bg .301 -> q0 (threshold: none)
                           [-1.0, -2.0],  # background is the most probable slot
                           [0.0, 0.5]])   # q0 .274, q1 .452, bg .274 -> q1 (threshold: none)
    out = outputs_for(logits, torch.zeros(2, 2))
    (pred,) = predict_instances(out, mask_prob="softmax", assign="argmax")
    claims = pred["claims"]
    assert claims["queries"].tolist() == [0, 1]
    assert claims["masks"].tolist() == [[True, True, False, False], [False, False, False, True]]
    p0 = math.exp(2) / (math.exp(2) + math.e + 1)
    p1 = math.exp(0.2) / (math.exp(0.2) + math.exp(0.1) + 1)
    p3 = math.exp(0.5) / (2 + math.exp(0.5))
    # mask score: mean probability of the query over its assigned points; objectness 1/2
    assert claims["scores"].tolist() == pytest.approx([(p0 + p1) / 4, p3 / 2], rel=1e-5)
    (thresholded,) = predict_instances(out, mask_prob="softmax")
    assert thresholded["claims"]["masks"].tolist() == [[True, False, False, False]]


def test_argmax_sigmoid_on_a_hand_built_matrix():
    logits = torch.tensor([[1.0, 2.0],     # .731, .881 -> q1 (threshold: both)
                           [-1.0, -0.5],   # both below 0.5 -> background
                           [0.5, -3.0],    # .622 -> q0
                           [3.0, 0.2]])    # .953, .550 -> q0 (threshold: both)
    out = outputs_for(logits, torch.zeros(2, 2))
    (pred,) = predict_instances(out, assign="argmax")
    assert pred["claims"]["masks"].tolist() == [[False, False, True, True],
                                                [True, False, False, False]]
    expected = [(sigmoid(0.5) + sigmoid(3)) / 4, sigmoid(2) / 2]
    assert pred["claims"]["scores"].tolist() == pytest.approx(expected, rel=1e-5)
    (thresholded,) = predict_instances(out)
    assert thresholded["claims"]["masks"].tolist() == [[True, False, True, True],
                                                       [True, False, False, True]]
    # mask_threshold still gates the winner: at 0.9 only point 3's .953 is left
    (strict,) = predict_instances(out, assign="argmax", mask_threshold=0.9)
    assert strict["claims"]["masks"].tolist() == [[False, False, False, True]]


@pytest.mark.parametrize("mask_prob", ["sigmoid", "softmax"])
def test_argmax_masks_are_disjoint_and_probs_are_the_masks(mask_prob):
    logits = torch.randn(300, 6) * 3
    (pred,) = predict_instances(outputs_for(logits, torch.zeros(6, 3)), mask_prob=mask_prob,
                                assign="argmax", return_probs=True)
    claims = pred["claims"]
    assert claims["masks"].sum(0).max() == 1
    assert torch.equal(claims["probs"], claims["masks"].float())
    assert torch.equal(pred["probs"], pred["masks"].float())


def test_dedup_keeps_a_querys_own_pairs_and_suppresses_other_queries():
    masks = torch.full((15, 3), -10.0)  # (N, M); mask scores all sigmoid(10)
    masks[0:10, 0] = 10.0   # query 0: points 0-9
    masks[0:9, 1] = 10.0    # query 1: points 0-8, IoU 0.9 with query 0
    masks[10:15, 2] = 10.0  # query 2: elsewhere
    probs = torch.tensor([[0.45, 0.40, 0.05, 0.10],
                          [0.42, 0.08, 0.05, 0.45],
                          [0.05, 0.05, 0.80, 0.10]])
    out = outputs_for(masks, probs.log())
    # top 5 by class probability: (2, 2) .80, (0, 0) .45, (1, 0) .42, (0, 1) .40, (1, 1) .08
    (all_,) = predict_instances(out, topk=5)
    assert set(as_set(all_)) == {(2, 2), (0, 0), (1, 0), (0, 1), (1, 1)}
    # (0, 0) suppresses both of query 1's pairs, never its own (0, 1), which has IoU 1 with it
    (kept,) = predict_instances(out, topk=5, dedup_iou=0.5)
    assert as_set(kept) == pytest.approx({(2, 2): 0.80 * sigmoid(10), (0, 0): 0.45 * sigmoid(10),
                                          (0, 1): 0.40 * sigmoid(10)}, rel=1e-5)
    # claims: query 0 (objectness .90) suppresses query 1 (.55); all three stay listed
    assert kept["claims"]["queries"].tolist() == [0, 1, 2]
    assert kept["claims"]["kept"].tolist() == [True, False, True]
    assert all_["claims"]["kept"].tolist() == [True, True, True]


def test_image_outputs_are_flattened_per_pixel():
    out = {"pred_logits": torch.zeros(2, 4, 3), "pred_masks": torch.randn(2, 4, 5, 6)}
    preds = predict_instances(out)
    assert len(preds) == 2 and all(p["masks"].shape[1] == 30 for p in preds)
    assert all(p["claims"]["masks"].shape[1] == 30 for p in preds)
