"""Local resources: the default --max-concurrent by hand, and a too-big worker refused early."""

import os
import subprocess
import sys

import pytest

from ifsearch.errors import ConfigError
from ifsearch.search.resources import check_local_trial, local_concurrency, local_ray_cpus


# (workers, cpus/worker, gpus/worker, cores, gpus) -> trials at once, computed by hand.
@pytest.mark.parametrize("request_, cores, gpus, expected", [
    ((1, 1.0, 0.0), 2, 0, 2),     # the laptop default: one trial per core
    ((2, 1.0, 0.0), 2, 0, 1),     # two DDP workers fill both cores
    ((1, 1.5, 0.0), 2, 0, 1),     # 2 / 1.5 = 1.33
    ((1, 0.5, 0.0), 2, 0, 4),     # fractional CPUs
    ((1, 0.1, 0.0), 1, 0, 10),    # 1 // 0.1 is 9.0 in floats: still 10
    ((1, 4.0, 0.0), 16, 0, 4),
    ((1, 1.0, 1.0), 16, 4, 4),    # GPU-bound: 4 GPUs, one per trial
    ((2, 2.0, 1.0), 16, 8, 4),    # 16 / 4 = 4 by CPU, 8 / 2 = 4 by GPU
    ((1, 1.0, 0.5), 8, 1, 2),     # two trials share one GPU
    ((1, 2.0, 1.0), 16, 2, 2),    # CPU allows 8, GPU 2
    ((1, 8.0, 1.0), 16, 4, 2),    # GPU allows 4, CPU 2
])
def test_default_max_concurrent_by_hand(request_, cores, gpus, expected):
    check_local_trial(*request_, cores=cores, gpus=gpus)  # all of these fit
    assert local_concurrency(*request_, cores=cores, gpus=gpus) == expected


@pytest.mark.parametrize("concurrent, workers, cpus, cores, expected", [
    (2, 1, 1.0, 2, 4),   # the demo: 2 trials x (1 driver + 1 worker) on 2 cores
    (1, 2, 1.0, 2, 3),
    (1, 1, 1.0, 16, 16),  # never fewer than the real cores
    (4, 1, 0.5, 2, 6),
])
def test_local_ray_gets_a_cpu_per_driver(concurrent, workers, cpus, cores, expected):
    assert local_ray_cpus(concurrent, workers, cpus, cores) == expected


@pytest.mark.parametrize("request_, message", [
    ((1, 3.0, 0.0), r"--cpus-per-worker 3: one worker asks for more CPUs than this machine "
                    r"has \(2 cores\)"),
    ((3, 1.0, 0.0), r"--workers-per-trial 3 x --cpus-per-worker 1 = 3 CPUs per trial, but "
                    r"this machine has 2 cores"),
    ((1, 1.0, 1.0), r"--workers-per-trial 1 x --gpus-per-worker 1: a trial needs 1 GPUs but "
                    r"this machine has 0"),
    ((1, -1.0, 0.0), r"--cpus-per-worker -1 / --gpus-per-worker 0: must be >= 0"),
])
def test_a_trial_bigger_than_the_machine_is_refused(request_, message):
    with pytest.raises(ConfigError, match=message):
        check_local_trial(*request_, cores=2, gpus=0)


def test_launcher_refuses_a_worker_bigger_than_the_real_cores_before_anything_starts(tmp_path):
    """Ray would be started with padded logical CPUs and place it: the launcher must refuse it
    from the real core count, before it starts a local MLflow server (no --mlflow-uri) or Ray."""
    too_many = (os.cpu_count() or 1) + 1
    run = subprocess.run([sys.executable, "-m", "ifsearch.launch",
                          "--cpus-per-worker", str(too_many)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items()
                              if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")})
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"--cpus-per-worker {too_many}: one worker asks for more CPUs" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "runs").exists()  # no MLflow server, no sweep folder
