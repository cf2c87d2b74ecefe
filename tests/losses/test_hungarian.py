"""Tests for the Mask2Former Hungarian baseline criterion (``ifsearch.losses.hungarian``).

The matcher is checked against a brute-force optimum of an independently written cost, so a wrong
cost definition or a wrong use of ``linear_sum_assignment`` both show up; the criterion is checked
for the invariances and edge cases training relies on (query order, empty scenes, images vs points,
deep supervision, gradients, point sampling).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ifsearch.losses.hungarian import (
    HungarianCriterion,
    HungarianMatcher,
    hungarian_assignment,
    sample_uncertain_points,
)

NUM_CLASSES = 3


def _reference_cost(
    logits: torch.Tensor,
    mask_logits: torch.Tensor,
    labels: torch.Tensor,
    target_masks: torch.Tensor,
    w_class: float,
    w_mask: float,
    w_dice: float,
) -> torch.Tensor:
    """Mask2Former's cost written pair by pair, independent of the vectorized implementation.

    Shapes: logits (M, C+1), mask_logits (N, M), labels (K,), target_masks (K, N) -> (M, K).
    """
    m, k = logits.shape[0], labels.shape[0]
    prob = logits.double().softmax(-1)
    cost = torch.zeros(m, k, dtype=torch.float64)
    for q in range(m):
        x = mask_logits[:, q].double()  # (N,)
        s = x.sigmoid()
        for j in range(k):
            t = target_masks[j].double()  # (N,)
            bce = F.binary_cross_entropy_with_logits(x, t)
            dice = 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
            cost[q, j] = -w_class * prob[q, labels[j]] + w_mask * bce + w_dice * dice
    return cost


def _brute_force_min(cost: torch.Tensor) -> float:
    """Minimum total cost over all injective target -> query assignments (K <= M)."""
    m, k = cost.shape
    return min(
        sum(cost[q, j].item() for j, q in enumerate(queries))
        for queries in itertools.permutations(range(m), k)
    )


def _random_scene(
    m: int, k: int, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One random scene: (M, C+1) logits, (N, M) mask logits and its target dict."""
    logits = torch.randn(m, NUM_CLASSES + 1, generator=generator)
    masks = 2 * torch.randn(n, m, generator=generator)
    target = {
        "labels": torch.randint(NUM_CLASSES, (k,), generator=generator),
        "masks": torch.rand(k, n, generator=generator) < 0.4,
    }
    return logits, masks, target


def _random_batch(
    sizes: list[tuple[int, int]], m: int = 5, seed: int = 0
) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """A point-cloud batch with scenes of (K_i, N_i) = sizes and leaf tensors requiring grad."""
    g = torch.Generator().manual_seed(seed)
    scenes = [_random_scene(m, k, n, g) for k, n in sizes]
    pred_logits = torch.stack([s[0] for s in scenes]).requires_grad_(True)
    pred_masks = [s[1].requires_grad_(True) for s in scenes]
    return {"pred_logits": pred_logits, "pred_masks": pred_masks}, [s[2] for s in scenes]


def _total(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(losses.values())


# --------------------------------------------------------------------------------------------------
# Matcher
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_matcher_equals_brute_force_optimum(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    m, k, n = 4, 3, 20
    logits, masks, target = _random_scene(m, k, n, g)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0)

    ref = _reference_cost(logits, masks, target["labels"], target["masks"], 2.0, 5.0, 5.0)
    cost = matcher.cost_matrix(logits, masks, target["labels"], target["masks"])
    assert cost.dtype == torch.float32
    torch.testing.assert_close(cost.double(), ref, rtol=1e-5, atol=1e-5)

    [(qi, ti)] = matcher({"pred_logits": logits[None], "pred_masks": [masks]}, [target])
    assert qi.dtype == ti.dtype == torch.int64
    assert len(qi) == len(ti) == k
    assert sorted(ti.tolist()) == list(range(k))
    assert len(set(qi.tolist())) == k
    assert ref[qi, ti].sum().item() == pytest.approx(_brute_force_min(ref), abs=1e-6)


def test_matcher_more_targets_than_queries() -> None:
    g = torch.Generator().manual_seed(7)
    logits, masks, target = _random_scene(3, 4, 20, g)
    [(qi, ti)] = HungarianMatcher()({"pred_logits": logits[None], "pred_masks": [masks]}, [target])
    ref = _reference_cost(logits, masks, target["labels"], target["masks"], 2.0, 5.0, 5.0)
    assert len(qi) == 3
    # Brute force on the transpose: every query gets a distinct target.
    assert ref[qi, ti].sum().item() == pytest.approx(_brute_force_min(ref.T), abs=1e-6)


def test_assignment_on_hand_written_cost() -> None:
    # 4 queries x 3 targets. Greedy (row by row) would give query 0 target 0 (cost 1) and then be
    # forced into 9 elsewhere; the optimum is q1->t0, q0->t1, q3->t2 with total 2 + 2 + 1 = 5.
    cost = torch.tensor(
        [
            [1.0, 2.0, 9.0],
            [2.0, 9.0, 9.0],
            [9.0, 9.0, 9.0],
            [9.0, 9.0, 1.0],
        ]
    )
    qi, ti = hungarian_assignment(cost)
    assert qi.tolist() == [0, 1, 3]
    assert ti.tolist() == [1, 0, 2]
    assert cost[qi, ti].sum().item() == _brute_force_min(cost) == 5.0


def test_matcher_obvious_outputs() -> None:
    # Query 2 predicts target 0 exactly, query 0 target 1, query 3 target 2; query 1 is junk.
    n = 6
    target_masks = torch.zeros(3, n, dtype=torch.bool)
    target_masks[0, 0:2] = True
    target_masks[1, 2:4] = True
    target_masks[2, 4:6] = True
    labels = torch.tensor([0, 1, 2])
    owner = {2: 0, 0: 1, 3: 2}
    mask_logits = torch.full((n, 4), -10.0)
    logits = torch.zeros(4, NUM_CLASSES + 1)
    logits[1, NUM_CLASSES] = 10.0
    for q, t in owner.items():
        mask_logits[target_masks[t], q] = 10.0
        logits[q, labels[t]] = 10.0
    outputs = {"pred_logits": logits[None], "pred_masks": [mask_logits]}
    [(qi, ti)] = HungarianMatcher()(outputs, [{"labels": labels, "masks": target_masks}])
    assert qi.tolist() == [0, 2, 3]
    assert ti.tolist() == [1, 0, 2]


def test_matcher_empty_scene_and_point_sampling() -> None:
    outputs, targets = _random_batch([(0, 10), (3, 40)], m=4)
    torch.manual_seed(0)
    indices = HungarianMatcher(num_points=16)(outputs, targets)
    assert indices[0][0].numel() == indices[0][1].numel() == 0
    assert indices[0][0].dtype == torch.int64
    assert sorted(indices[1][1].tolist()) == [0, 1, 2]
    assert len(set(indices[1][0].tolist())) == 3


def test_matcher_num_points_at_least_n_equals_exact() -> None:
    g = torch.Generator().manual_seed(3)
    logits, masks, target = _random_scene(4, 3, 20, g)
    exact = HungarianMatcher().cost_matrix(logits, masks, target["labels"], target["masks"])
    sampled = HungarianMatcher(num_points=50).cost_matrix(
        logits, masks, target["labels"], target["masks"]
    )
    torch.testing.assert_close(sampled, exact)


# --------------------------------------------------------------------------------------------------
# Criterion
# --------------------------------------------------------------------------------------------------


def test_loss_keys_and_weights() -> None:
    outputs, targets = _random_batch([(2, 12), (3, 15)])
    losses = HungarianCriterion(NUM_CLASSES)(outputs, targets)
    assert set(losses) == {"loss_class", "loss_mask", "loss_dice"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())

    # Same matching (the matcher is shared), doubled loss weights -> doubled losses.
    matcher = HungarianMatcher()
    base = HungarianCriterion(
        NUM_CLASSES, matcher=matcher, class_weight=1, mask_weight=1, dice_weight=1
    )
    double = HungarianCriterion(
        NUM_CLASSES, matcher=matcher, class_weight=2, mask_weight=2, dice_weight=2
    )
    lb, ld = base(outputs, targets), double(outputs, targets)
    for key in lb:
        torch.testing.assert_close(ld[key], 2 * lb[key])


def test_loss_matches_manual_mask2former_formula() -> None:
    outputs, targets = _random_batch([(2, 12), (3, 15)], m=4)
    crit = HungarianCriterion(NUM_CLASSES, class_weight=1, mask_weight=1, dice_weight=1)
    losses = crit(outputs, targets)
    indices = crit.matcher(outputs, targets)

    target_classes = torch.full((2, 4), NUM_CLASSES)
    bce, dice = 0.0, 0.0
    for b, (qi, ti) in enumerate(indices):
        target_classes[b, qi] = targets[b]["labels"][ti]
        for q, t in zip(qi.tolist(), ti.tolist()):
            x = outputs["pred_masks"][b][:, q].double()
            y = targets[b]["masks"][t].double()
            bce += F.binary_cross_entropy_with_logits(x, y).item()
            s = x.sigmoid()
            dice += (1 - (2 * (s * y).sum() + 1) / (s.sum() + y.sum() + 1)).item()
    weight = torch.ones(NUM_CLASSES + 1)
    weight[-1] = 0.1
    ce = F.cross_entropy(outputs["pred_logits"].transpose(1, 2), target_classes, weight)

    torch.testing.assert_close(losses["loss_class"], ce)
    assert losses["loss_mask"].item() == pytest.approx(bce / 5, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice / 5, rel=1e-5)


def test_loss_invariant_to_query_order() -> None:
    outputs, targets = _random_batch([(3, 20), (2, 25)], m=6)
    crit = HungarianCriterion(NUM_CLASSES)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    permuted = {
        "pred_logits": outputs["pred_logits"][:, perm],
        "pred_masks": [m[:, perm] for m in outputs["pred_masks"]],
    }
    a, b = crit(outputs, targets), crit(permuted, targets)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_perfect_prediction_beats_wrong_one() -> None:
    n, m = 30, 5
    g = torch.Generator().manual_seed(0)
    owner = torch.randint(3, (n,), generator=g)
    target = {"labels": torch.tensor([2, 0, 1]), "masks": owner[None] == torch.arange(3)[:, None]}

    perfect_masks = torch.full((n, m), -20.0)
    perfect_logits = torch.full((m, NUM_CLASSES + 1), -20.0)
    perfect_logits[:, NUM_CLASSES] = 20.0  # unmatched queries: confident no-object
    for k in range(3):
        perfect_masks[target["masks"][k], k] = 20.0
        perfect_logits[k] = -20.0
        perfect_logits[k, target["labels"][k]] = 20.0

    # Wrong: same confidence, but every query owns the wrong points and predicts the wrong class.
    wrong_masks = torch.full((n, m), 20.0)
    wrong_masks[:, :3] = -perfect_masks[:, :3]
    wrong_logits = perfect_logits.roll(1, dims=1)

    crit = HungarianCriterion(NUM_CLASSES)
    good = crit({"pred_logits": perfect_logits[None], "pred_masks": [perfect_masks]}, [target])
    bad = crit({"pred_logits": wrong_logits[None], "pred_masks": [wrong_masks]}, [target])
    assert _total(good).item() < 1e-3
    assert _total(bad).item() > 10.0
    for key in good:
        assert good[key] < bad[key]


def test_empty_scene_only_class_loss_and_backward() -> None:
    outputs, targets = _random_batch([(0, 10), (0, 7)], m=4)
    losses = HungarianCriterion(NUM_CLASSES)(outputs, targets)
    assert losses["loss_mask"].item() == 0.0
    assert losses["loss_dice"].item() == 0.0
    assert losses["loss_mask"].requires_grad and losses["loss_dice"].requires_grad
    # All queries are no-object: the weighted mean CE equals the plain mean of -log p(no-object).
    expected = -outputs["pred_logits"].log_softmax(-1)[..., NUM_CLASSES].mean()
    torch.testing.assert_close(losses["loss_class"], 2.0 * expected)
    _total(losses).backward()
    assert outputs["pred_logits"].grad is not None
    assert all(m.grad is not None and m.grad.abs().sum() == 0 for m in outputs["pred_masks"])


def test_mixed_batch_variable_n_matches_per_scene() -> None:
    sizes = [(2, 11), (0, 5), (3, 37)]
    outputs, targets = _random_batch(sizes, m=5)
    crit = HungarianCriterion(NUM_CLASSES)
    batch = crit(outputs, targets)
    assert all(torch.isfinite(v) for v in batch.values())

    # Mask losses are sums over all matched pairs / total masks, so they decompose over scenes.
    total_masks = sum(k for k, _ in sizes)
    for key in ("loss_mask", "loss_dice"):
        per_scene = 0.0
        for b, (k, _) in enumerate(sizes):
            single = {
                "pred_logits": outputs["pred_logits"][b : b + 1],
                "pred_masks": [outputs["pred_masks"][b]],
            }
            per_scene += crit(single, [targets[b]])[key].item() * k  # undo its own / K
        assert batch[key].item() == pytest.approx(per_scene / total_masks, rel=1e-5)


def test_image_input_equals_flattened_points() -> None:
    b, m, h, w = 2, 5, 4, 6
    g = torch.Generator().manual_seed(5)
    pred_logits = torch.randn(b, m, NUM_CLASSES + 1, generator=g)
    pred_masks = 3 * torch.randn(b, m, h, w, generator=g)
    targets_img = [
        {"labels": torch.tensor([0, 2]), "masks": torch.rand(2, h, w, generator=g) < 0.5},
        {"labels": torch.tensor([1, 1, 0]), "masks": torch.rand(3, h, w, generator=g) < 0.5},
    ]
    targets_pts = [{"labels": t["labels"], "masks": t["masks"].flatten(1)} for t in targets_img]
    crit = HungarianCriterion(NUM_CLASSES)
    img = crit({"pred_logits": pred_logits, "pred_masks": pred_masks}, targets_img)
    pts = crit(
        {"pred_logits": pred_logits, "pred_masks": list(pred_masks.flatten(2).transpose(1, 2))},
        targets_pts,
    )
    assert set(img) == set(pts)
    for key in img:
        torch.testing.assert_close(img[key], pts[key])


def test_aux_layers_add_keys() -> None:
    outputs, targets = _random_batch([(2, 12), (3, 15)])
    aux = [_random_batch([(2, 12), (3, 15)], seed=s)[0] for s in (1, 2)]
    crit = HungarianCriterion(NUM_CLASSES)
    main_only = crit(outputs, targets)
    losses = crit({**outputs, "aux_outputs": aux}, targets)

    names = ("loss_class", "loss_mask", "loss_dice")
    assert set(losses) == set(names) | {f"{n}_{i}" for n in names for i in (0, 1)}
    for i, layer in enumerate(aux):
        alone = crit(layer, targets)
        for n in names:
            torch.testing.assert_close(losses[f"{n}_{i}"], alone[n])
    for n in names:
        torch.testing.assert_close(losses[n], main_only[n])
    expected = _total(main_only) + sum(_total(crit(layer, targets)) for layer in aux)
    torch.testing.assert_close(_total(losses), expected)

    no_ds = HungarianCriterion(NUM_CLASSES, deep_supervision=False)
    assert set(no_ds({**outputs, "aux_outputs": aux}, targets)) == set(names)


def test_gradients_reach_logits_and_masks() -> None:
    outputs, targets = _random_batch([(2, 12), (3, 15)])
    aux = _random_batch([(2, 12), (3, 15)], seed=9)[0]
    _total(HungarianCriterion(NUM_CLASSES)({**outputs, "aux_outputs": [aux]}, targets)).backward()
    for out in (outputs, aux):
        assert out["pred_logits"].grad is not None and out["pred_logits"].grad.abs().sum() > 0
        for m in out["pred_masks"]:
            assert m.grad is not None and m.grad.abs().sum() > 0


def test_point_sampling_path_finite_and_differentiable() -> None:
    torch.manual_seed(0)
    outputs, targets = _random_batch([(2, 40), (0, 9), (3, 64)])
    crit = HungarianCriterion(NUM_CLASSES, num_points=16)
    assert crit.matcher.num_points == 16
    losses = crit(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] > 0 and losses["loss_dice"] > 0
    _total(losses).backward()
    assert outputs["pred_masks"][0].grad.abs().sum() > 0

    # Images take the same index-sampling path.
    img = {"pred_logits": torch.randn(1, 5, NUM_CLASSES + 1), "pred_masks": torch.randn(1, 5, 8, 8)}
    img_t = [{"labels": torch.tensor([1, 2]), "masks": torch.rand(2, 8, 8) < 0.5}]
    assert all(math.isfinite(v.item()) for v in crit(img, img_t).values())


def test_importance_sampling_prefers_uncertain_points() -> None:
    torch.manual_seed(0)
    n = 200
    logits = torch.full((4, n), 10.0)
    logits[:, ::2] = 0.0  # every other point sits on the decision boundary
    idx = sample_uncertain_points(
        logits, num_points=8, oversample_ratio=3.0, importance_sample_ratio=1.0
    )
    assert idx.shape == (4, 8) and idx.dtype == torch.int64
    assert (logits.gather(1, idx) == 0).all()

    mixed = sample_uncertain_points(
        logits, num_points=8, oversample_ratio=3.0, importance_sample_ratio=0.75
    )
    assert mixed.shape == (4, 8)
    assert (logits.gather(1, mixed[:, :6]) == 0).all()  # the 6 importance-sampled points
    assert ((0 <= mixed) & (mixed < n)).all()


def test_image_empty_scene_same_resolution() -> None:
    outputs = {
        "pred_logits": torch.randn(2, 4, NUM_CLASSES + 1, requires_grad=True),
        "pred_masks": torch.randn(2, 4, 8, 8, requires_grad=True),
    }
    targets = [
        {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 8).bool()},
        {"labels": torch.tensor([1]), "masks": torch.rand(1, 16, 16) < 0.5},  # resized to 8 x 8
    ]
    losses = HungarianCriterion(NUM_CLASSES)(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    _total(losses).backward()
    assert outputs["pred_masks"].grad.abs().sum() > 0


def test_image_empty_scene_other_resolution() -> None:
    outputs = {
        "pred_logits": torch.randn(1, 4, NUM_CLASSES + 1),
        "pred_masks": torch.randn(1, 4, 8, 8),
    }
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 16, 16).bool()}]
    losses = HungarianCriterion(NUM_CLASSES)(outputs, targets)
    assert losses["loss_mask"].item() == 0.0
