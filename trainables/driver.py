"""One Tune trial: resolve the sampled config, build a Ray Train ``TorchTrainer``, fit it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ifsearch.config import config_to_dict
from ifsearch.search_space import SearchSpace
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
        checkpoint_epochs: epochs that always save a checkpoint, besides every
            ``train.checkpoint_every``-th and the last: where the scheduler stops or pauses
            trials (``ifsearch.sweep.rung_epochs``).
    """

    space: SearchSpace
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    custom_resources: dict[str, float] = field(default_factory=dict)
    storage_path: str | None = None
    max_failures: int = 1
    checkpoint_epochs: tuple[int, ...] = ()


def train_driver_fn(sampled: dict, settings: TrialSettings) -> None:
    """The Tune function trainable: one trial of the sweep.

    The Train run is named after the trial id, so a restarted trial finds its run (and latest
    checkpoint) in storage and resumes instead of starting over.
    """
    driver_start = startup.now()
    config = settings.space.resolve(sampled)
    config.train.num_threads = max(int(settings.cpus_per_worker), 1)
    if settings.gpus_per_worker == 0:
        config.train.device = "cpu"
    trial_id = ray_report.trial_id()
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": config_to_dict(config), "trial_id": trial_id,
                           "checkpoint_epochs": list(settings.checkpoint_epochs),
                           "startup_marks": {"driver_start": driver_start}},
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
            name=f"train_{trial_id}",
            storage_path=settings.storage_path,
            failure_config=FailureConfig(max_failures=settings.max_failures),
            callbacks=[ray_report.StartupReportCallback(), ray_report.ControllerMarks()],
        ),
    )
    trainer.fit()
