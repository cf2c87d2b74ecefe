"""Where a trial's start-up goes: wall-clock marks taken by each process of a trial, turned into
phase durations that the trial's first result carries (``startup_<phase>_s``).

A trial passes through three kinds of process before its first result: the sweep (Tune starts
the trial and receives its results), the trial's driver (builds the ``TorchTrainer`` and, on a
thread of its own, runs the Train controller, which starts the worker group and sets up
torch.distributed) and the workers (build data and model, train). Each takes ``time.time()`` marks at its own steps and hands them on with the
first report as ``startup_at_<mark>`` keys; the sweep's ``StartupPhases`` callback
(``trainables/ray_report.py``) adds its own two marks, turns the chain into phases and drops the
raw marks, so MLflow logs only durations. One clock per machine: on a cluster, a phase that
crosses nodes also holds the two nodes' clock offset.

Stdlib only: every process of a trial imports this module, including the driver, which must not
pay for torch or the training loop.
"""

from __future__ import annotations

import time

MARK_PREFIX = "startup_at_"  # a raw wall-clock mark in a reported result
PHASE_PREFIX = "startup_"  # startup_<phase>_s: a phase's duration in seconds
TOTAL_KEY = "startup_total_s"  # Tune creating the trial to its first result, minus the epoch

# (phase, from mark, to mark, what it holds), in the order they happen. Marks are taken by:
# tune_add / tune_result: the sweep (StartupPhases); driver_start: train_driver_fn;
# controller_start / workers_up / group_started: the Train controller (ControllerMarks);
# backend_start / backend_ready: the controller's torch backend (trainables/backend.py);
# worker_fn_start / data_built / model_built / report_call: rank 0's train_fn_per_worker.
PHASES = (
    ("trial_actor", "tune_add", "driver_start",
     "Tune's trial actor: placement group, process and the driver's imports (or a reused "
     "actor's reset), then the call of train_driver_fn"),
    ("train_controller", "driver_start", "controller_start",
     "TorchTrainer built, storage checked, Train controller started (a thread of the driver)"),
    ("worker_group", "controller_start", "workers_up",
     ("placement group, Train worker processes started and their Ray imports (a reused "
      "driver: the workers it kept, once their last run's training has ended)")),
    ("train_context", "workers_up", "backend_start",
     "train context on the workers (storage, synchronisation actor)"),
    ("backend_setup", "backend_start", "backend_ready",
     "torch.distributed process group (skipped for a group of one)"),
    ("start_callbacks", "backend_ready", "group_started",
     "Ray Train's other start hooks (the workers' working directory, metrics)"),
    ("train_fn_launch", "group_started", "worker_fn_start",
     ("train function sent to the workers and unpickled there (a new worker imports the "
      "training loop)")),
    ("dataset", "worker_fn_start", "data_built", "config parsed, datasets built"),
    ("model", "data_built", "model_built",
     "model, criterion, optimizer (torch's first optimizer imports torch._dynamo); "
     "checkpoint restored on resume"),
    ("first_epoch", "model_built", "report_call",
     "the first epoch (training + validation) and its checkpoint, if any"),
    ("first_report", "report_call", "tune_result",
     "ray.train.report, the controller's poll, Tune's queue and result processing"),
)
MARKS = ("tune_add",) + tuple(phase[2] for phase in PHASES)


def now() -> float:
    """The wall clock every mark uses."""
    return time.time()


def as_metrics(marks: dict[str, float]) -> dict[str, float]:
    """``{"data_built": t}`` -> ``{"startup_at_data_built": t}``, for a reported result."""
    return {MARK_PREFIX + name: value for name, value in marks.items()}


def pop_marks(result: dict) -> dict[str, float]:
    """Remove the raw marks from a reported result and return them by name."""
    keys = [key for key in result if key.startswith(MARK_PREFIX)]
    return {key[len(MARK_PREFIX):]: float(result.pop(key)) for key in keys}


def phases(marks: dict[str, float], epoch_seconds: float) -> dict[str, float]:
    """Phase durations from a complete chain of marks; {} when a mark is missing.

    The phases tile the interval from ``tune_add`` to ``tune_result``;
    ``startup_total_s`` is that interval minus the first epoch's own ``epoch_seconds``, as the
    issue and docs/benchmarks.md define a trial's start-up.
    """
    if any(name not in marks for name in MARKS):
        return {}
    durations = {f"{PHASE_PREFIX}{name}_s": marks[end] - marks[begin]
                 for name, begin, end, _ in PHASES}
    durations[TOTAL_KEY] = marks["tune_result"] - marks["tune_add"] - epoch_seconds
    return durations


# The marks the Train controller took for its current worker group. The controller runs in the
# trial's driver, one run at a time per process (ray_report.ControllerThread clears this).
CONTROLLER_MARKS: dict[str, float] = {}
