"""Synthetic indoor "rooms": the embedded default dataset, generated on the fly from a seed.

Why synthetic: the search must run anywhere (CI, a laptop, 2 CPU cores) without downloading a
dataset, and a trial must be able to show learning within minutes. So the scenes are built to be
*learnable* rather than realistic:

* instances never touch each other: their axis-aligned footprints on the floor are disjoint with a
  gap of ``_GAP`` metres, so geometry alone can separate them;
* each class has its own typical size range and shape, and a class-dependent base colour (with
  per-instance colour noise), so the semantic head has two independent cues;
* the background (floor and walls) has its own colours, distinct from every class colour.

Determinism: scene ``index`` of split ``split`` is a pure function of ``(seed, split, index)`` via
``np.random.default_rng([seed, split_code, index])``, so it is identical across calls, objects,
DataLoader workers and processes, nothing is cached, and train/val never share a scene.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ifsearch.catalog import MAX_INSTANCES, SHAPE_CLASSES
from ifsearch.errors import ConfigError

SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1}
"""Second element of the RNG seed; distinct codes make train and val scenes disjoint."""

MIN_POINTS_PER_INSTANCE = 16
"""Every instance gets at least this many points, so no target mask is degenerate."""

MIN_NUM_POINTS = 64
"""Smallest ``num_points`` accepted; below it a room is not recognisable at all."""


# Room geometry (metres): x, y in [-ROOM_HALF, ROOM_HALF], floor at z = 0, walls up to ROOM_HEIGHT.
ROOM_HALF = 2.0
ROOM_HEIGHT = 2.5
_WALL_MARGIN = 0.1  # objects keep this distance from the walls
_GAP = 0.15  # minimum gap between the footprints of two objects (>> default xyz noise)
_BACKGROUND_FRACTION = 0.4  # share of a scene's points on floor + walls
_FLOOR_SHARE = 0.5  # share of background points on the floor (rest on the four walls)
_PLACEMENT_TRIES = 200  # rejection-sampling attempts per object before shrinking the objects
_SHRINK = 0.85  # scale applied to all objects when they cannot be placed

# Colours (rgb in [0, 1]). Class colours are far apart from each other and from the background.
_CLASS_COLOURS: dict[str, tuple[float, float, float]] = {
    "box": (0.85, 0.20, 0.15),  # red
    "sphere": (0.20, 0.75, 0.25),  # green
    "cylinder": (0.15, 0.35, 0.85),  # blue
    "plane": (0.90, 0.75, 0.10),  # yellow
}
_FLOOR_COLOUR = (0.45, 0.40, 0.35)  # brownish grey
_WALL_COLOUR = (0.85, 0.85, 0.80)  # off-white
_SCENE_COLOUR_JITTER = 0.04  # per-scene shift of the background colours
_INSTANCE_COLOUR_JITTER = 0.06  # per-instance shift of the class colour
_POINT_COLOUR_NOISE = 0.02  # per-point rgb noise


@dataclass(frozen=True)
class _Shape:
    """One object, in a local frame whose footprint is centred on the origin of the x-y plane.

    ``size`` is (extent along local x, extent along local y, height); ``lift`` is the height of the
    object's lowest point above the floor; ``vertical`` only matters for planes (a standing panel
    spanning local x and z instead of a horizontal patch spanning local x and y).
    """

    kind: str
    size: np.ndarray  # (3,) metres
    yaw: float = 0.0
    lift: float = 0.0
    vertical: bool = False

    def scaled(self, factor: float) -> _Shape:
        """Return the same object shrunk by ``factor``, used when a room is too crowded."""
        return _Shape(self.kind, self.size * factor, self.yaw, self.lift * factor, self.vertical)

    def footprint(self) -> tuple[float, float]:
        """Half extents (hx, hy) of the axis-aligned box around the object's floor projection."""
        lx, ly = float(self.size[0]), float(self.size[1])
        if self.kind == "plane" and self.vertical:
            ly = 0.0
        c, s = abs(math.cos(self.yaw)), abs(math.sin(self.yaw))
        return 0.5 * (c * lx + s * ly), 0.5 * (s * lx + c * ly)

    def area(self) -> float:
        """Visible surface area (m^2), used to give bigger objects proportionally more points."""
        lx, ly, lz = (float(v) for v in self.size)
        if self.kind == "box":  # bottom face hidden by the floor
            return 2.0 * (lx + ly) * lz + lx * ly
        if self.kind == "sphere":
            return math.pi * lx * lx  # 4 pi r^2 with r = lx / 2
        if self.kind == "cylinder":  # side + top cap; bottom cap hidden by the floor
            r = 0.5 * lx
            return 2.0 * math.pi * r * lz + math.pi * r * r
        if self.kind == "plane":
            return lx * (lz if self.vertical else ly)
        raise AssertionError(f"unknown shape kind {self.kind!r}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Sample ``n`` points uniformly on the visible surface, in the local frame, (n, 3)."""
        lx, ly, lz = (float(v) for v in self.size)
        if self.kind == "box":
            pts = _sample_box(rng, n, lx, ly, lz)
        elif self.kind == "sphere":
            r = 0.5 * lx
            d = rng.normal(size=(n, 3))
            d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
            pts = d * r + np.array([0.0, 0.0, r])
        elif self.kind == "cylinder":
            pts = _sample_cylinder(rng, n, 0.5 * lx, lz)
        elif self.kind == "plane":
            u = rng.uniform(-0.5, 0.5, size=n)
            if self.vertical:
                pts = np.stack([u * lx, np.zeros(n), rng.uniform(0.0, lz, size=n)], axis=1)
            else:
                v = rng.uniform(-0.5, 0.5, size=n)
                pts = np.stack([u * lx, v * ly, np.zeros(n)], axis=1)
        else:
            raise AssertionError(f"unknown shape kind {self.kind!r}")
        pts[:, 2] += self.lift
        return _rotate_z(pts, self.yaw)


def _rotate_z(pts: np.ndarray, yaw: float) -> np.ndarray:
    """Rotate (n, 3) points about the z axis by ``yaw`` radians, in place; returns ``pts``."""
    if yaw == 0.0:
        return pts
    c, s = math.cos(yaw), math.sin(yaw)
    x, y = pts[:, 0].copy(), pts[:, 1].copy()
    pts[:, 0] = c * x - s * y
    pts[:, 1] = s * x + c * y
    return pts


def _sample_box(rng: np.random.Generator, n: int, lx: float, ly: float, lz: float) -> np.ndarray:
    """Points on the five visible faces of a box standing on the floor (bottom face omitted)."""
    dims = np.array([lx, ly, lz])
    # Faces: -x, +x, -y, +y, +z; pick each with probability proportional to its area.
    areas = np.array([ly * lz, ly * lz, lx * lz, lx * lz, lx * ly])
    face = rng.choice(5, size=n, p=areas / areas.sum())
    axis = np.array([0, 0, 1, 1, 2])[face]
    sign = np.array([-1.0, 1.0, -1.0, 1.0, 1.0])[face]
    pts = rng.uniform(-0.5, 0.5, size=(n, 3)) * dims
    pts[np.arange(n), axis] = sign * 0.5 * dims[axis]
    pts[:, 2] += 0.5 * lz
    return pts


def _sample_cylinder(rng: np.random.Generator, n: int, r: float, h: float) -> np.ndarray:
    """Points on the side and top cap of an upright cylinder (bottom cap rests on the floor)."""
    side_area, cap_area = 2.0 * math.pi * r * h, math.pi * r * r
    on_side = rng.uniform(size=n) < side_area / (side_area + cap_area)
    theta = rng.uniform(0.0, 2.0 * math.pi, size=n)
    rad = np.where(on_side, r, r * np.sqrt(rng.uniform(size=n)))
    z = np.where(on_side, rng.uniform(0.0, h, size=n), h)
    return np.stack([rad * np.cos(theta), rad * np.sin(theta), z], axis=1)


def _random_shape(rng: np.random.Generator, kind: str) -> _Shape:
    """Draw one object of class ``kind`` with that class's typical size range."""
    if kind == "box":  # chunky, knee-high
        lx, ly = rng.uniform(0.3, 0.6, size=2)
        height = rng.uniform(0.3, 0.7)
        return _Shape(kind, np.array([lx, ly, height]), yaw=rng.uniform(0, np.pi / 2))
    if kind == "sphere":  # medium, resting on the floor
        d = 2.0 * rng.uniform(0.15, 0.3)
        return _Shape(kind, np.array([d, d, d]))
    if kind == "cylinder":  # slim and tall
        d = 2.0 * rng.uniform(0.1, 0.2)
        return _Shape(kind, np.array([d, d, rng.uniform(0.6, 1.2)]))
    if kind == "plane":  # wide and thin: a raised tabletop or a standing panel
        yaw = rng.uniform(0, np.pi)
        if rng.uniform() < 0.5:
            lx, ly = rng.uniform(0.6, 1.0), rng.uniform(0.4, 0.7)
            return _Shape(kind, np.array([lx, ly, 0.0]), yaw=yaw, lift=rng.uniform(0.5, 1.0))
        lx, lz = rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)
        return _Shape(
            kind, np.array([lx, 0.0, lz]), yaw=yaw, lift=rng.uniform(0.0, 0.2), vertical=True
        )
    raise AssertionError(f"unknown shape kind {kind!r}")


def _place(rng: np.random.Generator, shapes: list[_Shape]) -> tuple[list[_Shape], np.ndarray]:
    """Choose footprint centres so that no two footprints overlap (with ``_GAP``) or hit a wall.

    Rejection sampling, largest footprints first; if a room turns out too crowded, every object is
    shrunk by ``_SHRINK`` and placement restarts, so this always terminates.

    Returns:
        The (possibly shrunk) shapes, in the input order, and their (K, 2) x-y centres.
    """
    order = sorted(range(len(shapes)), key=lambda i: -np.prod(shapes[i].footprint()))
    while True:
        half = np.array([s.footprint() for s in shapes])  # (K, 2)
        centres = np.zeros((len(shapes), 2))
        placed: list[int] = []
        for i in order:
            bound = ROOM_HALF - _WALL_MARGIN - half[i]  # (2,) centre range per axis
            if np.any(bound < 0):
                break
            cand = rng.uniform(-bound, bound, size=(_PLACEMENT_TRIES, 2))
            ok = np.ones(_PLACEMENT_TRIES, dtype=bool)
            for j in placed:
                sep = np.abs(cand - centres[j]) >= half[i] + half[j] + _GAP  # (T, 2)
                ok &= sep.any(axis=1)
            hits = np.flatnonzero(ok)
            if hits.size == 0:
                break
            centres[i] = cand[hits[0]]
            placed.append(i)
        else:
            return shapes, centres
        shapes = [s.scaled(_SHRINK) for s in shapes]


def _split_counts(rng: np.random.Generator, total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` points over instances: ``MIN_POINTS_PER_INSTANCE`` each, rest by weight."""
    k = len(weights)
    extra = total - MIN_POINTS_PER_INSTANCE * k
    return MIN_POINTS_PER_INSTANCE + rng.multinomial(extra, weights / weights.sum())


def _sample_background(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Points on the floor and the four walls, and a bool (n,) array marking floor points."""
    n_floor = int(rng.binomial(n, _FLOOR_SHARE))
    floor = np.column_stack(
        [rng.uniform(-ROOM_HALF, ROOM_HALF, size=(n_floor, 2)), np.zeros(n_floor)]
    )
    n_wall = n - n_floor
    wall = rng.integers(4, size=n_wall)  # 0: x=-H, 1: x=+H, 2: y=-H, 3: y=+H
    along = rng.uniform(-ROOM_HALF, ROOM_HALF, size=n_wall)
    fixed = np.where(wall % 2 == 0, -ROOM_HALF, ROOM_HALF)
    on_x = wall < 2
    walls = np.column_stack(
        [
            np.where(on_x, fixed, along),
            np.where(on_x, along, fixed),
            rng.uniform(0.0, ROOM_HEIGHT, size=n_wall),
        ]
    )
    is_floor = np.zeros(n, dtype=bool)
    is_floor[:n_floor] = True
    return np.concatenate([floor, walls]), is_floor


class SyntheticScenes(Dataset):
    """Seeded synthetic rooms with separated, coloured shape instances; nothing is stored.

    Each item is a dict with ``points`` (N, 6) float32 xyz + rgb, ``instance_labels`` (N,) int64
    (0 = background, 1..K instances), ``semantic_labels`` (N,) int64 (-1 = background, else class
    index), ``labels`` (K,) int64 class of instance k+1, ``masks`` (K, N) bool and ``scene_id``.

    Args:
        num_scenes: length of the dataset.
        num_points: mean number of points per scene.
        min_instances: smallest number of objects per scene (inclusive).
        max_instances: largest number of objects per scene (inclusive).
        classes: shape classes to use, any non-empty subset of ``SHAPE_CLASSES``; their order
            defines the class indices 0..C-1.
        noise: std (metres) of the gaussian noise on xyz.
        density_jitter: the scene's point count is ``round(num_points * U(1 - j, 1 + j))``, so
            models see variable-size clouds; 0 gives exactly ``num_points``.
        seed: base seed; scenes depend only on ``(seed, split, index)``.
        split: ``"train"`` or ``"val"``; the two never share a scene.

    Raises:
        ConfigError: (a ``ValueError``) for an invalid argument.
    """

    def __init__(
        self,
        num_scenes: int,
        num_points: int = 2048,
        min_instances: int = 2,
        max_instances: int = 6,
        classes: Sequence[str] = SHAPE_CLASSES,
        noise: float = 0.005,
        density_jitter: float = 0.3,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        self.classes: tuple[str, ...] = _check_classes(classes)
        if split not in SPLIT_CODES:
            raise ConfigError(f"split must be one of {list(SPLIT_CODES)}, got {split!r}")
        check_int("num_scenes", num_scenes, minimum=1)
        check_int("num_points", num_points, minimum=MIN_NUM_POINTS)
        check_int("min_instances", min_instances, minimum=1)
        check_int("max_instances", max_instances, minimum=1)
        check_int("seed", seed, minimum=0)
        if min_instances > max_instances:
            raise ConfigError(
                f"min_instances ({min_instances}) must be <= max_instances ({max_instances}); "
                "lower min_instances or raise max_instances"
            )
        if max_instances > MAX_INSTANCES:
            raise ConfigError(
                f"max_instances must be <= {MAX_INSTANCES} (more objects do not fit in the "
                f"{2 * ROOM_HALF:g} x {2 * ROOM_HALF:g} m room), got {max_instances}"
            )
        if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
            raise ConfigError(f"noise must be a finite number >= 0 (metres), got {noise!r}")
        if not (isinstance(density_jitter, (int, float)) and 0 <= density_jitter < 1):
            raise ConfigError(f"density_jitter must be in [0, 1), got {density_jitter!r}")
        smallest = round(num_points * (1 - density_jitter))
        needed = MIN_POINTS_PER_INSTANCE * max_instances
        budget = _instance_budget(smallest)
        if budget < needed:
            raise ConfigError(
                f"num_points={num_points} with density_jitter={density_jitter} can give scenes of "
                f"{smallest} points, of which only {budget} are on objects, but "
                f"max_instances={max_instances} needs {needed} ({MIN_POINTS_PER_INSTANCE} per "
                "instance); raise num_points or lower max_instances / density_jitter"
            )
        self.num_scenes = int(num_scenes)
        self.num_points = int(num_points)
        self.min_instances = int(min_instances)
        self.max_instances = int(max_instances)
        self.noise = float(noise)
        self.density_jitter = float(density_jitter)
        self.seed = int(seed)
        self.split = split

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes in class-index order (the name every dataset uses)."""
        return self.classes

    @property
    def num_classes(self) -> int:
        """Number of semantic classes C (background is not a class)."""
        return len(self.classes)

    def __len__(self) -> int:
        return self.num_scenes

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_scenes={self.num_scenes}, "
            f"num_points={self.num_points}, instances=[{self.min_instances}, "
            f"{self.max_instances}], classes={self.classes}, seed={self.seed})"
        )

    def __getitem__(self, index: int) -> dict:
        """Generate scene ``index`` (negative indices count from the end)."""
        index = operator.index(index)
        if index < 0:
            index += self.num_scenes
        if not 0 <= index < self.num_scenes:
            raise IndexError(
                f"scene index out of range: {index} for a dataset of {self.num_scenes} scenes"
            )
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], index])
        return self._generate(rng, f"{self.split}_{index:06d}")

    def _generate(self, rng: np.random.Generator, scene_id: str) -> dict:
        """Build one scene from ``rng``; every random draw comes from it, in a fixed order."""
        j = self.density_jitter
        n_total = round(self.num_points * rng.uniform(1.0 - j, 1.0 + j))
        k = int(rng.integers(self.min_instances, self.max_instances + 1))
        labels = rng.integers(self.num_classes, size=k)
        shapes = [_random_shape(rng, self.classes[c]) for c in labels]
        shapes, centres = _place(rng, shapes)

        # Point budget: background first, then instances by area x random density factor.
        n_inst = _instance_budget(n_total)
        n_bg = n_total - n_inst
        weights = np.array([s.area() for s in shapes]) * rng.uniform(0.5, 1.5, size=k)
        counts = _split_counts(rng, n_inst, weights)

        bg_xyz, is_floor = _sample_background(rng, n_bg)
        floor_rgb = np.array(_FLOOR_COLOUR) + rng.normal(0, _SCENE_COLOUR_JITTER, size=3)
        wall_rgb = np.array(_WALL_COLOUR) + rng.normal(0, _SCENE_COLOUR_JITTER, size=3)
        xyz_parts = [bg_xyz]
        rgb_parts = [np.where(is_floor[:, None], floor_rgb, wall_rgb)]
        for shape, centre, count in zip(shapes, centres, counts, strict=True):
            pts = shape.sample(rng, int(count))
            pts[:, :2] += centre
            xyz_parts.append(pts)
            base = np.array(_CLASS_COLOURS[shape.kind])
            colour = base + rng.normal(0, _INSTANCE_COLOUR_JITTER, size=3)
            rgb_parts.append(np.broadcast_to(colour, (int(count), 3)))
        xyz = np.concatenate(xyz_parts)
        rgb = np.concatenate(rgb_parts)
        if self.noise > 0:
            xyz += rng.normal(0.0, self.noise, size=xyz.shape)
        rgb = np.clip(rgb + rng.normal(0.0, _POINT_COLOUR_NOISE, size=rgb.shape), 0.0, 1.0)

        instance = np.repeat(np.arange(k + 1), np.concatenate([[n_bg], counts]))
        perm = rng.permutation(n_total)
        xyz, rgb, instance = xyz[perm], rgb[perm], instance[perm]

        instance_labels = torch.from_numpy(instance.astype(np.int64))
        labels_t = torch.from_numpy(labels.astype(np.int64))
        semantic = torch.cat([torch.tensor([-1], dtype=torch.int64), labels_t])[instance_labels]
        masks = instance_labels[None, :] == torch.arange(1, k + 1, dtype=torch.int64)[:, None]
        points = torch.from_numpy(np.concatenate([xyz, rgb], axis=1).astype(np.float32))
        return {
            "points": points,
            "instance_labels": instance_labels,
            "semantic_labels": semantic,
            "labels": labels_t,
            "masks": masks,
            "scene_id": scene_id,
        }


def _instance_budget(n_total: int) -> int:
    """Points of a scene of ``n_total`` points that go to instances (the rest is background)."""
    return n_total - round(_BACKGROUND_FRACTION * n_total)


def check_int(name: str, value: object, minimum: int) -> None:
    """Reject non-integers (incl. bools and floats from YAML) and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    """Validate a class subset and return it as a tuple; its order defines class indices."""
    if isinstance(classes, str):  # a lone name, not a sequence of one-letter names
        classes = (classes,)
    names = tuple(classes)
    if not names:
        raise ConfigError(f"classes must be a non-empty subset of {list(SHAPE_CLASSES)}")
    for name in names:
        if name not in SHAPE_CLASSES:
            raise ConfigError(
                f"unknown shape class {name!r}; valid classes are {list(SHAPE_CLASSES)}"
            )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"classes must not repeat a name, got {duplicates} more than once")
    return names


def synthetic_split(split: str, num_scenes: int, **kwargs: object) -> SyntheticScenes:
    """Build the ``split`` ("train" or "val") of the synthetic dataset.

    A convenience for the config layer: the same ``kwargs`` (and seed) give disjoint train and val
    sets, so only ``split`` and the size change between the two.
    """
    return SyntheticScenes(num_scenes=num_scenes, split=split, **kwargs)  # type: ignore[arg-type]
