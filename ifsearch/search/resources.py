"""What a sweep's trials need from the local machine and how many fit: plain arithmetic.

Kept free of Ray so the launcher can refuse an impossible request before anything starts (no
MLflow server, no Ray), and so the numbers can be tested by hand. On a Ray cluster the same
questions are answered from the live nodes (``ifsearch.search.sweep.start_ray``).

Locally, Ray is started with more logical CPUs than the machine has (one per trial for its idle
driver process), so Ray itself would happily place a worker bigger than the machine: the check
here uses the real core count (``os.cpu_count()``).
"""

from __future__ import annotations

import math
import os

from ifsearch.errors import ConfigError

DRIVER_CPUS = 1.0  # a trial's Tune function only waits on its TorchTrainer
_EPS = 1e-9  # 1 // 0.1 is 9.0 in floats: count what fits with a little slack for rounding


def local_machine() -> tuple[int, int]:
    """(CPU cores, CUDA GPUs) of this machine, as the OS and torch see them."""
    import torch

    return os.cpu_count() or 1, torch.cuda.device_count()


def check_local_trial(workers: int, cpus_per_worker: float, gpus_per_worker: float,
                      cores: int, gpus: int) -> None:
    """Refuse a trial whose workers cannot all run on this machine at once.

    Raises:
        ConfigError: naming the flag, its value and what the machine has.
    """
    if cpus_per_worker < 0 or gpus_per_worker < 0:
        raise ConfigError(f"--cpus-per-worker {cpus_per_worker:g} / --gpus-per-worker "
                          f"{gpus_per_worker:g}: must be >= 0")
    if cpus_per_worker > cores:
        raise ConfigError(f"--cpus-per-worker {cpus_per_worker:g}: one worker asks for more CPUs "
                          f"than this machine has ({cores} cores); lower --cpus-per-worker, or "
                          "run on a cluster (--address)")
    if workers * cpus_per_worker > cores + _EPS:
        raise ConfigError(f"--workers-per-trial {workers} x --cpus-per-worker "
                          f"{cpus_per_worker:g} = {workers * cpus_per_worker:g} CPUs per trial, "
                          f"but this machine has {cores} cores; lower --workers-per-trial or "
                          "--cpus-per-worker, or run on a cluster (--address)")
    if gpus_per_worker and workers * gpus_per_worker > gpus + _EPS:
        raise ConfigError(f"--workers-per-trial {workers} x --gpus-per-worker "
                          f"{gpus_per_worker:g}: a trial needs {workers * gpus_per_worker:g} "
                          f"GPUs but this machine has {gpus}; lower --gpus-per-worker or "
                          "--workers-per-trial")


def local_concurrency(workers: int, cpus_per_worker: float, gpus_per_worker: float,
                      cores: int, gpus: int) -> int:
    """The default --max-concurrent: trials whose workers fit on the real cores and GPUs at once
    (drivers not counted: they idle while their workers train); at least 1."""
    fit = cores
    if cpus_per_worker > 0:
        fit = math.floor(cores / (workers * cpus_per_worker) + _EPS)
    if gpus_per_worker > 0:
        fit = min(fit, math.floor(gpus / (workers * gpus_per_worker) + _EPS))
    return max(1, fit)


def local_ray_cpus(concurrent: int, workers: int, cpus_per_worker: float, cores: int) -> int:
    """Logical CPUs to start a local Ray with: every concurrent trial's driver and workers, and
    never fewer than the real cores."""
    return max(math.ceil(concurrent * (DRIVER_CPUS + workers * cpus_per_worker) - _EPS), cores)
