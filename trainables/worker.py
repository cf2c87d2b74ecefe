"""Each Ray Train worker: rebuild the config, restore the latest checkpoint, run ``train_loop``."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ifsearch.config import config_from_dict
from ifsearch.train import CHECKPOINT_NAME, METRICS_NAME, train_loop
from trainables import ray_report, startup


def train_fn_per_worker(train_loop_config: dict) -> None:
    """Run the plain training loop on this worker; DDP is already initialised by Ray Train.

    Args:
        train_loop_config: ``{"config": <nested config dict>, "checkpoint_epochs": [epochs
            that always save a checkpoint: the scheduler's rungs]}``; from a Tune trial also
            ``"trial_id"`` and ``"startup_marks"`` ({mark: time} taken before this worker).
    """
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

        def report(metrics: dict, checkpoint: Path | None) -> None:
            first = {}
            if marks:
                first = startup.as_metrics({**marks, "report_call": startup.now()})
                marks.clear()
            # The checkpoint, the metrics file and the config of output_dir: one copy by Ray.
            ray_report.report_epoch({**metrics, **location, **first},
                                    output_dir if checkpoint else None)

        train_loop(config, report=report, on_phase=on_phase,
                   checkpoint_epochs=train_loop_config.get("checkpoint_epochs", ()))
