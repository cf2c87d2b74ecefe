"""InfluencerCriterion: a drop-in for Mask2Former's SetCriterion with no matcher.

Same call as the Hungarian baseline: ``criterion(outputs, targets)`` returns a dict of weighted
scalar losses whose sum is the total, with ``_{i}`` copies for each auxiliary decoder layer.

Class targets. The Influencer Loss has no matching, so the class head's targets come from the
detached (K, M) claim strengths g_km of the mask loss (log geometric or arithmetic mean of p over
instance k, see ``MaskInfluencerLoss``), the (K,) labels and the non-empty instances; class index C
is "no object". Three rules (``class_target``):

- ``threshold``: query m gets the class of argmax_k g_km when max_k g_km > log(claim_threshold),
  else "no object". In softmax mode p starts near 1/(M+1), so at a threshold of 0.5 no query gets a
  class for the first epochs; in sigmoid mode all the duplicates of an instance get its class.
- ``best_query``: instance k gives its class to its strongest query m*(k) = argmax_m g_km, with no
  absolute threshold (as Hungarian matching gives exactly one query per instance its class from
  the first step). A query that is m* for several instances takes the one it claims most strongly
  (largest g_km among them); every other query is "no object". Ties go to the lowest index, query
  or instance (torch's argmax/max return the first maximum).
- ``soft``: P_km = exp(g_km) in [0, 1]; a_km = P_km / max(1, sum_k' P_k'm) (a query's claims,
  scaled down only when they add up to more than 1); the target of query m is the distribution
  t_m(c) = sum_{k: label_k = c} a_km over real classes and t_m(C) = 1 - sum_k a_km for "no
  object". The loss is the weighted mean soft cross-entropy
  sum_m sum_c w_c t_mc (-log q_mc) / sum_m sum_c w_c t_mc (w = class weights, ``no_object_weight``
  on C), which equals Mask2Former's ``F.cross_entropy(weight=w)`` when every t_m is one-hot.

Targets are built from detached g, so the class loss never pushes the mask matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ifsearch.losses.common import (
    per_scene_ignore,
    per_scene_mask_logits,
    per_scene_target_masks,
)
from ifsearch.losses.influencer import MaskInfluencerLoss

CLASS_TARGETS = ("threshold", "best_query", "soft")


def class_targets(
    claims: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    rule: str = "threshold",
    claim_threshold: float = 0.5,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class targets of the M queries from the (K, M) claim strengths (module docstring).

    Args:
        claims: (K, M) claim strengths g_km (log of a mean probability, <= 0), detached.
        labels: (K,) long class of each instance, in [0, C).
        num_classes: C; index C is "no object".
        rule: "threshold", "best_query" or "soft".
        claim_threshold: the probability a query's claim must exceed under "threshold".
        valid: (K,) bool, instances that have points; None = all. Empty instances give no class.

    Returns:
        (M,) long class indices ("threshold", "best_query") or (M, C+1) float distributions
        ("soft"). Vectorised, no host synchronisation; K = 0 is handled by shape.
    """
    num_instances, num_queries = claims.shape
    device = claims.device
    labels = labels.to(device)
    if valid is None:
        valid = torch.ones(num_instances, dtype=torch.bool, device=device)
    if rule == "soft":
        strength = claims.exp() * valid[:, None].to(claims.dtype)  # (K, M) P_km, 0 if empty
        share = strength / strength.sum(dim=0).clamp(min=1.0)  # (K, M) a_km
        one_hot = F.one_hot(labels, num_classes).to(claims.dtype)  # (K, C)
        real = share.T @ one_hot  # (M, C) sum_{k: label_k = c} a_km
        no_object = (1.0 - share.sum(dim=0)).clamp(min=0.0)  # (M,)
        return torch.cat([real, no_object[:, None]], dim=1)  # (M, C+1)
    no_object = torch.full((num_queries,), num_classes, dtype=torch.long, device=device)
    if num_instances == 0:  # a shape, not a tensor value: no host sync
        return no_object
    if rule == "threshold":
        strength = claims.masked_fill(~valid[:, None], -math.inf)  # (K, M)
        best_strength, best_instance = strength.max(dim=0)  # (M,), (M,)
        claimed = best_strength > math.log(claim_threshold)
        return torch.where(claimed, labels[best_instance], no_object)
    if rule == "best_query":
        best_query = claims.argmax(dim=1)  # (K,) m*(k), the lowest query on ties
        is_best = F.one_hot(best_query, num_queries).bool() & valid[:, None]  # (K, M)
        strength = claims.masked_fill(~is_best, -math.inf)  # (K, M)
        instance = strength.argmax(dim=0)  # (M,) the instance m claims most, lowest k on ties
        return torch.where(is_best.any(dim=0), labels[instance], no_object)
    raise ValueError(f"class_target must be one of {CLASS_TARGETS}, got {rule!r}")


def soft_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Weighted mean cross-entropy against target distributions.

    sum_{b,m,c} w_c t_bmc (-log softmax(logits)_bmc) / sum_{b,m,c} w_c t_bmc: with one-hot t this
    is ``F.cross_entropy(..., weight=w)`` (mean reduction), whose normaliser is the summed weight
    of the targets.

    Args:
        logits: (B, M, C+1) class logits.
        target: (B, M, C+1) distributions over the C+1 classes.
        weight: (C+1,) class weights.
    """
    weighted = target * weight  # (B, M, C+1)
    log_q = torch.log_softmax(logits, dim=-1)  # (B, M, C+1)
    return -(weighted * log_q).sum() / weighted.sum().clamp(min=torch.finfo(logits.dtype).tiny)


class InfluencerCriterion(nn.Module):
    """Influencer Loss on every scene's mask matrix plus a class loss for the class head.

    Class targets follow ``class_target`` (module docstring), weighted by ``no_object_weight`` on
    "no object" as in Mask2Former; they are derived from detached g, so the class loss never pushes
    the mask matrix.

    Args:
        num_classes: C, the number of real classes; class index C is "no object".
        attr_weight, rep_weight, bg_weight, margin, temperature, mask_prob, mean, spill_weight,
            duplicate_weight: see MaskInfluencerLoss.
        class_weight: weight of the class cross-entropy.
        no_object_weight: cross-entropy weight of the "no object" class.
        claim_threshold: minimum claim probability exp(g_km) for a query to take an instance's
            class under ``class_target="threshold"``.
        deep_supervision: also apply the losses to each entry of ``outputs["aux_outputs"]``.
        class_target: "threshold", "best_query" or "soft".
    """

    def __init__(
        self,
        num_classes: int,
        attr_weight: float = 1.0,
        rep_weight: float = 1.0,
        bg_weight: float = 1.0,
        margin: float = 1.0,
        temperature: float = 1.0,
        mask_prob: str = "sigmoid",
        class_weight: float = 2.0,
        no_object_weight: float = 0.1,
        claim_threshold: float = 0.5,
        deep_supervision: bool = True,
        class_target: str = "best_query",
        mean: str = "geometric",
        spill_weight: float = 0.0,
        duplicate_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 < claim_threshold <= 1.0:
            raise ValueError(f"claim_threshold must be in (0, 1], got {claim_threshold}")
        if class_target not in CLASS_TARGETS:
            raise ValueError(f"class_target must be one of {CLASS_TARGETS}, got {class_target!r}")
        self.num_classes = num_classes
        self.mask_loss = MaskInfluencerLoss(
            attr_weight=attr_weight,
            rep_weight=rep_weight,
            bg_weight=bg_weight,
            margin=margin,
            temperature=temperature,
            mask_prob=mask_prob,
            mean=mean,
            spill_weight=spill_weight,
            duplicate_weight=duplicate_weight,
        )
        self.class_weight = class_weight
        self.claim_threshold = claim_threshold
        self.class_target = class_target
        self.deep_supervision = deep_supervision
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Weighted losses: loss_attractive, loss_repulsive, loss_background, loss_class, and
        loss_spill / loss_duplicate when their weight is > 0 (+ `_{i}` per auxiliary layer).

        Args:
            outputs: {"pred_logits": (B, M, C+1), "pred_masks": list of (N_i, M) or (B, M, H, W),
                "aux_outputs": [same keys per intermediate layer]}.
            targets: per scene {"labels": (K_i,) long, "masks": (K_i, N_i) or (K_i, H, W) bool,
                optional "ignore": (N_i,) or (H, W) bool points left out of the background term}.
        """
        losses = self._layer_losses(outputs, targets)
        if self.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                aux_losses = self._layer_losses(aux, targets)
                losses.update({f"{key}_{i}": value for key, value in aux_losses.items()})
        return losses

    def _layer_losses(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        mask_logits = per_scene_mask_logits(outputs["pred_masks"])
        target_masks = per_scene_target_masks(targets, outputs["pred_masks"])
        pred_logits = outputs["pred_logits"]  # (B, M, C+1)
        num_scenes, num_queries = pred_logits.shape[:2]
        if len(mask_logits) != len(targets) or num_scenes != len(targets):
            raise ValueError(
                f"outputs hold {num_scenes} scenes ({len(mask_logits)} mask matrices) but "
                f"{len(targets)} targets were given"
            )

        weights = {"attractive": self.mask_loss.attr_weight, "repulsive": self.mask_loss.rep_weight,
                   "background": self.mask_loss.bg_weight}
        for key, weight in (("spill", self.mask_loss.spill_weight),
                            ("duplicate", self.mask_loss.duplicate_weight)):
            if weight > 0:
                weights[key] = weight
        parts = {key: [] for key in weights}
        scene_targets = []
        ignored = per_scene_ignore(targets, outputs["pred_masks"])
        for logits, masks, ignore, target in zip(mask_logits, target_masks, ignored, targets):
            background = None if ignore is None else ~masks.any(dim=0) & ~ignore
            out = self.mask_loss.forward_masks(logits, masks, background=background)
            for key in parts:
                parts[key].append(out[key])
            scene_targets.append(self._class_targets(
                out["log_geomean"].detach(), target["labels"], valid=out["counts"] > 0))

        losses = {f"loss_{key}": weight * torch.stack(parts[key]).mean()
                  for key, weight in weights.items()}
        class_logits = pred_logits.float()
        if self.class_target == "soft":
            shape = (0, num_queries, self.num_classes + 1)
            target = (torch.stack(scene_targets).to(class_logits.dtype) if scene_targets
                      else class_logits.new_zeros(shape))  # (B, M, C+1)
            class_ce = soft_cross_entropy(class_logits, target, self.class_weights)
        else:
            target = torch.stack(scene_targets) if scene_targets else pred_logits.new_zeros(
                (0, num_queries), dtype=torch.long
            )  # (B, M)
            class_ce = F.cross_entropy(class_logits.transpose(1, 2), target,
                                       weight=self.class_weights)
        losses["loss_class"] = self.class_weight * class_ce
        return losses

    def _class_targets(self, claims: torch.Tensor, labels: torch.Tensor,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
        """Class targets of the M queries from the (K, M) claim strengths, per ``class_target``."""
        return class_targets(claims, labels, self.num_classes, self.class_target,
                             self.claim_threshold, valid)
