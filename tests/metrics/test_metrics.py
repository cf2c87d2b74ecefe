"""Hand-computed checks of the ScanNet-protocol AP and the query diagnostics.

Scenes are 1-D point ranges: ``span(a, b)`` is the mask of points a..b-1, so intersections and
IoUs can be read off the numbers. AP uses ScanNet's curve: with ascending unique scores, point i
has precision p_i and recall r_i, an artificial last point (p=1, r=0) is appended, and
AP = sum_i p_i * (r_{i-1} - r_{i+1}) / 2 with r_{-1} = r_0 and r_{n} = 0 (the step widths of
``np.convolve(recall, [-0.5, 0, 0.5], "valid")``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ifsearch.errors import DataError
from ifsearch.metrics import instance_ap, instance_diagnostics

N = 1000  # points per scene; GT instances of >= 100 points survive min_region_size=100


def span(*ranges: tuple[int, int], n: int = N) -> np.ndarray:
    """One (n,) bool mask that is True on the union of [a, b) ranges."""
    m = np.zeros(n, dtype=bool)
    for a, b in ranges:
        m[a:b] = True
    return m


def gt(*instances: tuple[np.ndarray, int]) -> dict:
    masks = np.stack([m for m, _ in instances]) if instances else np.zeros((0, N), bool)
    return {"masks": masks, "labels": np.array([c for _, c in instances], dtype=np.int64)}


def pred(*instances: tuple[np.ndarray, int, float]) -> dict:
    masks = np.stack([m for m, _, _ in instances]) if instances else np.zeros((0, N), bool)
    return {
        "masks": masks,
        "labels": np.array([c for _, c, _ in instances], dtype=np.int64),
        "scores": np.array([s for _, _, s in instances], dtype=np.float64),
    }


def aps(result: dict) -> tuple[float, float, float]:
    return result["AP"], result["AP50"], result["AP25"]


A, B, C = span((0, 100)), span((100, 200)), span((200, 300))  # three disjoint 100-point GT


# ---------------------------------------------------------------- instance_ap: basics


def test_perfect_predictions_score_one_for_every_class_and_scene() -> None:
    gts = [gt((A, 0), (B, 1), (span((300, 450)), 0)), gt((span((0, 200)), 2), (C, 1))]
    preds = [
        pred((A, 0, 0.9), (B, 1, 0.8), (span((300, 450)), 0, 0.7)),
        pred((span((0, 200)), 2, 0.6), (C, 1, 0.5)),
    ]
    result = instance_ap(preds, gts)
    assert aps(result) == pytest.approx((1.0, 1.0, 1.0))
    assert set(result["per_class"]) == {0, 1, 2}
    for values in result["per_class"].values():
        assert values == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP25": 1.0})


def test_missing_instance_halves_ap() -> None:
    # Two GT of class 0 (one per scene), one found. y = [TP], 1 hard false negative:
    # p = [1, 1(artificial)], r = [1/2, 0]; widths = [(.5 - 0)/2, (.5 - 0)/2] = [.25, .25]
    # AP = 1 * .25 + 1 * .25 = 0.5 at every threshold.
    result = instance_ap([pred((A, 0, 0.9)), pred()], [gt((A, 0)), gt((B, 0))])
    assert aps(result) == pytest.approx((0.5, 0.5, 0.5))


def test_false_positive_ranked_below_the_true_positive_costs_nothing() -> None:
    # A class-0 prediction on B's class-1 points is a FP of class 0 (other-class points are not
    # ignored). Class 0: ascending y = [FP .5, TP .9]: p = [1/2, 1, 1], r = [1, 1, 0];
    # widths = [(1-1)/2, (1-0)/2, (1-0)/2] = [0, .5, .5] -> AP = .5 + .5 = 1.
    gts = [gt((A, 0), (B, 1))]
    preds = [pred((A, 0, 0.9), (B, 1, 1.0), (B, 0, 0.5))]
    assert aps(instance_ap(preds, gts)) == pytest.approx((1.0, 1.0, 1.0))


def test_false_positive_ranked_above_the_true_positive() -> None:
    # Class 0: ascending y = [TP .5, FP .9]:
    #   at score .5: tp = 1, fp = 1 -> p = 1/2, r = 1;  at score .9: tp = 0, fp = 1 -> p = 0, r = 0
    # p = [1/2, 0, 1], r = [1, 0, 0]; widths = [(1-0)/2, (1-0)/2, (0-0)/2] = [.5, .5, 0]
    # AP = .5 * .5 + 0 * .5 = 0.25.  Class 1 is perfect (1.0): mean = (0.25 + 1) / 2.
    gts = [gt((A, 0), (B, 1))]
    preds = [pred((A, 0, 0.5), (B, 1, 1.0), (B, 0, 0.9))]
    result = instance_ap(preds, gts)
    assert result["per_class"][0] == pytest.approx({"AP": 0.25, "AP50": 0.25, "AP25": 0.25})
    assert aps(result) == pytest.approx((0.625, 0.625, 0.625))


def test_duplicate_is_a_false_positive_ranked_at_its_own_score() -> None:
    # GT A is found twice (.8 listed first, .9 second: the better score is the TP whatever the
    # order) and GT B once (.7). Ascending y = [TP .7, FP .8, TP .9], 2 GT:
    #   >= .7: tp 2, fp 1 -> p 2/3, r 1;  >= .8: tp 1, fp 1 -> p 1/2, r 1/2;
    #   >= .9: tp 1, fp 0 -> p 1, r 1/2;  artificial p 1, r 0.
    # widths = [(1-.5)/2, (1-.5)/2, (.5-0)/2, (.5-0)/2] = [.25] * 4
    # AP = .25 * (2/3 + 1/2 + 1 + 1) = 19/24.
    gts = [gt((A, 0), (B, 0))]
    preds = [pred((A, 0, 0.8), (A, 0, 0.9), (B, 0, 0.7))]
    assert aps(instance_ap(preds, gts)) == pytest.approx((19 / 24,) * 3)
    # Ranked below every TP, the same duplicate costs nothing (as in the FP test above).
    preds = [pred((A, 0, 0.6), (A, 0, 0.9), (B, 0, 0.7))]
    assert aps(instance_ap(preds, gts)) == pytest.approx((1.0, 1.0, 1.0))


def test_wrong_class_is_a_false_positive_and_a_missed_instance() -> None:
    # B (class 1) predicted as class 0 with a lower score than A's TP. Class 0: [FP .5, TP .9]
    # -> 1.0 (as above). Class 1: GT but no prediction -> 0. Mean = 0.5.
    gts = [gt((A, 0), (B, 1))]
    result = instance_ap([pred((A, 0, 0.9), (B, 0, 0.5))], gts)
    assert result["per_class"][0]["AP"] == pytest.approx(1.0)
    assert result["per_class"][1] == {"AP": 0.0, "AP50": 0.0, "AP25": 0.0}
    assert aps(result) == pytest.approx((0.5, 0.5, 0.5))


# ---------------------------------------------------------------- thresholds


def test_iou_equal_to_threshold_does_not_match() -> None:
    # Prediction [0, 200) on GT A = [0, 100): IoU = 100 / 200 = 0.5 exactly.
    # t = 0.5: no match (strict >). Its void share is 100/200 = 0.5 <= t, so it is a FP:
    #   y = [FP], 1 hard FN: p = [0, 1], r = [0, 0] -> widths 0 -> AP50 = 0.
    # t = 0.25: TP -> AP25 = 1. All of 0.5..0.9 are 0 -> AP = 0.
    result = instance_ap([pred((span((0, 200)), 0, 0.9))], [gt((A, 0))])
    assert aps(result) == pytest.approx((0.0, 0.0, 1.0))
    # One point less: IoU = 100/199 = 0.5025 > 0.5 matches, but not at 0.55..0.9 -> AP = 1/9.
    result = instance_ap([pred((span((0, 199)), 0, 0.9))], [gt((A, 0))])
    assert aps(result) == pytest.approx((1 / 9, 1.0, 1.0))


def test_iou_of_0_3_counts_for_ap25_only() -> None:
    # Prediction [40, 200) on A = [0, 100): inter 60, union 100 + 160 - 60 = 200, IoU = 0.3.
    # t = 0.25: TP -> 1. t >= 0.5: A is a FN and the prediction is either ignored (void share
    # 100/160 = 0.625 > t for t <= 0.6) or a FP; no TP either way -> 0.
    result = instance_ap([pred((span((40, 200)), 0, 0.9))], [gt((A, 0))])
    assert aps(result) == pytest.approx((0.0, 0.0, 1.0))


# ---------------------------------------------------------------- ScanNet ignore rules


def test_prediction_on_void_points_is_not_a_false_positive() -> None:
    # A confident class-0 prediction on unlabeled points [500, 600): void share 1.0 > t at every
    # threshold, so it is ignored and A's TP alone gives AP = 1 (a FP would give 0.25).
    preds = [pred((A, 0, 0.5), (span((500, 600)), 0, 0.9))]
    assert aps(instance_ap(preds, [gt((A, 0))])) == pytest.approx((1.0, 1.0, 1.0))


def test_ignore_share_equal_to_threshold_is_a_false_positive() -> None:
    # Class-0 prediction on 100 void + 100 class-1 points: ignored share = 0.5.
    # t = 0.25: 0.5 > t -> ignored -> class 0 AP25 = 1.
    # t >= 0.5: 0.5 <= t -> FP at .9 above the TP at .5 -> 0.25 (see the FP test).
    gts = [gt((A, 0), (B, 1))]
    preds = [pred((A, 0, 0.5), (B, 1, 1.0), (span((100, 200), (500, 600)), 0, 0.9))]
    assert instance_ap(preds, gts)["per_class"][0] == pytest.approx(
        {"AP": 0.25, "AP50": 0.25, "AP25": 1.0}
    )


def test_tiny_gt_is_ignored_and_predictions_on_it_are_not_false_positives() -> None:
    # GT T = [200, 250) has 50 < 100 points: not a GT (recall is 1/1, not 1/2). The prediction
    # [200, 310) (110 points) has IoU 50/110 = 0.45 with T: at t = 0.25 it is absorbed by T;
    # at t >= 0.5 its ignored share is (50 on T + 60 void) / 110 = 1 > t. Never a FP -> AP = 1.
    tiny = span((200, 250))
    gts = [gt((A, 0), (tiny, 0))]
    preds = [pred((A, 0, 0.5), (span((200, 310)), 0, 0.9))]
    assert aps(instance_ap(preds, gts)) == pytest.approx((1.0, 1.0, 1.0))
    # With min_region_size=10, T is a GT. t = 0.25: two TPs -> 1. t = 0.5: T is a FN; the
    # prediction's void share 60/110 = 0.545 > 0.5 -> ignored; y = [TP .5], 1 FN -> 0.5.
    # t >= 0.55: it is a FP at .9 above TP .5 with 1 FN: p = [1/2, 0, 1], r = [1/2, 0, 0],
    # widths = [.25, .25, 0] -> 0.125.  AP = (0.5 + 8 * 0.125) / 9 = 1/6.
    result = instance_ap(preds, gts, min_region_size=10)
    assert aps(result) == pytest.approx((1 / 6, 0.5, 1.0))


def test_tiny_prediction_is_discarded() -> None:
    # A 50-point class-0 prediction inside C (class 1) is dropped by min_region_size=100
    # (ScanNet skips such masks on load). With min_region_size=10 it is a FP ranked above
    # A's TP: class 0 -> 0.25, class 1 -> 1, mean 0.625.
    gts = [gt((A, 0), (C, 1))]
    preds = [pred((A, 0, 0.5), (C, 1, 1.0), (span((200, 250)), 0, 0.9))]
    assert aps(instance_ap(preds, gts)) == pytest.approx((1.0, 1.0, 1.0))
    assert aps(instance_ap(preds, gts, min_region_size=10)) == pytest.approx((0.625,) * 3)


def test_greedy_assignment_follows_scannet_order() -> None:
    # U = [0, 200) has IoU 0.5 with both A and B; it is listed first with score .5, then A
    # exactly with .9. At t = 0.25, GT A takes both candidates: TP .9 and FP .5, and (as in
    # ScanNet) U, the first candidate, is marked assigned, so GT B cannot take it: B is a FN.
    # Ascending y = [FP .5, TP .9], 1 FN: p = [1/2, 1, 1], r = [1/2, 1/2, 0];
    # widths = [(.5-.5)/2, (.5-0)/2, (.5-0)/2] = [0, .25, .25] -> AP25 = 0.5.
    # t >= 0.5: U matches nothing, is a FP below the TP with B a FN -> the same 0.5.
    gts = [gt((A, 0), (B, 0))]
    preds = [pred((span((0, 200)), 0, 0.5), (A, 0, 0.9))]
    assert aps(instance_ap(preds, gts)) == pytest.approx((0.5, 0.5, 0.5))


# ---------------------------------------------------------------- classes and edge cases


def test_class_without_gt_is_excluded_from_the_mean() -> None:
    # Class 2 has only a (false) prediction and class 1 nothing: both NaN, mean over class 0.
    preds = [pred((A, 0, 0.9), (B, 2, 0.8))]
    result = instance_ap(preds, [gt((A, 0))], num_classes=3)
    assert aps(result) == pytest.approx((1.0, 1.0, 1.0))
    assert all(math.isnan(v) for c in (1, 2) for v in result["per_class"][c].values())


def test_class_names_key_per_class() -> None:
    result = instance_ap([pred((A, 1, 0.9))], [gt((A, 1))], class_names=["chair", "table"])
    assert result["per_class"]["table"]["AP"] == pytest.approx(1.0)
    assert math.isnan(result["per_class"]["chair"]["AP"])
    with pytest.raises(DataError):
        instance_ap([pred()], [gt()], num_classes=3, class_names=["chair"])


def test_gt_labels_outside_the_classes_are_void() -> None:
    # A GT labelled -1 ("ignore") is void: a class-0 prediction on it is ignored, not a FP.
    preds = [pred((A, 0, 0.5), (B, 0, 0.9))]
    result = instance_ap(preds, [gt((A, 0), (B, -1))], num_classes=1)
    assert aps(result) == pytest.approx((1.0, 1.0, 1.0))


def test_empty_inputs_never_crash() -> None:
    nan3 = instance_ap([], [])
    assert all(math.isnan(v) for v in aps(nan3)) and nan3["per_class"] == {}
    # GT but no prediction at all (P = 0) -> 0.
    assert aps(instance_ap([pred()], [gt((A, 0))])) == (0.0, 0.0, 0.0)
    # Predictions but no GT (K = 0) -> no class has GT -> NaN.
    assert all(math.isnan(v) for v in aps(instance_ap([pred((A, 0, 0.9))], [gt()])))
    # A scene without points, an empty-list prediction and a normal scene together.
    no_points = {"masks": np.zeros((0, 0), bool), "labels": np.zeros(0, np.int64)}
    empty = {"masks": [], "scores": [], "labels": []}
    result = instance_ap([empty, pred((A, 0, 0.9))], [no_points, gt((A, 0))])
    assert aps(result) == pytest.approx((1.0, 1.0, 1.0))
    with pytest.raises(DataError):
        instance_ap([pred()], [gt(), gt()])


def test_torch_and_numpy_inputs_agree() -> None:
    gts = [gt((A, 0), (B, 0)), gt((C, 1))]
    preds = [pred((A, 0, 0.8), (A, 0, 0.9), (B, 0, 0.7)), pred((C, 1, 0.4))]

    def to_torch(d: dict) -> dict:
        return {k: torch.as_tensor(v) for k, v in d.items()}

    expected = instance_ap(preds, gts)
    got = instance_ap([to_torch(p) for p in preds], [to_torch(g) for g in gts])
    assert aps(got) == pytest.approx(aps(expected))
    # class 0: 19/24 (duplicate test), class 1: 1 -> mean 43/48
    assert got["AP"] == pytest.approx((19 / 24 + 1) / 2)


# ---------------------------------------------------------------- class-agnostic AP


def test_agnostic_ap_is_one_when_every_mask_is_right_and_every_class_wrong() -> None:
    # Three classes; each prediction's mask is a GT mask exactly, its class the next one.
    gts = [gt((A, 0), (B, 1), (C, 2)), gt((span((300, 450)), 1))]
    preds = [pred((A, 1, 0.9), (B, 2, 0.8), (C, 0, 0.7)), pred((span((300, 450)), 2, 0.6))]
    assert aps(instance_ap(preds, gts, num_classes=3)) == (0.0, 0.0, 0.0)
    agnostic = instance_ap(preds, gts, num_classes=3, class_agnostic=True)
    assert aps(agnostic) == (1.0, 1.0, 1.0)
    assert list(agnostic["per_class"]) == ["agnostic"]
    # labels are not needed at all
    unlabelled = [{"masks": p["masks"], "scores": p["scores"]} for p in preds]
    assert aps(instance_ap(unlabelled, gts, num_classes=3, class_agnostic=True)) == (1.0, 1.0, 1.0)


def test_agnostic_ap_keeps_void_labels_void() -> None:
    # GT labelled 7 (outside 3 classes) is void: not a missed instance, and a prediction on it
    # is ignored rather than a false positive. Made one class, it would cost recall: AP 1/2.
    gts = [gt((A, 0), (B, 7))]
    assert aps(instance_ap([pred((A, 2, 0.9))], gts, num_classes=3, class_agnostic=True)) == (
        1.0, 1.0, 1.0)
    on_void = [pred((A, 2, 0.9), (B, 1, 0.95))]
    assert aps(instance_ap(on_void, gts, num_classes=3, class_agnostic=True)) == (1.0, 1.0, 1.0)


# ---------------------------------------------------------------- diagnostics


def _diag_scenes() -> tuple[list[dict], list[dict]]:
    # Scene 0: A claimed twice (exact and [0, 90) at IoU .9) -> duplicate; B only overlapped by
    # [150, 200) at IoU 50/100 = .5, not > .5 -> unclaimed; C by [200, 260) at IoU .6; one
    # prediction on void points. Scene 1: D = A, no prediction -> unclaimed.
    # Scores and labels are ignored: every given mask counts.
    preds = [
        pred(
            (A, 0, 0.9),
            (span((0, 90)), 1, 0.01),
            (span((150, 200)), 0, 0.4),
            (span((200, 260)), 2, 0.0),
            (span((500, 600)), 0, 0.95),
        ),
        pred(),
    ]
    return preds, [gt((A, 0), (B, 0), (C, 0)), gt((A, 3))]


def test_diagnostics_hand_computed() -> None:
    # 5 + 0 predictions over 2 scenes: active 2.5. 4 GT: A duplicated -> 1/4; B, D unclaimed -> 2/4.
    d = instance_diagnostics(*_diag_scenes())
    expected = {"duplicate_rate": 0.25, "unclaimed_rate": 0.5, "active_queries": 2.5}
    assert d == pytest.approx({**expected, "num_gt": 4, "num_pred": 5})


def test_diagnostics_ignore_scores_and_use_the_iou_threshold() -> None:
    preds, gts = _diag_scenes()
    zero_scores = [{**p, "scores": np.zeros(len(p["scores"]))} for p in preds]
    assert instance_diagnostics(zero_scores, gts) == instance_diagnostics(preds, gts)
    # C's claim has IoU exactly 0.6: not > 0.6, so C becomes unclaimed too (B, C, D: 3/4).
    d = instance_diagnostics(preds, gts, iou_threshold=0.6)
    assert d["unclaimed_rate"] == pytest.approx(0.75)
    assert d["duplicate_rate"] == pytest.approx(0.25)  # [0, 90) still has IoU 0.9 with A
    # At 0.45 B's IoU of 0.5 is a claim: only D unclaimed.
    assert instance_diagnostics(preds, gts, iou_threshold=0.45)["unclaimed_rate"] == 0.25


def test_diagnostics_without_gt_and_with_torch() -> None:
    d = instance_diagnostics([pred((A, 0, 0.9))], [gt()])
    expected = {"duplicate_rate": 0.0, "unclaimed_rate": 0.0, "active_queries": 1.0}
    assert d == {**expected, "num_gt": 0, "num_pred": 1}
    assert instance_diagnostics([], [])["active_queries"] == 0.0
    assert instance_diagnostics([{}], [gt((A, 0))])["unclaimed_rate"] == 1.0
    preds, gts = _diag_scenes()
    as_torch = [{k: torch.as_tensor(v) for k, v in p.items()} for p in preds]
    gts_torch = [{k: torch.as_tensor(v) for k, v in g.items()} for g in gts]
    assert instance_diagnostics(as_torch, gts_torch) == instance_diagnostics(preds, gts)
    with pytest.raises(DataError, match="over the same points"):
        instance_diagnostics([{"masks": np.ones((1, 5), bool)}], [gt((A, 0))])
