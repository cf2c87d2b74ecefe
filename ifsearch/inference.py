"""Mask matrix -> instances: Mask2Former's top-k (query, class) pairs, and every query's claim.

One pass over a scene's (M, N) mask matrix gives two prediction sets:

* **Pairs** (class-aware AP, S3DIS coverage), as Mask2Former's ``instance_inference``: class
  probabilities are a softmax over the C classes and "no object"; dropping "no object" leaves an
  (M, C) score matrix whose top k entries over all (query, class) pairs are kept, so a query may
  appear once per class it finds plausible (label = index % C, query = index // C). A pair's mask
  is its query's mask; its score = class probability x mask score, the mask score being the mean
  mask probability over the mask's points.
* **Claims** (class-agnostic AP, query diagnostics): one prediction per query whose mask is
  non-empty, whatever the class head says, scored mask score x objectness (1 - p_no_object). The
  top-k selection is no use here: a starved class head can fill the k slots with few queries.

Masks (``assign``):

* ``threshold`` (Mask2Former): point i is in query m's mask when p_im > ``mask_threshold``;
  sigmoid masks may overlap.
* ``argmax``: every point goes to one slot at most, so masks are disjoint. Softmax masks: to its
  most probable slot among the M queries and the background slot (1 - sum_m p_im); sigmoid masks
  (the Hungarian baseline always reads sigmoid): to its most probable query when that probability
  exceeds ``mask_threshold``, else to the background. The mask score is then the mean probability
  of the query over the points assigned to it.

Pairs whose query's mask is empty are dropped after the top-k selection (in Mask2Former they stay
with score 0 and match nothing), so a scene may have fewer than k pairs.
"""

from __future__ import annotations

import torch

from ifsearch.config import ASSIGN_MODES
from ifsearch.losses.common import per_scene_mask_logits
from ifsearch.losses.influencer import mask_log_probs


@torch.no_grad()
def predict_instances(
    outputs: dict,
    mask_prob: str = "sigmoid",
    mask_threshold: float = 0.5,
    dedup_iou: float = 0.0,
    return_probs: bool = False,
    topk: int = 0,
    assign: str = "threshold",
) -> list[dict]:
    """Mask2Former's top-k (query, class) pairs per scene, plus every query's claim.

    Args:
        outputs: model outputs ({"pred_logits": (B, M, C+1), "pred_masks": ...}).
        mask_prob: "sigmoid" or "softmax", the normalisation the model was trained with.
        mask_threshold: ``assign="threshold"``: point i is in query m's mask when
            p_im > mask_threshold; ``assign="argmax"`` with sigmoid masks: the least probability
            that wins a point for a query.
        dedup_iou: when > 0, greedy mask NMS: a pair is dropped when its mask IoU with a
            higher-scoring kept pair of a *different* query exceeds this (a query's own pairs
            share one mask and never suppress each other, or the top-k alternatives would go).
            The claims get the same NMS (each query once, ranked by its claim score), marked in
            ``claims["kept"]``: the diagnostics read every claim, the class-agnostic AP the kept
            ones, so both APs see the same post-processing.
        return_probs: also return mask probabilities, e.g. to resample image masks to the
            original resolution before cutting them at ``mask_threshold``; with
            ``assign="argmax"`` these are the 0/1 masks (cut them at 0.5: linear resampling keeps
            disjoint masks disjoint).
        topk: pairs kept per scene before empty masks are dropped; 0 = M, as many as queries,
            Mask2Former's default (test_topk_per_image = num_queries); at most M * C.
        assign: "threshold" or "argmax" (module docstring).

    Returns:
        per scene {"masks": (P, N) bool, "scores": (P,), "labels": (P,), "queries": (P,),
        "claims": {"masks": (Q, N) bool, "scores": (Q,), "queries": (Q,) ascending,
        "kept": (Q,) bool}}, plus "probs" (P, N) and claims["probs"] (Q, N) float with
        ``return_probs``. Pairs come in descending class probability; image pixels are flattened
        (N = H' * W').
    """
    if assign not in ASSIGN_MODES:
        raise ValueError(f"assign must be one of {ASSIGN_MODES}, got {assign!r}")
    class_probs = outputs["pred_logits"].float().softmax(-1)[..., :-1]  # (B, M, C)
    results = []
    for probs, logits in zip(class_probs, per_scene_mask_logits(outputs["pred_masks"])):
        num_queries, num_classes = probs.shape
        mask_probs = mask_log_probs(logits.float(), mask_prob).exp().T  # (M, N)
        masks = _assign_points(mask_probs, mask_prob, mask_threshold, assign)  # (M, N)
        sizes = masks.sum(dim=1)  # (M,)
        mask_scores = (mask_probs * masks).sum(dim=1) / sizes.clamp(min=1)  # (M,)
        claimed = torch.nonzero(sizes > 0).flatten()  # (Q,) host sync: fine outside training

        k = min(topk or num_queries, num_queries * num_classes)
        class_scores, flat = probs.flatten().topk(k)  # (k,) over all (query, class) pairs
        queries, labels = flat // num_classes, flat % num_classes
        nonempty = sizes[queries] > 0
        queries, labels, class_scores = queries[nonempty], labels[nonempty], class_scores[nonempty]
        scores = class_scores * mask_scores[queries]  # (P,)
        # sum of the C class probabilities = 1 - p_no_object, without the cancellation of
        # 1 - p in float32 when the head is sure of "no object" (the ranking survives)
        claim_scores = mask_scores[claimed] * probs[claimed].sum(dim=-1)  # (Q,)
        kept = torch.ones(len(claimed), dtype=torch.bool, device=probs.device)
        if dedup_iou > 0 and len(claimed) > 1:
            iou = _mask_iou(masks[claimed])  # (Q, Q)
            rows = torch.searchsorted(claimed, queries)  # (P,) each pair's claim
            keep = _mask_nms(iou[rows][:, rows], scores, rows, dedup_iou)
            queries, labels, scores = queries[keep], labels[keep], scores[keep]
            kept = _mask_nms(iou, claim_scores, torch.arange(len(claimed), device=iou.device),
                             dedup_iou)
        result = {"masks": masks[queries], "scores": scores, "labels": labels, "queries": queries,
                  "claims": {"masks": masks[claimed], "scores": claim_scores,
                             "queries": claimed, "kept": kept}}
        if return_probs:
            soft = mask_probs if assign == "threshold" else masks.float()
            result["probs"] = soft[queries]
            result["claims"]["probs"] = soft[claimed]
        results.append(result)
    return results


def _assign_points(mask_probs: torch.Tensor, mask_prob: str, mask_threshold: float,
                   assign: str) -> torch.Tensor:
    """(M, N) bool masks from (M, N) probabilities (module docstring, "Masks")."""
    if assign == "threshold":
        return mask_probs > mask_threshold
    best, winner = mask_probs.max(dim=0)  # (N,) most probable query per point
    if mask_prob == "softmax":
        on = best > 1 - mask_probs.sum(dim=0)  # beats the background slot; ties go to it
    else:
        on = best > mask_threshold
    slots = torch.arange(mask_probs.shape[0], device=mask_probs.device)
    return (slots[:, None] == winner[None, :]) & on[None, :]  # (M, N)


def _mask_iou(masks: torch.Tensor) -> torch.Tensor:
    """(Q, Q) IoU of bool masks (Q, N) via one matrix product."""
    masks = masks.float()
    inter = masks @ masks.T  # (Q, Q)
    area = masks.sum(dim=1)
    return inter / (area[:, None] + area[None, :] - inter).clamp(min=1)


def _mask_nms(iou: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
              iou_threshold: float) -> torch.Tensor:
    """(P,) bool: kept by greedy NMS, where predictions of one group never suppress each other.

    Args:
        iou: (P, P) mask IoU of the predictions; scores: (P,); groups: (P,) e.g. query ids.
    """
    order = scores.argsort(descending=True)
    iou, groups = iou[order][:, order], groups[order]
    later = torch.ones_like(iou, dtype=torch.bool).triu(diagonal=1)  # (P, P): j ranked below i
    hits = (iou > iou_threshold) & later & (groups[:, None] != groups[None, :])
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=iou.device)
    for i in range(len(order)):  # loop over predictions (<= k), never over points
        if not suppressed[i]:
            suppressed |= hits[i]
    keep = torch.empty_like(suppressed)
    keep[order] = ~suppressed
    return keep
