"""Single-run training end to end: learning happens, checkpoints resume, the CLI works."""

import json
import subprocess
import sys
import threading

import pytest
import torch
from torch.utils.data import DataLoader

from ifsearch.config import config_from_dict, load_config
from ifsearch.data import collate_scenes
from ifsearch.errors import CheckpointError, DivergenceError
from ifsearch.losses import build_criterion
from ifsearch.train import build_datasets, build_model, evaluate, train_loop

TINY = {
    "data": {"num_points": 384, "train_scenes": 24, "val_scenes": 8, "max_instances": 4,
             "batch_size": 4},
    "model": {"embed_dim": 32, "num_queries": 8, "decoder_layers": 2, "ffn_dim": 64},
    "train": {"epochs": 20, "lr": 3e-3, "warmup_epochs": 0.5, "num_threads": 2},
}


def tiny_config(tmp_path, **sections):
    raw = {section: dict(values) for section, values in TINY.items()}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    raw["train"]["output_dir"] = str(tmp_path / "run")
    return config_from_dict(raw, source="test")


def initial_metrics(config):
    """Val metrics of the untrained model the run starts from (same seed, same weights)."""
    _, val_set = build_datasets(config)
    loader = DataLoader(val_set, batch_size=config.data.batch_size, collate_fn=collate_scenes)
    num_classes = len(val_set.class_names)
    criterion = build_criterion(config.loss, num_classes=num_classes)
    return evaluate(build_model(config, num_classes), criterion, loader, config,
                    torch.device("cpu"))


def read_metrics(config):
    path = config.train.output_dir + "/metrics.jsonl"
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["influencer", "hungarian"])
def test_training_lowers_loss_and_raises_ap50(tmp_path, loss):
    config = tiny_config(tmp_path, loss={"name": loss})
    before = initial_metrics(config)
    final = train_loop(config)
    history = read_metrics(config)
    assert [m["epoch"] for m in history] == list(range(1, 21))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert final["val_loss"] < before["val_loss"]
    assert final["AP50"] > before["AP50"] + 0.05
    for key in ("AP", "AP25", "duplicate_rate", "unclaimed_rate", "active_queries",
                "points_per_second", "lr"):
        assert key in final


@pytest.mark.slow
def test_resume_continues_epoch_count(tmp_path):
    config = tiny_config(tmp_path, train={"epochs": 2})
    reported = []
    train_loop(config, report=lambda metrics, ckpt: reported.append((metrics["epoch"], ckpt)))
    assert [epoch for epoch, _ in reported] == [1, 2]
    assert reported[-1][1].exists()
    weights_after_2 = torch.load(reported[-1][1], weights_only=False)["model"]

    config.train.epochs = 3  # a longer schedule; the checkpoint's model/data still match
    reported.clear()
    train_loop(config, report=lambda metrics, ckpt: reported.append((metrics["epoch"], ckpt)))
    assert [epoch for epoch, _ in reported] == [3]
    assert [m["epoch"] for m in read_metrics(config)] == [1, 2, 3]
    resumed = torch.load(reported[-1][1], weights_only=False)
    assert resumed["epoch"] == 3
    assert any(not torch.equal(weights_after_2[k], resumed["model"][k]) for k in weights_after_2)

    # Finished runs return their last metrics without training again.
    assert train_loop(config)["epoch"] == 3


def test_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    config = tiny_config(tmp_path, train={"epochs": 1})
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"checkpoint.*checkpoint\.pt.*cannot be read"):
        train_loop(config)


@pytest.mark.slow
def test_checkpoint_from_other_model_is_refused(tmp_path):
    config = tiny_config(tmp_path, train={"epochs": 1})
    train_loop(config)
    other = tiny_config(tmp_path, model={"num_queries": 6}, train={"epochs": 2})
    with pytest.raises(CheckpointError, match="different 'model' config"):
        train_loop(other)


def test_same_seed_same_model_and_data(tmp_path):
    a, b = tiny_config(tmp_path), tiny_config(tmp_path)
    for pa, pb in zip(build_model(a, 4).parameters(), build_model(b, 4).parameters()):
        assert torch.equal(pa, pb)
    assert torch.equal(build_datasets(a)[0][3]["points"], build_datasets(b)[0][3]["points"])


@pytest.mark.slow
def test_cli_trains_writes_and_prints_epochs(tmp_path):
    config_file = tmp_path / "cfg.yaml"
    cmd = [sys.executable, "-m", "ifsearch.train", "--print-config",
           "--set", "train.epochs=1", "--set", "data.num_points=256",
           "--set", "data.train_scenes=4", "--set", "data.val_scenes=2"]
    printed = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    config_file.write_text(printed)
    assert load_config(config_file).train.epochs == 1

    out = tmp_path / "cli_run"
    run = subprocess.run(
        [sys.executable, "-m", "ifsearch.train", "--config", str(config_file),
         "--output-dir", str(out), "--set", "loss.name=hungarian"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "epoch   1/1" in run.stdout and "AP50" in run.stdout
    assert (out / "checkpoint.pt").exists() and (out / "metrics.jsonl").exists()
    assert load_config(out / "config.yaml").loss.name == "hungarian"


def test_cli_reports_bad_override_without_traceback(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "ifsearch.train", "--set", "loss.temprature=0.5"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2
    assert "loss.temprature: unknown key" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.slow  # trains a tiny model for several epochs
def test_divergence_stops_the_run_with_the_reason(tmp_path):
    config = tiny_config(tmp_path, train={"lr": 1e30, "epochs": 2, "warmup_epochs": 0.0})
    reason = (r"training diverged: the loss is not finite at epoch 1, step \d+ "
              r"\(learning rate [0-9.e+]+; non-finite terms: loss_")
    with pytest.raises(DivergenceError, match=reason):
        train_loop(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no garbage epoch was recorded


@pytest.mark.slow  # trains a tiny model for several epochs
def test_fresh_run_replaces_the_metrics_of_an_earlier_one(tmp_path):
    config = tiny_config(tmp_path, train={"epochs": 1, "resume": False},
                         data={"train_scenes": 4, "val_scenes": 2})
    train_loop(config)
    train_loop(config)  # resume=false into the same folder: starts over
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]


def _epoch_on_disk(run_dir):
    path = run_dir / "checkpoint.pt"
    return torch.load(path, weights_only=False)["epoch"] if path.exists() else None


@pytest.mark.slow  # trains a tiny model for several epochs
def test_checkpoints_every_n_epochs_at_the_given_epochs_and_the_last(tmp_path):
    """checkpoint_every=3 over 7 epochs, rung at 2: saved after epochs 2, 3, 6 and 7 only. The
    file on disk (not the loop's own bookkeeping) says which epoch it holds after each one."""
    config = tiny_config(tmp_path, train={"epochs": 7, "checkpoint_every": 3},
                         data={"train_scenes": 4, "val_scenes": 2})
    seen = []  # (epoch, checkpoint path passed to report, epoch stored in the file on disk)
    train_loop(config, report=lambda m, ckpt: seen.append(
        (m["epoch"], ckpt, _epoch_on_disk(tmp_path / "run"))), checkpoint_epochs=[2])
    assert [e for e, ckpt, _ in seen if ckpt is not None] == [2, 3, 6, 7]
    assert [on_disk for _, _, on_disk in seen] == [None, 2, 3, 3, 3, 6, 7]


def test_a_stop_event_ends_the_run_at_its_next_step(tmp_path):
    """The event is set while epoch 1 is reported (the report runs on the training thread, as
    a kept Ray worker's stop would arrive from another): the loop returns epoch 1's metrics at
    the first step of epoch 2, reporting and writing nothing more."""
    config = tiny_config(tmp_path, train={"epochs": 5}, data={"train_scenes": 4, "val_scenes": 2})
    stop, seen = threading.Event(), []

    def report(metrics, checkpoint):
        seen.append(metrics["epoch"])
        stop.set()

    final = train_loop(config, report=report, stop=stop)
    assert seen == [1]
    assert final["epoch"] == 1
    assert [m["epoch"] for m in read_metrics(config)] == [1]


@pytest.mark.slow  # trains a tiny model for several epochs
def test_resume_from_a_sparse_checkpoint_redoes_the_epochs_after_it(tmp_path):
    """A run dies after epoch 3 with its last checkpoint at epoch 2: the resumed run starts at
    epoch 3, and the metrics file lists every epoch once."""
    config = tiny_config(tmp_path, train={"epochs": 4, "checkpoint_every": 2},
                         data={"train_scenes": 4, "val_scenes": 2})

    def die_after_3(metrics, checkpoint):
        if metrics["epoch"] == 3:
            raise KeyboardInterrupt  # the process is killed

    with pytest.raises(KeyboardInterrupt):
        train_loop(config, report=die_after_3)
    assert _epoch_on_disk(tmp_path / "run") == 2
    assert [m["epoch"] for m in read_metrics(config)] == [1, 2, 3]

    resumed = []
    final = train_loop(config, report=lambda m, ckpt: resumed.append(m))
    assert [m["epoch"] for m in resumed] == [3, 4]
    assert final["start_epoch"] == 3
    assert [m["epoch"] for m in read_metrics(config)] == [1, 2, 3, 4]
    assert _epoch_on_disk(tmp_path / "run") == 4
