"""Each Ray Train worker: rebuild the config, restore the latest checkpoint, run ``train_loop``."""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path

from ifsearch.config import config_from_dict
from ifsearch.train import CHECKPOINT_NAME, METRICS_NAME, train_loop
from trainables import ray_report


def train_fn_per_worker(train_loop_config: dict) -> None:
    """Run the plain training loop on this worker; DDP is already initialised by Ray Train.

    Args:
        train_loop_config: ``{"config": <nested config dict>, "trial_id": str,
            "mlflow": TrialSettings.mlflow}``.
    """
    config = config_from_dict(train_loop_config["config"], source="trial config")
    rank = ray_report.worker_rank()
    # Each worker trains in a scratch directory, removed at the end; Ray's storage keeps the
    # checkpoints (report copies them there).
    prefix = f"ifsearch_{train_loop_config['trial_id']}_r{rank}_"
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        output_dir = Path(scratch)
        config.train.output_dir = str(output_dir)
        config.train.resume = ray_report.restore_latest_checkpoint(
            output_dir, (CHECKPOINT_NAME, METRICS_NAME)
        )

        location = ray_report.worker_location()

        def report(metrics: dict, checkpoint: Path | None) -> None:
            files = [checkpoint, output_dir / METRICS_NAME] if checkpoint else None
            ray_report.report_epoch({**metrics, **location}, files)

        # Rank 0's node is where the trial trains: its CPU/GPU/memory go into the trial's run.
        monitor = nullcontext()
        if rank == 0 and train_loop_config.get("mlflow"):
            from ifsearch.tracking import system_metrics  # MLflow costs ~0.9 s CPU: rank 0 only

            monitor = system_metrics(train_loop_config["mlflow"], train_loop_config["trial_id"])
        with monitor:
            train_loop(config, report=report)
