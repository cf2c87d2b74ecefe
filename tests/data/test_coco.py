"""COCO data path: dataset items, error messages, mask AP and the synthetic COCO generator.

The hand-written dataset below is small enough to know every expected pixel:

* image 10 ``a.png``: 20 x 30 (H x W) RGB, four instances and one crowd region;
* image 5 ``gray.png``: 30 x 20 grayscale, one polygon instance;
* image 20 ``empty.png``: 12 x 12, no annotation (a negative that must stay in the dataset).

Category ids 2, 5, 9 are not contiguous, so the class-index mapping is exercised.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from ifsearch.data.coco import (
    DOWNLOAD_HINT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CocoInstances,
    annotation_path,
    collate_images,
    masks_to_original,
)
from ifsearch.data.make_synthetic_coco import main as synthetic_main
from ifsearch.data.make_synthetic_coco import make_synthetic_coco
from ifsearch.errors import DataError
from ifsearch.evaluation import CocoEvaluator
from ifsearch.inference import predict_instances
from ifsearch.metrics.coco_eval import coco_mask_ap, coco_mask_ap_agnostic, encode_results

CATEGORIES = [
    {"id": 2, "name": "cat", "supercategory": "animal"},
    {"id": 5, "name": "dog", "supercategory": "animal"},
    {"id": 9, "name": "bird", "supercategory": "animal"},
]


def _box(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[rows, cols] = True
    return mask


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, written independently of pycocotools: column-major run lengths,
    starting with a run of zeros."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


# Expected masks of image 10 (20 x 30), in annotation order.
POLY_CAT = _box(20, 30, slice(3, 8), slice(2, 10))  # pycocotools' raster of the polygon below
RLE_DOG = _box(20, 30, slice(10, 14), slice(14, 24))
CRLE_BIRD = _box(20, 30, slice(0, 6), slice(24, 30))
DOT_DOG = _box(20, 30, slice(2, 3), slice(0, 1))  # one pixel: vanishes when shrunk by 2
CROWD_CAT = _box(20, 30, slice(16, 20), slice(0, 6))
GRAY_DOG = _box(30, 20, slice(4, 12), slice(6, 16))


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    Image.fromarray(rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)).save(
        root / "val2017" / "a.png"
    )
    Image.fromarray(rng.integers(0, 256, size=(30, 20), dtype=np.uint8), mode="L").save(
        root / "val2017" / "gray.png"
    )
    Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)).save(
        root / "val2017" / "empty.png"
    )
    ann = {"image_id": 10, "iscrowd": 0}
    dataset = {
        "info": {},
        "licenses": [],
        "images": [
            {"id": 10, "file_name": "a.png", "height": 20, "width": 30},
            {"id": 5, "file_name": "gray.png", "height": 30, "width": 20},
            {"id": 20, "file_name": "empty.png", "height": 12, "width": 12},
        ],
        "annotations": [
            {**ann, "id": 1, "category_id": 2, "segmentation": [[2, 3, 10, 3, 10, 8, 2, 8]]},
            {**ann, "id": 2, "category_id": 5, "segmentation": _uncompressed_rle(RLE_DOG)},
            {**ann, "id": 3, "category_id": 9, "segmentation": _compressed_rle(CRLE_BIRD)},
            {**ann, "id": 4, "category_id": 5, "segmentation": _uncompressed_rle(DOT_DOG)},
            {
                **ann,
                "id": 5,
                "category_id": 2,
                "segmentation": _uncompressed_rle(CROWD_CAT),
                "iscrowd": 1,
            },
            {
                "id": 6,
                "image_id": 5,
                "category_id": 5,
                "iscrowd": 0,
                "segmentation": [[6, 4, 16, 4, 16, 12, 6, 12]],
            },
        ],
        "categories": CATEGORIES,
    }
    for a in dataset["annotations"]:
        a["area"] = 1.0  # unused by the loader; COCOeval uses it for the area ranges
        a["bbox"] = [0.0, 0.0, 1.0, 1.0]
    annotation_path(root, "val2017").write_text(json.dumps(dataset))
    return root


def _unnormalise(image: torch.Tensor) -> np.ndarray:
    """(3, h, w) normalised -> (h, w, 3) 0..255 floats."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return ((image * std + mean) * 255.0).permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------------- dataset


def test_items_exact_without_resize(coco_root: Path) -> None:
    ds = CocoInstances(coco_root, "val2017", image_size=30)
    assert ds.class_names == ("cat", "dog", "bird")
    assert ds.category_ids == (2, 5, 9)
    assert ds.image_ids == [5, 10, 20]  # sorted; the negative image 20 is kept
    assert len(ds) == 3

    item = ds[1]  # image 10, 20 x 30: longer side is already 30, so no resize
    assert item["image_id"] == 10 and item["scene_id"] == "a.png"
    assert item["orig_size"] == (20, 30) and item["resized_size"] == (20, 30)
    assert item["image"].shape == (3, 30, 30) and item["image"].dtype == torch.float32
    original = np.asarray(Image.open(coco_root / "val2017" / "a.png"), dtype=np.float32)
    np.testing.assert_allclose(_unnormalise(item["image"][:, :20]), original, atol=1e-3)
    assert torch.all(item["image"][:, 20:] == 0)  # zero padding at the bottom

    assert item["labels"].tolist() == [0, 1, 2, 1]  # polygon cat, RLE dog, RLE bird, dot dog
    assert item["labels"].dtype == torch.int64
    assert item["masks"].shape == (4, 30, 30) and item["masks"].dtype == torch.bool
    for mask, expected in zip(item["masks"], [POLY_CAT, RLE_DOG, CRLE_BIRD, DOT_DOG], strict=True):
        assert torch.equal(mask[:20], torch.from_numpy(expected))
        assert not mask[20:].any()
    # Crowd: not an instance, but ignored, like the padding rows.
    expected_ignore = np.zeros((30, 30), dtype=bool)
    expected_ignore[:20] = CROWD_CAT
    expected_ignore[20:] = True
    assert torch.equal(item["ignore"], torch.from_numpy(expected_ignore))


def test_grayscale_and_negative_images(coco_root: Path) -> None:
    ds = CocoInstances(coco_root, "val2017", image_size=30)
    gray = ds[0]  # 30 x 20 grayscale: padded on the right
    assert gray["image"].shape == (3, 30, 30) and gray["resized_size"] == (30, 20)
    pixels = _unnormalise(gray["image"][:, :, :20])
    original = np.asarray(Image.open(coco_root / "val2017" / "gray.png"), dtype=np.float32)
    for c in range(3):
        np.testing.assert_allclose(pixels[..., c], original, atol=1e-3)
    assert gray["labels"].tolist() == [1]
    assert torch.equal(gray["masks"][0, :, :20], torch.from_numpy(GRAY_DOG))
    assert gray["ignore"][:, 20:].all() and not gray["ignore"][:, :20].any()

    empty = ds[2]  # 12 x 12 upscaled to 30 x 30, no annotation
    assert empty["resized_size"] == (30, 30)
    assert empty["labels"].shape == (0,) and empty["masks"].shape == (0, 30, 30)
    assert not empty["ignore"].any()


def test_resize_uses_nearest_and_drops_vanished_instances(coco_root: Path) -> None:
    ds = CocoInstances(coco_root, "val2017", image_size=15)
    item = ds[1]  # 20 x 30 -> 10 x 15: nearest-exact at scale 2 samples odd rows and columns
    assert item["resized_size"] == (10, 15) and item["image"].shape == (3, 15, 15)
    assert item["labels"].tolist() == [0, 1, 2]  # the one-pixel dog (even row/col) vanished
    for mask, expected in zip(item["masks"], [POLY_CAT, RLE_DOG, CRLE_BIRD], strict=True):
        assert torch.equal(mask[:10], torch.from_numpy(expected[1::2, 1::2]))
        assert not mask[10:].any()
    assert torch.equal(item["ignore"][:10], torch.from_numpy(CROWD_CAT[1::2, 1::2]))
    assert item["ignore"][10:].all()


def test_class_subset_keeps_order_and_ignores_other_classes(coco_root: Path) -> None:
    ds = CocoInstances(coco_root, "val2017", image_size=30, classes=["bird", "cat"])
    assert ds.class_names == ("bird", "cat") and ds.category_ids == (9, 2)
    assert ds.image_ids == [5, 10, 20]  # images without kept instances stay
    item = ds[1]
    assert item["labels"].tolist() == [1, 0]  # cat polygon, bird RLE; dogs are background
    assert torch.equal(item["masks"][0, :20], torch.from_numpy(POLY_CAT))
    assert item["ignore"][:20].numpy().tolist() == CROWD_CAT.tolist()  # crowd cat still ignored
    assert ds[0]["labels"].shape == (0,)

    only_dog = CocoInstances(coco_root, "val2017", image_size=30, classes=("dog",))
    assert not only_dog[1]["ignore"][:20].any()  # a crowd of another class is just background
    assert CocoInstances(coco_root, "val2017", 30, max_images=2).image_ids == [5, 10]


def test_collate_images(coco_root: Path) -> None:
    ds = CocoInstances(coco_root, "val2017", image_size=30)
    batch = collate_images([ds[0], ds[1]])
    assert batch["images"].shape == (2, 3, 30, 30)
    assert [t["labels"].tolist() for t in batch["targets"]] == [[1], [0, 1, 2, 1]]
    assert batch["targets"][1]["ignore"].shape == (30, 30)
    assert batch["image_ids"] == [5, 10]
    assert batch["orig_sizes"] == [(30, 20), (20, 30)]
    assert batch["resized_sizes"] == [(30, 20), (20, 30)]
    assert batch["scene_ids"] == ["gray.png", "a.png"]
    with pytest.raises(ValueError, match="empty batch"):
        collate_images([])


# --------------------------------------------------------------------------------- errors


def test_missing_root_and_json_name_path_and_download(tmp_path: Path, coco_root: Path) -> None:
    with pytest.raises(DataError, match="cocodataset.org") as info:
        CocoInstances(tmp_path / "nowhere", "val2017", 32)
    assert "nowhere" in str(info.value) and "make_synthetic_coco" in str(info.value)
    with pytest.raises(DataError, match="cocodataset.org") as info:
        CocoInstances(coco_root, "train2017", 32)
    assert str(annotation_path(coco_root, "train2017")) in str(info.value)
    assert "make_synthetic_coco" in DOWNLOAD_HINT


def test_invalid_json_names_the_file(coco_root: Path) -> None:
    path = annotation_path(coco_root, "val2017")
    path.write_text('{"images": [')
    with pytest.raises(DataError, match="not valid JSON") as info:
        CocoInstances(coco_root, "val2017", 32)
    assert str(path) in str(info.value)
    path.write_text('{"annotations": []}')
    with pytest.raises(DataError, match="'images'"):
        CocoInstances(coco_root, "val2017", 32)


def test_unknown_class_lists_available(coco_root: Path) -> None:
    with pytest.raises(DataError, match=r"\['zebra'\].*available categories.*'cat', 'dog', 'bird'"):
        CocoInstances(coco_root, "val2017", 32, classes=["cat", "zebra"])


def test_missing_image_reported_up_front_and_on_load(coco_root: Path) -> None:
    (coco_root / "val2017" / "gray.png").unlink()
    json_path = str(annotation_path(coco_root, "val2017"))
    with pytest.raises(DataError, match=r"1 of 3 images .* missing") as info:
        CocoInstances(coco_root, "val2017", 32)
    assert str(coco_root / "val2017" / "gray.png") in str(info.value)
    assert json_path in str(info.value)

    Image.new("L", (20, 30)).save(coco_root / "val2017" / "gray.png")
    ds = CocoInstances(coco_root, "val2017", 32)  # a check that passes...
    (coco_root / "val2017" / "a.png").unlink()  # ...and an image that goes missing later
    with pytest.raises(DataError, match="a.png") as info:
        ds[1]
    assert json_path in str(info.value)


# --------------------------------------------------------------------------------- masks_to_original


def test_masks_to_original_exact_without_resize(coco_root: Path) -> None:
    ds = CocoInstances(coco_root, "val2017", image_size=30)
    item = ds[1]
    restored = masks_to_original(item["masks"].float(), item["resized_size"], item["orig_size"])
    assert restored.shape == (4, 20, 30) and restored.dtype == torch.bool
    for mask, expected in zip(restored, [POLY_CAT, RLE_DOG, CRLE_BIRD, DOT_DOG], strict=True):
        assert torch.equal(mask, torch.from_numpy(expected))
    empty = masks_to_original(torch.zeros(0, 8, 8), (20, 30), (20, 30))
    assert empty.shape == (0, 20, 30) and empty.dtype == torch.bool


def _dilate(masks: np.ndarray) -> np.ndarray:
    """(K, H, W) bool grown by one pixel (3 x 3 neighbourhood)."""
    t = torch.from_numpy(masks).float()[None]
    return (torch.nn.functional.max_pool2d(t, 3, stride=1, padding=1)[0] > 0).numpy()


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_coco(
        tmp_path_factory.mktemp("synthetic"),
        train_images=6,
        val_images=8,
        image_size=64,
        seed=3,
        min_objects=2,
        max_objects=6,
    )


def test_masks_to_original_round_trip(synthetic_root: Path) -> None:
    """GT masks shrunk to the model's grid (and to its S/4 output) come back close to the GT."""
    ds = CocoInstances(synthetic_root, "val2017", image_size=48)
    quarter_inter = quarter_union = 0
    for index in range(len(ds)):
        item = ds[index]
        image_id = item["image_id"]
        anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[image_id]))
        gt = np.stack([ds.coco.annToMask(a).astype(bool) for a in anns])
        assert len(anns) == len(item["masks"])  # nothing vanishes at this scale
        probs = item["masks"].float()
        restored = masks_to_original(probs, item["resized_size"], item["orig_size"]).numpy()
        assert restored.shape == gt.shape
        # Nearest down, bilinear up: pixels may only flip next to a GT edge (band of 1 px).
        near_edge = _dilate(gt) & _dilate(~gt)
        assert not ((restored ^ gt) & ~near_edge).any(), image_id
        assert (restored & gt).sum() / (restored | gt).sum() > 0.8
        # At the decoder's S/4 resolution thin occluded slivers blur away, so only overall.
        quarter = torch.nn.functional.avg_pool2d(probs[None], 4)[0]  # (K, 12, 12) soft masks
        restored = masks_to_original(quarter, item["resized_size"], item["orig_size"]).numpy()
        quarter_inter += (restored & gt).sum()
        quarter_union += (restored | gt).sum()
    assert quarter_inter / quarter_union > 0.7


# --------------------------------------------------------------------------------- evaluator


def _gt_predictions(coco, image_ids) -> list[dict]:
    results = []
    for image_id in image_ids:
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])) if not a["iscrowd"]]
        if not anns:
            continue
        masks = np.stack([coco.annToMask(a) for a in anns]).astype(bool)
        results += encode_results(
            image_id, masks, [1.0] * len(anns), [a["category_id"] for a in anns]
        )
    return results


def _direct_cocoeval(coco, results, image_ids=None) -> list[float]:
    """The reference: pycocotools called the textbook way."""
    coco_dt = coco.loadRes([dict(r) for r in results])
    ev = COCOeval(coco, coco_dt, iouType="segm")
    if image_ids is not None:
        ev.params.imgIds = list(image_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [math.nan if v < 0 else float(v) for v in ev.stats[:6]]


def test_encode_results_format() -> None:
    masks = torch.zeros(2, 5, 7, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True
    masks[1, 4, 6] = True
    results = encode_results(3, masks, torch.tensor([0.9, 0.2]), torch.tensor([5, 9]))
    assert len(results) == 2
    for r in results:
        assert set(r) == {"image_id", "category_id", "segmentation", "score"}
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == [5, 7]
        assert isinstance(r["score"], float) and isinstance(r["category_id"], int)
    json.dumps(results)  # writable as is
    decoded = mask_utils.decode({"size": [5, 7], "counts": results[0]["segmentation"]["counts"]})
    assert np.array_equal(decoded.astype(bool), masks[0].numpy())
    assert encode_results(3, np.zeros((0, 5, 7), dtype=bool), [], []) == []
    with pytest.raises(ValueError, match="one score"):
        encode_results(3, masks, [0.5], [5, 9])


def test_perfect_predictions_give_ap_one(coco_root: Path, synthetic_root: Path) -> None:
    for root, split in ((synthetic_root, "val2017"), (coco_root, "val2017")):
        ds = CocoInstances(root, split, image_size=64)
        results = _gt_predictions(ds.coco, ds.image_ids)
        metrics = coco_mask_ap(ds.coco, results)
        assert metrics["AP"] == pytest.approx(1.0)
        assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == pytest.approx(1.0)
        for key in ("APs", "APm", "APl"):
            assert math.isnan(metrics[key]) or metrics[key] == pytest.approx(1.0)


def _imperfect_results(ds: CocoInstances) -> list[dict]:
    """Shifted, eroded and exact masks, 20% wrong categories, one false positive per image."""
    rng = np.random.default_rng(0)
    results = []
    for image_id in ds.image_ids:
        anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[image_id]))
        masks, scores, cats = [], [], []
        for k, ann in enumerate(anns):
            mask = ds.coco.annToMask(ann).astype(bool)
            if k % 3 == 0:
                mask = np.roll(mask, shift=int(rng.integers(1, 6)), axis=1)  # shifted
            elif k % 3 == 1:
                mask = mask & np.roll(mask, 2, axis=0) & np.roll(mask, -2, axis=1)  # eroded
            cat = ann["category_id"] if rng.uniform() < 0.8 else 3 if ann["category_id"] != 3 else 1
            masks.append(mask)
            scores.append(float(rng.uniform(0.3, 1.0)))
            cats.append(cat)
        fp = np.zeros((64, 64), dtype=bool)
        fp[5:25, 30:50] = True  # an extra false positive in every image
        masks.append(fp)
        scores.append(float(rng.uniform(0.0, 1.0)))
        cats.append(7)
        results += encode_results(image_id, np.stack(masks), scores, cats)
    return results


def test_imperfect_predictions_match_direct_cocoeval(synthetic_root: Path, capsys) -> None:
    ds = CocoInstances(synthetic_root, "val2017", image_size=64)
    results = _imperfect_results(ds)
    metrics = coco_mask_ap(ds.coco, results)
    assert capsys.readouterr().out == ""  # pycocotools' prints are captured
    expected = _direct_cocoeval(ds.coco, results)
    np.testing.assert_allclose(list(metrics.values()), expected, equal_nan=True)
    assert 0.0 < metrics["AP"] < 1.0
    assert list(metrics) == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    # Evaluating twice gives the same: results are not mutated (loadRes adds a 'bbox' otherwise).
    assert coco_mask_ap(ds.coco, results) == pytest.approx(metrics, nan_ok=True)
    assert all("bbox" not in r for r in results)

    subset = ds.image_ids[:3]
    sub_results = [r for r in results if r["image_id"] in subset]
    np.testing.assert_allclose(
        list(coco_mask_ap(ds.coco, sub_results, image_ids=subset).values()),
        _direct_cocoeval(ds.coco, sub_results, image_ids=subset),
        equal_nan=True,
    )


def _direct_agnostic(coco, results, iou_thresholds=None) -> list[float]:
    """The reference: COCOeval with useCats = 0, called the textbook way."""
    ev = COCOeval(coco, coco.loadRes([dict(r) for r in results]), iouType="segm")
    ev.params.useCats = 0
    if iou_thresholds is not None:
        ev.params.iouThrs = np.array(iou_thresholds)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(v) for v in ev.stats[:3]]


def _check_agnostic_against_direct(coco, results) -> dict:
    got = coco_mask_ap_agnostic(coco, results)
    ap, ap50, ap75 = _direct_agnostic(coco, results)
    (ap25, *_) = _direct_agnostic(coco, results, iou_thresholds=[0.25])
    assert list(got) == ["AP", "AP50", "AP75", "AP25"]
    assert list(got.values()) == pytest.approx([ap, ap50, ap75, ap25])
    return got


def test_agnostic_ap_right_masks_wrong_classes_on_the_tiny_fixture(coco_root: Path) -> None:
    ds = CocoInstances(coco_root, "val2017", image_size=30)
    wrong = {2: 5, 5: 9, 9: 2}
    results = [{**r, "category_id": wrong[r["category_id"]], "score": 0.9 - 0.1 * i}
               for i, r in enumerate(_gt_predictions(ds.coco, ds.image_ids))]
    aware = coco_mask_ap(ds.coco, results)
    assert (aware["AP"], aware["AP50"], aware["AP75"]) == (0.0, 0.0, 0.0)
    got = _check_agnostic_against_direct(ds.coco, results)
    assert got == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "AP25": 1.0})


def test_agnostic_ap_imperfect_matches_direct_cocoeval(synthetic_root: Path) -> None:
    ds = CocoInstances(synthetic_root, "val2017", image_size=64)
    results = _imperfect_results(ds)
    got = _check_agnostic_against_direct(ds.coco, results)
    assert 0.0 < got["AP"] < got["AP50"] <= got["AP25"] <= 1.0
    # ignoring classes can only help: the wrong-category masks count now
    assert got["AP50"] > coco_mask_ap(ds.coco, results)["AP50"]
    assert coco_mask_ap_agnostic(ds.coco, []) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0,
                                                  "AP25": 0.0}


def test_agnostic_class_subset_counts_only_trained_categories(coco_root: Path) -> None:
    """useCats = 0 still keeps only GT (and results) of params.catIds."""
    ds = CocoInstances(coco_root, "val2017", image_size=30, classes=["cat"])
    results = [r for r in _gt_predictions(ds.coco, ds.image_ids) if r["category_id"] == 2]
    assert coco_mask_ap_agnostic(ds.coco, results)["AP"] < 1.0  # dogs and birds missed
    subset = coco_mask_ap_agnostic(ds.coco, results, category_ids=ds.category_ids)
    assert subset["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("shift", [0, 1, None])
def test_evaluator_perfect_masks(coco_root: Path, shift: int | None) -> None:
    """predict_instances + CocoEvaluator: class-aware AP 1 with the right classes and 0 with the
    wrong ones; class-agnostic AP 1 and no unclaimed instance whatever the class head says, even
    "no object" everywhere (shift None)."""
    ds = CocoInstances(coco_root, "val2017", image_size=30)
    batch = collate_images([ds[i] for i in range(len(ds))])
    num_queries = 5
    pred_masks = torch.full((len(ds), num_queries, 30, 30), -10.0)
    class_logits = torch.zeros(len(ds), num_queries, 4)
    for i, target in enumerate(batch["targets"]):
        for k, (mask, label) in enumerate(zip(target["masks"], target["labels"], strict=True)):
            pred_masks[i, k][mask] = 10.0
            slot = 3 if shift is None else (label + shift) % 3  # shift 1: the wrong class
            class_logits[i, k, slot] = 10.0 + k
    outputs = {"pred_logits": class_logits, "pred_masks": pred_masks}
    evaluator = CocoEvaluator(ds, mask_threshold=0.5)
    evaluator.process(batch, outputs, predict_instances(outputs, return_probs=True))
    got = evaluator.evaluate()
    if shift is not None:
        expected = 1.0 if shift == 0 else 0.0
        assert (got["AP"], got["AP50"], got["AP75"]) == pytest.approx((expected,) * 3)
    for key in ("AP_agnostic", "AP50_agnostic", "AP75_agnostic", "AP25_agnostic"):
        assert got[key] == pytest.approx(1.0), key
    assert (got["unclaimed_rate"], got["duplicate_rate"], got["active_queries"]) == (0, 0, 5 / 3)


def test_no_predictions_do_not_crash(coco_root: Path) -> None:
    ds = CocoInstances(coco_root, "val2017", image_size=30)
    metrics = coco_mask_ap(ds.coco, [])
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0 and metrics["AP75"] == 0.0
    negative_only = coco_mask_ap(ds.coco, [], image_ids=[20])  # no GT at all: undefined
    assert all(math.isnan(v) for v in negative_only.values())
    with pytest.raises(ValueError, match="not images of the ground truth"):
        coco_mask_ap(ds.coco, [], image_ids=[999])


def test_class_subset_evaluation(coco_root: Path) -> None:
    """With category_ids, categories that were not trained do not count as AP 0."""
    ds = CocoInstances(coco_root, "val2017", image_size=30, classes=["cat"])
    results = [r for r in _gt_predictions(ds.coco, ds.image_ids) if r["category_id"] == 2]
    assert coco_mask_ap(ds.coco, results)["AP"] < 1.0
    assert coco_mask_ap(ds.coco, results, category_ids=ds.category_ids)["AP"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------- generator


def test_synthetic_coco_loads_and_is_consistent(synthetic_root: Path) -> None:
    kinds = set()
    for split, count in (("train2017", 6), ("val2017", 8)):
        with open(annotation_path(synthetic_root, split)) as f:
            data = json.load(f)
        assert {"info", "licenses", "images", "annotations", "categories"} <= set(data)
        assert [c["id"] for c in data["categories"]] == [1, 3, 7]
        assert all("supercategory" in c for c in data["categories"])
        ds = CocoInstances(synthetic_root, split, image_size=64)  # no resize: exact masks
        assert len(ds) == count and ds.category_ids == (1, 3, 7)
        for index in range(len(ds)):
            item = ds[index]
            anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[item["image_id"]]))
            assert len(anns) == len(item["masks"]) >= 1
            masks = item["masks"].numpy()
            assert masks.sum(axis=0).max() <= 1  # visible masks never overlap
            for ann, mask, label in zip(anns, masks, item["labels"].tolist(), strict=True):
                kinds.add("polygon" if isinstance(ann["segmentation"], list) else "rle")
                assert ann["iscrowd"] == 0 and ds.category_ids[label] == ann["category_id"]
                assert ann["area"] == int(mask.sum())
                ys, xs = np.nonzero(mask)
                x0, y0 = xs.min(), ys.min()
                assert ann["bbox"] == [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1]
                if isinstance(ann["segmentation"], dict):
                    assert isinstance(ann["segmentation"]["counts"], str)
    assert kinds == {"polygon", "rle"}


def test_synthetic_coco_is_deterministic_and_cli_runs(tmp_path: Path, capsys) -> None:
    args = ["--train-images", "3", "--val-images", "2", "--image-size", "48", "--seed", "7"]
    assert synthetic_main(["--out", str(tmp_path / "a"), *args]) == 0
    assert "train2017: 3 images" in capsys.readouterr().out
    make_synthetic_coco(tmp_path / "b", train_images=3, val_images=2, image_size=48, seed=7)
    for rel in (
        "annotations/instances_train2017.json",
        "annotations/instances_val2017.json",
        "train2017/000000000001.png",
        "val2017/000000000004.png",
    ):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (
        synthetic_main(["--out", str(tmp_path / "c"), "--min-objects", "5", "--max-objects", "2"])
        == 2
    )
    assert "min_objects (5) must be <= max_objects (2)" in capsys.readouterr().err


def test_pycocotools_quiet_when_print_is_replaced(coco_root: Path, monkeypatch) -> None:
    """Ray Train workers replace builtins.print, so redirecting stdout alone lets it through."""
    import builtins

    printed = []
    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: printed.append(args))
    ds = CocoInstances(coco_root, "val2017", image_size=32)
    coco_mask_ap(ds.coco, [], image_ids=ds.image_ids)
    coco_mask_ap(ds.coco, _gt_predictions(ds.coco, ds.image_ids), image_ids=ds.image_ids)
    assert printed == []
