"""Tests for the synthetic rooms dataset and the list-based collate function."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from ifsearch.data import SHAPE_CLASSES, SyntheticScenes, collate_scenes, synthetic_split
from ifsearch.data.synthetic import MIN_POINTS_PER_INSTANCE

SCENE_KEYS = {"points", "instance_labels", "semantic_labels", "labels", "masks", "scene_id"}


def assert_same_scene(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() == SCENE_KEYS
    assert a["scene_id"] == b["scene_id"]
    for key in SCENE_KEYS - {"scene_id"}:
        assert torch.equal(a[key], b[key]), key


def scenes_differ(a: dict, b: dict) -> bool:
    return a["points"].shape != b["points"].shape or not torch.equal(a["points"], b["points"])


# --- determinism and splits -------------------------------------------------------------------


def test_same_arguments_give_identical_scenes() -> None:
    ds = SyntheticScenes(4, seed=3)
    other = SyntheticScenes(4, seed=3)
    for i in range(4):
        first = ds[i]
        assert_same_scene(first, ds[i])  # repeated call on the same object
        assert_same_scene(first, other[i])  # a fresh object


def test_access_order_does_not_matter() -> None:
    ds = SyntheticScenes(5, seed=1)
    forward = [ds[i] for i in range(5)]
    backward = [ds[i] for i in reversed(range(5))][::-1]
    for a, b in zip(forward, backward, strict=True):
        assert_same_scene(a, b)


def test_different_seeds_and_indices_differ() -> None:
    a, b = SyntheticScenes(3, seed=0), SyntheticScenes(3, seed=1)
    for i in range(3):
        assert scenes_differ(a[i], b[i])
    assert scenes_differ(a[0], a[1])


def test_train_and_val_differ_for_the_same_index() -> None:
    train = synthetic_split("train", 3, seed=7)
    val = synthetic_split("val", 3, seed=7)
    assert train.split == "train" and val.split == "val"
    for i in range(3):
        assert scenes_differ(train[i], val[i])
        assert train[i]["scene_id"] == f"train_{i:06d}"
        assert val[i]["scene_id"] == f"val_{i:06d}"


def test_synthetic_split_forwards_keyword_arguments() -> None:
    ds = synthetic_split("val", 2, num_points=512, classes=("sphere",), density_jitter=0.0)
    assert len(ds) == 2
    assert ds[1]["points"].shape == (512, 6)
    assert ds.classes == ("sphere",)


# --- scene contents -----------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(6))
def test_scene_shapes_dtypes_and_label_consistency(index: int) -> None:
    ds = SyntheticScenes(6, num_points=1024, min_instances=2, max_instances=6, seed=11)
    scene = ds[index]
    assert set(scene) == SCENE_KEYS
    points, inst, sem = scene["points"], scene["instance_labels"], scene["semantic_labels"]
    labels, masks = scene["labels"], scene["masks"]
    n, k = points.shape[0], labels.shape[0]

    assert points.dtype == torch.float32 and points.shape == (n, 6)
    assert inst.dtype == torch.int64 and inst.shape == (n,)
    assert sem.dtype == torch.int64 and sem.shape == (n,)
    assert labels.dtype == torch.int64 and labels.shape == (k,)
    assert masks.dtype == torch.bool and masks.shape == (k, n)
    assert isinstance(scene["scene_id"], str)

    assert 2 <= k <= 6
    assert torch.isfinite(points).all()
    rgb = points[:, 3:]
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    xyz = points[:, :3]
    assert xyz[:, :2].abs().max() < 2.1  # room is 4 x 4 m centred at the origin
    assert xyz[:, 2].min() > -0.05 and xyz[:, 2].max() < 2.6  # floor at 0, walls to 2.5 m

    assert inst.min() == 0 and inst.max() == k  # background present, labels 1..K used
    assert ((labels >= 0) & (labels < len(SHAPE_CLASSES))).all()
    for j in range(k):
        assert torch.equal(masks[j], inst == j + 1)
        assert int(masks[j].sum()) >= MIN_POINTS_PER_INSTANCE
        assert (sem[masks[j]] == labels[j]).all()
    assert (sem[inst == 0] == -1).all()
    assert (sem[inst > 0] >= 0).all()
    assert not masks.any(dim=0)[inst == 0].any()  # background belongs to no mask
    assert (masks.sum(dim=0) == (inst > 0).long()).all()  # each point in at most one mask

    bg_share = float((inst == 0).float().mean())
    assert 0.3 < bg_share < 0.5  # ~40% floor + walls


def test_instance_count_covers_the_whole_range() -> None:
    ds = SyntheticScenes(40, num_points=512, min_instances=1, max_instances=3, seed=2)
    counts = {int(ds[i]["labels"].numel()) for i in range(len(ds))}
    assert counts == {1, 2, 3}


def test_fixed_instance_count() -> None:
    ds = SyntheticScenes(5, num_points=512, min_instances=4, max_instances=4)
    assert all(ds[i]["labels"].numel() == 4 for i in range(5))


def test_point_count_varies_with_density_jitter() -> None:
    ds = SyntheticScenes(10, num_points=1000, density_jitter=0.3)
    sizes = [ds[i]["points"].shape[0] for i in range(10)]
    assert len(set(sizes)) > 1
    assert all(700 <= s <= 1300 for s in sizes)


def test_point_count_is_exact_without_jitter() -> None:
    ds = SyntheticScenes(5, num_points=777, density_jitter=0.0)
    assert [ds[i]["points"].shape[0] for i in range(5)] == [777] * 5


def test_instances_are_spatially_separated() -> None:
    """Axis-aligned x-y bounding boxes of the instances' points never overlap."""
    ds = SyntheticScenes(30, num_points=1024, min_instances=4, max_instances=8, seed=5)
    for i in range(len(ds)):
        scene = ds[i]
        xy = scene["points"][:, :2]
        boxes = [(xy[m].min(dim=0).values, xy[m].max(dim=0).values) for m in scene["masks"]]
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                (lo_a, hi_a), (lo_b, hi_b) = boxes[a], boxes[b]
                overlap = bool(((lo_a < hi_b) & (lo_b < hi_a)).all())
                assert not overlap, f"{scene['scene_id']}: instances {a + 1} and {b + 1} overlap"


def test_crowded_rooms_still_separate_instances() -> None:
    """Many objects force the shrink-and-retry placement path; separation must still hold."""
    ds = SyntheticScenes(3, num_points=4096, min_instances=16, max_instances=16, seed=0)
    for i in range(len(ds)):
        scene = ds[i]
        assert scene["labels"].numel() == 16
        xy = scene["points"][:, :2]
        boxes = [(xy[m].min(dim=0).values, xy[m].max(dim=0).values) for m in scene["masks"]]
        for a in range(16):
            for b in range(a + 1, 16):
                (lo_a, hi_a), (lo_b, hi_b) = boxes[a], boxes[b]
                assert not bool(((lo_a < hi_b) & (lo_b < hi_a)).all())


def test_colour_alone_identifies_the_class() -> None:
    """Colour is a learnable cue: a nearest-class-mean rule on instance colour is always right."""
    ds = SyntheticScenes(30, num_points=512, seed=4)
    colours: list[torch.Tensor] = []
    classes: list[int] = []
    background = []
    for i in range(len(ds)):
        scene = ds[i]
        rgb = scene["points"][:, 3:]
        background.append(rgb[scene["instance_labels"] == 0].mean(dim=0))
        for mask, label in zip(scene["masks"], scene["labels"], strict=True):
            colours.append(rgb[mask].mean(dim=0))
            classes.append(int(label))
    colour_t, class_t = torch.stack(colours), torch.tensor(classes)
    assert set(classes) == set(range(len(SHAPE_CLASSES)))
    # Row C of the centroid table is the background: no instance may look like it.
    centroids = torch.stack(
        [colour_t[class_t == c].mean(dim=0) for c in range(len(SHAPE_CLASSES))]
        + [torch.stack(background).mean(dim=0)]
    )
    nearest = torch.cdist(colour_t, centroids).argmin(dim=1)
    assert torch.equal(nearest, class_t)


def test_indexing_bounds() -> None:
    ds = SyntheticScenes(3, num_points=256)
    assert_same_scene(ds[-1], ds[2])
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds[-4]
    assert len(list(ds)) == 3  # plain iteration stops at IndexError


# --- classes and validation ---------------------------------------------------------------------


def test_class_subset_defines_class_indices() -> None:
    ds = SyntheticScenes(20, num_points=512, classes=["cylinder", "box"], seed=9)
    assert ds.classes == ("cylinder", "box") and ds.num_classes == 2
    seen = set()
    for i in range(len(ds)):
        scene = ds[i]
        assert ((scene["labels"] >= 0) & (scene["labels"] < 2)).all()
        seen |= set(scene["labels"].tolist())
        # index 0 is now "cylinder" (blue), index 1 "box" (red).
        rgb = scene["points"][:, 3:]
        for mask, label in zip(scene["masks"], scene["labels"], strict=True):
            r, _, b = rgb[mask].mean(dim=0).tolist()
            assert (b > r) if int(label) == 0 else (r > b)
    assert seen == {0, 1}


def test_single_class_given_as_string() -> None:
    ds = SyntheticScenes(2, num_points=256, classes="sphere")
    assert ds.classes == ("sphere",)


def test_unknown_class_is_rejected_with_valid_names() -> None:
    pattern = r"unknown shape class 'cone'.*box.*sphere.*cylinder.*plane"
    with pytest.raises(ValueError, match=pattern):
        SyntheticScenes(2, classes=("box", "cone"))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"classes": ()}, "non-empty"),
        ({"classes": ("box", "box")}, "repeat"),
        ({"min_instances": 5, "max_instances": 3}, r"min_instances \(5\) must be <= max_instances"),
        ({"min_instances": 0}, "min_instances must be >= 1"),
        ({"max_instances": 100}, "max_instances must be <= 16"),
        ({"num_points": 10}, "num_points must be >= 64"),
        ({"num_points": 100, "max_instances": 6}, "needs 96"),
        ({"num_points": 2048.0}, "num_points must be an integer"),
        ({"noise": -0.1}, "noise must be"),
        ({"density_jitter": 1.0}, r"density_jitter must be in \[0, 1\)"),
        ({"split": "test"}, "split must be one of"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        SyntheticScenes(**{"num_scenes": 2, **kwargs})


def test_num_scenes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_scenes must be >= 1"):
        SyntheticScenes(0)


# --- batching -----------------------------------------------------------------------------------


def test_collate_keeps_variable_size_scenes_as_lists() -> None:
    ds = SyntheticScenes(3, num_points=512, density_jitter=0.3, seed=1)
    scenes = [ds[i] for i in range(3)]
    batch = collate_scenes(scenes)
    assert set(batch) == {"points", "targets", "instance_labels", "semantic_labels", "scene_ids"}
    assert len({p.shape[0] for p in batch["points"]}) > 1  # really variable N
    assert batch["scene_ids"] == [s["scene_id"] for s in scenes]
    for i, scene in enumerate(scenes):
        assert batch["points"][i] is scene["points"]
        assert batch["instance_labels"][i] is scene["instance_labels"]
        assert batch["semantic_labels"][i] is scene["semantic_labels"]
        assert set(batch["targets"][i]) == {"labels", "masks"}
        assert batch["targets"][i]["labels"] is scene["labels"]
        assert batch["targets"][i]["masks"] is scene["masks"]
        n = scene["points"].shape[0]
        assert batch["targets"][i]["masks"].shape == (scene["labels"].numel(), n)


def test_collate_rejects_empty_batch() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        collate_scenes([])


def test_dataloader_with_collate() -> None:
    ds = SyntheticScenes(5, num_points=256, seed=3)
    loader = DataLoader(ds, batch_size=2, shuffle=False, num_workers=0, collate_fn=collate_scenes)
    batches = list(loader)
    assert [len(b["points"]) for b in batches] == [2, 2, 1]
    ids = [sid for b in batches for sid in b["scene_ids"]]
    assert ids == [f"train_{i:06d}" for i in range(5)]
    for b in batches:
        for points, target in zip(b["points"], b["targets"], strict=True):
            assert target["masks"].shape[1] == points.shape[0]
    assert torch.equal(batches[2]["points"][0], ds[4]["points"])
