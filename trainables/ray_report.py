"""The one adapter between ifsearch and Ray's report/checkpoint/context API (Ray 2.60, Train V2)."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import ray
import ray.train
import ray.tune


def worker_rank() -> int:
    """This Ray Train worker's global rank."""
    return ray.train.get_context().get_world_rank()


def worker_location() -> dict[str, str]:
    """Where this worker runs: its Ray node id and host name (tagged on the trial's MLflow run)."""
    return {"worker_node_id": ray.get_runtime_context().get_node_id(),
            "worker_host": socket.gethostname()}


def restore_latest_checkpoint(output_dir: Path, file_names: tuple[str, ...]) -> bool:
    """Copy the run's latest Ray Train checkpoint files into ``output_dir``; False if none.

    Ray hands a restarted worker group (or a restarted trial whose Train run has the same name)
    the last reported checkpoint; ``train_loop`` then resumes from the copied files.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as directory:
        for name in file_names:
            source = Path(directory) / name
            if source.exists():
                shutil.copy2(source, output_dir / name)
    return True


def report_epoch(metrics: dict, files: list[Path] | None) -> None:
    """Report one epoch from a worker: metrics always, a checkpoint of ``files`` when given.

    Every worker must call this equally often (it is a barrier); rank 0 passes the files.
    """
    if not files:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as staging:
        for path in files:
            shutil.copy2(path, Path(staging) / path.name)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging))


def trial_id() -> str:
    """The Tune trial id of the calling trial driver."""
    return ray.tune.get_context().get_trial_id()
