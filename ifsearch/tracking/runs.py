"""MLflow logging of a sweep, from the Tune driver: one parent run, one nested run per trial.

Logging from the driver (a ``ray.tune.Callback``) rather than from workers gives exactly one run
per trial. Runs are found again by tags (``ifsearch.sweep``, ``ifsearch.trial_id``), so a resumed
sweep continues the same runs instead of opening new ones.

Why one module of ~620 lines: the Tune callback, the ``RunWriter`` it writes through, the
``Spool`` that stands in for the writer while the server is down and ``sync`` (which replays the
spool through the same writer) are one protocol of records; split, a record's shape would be
defined in one file and read in another.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import mlflow
import requests
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.result import AUTO_RESULT_KEYS, DEBUG_METRICS

from ifsearch.config import Config, config_to_dict
from ifsearch.errors import IfsearchError


class TrialSpace(Protocol):
    """What the trial logger needs of a search space (``ifsearch.search.space.SearchSpace`` is
    one). A protocol, so tracking does not import the search layer that uses it."""

    params: Mapping[str, Any]  # searched keys

    def resolve(self, sampled: dict[str, Any]) -> Config:
        """A trial's sampled values -> its full config."""


SWEEP_TAG = "ifsearch.sweep"
ROLE_TAG = "ifsearch.role"
TRIAL_TAG = "ifsearch.trial_id"
TRIAL_NUMBER_TAG = "ifsearch.trial_number"  # creation order: 1 = the first trial evaluated
INTERRUPTED_TAG = "ifsearch.interrupted"  # on runs a SIGINT/SIGTERM left unfinished
ERROR_TAG = "ifsearch.error"  # why a FAILED trial failed
DIVERGED = "diverged"  # truthy in a trial's last result when its loss went non-finite
REPLAYED = "replayed"  # truthy in a result that repeats an epoch (trainables/worker.py)
# Where a trial's rank-0 Train worker ran (reported by trainables/ as worker_node_id/_host).
WORKER_NODE_TAG = "ifsearch.worker_node_id"
WORKER_HOST_TAG = "ifsearch.worker_host"
# Tune's own bookkeeping, never a model metric ("epoch" is the step, not a metric).
NOT_METRICS = set(AUTO_RESULT_KEYS) | set(DEBUG_METRICS) | {
    "epoch", "done", "checkpoint_path", "should_checkpoint", "warmup_time",
    "worker_node_id", "worker_host",
}
MAX_PARAM_LENGTH = 500
# The experiment's kind for MLflow 3's UI: "custom_model_development" is its model-training kind
# ("Machine learning", runs table first). The 3.17 open-source UI decides GenAI vs training pages
# by its workflow switch instead (a feature flag in its bundle), so links carry
# workflowType=machine_learning too; the tag serves UIs that read it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
# The UI's own "Share" button stores a runs view (filter, sort, columns) as an experiment tag with
# this prefix; a link with ?viewStateShareKey=<key> opens it. Its runsExpanded is not shared.
SHARED_VIEW_TAG = "mlflow.sharedViewState."
# Seconds between two system-metric samples of a trial (MLflow's default, 10 s, gives a trial of
# the demo only a few points); $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SYSTEM_METRICS_INTERVAL = 5.0
EVERY_EPOCH = "epoch_seconds"  # a metric every epoch logs: its steps are the logged epochs
# What an unreachable or failing server raises through MlflowClient.
UNREACHABLE = (MlflowException, requests.exceptions.RequestException, ConnectionError)


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
    """The experiment's id, created if need be, tagged as a model-training experiment.

    An experiment whose kind a user already chose keeps it.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return experiment.experiment_id


def sweep_view_link(client: MlflowClient, tracking_uri: str, experiment: str, sweep: str,
                    metric: str, mode: str, params: list[str]) -> str:
    """A link to the runs view of one sweep in MLflow's UI, best trial first.

    The view (the sweep's runs, sorted by the objective, with the objective and the searched
    parameters as columns) is stored as one of the UI's shared views, so the link opens it
    without the user picking columns. Sorted by a metric, the UI lists the parent and its trials
    flat; it nests (and folds) child runs only when sorted by creation time. The link names the
    "machine_learning" workflow: MLflow 3.17 picks its GenAI or training pages by that switch,
    not by the experiment's kind tag.
    """
    experiment_id = get_or_create_experiment(client, experiment)
    key = "ifsearch-" + re.sub(r"[^A-Za-z0-9_.-]", "_", sweep)
    view = {
        "searchFilter": tag_filter({SWEEP_TAG: sweep}),
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": mode == "min",
        "selectedColumns": [f"metrics.`{metric}`", *(f"params.`{name}`" for name in params)],
    }
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(view))
    query = urllib.parse.urlencode({"workflowType": "machine_learning", "viewStateShareKey": key})
    page = f"#/experiments/{experiment_id}/runs?{query}"
    if urllib.parse.urlsplit(tracking_uri).scheme in ("http", "https"):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return (f"http://127.0.0.1:5000/{page} "
            f"(once `mlflow ui --backend-store-uri {tracking_uri}` runs)")


@contextmanager
def system_metrics(run: dict[str, str] | None, trial_id: str) -> Iterator[None]:
    """Log MLflow's system metrics into the trial's run while the block runs.

    MLflow's ``SystemMetricsMonitor`` samples the machine it runs on (CPU, memory, disk,
    network; NVIDIA GPUs when ``nvidia-ml-py`` finds one) as ``system/...`` metrics. The rank-0
    Ray Train worker calls this: its node is where the trial trains, whereas the Tune driver that
    creates the runs sits on the head node of a cluster. The numbers are the whole node's, so
    trials sharing a node show the same load. The run is looked up in a thread, so an unreachable
    server never delays training (the trial then simply has no system metrics).

    Args:
        run: ``{"tracking_uri", "experiment", "sweep"}`` of the sweep; None logs nothing.
        trial_id: the Tune trial id tagged on the trial's run.
    """
    if not run:
        yield
        return
    monitors = []
    leaving = threading.Event()

    def start() -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            client = MlflowClient(run["tracking_uri"])
            experiment = client.get_experiment_by_name(run["experiment"])
            found = experiment and client.search_runs(
                [experiment.experiment_id],
                tag_filter({SWEEP_TAG: run["sweep"], TRIAL_TAG: trial_id}), max_results=1)
            if found and not leaving.is_set():
                monitor = SystemMetricsMonitor(
                    found[0].info.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL,
                    resume_logging=True, tracking_uri=run["tracking_uri"])  # a restarted trial
                monitor.start()
                monitors.append(monitor)
        except (*UNREACHABLE, ImportError):  # no psutil, or no server: training goes on
            return

    thread = threading.Thread(target=start, name="ifsearch-system-metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        leaving.set()
        thread.join(timeout=10)
        for monitor in monitors:
            monitor.finish()


class RunWriter:
    """Applies logging records (plain dicts) to MLflow: the one place that writes trial runs.

    The Tune callback turns events into records and applies them at once; when the server is
    unreachable the records go to a spool file instead, and ``python -m ifsearch.tracking sync``
    applies the same records later, so both paths give identical runs.
    """

    def __init__(self, client: MlflowClient, experiment: str) -> None:
        self.client = client
        self.experiment_id = get_or_create_experiment(client, experiment)
        self.runs: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self.parents: dict[str, str] = {}  # sweep -> its parent run id

    def apply(self, record: dict) -> None:
        getattr(self, f"_{record['kind']}")(record)

    def trial_run(self, record: dict) -> str:
        """The trial's run: cached, else found by tag (resumed sweep), else created."""
        trial_id = record["trial_id"]
        if trial_id not in self.runs:
            run_id = reopen_run(self.client, self.experiment_id,
                                {SWEEP_TAG: record["sweep"], TRIAL_TAG: trial_id})
            self.runs[trial_id] = run_id or self._create(record)
        return self.runs[trial_id]

    def _create(self, record: dict) -> str:
        parent = self.client.search_runs(
            [self.experiment_id], tag_filter({SWEEP_TAG: record["sweep"], ROLE_TAG: "sweep"}),
            max_results=1)
        tags = {SWEEP_TAG: record["sweep"], ROLE_TAG: "trial", TRIAL_TAG: record["trial_id"],
                TRIAL_NUMBER_TAG: str(record.get("number") or ""),
                "ifsearch.searched": ",".join(sorted(record.get("searched", [])))}
        if parent:
            tags["mlflow.parentRunId"] = parent[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=record.get("name"), tags=tags)
        config = record.get("config")
        if config is not None:
            self.client.log_batch(run.info.run_id, params=_params(
                {f"{section}.{key}": value for section, values in config.items()
                 for key, value in values.items()}))
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.yaml"
                path.write_text(yaml.safe_dump(config, sort_keys=False))
                self.client.log_artifact(run.info.run_id, str(path))
        return run.info.run_id

    def _start(self, record: dict) -> None:
        run_id = self.trial_run(record)
        if INTERRUPTED_TAG in self.client.get_run(run_id).data.tags:  # resumed trial
            self.client.delete_tag(run_id, INTERRUPTED_TAG)
            self.client.update_run(run_id, status="RUNNING")

    def _result(self, record: dict) -> None:
        run_id = self.trial_run(record)
        logged = set()
        if record.get("backfill") or record.get(REPLAYED):  # epochs MLflow may lack or have
            logged = {m.step for m in self.client.get_metric_history(run_id, EVERY_EPOCH)}
        missing = [e for e in record.get("backfill", ()) if e["step"] not in logged]
        for i, entry in enumerate(missing):  # time stamps just before this result's
            stamp = record["timestamp"] - len(missing) + i
            self.client.log_batch(run_id, metrics=[
                Metric(k, v, stamp, entry["step"]) for k, v in entry["metrics"].items()])
        metrics = [] if record["step"] in logged else [
            Metric(k, v, record["timestamp"], record["step"]) for k, v in record["metrics"].items()]
        self.client.log_batch(run_id, metrics=metrics,
                              tags=[RunTag(k, v) for k, v in record.get("tags", {}).items()])

    def _end(self, record: dict) -> None:
        run_id = self.trial_run(record)
        for key, value in record.get("tags", {}).items():
            self.client.set_tag(run_id, key, value)
        self.client.set_terminated(run_id, status=record["status"])

    def _progress(self, record: dict) -> None:
        """The search's progress on the parent run (see ``MlflowTrialLogger._progress``)."""
        sweep = record["sweep"]
        if sweep not in self.parents:
            found = self.client.search_runs(
                [self.experiment_id], tag_filter({SWEEP_TAG: sweep, ROLE_TAG: "sweep"}),
                max_results=1)
            if not found:  # deleted by hand mid-sweep: progress is not worth stopping for
                return
            self.parents[sweep] = found[0].info.run_id
        metrics = [Metric(k, v, record["timestamp"], record["step"])
                   for k, v in record["metrics"].items()]
        self.client.log_batch(self.parents[sweep], metrics=metrics)

    def _parent_end(self, record: dict) -> None:
        parent = reopen_run(self.client, self.experiment_id,
                            {SWEEP_TAG: record["sweep"], ROLE_TAG: "sweep"})
        if parent is None:
            raise IfsearchError(f"no parent run of sweep {record['sweep']!r} in MLflow")
        finish_parent_run(self.client, parent, status=record["status"],
                          metrics=record.get("metrics"), tags=record.get("tags"),
                          sweep_metrics=record.get("sweep_metrics"),
                          artifacts=[Path(p) for p in record.get("artifacts", [])],
                          artifact_dirs={k: Path(v)
                                         for k, v in record.get("artifact_dirs", {}).items()})


class Spool:
    """Records that could not reach MLflow, appended to a JSONL file for ``sync``."""

    def __init__(self, path: Path, tracking_uri: str, experiment: str) -> None:
        self.path, self.tracking_uri, self.experiment = Path(path), tracking_uri, experiment

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = {**record, "tracking_uri": self.tracking_uri, "experiment": self.experiment}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def warning(self, error: Exception) -> str:
        return (f"WARNING: MLflow at {self.tracking_uri} is unreachable "
                f"({type(error).__name__}: {str(error)[:200]}); training goes on and the "
                f"logging is kept in {self.path}. Once the server is back, upload it with:\n"
                f"  python -m ifsearch.tracking sync {self.path}")


class MlflowTrialLogger(tune.Callback):
    """Nested MLflow run per trial: resolved config as params, per-epoch metrics, final status.

    Status: FINISHED when the trial ran all ``max_epochs``, KILLED when a scheduler stopped it
    early, FAILED on error or divergence (with the reason in the ``ifsearch.error`` tag; a
    diverged trial ends with a result flagged ``diverged``, see ``trainables/worker.py``, and
    nothing is logged for its bad epoch). If the server cannot be reached, training
    is not disturbed: records go to ``spool_path`` (a warning says how to sync them), and while
    the server is down it is retried at most every ``retry_seconds``.

    Args:
        tracking_uri: the MLflow server.
        experiment: MLflow experiment name.
        sweep: the sweep's name (Tune experiment name), tagged on every run.
        space: resolves a trial's sampled values into its full config.
        max_epochs: the budget every trial would run without early stopping.
        spool_path: where records go while MLflow is unreachable.
    """

    def __init__(self, tracking_uri: str, experiment: str, sweep: str,
                 space: TrialSpace, max_epochs: int, spool_path: Path | None = None,
                 retry_seconds: float = 30.0) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep = sweep
        self.space = space
        self.max_epochs = max_epochs
        self.spool = Spool(spool_path or Path(tempfile.gettempdir()) / f"{sweep}.mlflow.jsonl",
                           tracking_uri, experiment)
        self.retry_seconds = retry_seconds
        self._writer: RunWriter | None = None
        self._spooled: set[str] = set()  # trials with spooled records: keep their order
        self._down_since: float | None = None
        self._worker_nodes: dict[str, str] = {}  # trial id -> node its rank-0 worker ran on

    def __getstate__(self) -> dict:  # Tune pickles callbacks with the experiment
        return {**self.__dict__, "_writer": None}

    def _send(self, record: dict) -> None:
        record = {**record, "sweep": self.sweep}
        down = self._down_since is not None
        if record["trial_id"] in self._spooled or (
                down and time.time() - self._down_since < self.retry_seconds):
            self._spooled.add(record["trial_id"])
            self.spool.append(record)
            return
        try:
            if self._writer is None:
                self._writer = RunWriter(MlflowClient(self.tracking_uri), self.experiment)
            self._writer.apply(record)
            self._down_since = None
        except UNREACHABLE as exc:
            if not down:
                print(self.spool.warning(exc), flush=True)
            self._down_since = time.time()
            self._spooled.add(record["trial_id"])
            self.spool.append(record)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        searched = {k: v for k, v in trial.config.items() if k in self.space.params}
        number = trials.index(trial) + 1  # creation order
        self._send({"kind": "start", "trial_id": trial.trial_id,
                    "name": f"{self.sweep}/t{number:02d}", "number": number,
                    "searched": sorted(searched),
                    "config": config_to_dict(self.space.resolve(searched))})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get(DIVERGED):  # no metrics for the bad epoch; the end record says why
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        record = {"kind": "result", "trial_id": trial.trial_id, "step": step,
                  "timestamp": int(time.time() * 1000), "metrics": _metrics(result)}
        if result.get(REPLAYED):
            record[REPLAYED] = True
        backfill = _epochs_before_restart(result)
        if backfill:
            record["backfill"] = backfill
        node = result.get("worker_node_id")
        if node and self._worker_nodes.get(trial.trial_id) != node:  # first, or restarted
            self._worker_nodes[trial.trial_id] = node
            record["tags"] = {WORKER_NODE_TAG: str(node),
                              WORKER_HOST_TAG: str(result.get("worker_host", ""))}
        self._send(record)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        if last.get(DIVERGED):
            reason = str(last.get("error", "DivergenceError"))
            self._send({"kind": "end", "trial_id": trial.trial_id, "status": "FAILED",
                        "tags": {ERROR_TAG: reason[:5000]}})
            return
        epochs = int(last.get("epoch", 0))
        status = "FINISHED" if epochs >= self.max_epochs else "KILLED"
        tags = {}
        if last.get("checkpoint_path"):  # Train's latest checkpoint, forwarded by Tune
            tags["ifsearch.checkpoint"] = str(last["checkpoint_path"])
        if status == "KILLED":
            tags["ifsearch.stopped_at_epoch"] = str(epochs)
        self._send({"kind": "end", "trial_id": trial.trial_id, "status": status, "tags": tags})
        self._progress(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error_file = str(getattr(trial, "error_file", "") or "")
        tags = {"ifsearch.error_file": error_file[:MAX_PARAM_LENGTH],
                ERROR_TAG: error_reason(error_file)[:5000]}
        self._send({"kind": "end", "trial_id": trial.trial_id, "status": "FAILED", "tags": tags})
        self._progress(trials, trial)

    def _progress(self, trials: list[Trial], trial: Trial) -> None:
        """Log the best objective so far on the parent run, at step = trials finished so far.

        Logged as the objective's own name (the column of the runs table then shows the sweep's
        best beside each trial's value) and as ``best_<objective>`` (a chart of its own: the
        search's progress). A trial's value is its last report, as for the best config; failed
        trials count as finished but not as candidates. Computed from Tune's trial list, so a
        resumed sweep continues the count.
        """
        metric, mode = self.space.objective["metric"], self.space.objective["mode"]
        finished = [t for t in trials
                    if t is trial or t.status in (Trial.TERMINATED, Trial.ERROR)]
        values = [(t.last_result or {}).get(metric) for t in finished if t.status != Trial.ERROR]
        values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        if not values:
            return
        best = max(values) if mode == "max" else min(values)
        self._send({"kind": "progress", "trial_id": trial.trial_id, "step": len(finished),
                    "timestamp": int(time.time() * 1000),
                    "metrics": {metric: best, f"best_{metric}": best}})


def _metrics(values: dict) -> dict[str, float]:
    """The finite numbers of a result, without Tune's bookkeeping."""
    return {key: float(value) for key, value in values.items()
            if key not in NOT_METRICS and isinstance(value, (int, float))
            and not isinstance(value, bool) and math.isfinite(value)}


def _epochs_before_restart(result: dict) -> list[dict]:
    """On the first result of a resumed process: every earlier epoch, from its checkpoint.

    Train runs ahead of Tune (reports wait in a queue for the trial's Tune process), so when a
    sweep is interrupted or a trial's process dies, the last epochs can be checkpointed without
    ever reaching Tune, and the resumed process starts after them. The checkpoint of its first
    epoch carries the run's whole ``metrics.jsonl``: those epochs go along with the result and
    the writer logs the ones MLflow lacks, so every epoch is logged once and in order.
    """
    start, path = int(result.get("start_epoch", 1)), result.get("checkpoint_path")
    if start <= 1 or result.get("epoch") != start or not path:
        return []
    from ray.train import Checkpoint

    from ifsearch.train import METRICS_NAME

    try:
        with Checkpoint(path).as_directory() as directory:
            lines = (Path(directory) / METRICS_NAME).read_text().splitlines()
    except (OSError, ValueError):  # an unreadable checkpoint: log what Tune saw
        return []
    epochs = [json.loads(line) for line in lines if line.strip()]
    return [{"step": int(e["epoch"]), "metrics": _metrics(e)} for e in epochs
            if int(e["epoch"]) < start]


def sync_spool(path: str | Path, tracking_uri: str | None = None) -> int:
    """Apply the records of a spool file to MLflow; returns how many were applied.

    Records are applied in order and the file is rewritten with those left whenever one fails,
    so running ``sync`` again after a second outage never logs a record twice.
    """
    path = Path(path)
    if not path.is_file():
        raise IfsearchError(f"no spool file {str(path)!r}: nothing to sync")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    writers: dict[tuple[str, str], RunWriter] = {}
    for done, record in enumerate(records):
        uri = tracking_uri or record["tracking_uri"]
        try:
            key = (uri, record["experiment"])
            if key not in writers:
                writers[key] = RunWriter(MlflowClient(uri), record["experiment"])
            writers[key].apply(record)
        except UNREACHABLE as exc:
            path.write_text("".join(json.dumps(r) + "\n" for r in records[done:]))
            raise IfsearchError(f"MLflow at {uri} is still unreachable ({exc}); {done} of "
                                f"{len(records)} records synced, the rest are kept in {path}; "
                                "run sync again later") from exc
    path.rename(path.with_name(f"{path.name}.synced-{time.strftime('%Y%m%d-%H%M%S')}"))
    return len(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ifsearch.tracking",
        description="Upload MLflow logging a sweep kept locally while the server was down.")
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="apply a spool file (the launcher prints its path)")
    sync.add_argument("spool", type=Path, help="e.g. runs/sweeps/NAME/mlflow_spool.jsonl")
    sync.add_argument("--mlflow-uri", default=None,
                      help="server to upload to (default: the one the sweep used)")
    args = parser.parse_args(argv)
    try:
        count = sync_spool(args.spool, args.mlflow_uri)
    except IfsearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"synced {count} records from {args.spool}")
    return 0


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
                      artifact_dirs: dict[str, Path] | None = None,
                      sweep_metrics: dict[str, float] | None = None) -> None:
    """Attach the sweep's results and close the parent run.

    ``metrics`` are the best trial's, logged as ``best_<name>``; ``sweep_metrics`` describe the
    sweep itself (e.g. ``slot_efficiency``) and keep their names: no trial was best at them.
    Also attached: files, plot folders, tags.
    """
    named = {f"best_{k}": v for k, v in (metrics or {}).items()} | (sweep_metrics or {})
    now = int(time.time() * 1000)
    logged = [Metric(k, float(v), now, 0) for k, v in named.items()
              if isinstance(v, (int, float)) and math.isfinite(v)]
    if logged:
        client.log_batch(parent_run_id, metrics=logged)
    for key, value in (tags or {}).items():
        client.set_tag(parent_run_id, key, value[:5000])
    for path in artifacts or []:
        client.log_artifact(parent_run_id, str(path))
    for name, directory in (artifact_dirs or {}).items():
        client.log_artifacts(parent_run_id, str(directory), artifact_path=name)
    client.set_terminated(parent_run_id, status=status)


if __name__ == "__main__":
    sys.exit(main())
