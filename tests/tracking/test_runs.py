"""Trial-run bookkeeping that needs no MLflow server."""

from ifsearch.tracking.runs import error_reason

RAY_ERROR = """Failure # 1 (occurred at 2026-11-21_02-30-00)
ray::_Inner.train() (pid=1, ip=127.0.0.1)
  File "trainable.py", line 331, in train
    raise skipped from exception_cause(skipped)
ray.train.WorkerGroupError: Training failed due to worker errors:
[Rank 0]
Traceback (most recent call last):
  File "ifsearch/train.py", line 256, in train_loop
    raise _divergence(parts, epoch, step, scheduler.get_last_lr()[0])
ifsearch.errors.DivergenceError: training diverged: the loss is not finite at epoch 3, step 2
"""


def test_error_reason_prefers_the_ifsearch_error(tmp_path):
    path = tmp_path / "error.txt"
    path.write_text(RAY_ERROR)
    assert error_reason(str(path)) == ("ifsearch.errors.DivergenceError: training diverged: the "
                                       "loss is not finite at epoch 3, step 2")
    path.write_text(RAY_ERROR.split("[Rank 0]")[0])
    assert error_reason(str(path)).startswith("ray.train.WorkerGroupError: Training failed")
    assert error_reason(str(tmp_path / "missing.txt")) == "unknown (no error file)"


def test_epochs_a_restart_skipped_are_logged_once_and_in_order(tmp_path):
    """Train checkpointed epochs 2 and 3 but Tune only received epoch 1 before the sweep was
    interrupted; the resumed process starts at 4. Its first result brings 2 and 3 from its
    checkpoint, logged just before 4; epoch 1 is not logged again."""
    import json

    from mlflow.tracking import MlflowClient

    from ifsearch.tracking.runs import RunWriter, _epochs_before_restart

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    lines = [{"epoch": e, "val_loss": 10.0 - e, "epoch_seconds": 1.0, "start_epoch": 1}
             for e in (1, 2, 3)] + [{"epoch": 4, "val_loss": 6.0, "epoch_seconds": 1.0,
                                     "start_epoch": 4}]
    (checkpoint / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = {**lines[-1], "checkpoint_path": str(checkpoint), "trial_id": "t"}
    backfill = _epochs_before_restart(result)
    assert [e["step"] for e in backfill] == [1, 2, 3]
    assert _epochs_before_restart({**result, "start_epoch": 1}) == []  # not a resumed process
    assert _epochs_before_restart({**result, "epoch": 5}) == []  # not its first result

    writer = RunWriter(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), "exp")
    base = {"kind": "result", "sweep": "s", "trial_id": "t"}
    writer.apply({**base, "step": 1, "timestamp": 1000, "metrics": {"val_loss": 9.0,
                                                                     "epoch_seconds": 1.0}})
    writer.apply({**base, "step": 4, "timestamp": 5000, "backfill": backfill,
                  "metrics": {"val_loss": 6.0, "epoch_seconds": 1.0}})
    history = writer.client.get_metric_history(writer.runs["t"], "val_loss")
    in_time = sorted(history, key=lambda m: m.timestamp)
    assert [(m.step, m.value) for m in in_time] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]


def test_a_replayed_last_epoch_is_logged_once(tmp_path):
    """A run whose last epoch ended during an interrupt is resumed with nothing left to train:
    the worker reports that epoch again (trainables/worker.py replayed_result). MLflow gets it
    once: logged when it lacks it (with the earlier epochs it lacks), skipped when it has it."""
    import json

    from mlflow.tracking import MlflowClient

    from ifsearch.tracking.runs import REPLAYED, RunWriter, _epochs_before_restart
    from trainables.worker import replayed_result

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    lines = [{"epoch": e, "val_loss": 10.0 - e, "epoch_seconds": 1.0, "start_epoch": 1}
             for e in (1, 2, 3)]
    (checkpoint / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = {**replayed_result(lines[-1]), "checkpoint_path": str(checkpoint)}
    assert result["epoch"] == result["start_epoch"] == 3 and result[REPLAYED]
    backfill = _epochs_before_restart(result)
    assert [e["step"] for e in backfill] == [1, 2]

    writer = RunWriter(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), "exp")
    base = {"kind": "result", "sweep": "s", "trial_id": "t"}
    replay = {**base, "step": 3, "timestamp": 9000, "backfill": backfill, REPLAYED: True,
              "metrics": {"val_loss": 7.5, "epoch_seconds": 1.0}}
    writer.apply({**base, "step": 1, "timestamp": 1000, "metrics": {"val_loss": 9.0,
                                                                     "epoch_seconds": 1.0}})
    writer.apply(replay)  # MLflow lacks 2 and 3: both logged, 2 from the checkpoint
    writer.apply({**base, "trial_id": "u", "step": 3, "timestamp": 1000,
                  "metrics": {"val_loss": 7.0, "epoch_seconds": 1.0}})
    writer.apply({**replay, "trial_id": "u", "backfill": []})  # MLflow has 3: not again

    def steps(trial):
        history = writer.client.get_metric_history(writer.runs[trial], "val_loss")
        return sorted((m.step, m.value) for m in history)

    assert steps("t") == [(1, 9.0), (2, 8.0), (3, 7.5)]
    assert steps("u") == [(3, 7.0)]
