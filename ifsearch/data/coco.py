"""COCO instance segmentation (or any dataset in the same format), read with pycocotools.

Layout, the one COCO publishes::

    ROOT/annotations/instances_<split>.json
    ROOT/<split>/<file_name>            # e.g. ROOT/val2017/000000000139.jpg

Why every image becomes a fixed S x S square: the mask decoder predicts masks on a fixed grid and
batches must stack. The longer side is resized to S (aspect ratio kept) and the rest is zero
padded bottom/right, so a pixel keeps its position relative to the top-left corner and predictions
map back to the original image with one crop and one resize (``masks_to_original``). Padding and
crowd regions are returned as an ``ignore`` mask rather than as background: a loss that punished
"object" predictions there would teach the model something false (crowd regions *do* contain
objects, padding contains nothing at all).

Class handling: COCO category ids are not contiguous (1..90 with gaps), while a classifier needs
indices 0..C-1. ``CocoInstances.class_names[i]`` / ``category_ids[i]`` give, for class index i,
the category name / COCO id, so predictions can be written back in COCO's ids for evaluation
(``ifsearch.metrics.coco_eval``).
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from ifsearch.errors import DataError
from ifsearch.metrics.coco_eval import quiet_pycocotools

DOWNLOAD_HINT: str = (
    "download COCO from https://cocodataset.org/#download (train2017.zip, val2017.zip and "
    "annotations_trainval2017.zip) and unpack them into ROOT, giving "
    "ROOT/annotations/instances_<split>.json and ROOT/<split>/<file_name>; "
    "or generate a small synthetic dataset in the same format: "
    "python -m ifsearch.data.make_synthetic_coco --out DIR"
)
"""Appended to every "dataset not found" error, so the message says how to get the data."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel RGB statistics of ImageNet; pretrained backbones expect inputs normalised by them."""

_MAX_LISTED = 10  # missing images named in one error message; the rest are counted


def annotation_path(root: str | Path, split: str) -> Path:
    """Where the annotation file of ``split`` lives: ``root/annotations/instances_<split>.json``."""
    return Path(root) / "annotations" / f"instances_{split}.json"


def _quiet(fn, *args, **kwargs):
    """Call ``fn`` with pycocotools' progress prints swallowed."""
    with quiet_pycocotools():
        return fn(*args, **kwargs)


def _load_coco(path: Path) -> COCO:
    """Read and index an instances json, turning every way it can be wrong into a DataError."""
    try:
        with open(path, encoding="utf-8") as f:
            dataset = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"annotation file {path} is not valid JSON ({exc}); the file is probably truncated "
            f"or not a COCO file: re-download or regenerate it ({DOWNLOAD_HINT})"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"annotation file {path} is not UTF-8 text ({exc}); is it a json?") from exc
    if not isinstance(dataset, dict):
        raise DataError(
            f"annotation file {path} must hold a JSON object with 'images', 'annotations' and "
            f"'categories', got a {type(dataset).__name__}"
        )
    for key in ("images", "categories"):
        if not isinstance(dataset.get(key), list):
            raise DataError(
                f"annotation file {path} has no list {key!r} (keys found: {sorted(dataset)}); "
                "an instances_<split>.json of COCO has 'images', 'annotations' and 'categories'"
            )
    dataset.setdefault("annotations", [])  # image-info-only files (e.g. test-dev) have none
    coco = COCO()
    coco.dataset = dataset
    try:
        _quiet(coco.createIndex)
    except (KeyError, TypeError) as exc:
        raise DataError(
            f"annotation file {path} has an entry without a required field ({exc!r}); images "
            "need 'id', annotations 'id' and 'image_id', categories 'id' and 'name'"
        ) from exc
    return coco


def _select_classes(
    coco: COCO, classes: Sequence[str], path: Path
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Map the requested class names (or all categories) to (names, COCO ids), order kept."""
    cats = sorted(coco.cats.values(), key=lambda c: c["id"])
    if not cats:
        raise DataError(f"annotation file {path} lists no categories; nothing to segment")
    if isinstance(classes, str):  # a lone name, not a sequence of one-letter names
        classes = (classes,)
    if not classes:
        return tuple(c["name"] for c in cats), tuple(int(c["id"]) for c in cats)
    by_name = {c["name"]: int(c["id"]) for c in cats}
    unknown = [name for name in classes if name not in by_name]
    if unknown:
        raise DataError(
            f"classes {unknown} are not categories of {path}; available categories are "
            f"{[c['name'] for c in cats]}"
        )
    names = tuple(classes)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"classes must not repeat a name, got {duplicates} more than once")
    return names, tuple(by_name[n] for n in names)


def _is_int(value: object) -> bool:
    """True for ints (numpy ones too) but not bools or floats, which YAML configs can produce."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after scaling the longer side of a ``height x width`` image to ``size``."""
    scale = size / max(height, width)
    return max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale)))


class CocoInstances(Dataset):
    """Images and instance masks of one split of a COCO-format dataset, as fixed-size squares.

    Each item is a dict:

    * ``image``: (3, S, S) float32 RGB, normalised with ImageNet mean/std; the longer side is
      resized to S (bilinear, aspect kept) and the rest zero-padded bottom/right (zero *after*
      normalisation, i.e. the mean colour, so padding carries no signal).
    * ``labels``: (K,) int64 class indices into ``class_names``.
    * ``masks``: (K, S, S) bool; ``annToMask`` at the original size, resized with nearest, padded.
      Only non-crowd annotations of kept classes; instances that vanish when resized are dropped.
    * ``ignore``: (S, S) bool, padding plus crowd (``iscrowd=1``) regions of kept classes.
    * ``image_id`` (int), ``orig_size`` (H, W), ``resized_size`` (h, w) (the image area inside
      the square) and ``scene_id`` (the file name, for logs).

    Annotations of classes that are not kept are ignored entirely, so their pixels count as
    background. Images without any kept annotation stay in the dataset: they are valid negatives.

    Args:
        root: dataset root (see the module docstring for the layout).
        split: split name, e.g. ``"train2017"`` or ``"val2017"``.
        image_size: side S of the square the images are resized and padded to.
        classes: category names to keep, in the order that defines class indices; empty keeps
            every category, sorted by COCO category id.
        max_images: keep only the first ``max_images`` image ids (sorted); 0 keeps all. For quick
            runs and val subsets.

    Raises:
        DataError: the root, annotation file or an image file is missing, the json is invalid,
            or a class name is not a category of the json.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int,
        classes: Sequence[str] = (),
        max_images: int = 0,
    ) -> None:
        self.root = Path(root)
        self.split = split
        if not _is_int(image_size) or image_size < 1:
            raise DataError(f"image_size must be a positive integer, got {image_size!r}")
        if not _is_int(max_images) or max_images < 0:
            raise DataError(f"max_images must be an integer >= 0 (0 = all), got {max_images!r}")
        self.image_size = int(image_size)
        if not self.root.is_dir():
            raise DataError(
                f"COCO root {self.root} does not exist or is not a directory; {DOWNLOAD_HINT}"
            )
        self.annotation_file = annotation_path(self.root, split)
        if not self.annotation_file.is_file():
            raise DataError(
                f"annotation file {self.annotation_file} not found (split "
                f"{split!r}); {DOWNLOAD_HINT}"
            )
        self.image_dir = self.root / split
        self.coco: COCO = _load_coco(self.annotation_file)
        self.class_names, self.category_ids = _select_classes(
            self.coco, classes, self.annotation_file
        )
        self._class_of_category = {cid: i for i, cid in enumerate(self.category_ids)}
        image_ids = sorted(int(i) for i in self.coco.imgs)
        if max_images > 0:
            image_ids = image_ids[:max_images]
        self.image_ids: list[int] = image_ids
        self.check_images()

    @property
    def num_classes(self) -> int:
        """Number of classes C (background is not a class)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"images={len(self)}, image_size={self.image_size}, classes={len(self.class_names)})"
        )

    def image_path(self, image_id: int) -> Path:
        """Path of the image file of ``image_id``: ``root/<split>/<file_name>``."""
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def check_images(self) -> None:
        """Fail now, listing every missing image, rather than hours into training at one of them.

        Raises:
            DataError: naming the first few missing image files, their count and the json.
        """
        missing = []
        for image_id in self.image_ids:
            info = self.coco.imgs[image_id]
            if "file_name" not in info:
                raise DataError(
                    f"image {image_id} in {self.annotation_file} has no 'file_name'; every entry "
                    "of 'images' needs 'id', 'file_name', 'height' and 'width'"
                )
            if not (self.image_dir / info["file_name"]).is_file():
                missing.append(self.image_dir / info["file_name"])
        if missing:
            listed = ", ".join(str(p) for p in missing[:_MAX_LISTED])
            more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
            raise DataError(
                f"{len(missing)} of {len(self.image_ids)} images listed in "
                f"{self.annotation_file} are missing: {listed}{more}; unpack the {self.split} "
                f"images into {self.image_dir} ({DOWNLOAD_HINT})"
            )

    def __getitem__(self, index: int) -> dict:
        """Load, resize and pad image ``index`` and its annotations (see the class docstring)."""
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"image index out of range: {index} for a dataset of {len(self)}")
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as img:
                pil = img.convert("RGB")  # grayscale / CMYK / palette COCO images exist
        except FileNotFoundError as exc:
            raise DataError(
                f"image {path} (id {image_id}, listed in {self.annotation_file}) not found; "
                f"{DOWNLOAD_HINT}"
            ) from exc
        except OSError as exc:  # PIL.UnidentifiedImageError is an OSError
            raise DataError(f"image {path} (id {image_id}) cannot be read: {exc}") from exc
        width, height = pil.size
        if (info.get("height"), info.get("width")) != (height, width):
            raise DataError(
                f"image {path} is {height}x{width} (HxW) but {self.annotation_file} says "
                f"{info.get('height')}x{info.get('width')}; masks would not line up: fix the "
                "json's height/width or use the image it was made for"
            )
        size = self.image_size
        h, w = _resized_shape(height, width, size)

        # Image: uint8 resize in PIL (antialiased when shrinking), then normalise and pad.
        if (h, w) != (height, width):
            pil = pil.resize((w, h), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)  # (h, w, 3)
        mean = torch.tensor(IMAGENET_MEAN)
        std = torch.tensor(IMAGENET_STD)
        image = torch.zeros(3, size, size)
        image[:, :h, :w] = ((pixels - mean) / std).permute(2, 0, 1)

        # Annotations of kept classes; crowd ones only feed the ignore mask.
        ann_ids = self.coco.getAnnIds(imgIds=[image_id])
        anns = [
            a for a in self.coco.loadAnns(ann_ids) if a["category_id"] in self._class_of_category
        ]
        instance_masks, labels = [], []
        crowd = np.zeros((height, width), dtype=bool)
        for ann in anns:
            mask = self._ann_to_mask(ann, height, width)
            if ann.get("iscrowd", 0):
                crowd |= mask
            else:
                instance_masks.append(mask)
                labels.append(self._class_of_category[ann["category_id"]])

        stacked = np.stack(instance_masks + [crowd])  # (K + 1, H, W); last row is the crowd
        resized = _resize_masks(torch.from_numpy(stacked), h, w)  # (K + 1, h, w) bool
        padded = torch.zeros(len(stacked), size, size, dtype=torch.bool)
        padded[:, :h, :w] = resized
        masks, ignore = padded[:-1], padded[-1].clone()
        ignore[h:, :] = True
        ignore[:, w:] = True
        keep = masks.flatten(1).any(dim=1)  # (K,) instances too small to survive the resize
        return {
            "image": image,
            "labels": torch.tensor(labels, dtype=torch.int64)[keep],
            "masks": masks[keep],
            "ignore": ignore,
            "image_id": int(image_id),
            "orig_size": (height, width),
            "resized_size": (h, w),
            "scene_id": str(info["file_name"]),
        }

    def _ann_to_mask(self, ann: dict, height: int, width: int) -> np.ndarray:
        """``annToMask`` as an (H, W) bool array, with malformed segmentations as DataError."""
        try:
            mask = self.coco.annToMask(ann)
        except Exception as exc:  # pycocotools raises bare Exception/TypeError/IndexError
            raise DataError(
                f"annotation {ann.get('id')} (image {ann.get('image_id')}) in "
                f"{self.annotation_file} has a segmentation pycocotools cannot decode: {exc!r}"
            ) from exc
        if mask.shape != (height, width):
            raise DataError(
                f"annotation {ann.get('id')} in {self.annotation_file} decodes to a "
                f"{mask.shape[0]}x{mask.shape[1]} mask but its image is {height}x{width}; the "
                "RLE 'size' must equal the image's [height, width]"
            )
        return mask.astype(bool)


def _resize_masks(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Resize (N, H, W) bool masks to (N, h, w) with nearest neighbour.

    ``nearest-exact`` samples at pixel centres, the same convention as bilinear with
    ``align_corners=False`` used by ``masks_to_original``, so a mask resized down and back up does
    not drift by half a pixel (legacy ``nearest`` does).
    """
    if masks.shape[-2:] == (h, w):
        return masks
    out = F.interpolate(masks[None].to(torch.uint8), size=(h, w), mode="nearest-exact")
    return out[0].bool()


def collate_images(batch: list[dict]) -> dict:
    """Stack the (same-size) images; keep per-image targets as lists, as the criteria expect.

    Returns:
        ``{"images": (B, 3, S, S), "targets": [{"labels": (K_i,), "masks": (K_i, S, S),
        "ignore": (S, S)}], "image_ids": [int], "orig_sizes": [(H, W)],
        "resized_sizes": [(h, w)], "scene_ids": [str]}``
    """
    if not batch:
        raise ValueError("collate_images needs at least one image, got an empty batch")
    return {
        "images": torch.stack([item["image"] for item in batch]),
        "targets": [
            {"labels": item["labels"], "masks": item["masks"], "ignore": item["ignore"]}
            for item in batch
        ],
        "image_ids": [item["image_id"] for item in batch],
        "orig_sizes": [item["orig_size"] for item in batch],
        "resized_sizes": [item["resized_size"] for item in batch],
        "scene_ids": [item["scene_id"] for item in batch],
    }


def masks_to_original(
    mask_probs: torch.Tensor,
    resized_size: tuple[int, int],
    orig_size: tuple[int, int],
    threshold: float = 0.5,
) -> torch.Tensor:
    """Map predicted mask probabilities on the padded square back to the original image.

    The square's side S is ``max(resized_size)``: ``CocoInstances`` scales the longer side to
    exactly S. Steps: upsample to S x S (bilinear), crop the top-left ``resized_size`` region
    (the image without its padding), resize to ``orig_size`` (bilinear), then threshold.
    Probabilities rather than binary masks are resized, so edges land between pixels correctly.

    Args:
        mask_probs: (P, h', w') probabilities in [0, 1] covering the whole padded square, at any
            square resolution (e.g. the decoder's S/4 output).
        resized_size: (h, w) of the image inside the square, from the dataset item.
        orig_size: (H, W) of the original image.
        threshold: a pixel is in the mask when its probability is > threshold.

    Returns:
        (P, H, W) bool masks on ``mask_probs``' device; P may be 0.
    """
    if mask_probs.dim() != 3:
        raise ValueError(f"mask_probs must be (P, h, w), got shape {tuple(mask_probs.shape)}")
    h, w = (int(v) for v in resized_size)
    height, width = (int(v) for v in orig_size)
    if mask_probs.shape[0] == 0:
        return torch.zeros(0, height, width, dtype=torch.bool, device=mask_probs.device)
    size = max(h, w)
    probs = mask_probs[None].float()  # (1, P, h', w')
    if probs.shape[-2:] != (size, size):
        probs = F.interpolate(probs, size=(size, size), mode="bilinear", align_corners=False)
    probs = probs[..., :h, :w]
    if (h, w) != (height, width):
        probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
    return probs[0] > threshold
