"""Each Ray Train worker: rebuild the config, restore the latest checkpoint, run ``train_loop``.

A diverging trial fails once, without retries. Ray has no per-exception retry filter: Train V2
restarts the worker group on any worker error (``FailureConfig.max_failures``) and Tune restarts
the trial on any trial error (its own ``max_failures``), and each retry would resume the same
checkpoint and reproduce the same NaN. So ``DivergenceError`` is not raised through Ray: the
workers catch it and end the run normally with one last result that says so:

- ``diverged: True`` and ``error: "DivergenceError: <reason>"``: the MLflow logger marks the run
  FAILED with the reason in its ``ifsearch.error`` tag, and ifsearch's searcher tells Optuna
  FAIL (Ray's stock ``OptunaSearch`` cannot: it tells COMPLETE with NaN, which Optuna refuses
  with a logged warning, leaving the Optuna trial RUNNING);
- every metric Tune requires in a result (the searcher's and the scheduler's, passed in as
  ``required_metrics``) set to NaN, so Tune's strict metric check passes and nothing can rank
  the trial (``get_best_result(filter_nan_and_inf=True)``, the median rule, ASHA's NaN-aware
  percentile);
- ``epoch`` = the last completed epoch: no progress, so ASHA records no new rung value (the
  trial's rungs up to that epoch are already recorded) and the MLflow logger logs no step for
  the bad epoch.

Tune then shows the trial TERMINATED (not ERROR) with that last result. Every other error (a
killed worker, a bug) still propagates and keeps Train's and Tune's retries.

Ranks agree on divergence: ``train_loop`` checks the group's mean loss (one all-reduce, no extra
host sync), so all ranks raise at the same step and each makes the same final report, which Ray
requires of every rank.
"""

from __future__ import annotations

import math
import tempfile
from contextlib import nullcontext
from pathlib import Path

from ifsearch.config import config_from_dict
from ifsearch.errors import DivergenceError
from ifsearch.train import CHECKPOINT_NAME, METRICS_NAME, train_loop
from trainables import ray_report, startup
from trainables.worker_pool import RUN_STOP


def train_fn_per_worker(train_loop_config: dict) -> None:
    """Run the plain training loop on this worker; DDP is already initialised by Ray Train.

    Args:
        train_loop_config: ``{"config": <nested config dict>, "checkpoint_epochs": [epochs
            that always save a checkpoint: the scheduler's rungs], "mlflow":
            TrialSettings.mlflow, "required_metrics": [result keys Tune requires]}``; from a
            Tune trial also ``"trial_id"`` and ``"startup_marks"`` ({mark: time} taken before
            this worker).
    """
    RUN_STOP.clear()  # set when this process's last run was abandoned (trainables/worker_pool.py)
    # Start-up marks (trainables/startup.py) ride along with this process's first report.
    marks = {**train_loop_config.get("startup_marks", {}), "worker_fn_start": startup.now()}
    config = config_from_dict(train_loop_config["config"], source="trial config")
    rank = ray_report.worker_rank()
    # Each worker trains in a scratch directory, removed at the end; Ray's storage keeps the
    # checkpoints (report copies them there).
    prefix = f"ifsearch_{train_loop_config.get('trial_id', 'run')}_r{rank}_"
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        output_dir = Path(scratch)
        config.train.output_dir = str(output_dir)
        config.train.resume = ray_report.restore_latest_checkpoint(
            output_dir, (CHECKPOINT_NAME, METRICS_NAME)
        )

        location = ray_report.worker_location()

        def on_phase(name: str) -> None:
            marks[f"{name}_built"] = startup.now()

        reported = []  # epochs this process reported

        def report(metrics: dict, checkpoint: Path | None) -> None:
            if RUN_STOP.is_set():  # abandoned: its controller is gone, nobody takes reports
                return
            reported.append(metrics["epoch"])
            first = {}
            if marks:
                first = startup.as_metrics({**marks, "report_call": startup.now()})
                marks.clear()
            # The checkpoint, the metrics file and the config of output_dir: one copy by Ray.
            ray_report.report_epoch({**metrics, **location, **first},
                                    output_dir if checkpoint else None)

        # Rank 0's node is where the trial trains: its CPU/GPU/memory go into the trial's run.
        monitor = nullcontext()
        if rank == 0 and train_loop_config.get("mlflow"):
            # MLflow costs ~0.9 s CPU: imported by rank 0 only
            from ifsearch.tracking.runs import system_metrics

            monitor = system_metrics(train_loop_config["mlflow"], train_loop_config["trial_id"])
        with monitor:
            try:
                final = train_loop(config, report=report, on_phase=on_phase,
                                   checkpoint_epochs=train_loop_config.get("checkpoint_epochs", ()),
                                   stop=RUN_STOP)
            except DivergenceError as exc:  # not retried: see the module docstring
                result = divergence_result(exc, train_loop_config.get("required_metrics", ()))
                ray_report.report_epoch({**result, **location}, None)
            else:
                if not reported and final and not RUN_STOP.is_set():
                    ray_report.report_epoch(replayed_result(final) | location, None)


def replayed_result(final: dict) -> dict:
    """The result of a resumed run that had nothing left to train: its last epoch, again.

    A run's last epoch can end while the sweep is being interrupted, checkpointed but never
    received by Tune; the resumed trial then restores that checkpoint and trains nothing. Its
    last epoch is reported once more so that Tune, the searcher (which told Optuna only the
    epochs it received) and MLflow get the trial's final result. ``start_epoch`` = that epoch
    marks it as the first result of a resumed process, so the MLflow logger logs the earlier
    epochs it lacks from the checkpoint; ``replayed`` (ifsearch.tracking.runs.REPLAYED) tells it to
    skip the epoch itself if it was logged already, as the searcher skips epochs it has seen.
    """
    return {**final, "start_epoch": final["epoch"], "replayed": True}


def divergence_result(exc: DivergenceError, required_metrics) -> dict:
    """The final result of a diverged trial: flagged, with the reason, ranking nowhere."""
    return {
        **{name: math.nan for name in required_metrics},
        "epoch": max((exc.epoch or 1) - 1, 0),  # the last completed epoch
        "diverged": True,  # ifsearch.tracking.runs.DIVERGED; the searcher tells Optuna FAIL
        "error": f"DivergenceError: {exc}",
    }
