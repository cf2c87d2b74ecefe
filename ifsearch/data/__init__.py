"""Datasets and batching; the embedded default is the seeded synthetic-rooms dataset."""

from ifsearch.data.collate import collate_scenes
from ifsearch.data.synthetic import SHAPE_CLASSES, SyntheticScenes, synthetic_split

__all__ = ["SHAPE_CLASSES", "SyntheticScenes", "collate_scenes", "synthetic_split"]
