"""The one adapter between ifsearch and Ray's report/checkpoint/context API (Ray 2.60, Train V2).

Besides reporting, it holds the Train controller's side of a trial: ``ControllerThread`` runs
Ray's ``TrainController`` (as ``TrialController``) in the trial driver's process, with a mailbox
the driver reads (``Outbox``); the controller callbacks that fill the mailbox and say where the
workers' placement group is (``ReportToOutbox``, ``ControllerMarks``); the freeing of a dead
run's workers (``free_workers``, and ``FreeWorkersOfDeadTrials`` for the sweep); and the Tune
callback that turns a trial's start-up marks into phases (``trainables/startup.py`` says what
each mark means). ``TrialController`` and ``ControllerMarks`` subclass Ray Train's internal
classes (``ray.train.v2._internal``): Ray's own docs say ``RunConfig.callbacks`` accepts such
callbacks "for custom workarounds", and they may move in a later Ray.

Why a mailbox instead of Ray's ``TuneReportCallback``: that callback hands each report to Tune
through a ``ray.util.queue.Queue``, an actor: one more process per trial, started and importing
Ray while the trial's controller and workers start on the same cores (1.9 s of CPU per trial on
the 2-core benchmark machine), and a ``put`` that blocks the controller's event loop until Tune
takes the previous report, so a stopped trial's controller could not even be aborted. The
driver runs the controller: it takes the reports from the outbox and reports to Tune itself
(``trainables.driver.TrialTorchTrainer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import shutil
import socket
import threading
from pathlib import Path

import ray
import ray.train
import ray.tune
from ray._raylet import PlacementGroupID
from ray.experimental import internal_kv
from ray.train import Result
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2._internal.execution.controller.state import AbortedState
from ray.train.v2._internal.execution.worker_group import WorkerGroup
from ray.train.v2.api.callback import UserCallback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.util.placement_group import (
    PlacementGroup,
    placement_group_table,
    remove_placement_group,
)

from trainables import startup

logger = logging.getLogger(__name__)


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


def report_to_tune(report: dict) -> None:
    """Hand one report of the trial's Train run to Tune, from the trial driver's thread (where
    ``train_driver_fn`` runs). Blocks until Tune has taken it; when Tune stops the trial
    meanwhile, Tune ends the call with ``SystemExit``."""
    ray.tune.report(report)


def trial_stop_event() -> threading.Event:
    """Set when Tune stops the calling trial (its scheduler, the end of the sweep, or before it
    reuses the trial's actor): the stop event of Tune's function-trainable session, which has
    no public accessor (``ray.train._internal.session``). A new one comes with each trial."""
    from ray.train._internal.session import get_session

    return get_session().stop_event


class Outbox:
    """What a Train controller has for its trial's driver: the reports Tune has not had yet, and
    whether the run has ended.

    Filled on the controller's thread (``ReportToOutbox``, and ``ControllerThread`` closes it
    when the run ends); emptied on the driver's (``take``). Thread-safe: a queue.
    """

    _END = object()  # put by close(): nothing follows

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False  # the end was taken (read and written by the taking thread only)

    def put(self, report: dict) -> None:
        self._queue.put(report)

    def close(self) -> None:
        """The run has ended: nothing more will come."""
        self._queue.put(self._END)

    def take(self, wait_s: float) -> tuple[list[dict], bool]:
        """Every report not taken yet, waiting up to ``wait_s`` for one unless the run has
        ended; and whether the run has ended (then the reports returned are the last)."""
        items = []
        with contextlib.suppress(queue.Empty):
            if not self._closed:
                items.append(self._queue.get(timeout=wait_s))
            while True:
                items.append(self._queue.get_nowait())
        self._closed = self._closed or any(item is self._END for item in items)
        return [item for item in items if item is not self._END], self._closed


# The outbox of each Train run whose controller runs in this process, by the run's name: how
# ReportToOutbox, which Ray pickles along with the run's config, finds it.
OUTBOXES: dict[str, Outbox] = {}


class TrialWorkerGroup(WorkerGroup):
    """Ray's worker group, but its workers get no handle to their controller.

    Ray hands each worker its controller actor, which a worker calls only for
    ``ray.train.get_all_reported_checkpoints`` (ifsearch's workers do not); a controller that
    runs on a thread of the driver is no actor, and the driver may be none either (a benchmark,
    a test). ``_init_train_context_on_workers`` is otherwise Ray 2.60's own.
    """

    def _init_train_context_on_workers(self, workers, sync_actor, train_context_args) -> None:
        ray.get([
            worker.actor.init_train_context.remote(
                train_run_context=self._train_run_context,
                distributed_context=worker.distributed_context,
                synchronization_actor=sync_actor,
                storage_context=self._storage_context,
                worker_callbacks=self._worker_callbacks_to_propagate,
                controller_actor=None,
                **{arg: values[rank] for arg, values in train_context_args.items()},
            )
            for rank, worker in enumerate(workers)
        ])
        self._decorate_worker_log_file_paths(workers)


class TrialController(TrainController):
    """Ray's Train controller, run in the trial driver's process (``ControllerThread``) instead
    of an actor of its own: aborting it ends the run, not the process."""

    worker_group_cls = TrialWorkerGroup

    async def abort(self):
        # Ray 2.60's TrainController.abort but for its last step, ray.actor.exit_actor(): here
        # that would end the trial's actor, the process this controller runs in.
        if self.get_state().is_terminal():
            return
        self._controller_callback_manager.invoke_best_effort("before_controller_abort")
        try:
            if self._worker_group:
                self._worker_group.abort()
            self._set_state(AbortedState())
        except Exception:
            logger.exception("Could not abort the Train run's worker group")


class ControllerThread:
    """A trial's Train run: a ``TrialController`` on an asyncio loop of its own, in a thread of
    the calling process (the trial's driver), started on construction.

    Ray runs the controller as an actor, one more process per trial: ~1.9 s of a trial's
    start-up and ~2 s of CPU on the 2-core benchmark machine (docs/benchmarks.md, "Trial
    start-up"). Nothing in the controller needs a process of its own: it is an asyncio object
    that calls Ray's API (start the worker group, poll it, report, shut it down). Here the
    workers are owned by the driver, and die with it as they died with the controller; the
    reports reach the driver through an ``Outbox``; stopping the run cancels the controller's
    loop at its next ``await`` and aborts the worker group, instead of killing a process.

    One run per instance; the process may run other runs after it (Tune reuses trial actors).
    ``worker_group_cls``: the run's worker group (``TrialWorkerGroup``, or one that keeps its
    workers for the next run: ``trainables.worker_pool.KeptWorkerGroup``).
    """

    def __init__(self, run_name: str, controller_kwargs: dict,
                 worker_group_cls: type[WorkerGroup] = TrialWorkerGroup) -> None:
        self._worker_group_cls = worker_group_cls
        self.outbox = OUTBOXES[run_name] = Outbox()
        self._run_name = run_name
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._controller: TrialController | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(controller_kwargs,),
                                        name=f"train-controller-{run_name}", daemon=True)
        self._thread.start()

    def _main(self, controller_kwargs: dict) -> None:
        startup.CONTROLLER_MARKS.clear()
        try:
            self._loop.run_until_complete(self._run(controller_kwargs))
        except BaseException as error:  # noqa: BLE001 - handed to the driver by result()
            self._error = error
        finally:
            self._loop.close()
            OUTBOXES.pop(self._run_name, None)
            self.outbox.close()

    async def _run(self, controller_kwargs: dict) -> None:
        self._task = asyncio.current_task()
        if self._stopping:
            return
        self._controller = TrialController(**controller_kwargs)
        self._controller.worker_group_cls = self._worker_group_cls
        try:
            await self._controller.run()
        except asyncio.CancelledError:
            await self._controller.abort()

    def _cancel(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()

    def stop(self, wait_s: float) -> bool:
        """Abort the run: cancel the controller at its next ``await`` (starting a worker group
        blocks its loop for seconds) and abort its worker group. True once the run has ended,
        False if it is still going after ``wait_s`` seconds (it ends at that ``await``)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the run has ended
            self._loop.call_soon_threadsafe(self._cancel)
        self._thread.join(wait_s)
        return not self._thread.is_alive()

    def result(self) -> Result:
        """The ended run's result (``TrainController.get_result``); raises what ended the
        controller if it failed."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._controller.get_result()


def train_run_name(trial_id: str) -> str:
    """The name of a trial's Train run: the same for every attempt, so a restarted trial finds
    its run's latest checkpoint in storage."""
    return f"train_{trial_id}"


# Where a Train controller leaves its worker group's placement group: Ray's internal key-value
# store (the GCS; ray.experimental.internal_kv, not a public API), under the run's name.
_KV_NAMESPACE = "ifsearch"


def _placement_group_key(run_name: str) -> str:
    return f"placement_group:{run_name}"


def free_workers(run_name: str) -> None:
    """Free the placement group of the Train run's last worker group, whose controller is dead.

    A placement group belongs to the job, not to the controller that made it: it outlives the
    controller, and its CPUs stay reserved for the rest of the sweep unless someone removes it.
    The controller does when its run ends; after it was killed or died, this does (nothing
    happens if the group is gone already). Call it only once the controller is dead: a live one
    would start another worker group when it sees its workers die.
    """
    free_placement_group(_placement_group_key(run_name))


def remember_placement_group(key: str, group: PlacementGroup) -> None:
    """Note in Ray's key-value store that ``group`` is held under ``key``, for
    ``free_placement_group``."""
    internal_kv._internal_kv_put(key, group.id.hex(), namespace=_KV_NAMESPACE)


def forget_placement_group(key: str) -> None:
    """Its holder removed the group under ``key`` itself, or handed it on."""
    internal_kv._internal_kv_del(key, namespace=_KV_NAMESPACE)


def free_placement_group(key: str) -> None:
    """Remove the placement group noted under ``key`` (its actors die with it), if any."""
    group_id = internal_kv._internal_kv_get(key, namespace=_KV_NAMESPACE)
    if group_id is not None:
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group_id.decode())))
        forget_placement_group(key)


def placement_group_keys(prefix: str) -> list[str]:
    """The keys noted under ``prefix``."""
    return [key.decode() for key in internal_kv._internal_kv_list(prefix,
                                                                   namespace=_KV_NAMESPACE)]


class ControllerMarks(ControllerCallback, WorkerGroupCallback):
    """Train controller hooks: mark the controller's start, its workers being up and its
    worker group's start hooks being done; say where the worker group's placement group is.

    The marks go to ``startup.CONTROLLER_MARKS`` (in the driver, where the controller runs),
    where the backend adds its own and ``ReportToOutbox`` picks them up. The placement group's id goes to Ray's
    key-value store under the run's name, for ``free_workers``, until the controller removes
    the group itself.
    """

    _run_name = ""

    def after_controller_start(self, train_run_context) -> None:
        startup.CONTROLLER_MARKS["controller_start"] = startup.now()
        self._run_name = train_run_context.run_config.name

    def before_init_train_context(self, workers) -> dict:
        startup.CONTROLLER_MARKS["workers_up"] = startup.now()
        return {}

    def after_worker_group_start(self, worker_group) -> None:
        state = worker_group.get_worker_group_state()
        remember_placement_group(_placement_group_key(self._run_name),
                                 state.placement_group_handle.placement_group)
        # Ray runs its own hooks first (the backend set-up): ours is last.
        startup.CONTROLLER_MARKS["group_started"] = startup.now()

    def after_worker_group_shutdown(self, worker_group_context) -> None:
        # The controller removed the group itself: nothing left for free_workers to do.
        forget_placement_group(_placement_group_key(self._run_name))

    after_worker_group_abort = after_worker_group_shutdown


class ReportToOutbox(UserCallback):
    """Put every report of the Train run in the outbox, as Tune gets it: rank 0's metrics, plus
    ``checkpoint_path`` when the report has a checkpoint (what ``TuneReportCallback`` does), and
    the controller's start-up marks on the first one."""

    def __init__(self) -> None:
        self._marks_sent = False

    def after_report(self, run_context, metrics, checkpoint) -> None:
        report = dict(metrics[0])
        if checkpoint is not None:
            report[CHECKPOINT_PATH_KEY] = checkpoint.path
        if not self._marks_sent:
            self._marks_sent = True
            report.update(startup.as_metrics(startup.CONTROLLER_MARKS))
        outbox = OUTBOXES.get(run_context.run_config.name)
        if outbox is not None:  # None: no ControllerThread runs it (a plain TorchTrainer)
            outbox.put(report)


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


def reserved_placement_groups() -> int:
    """How many placement groups of the Ray cluster hold their resources. After a sweep on its
    own local Ray, every one is a trial's workers that nobody freed (Tune has removed its own)."""
    return sum(group["state"] == "CREATED" for group in placement_group_table().values())


class FreeWorkersOfDeadTrials(ray.tune.Callback):
    """Tune callback: free the workers of a trial whose driver died (``free_workers``).

    The trial's driver frees its Train run's workers when it aborts the run or sees the
    controller die (``trainables.driver.TrialTorchTrainer``); when the driver itself dies (its
    process killed, its node lost), the controller dies with it (the driver owns it) and only
    the sweep is left to do it (Ray Train's per-run ``PlacementGroupCleaner`` actor is for this;
    ifsearch's trials do without it). Only on a failed trial, Tune restarting it or giving up:
    when Tune stops a live trial (its scheduler), the driver aborts the run itself, and freeing
    the workers under a live controller would make it start new ones.
    """

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        free_workers(train_run_name(trial.trial_id))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        free_workers(train_run_name(trial.trial_id))
