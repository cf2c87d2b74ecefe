"""InfluencerCriterion: a drop-in for Mask2Former's SetCriterion with no matcher.

Same call as the Hungarian baseline: ``criterion(outputs, targets)`` returns a dict of weighted
scalar losses whose sum is the total, with ``_{i}`` copies for each auxiliary decoder layer.
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


class InfluencerCriterion(nn.Module):
    """Influencer Loss on every scene's mask matrix plus a class loss for the class head.

    A query's class target is the class of the instance it claims most strongly (highest geometric
    mean g_km) when that geometric mean exceeds ``claim_threshold``; otherwise "no object" (index
    C), weighted by ``no_object_weight`` as in Mask2Former. Targets are derived from detached
    g, so the class loss never pushes the mask matrix.

    Args:
        num_classes: C, the number of real classes; class index C is "no object".
        attr_weight, rep_weight, bg_weight, margin, temperature, mask_prob: see MaskInfluencerLoss.
        class_weight: weight of the class cross-entropy.
        no_object_weight: cross-entropy weight of the "no object" class.
        claim_threshold: minimum geometric-mean probability for a query to claim an instance.
        deep_supervision: also apply the losses to each entry of ``outputs["aux_outputs"]``.
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
    ) -> None:
        super().__init__()
        if not 0.0 < claim_threshold <= 1.0:
            raise ValueError(f"claim_threshold must be in (0, 1], got {claim_threshold}")
        self.num_classes = num_classes
        self.mask_loss = MaskInfluencerLoss(
            attr_weight=attr_weight,
            rep_weight=rep_weight,
            bg_weight=bg_weight,
            margin=margin,
            temperature=temperature,
            mask_prob=mask_prob,
        )
        self.class_weight = class_weight
        self.log_claim_threshold = math.log(claim_threshold)
        self.deep_supervision = deep_supervision
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Weighted losses: loss_attractive, loss_repulsive, loss_background, loss_class (+ `_{i}`).

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

        parts = {"attractive": [], "repulsive": [], "background": []}
        class_targets = []
        ignored = per_scene_ignore(targets, outputs["pred_masks"])
        for logits, masks, ignore, target in zip(mask_logits, target_masks, ignored, targets):
            background = None if ignore is None else ~masks.any(dim=0) & ~ignore
            out = self.mask_loss.forward_masks(logits, masks, background=background)
            for key in parts:
                parts[key].append(out[key])
            class_targets.append(self._class_targets(out["log_geomean"].detach(), target["labels"]))

        losses = {
            "loss_attractive": self.mask_loss.attr_weight * torch.stack(parts["attractive"]).mean(),
            "loss_repulsive": self.mask_loss.rep_weight * torch.stack(parts["repulsive"]).mean(),
            "loss_background": self.mask_loss.bg_weight * torch.stack(parts["background"]).mean(),
        }
        class_target = torch.stack(class_targets) if class_targets else pred_logits.new_zeros(
            (0, num_queries), dtype=torch.long
        )  # (B, M)
        class_ce = F.cross_entropy(
            pred_logits.float().transpose(1, 2), class_target, weight=self.class_weights
        )
        losses["loss_class"] = self.class_weight * class_ce
        return losses

    def _class_targets(self, log_geomean: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(M,) class target per query from the (K, M) claim strengths g_km and (K,) labels."""
        num_instances, num_queries = log_geomean.shape
        no_object = torch.full(
            (num_queries,), self.num_classes, dtype=torch.long, device=log_geomean.device
        )
        if num_instances == 0:  # a shape, not a tensor value: no host sync
            return no_object
        best_strength, best_instance = log_geomean.max(dim=0)  # (M,), (M,)
        claimed = best_strength > self.log_claim_threshold
        return torch.where(claimed, labels.to(log_geomean.device)[best_instance], no_object)
