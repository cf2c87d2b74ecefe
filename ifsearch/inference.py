"""Mask matrix -> instances: per-scene masks, scores and class labels."""

from __future__ import annotations

import torch

from ifsearch.losses.common import per_scene_mask_logits
from ifsearch.losses.influencer import mask_log_probs


@torch.no_grad()
def predict_instances(
    outputs: dict,
    mask_prob: str = "sigmoid",
    mask_threshold: float = 0.5,
    dedup_iou: float = 0.0,
    return_probs: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """One prediction per query whose mask is non-empty, as Mask2Former's instance inference.

    score = (best real-class probability) x (mean mask probability over the query's mask points),
    so a confident class on a sharp mask ranks first.

    Args:
        outputs: model outputs ({"pred_logits": (B, M, C+1), "pred_masks": ...}).
        mask_prob: "sigmoid" or "softmax", the normalisation the model was trained with.
        mask_threshold: point i is in query m's mask when p_im > mask_threshold.
        dedup_iou: when > 0, drop a prediction whose mask IoU with a higher-scoring kept one
            exceeds this (class-agnostic mask NMS): the remedy for duplicate claims.
        return_probs: also return each kept query's mask probabilities, e.g. to resample image
            masks to the original resolution before thresholding.

    Returns:
        per scene {"masks": (P, N) bool, "scores": (P,), "labels": (P,), "queries": (P,)}, plus
        "probs" (P, N) float with ``return_probs``; image pixels are flattened (N = H' * W').
    """
    class_probs = outputs["pred_logits"].float().softmax(-1)[..., :-1]  # (B, M, C)
    results = []
    for probs, logits in zip(class_probs, per_scene_mask_logits(outputs["pred_masks"])):
        mask_probs = mask_log_probs(logits.float(), mask_prob).exp().T  # (M, N)
        masks = mask_probs > mask_threshold  # (M, N)
        sizes = masks.sum(dim=1)  # (M,)
        mask_scores = (mask_probs * masks).sum(dim=1) / sizes.clamp(min=1)
        class_scores, labels = probs.max(dim=-1)  # (M,)
        scores = class_scores * mask_scores
        keep = torch.nonzero(sizes > 0).flatten()  # host sync: fine outside the training step
        if dedup_iou > 0 and keep.numel() > 1:
            keep = keep[_mask_nms(masks[keep], scores[keep], dedup_iou)]
        result = {"masks": masks[keep], "scores": scores[keep], "labels": labels[keep],
                  "queries": keep}
        if return_probs:
            result["probs"] = mask_probs[keep]
        results.append(result)
    return results


def _mask_nms(masks: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices kept by greedy NMS on mask IoU, in descending score order."""
    order = scores.argsort(descending=True)
    masks = masks[order].float()  # (P, N)
    inter = masks @ masks.T  # (P, P)
    area = masks.sum(dim=1)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1)
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=masks.device)
    for i in range(len(order)):  # loop over predictions (<= M), never over points
        if not suppressed[i]:
            suppressed |= (iou[i] > iou_threshold) & (torch.arange(len(order),
                                                                   device=masks.device) > i)
    return order[~suppressed]
