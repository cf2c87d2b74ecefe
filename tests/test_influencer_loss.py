"""MaskInfluencerLoss and InfluencerCriterion against hand-computed cases and properties."""

import math

import pytest
import torch

from ifsearch.losses import InfluencerCriterion, MaskInfluencerLoss


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
    assert out["background"].item() == pytest.approx(p[2].mean().item(), abs=1e-9)
    assert out["repulsive"].item() == 0.0  # K = 1: no pairs


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


@pytest.mark.parametrize("mask_prob", ["sigmoid", "softmax"])
def test_correct_assignment_beats_merged_and_mixed(mask_prob):
    labels = torch.tensor([1] * 10 + [2] * 10)
    loss = MaskInfluencerLoss(mask_prob=mask_prob, margin=1.0)
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


def _sync_check_inputs(device):
    """Logits (N, M) = (1000, 16) and instance masks (K, N) = (5, 1000) on ``device``, built
    before the sync check starts (copying them to the GPU is itself a sync)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, 16, generator=g).to(device).requires_grad_()
    masks = (torch.rand(5, 1000, generator=g) > 0.7).to(device)
    return logits, masks, MaskInfluencerLoss(mask_prob="softmax").to(device)


def _loss_forward_backward(logits, masks, loss):
    """What the GPU test watches: the loss's forward and backward, nothing else."""
    value = loss.forward_masks(logits, masks)["loss"]
    value.backward()
    return value.detach()


def test_sync_check_body_runs_on_cpu():
    """The GPU test's inputs and body, run where there is no GPU (so they stay correct)."""
    logits, masks, loss = _sync_check_inputs("cpu")
    value = _loss_forward_backward(logits, masks, loss)
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: torch.cuda.set_sync_debug_mode watches CUDA only")
def test_no_host_sync_on_gpu():
    """Forward + backward of the loss never synchronises with the host: in sync debug mode
    "error" any synchronising call raises (checked on a deliberate `.item()` first)."""
    logits, masks, loss = _sync_check_inputs("cuda")
    probe = torch.ones(1, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            probe.item()  # the mode is on: a sync raises
        value = _loss_forward_backward(logits, masks, loss)  # raises on any host sync
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu_logits, cpu_masks, cpu_loss = _sync_check_inputs("cpu")
    expected = _loss_forward_backward(cpu_logits, cpu_masks, cpu_loss)
    assert value.item() == pytest.approx(expected.item(), rel=1e-4)  # it ran, and right
    assert torch.allclose(logits.grad.cpu(), cpu_logits.grad, rtol=1e-3, atol=1e-6)


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

    def terms(logits):
        g, bg_sum, _, _ = influencer._MaskMatrixTerms.apply(logits, masks, background, mask_prob)
        return g, bg_sum

    assert gradcheck(terms, (x,), eps=1e-6, atol=1e-6)
    loss = MaskInfluencerLoss(mask_prob=mask_prob, margin=1.5, temperature=0.7)
    assert gradcheck(lambda z: loss.forward_masks(z, masks[:2], background)["loss"], (x,),
                     eps=1e-6, atol=1e-6)
