"""Tests of the S3DIS reader, HDF5 cache and dataset, and of the S3DIS coverage metrics.

The raw tree is a tiny fake in the exact release format (``Area_N/<room>/Annotations/
<class>_<k>.txt`` with "x y z r g b" lines), written by ``make_tree``: 3 rooms in 2 areas, an
unknown class prefix (``stairs`` -> clutter), the room's own ``<room>.txt``, stray files, and one
number with a stray 0x10 byte, like the real ``Area_5/hallway_6/Annotations/ceiling_1.txt``.

Coordinates sit on a 0.025 m grid offset by 0.0125 m, so with ``VOXEL = 0.1`` no point lies on a
voxel boundary and voxel membership can be checked exactly.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ifsearch.data import collate_scenes
from ifsearch.data.s3dis import (
    CACHE_VERSION,
    DOWNLOAD_HINT,
    S3DIS_CLASSES,
    S3DISRooms,
    build_cache,
    read_room,
    s3dis_cache_path,
    s3dis_split,
)
from ifsearch.errors import ConfigError, DataError
from ifsearch.metrics.coverage import s3dis_coverage

SCENE_KEYS = {"points", "instance_labels", "semantic_labels", "labels", "masks", "scene_id"}
EVAL_KEYS = SCENE_KEYS | {"eval_index", "eval_masks", "eval_labels"}
VOXEL = 0.1
STEP = 0.025  # grid of the fake coordinates

# room -> instance files in natural order (the order that defines instance ids 1..K)
ROOMS: dict[str, list[str]] = {
    "Area_1/office_1": ["ceiling_1", "chair_1", "chair_2", "chair_10", "stairs_1"],
    "Area_1/office_2": ["floor_1", "table_1", "wall_1"],
    "Area_5/hallway_1": ["clutter_1", "door_1", "wall_1"],
}
CORRUPT_FILE = "Area_1/office_2/Annotations/table_1.txt"
CORRUPT_LINE = 3  # 1-based line that gets the stray byte


def instance_points(rng: np.random.Generator, k: int) -> np.ndarray:
    """(n, 6) points of instance number k: a grid-aligned cluster, integer colours."""
    n = int(rng.integers(40, 90))
    centre = np.array([k % 3, k // 3, k % 2]) * 1.0 + 0.5
    cells = rng.integers(-12, 12, size=(n, 3))
    xyz = centre + cells * STEP + STEP / 2
    rgb = rng.integers(0, 256, size=(n, 3))
    return np.concatenate([xyz, rgb], axis=1)


def write_instance(path: Path, pts: np.ndarray) -> None:
    lines = [f"{x:.4f} {y:.4f} {z:.4f} {r:.0f} {g:.0f} {b:.0f}" for x, y, z, r, g, b in pts]
    path.write_text("\n".join(lines) + "\n")


def make_tree(root: Path, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Write the fake raw tree and return the expected ``read_room`` output of every room."""
    rng = np.random.default_rng(seed)
    expected = {}
    for room, names in ROOMS.items():
        room_dir = root / room
        ann = room_dir / "Annotations"
        ann.mkdir(parents=True)
        parts, sem, inst = [], [], []
        for k, name in enumerate(names, start=1):
            pts = instance_points(rng, k)
            write_instance(ann / f"{name}.txt", pts)
            prefix = name.rsplit("_", 1)[0]
            cls = S3DIS_CLASSES.index(prefix if prefix in S3DIS_CLASSES else "clutter")
            parts.append(pts)
            sem.append(np.full(len(pts), cls))
            inst.append(np.full(len(pts), k))
        points = np.concatenate(parts)
        write_instance(room_dir / f"{room_dir.name}.txt", points)  # the unlabelled room file
        (ann / "notes.md").write_text("not an instance")
        (room_dir / ".DS_Store").write_bytes(b"\x00\x01binary")
        expected[room] = {
            "points": points.astype(np.float32),
            "semantic": np.concatenate(sem),
            "instance": np.concatenate(inst),
        }
    (root / "Area_1" / "Icon\r").write_bytes(b"")  # macOS folder-icon file, not a room
    # The known defect: a stray 0x10 byte inside a number ("103.0\x100000" in the real file).
    path = root / CORRUPT_FILE
    lines = path.read_text().split("\n")
    first = lines[CORRUPT_LINE - 1].split(" ")
    first[0] = first[0][:3] + "\x10" + first[0][3:]
    lines[CORRUPT_LINE - 1] = " ".join(first)
    path.write_bytes("\n".join(lines).encode())
    return expected


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("s3dis") / "Stanford3dDataset_v1.2_Aligned_Version"
    return root, make_tree(root)


@pytest.fixture(scope="module")
def cache(tree: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, _ = tree
    return build_cache(root, tmp_path_factory.mktemp("cache") / "s3dis.h5", log=lambda s: None)


def rooms_ds(cache: Path, train: bool, **kw: object) -> S3DISRooms:
    args: dict = dict(
        areas=[1, 5], train=train, num_points=0, voxel_size=0.0, block_size=0.0,
        samples_per_epoch=6, max_rooms=0, augment=False,
    )
    args.update(kw)
    return S3DISRooms(cache, **args)


def assert_consistent(sample: dict) -> None:
    """Shapes, dtypes and agreement of instance_labels / semantic_labels / labels / masks."""
    pts, inst, sem = sample["points"], sample["instance_labels"], sample["semantic_labels"]
    labels, masks = sample["labels"], sample["masks"]
    n, k = len(pts), len(labels)
    assert pts.shape == (n, 6) and pts.dtype == torch.float32
    assert inst.shape == sem.shape == (n,) and inst.dtype == sem.dtype == torch.int64
    assert labels.dtype == torch.int64 and masks.shape == (k, n) and masks.dtype == torch.bool
    assert torch.equal(torch.unique(inst[inst > 0]), torch.arange(1, k + 1))
    assert torch.equal(masks, inst[None] == torch.arange(1, k + 1)[:, None])
    expect_sem = torch.where(inst > 0, labels[(inst - 1).clamp(min=0)], -1)
    assert torch.equal(sem, expect_sem)
    rgb = pts[:, 3:]
    assert rgb.min() >= 0 and rgb.max() <= 1


# --- raw reader ---------------------------------------------------------------------------------


def test_read_room_matches_written_files(tree: tuple[Path, dict]) -> None:
    root, expected = tree
    for room, exp in expected.items():
        got = read_room(root / room, log=lambda s: None)
        assert set(got) == {"points", "semantic", "instance"}
        assert got["points"].dtype == np.float32 and got["points"].shape == exp["points"].shape
        np.testing.assert_allclose(got["points"], exp["points"], atol=1e-6)
        assert got["semantic"].dtype == np.int16 and got["instance"].dtype == np.int32
        np.testing.assert_array_equal(got["semantic"], exp["semantic"])
        np.testing.assert_array_equal(got["instance"], exp["instance"])
    # stairs_1 (instance 5 of office_1) is clutter; chair_10 sorts after chair_2
    office = read_room(root / "Area_1/office_1", log=lambda s: None)
    assert set(office["semantic"][office["instance"] == 5]) == {S3DIS_CLASSES.index("clutter")}
    assert set(office["semantic"][office["instance"] == 4]) == {S3DIS_CLASSES.index("chair")}


def test_stray_control_byte_is_removed_with_a_warning(tree: tuple[Path, dict]) -> None:
    root, expected = tree
    logs: list[str] = []
    got = read_room(root / "Area_1/office_2", log=logs.append)
    np.testing.assert_allclose(got["points"], expected["Area_1/office_2"]["points"], atol=1e-6)
    warning = [s for s in logs if "control byte" in s]
    assert len(warning) == 1
    assert "table_1.txt" in warning[0] and f"line(s) {CORRUPT_LINE}" in warning[0]
    assert "\\x10" in warning[0]


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("1.0 2.0 3.0 10 20", "got 5 fields"),
        ("1.0 2.0 3.0 10 20 30 40", "got 7 fields"),
        ("1.0 2.0 abc 10 20 30", "not a number"),
        ("1.0 2.0 nan 10 20 30", "not finite"),
        ("1.0 2.0 3.0 10 20 300", "0..255"),
        ("1.0 2.0 3.0 10 20 3\u00e90", "not a number"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str, problem: str) -> None:
    ann = tmp_path / "Area_1" / "office_1" / "Annotations"
    ann.mkdir(parents=True)
    good = "0.5 0.5 0.5 1 2 3"
    (ann / "chair_1.txt").write_bytes("\n".join([good, good, good, bad_line, good]).encode())
    with pytest.raises(DataError, match=r"chair_1\.txt: line 4: ") as info:
        read_room(ann.parent, log=lambda s: None)
    assert problem in str(info.value)
    assert repr(bad_line)[1:-1][:12] in str(info.value)


def test_bad_instance_file_name_and_empty_room_are_errors(tmp_path: Path) -> None:
    ann = tmp_path / "room" / "Annotations"
    ann.mkdir(parents=True)
    with pytest.raises(DataError, match="no <class>_<k>.txt file"):
        read_room(ann.parent)
    (ann / "chair.txt").write_text("0 0 0 1 2 3\n")
    with pytest.raises(DataError, match=r"chair\.txt.*<class>_<k>\.txt"):
        read_room(ann.parent)


def test_missing_root_or_areas_quote_the_download_hint(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="buildingparser.stanford.edu") as info:
        build_cache(missing, tmp_path / "c.h5")
    assert str(missing) in str(info.value) and DOWNLOAD_HINT in str(info.value)
    (tmp_path / "empty" / "Stanford3dDataset_v1.2_Aligned_Version").mkdir(parents=True)
    with pytest.raises(DataError, match="no Area_.*did you mean") as info:
        build_cache(tmp_path / "empty", tmp_path / "c.h5")
    assert "Stanford3dDataset_v1.2_Aligned_Version.zip" in str(info.value)
    assert not (tmp_path / "c.h5").exists()


# --- cache ----------------------------------------------------------------------------------------


def test_cache_path_is_per_root_and_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    a = s3dis_cache_path(tmp_path / "a")
    assert a.parent == tmp_path / "xdg" / "ifsearch" and a.name.endswith(f"-v{CACHE_VERSION}.h5")
    assert a != s3dis_cache_path(tmp_path / "b")
    assert s3dis_cache_path(tmp_path / "a", tmp_path / "c").parent == tmp_path / "c"


def test_cache_contents(tree: tuple[Path, dict], cache: Path) -> None:
    _, expected = tree
    with h5py.File(cache, "r") as f:
        assert f.attrs["version"] == CACHE_VERSION
        for room, exp in expected.items():
            np.testing.assert_allclose(f[room]["points"][...], exp["points"], atol=1e-6)
            np.testing.assert_array_equal(f[room]["semantic"][...], exp["semantic"])
            np.testing.assert_array_equal(f[room]["instance"][...], exp["instance"])
            assert f[room]["points"].compression == "gzip"


def test_cache_is_reused_and_rebuilt_when_stale_or_corrupt(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    make_tree(root, seed=1)
    path = tmp_path / "cache" / "s3dis.h5"
    logs: list[str] = []
    build_cache(root, path, log=logs.append)
    assert path.is_file() and any("s3dis cache: 3/3 rooms" in s for s in logs)
    assert not list(path.parent.glob("*.tmp*"))  # the temporary file was moved into place

    def rebuild() -> list[str]:
        logs.clear()
        build_cache(root, path, log=logs.append)
        return logs

    mtime = path.stat().st_mtime_ns
    assert rebuild() == [] and path.stat().st_mtime_ns == mtime  # reused, silently

    with h5py.File(path, "r+") as f:
        f.attrs["version"] = CACHE_VERSION + 100
    assert any(f"version {CACHE_VERSION + 100}" in s for s in rebuild())
    with h5py.File(path, "r") as f:
        assert f.attrs["version"] == CACHE_VERSION

    path.write_bytes(path.read_bytes()[:500])  # truncated
    logs_ = rebuild()
    assert any(s.startswith("warning:") and "corrupt" in s and str(path) in s for s in logs_)
    path.write_bytes(b"not an hdf5 file")
    assert any("corrupt" in s for s in rebuild())
    assert rebuild() == []

    # A changed raw file (here: one more point) or a new room makes the cache stale.
    with open(root / "Area_5/hallway_1/Annotations/door_1.txt", "a") as f:
        f.write("0.5125 0.5125 0.5125 1 2 3\n")
    assert any("Area_5/hallway_1 changed" in s for s in rebuild())
    new_room = root / "Area_5" / "office_9" / "Annotations"
    new_room.mkdir(parents=True)
    (new_room / "chair_1.txt").write_text("0.5125 0.5125 0.5125 1 2 3\n")
    assert any("room list differs" in s for s in rebuild())
    with h5py.File(path, "r") as f:
        assert len(f["Area_5/office_9/points"]) == 1


def test_concurrent_builds_convert_once(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    make_tree(root, seed=2)
    path = tmp_path / "s3dis.h5"
    logs: list[str] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            build_cache(root, path, log=logs.append)
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum("converting" in s for s in logs) == 1


# --- dataset --------------------------------------------------------------------------------------


def test_dataset_errors(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="build_cache"):
        rooms_ds(tmp_path / "missing.h5", False)
    with pytest.raises(ConfigError, match=r"\['sofa_x'\]"):
        rooms_ds(cache, False, classes=("chair", "sofa_x"))
    with pytest.raises(ConfigError, match=r"areas \[3\] are not in"):
        rooms_ds(cache, False, areas=[1, 3])
    with pytest.raises(ConfigError, match="voxel_size"):
        rooms_ds(cache, False, voxel_size=-1.0)
    stale = tmp_path / "stale.h5"
    stale.write_bytes(cache.read_bytes())
    with h5py.File(stale, "r+") as f:
        f.attrs["version"] = CACHE_VERSION + 1
    with pytest.raises(DataError, match="rebuild"):
        rooms_ds(stale, False)


def test_train_samples_are_reproducible_and_change_with_the_epoch(cache: Path) -> None:
    kw = dict(num_points=60, voxel_size=VOXEL, block_size=1.0, augment=True, seed=3)
    ds, other = rooms_ds(cache, True, **kw), rooms_ds(cache, True, **kw)
    assert len(ds) == 6
    for i in range(len(ds)):
        a, b = ds[i], other[i]
        assert set(a) == SCENE_KEYS
        assert_consistent(a)
        assert a["scene_id"] == b["scene_id"]
        assert a["scene_id"].startswith(ds.rooms[i % 3] + "@")
        for key in SCENE_KEYS - {"scene_id"}:
            assert torch.equal(a[key], b[key]), key
        assert len(a["points"]) <= 60
        xyz = a["points"][:, :3]
        assert xyz[:, 2].min().abs() < 1e-6  # lowest z at 0
        centre = (xyz[:, :2].min(0).values + xyz[:, :2].max(0).values) / 2
        assert centre.abs().max() < 1e-5  # x-y bounding-box centre at 0
    first = [ds[i]["points"] for i in range(3)]
    ds.set_epoch(1)
    assert all(not torch.equal(p, ds[i]["points"]) for i, p in enumerate(first))
    ds.set_epoch(0)
    assert all(torch.equal(p, ds[i]["points"]) for i, p in enumerate(first))
    batch = collate_scenes([ds[0], ds[1]])
    assert len(batch["points"]) == 2
    assert len(rooms_ds(cache, True, samples_per_epoch=0)) == 3  # 0: one sample per room


def test_train_block_voxels_and_no_augmentation(cache: Path, tree: tuple[Path, dict]) -> None:
    _, expected = tree
    ds = rooms_ds(cache, True, voxel_size=VOXEL, block_size=0.0, max_rooms=1)
    sample = ds[0]
    raw = expected[ds.rooms[0]]
    voxels = np.unique(np.floor(raw["points"][:, :3].astype(np.float64) / VOXEL), axis=0)
    assert len(sample["points"]) == len(voxels)  # one point per occupied voxel of the room
    assert sample["scene_id"] == ds.rooms[0]
    # Without voxels, block, point limit or augmentation a sample is the room, shifted so that
    # the x-y bounding-box centre and the lowest z are at 0.
    whole = rooms_ds(cache, True, max_rooms=1)[0]
    xyz = raw["points"][:, :3].astype(np.float64)
    lo, hi = xyz.min(0), xyz.max(0)
    shifted = xyz - [(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]]
    np.testing.assert_allclose(whole["points"][:, :3].numpy(), shifted, atol=1e-5)


def test_eval_sample_covers_the_whole_room(cache: Path, tree: tuple[Path, dict]) -> None:
    _, expected = tree
    ds = rooms_ds(cache, False, voxel_size=VOXEL)
    assert len(ds) == 3 and ds.rooms == tuple(ROOMS)
    for i, room in enumerate(ds.rooms):
        sample = ds[i]
        raw = expected[room]
        assert set(sample) == EVAL_KEYS and sample["scene_id"] == room
        assert_consistent(sample)
        n_full = len(raw["points"])
        index = sample["eval_index"].numpy()
        assert index.shape == (n_full,) and index.dtype == np.int64
        model = sample["points"].numpy().astype(np.float64)[:, :3]
        assert set(index.tolist()) == set(range(len(model)))  # every model point is used
        # Point 0 is its voxel's representative, which gives the normalisation shift; then every
        # full point must fall in the voxel of the model point it maps to.
        full = raw["points"][:, :3].astype(np.float64)
        shift = full[0] - model[index[0]]
        np.testing.assert_array_equal(
            np.floor((model[index] + shift) / VOXEL), np.floor(full / VOXEL)
        )
        # ground truth on all original points
        inst = raw["instance"]
        k_full = inst.max()
        np.testing.assert_array_equal(
            sample["eval_masks"].numpy(), inst[None] == np.arange(1, k_full + 1)[:, None]
        )
        cls = [raw["semantic"][inst == k][0] for k in range(1, k_full + 1)]
        np.testing.assert_array_equal(sample["eval_labels"].numpy(), cls)
        # The model points are the first point of each voxel, and their GT is the full GT there
        # (the fake instances are far apart, so voxelisation keeps every one: K == K_full).
        keep = np.unique(index, return_index=True)[1]
        full_gt = sample["eval_masks"].numpy()
        np.testing.assert_array_equal(sample["masks"].numpy(), full_gt[:, keep])
        assert torch.equal(sample["labels"], sample["eval_labels"])
    # deterministic
    a, b = ds[0], rooms_ds(cache, False, voxel_size=VOXEL)[0]
    assert all(torch.equal(a[k], b[k]) for k in EVAL_KEYS - {"scene_id"})


def test_eval_without_voxels_is_the_raw_room(cache: Path, tree: tuple[Path, dict]) -> None:
    _, expected = tree
    ds = rooms_ds(cache, False, areas=[5])
    sample = ds[0]
    raw = expected["Area_5/hallway_1"]
    assert len(sample["points"]) == len(raw["points"])
    np.testing.assert_array_equal(sample["eval_index"].numpy(), np.arange(len(raw["points"])))
    assert torch.equal(sample["masks"], sample["eval_masks"])
    rgb = sample["points"][:, 3:].numpy()
    np.testing.assert_allclose(rgb, raw["points"][:, 3:] / 255, atol=1e-6)


def test_class_subset_makes_other_classes_background(cache: Path, tree: tuple[Path, dict]) -> None:
    _, expected = tree
    ds = rooms_ds(cache, False, classes=("table", "chair"), max_rooms=2)
    assert ds.class_names == ("table", "chair") and len(ds) == 2
    sample = ds[0]  # office_1: 3 chairs, ceiling, stairs
    assert_consistent(sample)
    raw = expected["Area_1/office_1"]
    is_chair = raw["semantic"] == S3DIS_CLASSES.index("chair")
    np.testing.assert_array_equal(sample["labels"].numpy(), [1, 1, 1])
    np.testing.assert_array_equal(sample["semantic_labels"].numpy() == 1, is_chair)
    np.testing.assert_array_equal(sample["instance_labels"].numpy() > 0, is_chair)
    assert sample["eval_masks"].shape[0] == 3
    assert rooms_ds(cache, False).class_names == S3DIS_CLASSES
    assert rooms_ds(cache, False, classes=None).class_names == S3DIS_CLASSES


def test_s3dis_split(cache: Path) -> None:
    kw = dict(num_points=50, voxel_size=VOXEL, block_size=1.0, samples_per_epoch=4, max_rooms=0)
    train, val = s3dis_split(cache, test_area=5, **kw)
    assert train.areas == (1,) and train.train and len(train) == 4
    assert val.areas == (5,) and not val.train and val.rooms == ("Area_5/hallway_1",)


# --- coverage metrics -----------------------------------------------------------------------------

N = 100


def span(a: int, b: int, n: int = N) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[a:b] = True
    return m


def scene(*instances: tuple[np.ndarray, int]) -> dict:
    masks = np.stack([m for m, _ in instances]) if instances else np.zeros((0, N), bool)
    return {"masks": masks, "labels": np.array([c for _, c in instances], dtype=np.int64)}


def test_coverage_perfect_predictions() -> None:
    gts = [scene((span(0, 40), 0), (span(40, 60), 0), (span(60, 100), 1)), scene((span(0, 50), 2))]
    preds = [dict(g, scores=np.ones(len(g["labels"]))) for g in gts]
    out = s3dis_coverage(preds, gts, num_classes=3)
    for key in ("mCov", "mWCov", "mPrec", "mRec"):
        assert out[key] == pytest.approx(1.0)
    assert out["per_class"][0]["num_gt"] == 2


def test_coverage_hand_computed() -> None:
    # Room 1: GT A=[0,40) c0, B=[40,60) c0, C=[60,100) c1.
    #   p1=[0,30) c0: IoU(A)=30/40=0.75 -> TP;  p2=[35,60) c0: IoU(A)=5/60, IoU(B)=20/25=0.8 -> TP;
    #   p3=[50,80) c1: IoU(C)=20/50=0.4 -> FP (its overlap with B is another class, ignored).
    #   Cov c0 = (0.75+0.8)/2 = 0.775, WCov c0 = (0.75*40+0.8*20)/60 = 46/60; Cov c1 = WCov = 0.4.
    # Room 2: GT D=[0,50) c0 with no c0 prediction -> coverage 0; p4=[0,50) c1 -> FP (no c1 GT).
    gts = [scene((span(0, 40), 0), (span(40, 60), 0), (span(60, 100), 1)), scene((span(0, 50), 0))]
    preds = [
        scene((span(0, 30), 0), (span(35, 60), 0), (span(50, 80), 1)),
        scene((span(0, 50), 1)),
    ]
    out = s3dis_coverage(preds, [dict(g) for g in gts], num_classes=3, class_names=["a", "b", "c"])
    a, b, c = out["per_class"]["a"], out["per_class"]["b"], out["per_class"]["c"]
    assert a["Cov"] == pytest.approx((0.775 + 0.0) / 2)
    assert a["WCov"] == pytest.approx((46 / 60 + 0.0) / 2)
    assert (a["Prec"], a["Rec"], a["num_tp"], a["num_pred"], a["num_gt"]) == (1.0, 2 / 3, 2, 2, 3)
    assert (b["Cov"], b["WCov"]) == pytest.approx((0.4, 0.4))
    assert (b["Prec"], b["Rec"], b["num_pred"]) == (0.0, 0.0, 2)
    assert all(math.isnan(c[k]) for k in ("Cov", "WCov", "Prec", "Rec"))  # no GT, no predictions
    assert out["mCov"] == pytest.approx((0.3875 + 0.4) / 2)
    assert out["mWCov"] == pytest.approx((23 / 60 + 0.4) / 2)
    assert out["mPrec"] == pytest.approx(0.5)
    assert out["mRec"] == pytest.approx(1 / 3)
    # torch tensors give the same numbers
    to_t = [{k: torch.from_numpy(v) for k, v in s.items()} for s in preds]
    assert s3dis_coverage(to_t, gts, num_classes=3)["mCov"] == pytest.approx(out["mCov"])


def test_coverage_threshold_is_inclusive_and_matching_not_one_to_one() -> None:
    gts = [scene((span(0, 40), 0))]
    out = s3dis_coverage([scene((span(0, 20), 0))], gts, num_classes=1)  # IoU exactly 0.5
    assert out["mPrec"] == 1.0 and out["mRec"] == 1.0 and out["mCov"] == 0.5
    # Two predictions overlapping one GT (IoU 0.75 each) are both TPs, as in the published
    # script (recall = TP predictions / GT), so recall exceeds 1.
    out = s3dis_coverage([scene((span(0, 30), 0), (span(10, 40), 0))], gts, num_classes=1)
    assert out["mPrec"] == 1.0 and out["mRec"] == 2.0 and out["mCov"] == 0.75


def test_coverage_class_without_predictions_and_empty_inputs() -> None:
    gts = [scene((span(0, 40), 0), (span(40, 80), 1))]
    out = s3dis_coverage([scene((span(0, 40), 0))], gts, num_classes=2)
    one = out["per_class"][1]
    assert (one["Cov"], one["WCov"], one["Prec"], one["Rec"]) == (0.0, 0.0, 0.0, 0.0)
    assert out["mCov"] == 0.5 and out["mPrec"] == 0.5 and out["mRec"] == 0.5
    none = s3dis_coverage([scene()], [scene()], num_classes=2)
    assert all(math.isnan(none[k]) for k in ("mCov", "mWCov", "mPrec", "mRec"))
    assert math.isnan(s3dis_coverage([], [], num_classes=2)["mCov"])


def test_coverage_min_region_size_and_errors() -> None:
    gts = [scene((span(0, 40), 0), (span(40, 45), 0))]
    preds = [scene((span(0, 40), 0), (span(40, 45), 0))]
    out = s3dis_coverage(preds, gts, num_classes=1, min_region_size=10)
    assert out["mCov"] == 1.0 and out["per_class"][0]["num_gt"] == 1
    assert out["mPrec"] == 0.5  # the prediction on the ignored small GT is a false positive
    with pytest.raises(DataError, match="cover 50 points"):
        s3dis_coverage([{"masks": np.ones((1, 50), bool), "labels": [0]}], gts, num_classes=1)
    with pytest.raises(DataError, match="0 rooms but ground truth for 1"):
        s3dis_coverage([], gts, num_classes=1)
    with pytest.raises(ValueError, match="iou_threshold"):
        s3dis_coverage(preds, gts, num_classes=1, iou_threshold=0.0)


def test_eval_sample_feeds_coverage(cache: Path) -> None:
    """Perfect predictions on voxels, mapped with eval_index, score Cov <= 1 on the full room."""
    ds = rooms_ds(cache, False, voxel_size=VOXEL)
    preds, gts = [], []
    for i in range(len(ds)):
        s = ds[i]
        preds.append({"masks": s["masks"][:, s["eval_index"]], "labels": s["labels"]})
        gts.append({"masks": s["eval_masks"], "labels": s["eval_labels"]})
    out = s3dis_coverage(preds, gts, num_classes=len(S3DIS_CLASSES))
    assert 0.5 < out["mCov"] <= 1.0
