"""The mask-matrix Influencer Loss (InfluencerFormer seeds; DESIGN.md "The loss").

For an (N, M) matrix of mask logits (N points, M queries) and K ground-truth instances with point
sets S_k:

    log p_im   = logsigmoid(x_im)                      ("sigmoid")
               = log_softmax([x_i1 .. x_iM, 0])_m       ("softmax": M queries + a background slot)
    g_km       = mean_{i in S_k} log p_im               log geometric mean of query m over instance k
    A          = mean_k  -T * logsumexp_m(g_km / T)     attraction: some query claims all of k
    P_k        = exp(g_k.)                              the instance's query profile, in [0, 1]^M
    R          = mean_{k != l} max(0, margin - sqrt(||P_k - P_l||^2 + eps))
    B          = mean_{i in background, m} p_im         background suppression
    loss       = attr_weight * A + rep_weight * R + bg_weight * B

Everything is dense algebra on (K, N) x (N, M) products: no loop over instances or points, and no
host synchronisation when the instance membership is given as a (K, N) mask (the criterion's path).
The softmax background slot has a fixed logit 0, so with M = 1 the softmax mode equals the sigmoid one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MASK_PROB_MODES = ("sigmoid", "softmax")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def mask_log_probs(mask_logits: torch.Tensor, mask_prob: str) -> torch.Tensor:
    """Log mask probabilities log p_im, (N, M), in the given normalisation.

    Shared with inference so training and prediction read the mask matrix the same way.
    """
    if mask_prob == "sigmoid":
        return F.logsigmoid(mask_logits)
    if mask_prob == "softmax":
        background_slot = mask_logits.new_zeros(mask_logits.shape[:-1] + (1,))
        return torch.log_softmax(torch.cat([mask_logits, background_slot], dim=-1), dim=-1)[..., :-1]
    raise ValueError(f"mask_prob must be one of {MASK_PROB_MODES}, got {mask_prob!r}")


class MaskInfluencerLoss(nn.Module):
    """Influencer Loss on an (N, M) mask matrix: attraction, repulsion and background terms.

    Args:
        attr_weight: weight of the attraction term A.
        rep_weight: weight of the repulsion term R.
        bg_weight: weight of the background term B.
        margin: hinge margin on the L2 distance between instance profiles. Profiles live in
            [0, 1]^M, so two instances claimed by different queries are at most sqrt(2) apart.
        temperature: T of the soft maximum over queries; small T approaches a hard max.
        mask_prob: "sigmoid" (independent per query) or "softmax" (over queries + background slot).
        eps: added inside the square root of the profile distance so equal profiles do not give
            NaN gradients.
    """

    def __init__(
        self,
        attr_weight: float = 1.0,
        rep_weight: float = 1.0,
        bg_weight: float = 1.0,
        margin: float = 1.0,
        temperature: float = 1.0,
        mask_prob: str = "sigmoid",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if mask_prob not in MASK_PROB_MODES:
            raise ValueError(f"mask_prob must be one of {MASK_PROB_MODES}, got {mask_prob!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.attr_weight = attr_weight
        self.rep_weight = rep_weight
        self.bg_weight = bg_weight
        self.margin = margin
        self.temperature = temperature
        self.mask_prob = mask_prob
        self.eps = eps

    def forward(
        self,
        mask_logits: torch.Tensor,
        instance_labels: torch.Tensor,
        num_instances: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss from per-point instance labels.

        Args:
            mask_logits: (N, M) float mask logits.
            instance_labels: (N,) long, 0 = background, k > 0 = instance k. Ids need not be
                contiguous: ids that no point carries are ignored.
            num_instances: the largest instance id, if known. When None it is read from the
                labels, which is a host synchronisation on GPU; the criterion passes masks instead.

        Returns:
            dict with scalar "loss", "attractive", "repulsive", "background", and the (K, M)
            "log_geomean" g_km (K = num_instances) used to derive class targets.
        """
        if num_instances is None:
            num_instances = int(instance_labels.max()) if instance_labels.numel() else 0
        one_hot = F.one_hot(instance_labels, num_instances + 1)  # (N, K+1)
        instance_masks = one_hot[:, 1:].T.bool()  # (K, N)
        return self.forward_masks(mask_logits, instance_masks, background=instance_labels == 0)

    def forward_masks(
        self,
        mask_logits: torch.Tensor,
        instance_masks: torch.Tensor,
        background: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss from a (K, N) bool instance membership matrix (rows may be empty: they are ignored).

        Args:
            mask_logits: (N, M) float mask logits.
            instance_masks: (K, N) bool, instance k's points.
            background: (N,) bool background points; by default the points in no instance.
        """
        # At least fp32, even when the model ran under bf16/fp16 autocast.
        logits = mask_logits.float() if mask_logits.dtype in LOW_PRECISION else mask_logits
        log_p = mask_log_probs(logits, self.mask_prob)  # (N, M)
        member = instance_masks.to(log_p.dtype)  # (K, N)
        if background is None:
            background = ~instance_masks.any(dim=0)
        background = background.to(log_p.dtype)  # (N,)

        # Attraction: g_km, the log geometric mean of p_im over the points of instance k.
        counts = member.sum(dim=1)  # (K,)
        valid = (counts > 0).to(log_p.dtype)  # (K,) empty instances take no part
        g = (member @ log_p) / counts.clamp(min=1).unsqueeze(1)  # (K, M)
        t = self.temperature
        attraction_k = -t * torch.logsumexp(g / t, dim=1)  # (K,)
        attractive = (attraction_k * valid).sum() / valid.sum().clamp(min=1)

        # Repulsion: hinge on distances between instance profiles P_k = exp(g_k.), via the Gram
        # matrix so no (K, K, M) tensor is materialised.
        profiles = g.exp()  # (K, M)
        sq_norms = (profiles * profiles).sum(dim=1)  # (K,)
        sq_dist = sq_norms[:, None] + sq_norms[None, :] - 2.0 * profiles @ profiles.T  # (K, K)
        dist = (sq_dist.clamp(min=0) + self.eps).sqrt()
        pair_valid = valid[:, None] * valid[None, :]
        pair_valid = pair_valid * (1.0 - torch.eye(len(valid), device=g.device, dtype=g.dtype))
        hinge = F.relu(self.margin - dist)  # (K, K)
        repulsive = (hinge * pair_valid).sum() / pair_valid.sum().clamp(min=1)

        # Background: mean probability any query gives to a background point.
        num_queries = log_p.shape[1]
        bg_prob_sum = background @ log_p.exp()  # (M,)
        denominator = (background.sum() * num_queries).clamp(min=1)
        background_term = bg_prob_sum.sum() / denominator

        loss = (
            self.attr_weight * attractive
            + self.rep_weight * repulsive
            + self.bg_weight * background_term
        )
        return {
            "loss": loss,
            "attractive": attractive,
            "repulsive": repulsive,
            "background": background_term,
            "log_geomean": g,
        }
