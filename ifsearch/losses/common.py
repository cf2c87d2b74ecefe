"""Helpers shared by both criteria: turn Mask2Former-style outputs into per-scene (N_i, M) logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_scene_mask_logits(pred_masks: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """Return one (N_i, M) mask-logit matrix per scene.

    Args:
        pred_masks: a list of (N_i, M) tensors (point clouds), a single (N, M) tensor (one scene), or
            a (B, M, H, W) tensor (images), whose pixels are flattened to N = H * W points.
    """
    if isinstance(pred_masks, (list, tuple)):
        return list(pred_masks)
    if pred_masks.dim() == 2:
        return [pred_masks]
    if pred_masks.dim() == 4:
        return list(pred_masks.flatten(2).transpose(1, 2))  # B x (H*W, M)
    raise ValueError(
        "pred_masks must be a list of (N_i, M) tensors, one (N, M) tensor or a (B, M, H, W) tensor, "
        f"got a tensor of shape {tuple(pred_masks.shape)}"
    )


def per_scene_target_masks(
    targets: list[dict], pred_masks: torch.Tensor | list[torch.Tensor]
) -> list[torch.Tensor]:
    """Return one (K_i, N_i) bool membership matrix per scene, aligned with ``per_scene_mask_logits``.

    Image targets (K, H, W) are resized (nearest) to the prediction resolution (H', W') when they
    differ, then flattened, so target pixel j is prediction pixel j.
    """
    if isinstance(pred_masks, torch.Tensor) and pred_masks.dim() == 4:
        size = pred_masks.shape[-2:]
        out = []
        for t in targets:
            m = t["masks"]
            if m.shape[0] == 0:  # no instances: interpolate rejects empty inputs
                m = m.new_zeros((0, *size), dtype=torch.bool)
            elif m.shape[-2:] != size:
                m = F.interpolate(m[None].float(), size=size, mode="nearest")[0] > 0.5
            out.append(m.flatten(1).bool())  # (K, H'*W')
        return out
    return [t["masks"].bool() for t in targets]


def per_scene_ignore(
    targets: list[dict], pred_masks: torch.Tensor | list[torch.Tensor]
) -> list[torch.Tensor | None]:
    """Per scene, the (N_i,) bool points to leave out of the background term, or None.

    A target may carry ``"ignore"`` ((N_i,) or (H, W) bool): points that are neither instance nor
    background, such as image padding or COCO crowd regions. Image maps are resized (nearest) and
    flattened like the target masks.
    """
    out: list[torch.Tensor | None] = []
    for t in targets:
        ignore = t.get("ignore")
        if ignore is not None and ignore.dim() == 2:
            size = pred_masks.shape[-2:]
            if ignore.shape != size:
                ignore = F.interpolate(ignore[None, None].float(), size=size, mode="nearest")[0, 0]
            ignore = ignore.flatten() > 0.5
        out.append(ignore)
    return out
