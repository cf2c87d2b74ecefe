"""One Tune trial: resolve the sampled config, build a Ray Train ``TorchTrainer``, fit it."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import ray
from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.constants import (
    DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
    get_env_vars_to_propagate,
)
from ray.train.v2._internal.execution.controller import TrainController

from ifsearch.config import Config, config_to_dict
from ifsearch.search.space import SearchSpace
from trainables import ray_report, startup
from trainables.backend import TrialTorchConfig
from trainables.worker import train_fn_per_worker


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


# Ray Train settings every trial runs with, unless set in the environment already. Train passes
# them on to the controller and workers it starts (ray.train.v2._internal.constants).
TRAIN_ENV = {
    # The controller polls its workers this often, and only a poll hands a report on to Tune;
    # a worker whose previous report is still unpolled waits. Ray's 2 s made every report of a
    # ~1 s epoch wait ~1 s (docs/benchmarks.md, "Trial start-up and report cost"); 0.2 s costs
    # the controller 5 small calls a second per worker.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}


class TrialTorchTrainer(TorchTrainer):
    """``TorchTrainer`` that a trial can abort, and that starts no Ray Data actor needlessly.

    Two changes to Ray's trainer, both for the start-up and slot time of a sweep's trials:

    - ``abort()`` stops a running ``fit()`` from another thread. Tune reuses a finished trial's
      actor for the next trial (``reuse_actors``), and a trial stopped by the scheduler finishes
      while its ``fit()`` still runs: the run must end before the actor is reset, or its
      workers keep their CPUs and the reset times out. Ray keeps the controller's handle local
      to ``_initialize_and_run_controller``, so that method is Ray 2.60's own, plus keeping the
      handle (minus the SIGINT handler Ray installs in the main thread, where no trial runs).
    - Ray Train's datasets hook starts a ``DatasetManager`` actor for every run, datasets or
      not: one more process per trial (~2 s of CPU on the 2-core benchmark machine, competing
      with the trial's start-up). The trials read their data in ``train_loop``, so the hook is
      left out when ``datasets`` is empty.

    Both override private methods of Ray's ``DataParallelTrainer``
    (``ray/train/v2/api/data_parallel_trainer.py``): check them when upgrading Ray.
    """

    _controller = None

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        env_vars = get_env_vars_to_propagate()
        env_vars.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
                            DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
        controller_cls = ray.remote(
            num_cpus=0,
            label_selector={ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()},
            runtime_env={"env_vars": env_vars},
        )(TrainController)
        self._controller = controller_cls.remote(**controller_init_kwargs)
        ray.get(self._controller.run.remote())
        return ray.get(self._controller.get_result.remote())

    def abort(self) -> None:
        """End a running ``fit()`` now: kill the Train controller, so that ``fit()`` raises.

        This is what stopping a trial did before actors were reused (Tune killed the trial's
        process, and the controller it owned with it): the workers die with their owner and
        Ray Train's placement-group cleaner frees their resources. Ray's graceful
        ``controller.abort`` is no use here: a controller whose Tune report waits on the
        stopped trial's full result queue never gets to run it.
        """
        if self._controller is not None:
            ray.kill(self._controller, no_restart=True)

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]


def build_trainer(config: Config, settings: TrialSettings, run_name: str,
                  callbacks: list | None = None, extra: dict | None = None) -> TorchTrainer:
    """The ``TorchTrainer`` of one trial: ``settings.num_workers`` workers running
    ``train_fn_per_worker`` on ``config``, its Train run named ``run_name``.

    Args:
        config: the trial's fully resolved config.
        settings: the sweep's trial settings (workers, resources, storage, rungs).
        run_name: the Train run's name; the same name resumes the run's latest checkpoint.
        callbacks: Train ``RunConfig`` callbacks (the Tune forwarding, start-up marks).
        extra: more ``train_loop_config`` entries for the workers.
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
            callbacks=callbacks or [],
        ),
    )


# How long Tune waits for a stopped trial's function to return before it reuses the trial's
# actor (Ray's default 2 s): aborting the trial's Train run (TrialTorchTrainer.abort) takes well
# under a second, more on a loaded machine; a reset that times out fails the next trial.
TUNE_ENV = {"TUNE_FUNCTION_THREAD_TIMEOUT_S": "30"}


def train_driver_fn(sampled: dict, settings: TrialSettings) -> None:
    """The Tune function trainable: one trial of the sweep.

    The Train run is named after the trial id, so a restarted trial finds its run (and latest
    checkpoint) in storage and resumes instead of starting over. When Tune stops the trial
    (its scheduler, the end of the sweep) the Train run is aborted and the function returns.
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
        config, settings, f"train_{trial_id}",
        callbacks=[ray_report.StartupReportCallback(), ray_report.ControllerMarks()],
        extra={"trial_id": trial_id, "startup_marks": {"driver_start": driver_start}})
    stop = ray_report.trial_stop_event()
    fitted = threading.Event()

    def abort_when_stopped() -> None:
        while not stop.wait(0.5):
            if fitted.is_set():
                return
        while not fitted.is_set():  # again if the controller was not started yet
            trainer.abort()
            fitted.wait(1.0)

    threading.Thread(target=abort_when_stopped, name="abort_when_stopped", daemon=True).start()
    try:
        trainer.fit()
    except Exception:
        if stop.is_set():  # aborted because Tune stopped the trial: nothing went wrong
            return
        raise
    finally:
        fitted.set()
