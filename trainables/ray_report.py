"""The one adapter between ifsearch and Ray's report/checkpoint/context API (Ray 2.60, Train V2).

Besides reporting, it holds the hooks that time a trial's start-up (``trainables/startup.py``
says what each mark means): a Train controller callback, a ``TuneReportCallback`` that forwards
the controller's marks, and a Tune callback that turns all marks into phases. Two of them
subclass Ray Train's internal callback classes (``ray.train.v2._internal``): Ray's own docs say
``RunConfig.callbacks`` accepts them "for custom workarounds", and they may move in a later Ray.
"""

from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path

import ray
import ray.train
import ray.tune
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from trainables import startup


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


def report_epoch(metrics: dict, checkpoint_dir: Path | None) -> None:
    """Report one epoch from a worker, with ``checkpoint_dir`` as a checkpoint when given.

    Every worker must call this equally often (it is a barrier); rank 0 passes the directory on
    the epochs that saved a checkpoint. Ray copies that directory into the run's storage once
    (nothing is staged). Epochs without a checkpoint still name the run's latest one as
    ``checkpoint_path``, as Tune's forwarding does for epochs with one, so a trial's last
    result always says which checkpoint its weights are in.
    """
    if checkpoint_dir is None:
        latest = ray.train.get_checkpoint()
        ray.train.report({**metrics, **({CHECKPOINT_PATH_KEY: latest.path} if latest else {})})
        return
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))


def trial_id() -> str:
    """The Tune trial id of the calling trial driver."""
    return ray.tune.get_context().get_trial_id()


def trial_stop_event() -> threading.Event:
    """Set when Tune stops the calling trial (its scheduler, the end of the sweep, or before it
    reuses the trial's actor): the stop event of Tune's function-trainable session, which has
    no public accessor (``ray.train._internal.session``). A new one comes with each trial."""
    from ray.train._internal.session import get_session

    return get_session().stop_event


class ControllerMarks(ControllerCallback, WorkerGroupCallback):
    """Train controller hooks: mark the controller's start, its workers being up and its
    worker group's start hooks being done.

    The marks go to ``startup.CONTROLLER_MARKS`` (this controller's process), where the backend
    adds its own and ``StartupReportCallback`` picks them up.
    """

    def after_controller_start(self, train_run_context) -> None:
        startup.CONTROLLER_MARKS["controller_start"] = startup.now()

    def before_init_train_context(self, workers) -> dict:
        startup.CONTROLLER_MARKS["workers_up"] = startup.now()
        return {}

    def after_worker_group_start(self, worker_group) -> None:
        # Ray runs its own hooks first (backend set-up, placement-group cleaner): ours is last.
        startup.CONTROLLER_MARKS["group_started"] = startup.now()


class StartupReportCallback(TuneReportCallback):
    """``TuneReportCallback`` that adds the controller's start-up marks to its first report."""

    def __init__(self) -> None:
        super().__init__()
        self._marks_sent = False

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if not self._marks_sent and metrics:
            self._marks_sent = True
            metrics = [{**metrics[0], **startup.as_metrics(startup.CONTROLLER_MARKS)},
                       *metrics[1:]]
        super().after_report(run_context=run_context, metrics=metrics, checkpoint=checkpoint)


class StartupPhases(ray.tune.Callback):
    """Tune callback: marks a trial's creation, and turns the marks of its first result into
    ``startup_<phase>_s`` metrics (the raw marks are removed from every result).

    A trial is created when a slot is free (the searcher's concurrency limit), so its creation
    is where its start-up begins; Tune has no callback for it, so the end of the controller step
    that first lists a trial marks it (or its start, if that comes first). Ray lets callbacks
    edit a result in place; this one must come before the loggers in ``RunConfig.callbacks``.
    A trial restarted after a failure keeps the phases of its first run.
    """

    def __init__(self) -> None:
        self._created: dict[str, float] = {}  # trial id -> when Tune created it
        self._done: set[str] = set()  # trials whose phases were reported

    def _mark(self, trial_id: str) -> None:
        if trial_id not in self._done:
            self._created.setdefault(trial_id, startup.now())

    def on_step_end(self, iteration, trials, **info) -> None:
        for trial in trials:
            self._mark(trial.trial_id)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._mark(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        received = startup.now()
        marks = startup.pop_marks(result)
        created = self._created.pop(trial.trial_id, None)
        if not marks or created is None:
            return
        self._done.add(trial.trial_id)
        marks.update(tune_add=created, tune_result=received)
        result.update(startup.phases(marks, float(result.get("epoch_seconds", 0.0))))
