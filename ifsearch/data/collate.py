"""Batching for point-cloud scenes of different sizes."""

from __future__ import annotations


def collate_scenes(batch: list[dict]) -> dict:
    """Gather scenes into lists instead of padded tensors.

    Scenes have different point counts N_i and instance counts K_i; padding would waste compute
    and force every consumer to carry validity masks, while the model and both criteria already
    work per scene (see ``ifsearch.losses.common``). So the batch is a dict of lists:

    ``{"points": [(N_i, 6)], "targets": [{"labels": (K_i,), "masks": (K_i, N_i)}],
    "instance_labels": [(N_i,)], "semantic_labels": [(N_i,)], "scene_ids": [str]}``, plus
    ``"eval_targets": [{"index": (N_full,), "masks": (K, N_full), "labels": (K,)}]`` when the
    scenes carry full-resolution ground truth (S3DIS evaluation rooms: the model sees voxels,
    metrics are computed on every original point).

    Args:
        batch: scene dicts as returned by ``SyntheticScenes`` or ``S3DISRooms``.

    Returns:
        The batch dict above; tensors are the scenes' own (not copied).
    """
    if not batch:
        raise ValueError("collate_scenes needs at least one scene, got an empty batch")
    out = {
        "points": [scene["points"] for scene in batch],
        "targets": [{"labels": scene["labels"], "masks": scene["masks"]} for scene in batch],
        "instance_labels": [scene["instance_labels"] for scene in batch],
        "semantic_labels": [scene["semantic_labels"] for scene in batch],
        "scene_ids": [scene["scene_id"] for scene in batch],
    }
    if all("eval_index" in scene for scene in batch):
        out["eval_targets"] = [
            {"index": s["eval_index"], "masks": s["eval_masks"], "labels": s["eval_labels"]}
            for s in batch
        ]
    return out
