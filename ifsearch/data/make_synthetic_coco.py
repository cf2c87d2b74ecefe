"""Write a small synthetic instance-segmentation dataset in COCO's format and layout.

Why: the COCO code path (``ifsearch.data.coco``, ``ifsearch.metrics.coco_eval``) must be testable
and demonstrable without a 19 GB download, and a trial on it must show learning within minutes.
The output has COCO's split names (``train2017``/``val2017``), so one config works on both::

    python -m ifsearch.data.make_synthetic_coco --out data/synthetic_coco

Content: filled shapes (``SYNTHETIC_CATEGORIES``) on a colour-gradient background with noise.
Each class has a typical hue (with jitter) and shape, so both cues are learnable. Objects overlap
and later ones occlude earlier ones; category ids are not contiguous (1, 3, 7) on purpose, to
exercise the class-index <-> category-id mapping.

Segmentations are exact by construction: every shape is a polygon (a circle is a 32-gon),
rasterised with pycocotools itself, and the image is painted from those very masks. A fully
visible instance is stored as its polygon (what annotators draw); an occluded one stores its
visible mask as compressed RLE, so both encodings occur as in real COCO. Instances with less than
``MIN_VISIBLE_AREA`` visible pixels are dropped.

Determinism: image ``i`` of a split depends only on ``(seed, split, i)``.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ifsearch.data.synthetic import check_int
from ifsearch.errors import ConfigError, IfsearchError

SYNTHETIC_CATEGORIES: tuple[dict, ...] = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "rectangle", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
)
"""The categories written to every split; the id gaps are deliberate (see the module docstring)."""

SPLITS: dict[str, int] = {"train2017": 0, "val2017": 1}
"""Split name -> RNG code; distinct codes make the splits disjoint."""

_CLASS_HUES = {"circle": 0.0, "rectangle": 0.33, "triangle": 0.62}  # red, green, blue
_HUE_JITTER = 0.05  # per-instance hue shift (fraction of the colour wheel)
_CIRCLE_VERTICES = 32
_MIN_SIZE, _MAX_SIZE = 0.12, 0.35  # object radius range, as a fraction of the image size
_NOISE_STD = 6.0  # per-pixel gaussian noise, in 0..255 units
MIN_VISIBLE_AREA = 12
"""Instances with fewer visible pixels are not annotated: too small to be a fair target."""
MAX_OBJECTS = 20
"""Largest ``max_objects`` accepted; more shapes mostly hide each other."""
MIN_IMAGE_SIZE = 32
"""Smallest ``image_size`` accepted; below it shapes are a few pixels."""


def _polygon(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A random shape of class ``kind`` fully inside a ``size`` x ``size`` image, as (V, 2) x, y."""
    radius = rng.uniform(_MIN_SIZE, _MAX_SIZE) * size
    angle = rng.uniform(0.0, 2.0 * math.pi)
    if kind == "circle":
        t = np.linspace(0.0, 2.0 * math.pi, _CIRCLE_VERTICES, endpoint=False)
        local = radius * np.stack([np.cos(t), np.sin(t)], axis=1)
    elif kind == "rectangle":  # rotated, aspect ratio 1:1 .. 1:2.5
        aspect = rng.uniform(1.0, 2.5)
        hw, hh = radius, radius / aspect
        local = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
    elif kind == "triangle":  # roughly equilateral, vertex angles jittered
        t = np.array([0.0, 2.0, 4.0]) * math.pi / 3 + rng.uniform(-0.3, 0.3, size=3)
        local = radius * np.stack([np.cos(t), np.sin(t)], axis=1)
    else:
        raise AssertionError(f"unknown shape kind {kind!r}")
    c, s = math.cos(angle), math.sin(angle)
    local = local @ np.array([[c, s], [-s, c]])
    lo, hi = -local.min(axis=0), size - local.max(axis=0)  # centre range keeping it inside
    centre = rng.uniform(lo, np.maximum(lo, hi))
    # Rounded so the json (which stores these numbers) rasterises to exactly the painted mask.
    return np.clip(np.round(local + centre, 2), 0.0, float(size))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(S, S, 3) float: a linear gradient between two random muted colours, random direction."""
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return c0 + t[..., None] * (c1 - c0)


def _instance_colour(rng: np.random.Generator, kind: str) -> np.ndarray:
    """RGB (0..255) with the class's typical hue, jittered, fairly saturated and bright."""
    hue = (_CLASS_HUES[kind] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    return np.array(rgb) * 255.0


def _make_image(
    rng: np.random.Generator, size: int, min_objects: int, max_objects: int
) -> tuple[np.ndarray, list[dict]]:
    """One image and its annotations (without ids): ``segmentation``, ``area``, ``bbox``, ...

    Returns:
        (S, S, 3) uint8 image and a list of partial annotation dicts, in drawing order.
    """
    pixels = _background(rng, size)
    count = int(rng.integers(min_objects, max_objects + 1))
    shapes = []
    for _ in range(count):
        category = SYNTHETIC_CATEGORIES[int(rng.integers(len(SYNTHETIC_CATEGORIES)))]
        poly = _polygon(rng, category["name"], size)
        flat = [float(v) for v in poly.reshape(-1)]
        rle = mask_utils.frPyObjects([flat], size, size)[0]
        full = mask_utils.decode(rle).astype(bool)  # (S, S)
        pixels[full] = _instance_colour(rng, category["name"])
        shapes.append((category["id"], flat, full))
    pixels += rng.normal(0.0, _NOISE_STD, size=pixels.shape)
    image = np.clip(np.round(pixels), 0, 255).astype(np.uint8)

    annotations = []
    covered = np.zeros((size, size), dtype=bool)  # union of the shapes drawn later
    for category_id, flat, full in reversed(shapes):
        visible = full & ~covered
        covered |= full
        area = int(visible.sum())
        if area < MIN_VISIBLE_AREA:
            continue
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        if area == int(full.sum()):
            segmentation: list | dict = [flat]  # not occluded: the polygon is exact
        else:
            segmentation = {"size": [size, size], "counts": rle["counts"].decode("ascii")}
        annotations.append(
            {
                "category_id": category_id,
                "segmentation": segmentation,
                "area": area,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    annotations.reverse()  # drawing order, back to front
    return image, annotations


def _write_split(
    out: Path,
    split: str,
    num_images: int,
    first_image_id: int,
    first_ann_id: int,
    *,
    image_size: int,
    seed: int,
    min_objects: int,
    max_objects: int,
) -> dict:
    """Write ``out/<split>/*.png`` and ``out/annotations/instances_<split>.json``; return the json."""
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = first_ann_id
    for index in range(num_images):
        rng = np.random.default_rng([seed, SPLITS[split], index])
        image, anns = _make_image(rng, image_size, min_objects, max_objects)
        image_id = first_image_id + index
        file_name = f"{image_id:012d}.png"
        Image.fromarray(image).save(image_dir / file_name)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": image_size,
                "width": image_size,
                "license": 1,
            }
        )
        for ann in anns:
            annotations.append({"id": ann_id, "image_id": image_id, **ann})
            ann_id += 1
    dataset = {
        "info": {
            "description": "ifsearch synthetic shapes in COCO format",
            "version": "1.0",
            "year": 2025,
            "contributor": "ifsearch.data.make_synthetic_coco",
            "date_created": "",
            "seed": seed,
        },
        "licenses": [{"id": 1, "name": "generated data, no restrictions", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in SYNTHETIC_CATEGORIES],
    }
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    with open(ann_dir / f"instances_{split}.json", "w", encoding="utf-8") as f:
        json.dump(dataset, f)
    return dataset


def make_synthetic_coco(
    out: str | Path,
    train_images: int = 128,
    val_images: int = 32,
    image_size: int = 128,
    seed: int = 0,
    min_objects: int = 1,
    max_objects: int = 4,
) -> Path:
    """Generate both splits under ``out`` (created if needed; existing files are overwritten).

    Image ids are unique across splits (val continues after train), as in COCO.

    Returns:
        ``out`` as a Path, the ``root`` to give ``CocoInstances``.

    Raises:
        ConfigError: for an invalid argument.
    """
    check_int("train_images", train_images, minimum=1)
    check_int("val_images", val_images, minimum=1)
    check_int("image_size", image_size, minimum=MIN_IMAGE_SIZE)
    check_int("seed", seed, minimum=0)
    check_int("min_objects", min_objects, minimum=1)
    check_int("max_objects", max_objects, minimum=1)
    if min_objects > max_objects:
        raise ConfigError(
            f"min_objects ({min_objects}) must be <= max_objects ({max_objects}); "
            "lower min_objects or raise max_objects"
        )
    if max_objects > MAX_OBJECTS:
        raise ConfigError(f"max_objects must be <= {MAX_OBJECTS}, got {max_objects}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory; choose another path")
    common = {
        "image_size": image_size,
        "seed": seed,
        "min_objects": min_objects,
        "max_objects": max_objects,
    }
    train = _write_split(out, "train2017", train_images, 1, 1, **common)
    _write_split(
        out, "val2017", val_images, train_images + 1, len(train["annotations"]) + 1, **common
    )
    return out


def _summary(out: Path) -> str:
    """One line per run: what was written where, with instance counts and encodings."""
    parts = []
    for split in SPLITS:
        with open(out / "annotations" / f"instances_{split}.json", encoding="utf-8") as f:
            anns = json.load(f)
        num_poly = sum(isinstance(a["segmentation"], list) for a in anns["annotations"])
        num_rle = len(anns["annotations"]) - num_poly
        parts.append(
            f"{split}: {len(anns['images'])} images, {len(anns['annotations'])} instances "
            f"({num_poly} polygon, {num_rle} RLE)"
        )
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ifsearch.data.make_synthetic_coco",
        description="Write a synthetic shapes dataset in COCO format (train2017 / val2017).",
    )
    parser.add_argument("--out", required=True, help="dataset root to write (created if needed)")
    parser.add_argument("--train-images", type=int, default=128, help="images in train2017")
    parser.add_argument("--val-images", type=int, default=32, help="images in val2017")
    parser.add_argument("--image-size", type=int, default=128, help="side of the square images")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same dataset")
    parser.add_argument("--min-objects", type=int, default=1, help="fewest shapes per image")
    parser.add_argument("--max-objects", type=int, default=4, help="most shapes per image")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = make_synthetic_coco(
            args.out,
            train_images=args.train_images,
            val_images=args.val_images,
            image_size=args.image_size,
            seed=args.seed,
            min_objects=args.min_objects,
            max_objects=args.max_objects,
        )
    except IfsearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s: {_summary(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
