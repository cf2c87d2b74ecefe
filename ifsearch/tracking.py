"""MLflow logging of a sweep, from the Tune driver: one parent run, one nested run per trial.

Logging from the driver (a ``ray.tune.Callback``) rather than from workers gives exactly one run
per trial. Runs are found again by tags (``ifsearch.sweep``, ``ifsearch.trial_id``), so a resumed
sweep continues the same runs instead of opening new ones.
"""

from __future__ import annotations

import math
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS, DEBUG_METRICS

from ifsearch.config import flatten_config, save_config
from ifsearch.search_space import SearchSpace

SWEEP_TAG = "ifsearch.sweep"
ROLE_TAG = "ifsearch.role"
TRIAL_TAG = "ifsearch.trial_id"
TRIAL_NUMBER_TAG = "ifsearch.trial_number"  # creation order: 1 = the first trial evaluated
INTERRUPTED_TAG = "ifsearch.interrupted"  # on runs a SIGINT/SIGTERM left unfinished
# Tune's own bookkeeping, never a model metric ("epoch" is the step, not a metric).
NOT_METRICS = set(AUTO_RESULT_KEYS) | set(DEBUG_METRICS) | {
    "epoch", "done", "checkpoint_path", "should_checkpoint", "warmup_time",
}
MAX_PARAM_LENGTH = 500


def code_version() -> str:
    """The git commit of the working tree (with -dirty), or "unknown" outside a checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_params() -> dict[str, str]:
    """Versions that decide whether a result is reproducible."""
    import optuna
    import ray
    import torch

    return {
        "code_version": code_version(),
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "optuna_version": optuna.__version__,
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
    }


def _params(values: dict[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in values.items()]


def tag_filter(tags: dict[str, str]) -> str:
    """An MLflow search filter matching runs that carry all of ``tags``."""
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


def mark_interrupted(client: MlflowClient, experiment: str, sweep: str) -> int:
    """Mark the sweep's runs still RUNNING (its parent and unfinished trials) as KILLED and
    interrupted, so none stays RUNNING forever; ``--resume`` sets them RUNNING again.

    Returns the number of runs marked.
    """
    experiment_id = get_or_create_experiment(client, experiment)
    running = client.search_runs(
        [experiment_id], filter_string=f"{tag_filter({SWEEP_TAG: sweep})} and "
                                       "attributes.status = 'RUNNING'")
    for run in running:
        client.set_tag(run.info.run_id, INTERRUPTED_TAG, "true")
        client.set_terminated(run.info.run_id, status="KILLED")
    return len(running)


def reopen_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The run carrying ``tags``, marked RUNNING again, or None: how a resumed sweep continues
    its parent and trial runs instead of opening new ones."""
    found = client.search_runs([experiment_id], filter_string=tag_filter(tags), max_results=1)
    if not found:
        return None
    run = found[0]
    if INTERRUPTED_TAG in run.data.tags:
        client.delete_tag(run.info.run_id, INTERRUPTED_TAG)
    client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def find_or_create_parent_run(client: MlflowClient, experiment: str, sweep: str,
                              params: dict[str, Any], artifacts: list[Path]) -> str:
    """The sweep's parent run id: the existing one when resuming, else a new one."""
    experiment_id = get_or_create_experiment(client, experiment)
    run_id = reopen_run(client, experiment_id, {SWEEP_TAG: sweep, ROLE_TAG: "sweep"})
    if run_id is not None:
        return run_id
    run = client.create_run(
        experiment_id,
        run_name=sweep,
        tags={SWEEP_TAG: sweep, ROLE_TAG: "sweep"},
    )
    client.log_batch(run.info.run_id, params=_params(params))
    for path in artifacts:
        client.log_artifact(run.info.run_id, str(path))
    return run.info.run_id


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name)


class MlflowTrialLogger(tune.Callback):
    """Nested MLflow run per trial: resolved config as params, per-epoch metrics, final status.

    Status: FINISHED when the trial ran all ``max_epochs``, KILLED when a scheduler stopped it
    early, FAILED on error (with the error as a tag).

    Args:
        tracking_uri: the MLflow server.
        experiment: MLflow experiment name.
        sweep: the sweep's name (Tune experiment name), tagged on every run.
        parent_run_id: the sweep's parent run.
        space: resolves a trial's sampled values into its full config.
        max_epochs: the budget every trial would run without early stopping.
    """

    def __init__(self, tracking_uri: str, experiment: str, sweep: str, parent_run_id: str,
                 space: SearchSpace, max_epochs: int) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep = sweep
        self.parent_run_id = parent_run_id
        self.space = space
        self.max_epochs = max_epochs
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}  # Tune trial id -> MLflow run id

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
            self._experiment_id = get_or_create_experiment(self._client, self.experiment)
        return self._client

    def run_id(self, trial, number: int | None = None) -> str:
        """The trial's run: cached, else found by tag (resumed sweep), else created.

        ``number`` is the trial's 1-based position in Tune's trial list (creation order).
        """
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        run_id = reopen_run(self.client, self._experiment_id,
                            {SWEEP_TAG: self.sweep, TRIAL_TAG: trial.trial_id})
        if run_id is None:
            run_id = self._create_run(trial, number)
        self._runs[trial.trial_id] = run_id
        return run_id

    def _create_run(self, trial, number: int | None) -> str:
        client = self.client
        searched = {k: v for k, v in trial.config.items() if k in self.space.params}
        run = client.create_run(
            self._experiment_id,
            run_name=str(trial),
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                SWEEP_TAG: self.sweep,
                ROLE_TAG: "trial",
                TRIAL_TAG: trial.trial_id,
                TRIAL_NUMBER_TAG: str(number or ""),
                "ifsearch.searched": ",".join(sorted(searched)),
            },
        )
        config = self.space.resolve(searched)
        client.log_batch(run.info.run_id, params=_params(flatten_config(config)))
        with tempfile.TemporaryDirectory() as tmp:
            client.log_artifact(run.info.run_id, str(save_config(config, Path(tmp) / "config.yaml")))
        return run.info.run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        run_id = self.run_id(trial, number=trials.index(trial) + 1)
        run = self.client.get_run(run_id)
        if INTERRUPTED_TAG in run.data.tags:  # a resumed sweep continues this trial
            self.client.delete_tag(run_id, INTERRUPTED_TAG)
            self.client.update_run(run_id, status="RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, step)
            for key, value in result.items()
            if key not in NOT_METRICS and isinstance(value, (int, float))
            and not isinstance(value, bool) and math.isfinite(value)
        ]
        self.client.log_batch(self.run_id(trial), metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        epochs = int(last.get("epoch", 0))
        status = "FINISHED" if epochs >= self.max_epochs else "KILLED"
        run_id = self.run_id(trial)
        if last.get("checkpoint_path"):  # Train's latest checkpoint, forwarded by Tune
            self.client.set_tag(run_id, "ifsearch.checkpoint", str(last["checkpoint_path"]))
        if status == "KILLED":
            self.client.set_tag(run_id, "ifsearch.stopped_at_epoch", str(epochs))
        self.client.set_terminated(run_id, status=status)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run_id = self.run_id(trial)
        error_file = str(getattr(trial, "error_file", "") or "")
        self.client.set_tag(run_id, "ifsearch.error_file", error_file[:MAX_PARAM_LENGTH])
        self.client.set_tag(run_id, "ifsearch.error", error_reason(error_file)[:5000])
        self.client.set_terminated(run_id, status="FAILED")


def error_reason(error_file: str) -> str:
    """The line of a trial's error file that says why it failed.

    Ray wraps a worker's exception in several layers of tracebacks; an ifsearch error (e.g. a
    divergence) is the most useful line, else the last exception line.
    """
    try:
        lines = [line.strip() for line in Path(error_file).read_text().splitlines()]
    except OSError:
        return "unknown (no error file)"
    ours = [line for line in lines if re.match(r"(ifsearch\.errors\.)?\w+Error: ", line)
            and any(name in line for name in ("DivergenceError", "DataError", "ConfigError",
                                              "CheckpointError", "IfsearchError"))]
    if ours:
        return ours[-1]
    errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception): ", line)]
    return errors[-1] if errors else (lines[-1] if lines else "unknown")


def finish_parent_run(client: MlflowClient, parent_run_id: str, status: str = "FINISHED",
                      metrics: dict[str, float] | None = None,
                      artifacts: list[Path] | None = None, tags: dict[str, str] | None = None,
                      artifact_dirs: dict[str, Path] | None = None) -> None:
    """Attach the sweep's results (best metrics, files, plots) and close the parent run."""
    if metrics:
        client.log_batch(parent_run_id, metrics=[
            Metric(f"best_{k}", float(v), int(time.time() * 1000), 0)
            for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)
        ])
    for key, value in (tags or {}).items():
        client.set_tag(parent_run_id, key, value[:5000])
    for path in artifacts or []:
        client.log_artifact(parent_run_id, str(path))
    for name, directory in (artifact_dirs or {}).items():
        client.log_artifacts(parent_run_id, str(directory), artifact_path=name)
    client.set_terminated(parent_run_id, status=status)
