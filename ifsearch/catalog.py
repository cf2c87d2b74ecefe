"""The datasets' class lists and size limits: plain constants, no imports.

Owned here, below both readers: ``ifsearch.config`` validates a config against them before
anything runs, and ``ifsearch.data`` generates or reads scenes with them. (Kept out of the data
package, whose modules import torch and h5py, so that loading a config stays light.)
"""

SHAPE_CLASSES: tuple[str, ...] = ("box", "sphere", "cylinder", "plane")
"""Every shape class the generator knows; ``plane`` is a thin rectangular patch (a tabletop raised
above the floor, or a standing panel)."""

MAX_INSTANCES = 16
"""Largest ``max_instances`` accepted; more objects do not fit in the room with gaps."""

S3DIS_CLASSES: tuple[str, ...] = (
    "ceiling",
    "floor",
    "wall",
    "beam",
    "column",
    "window",
    "door",
    "table",
    "chair",
    "sofa",
    "bookcase",
    "board",
    "clutter",
)
"""The 13 standard S3DIS classes, in the usual order (their indices are the ``semantic`` values)."""
