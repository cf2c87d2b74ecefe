"""Mask2Former's Hungarian-matching criterion, the baseline the Influencer Loss is compared against.

The definitions follow Mask2Former (``mask2former/modeling/matcher.py`` and ``criterion.py``) so the
baseline numbers are comparable with the literature. The one deliberate difference is that both
point clouds and images go through the same "points" code path: every scene is reduced to an
(N, M) mask-logit matrix by :func:`ifsearch.losses.common.per_scene_mask_logits`, and point
sampling picks indices into the N points (for images the flattened pixels) instead of bilinearly
interpolating continuous coordinates.

Both modules take the calling convention shared with the Influencer criterion::

    outputs = {"pred_logits": (B, M, C+1), "pred_masks": [(N_i, M), ...] or (B, M, H, W),
               "aux_outputs": [{"pred_logits": ..., "pred_masks": ...}, ...]}
    targets = [{"labels": (K_i,) long in [0, C), "masks": (K_i, N_i) or (K_i, H, W) bool}, ...]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ifsearch.losses.common import per_scene_mask_logits, per_scene_target_masks

__all__ = [
    "HungarianCriterion",
    "HungarianMatcher",
    "batch_dice_cost",
    "batch_sigmoid_ce_cost",
    "dice_loss",
    "hungarian_assignment",
    "sample_uncertain_points",
    "sigmoid_ce_loss",
]


# --------------------------------------------------------------------------------------------------
# Pairwise costs (matcher) and per-pair losses (criterion)
# --------------------------------------------------------------------------------------------------


def batch_sigmoid_ce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise sigmoid BCE between every prediction and every target, averaged over points.

    Uses Mask2Former's pos/neg decomposition: BCE(x, t) = t * BCE(x, 1) + (1 - t) * BCE(x, 0), so
    the whole (M, K) matrix is two matrix products instead of an (M, K, N) tensor.

    Args:
        inputs: (M, N) mask logits.
        targets: (K, N) float targets in {0, 1}.

    Returns:
        (M, K) mean BCE over the N points.
    """
    n = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    cost = pos @ targets.T + neg @ (1 - targets).T  # (M, K)
    return cost / max(n, 1)


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise soft dice loss ``1 - (2 s.t + 1) / (sum s + sum t + 1)`` with s = sigmoid(x).

    Args:
        inputs: (M, N) mask logits.
        targets: (K, N) float targets in {0, 1}.

    Returns:
        (M, K) dice cost.
    """
    probs = inputs.sigmoid()  # (M, N)
    numerator = 2 * probs @ targets.T  # (M, K)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]  # (M, K)
    return 1 - (numerator + 1) / (denominator + 1)


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sigmoid BCE of matched pairs: mean over points, SUM over pairs (caller divides by num_masks).

    Args:
        inputs: (P, N) mask logits of the matched predictions.
        targets: (P, N) float targets of the matched ground-truth masks.

    Returns:
        Scalar sum over the P pairs.
    """
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1).sum()


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft dice loss of matched pairs, SUM over pairs (caller divides by num_masks).

    Args:
        inputs: (P, N) mask logits of the matched predictions.
        targets: (P, N) float targets of the matched ground-truth masks.

    Returns:
        Scalar sum over the P pairs.
    """
    probs = inputs.sigmoid()  # (P, N)
    numerator = 2 * (probs * targets).sum(-1)  # (P,)
    denominator = probs.sum(-1) + targets.sum(-1)  # (P,)
    return (1 - (numerator + 1) / (denominator + 1)).sum()


@torch.no_grad()
def sample_uncertain_points(
    logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> torch.Tensor:
    """Pick point indices per mask the way Mask2Former/PointRend does, but on a discrete point set.

    Oversample ``num_points * oversample_ratio`` random points, keep the
    ``importance_sample_ratio * num_points`` most uncertain ones (uncertainty = -|logit|, i.e. the
    points closest to the decision boundary) and fill the rest with fresh uniform random points, so
    training focuses on the boundary while still seeing the whole mask. Sampling is with
    replacement, as uniform continuous coordinates are in Mask2Former.

    Args:
        logits: (P, N) mask logits of the matched predictions.
        num_points: points kept per mask.
        oversample_ratio: >= 1, how many candidates to draw per kept point.
        importance_sample_ratio: in [0, 1], fraction of the kept points chosen by uncertainty.

    Returns:
        (P, num_points) int64 indices into the N points.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}"
        )
    p, n = logits.shape
    device = logits.device
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain

    candidates = torch.randint(n, (p, num_sampled), device=device)  # (P, S)
    uncertainty = -logits.gather(1, candidates).abs()  # (P, S)
    top = uncertainty.topk(num_uncertain, dim=1).indices  # (P, U)
    idx = candidates.gather(1, top)  # (P, U)
    if num_random > 0:
        fill = torch.randint(n, (p, num_random), device=device)  # (P, R)
        idx = torch.cat([idx, fill], dim=1)  # (P, num_points)
    return idx


def hungarian_assignment(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment of an (M, K) cost matrix (rows = queries).

    Returns:
        (query_idx, target_idx) int64 CPU tensors of length min(M, K), sorted by query index.
    """
    # Imported here, not with the module: scipy.optimize takes ~0.3 s to import, and every
    # trial's fresh worker imports this module (through ifsearch.losses), Influencer trials too.
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.detach().float().cpu().numpy())
    return (
        torch.as_tensor(rows, dtype=torch.int64),
        torch.as_tensor(cols, dtype=torch.int64),
    )


def _empty_indices() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)


# --------------------------------------------------------------------------------------------------
# Matcher
# --------------------------------------------------------------------------------------------------


class HungarianMatcher(torch.nn.Module):
    """One-to-one matching of queries to ground-truth instances by Mask2Former's cost.

    The cost of assigning query q to target k is
    ``cost_class * -p_q(label_k) + cost_mask * BCE(x_q, t_k) + cost_dice * dice(x_q, t_k)``;
    the assignment minimizing the summed cost is found by ``scipy.optimize.linear_sum_assignment``.

    Args:
        cost_class: weight of the (negative softmax probability) class cost.
        cost_mask: weight of the point-averaged sigmoid BCE cost.
        cost_dice: weight of the dice cost.
        num_points: when > 0, the mask costs are evaluated on this many uniformly sampled points
            (the same points for all predictions and targets of a scene), which is what keeps
            matching affordable on large scenes; 0 uses every point.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matcher costs are 0")
        if num_points < 0:
            raise ValueError(f"num_points must be >= 0, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    def cost_matrix(
        self,
        logits: torch.Tensor,
        mask_logits: torch.Tensor,
        labels: torch.Tensor,
        target_masks: torch.Tensor,
    ) -> torch.Tensor:
        """The (M, K) matching cost of one scene, in fp32.

        Args:
            logits: (M, C+1) class logits.
            mask_logits: (N, M) mask logits (points first, as ``per_scene_mask_logits`` returns).
            labels: (K,) target class indices.
            target_masks: (K, N) bool target masks.

        Returns:
            (M, K) cost; point sampling (``num_points > 0``) makes it random.
        """
        # fp32 even under mixed precision: the exp/log in BCE and softmax are not safe in fp16.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            prob = logits.float().softmax(-1)  # (M, C+1)
            cost_class = -prob[:, labels]  # (M, K)

            pred = mask_logits.float().T  # (M, N)
            tgt = target_masks.to(device=pred.device, dtype=torch.float32)  # (K, N)
            n = pred.shape[1]
            if 0 < self.num_points < n:
                # Same uniform subset for predictions and targets, as Mask2Former's shared coords.
                keep = torch.randperm(n, device=pred.device)[: self.num_points]  # (P,)
                pred = pred[:, keep]  # (M, P)
                tgt = tgt[:, keep]  # (K, P)

            cost_mask = batch_sigmoid_ce_cost(pred, tgt)  # (M, K)
            cost_dice = batch_dice_cost(pred, tgt)  # (M, K)
        return (
            self.cost_class * cost_class
            + self.cost_mask * cost_mask
            + self.cost_dice * cost_dice
        )  # (M, K)

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, Any], targets: list[dict[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per scene (query_idx, target_idx) int64 tensors, as Mask2Former.

        Args:
            outputs: dict with "pred_logits" (B, M, C+1) and "pred_masks" (see module docstring).
            targets: list of B dicts with "labels" (K_i,) and "masks".

        Returns:
            B tuples of CPU int64 tensors of length min(M, K_i), sorted by query index; empty for
            scenes without targets.
        """
        logits = outputs["pred_logits"]  # (B, M, C+1)
        masks = per_scene_mask_logits(outputs["pred_masks"])  # B x (N_i, M)
        tgt_masks = per_scene_target_masks(targets, outputs["pred_masks"])  # B x (K_i, N_i)
        if not (len(masks) == len(tgt_masks) == logits.shape[0]):
            raise ValueError(
                f"batch size mismatch: {logits.shape[0]} pred_logits, {len(masks)} pred_masks, "
                f"{len(tgt_masks)} targets"
            )
        indices = []
        for b, target in enumerate(targets):
            labels = target["labels"].to(logits.device)
            if labels.numel() == 0:
                indices.append(_empty_indices())
                continue
            cost = self.cost_matrix(logits[b], masks[b], labels, tgt_masks[b])  # (M, K)
            indices.append(hungarian_assignment(cost))
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )


# --------------------------------------------------------------------------------------------------
# Criterion
# --------------------------------------------------------------------------------------------------


class HungarianCriterion(torch.nn.Module):
    """Mask2Former's set criterion: match, then supervise class of all queries and masks of matches.

    Returns already WEIGHTED losses so that ``sum(losses.values())`` is the training objective,
    matching the Influencer criterion's contract.

    Args:
        num_classes: number of object classes C; class index C is "no object".
        matcher: matcher to use; default builds one whose costs equal the loss weights (as the
            Mask2Former configs do) and that samples ``num_points`` points.
        class_weight: weight of ``loss_class``.
        mask_weight: weight of ``loss_mask`` (sigmoid BCE).
        dice_weight: weight of ``loss_dice``.
        no_object_weight: cross-entropy weight of the no-object class; small because most queries
            are unmatched and would otherwise dominate the class loss.
        num_points: when > 0, mask losses use this many importance-sampled points per matched pair;
            0 uses every point.
        oversample_ratio: candidates drawn per kept point for importance sampling.
        importance_sample_ratio: fraction of kept points chosen by uncertainty.
        deep_supervision: also supervise each entry of ``outputs["aux_outputs"]``.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 0,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_points < 0:
            raise ValueError(f"num_points must be >= 0, got {num_points}")
        if oversample_ratio < 1:
            raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
        if not 0 <= importance_sample_ratio <= 1:
            raise ValueError(
                f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}"
            )
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher(
            cost_class=class_weight,
            cost_mask=mask_weight,
            cost_dice=dice_weight,
            num_points=num_points,
        )
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.no_object_weight = no_object_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)

    def forward(
        self, outputs: dict[str, Any], targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """keys: loss_class, loss_mask, loss_dice, and loss_{class,mask,dice}_{i} for aux layer i.

        Args:
            outputs: model outputs (see module docstring).
            targets: list of B target dicts (see module docstring).

        Returns:
            Weighted scalar losses; their sum is the total loss.
        """
        num_masks = self._num_masks(targets, outputs["pred_logits"].device)
        indices = self.matcher(outputs, targets)
        losses = self._layer_losses(outputs, targets, indices, num_masks)
        if self.deep_supervision and outputs.get("aux_outputs"):
            for i, aux in enumerate(outputs["aux_outputs"]):
                # Each decoder layer is matched on its own, as in DETR and Mask2Former, because an
                # intermediate layer's queries need not line up with the last layer's.
                aux_indices = self.matcher(aux, targets)
                aux_losses = self._layer_losses(aux, targets, aux_indices, num_masks)
                losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses

    @staticmethod
    def _num_masks(targets: list[dict[str, torch.Tensor]], device: torch.device) -> float:
        """Average number of target masks per process, >= 1, so every rank normalizes alike."""
        num = torch.as_tensor(
            [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float32, device=device
        )
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num)
            world_size = dist.get_world_size()
        return torch.clamp(num / world_size, min=1).item()

    def _layer_losses(
        self,
        outputs: dict[str, Any],
        targets: list[dict[str, torch.Tensor]],
        indices: list[tuple[torch.Tensor, torch.Tensor]],
        num_masks: float,
    ) -> dict[str, torch.Tensor]:
        """Weighted class, mask and dice losses of one decoder layer given its matching."""
        logits = outputs["pred_logits"].float()  # (B, M, C+1)
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"pred_logits has {logits.shape[-1]} classes, expected num_classes + 1 = "
                f"{self.num_classes + 1}"
            )
        device = logits.device
        masks = per_scene_mask_logits(outputs["pred_masks"])  # B x (N_i, M)
        tgt_masks = per_scene_target_masks(targets, outputs["pred_masks"])  # B x (K_i, N_i)

        # Class loss over all queries: matched -> their target's label, rest -> no-object.
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=device
        )  # (B, M)
        for b, (src, tgt) in enumerate(indices):
            if src.numel():
                target_classes[b, src.to(device)] = targets[b]["labels"].to(device)[tgt.to(device)]
        loss_class = F.cross_entropy(
            logits.transpose(1, 2), target_classes, self.empty_weight.to(device)
        )

        # Mask losses on matched pairs only. Start from an empty slice's sum: exactly 0 yet part of
        # the graph, so scenes without targets still backpropagate (and no 0 * inf = nan).
        zero = torch.stack([m[:0].sum() for m in masks]).sum().float()
        loss_mask = zero
        loss_dice = zero
        for b, (src, tgt) in enumerate(indices):
            if src.numel() == 0:
                continue
            pred = masks[b].T[src.to(masks[b].device)].float()  # (P, N)
            gt = tgt_masks[b].to(pred.device)[tgt.to(pred.device)].float()  # (P, N)
            if self.num_points > 0:
                idx = sample_uncertain_points(
                    pred.detach(),
                    self.num_points,
                    self.oversample_ratio,
                    self.importance_sample_ratio,
                )  # (P, num_points)
                pred = pred.gather(1, idx)  # (P, num_points)
                gt = gt.gather(1, idx)  # (P, num_points)
            loss_mask = loss_mask + sigmoid_ce_loss(pred, gt)
            loss_dice = loss_dice + dice_loss(pred, gt)

        return {
            "loss_class": self.class_weight * loss_class,
            "loss_mask": self.mask_weight * loss_mask / num_masks,
            "loss_dice": self.dice_weight * loss_dice / num_masks,
        }

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, class_weight={self.class_weight}, "
            f"mask_weight={self.mask_weight}, dice_weight={self.dice_weight}, "
            f"no_object_weight={self.no_object_weight}, num_points={self.num_points}, "
            f"oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, "
            f"deep_supervision={self.deep_supervision}"
        )
