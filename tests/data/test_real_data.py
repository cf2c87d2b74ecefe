"""Real-format datasets end to end: one training epoch of `python -m ifsearch.train` on a tiny
S3DIS tree and on tiny COCO-format images, and the errors for missing data."""

import json
import subprocess
import sys

import pytest
from test_s3dis import make_tree

from ifsearch.data.make_synthetic_coco import make_synthetic_coco

TINY_MODEL = ["--set", "model.embed_dim=16", "--set", "model.ffn_dim=32", "--set",
              "model.num_heads=2", "--set", "model.decoder_layers=2", "--set", "train.epochs=1",
              "--set", "train.num_threads=2"]


def train_cli(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "ifsearch.train", "--output-dir", str(tmp_path / "run"),
         *TINY_MODEL, *args],
        capture_output=True, text=True, timeout=300,
    )


def last_metrics(tmp_path):
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["influencer", "hungarian"])
def test_one_epoch_on_tiny_s3dis(tmp_path, loss):
    make_tree(tmp_path / "s3dis")
    root = tmp_path / "s3dis"
    run = train_cli(tmp_path, "--set", "data.name=s3dis", "--set", f"data.root={root}",
                    "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.voxel_size=0.1",
                    "--set", "data.block_size=2.0", "--set", "data.num_points=256",
                    "--set", "data.batch_size=2", "--set", "data.train_scenes=0",
                    "--set", "model.num_queries=8",
                    "--set", f"loss.name={loss}", "--set", "eval.min_region_size=5")
    assert run.returncode == 0, run.stderr + run.stdout
    assert "s3dis cache" in run.stdout  # conversion progress is shown
    assert list((tmp_path / "cache").glob("*.h5"))
    m = last_metrics(tmp_path)
    assert m["epoch"] == 1 and m["steps_per_epoch"] == 1  # 2 training rooms (Area 1), batch 2
    for key in ("AP", "AP50", "AP25", "mCov", "mWCov", "mPrec", "mRec", "val_loss"):
        assert key in m and m[key] == m[key], key  # present and not NaN
    assert "AP75" not in m


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["influencer", "hungarian"])
def test_one_epoch_on_tiny_coco(tmp_path, loss):
    root = make_synthetic_coco(tmp_path / "coco", train_images=4, val_images=2, image_size=64)
    run = train_cli(tmp_path, "--set", "data.name=coco", "--set", f"data.root={root}",
                    "--set", "data.image_size=64", "--set", "data.batch_size=2",
                    "--set", "data.train_scenes=0", "--set", "data.val_scenes=0",
                    "--set", "model.num_queries=6", "--set", "model.backbone_channels=[8, 16, 16]",
                    "--set", f"loss.name={loss}")
    assert run.returncode == 0, run.stderr + run.stdout
    m = last_metrics(tmp_path)
    assert m["epoch"] == 1 and m["steps_per_epoch"] == 2
    for key in ("AP", "AP50", "AP75", "val_loss", "duplicate_rate"):
        assert key in m and 0 <= m[key] == m[key], key
    assert {"APs", "APm", "APl"} <= m.keys() and "AP25" not in m


@pytest.mark.parametrize("name, hint", [("s3dis", "buildingparser.stanford.edu"),
                                        ("coco", "cocodataset.org")])
def test_missing_dataset_says_where_to_download(tmp_path, name, hint):
    missing = tmp_path / "nowhere"
    run = train_cli(tmp_path, "--set", f"data.name={name}", "--set", f"data.root={missing}")
    assert run.returncode == 2
    assert str(missing) in run.stderr and hint in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_launcher_checks_the_dataset_before_starting_ray(tmp_path):
    missing = tmp_path / "nowhere"
    run = subprocess.run(
        [sys.executable, "-m", "ifsearch.launch", "--space", "search_spaces/influencer_coco.yaml",
         "--set", f"data.root={missing}", "--mlflow-uri", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2
    assert str(missing) in run.stderr and "make_synthetic_coco" in run.stderr, run.stderr
    assert "ray" not in run.stdout.lower()
