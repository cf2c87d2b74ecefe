"""``config.data`` -> datasets and how to batch them: the one place that knows every dataset.

Every dataset exposes ``class_names`` (its class index order), and batches are dicts with
``"targets"`` in the criteria's format plus the model input: ``"points"`` (list of (N_i, 6)) for
point clouds, ``"images"`` (B, 3, S, S) for images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from ifsearch.data.coco import DOWNLOAD_HINT as COCO_HINT
from ifsearch.data.coco import CocoInstances, annotation_path, collate_images
from ifsearch.data.collate import collate_scenes
from ifsearch.data.s3dis import DOWNLOAD_HINT as S3DIS_HINT
from ifsearch.data.s3dis import S3DISRooms, build_cache, cached_areas, s3dis_cache_path
from ifsearch.data.synthetic import SHAPE_CLASSES, synthetic_split
from ifsearch.errors import DataError

if TYPE_CHECKING:
    from ifsearch.config import Config

IMAGE_DATASETS = ("coco",)


def is_image_dataset(config: Config) -> bool:
    """True when the model input is images (the image pathway), False for point clouds."""
    return config.data.name in IMAGE_DATASETS


def collate_fn(config: Config) -> Callable[[list[dict]], dict]:
    """The batching function for the configured dataset."""
    return collate_images if is_image_dataset(config) else collate_scenes


def prepare_data(config: Config) -> None:
    """Check the dataset is where the config says, before any training starts.

    S3DIS: builds (or reuses) the HDF5 cache, so trials do not all wait on the conversion.
    COCO: checks the annotation files and that every image they list exists.

    Raises:
        DataError: naming the missing path, where to download the data and the layout expected.
    """
    build_datasets(config)


def build_datasets(config: Config) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for ``config.data``; each has ``class_names``.

    Raises:
        DataError: the dataset folder or a file in it is missing or malformed.
    """
    d = config.data
    if d.name == "synthetic":
        common = dict(
            num_points=d.num_points,
            min_instances=d.min_instances,
            max_instances=d.max_instances,
            classes=d.classes or SHAPE_CLASSES,
            noise=d.noise,
            density_jitter=d.density_jitter,
            seed=d.seed,
        )
        return (
            synthetic_split("train", d.train_scenes, **common),
            synthetic_split("val", d.val_scenes, **common),
        )
    if d.name == "s3dis":
        cache = build_cache(d.root, s3dis_cache_path(d.root, d.cache_dir))
        common = dict(num_points=d.num_points, voxel_size=d.voxel_size, block_size=d.block_size,
                      classes=d.classes, seed=d.seed)
        # The standard split: test on one area, train on every other area present.
        val = S3DISRooms(cache, [d.test_area], train=False, samples_per_epoch=0,
                         max_rooms=d.val_scenes, augment=False, **common)
        train_areas = [a for a in cached_areas(cache) if a != d.test_area]
        if not train_areas:
            raise DataError(f"data.root = {d.root!r} holds only Area_{d.test_area}, the test "
                            f"area; training needs at least one other area.\n{S3DIS_HINT}")
        train = S3DISRooms(cache, train_areas, train=True, samples_per_epoch=d.train_scenes,
                           max_rooms=0, augment=d.augment, **common)
        return train, val
    if d.name == "coco":
        common = dict(image_size=d.image_size, classes=d.classes)
        train = CocoInstances(d.root, d.train_split, max_images=d.train_scenes, **common)
        val = CocoInstances(d.root, d.val_split, max_images=d.val_scenes, **common)
        if val.class_names != train.class_names:
            raise DataError(
                f"{annotation_path(d.root, d.train_split)} and "
                f"{annotation_path(d.root, d.val_split)} define different categories "
                f"({list(train.class_names)} vs {list(val.class_names)}); set data.classes to "
                "the ones to train on"
            )
        _check_not_empty(train, f"COCO split {d.train_split!r}", d.root, COCO_HINT)
        _check_not_empty(val, f"COCO split {d.val_split!r}", d.root, COCO_HINT)
        return train, val
    raise DataError(f"data.name = {d.name!r} is not a dataset ifsearch knows")


def _check_not_empty(dataset: Dataset, what: str, root: str, hint: str) -> None:
    if len(dataset) == 0:
        raise DataError(f"data.root = {root!r}: {what} has no samples.\n{hint}")
