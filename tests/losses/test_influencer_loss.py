"""MaskInfluencerLoss and InfluencerCriterion against hand-computed cases and properties."""

import math

import pytest
import torch

from ifsearch.losses import InfluencerCriterion, MaskInfluencerLoss, mask_log_probs
from ifsearch.losses.criterion import class_targets, soft_cross_entropy


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p) - torch.log1p(-p)


# Points 0,1 belong to instance 1, point 2 to instance 2, point 3 is background.
PROBS = [[0.8, 0.1], [0.8, 0.1], [0.2, 0.9], [0.1, 0.3]]
LABELS = torch.tensor([1, 1, 2, 0])


def test_sigmoid_matches_hand_computed_formula():
    loss = MaskInfluencerLoss(margin=1.5, temperature=1.0, eps=0.0)
    out = loss(logit(PROBS), LABELS)
    # g_1 = [log .8, log .1], g_2 = [log .2, log .9]
    # A = mean(-log(.8 + .1), -log(.2 + .9)) = -log(.99) / 2
    # profiles [.8, .1], [.2, .9] are sqrt(.36 + .64) = 1 apart -> hinge 1.5 - 1 = 0.5
    # background point: mean(.1, .3) = .2
    assert out["attractive"].item() == pytest.approx(-math.log(0.99) / 2, abs=1e-6)
    assert out["repulsive"].item() == pytest.approx(0.5, abs=1e-6)
    assert out["background"].item() == pytest.approx(0.2, abs=1e-6)
    assert out["loss"].item() == pytest.approx(-math.log(0.99) / 2 + 0.7, abs=1e-6)


def test_temperature_and_weights():
    loss = MaskInfluencerLoss(attr_weight=2.0, rep_weight=3.0, bg_weight=0.5, margin=1.5,
                              temperature=0.5, eps=0.0)
    out = loss(logit(PROBS), LABELS)
    # A_k = -T log sum_m exp(g_km / T) = -0.5 log(sum_m p_km^2)
    attractive = (-0.5 * math.log(0.65) - 0.5 * math.log(0.85)) / 2
    assert out["attractive"].item() == pytest.approx(attractive, abs=1e-6)
    assert out["loss"].item() == pytest.approx(2 * attractive + 3 * 0.5 + 0.5 * 0.2, abs=1e-6)


def test_geometric_mean_needs_unanimous_points():
    # Query 0 has p = .9 and .1 on the two points of instance 1: geometric mean .3, not .5.
    logits = logit([[0.9, 0.5], [0.1, 0.5]])
    out = MaskInfluencerLoss()(logits, torch.tensor([1, 1]))
    assert torch.allclose(out["log_geomean"].exp(), torch.tensor([[0.3, 0.5]], dtype=torch.float64))


def test_softmax_mode_matches_formula():
    x = torch.tensor([[2.0, -1.0], [1.0, 0.5], [-2.0, 3.0]], dtype=torch.float64)
    labels = torch.tensor([1, 1, 0])
    out = MaskInfluencerLoss(mask_prob="softmax", margin=0.0)(x, labels)
    # p_im = exp(x_im) / (1 + sum_m exp(x_im)): the background slot has logit 0.
    p = x.exp() / (1 + x.exp().sum(1, keepdim=True))
    g = p[:2].log().mean(0)
    assert out["attractive"].item() == pytest.approx(-torch.logsumexp(g, 0).item(), abs=1e-9)
    # Softmax background: the queries' summed probability on the point (1 - the background slot).
    assert out["background"].item() == pytest.approx(p[2].sum().item(), abs=1e-9)
    assert out["repulsive"].item() == 0.0  # K = 1: no pairs


def softmax_logits(probs):
    """Logits whose softmax over the queries and a background slot (logit 0) gives ``probs``."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    return p.log() - (1 - p.sum(dim=1, keepdim=True)).log()


def test_softmax_background_is_the_mean_over_points_of_the_summed_probability():
    # Two background points with p = [1/4, 1/2] and [3/8, 1/2] (background slot 1/4 and 1/8), one
    # instance point. B = mean(3/4, 7/8) = 13/16, in [0, 1] as in sigmoid mode; the mean over
    # queries too (13/32) would shrink the term by M.
    x = softmax_logits([[0.25, 0.5], [0.375, 0.5], [0.6, 0.3]])
    out = MaskInfluencerLoss(mask_prob="softmax")(x, torch.tensor([0, 0, 1]))
    assert out["background"].item() == pytest.approx(13 / 16, abs=1e-12)
    probs = [[0.25, 0.5], [0.375, 0.5], [0.6, 0.3]]
    sigmoid = MaskInfluencerLoss(mask_prob="sigmoid")(logit(probs), torch.tensor([0, 0, 1]))
    assert sigmoid["background"].item() == pytest.approx(13 / 32, abs=1e-12)  # mean over queries


def test_softmax_with_one_query_equals_sigmoid():
    x = torch.randn(20, 1, dtype=torch.float64)
    labels = torch.randint(0, 3, (20,))
    a = MaskInfluencerLoss(mask_prob="sigmoid")(x, labels, num_instances=2)
    b = MaskInfluencerLoss(mask_prob="softmax")(x, labels, num_instances=2)
    for key in ("loss", "attractive", "repulsive", "background"):
        assert a[key].item() == pytest.approx(b[key].item(), abs=1e-9)


def _assignment_logits(assign, n_per_instance=10, num_queries=3, on=8.0):
    """Logits where query assign[i] claims point i strongly and all else is off."""
    n = len(assign)
    x = torch.full((n, num_queries), -on, dtype=torch.float64)
    x[torch.arange(n), torch.tensor(assign)] = on
    return x


@pytest.mark.parametrize("mean", ["geometric", "arithmetic"])
@pytest.mark.parametrize("mask_prob", ["sigmoid", "softmax"])
def test_correct_assignment_beats_merged_and_mixed(mask_prob, mean):
    labels = torch.tensor([1] * 10 + [2] * 10)
    loss = MaskInfluencerLoss(mask_prob=mask_prob, margin=1.0, mean=mean)
    correct = loss(_assignment_logits([0] * 10 + [1] * 10), labels)["loss"]
    merged = loss(_assignment_logits([0] * 20), labels)["loss"]
    mixed = loss(_assignment_logits([0, 1] * 5 + [1, 0] * 5), labels)["loss"]
    assert correct < merged
    assert correct < mixed


@pytest.mark.parametrize("mask_prob", ["sigmoid", "softmax"])
def test_invariant_to_query_permutation(mask_prob):
    torch.manual_seed(0)
    x = torch.randn(50, 7, dtype=torch.float64)
    labels = torch.randint(0, 5, (50,))
    loss = MaskInfluencerLoss(mask_prob=mask_prob, margin=1.2, temperature=0.3)
    a = loss(x, labels)
    b = loss(x[:, torch.randperm(7)], labels)
    for key in ("loss", "attractive", "repulsive", "background"):
        assert a[key].item() == pytest.approx(b[key].item(), abs=1e-9)


@pytest.mark.parametrize("mask_prob", ["sigmoid", "softmax"])
def test_gradients_reach_every_instance_point(mask_prob):
    torch.manual_seed(1)
    x = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (40,))
    MaskInfluencerLoss(mask_prob=mask_prob, margin=2.0)(x, labels)["loss"].backward()
    row_grad = x.grad.abs().sum(dim=1)
    assert torch.all(row_grad[labels > 0] > 0)
    assert torch.all(row_grad[labels == 0] > 0)  # background suppression reaches them too


def test_k0_only_background():
    x = torch.randn(10, 4, requires_grad=True)
    out = MaskInfluencerLoss()(x, torch.zeros(10, dtype=torch.long))
    assert out["attractive"].item() == 0.0 and out["repulsive"].item() == 0.0
    assert out["loss"].item() == pytest.approx(torch.sigmoid(x).mean().item(), abs=1e-6)
    out["loss"].backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_k1_has_no_repulsion_and_empty_scene_is_zero():
    x = torch.randn(10, 4)
    out = MaskInfluencerLoss()(x, torch.ones(10, dtype=torch.long))
    assert out["repulsive"].item() == 0.0 and out["background"].item() == 0.0
    empty = MaskInfluencerLoss()(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert empty["loss"].item() == 0.0


def test_empty_instance_masks_and_sparse_ids_are_ignored():
    torch.manual_seed(2)
    x = torch.randn(30, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (30,))
    loss = MaskInfluencerLoss(margin=1.3)
    dense = loss(x, labels)
    sparse_ids = loss(x, labels * 3)  # ids {0, 3, 6}: ids 1, 2, 4, 5 carry no points
    masks = torch.stack([labels == 1, torch.zeros(30, dtype=torch.bool), labels == 2])
    with_empty = loss.forward_masks(x, masks)
    for other in (sparse_ids, with_empty):
        assert other["loss"].item() == pytest.approx(dense["loss"].item(), abs=1e-9)


def test_equal_profiles_give_finite_gradients():
    # Two instances with identical logits have identical profiles: distance 0 inside the sqrt.
    x = torch.zeros(4, 3, requires_grad=True)
    MaskInfluencerLoss(margin=1.0)(x, torch.tensor([1, 1, 2, 2]))["loss"].backward()
    assert torch.isfinite(x.grad).all()


def test_extreme_logits_stay_finite():
    x = torch.tensor([[200.0, -200.0], [-200.0, 200.0], [-200.0, -200.0]], requires_grad=True)
    for mode in ("sigmoid", "softmax"):
        out = MaskInfluencerLoss(mask_prob=mode)(x, torch.tensor([1, 2, 0]))
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and torch.isfinite(x.grad).all()
        x.grad = None


def test_invalid_arguments():
    with pytest.raises(ValueError, match="mask_prob"):
        MaskInfluencerLoss(mask_prob="tanh")
    with pytest.raises(ValueError, match="temperature"):
        MaskInfluencerLoss(temperature=0)


# Every variant of the loss and every class-target rule of the criterion (the criterion adds the
# class targets, built without a host sync).
SYNC_VARIANTS = [{"mask_prob": "sigmoid"}, {"mask_prob": "softmax"},
                 {"mask_prob": "softmax", "mean": "arithmetic"},
                 {"mask_prob": "sigmoid", "spill_weight": 1.0, "duplicate_weight": 1.0}]


def _sync_check_inputs(device, variant=None):
    """Logits (N, M) = (1000, 16), instance masks (K, N) = (5, 1000), class logits and labels
    on ``device``, built before the sync check starts (copying them to the GPU is itself a
    sync), with the loss and the three criteria of ``variant``."""
    variant = variant or {"mask_prob": "softmax"}
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, 16, generator=g).to(device).requires_grad_()
    masks = (torch.rand(5, 1000, generator=g) > 0.7).to(device)
    class_logits = torch.randn(1, 16, 4, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, 3, (5,), generator=g).to(device)
    loss = MaskInfluencerLoss(**variant).to(device)
    criteria = [InfluencerCriterion(num_classes=3, class_target=rule, **variant).to(device)
                for rule in ("threshold", "best_query", "soft")]
    return logits, masks, class_logits, labels, loss, criteria


def _loss_forward_backward(logits, masks, class_logits, labels, loss, criteria):
    """What the GPU test watches: the loss's and the criteria's forward and backward."""
    value = loss.forward_masks(logits, masks)["loss"]
    value.backward()
    outputs = {"pred_logits": class_logits, "pred_masks": [logits]}
    targets = [{"labels": labels, "masks": masks}]
    for criterion in criteria:
        sum(criterion(outputs, targets).values()).backward()
    return value.detach()


@pytest.mark.parametrize("variant", SYNC_VARIANTS, ids=str)
def test_sync_check_body_runs_on_cpu(variant):
    """The GPU test's inputs and body, run where there is no GPU (so they stay correct)."""
    logits, masks, class_logits, labels, loss, criteria = _sync_check_inputs("cpu", variant)
    value = _loss_forward_backward(logits, masks, class_logits, labels, loss, criteria)
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0 and class_logits.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: torch.cuda.set_sync_debug_mode watches CUDA only")
@pytest.mark.parametrize("variant", SYNC_VARIANTS, ids=str)
def test_no_host_sync_on_gpu(variant):
    """Forward + backward of the loss and the criteria never synchronise with the host: in sync
    debug mode "error" any synchronising call raises (checked on a deliberate `.item()` first)."""
    inputs = _sync_check_inputs("cuda", variant)
    probe = torch.ones(1, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            probe.item()  # the mode is on: a sync raises
        value = _loss_forward_backward(*inputs)  # raises on any host sync
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu_inputs = _sync_check_inputs("cpu", variant)
    expected = _loss_forward_backward(*cpu_inputs)
    assert value.item() == pytest.approx(expected.item(), rel=1e-4)  # it ran, and right
    assert torch.allclose(inputs[0].grad.cpu(), cpu_inputs[0].grad, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------------------
# InfluencerCriterion


def _outputs(masks, num_classes=3, num_queries=4, aux=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = len(masks) if isinstance(masks, list) else masks.shape[0]
    out = {"pred_logits": torch.randn(batch, num_queries, num_classes + 1, generator=g),
           "pred_masks": masks}
    out["aux_outputs"] = [{"pred_logits": out["pred_logits"] * (i + 2), "pred_masks": masks}
                          for i in range(aux)]
    return out


def test_criterion_images_equal_flattened_points():
    torch.manual_seed(3)
    image_masks = torch.randn(2, 4, 5, 6)  # (B, M, H, W)
    targets_img = [{"labels": torch.tensor([0, 2]), "masks": torch.rand(2, 5, 6) > 0.5},
                   {"labels": torch.tensor([1]), "masks": torch.rand(1, 5, 6) > 0.5}]
    targets_pts = [{"labels": t["labels"], "masks": t["masks"].flatten(1)} for t in targets_img]
    point_masks = [m.flatten(1).T for m in image_masks]  # (H*W, M) per scene
    criterion = InfluencerCriterion(num_classes=3, margin=1.2)
    a = criterion(_outputs(image_masks), targets_img)
    b = criterion(_outputs(point_masks), targets_pts)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].item() == pytest.approx(b[key].item(), abs=1e-6)


def test_criterion_resizes_image_targets_to_prediction_size():
    pred = torch.randn(1, 4, 4, 4)
    full = torch.zeros(1, 8, 8, dtype=torch.bool)
    full[0, :4, :4] = True  # nearest-downsampled: the top-left 2x2 prediction pixels
    small = torch.zeros(1, 4, 4, dtype=torch.bool)
    small[0, :2, :2] = True
    criterion = InfluencerCriterion(num_classes=3)
    a = criterion(_outputs(pred), [{"labels": torch.tensor([1]), "masks": full}])
    b = criterion(_outputs(pred), [{"labels": torch.tensor([1]), "masks": small}])
    assert sum(a.values()).item() == pytest.approx(sum(b.values()).item(), abs=1e-6)


def test_criterion_ignored_pixels_leave_the_background_term():
    """Crowd regions and image padding ("ignore") are neither instance nor background."""
    torch.manual_seed(4)
    pred = torch.randn(1, 3, 4, 4)
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    ignore = torch.zeros(4, 4, dtype=torch.bool)
    ignore[:, 3] = True  # e.g. padding on the right
    criterion = InfluencerCriterion(num_classes=2, mask_prob="softmax", deep_supervision=False)
    outputs = _outputs(pred, num_classes=2, num_queries=3)
    out = criterion(outputs, [{"labels": torch.tensor([1]), "masks": masks, "ignore": ignore}])
    logits = pred[0].flatten(1).T  # (16, 3)
    background = ~masks[0].flatten() & ~ignore.flatten()
    direct = criterion.mask_loss.forward_masks(logits, masks.flatten(1), background=background)
    assert out["loss_background"].item() == pytest.approx(direct["background"].item(), abs=1e-6)
    plain = criterion(outputs, [{"labels": torch.tensor([1]), "masks": masks}])
    assert plain["loss_background"].item() != pytest.approx(out["loss_background"].item())
    assert plain["loss_attractive"].item() == pytest.approx(out["loss_attractive"].item())
    # An ignore map at the input resolution is resized like the masks.
    big_masks = masks.repeat_interleave(2, 1).repeat_interleave(2, 2)
    big_ignore = ignore.repeat_interleave(2, 0).repeat_interleave(2, 1)
    big = criterion(_outputs(pred, num_classes=2, num_queries=3),
                    [{"labels": torch.tensor([1]), "masks": big_masks, "ignore": big_ignore}])
    assert big["loss_background"].item() == pytest.approx(out["loss_background"].item(), abs=1e-6)


def test_criterion_aux_layers_add_their_terms():
    masks = [torch.randn(30, 4), torch.randn(20, 4)]
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.rand(2, 30) > 0.5},
               {"labels": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, 20, dtype=torch.bool)}]
    criterion = InfluencerCriterion(num_classes=3)
    main = criterion(_outputs(masks), targets)
    with_aux = criterion(_outputs(masks, aux=2), targets)
    names = ["loss_attractive", "loss_repulsive", "loss_background", "loss_class"]
    assert set(main) == set(names)
    assert set(with_aux) == set(names) | {f"{n}_{i}" for n in names for i in (0, 1)}
    aux_only = sum(v for k, v in with_aux.items() if k[-1].isdigit())
    assert sum(with_aux.values()).item() == pytest.approx(
        (sum(main.values()) + aux_only).item(), abs=1e-5)
    assert InfluencerCriterion(num_classes=3, deep_supervision=False)(
        _outputs(masks, aux=2), targets).keys() == main.keys()


def test_criterion_weights_and_gradients():
    masks = [torch.randn(30, 4, requires_grad=True)]
    outputs = _outputs(masks)
    outputs["pred_logits"].requires_grad_(True)
    targets = [{"labels": torch.tensor([2]), "masks": torch.arange(30) < 10}]
    targets[0]["masks"] = targets[0]["masks"][None]
    base = InfluencerCriterion(num_classes=3, margin=1.0)(outputs, targets)
    heavy = InfluencerCriterion(num_classes=3, attr_weight=3.0, class_weight=5.0)(outputs, targets)
    assert heavy["loss_attractive"].item() == pytest.approx(3 * base["loss_attractive"].item())
    assert heavy["loss_class"].item() == pytest.approx(2.5 * base["loss_class"].item())
    sum(base.values()).backward()
    assert masks[0].grad.abs().sum() > 0 and outputs["pred_logits"].grad.abs().sum() > 0


def test_class_targets_follow_the_strongest_claim():
    # Query 1 claims instance 0 (class 2) with p ~ 1; the other queries claim nothing.
    mask = torch.full((20, 3), -10.0)
    mask[:10, 1] = 10.0
    targets = [{"labels": torch.tensor([2]), "masks": (torch.arange(20) < 10)[None]}]
    criterion = InfluencerCriterion(num_classes=3, claim_threshold=0.5)
    out = criterion(_outputs([mask], num_queries=3), targets)
    log_g = criterion.mask_loss.forward_masks(mask, targets[0]["masks"])["log_geomean"]
    assert criterion._class_targets(log_g, targets[0]["labels"]).tolist() == [3, 2, 3]
    # A class head that predicts exactly those targets has a lower class loss.
    good = torch.full((1, 3, 4), -10.0)
    good[0, [0, 2], 3] = 10.0
    good[0, 1, 2] = 10.0
    better = criterion({"pred_logits": good, "pred_masks": [mask]}, targets)
    assert better["loss_class"] < out["loss_class"]


def test_criterion_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="targets"):
        InfluencerCriterion(num_classes=3)(_outputs([torch.randn(5, 4)]), [])


@pytest.mark.parametrize("mask_prob", ["sigmoid", "softmax"])
def test_hand_written_backward_matches_numerical_gradients(mask_prob, monkeypatch):
    """The (N, M) reductions have a hand-written backward: check it in float64, over several
    CPU chunks, with an empty instance, overlapping masks and an explicit background."""
    from torch.autograd import gradcheck

    from ifsearch.losses import influencer

    monkeypatch.setattr(influencer, "CPU_CHUNK_ELEMENTS", 16)  # 4 rows of 4 queries per chunk
    torch.manual_seed(0)
    x = (torch.randn(13, 4, dtype=torch.float64) * 3).requires_grad_()
    masks = torch.rand(3, 13) > 0.5
    masks[2] = False  # an empty instance
    background = torch.rand(13) > 0.4

    foreground = masks.any(dim=0)
    foreground[0] = True  # a point outside every instance but counted as foreground

    for want_log, want_prob, fg in [(True, False, None), (False, True, None),
                                    (True, True, foreground), (False, False, foreground)]:
        def terms(logits, want_log=want_log, want_prob=want_prob, fg=fg):
            out = influencer._MaskMatrixTerms.apply(logits, masks, background, fg, mask_prob,
                                                    want_log, want_prob)
            return out[:4]  # log sums, prob sums, foreground prob sums, background sum

        assert gradcheck(terms, (x,), eps=1e-6, atol=1e-6), (want_log, want_prob, fg is not None)
    # The whole loss, except spill: its weights c_km are detached, so its gradient is by design
    # not the numerical derivative (test_spill_gradient_holds_the_assignment_fixed checks it).
    for mean in ("geometric", "arithmetic"):
        for duplicate in (0.0, 1.3):
            loss = MaskInfluencerLoss(mask_prob=mask_prob, margin=1.5, temperature=0.7, mean=mean,
                                      duplicate_weight=duplicate)
            assert gradcheck(lambda z: loss.forward_masks(z, masks[:2], background)["loss"], (x,),
                             eps=1e-6, atol=1e-6), (mean, duplicate)


# ------------------------------------------------------------------------------------------
# Arithmetic mean, spill-over and duplicate terms

# Instance 1 = points 0, 1; instance 2 = point 2; point 3 is background.
PROBS2 = [[0.9, 0.2], [0.5, 0.4], [0.1, 0.7], [0.2, 0.6]]


@pytest.mark.parametrize("mask_prob", ["sigmoid", "softmax"])
def test_arithmetic_mean_matches_hand_computed_formula(mask_prob):
    x = logit(PROBS2) if mask_prob == "sigmoid" else softmax_logits(
        [[0.6, 0.2], [0.2, 0.4], [0.1, 0.7], [0.2, 0.6]])
    out = MaskInfluencerLoss(mask_prob=mask_prob, mean="arithmetic", margin=1.5, eps=0.0)(
        x, LABELS)
    if mask_prob == "sigmoid":
        # P_1 = [(.9 + .5) / 2, (.2 + .4) / 2] = [.7, .3], P_2 = [.1, .7]
        p1, p2, background = [0.7, 0.3], [0.1, 0.7], (0.2 + 0.6) / 2
    else:
        # P_1 = [(.6 + .2) / 2, (.2 + .4) / 2] = [.4, .3]; background: .2 + .6 (summed)
        p1, p2, background = [0.4, 0.3], [0.1, 0.7], 0.8
    assert torch.allclose(out["log_geomean"].exp(), torch.tensor([p1, p2], dtype=torch.float64))
    attractive = (-math.log(sum(p1)) - math.log(sum(p2))) / 2
    distance = math.dist(p1, p2)
    assert out["attractive"].item() == pytest.approx(attractive, abs=1e-9)
    assert out["repulsive"].item() == pytest.approx(1.5 - distance, abs=1e-9)
    assert out["background"].item() == pytest.approx(background, abs=1e-9)
    # The geometric mean of the same points is lower: sqrt(.9 * .5) < .7.
    if mask_prob == "sigmoid":
        geometric = MaskInfluencerLoss(margin=1.5, eps=0.0)(x, LABELS)["log_geomean"].exp()
        assert geometric[0, 0].item() == pytest.approx(math.sqrt(0.45), abs=1e-9)


def test_arithmetic_mean_of_zero_probabilities_is_clamped_not_minus_infinity():
    x = torch.tensor([[-200.0, 5.0], [-200.0, 5.0]], requires_grad=True)  # fp32 sigmoid(-200) = 0
    out = MaskInfluencerLoss(mean="arithmetic")(x, torch.tensor([1, 1]))
    tiny = torch.finfo(torch.float32).tiny
    assert out["log_geomean"][0, 0].item() == pytest.approx(math.log(tiny))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(x.grad).all()


def test_spill_matches_hand_computed_formula():
    # T = 1, geometric g. F = {0, 1, 2}.
    # Instance 1: P_1 = [sqrt(.9 * .5), sqrt(.2 * .4)], its other-instance points are {2}:
    #   o_1 = [.1, .7]. Instance 2: P_2 = [.1, .7], other points {0, 1}: o_2 = [.7, .3].
    # c_k = softmax_m(g_km) = P_k / sum_m P_km.
    loss = MaskInfluencerLoss(spill_weight=1.0, attr_weight=0.0, rep_weight=0.0, bg_weight=0.0)
    out = loss(logit(PROBS2), LABELS)
    p1 = [math.sqrt(0.45), math.sqrt(0.08)]
    spill_1 = (p1[0] * 0.1 + p1[1] * 0.7) / sum(p1)
    spill_2 = (0.1 * 0.7 + 0.7 * 0.3) / 0.8
    assert out["spill"].item() == pytest.approx((spill_1 + spill_2) / 2, abs=1e-9)
    assert out["loss"].item() == pytest.approx((spill_1 + spill_2) / 2, abs=1e-9)
    # Temperature 0.5 sharpens c_k to P_k^2 / sum_m P_km^2; a weight scales the term into the loss.
    cold = MaskInfluencerLoss(spill_weight=2.0, temperature=0.5)(logit(PROBS2), LABELS)
    spill_1 = (0.45 * 0.1 + 0.08 * 0.7) / 0.53
    spill_2 = (0.01 * 0.7 + 0.49 * 0.3) / 0.5
    assert cold["spill"].item() == pytest.approx((spill_1 + spill_2) / 2, abs=1e-9)
    plain = MaskInfluencerLoss(temperature=0.5)(logit(PROBS2), LABELS)
    assert cold["loss"].item() == pytest.approx(
        plain["loss"].item() + 2.0 * (spill_1 + spill_2) / 2, abs=1e-9)


def test_spill_softmax_arithmetic_and_a_lone_instance():
    # Softmax, arithmetic: P_1 = [.4, .3] (see above), P_2 = [.1, .7]; o_1 = [.1, .7] (point 2),
    # o_2 = mean of points 0, 1 = [.4, .3]. Background point 3 does not count.
    probs = [[0.6, 0.2], [0.2, 0.4], [0.1, 0.7], [0.2, 0.6]]
    out = MaskInfluencerLoss(mask_prob="softmax", mean="arithmetic", spill_weight=1.0)(
        softmax_logits(probs), LABELS)
    spill_1 = (0.4 * 0.1 + 0.3 * 0.7) / 0.7
    spill_2 = (0.1 * 0.4 + 0.7 * 0.3) / 0.8
    assert out["spill"].item() == pytest.approx((spill_1 + spill_2) / 2, abs=1e-9)
    # One instance: no other instance points, so nothing spills (background is B's job).
    alone = MaskInfluencerLoss(spill_weight=1.0)(logit(PROBS2), torch.tensor([1, 1, 0, 0]))
    assert alone["spill"].item() == 0.0


def test_duplicate_matches_hand_computed_formula_and_spares_the_strongest_query():
    # P_1 = [sqrt(.45), sqrt(.08)]: all but the strongest = sqrt(.08); P_2 = [.1, .7]: .1.
    x = logit(PROBS2).requires_grad_()
    loss = MaskInfluencerLoss(duplicate_weight=1.0, attr_weight=0.0, rep_weight=0.0,
                              bg_weight=0.0)
    out = loss(x, LABELS)
    assert out["duplicate"].item() == pytest.approx((math.sqrt(0.08) + 0.1) / 2, abs=1e-9)
    out["loss"].backward()
    # Query 0 is instance 1's strongest, query 1 instance 2's: no gradient there, only on the
    # other query of each instance; none on the background point.
    assert x.grad[:2, 0].abs().max() == 0 and x.grad[2, 1] == 0
    assert (x.grad[:2, 1] > 0).all() and x.grad[2, 0] > 0  # pushed down
    assert (x.grad[3] == 0).all()
    one_query = MaskInfluencerLoss(duplicate_weight=1.0)(logit([[0.9, 1e-12]] * 2),
                                                         torch.tensor([1, 1]))
    assert one_query["duplicate"].item() == pytest.approx(0.0, abs=1e-9)


def test_new_terms_are_zero_and_skipped_when_off():
    torch.manual_seed(5)
    x = torch.randn(30, 4, dtype=torch.float64)
    labels = torch.randint(0, 4, (30,))
    off = MaskInfluencerLoss(mask_prob="softmax")(x, labels)
    assert off["spill"].item() == 0.0 and off["duplicate"].item() == 0.0
    on = MaskInfluencerLoss(mask_prob="softmax", spill_weight=0.5, duplicate_weight=0.25)(x, labels)
    assert on["spill"].item() > 0 and on["duplicate"].item() > 0
    assert on["loss"].item() == pytest.approx(
        off["loss"].item() + 0.5 * on["spill"].item() + 0.25 * on["duplicate"].item(), abs=1e-9)


def dense_loss(x, masks, background, mask_prob, mean, temperature, margin, spill, duplicate):
    """The module docstring's formulas on dense (N, M) tensors with plain autograd."""
    log_p = mask_log_probs(x, mask_prob)  # (N, M)
    p = log_p.exp()
    member = masks.to(x.dtype)  # (K, N)
    counts = member.sum(1)
    if mean == "geometric":
        g = member @ log_p / counts[:, None]
    else:
        g = (member @ p / counts[:, None]).log()
    attraction = (-temperature * torch.logsumexp(g / temperature, dim=1)).mean()
    profiles = g.exp()
    k = len(profiles)
    pairs = [(a, b) for a in range(k) for b in range(k) if a != b]
    repulsion = sum(torch.relu(margin - ((profiles[a] - profiles[b]) ** 2).sum().add(1e-6).sqrt())
                    for a, b in pairs) / max(len(pairs), 1)
    if mask_prob == "sigmoid":
        bg_term = p[background].mean()
    else:
        bg_term = p[background].sum(1).mean()
    total = attraction + repulsion + bg_term
    foreground = masks.any(0)
    c = torch.softmax(g.detach() / temperature, dim=1)
    spill_k = []
    for row in range(k):
        others = foreground & ~masks[row]
        spill_k.append((c[row] * p[others].mean(0)).sum())
    total = total + spill * torch.stack(spill_k).mean()
    total = total + duplicate * (profiles.sum(1) - profiles.max(1).values).mean()
    return total


@pytest.mark.parametrize("mask_prob", ["sigmoid", "softmax"])
@pytest.mark.parametrize("mean", ["geometric", "arithmetic"])
def test_spill_gradient_holds_the_assignment_fixed(mask_prob, mean, monkeypatch):
    """The fused loss equals the dense formulas, values and gradients, over several CPU chunks."""
    from ifsearch.losses import influencer

    monkeypatch.setattr(influencer, "CPU_CHUNK_ELEMENTS", 20)
    torch.manual_seed(6)
    x = (torch.randn(23, 5, dtype=torch.float64) * 2).requires_grad_()
    labels = torch.randint(0, 4, (23,))
    labels[:3] = torch.tensor([1, 2, 3])  # every instance non-empty
    masks = labels[None, :] == torch.arange(1, 4)[:, None]
    background = labels == 0
    loss = MaskInfluencerLoss(mask_prob=mask_prob, mean=mean, temperature=0.6, margin=1.4,
                              spill_weight=0.7, duplicate_weight=0.4)
    fused = loss.forward_masks(x, masks, background)["loss"]
    (fused_grad,) = torch.autograd.grad(fused, x)
    dense = dense_loss(x, masks, background, mask_prob, mean, 0.6, 1.4, 0.7, 0.4)
    (dense_grad,) = torch.autograd.grad(dense, x)
    assert fused.item() == pytest.approx(dense.item(), abs=1e-10)
    assert torch.allclose(fused_grad, dense_grad, atol=1e-10)


# ------------------------------------------------------------------------------------------
# Class targets on hand-built claim matrices

C = 3  # real classes; index 3 is "no object"
# Instance 0 (class 1) and instance 1 (class 2) are both claimed most strongly by query 0, which
# claims instance 1 more (.7 > .6); instance 2 (class 0) by query 1.
CLAIMS = torch.tensor([[0.6, 0.2, 0.1, 0.05],
                       [0.7, 0.1, 0.3, 0.05],
                       [0.1, 0.4, 0.2, 0.05]]).log()
CLAIM_LABELS = torch.tensor([1, 2, 0])


@pytest.mark.parametrize("threshold, expected", [(0.5, [2, C, C, C]), (0.25, [2, 0, 2, C]),
                                                 (0.01, [2, 0, 2, 1])])
def test_threshold_class_targets(threshold, expected):
    got = class_targets(CLAIMS, CLAIM_LABELS, C, "threshold", threshold)
    assert got.tolist() == expected


def test_best_query_class_targets():
    # Query 0 is the strongest for instances 0 and 1 and takes instance 1 (.7); instance 0 gets
    # no query; query 1 takes instance 2; queries 2 and 3 are no object, whatever their claims.
    assert class_targets(CLAIMS, CLAIM_LABELS, C, "best_query").tolist() == [2, 0, C, C]
    # No absolute threshold: weak claims still give the class.
    weak = (CLAIMS.exp() / 100).log()
    assert class_targets(weak, CLAIM_LABELS, C, "best_query").tolist() == [2, 0, C, C]


def test_soft_class_targets():
    # Column sums of P: 1.4, .7, .6, .15; only query 0's are scaled (by 1 / 1.4).
    expected = torch.tensor([
        # class 0,  class 1,   class 2,   no object
        [0.1 / 1.4, 0.6 / 1.4, 0.7 / 1.4, 0.0],
        [0.4, 0.2, 0.1, 0.3],
        [0.2, 0.1, 0.3, 0.4],
        [0.05, 0.05, 0.05, 0.85],
    ])
    got = class_targets(CLAIMS, CLAIM_LABELS, C, "soft")
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(1), torch.ones(4))


def test_class_target_ties_go_to_the_lowest_index():
    half = math.log(0.5)
    # Instance 0 claims queries 0 and 1 equally: query 0 is its strongest. Instances 0 and 1
    # claim query 0 equally: it takes instance 0.
    claims = torch.tensor([[half, half, -3.0], [half, -2.0, -3.0]])
    labels = torch.tensor([1, 2])
    assert class_targets(claims, labels, C, "best_query").tolist() == [1, C, C]
    # Threshold: the tie between instances on query 0 also goes to instance 0.
    assert class_targets(claims, labels, C, "threshold", 0.4).tolist() == [1, 1, C]


@pytest.mark.parametrize("rule", ["threshold", "best_query", "soft"])
def test_class_targets_without_instances_and_with_empty_ones(rule):
    none = class_targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), C, rule)
    # An empty instance (g = 0, i.e. "P = 1", from 0 / 1 points) must not hand out its class.
    empty = class_targets(torch.zeros(1, 4), torch.tensor([2]), C, rule,
                          valid=torch.tensor([False]))
    for got in (none, empty):
        if rule == "soft":
            assert torch.equal(got, torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 4))
        else:
            assert got.tolist() == [C] * 4


def test_soft_cross_entropy_equals_mask2former_cross_entropy_on_one_hot_targets():
    torch.manual_seed(7)
    logits = torch.randn(2, 5, C + 1)
    hard = torch.tensor([[0, 3, 3, 2, 3], [1, 1, 3, 3, 0]])
    weight = torch.tensor([1.0, 1.0, 1.0, 0.1])
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), hard, weight=weight)
    one_hot = torch.nn.functional.one_hot(hard, C + 1).float()
    assert soft_cross_entropy(logits, one_hot, weight).item() == pytest.approx(
        expected.item(), abs=1e-6)
    # A mixed target is the weighted mix of the two cross-entropies' numerators.
    mixed = one_hot.clone()
    mixed[0, 0] = torch.tensor([0.5, 0.0, 0.0, 0.5])
    log_q = torch.log_softmax(logits, -1)
    numerator = -(one_hot * weight * log_q).sum() + 0.5 * log_q[0, 0, 0] \
        - 0.5 * 0.1 * log_q[0, 0, 3]
    denominator = (one_hot * weight).sum() - 0.5 + 0.05
    assert soft_cross_entropy(logits, mixed, weight).item() == pytest.approx(
        (numerator / denominator).item(), abs=1e-6)


@pytest.mark.parametrize("rule", ["threshold", "best_query", "soft"])
def test_class_loss_never_reaches_the_mask_logits(rule):
    torch.manual_seed(8)
    masks = [torch.randn(30, 4, requires_grad=True)]
    outputs = _outputs(masks)
    outputs["pred_logits"].requires_grad_(True)
    targets = [{"labels": torch.tensor([2, 0]), "masks": torch.rand(2, 30) > 0.5}]
    losses = InfluencerCriterion(num_classes=3, class_target=rule, claim_threshold=0.01)(
        outputs, targets)
    mask_grad, logits_grad = torch.autograd.grad(
        losses["loss_class"], [masks[0], outputs["pred_logits"]], allow_unused=True)
    assert mask_grad is None or mask_grad.abs().max() == 0
    assert logits_grad.abs().sum() > 0


@pytest.mark.parametrize("rule", ["threshold", "best_query", "soft"])
def test_criterion_class_loss_uses_the_rule(rule):
    # Sigmoid masks: query 1 claims instance 0 (class 2) and query 2 instance 1 (class 0), with
    # p ~ 1 on their points; every other claim is ~0. All three rules then agree.
    mask = torch.full((20, 4), -12.0)
    mask[:10, 1] = 12.0
    mask[10:15, 2] = 12.0
    targets = [{"labels": torch.tensor([2, 0]),
                "masks": torch.stack([torch.arange(20) < 10,
                                      (torch.arange(20) >= 10) & (torch.arange(20) < 15)])}]
    outputs = _outputs([mask], num_queries=4)
    criterion = InfluencerCriterion(num_classes=3, class_target=rule)
    loss = criterion(outputs, targets)["loss_class"]
    hard = torch.tensor([[3, 2, 0, 3]])
    weight = torch.tensor([1.0, 1.0, 1.0, 0.1])
    expected = 2.0 * torch.nn.functional.cross_entropy(outputs["pred_logits"].transpose(1, 2),
                                                       hard, weight=weight)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)


def test_criterion_reports_new_terms_only_when_weighted():
    masks = [torch.randn(30, 4), torch.randn(20, 4)]
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.rand(2, 30) > 0.5},
               {"labels": torch.tensor([2]), "masks": torch.rand(1, 20) > 0.5}]
    plain = InfluencerCriterion(num_classes=3)(_outputs(masks, aux=1), targets)
    assert not any("spill" in k or "duplicate" in k for k in plain)
    both = InfluencerCriterion(num_classes=3, spill_weight=0.5, duplicate_weight=2.0)(
        _outputs(masks, aux=1), targets)
    assert {"loss_spill", "loss_duplicate", "loss_spill_0", "loss_duplicate_0"} <= set(both)
    loss = MaskInfluencerLoss(spill_weight=0.5, duplicate_weight=2.0)
    direct = [loss.forward_masks(m, t["masks"]) for m, t in zip(masks, targets)]
    assert both["loss_spill"].item() == pytest.approx(
        0.5 * sum(d["spill"].item() for d in direct) / 2, abs=1e-6)
    assert both["loss_duplicate"].item() == pytest.approx(
        2.0 * sum(d["duplicate"].item() for d in direct) / 2, abs=1e-6)


def test_config_choices_match_the_loss_modules():
    from ifsearch import config
    from ifsearch.losses import criterion, influencer

    assert config.CLASS_TARGETS == criterion.CLASS_TARGETS
    assert config.MEANS == influencer.MEANS
    assert config.MASK_PROB_MODES == influencer.MASK_PROB_MODES


@pytest.mark.parametrize("rule", ["threshold", "best_query", "soft"])
def test_criterion_empty_instance_gives_no_class(rule):
    """An instance with no points (e.g. lost when an image target is downsampled) has g = 0, i.e.
    "claimed with probability 1" by every query; it must give nobody its class."""
    mask = torch.full((12, 3), -5.0)  # nothing is claimed
    targets = [{"labels": torch.tensor([0, 1]),
                "masks": torch.stack([torch.arange(12) < 6, torch.zeros(12, dtype=torch.bool)])}]
    outputs = _outputs([mask], num_queries=3)
    loss = InfluencerCriterion(num_classes=3, class_target=rule)(outputs, targets)["loss_class"]
    if rule == "best_query":  # instance 0 still gives its class to its strongest query, query 0
        hard = torch.tensor([[0, 3, 3]])
    elif rule == "soft":  # P = sigmoid(-5) on instance 0 for every query
        p = torch.sigmoid(torch.tensor(-5.0)).item()
        target = torch.tensor([[[p, 0.0, 0.0, 1 - p]] * 3])
        expected = soft_cross_entropy(outputs["pred_logits"], target,
                                      torch.tensor([1.0, 1.0, 1.0, 0.1]))
        assert loss.item() == pytest.approx(2.0 * expected.item(), abs=1e-5)
        return
    else:
        hard = torch.tensor([[3, 3, 3]])
    expected = torch.nn.functional.cross_entropy(outputs["pred_logits"].transpose(1, 2), hard,
                                                 weight=torch.tensor([1.0, 1.0, 1.0, 0.1]))
    assert loss.item() == pytest.approx(2.0 * expected.item(), abs=1e-5)


def test_arithmetic_attraction_at_temperature_one_ignores_the_assignment():
    """The documented weakness of the arithmetic mean: at T = 1 the soft maximum sums the means,
    sum_m mean_i p_im = mean_i sum_m p_im, so a mixed assignment attracts as well as the correct
    one; the geometric mean (or T < 1) prefers the correct one."""
    labels = torch.tensor([1] * 10 + [2] * 10)
    correct = _assignment_logits([0] * 10 + [1] * 10)
    mixed = _assignment_logits([0, 1] * 5 + [1, 0] * 5)

    def attraction(x, **kw):
        return MaskInfluencerLoss(mask_prob="softmax", **kw)(x, labels)["attractive"].item()

    assert attraction(mixed, mean="arithmetic") == pytest.approx(
        attraction(correct, mean="arithmetic"), abs=1e-9)
    assert attraction(mixed, mean="arithmetic", temperature=0.3) > attraction(
        correct, mean="arithmetic", temperature=0.3) + 0.1
    assert attraction(mixed) > attraction(correct) + 1.0
