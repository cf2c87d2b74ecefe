"""S3DIS (Stanford Large-Scale 3D Indoor Spaces): raw-text reader, one-file HDF5 cache, dataset.

Why a cache: the raw release is ~10k text files (~16 GB, up to ~1M points per room); parsing it
takes minutes, far too long to repeat in every Ray trial. ``build_cache`` converts every room once
into one gzip-compressed HDF5 file that all trials and DataLoader workers read concurrently.

Why it cannot go stale silently: the file records ``CACHE_VERSION``, the room list and, per room, a
fingerprint of its annotation files (names and byte sizes). ``build_cache`` rebuilds the file when
any of those differ from the raw tree, and rebuilds (with a warning) a file that cannot be read.
The file is written to a temporary name and moved into place with ``os.replace``, under an
``fcntl`` lock, so processes that start together build it once and never see half a file.

Raw layout (``Stanford3dDataset_v1.2_Aligned_Version``)::

    ROOT/Area_N/<room>/Annotations/<class>_<k>.txt    one file per instance, lines "x y z r g b"

The class is the file-name prefix before the last ``_<k>``; prefixes that are not one of the 13
standard classes (``stairs`` in a few rooms) become ``clutter``, the usual convention. The room's
own ``<room>.txt`` (all points again, without labels) and stray files (``.DS_Store``, ``Icon\\r``)
are ignored: a room is a directory with an ``Annotations`` folder, an instance a ``.txt`` file in
it.

Known defect of the release: ``Area_5/hallway_6/Annotations/ceiling_1.txt`` holds a stray byte
0x10 inside a number on line 180389 (``103.0\\x100000``; reported e.g. in
charlesq34/pointnet#45, zeliu98/CloserLook3D#15, Pointcept/PointTransformerV2#8). Other code bases
patch the file in place to ``103.000000``; here stray ASCII control bytes are removed while
parsing (giving ``103.00000``, the same value) and a warning names the file and line. Anything
else malformed raises ``DataError`` with the file, the 1-based line number and the text.

Samples (``S3DISRooms``) have exactly the keys of ``SyntheticScenes`` items, so the model, losses
and metrics need no S3DIS-specific code; evaluation samples add the full-resolution ground truth.

Why one module of ~790 lines: reader, cache and dataset share the cache's layout (its keys,
``CACHE_VERSION``, the fingerprints); split, a layout change would have to be made in three
files at once. Half of the length is the docstrings and error messages that name file and line.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import operator
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from ifsearch.catalog import S3DIS_CLASSES
from ifsearch.errors import ConfigError, DataError

__all__ = [
    "CACHE_VERSION",
    "DOWNLOAD_HINT",
    "S3DIS_CLASSES",
    "S3DISRooms",
    "build_cache",
    "cached_areas",
    "read_points",
    "read_room",
    "s3dis_cache_path",
    "s3dis_split",
]

CACHE_VERSION: int = 1
"""Layout version of the HDF5 cache; bump it whenever the layout or the conversion changes, so
every existing cache is rebuilt instead of being read with the wrong meaning."""

DOWNLOAD_HINT: str = (
    "S3DIS is not downloaded automatically (its licence needs a form): request it at "
    "http://buildingparser.stanford.edu/dataset.html, download "
    "Stanford3dDataset_v1.2_Aligned_Version.zip, unzip it and pass the unzipped folder as the "
    "root; it must contain Area_1 ... Area_6, each with room folders holding an Annotations "
    "folder of <class>_<k>.txt files (lines 'x y z r g b'), "
    "e.g. ROOT/Area_1/office_1/Annotations/chair_1.txt"
)
"""Where to get the data and the layout expected, quoted by every 'dataset not found' error."""

_CLUTTER = S3DIS_CLASSES.index("clutter")
_AREA_RE = re.compile(r"Area_(\d+)")
_INSTANCE_RE = re.compile(r"(.+)_(\d+)\.txt")
# ASCII control bytes except the whitespace ones (\t \n \v \f \r): the only repair ever applied.
_CONTROL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 11, 12, 13)) + b"\x7f"
_FIELDS = 6  # x y z r g b
_COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
_CHUNK_ROWS = 1 << 16  # 64k points per chunk: ~1.5 MB of xyzrgb, reads of whole rooms stay fast

Log = Callable[[str], object]


# --- raw reader ---------------------------------------------------------------------------------


def _natural_key(name: str) -> tuple:
    """Sort key that puts ``office_2`` before ``office_10`` (plain sorting would not)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _class_index(prefix: str) -> int:
    """Class index of a file-name prefix; unknown prefixes (e.g. ``stairs``) are clutter."""
    return S3DIS_CLASSES.index(prefix) if prefix in S3DIS_CLASSES else _CLUTTER


def _annotation_files(annotations: Path) -> list[Path]:
    """The instance files of one room, in natural order (which defines the instance ids 1..K).

    Non-``.txt`` entries and hidden files (macOS ``._*`` companions, which end in ``.txt`` but are
    binary) are ignored; a ``.txt`` file that does not follow ``<class>_<k>.txt`` is an error, so
    no instance is ever dropped unnoticed.
    """
    files = []
    for path in annotations.iterdir():
        if path.name.startswith(".") or not path.name.endswith(".txt") or not path.is_file():
            continue
        if not _INSTANCE_RE.fullmatch(path.name):
            raise DataError(
                f"{path}: annotation file names must look like <class>_<k>.txt (e.g. chair_3.txt), "
                f"got {path.name!r}; rename or remove the file"
            )
        files.append(path)
    return sorted(files, key=lambda p: _natural_key(p.name))


def _line_numbers(data: bytes, positions: np.ndarray) -> np.ndarray:
    """1-based line numbers of the byte ``positions`` in ``data``."""
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
    return np.searchsorted(newlines, positions) + 1


def _strip_control_bytes(path: Path, data: bytes, log: Log) -> bytes:
    """Remove stray ASCII control bytes (the known S3DIS defect) and warn where they were."""
    cleaned = data.translate(None, _CONTROL_BYTES)
    if len(cleaned) == len(data):
        return data
    raw = np.frombuffer(data, dtype=np.uint8)
    positions = np.flatnonzero(np.isin(raw, np.frombuffer(_CONTROL_BYTES, dtype=np.uint8)))
    lines = np.unique(_line_numbers(data, positions))
    shown = ", ".join(str(n) for n in lines[:10]) + (" ..." if len(lines) > 10 else "")
    found = sorted({bytes([data[p]]) for p in positions[:100]})
    log(
        f"warning: {path}: removed {len(positions)} stray control byte(s) "
        f"{', '.join(repr(b)[2:-1] for b in found)} on line(s) {shown}; this is a known defect "
        "of the S3DIS release (Area_5/hallway_6/Annotations/ceiling_1.txt), the numbers around "
        "it are kept"
    )
    return cleaned


def _locate_bad_line(path: Path, data: bytes) -> None:
    """Parse line by line and raise ``DataError`` at the first malformed line, if any.

    Only run after the fast parser failed, so its cost does not matter. Blank lines are allowed
    (a trailing newline, or an empty last line), as in ``np.loadtxt``.
    """
    for number, raw in enumerate(data.split(b"\n"), start=1):
        text = raw.decode("latin-1")
        fields = text.split()
        if not fields:
            continue
        problem = ""
        if len(fields) != _FIELDS:
            problem = f"expected {_FIELDS} numbers 'x y z r g b', got {len(fields)} fields"
        else:
            try:
                values = [float(f) for f in fields]
            except ValueError:
                values = None
            if values is None or any("_" in f for f in fields):
                problem = "a field is not a number"
            elif not all(math.isfinite(v) for v in values):
                problem = "a value is not finite"
            elif not all(0.0 <= v <= 255.0 for v in values[3:]):
                problem = "r g b must be in 0..255"
        if problem:
            shown = text if len(text) <= 200 else text[:200] + "..."
            raise DataError(
                f"{path}: line {number}: {problem}: {shown!r}; fix or re-extract this file "
                "(the original zip is the reference)"
            )


def read_points(path: str | Path, log: Log = print) -> np.ndarray:
    """Read one annotation file into a (M, 6) float64 array of x y z r g b.

    Fast path: ``np.loadtxt`` (a C parser since numpy 1.23, ~0.4 s per million lines). When it
    fails, or the values are out of range, a line-by-line parse finds the first bad line so the
    error can name it.

    Raises:
        DataError: naming the file, the 1-based line number and its text, for a malformed line
            (wrong field count, non-number, non-finite value, colour outside 0..255).
    """
    path = Path(path)
    data = _strip_control_bytes(path, path.read_bytes(), log)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # loadtxt warns on an empty file; handled below
            values = np.loadtxt(
                io.StringIO(data.decode("ascii")), dtype=np.float64, comments=None, ndmin=2
            )
    except (ValueError, UnicodeDecodeError) as err:
        _locate_bad_line(path, data)
        raise DataError(f"{path}: cannot be parsed as 'x y z r g b' lines: {err}") from err
    if values.size == 0:
        return np.zeros((0, _FIELDS), dtype=np.float64)
    ok = values.shape[1] == _FIELDS
    if ok:
        rgb = values[:, 3:]
        ok = bool(np.isfinite(values).all() and (rgb >= 0).all() and (rgb <= 255).all())
    if not ok:
        _locate_bad_line(path, data)
        raise DataError(f"{path}: values could not be checked line by line (shape {values.shape})")
    return values


def read_room(room_dir: str | Path, log: Log = print) -> dict[str, np.ndarray]:
    """Read one room from its ``Annotations`` folder (the room's own ``<room>.txt`` is not used).

    Args:
        room_dir: e.g. ``ROOT/Area_1/office_1``.
        log: receives warnings (repaired control bytes, empty files, unknown class prefixes).

    Returns:
        ``{"points": (N, 6) float32 x y z r g b (rgb 0..255 as float), "semantic": (N,) int16
        index into S3DIS_CLASSES, "instance": (N,) int32 instance id 1..K}``; instance k is the
        k-th non-empty annotation file in natural name order.

    Raises:
        DataError: if the folder has no ``Annotations`` folder, no annotation file with points,
            or a malformed file.
    """
    room_dir = Path(room_dir)
    annotations = room_dir / "Annotations"
    if not annotations.is_dir():
        raise DataError(f"{room_dir}: no Annotations folder; {DOWNLOAD_HINT}")
    parts, semantic, instance = [], [], []
    for path in _annotation_files(annotations):
        points = read_points(path, log)
        if len(points) == 0:
            log(f"warning: {path}: empty annotation file, no instance created for it")
            continue
        prefix = _INSTANCE_RE.fullmatch(path.name).group(1)  # type: ignore[union-attr]
        if prefix not in S3DIS_CLASSES:
            log(f"note: {path}: {prefix!r} is not an S3DIS class, counted as clutter")
        parts.append(points.astype(np.float32))
        semantic.append(np.full(len(points), _class_index(prefix), dtype=np.int16))
        instance.append(np.full(len(points), len(parts), dtype=np.int32))
    if not parts:
        raise DataError(
            f"{annotations}: no <class>_<k>.txt file with points; re-extract this room "
            f"from the zip. {DOWNLOAD_HINT}"
        )
    return {
        "points": np.concatenate(parts),
        "semantic": np.concatenate(semantic),
        "instance": np.concatenate(instance),
    }


# --- cache ----------------------------------------------------------------------------------------


def s3dis_cache_path(root: str | Path, cache_dir: str | Path = "") -> Path:
    """Default cache file of the raw tree at ``root``: one per (resolved root, CACHE_VERSION).

    ``cache_dir`` "" means ``$XDG_CACHE_HOME/ifsearch`` (``~/.cache/ifsearch``): a per-user place
    that survives between runs, unlike a trial's working directory.
    """
    if str(cache_dir):
        directory = Path(cache_dir).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        directory = Path(base) / "ifsearch"
    resolved = str(Path(root).expanduser().resolve())
    digest = hashlib.sha1(resolved.encode()).hexdigest()[:10]
    return directory / f"s3dis-{digest}-v{CACHE_VERSION}.h5"


def _scan_rooms(root: Path) -> dict[str, Path]:
    """Map ``"Area_N/room"`` to its folder for every room of the raw tree, in natural order."""
    if not root.is_dir():
        raise DataError(
            f"S3DIS root {str(root)!r} does not exist or is not a folder. {DOWNLOAD_HINT}"
        )
    areas = sorted(
        (p for p in root.iterdir() if p.is_dir() and _AREA_RE.fullmatch(p.name)),
        key=lambda p: _natural_key(p.name),
    )
    if not areas:
        nested = root / "Stanford3dDataset_v1.2_Aligned_Version"
        guess = f" (did you mean {str(nested)!r}?)" if nested.is_dir() else ""
        raise DataError(f"S3DIS root {str(root)!r} has no Area_* folders{guess}. {DOWNLOAD_HINT}")
    rooms: dict[str, Path] = {}
    for area in areas:
        names = sorted(
            (p.name for p in area.iterdir() if (p / "Annotations").is_dir()), key=_natural_key
        )
        rooms.update({f"{area.name}/{name}": area / name for name in names})
    if not rooms:
        raise DataError(
            f"S3DIS root {str(root)!r} has Area_* folders but no room with an Annotations "
            f"folder. {DOWNLOAD_HINT}"
        )
    return rooms


def _fingerprint(room_dir: Path) -> str:
    """Hash of the room's annotation file names and sizes: detects edits, re-extractions, and
    added or removed instances without reading the data (sizes, not mtimes, so copies match)."""
    files = _annotation_files(room_dir / "Annotations")
    text = "\n".join(f"{p.name}:{p.stat().st_size}" for p in files)
    return hashlib.sha1(text.encode()).hexdigest()


def _cache_problem(cache_path: Path, fingerprints: dict[str, str]) -> tuple[str, bool]:
    """Why the cache cannot be reused ("" if it can) and whether the file is unreadable."""
    if not cache_path.exists():
        return "missing", False
    try:
        with h5py.File(cache_path, "r") as f:
            version = f.attrs.get("version")
            if version != CACHE_VERSION:
                return f"version {version} != CACHE_VERSION {CACHE_VERSION}", False
            rooms = json.loads(f.attrs["rooms"])
            if rooms != list(fingerprints):
                return "its room list differs from the raw tree", False
            for room, digest in fingerprints.items():
                group = f.get(room)
                if group is None or any(k not in group for k in ("points", "semantic", "instance")):
                    return f"room {room} is incomplete", True
                if group.attrs.get("fingerprint") != digest:
                    return f"the annotation files of {room} changed", False
    except (OSError, KeyError, ValueError, TypeError) as err:
        return f"it cannot be read ({type(err).__name__}: {err})", True
    return "", False


def _write_cache(
    tmp: Path, root: Path, rooms: dict[str, Path], fingerprints: dict[str, str], log: Log
) -> None:
    """Convert every room into ``tmp`` (a new HDF5 file), logging progress per room."""
    start = time.monotonic()
    total_points = 0
    with h5py.File(tmp, "w") as f:
        f.attrs["version"] = CACHE_VERSION
        f.attrs["classes"] = json.dumps(S3DIS_CLASSES)
        f.attrs["source_root"] = str(root)
        f.attrs["rooms"] = json.dumps(list(rooms))
        for i, (name, room_dir) in enumerate(rooms.items(), start=1):
            room = read_room(room_dir, log)
            group = f.create_group(name)
            n = len(room["points"])
            chunk = min(n, _CHUNK_ROWS)
            group.create_dataset("points", data=room["points"], chunks=(chunk, 6), **_COMPRESSION)
            for key in ("semantic", "instance"):
                group.create_dataset(key, data=room[key], chunks=(chunk,), **_COMPRESSION)
            group.attrs["fingerprint"] = fingerprints[name]
            group.attrs["num_instances"] = int(room["instance"].max())
            total_points += n
            log(
                f"s3dis cache: {i}/{len(rooms)} rooms ({name}, {n} points, "
                f"{time.monotonic() - start:.0f} s) ..."
            )
    log(f"s3dis cache: done, {len(rooms)} rooms, {total_points} points")


def build_cache(root: str | Path, cache_path: str | Path, log: Log = print) -> Path:
    """Convert the raw S3DIS tree at ``root`` into one HDF5 file, or reuse a valid one.

    Layout: one group per room (``"Area_1/office_1"``) with ``points`` (N, 6) float32 xyz + rgb
    0..255, ``semantic`` (N,) int16 and ``instance`` (N,) int32 (1..K), gzip-compressed and
    chunked; root attributes ``version`` (``CACHE_VERSION``), ``classes``, ``source_root`` and
    ``rooms`` (JSON), and per room a ``fingerprint`` of its annotation files.

    The file is reused when its version, room list and every room's fingerprint match the raw
    tree; otherwise it is rebuilt (a corrupt file with a warning). Building writes a temporary
    file and moves it into place atomically, holding an ``fcntl`` lock on ``<cache>.lock``, so
    several processes (Ray workers) starting at once build it once: the others wait, then
    reuse it.

    Args:
        root: the unzipped ``Stanford3dDataset_v1.2_Aligned_Version`` folder.
        cache_path: where the HDF5 file goes, e.g. ``s3dis_cache_path(root)``.
        log: receives progress lines and warnings (``print`` by default).

    Returns:
        ``cache_path`` as a ``Path``.

    Raises:
        DataError: if ``root`` is missing or holds no Area_* folder with rooms (the message quotes
            ``DOWNLOAD_HINT``), or a raw file is malformed.
    """
    root = Path(root).expanduser().resolve()
    cache_path = Path(cache_path).expanduser()
    rooms = _scan_rooms(root)
    fingerprints = {name: _fingerprint(path) for name, path in rooms.items()}
    if not _cache_problem(cache_path, fingerprints)[0]:
        return cache_path  # fast path, no lock: a valid cache is only ever replaced atomically

    cache_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = cache_path.with_name(cache_path.name + ".lock")
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"s3dis cache: another process is building {cache_path}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            problem, unreadable = _cache_problem(cache_path, fingerprints)  # may be built now
            if not problem:
                return cache_path
            if unreadable:
                log(f"warning: s3dis cache {cache_path} is corrupt, rebuilding it: {problem}")
            elif problem != "missing":
                log(f"s3dis cache: rebuilding {cache_path}: {problem}")
            log(f"s3dis cache: converting {len(rooms)} rooms of {root} into {cache_path}")
            tmp = cache_path.with_name(f"{cache_path.name}.tmp{os.getpid()}")
            try:
                _write_cache(tmp, root, rooms, fingerprints, log)
                os.replace(tmp, cache_path)
            finally:
                tmp.unlink(missing_ok=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return cache_path


# --- dataset --------------------------------------------------------------------------------------


def _check_number(name: str, value: object, minimum: float, integer: bool) -> None:
    """Reject bools, non-numbers (floats where an int is needed) and values below ``minimum``."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(float(value)) and value >= minimum):  # type: ignore[operator]
        raise ConfigError(f"{name} must be a finite number >= {minimum}, got {value!r}")


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    """Validate a class subset (order kept: it defines the class indices) or default to all 13."""
    if isinstance(classes, str):
        classes = (classes,)
    names = tuple(classes or ()) or S3DIS_CLASSES
    unknown = [n for n in names if n not in S3DIS_CLASSES]
    if unknown:
        raise ConfigError(
            f"unknown S3DIS classes {unknown}; classes must be a subset of {list(S3DIS_CLASSES)}"
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"classes must not repeat a name, got {duplicates} more than once")
    return names


def _voxelize(
    xyz: np.ndarray, voxel_size: float, rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray]:
    """Keep one point per voxel of a grid anchored at the origin.

    The kept point is the first in index order (deterministic) when ``rng`` is None, else a
    uniformly random one.

    Returns:
        ``keep`` (V,) indices of the kept points and ``inverse`` (M,): for every input point the
        position in ``keep`` of its voxel's representative.
    """
    order = None if rng is None else rng.permutation(len(xyz))
    q = np.floor(xyz / voxel_size).astype(np.int64)  # (M, 3)
    q -= q.min(0)
    extent = q.max(0) + 1
    key = (q[:, 0] * extent[1] + q[:, 1]) * extent[2] + q[:, 2]  # (M,) unique per voxel
    if order is not None:
        key = key[order]
    # np.unique with return_index uses a stable sort: "first" is the lowest (permuted) index.
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    if order is None:
        return first, inverse
    full_inverse = np.empty_like(inverse)
    full_inverse[order] = inverse
    return order[first], full_inverse


class S3DISRooms(Dataset):
    """Samples of S3DIS rooms from a cache written by ``build_cache``.

    Items have the keys of ``SyntheticScenes`` items: ``points`` (N, 6) float32 (xyz in metres
    with the x-y centre of the sample's bounding box at 0 and its lowest z at 0, like the
    synthetic rooms; rgb in [0, 1]), ``instance_labels`` (N,) int64 (0 = background, 1..K),
    ``semantic_labels`` (N,) int64 (-1 = background), ``labels`` (K,) int64 (index into
    ``class_names``), ``masks`` (K, N) bool and ``scene_id`` str. Points of classes outside
    ``class_names`` are background; instances are renumbered 1..K per sample, in the order of their
    room ids.

    Training (``train=True``): sample ``index`` of epoch ``e`` uses room ``index % num_rooms`` and
    ``np.random.default_rng([seed, e, index])`` for all randomness, so it is reproducible and a
    resumed run sees the same data. It takes a ``block_size`` x ``block_size`` x-y column centred
    on a random room point (0: the whole room), keeps one random point per ``voxel_size`` voxel
    (0: all points), then a random subset of ``num_points`` (0: no limit), and with ``augment``
    rotates about z, scales by U(0.9, 1.1) and adds N(0, 0.005 m) jitter. Cropping before
    voxelising is an equivalent, cheaper order (the grid is anchored at the origin, not at the
    crop) except for voxels cut by the block border. An instance cut by the crop keeps only its
    points inside it. ``scene_id`` is ``"Area_1/office_1@x,y"`` (block centre in room
    coordinates) or the room name without a block.

    Evaluation (``train=False``): item ``i`` is the whole room ``i`` (natural order), voxelised
    deterministically (first point per voxel), with no augmentation. It adds ``eval_index``
    (N_full,) int64: for every original room point, the index of its voxel's model point, and
    ``eval_masks`` (K_full, N_full) bool with ``eval_labels`` (K_full,) int64: the ground truth on
    all original points, so metrics are computed on the full room by mapping prediction masks
    (P, N) to ``masks[:, eval_index]``. K may be smaller than K_full when voxelisation leaves an
    instance without a representative point.

    Args:
        cache_path: HDF5 file written by ``build_cache``.
        areas: S3DIS area numbers to use, e.g. ``[1, 2, 3, 4, 6]``.
        train: training samples (random blocks) or evaluation samples (whole rooms).
        num_points: most points per training sample (0 = no limit); unused in evaluation.
        voxel_size: voxel edge in metres (0 = no voxelisation).
        block_size: x-y edge of training blocks in metres (0 = whole room).
        samples_per_epoch: length of a training epoch (0 = one sample per room); ignored in
            evaluation.
        max_rooms: use only the first ``max_rooms`` rooms of ``areas`` in natural order (0 = all):
            a tiny mode for tests and smoke runs.
        classes: the classes to segment, a subset of ``S3DIS_CLASSES`` whose order defines the
            class indices; empty (or None) means all 13.
        augment: apply the training augmentation.
        seed: base seed of the training samples.

    Raises:
        ConfigError: for an invalid argument (unknown class, area not in the cache, ...).
        DataError: if the cache is missing, unreadable or of another ``CACHE_VERSION``.
    """

    def __init__(
        self,
        cache_path: str | Path,
        areas: Sequence[int],
        train: bool,
        num_points: int,
        voxel_size: float,
        block_size: float,
        samples_per_epoch: int,
        max_rooms: int,
        classes: Sequence[str] = (),
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        self.class_names: tuple[str, ...] = _check_classes(classes)
        _check_number("num_points", num_points, 0, integer=True)
        _check_number("voxel_size", voxel_size, 0, integer=False)
        _check_number("block_size", block_size, 0, integer=False)
        _check_number("samples_per_epoch", samples_per_epoch, 0, integer=True)
        _check_number("max_rooms", max_rooms, 0, integer=True)
        _check_number("seed", seed, 0, integer=True)
        self.cache_path = Path(cache_path).expanduser()
        self.train = bool(train)
        self.num_points = int(num_points)
        self.voxel_size = float(voxel_size)
        self.block_size = float(block_size)
        self.samples_per_epoch = int(samples_per_epoch)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0
        self.areas = self._check_areas(areas)
        all_rooms = self._read_room_list()
        available = sorted({int(r.split("/")[0][5:]) for r in all_rooms})
        missing = [a for a in self.areas if a not in available]
        if missing:
            raise ConfigError(
                f"areas {missing} are not in the S3DIS cache {self.cache_path} (it has areas "
                f"{available}); choose areas from that list or rebuild the cache from a full "
                "S3DIS tree"
            )
        wanted = {f"Area_{a}" for a in self.areas}
        rooms = [r for r in all_rooms if r.split("/")[0] in wanted]
        self.rooms: tuple[str, ...] = tuple(rooms[: int(max_rooms)] if max_rooms else rooms)
        # S3DIS class index -> index in class_names, -1 for classes treated as background.
        self._class_map = np.full(len(S3DIS_CLASSES), -1, dtype=np.int64)
        for i, name in enumerate(self.class_names):
            self._class_map[S3DIS_CLASSES.index(name)] = i

    @staticmethod
    def _check_areas(areas: Sequence[int]) -> tuple[int, ...]:
        if isinstance(areas, (int, np.integer)):
            areas = (int(areas),)
        values = tuple(areas)
        bad = [a for a in values if isinstance(a, bool) or not isinstance(a, (int, np.integer))]
        if not values or bad:
            raise ConfigError(f"areas must be a non-empty list of area numbers, got {areas!r}")
        return tuple(int(a) for a in values)

    def _read_room_list(self) -> list[str]:
        """Check the cache file and return its room names, with errors that say what to run."""
        if not self.cache_path.is_file():
            raise DataError(
                f"S3DIS cache {str(self.cache_path)!r} does not exist; build it first with "
                "ifsearch.data.s3dis.build_cache(root, cache_path). " + DOWNLOAD_HINT
            )
        try:
            with h5py.File(self.cache_path, "r") as f:
                version = f.attrs.get("version")
                if version != CACHE_VERSION:
                    raise DataError(
                        f"S3DIS cache {str(self.cache_path)!r} has version {version}, this code "
                        f"reads version {CACHE_VERSION}; run build_cache(root, cache_path) to "
                        "rebuild it"
                    )
                return list(json.loads(f.attrs["rooms"]))
        except (OSError, KeyError, ValueError) as err:
            raise DataError(
                f"S3DIS cache {str(self.cache_path)!r} cannot be read ({err}); run "
                "build_cache(root, cache_path) to rebuild it"
            ) from err

    def _load(self, room: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read one room. The file is opened per call (~1 ms, small next to decompressing a
        room), so no HDF5 handle crosses a fork into DataLoader workers or a pickle to Ray."""
        with h5py.File(self.cache_path, "r") as f:
            group = f[room]
            return group["points"][...], group["semantic"][...], group["instance"][...]

    @property
    def num_classes(self) -> int:
        """Number of semantic classes C (background is not a class)."""
        return len(self.class_names)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples ``__getitem__`` returns (training only).

        With DataLoader workers, call it before creating the epoch's iterator: persistent workers
        hold copies of the dataset and do not see later calls.
        """
        _check_number("epoch", epoch, 0, integer=True)
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.train and self.samples_per_epoch:
            return self.samples_per_epoch
        return len(self.rooms)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(areas={list(self.areas)}, train={self.train}, "
            f"rooms={len(self.rooms)}, num_points={self.num_points}, voxel_size={self.voxel_size}, "
            f"block_size={self.block_size}, classes={self.class_names}, seed={self.seed})"
        )

    def __getitem__(self, index: int) -> dict:
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        if not self.rooms:
            raise DataError(f"no rooms selected from {self.cache_path} (max_rooms / areas)")
        if self.train:
            return self._train_sample(index)
        return self._eval_sample(index)

    def _labels(
        self, semantic: np.ndarray, instance: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-sample labels: ``(instance_labels (N,), labels (K,), masks (K, N))``.

        Points of classes outside ``class_names`` become background; the remaining instance ids
        are renumbered 1..K in increasing room-id order.
        """
        cls = self._class_map[semantic]  # (N,)
        kept = np.where(cls >= 0, instance, 0)
        ids, inverse = np.unique(kept, return_inverse=True)
        if len(ids) and ids[0] == 0:
            new, ids = inverse, ids[1:]
        else:
            new = inverse + 1
        labels = np.zeros(len(ids), dtype=np.int64)
        labels[new[new > 0] - 1] = cls[new > 0]  # one class per instance
        masks = new[None, :] == np.arange(1, len(ids) + 1)[:, None]  # (K, N)
        return new.astype(np.int64), labels, masks

    def _sample(
        self, xyz: np.ndarray, rgb: np.ndarray, semantic: np.ndarray, instance: np.ndarray
    ) -> dict:
        """Normalise coordinates and build the synthetic-dataset keys (tensors)."""
        lo, hi = xyz.min(0), xyz.max(0)
        xyz = xyz - np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]])
        inst, labels, masks = self._labels(semantic, instance)
        sem = np.concatenate([[-1], labels])[inst]
        points = np.concatenate([xyz, rgb / 255.0], axis=1).astype(np.float32)
        return {
            "points": torch.from_numpy(points),
            "instance_labels": torch.from_numpy(inst),
            "semantic_labels": torch.from_numpy(sem),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(masks),
        }

    def _train_sample(self, index: int) -> dict:
        room = self.rooms[index % len(self.rooms)]
        points, semantic, instance = self._load(room)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        xyz = points[:, :3].astype(np.float64)
        scene_id = room
        if self.block_size > 0:
            cx, cy = xyz[rng.integers(len(xyz)), :2]
            half = self.block_size / 2
            inside = np.flatnonzero(
                (np.abs(xyz[:, 0] - cx) <= half) & (np.abs(xyz[:, 1] - cy) <= half)
            )
            scene_id = f"{room}@{cx:.2f},{cy:.2f}"
        else:
            inside = np.arange(len(xyz))
        if self.voxel_size > 0:
            keep, _ = _voxelize(xyz[inside], self.voxel_size, rng)
            inside = inside[np.sort(keep)]
        if 0 < self.num_points < len(inside):
            inside = inside[np.sort(rng.choice(len(inside), self.num_points, replace=False))]
        xyz = xyz[inside]
        if self.augment:
            theta = rng.uniform(0.0, 2.0 * math.pi)
            scale = rng.uniform(0.9, 1.1)
            c, s = math.cos(theta), math.sin(theta)
            rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
            xyz = (xyz - xyz.mean(0)) @ rot.T * scale
            xyz = xyz + rng.normal(0.0, 0.005, size=xyz.shape)
        sample = self._sample(
            xyz, points[inside, 3:].astype(np.float64), semantic[inside], instance[inside]
        )
        sample["scene_id"] = scene_id
        return sample

    def _eval_sample(self, index: int) -> dict:
        room = self.rooms[index]
        points, semantic, instance = self._load(room)
        xyz = points[:, :3].astype(np.float64)
        if self.voxel_size > 0:
            keep, eval_index = _voxelize(xyz, self.voxel_size, None)
        else:
            keep, eval_index = np.arange(len(xyz)), np.arange(len(xyz))
        sample = self._sample(
            xyz[keep], points[keep, 3:].astype(np.float64), semantic[keep], instance[keep]
        )
        _, eval_labels, eval_masks = self._labels(semantic, instance)
        sample["scene_id"] = room
        sample["eval_index"] = torch.from_numpy(eval_index.astype(np.int64))
        sample["eval_masks"] = torch.from_numpy(eval_masks)
        sample["eval_labels"] = torch.from_numpy(eval_labels)
        return sample


def cached_areas(cache_path: str | Path) -> list[int]:
    """The area numbers a cache holds (a partial download may lack some), sorted."""
    probe = S3DISRooms.__new__(S3DISRooms)
    probe.cache_path = Path(cache_path).expanduser()
    return sorted({int(r.split("/")[0][5:]) for r in probe._read_room_list()})


def s3dis_split(
    cache_path: str | Path, test_area: int = 5, **kwargs: object
) -> tuple[S3DISRooms, S3DISRooms]:
    """Standard S3DIS split: train on every other area of the cache, evaluate on ``test_area``.

    Area 5 is the usual test area (it shares no building with the others). ``kwargs`` go to both
    datasets (``num_points``, ``voxel_size``, ``block_size``, ``samples_per_epoch``,
    ``max_rooms``, ``classes``, ``augment``, ``seed``); ``train`` and ``areas`` are set here.

    Returns:
        ``(train, evaluation)`` datasets.
    """
    path = Path(cache_path).expanduser()
    S3DISRooms(path, [test_area], False, 0, 0.0, 0.0, 0, 0)  # checks the cache and the area
    others = [a for a in cached_areas(path) if a != int(test_area)]
    if not others:
        raise ConfigError(
            f"S3DIS cache {path} holds only area {test_area}; training needs at least one other "
            "area"
        )
    train = S3DISRooms(path, others, True, **kwargs)  # type: ignore[arg-type]
    evaluation = S3DISRooms(path, [test_area], False, **kwargs)  # type: ignore[arg-type]
    return train, evaluation
