"""One Tune trial: resolve the sampled config, build a Ray Train ``TorchTrainer``, fit it."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)
from ray.train.v2._internal.constants import DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE

from ifsearch.config import Config, config_to_dict
from ifsearch.search.space import SearchSpace
from trainables import ray_report, startup, worker_pool
from trainables.backend import TrialTorchConfig
from trainables.worker import train_fn_per_worker

logger = logging.getLogger(__name__)


@dataclass
class TrialSettings:
    """How every trial of a sweep runs (the same for all trials, unlike the sampled config).

    Attributes:
        space: the validated search space; ``space.resolve`` turns a sample into a Config.
        num_workers: Ray Train workers (DDP ranks) per trial.
        cpus_per_worker: CPUs each worker reserves (also its torch thread count).
        gpus_per_worker: GPUs each worker reserves (0 = CPU training).
        custom_resources: custom Ray resources each worker also reserves (e.g. ``{"trainer":
            1}`` keeps training on nodes started with that resource).
        storage_path: where Train keeps checkpoints; shared storage on clusters.
        max_failures: worker-group restarts from the last checkpoint before the trial fails.
        mlflow: ``{"tracking_uri", "experiment", "sweep"}``: the rank-0 worker logs system
            metrics into the trial's MLflow run (``ifsearch.tracking.runs.system_metrics``); None
            logs none.
        required_metrics: result keys Tune requires in every result (the searcher's and the
            scheduler's metrics); a diverged trial's final result sets them to NaN.
        checkpoint_epochs: epochs that always save a checkpoint, besides every
            ``train.checkpoint_every``-th and the last: where the scheduler stops or pauses
            trials (``ifsearch.search.sweep.rung_epochs``).
    """

    space: SearchSpace
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    custom_resources: dict[str, float] = field(default_factory=dict)
    storage_path: str | None = None
    max_failures: int = 1
    mlflow: dict[str, str] | None = None
    required_metrics: tuple[str, ...] = ()
    checkpoint_epochs: tuple[int, ...] = ()


# Ray Train settings every trial runs with, unless set in the environment already: read by the
# controller, in the trial's driver, and passed on to the workers Train starts
# (ray.train.v2._internal.constants).
TRAIN_ENV = {
    # The controller polls its workers this often, and only a poll hands a report on to Tune;
    # a worker whose previous report is still unpolled waits. Ray's 2 s made every report of a
    # ~1 s epoch wait ~1 s (docs/benchmarks.md, "Trial start-up and report cost"); 0.2 s costs
    # the controller 5 small calls a second per worker.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}
# Ray Train settings for a local Ray only, given to every process of the cluster by the
# ``ray.init`` that starts it. The preemption watcher (one more actor process per Train run,
# polling Ray for nodes being drained) has nothing to watch on a single machine.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


class TrialStopped(Exception):
    """Tune stopped the trial (its scheduler, the end of the sweep): its Train run was aborted."""


class TrialTorchTrainer(TorchTrainer):
    """``TorchTrainer`` that hands each report to a callable, can be stopped, and starts no
    helper actor a trial does not need.

    Changes to Ray's trainer, all for the start-up and slot time of a sweep's trials:

    - The Train controller runs in this process, on a thread of its own
      (``ray_report.ControllerThread``), not as an actor: one process fewer per trial (why:
      ``trainables/ray_report.py``). ``fit()`` long-polls its outbox and passes each report to
      ``on_report`` (``ray.tune.report`` in a trial) from the calling thread, instead of Ray's
      ``TuneReportCallback`` and its queue actor.
    - ``should_stop`` is checked while the run goes on: when it says so, the run is aborted and
      ``fit()`` raises ``TrialStopped``. Tune reuses a finished trial's actor for the next trial
      (``reuse_actors``), and a trial stopped by the scheduler finishes while its ``fit()``
      still runs: the run must end before the actor is reset, or its workers keep their CPUs
      and the reset times out. ``fit()`` ending any other way while the run goes on (Tune ends
      a blocked ``ray.tune.report`` with ``SystemExit``) aborts it too.
    - No ``PlacementGroupCleaner``: Ray Train starts that detached actor for every run, to free
      the workers' placement group if the controller dies without doing it (a placement group
      outlives the actor that made it: it belongs to the job). It is one more process per trial
      (~2.8 s of CPU per trial, starting while the trial starts, then asking Ray's state API
      every second). The controller frees it when its run ends or is aborted, and the sweep
      when the driver itself died (``ray_report.FreeWorkersOfDeadTrials``).
    - No ``DatasetManager`` actor (Ray Train's datasets hook starts one for every run, datasets
      or not): the trials read their data in ``train_loop``, so the hook is left out when
      ``datasets`` is empty.
    - With ``keep_workers`` (a trial's driver), the run's workers and their placement group are
      kept when it ends and the driver's next run starts on them
      (``worker_pool.KeptWorkerGroup``): no new processes, no imports again.

    ``_initialize_and_run_controller`` replaces Ray 2.60's (which starts the controller actor,
    installs a SIGINT handler in the main thread, where no trial runs, and waits); it and
    ``_create_default_callbacks`` override private methods of Ray's ``DataParallelTrainer``
    (``ray/train/v2/api/data_parallel_trainer.py``): check them when upgrading Ray.
    """

    def __init__(self, *args, on_report: Callable[[dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, keep_workers: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._worker_group_cls = (worker_pool.KeptWorkerGroup if keep_workers
                                  else ray_report.TrialWorkerGroup)
        self._on_report = on_report
        self._should_stop = should_stop
        self._run: ray_report.ControllerThread | None = None

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        # The controller calls ray.get inside its coroutines, as Ray's own does in its actor.
        os.environ.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
                              DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
        self._run = ray_report.ControllerThread(self.run_config.name, controller_init_kwargs,
                                                self._worker_group_cls)
        ended = False
        try:
            self._forward_reports()
            ended = True
        finally:
            if not ended:
                self.abort()
        return self._run.result()

    def _forward_reports(self) -> None:
        """Until the run ends: collect the controller's reports and hand them to ``on_report``;
        abort the run and raise ``TrialStopped`` when ``should_stop()`` says so."""
        while True:
            if self._should_stop is not None and self._should_stop():
                raise TrialStopped  # the run is aborted on the way out
            reports, ended = self._run.outbox.take(REPORT_WAIT_S)
            for report in reports:
                if self._on_report is not None:
                    self._on_report(report)
            if ended:
                return

    def abort(self) -> None:
        """End the running Train run now: stop its controller, which aborts its worker group
        (the workers' processes end, their placement group is removed).

        Should the controller still be busy after ``ABORT_WAIT_S`` (starting a worker group
        blocks it until the group is up), its workers' placement group is freed meanwhile
        (``ray_report.free_workers``) and the controller aborts the group when it gets there.
        """
        if self._run is None:
            return
        if not self._run.stop(ABORT_WAIT_S):
            logger.warning("Train run %s: its controller was still busy %.0f s after the "
                           "trial stopped; freeing its workers", self.run_config.name,
                           ABORT_WAIT_S)
            ray_report.free_workers(self.run_config.name)

    def _create_default_callbacks(self):
        callbacks = [c for c in super()._create_default_callbacks()
                     if not isinstance(c, PlacementGroupCleanerCallback)]
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]


# How long the driver's poll of the controller's outbox waits for a report: a report arrives as
# soon as it is made; this bounds how late the driver notices that Tune stopped the trial.
REPORT_WAIT_S = 0.5
# How long abort() waits for the controller to abort its worker group (it takes well under a
# second once the controller is at an await; under Tune's TUNE_FUNCTION_THREAD_TIMEOUT_S).
ABORT_WAIT_S = 20.0


def build_trainer(config: Config, settings: TrialSettings, run_name: str,
                  extra: dict | None = None, on_report: Callable[[dict], None] | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  keep_workers: bool = False) -> TrialTorchTrainer:
    """The ``TorchTrainer`` of one trial: ``settings.num_workers`` workers running
    ``train_fn_per_worker`` on ``config``, its Train run named ``run_name``.

    Args:
        config: the trial's fully resolved config.
        settings: the sweep's trial settings (workers, resources, storage, rungs).
        run_name: the Train run's name; the same name resumes the run's latest checkpoint.
        extra: more ``train_loop_config`` entries for the workers.
        on_report: called with each report of the run (a trial passes ``ray.tune.report``).
        should_stop: polled while the run goes on; True aborts it (``TrialTorchTrainer``).
        keep_workers: when the run ends, keep its workers for this process's next run
            (``trainables/worker_pool.py``); a trial's driver does, for its next trial.
    """
    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    return TrialTorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": config_to_dict(config),
                           "checkpoint_epochs": list(settings.checkpoint_epochs),
                           "mlflow": settings.mlflow,
                           "required_metrics": list(settings.required_metrics), **(extra or {})},
        torch_config=TrialTorchConfig(),
        scaling_config=ScalingConfig(
            num_workers=settings.num_workers,
            use_gpu=settings.gpus_per_worker > 0,
            resources_per_worker={"CPU": settings.cpus_per_worker,
                                  **({"GPU": settings.gpus_per_worker}
                                     if settings.gpus_per_worker else {}),
                                  **settings.custom_resources},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=settings.storage_path,
            failure_config=FailureConfig(max_failures=settings.max_failures),
            callbacks=[ray_report.ControllerMarks(), ray_report.ReportToOutbox()],
        ),
        on_report=on_report,
        should_stop=should_stop,
        keep_workers=keep_workers,
    )


# How long Tune waits for a stopped trial's function to return before it reuses the trial's
# actor (Ray's default 2 s): aborting the trial's Train run (TrialTorchTrainer.abort) takes well
# under a second, more on a loaded machine; a reset that times out fails the next trial.
TUNE_ENV = {"TUNE_FUNCTION_THREAD_TIMEOUT_S": "30"}


def train_driver_fn(sampled: dict, settings: TrialSettings) -> None:
    """The Tune function trainable: one trial of the sweep.

    The Train run is named after the trial id, so a restarted trial finds its run (and latest
    checkpoint) in storage and resumes instead of starting over. Each report of the run goes to
    Tune from this thread; when Tune stops the trial (its scheduler, the end of the sweep) the
    Train run is aborted and the function returns.
    """
    driver_start = startup.now()
    for key, value in TUNE_ENV.items():
        os.environ.setdefault(key, value)
    config = settings.space.resolve(sampled)
    config.train.num_threads = max(int(settings.cpus_per_worker), 1)
    if settings.gpus_per_worker == 0:
        config.train.device = "cpu"
    trial_id = ray_report.trial_id()
    trainer = build_trainer(
        config, settings, ray_report.train_run_name(trial_id),
        extra={"trial_id": trial_id, "startup_marks": {"driver_start": driver_start}},
        on_report=ray_report.report_to_tune, should_stop=ray_report.trial_stop_event().is_set,
        keep_workers=True)
    with contextlib.suppress(TrialStopped):
        trainer.fit()
