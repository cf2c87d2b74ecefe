"""The search service end to end: real local Ray, real `mlflow server`, real CLI processes."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ifsearch.config import load_config
from ifsearch.errors import ConfigError
from ifsearch.search.cli import build_parser, parse_worker_resources, resume_command
from ifsearch.search.cli import main as launch_main
from ifsearch.tracking.runs import (
    ERROR_TAG,
    INTERRUPTED_TAG,
    ROLE_TAG,
    SWEEP_TAG,
    TRIAL_NUMBER_TAG,
    TRIAL_TAG,
    WORKER_HOST_TAG,
    WORKER_NODE_TAG,
)
from ifsearch.tracking.server import start_local_server, stop_local_server

REPO = Path(__file__).resolve().parents[2]

# Tiny scenes: a trial epoch takes well under a second; Ray start-up dominates.
TINY_SPACE = {
    "base": {
        "data": {"num_points": 192, "train_scenes": 6, "val_scenes": 3, "max_instances": 3,
                 "batch_size": 3},
        "model": {"embed_dim": 16, "num_heads": 2, "ffn_dim": 32, "decoder_layers": 1},
        "train": {"warmup_epochs": 0.0},
    },
    # Sampled trials get a near-zero LR, so after epoch 1 their val_loss is ~9.294 (+-3e-4),
    # while the warm start (lr 1e-2) reaches ~6.97. Whatever order trials reach ASHA's first
    # rung in, one of the sampled trials lands below the cutoff: the early stop is certain.
    "space": {
        "train.lr": {"type": "loguniform", "low": 1.0e-7, "high": 1.0e-6},
        "train.weight_decay": {"type": "uniform", "low": 0.0, "high": 1.0e-4},
    },
    "objective": {"metric": "val_loss", "mode": "min"},
    "budget": {"num_samples": 4, "max_epochs": 4, "grace_period": 1},
    "scheduler": {"name": "asha", "reduction_factor": 2},
    "searcher": {"name": "tpe", "seed": 0},
}


SECRET = "s3cr3t-ifsearch-test-token-7f2a"  # in the environment of every launched sweep


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """(root, url) of a real local MLflow server for this module."""
    root = tmp_path_factory.mktemp("mlflow")
    server = start_local_server(root)
    yield root, server.url
    stop_local_server(root)


@pytest.fixture(scope="module")
def mlflow_server(mlflow_store):
    return mlflow_store[1]


@dataclass
class Launched:
    output: str  # stdout and stderr together
    pid: int  # the launcher's process id: Ray names its session folder after it


def launch(tmp_path, uri, *extra, timeout=420, wait=True):
    space = tmp_path / "tiny_space.yaml"
    space.write_text(yaml.safe_dump(TINY_SPACE))
    cmd = [sys.executable, "-m", "ifsearch.launch", "--space", str(space),
           "--storage", str(tmp_path / "sweeps"), "--mlflow-uri", uri,
           "--experiment", tmp_path.name, "--max-concurrent", "2", *extra]
    env = dict(os.environ, RAY_DEDUP_LOGS="0", IFSEARCH_TEST_SECRET=SECRET,
               AWS_SECRET_ACCESS_KEY=SECRET, MLFLOW_TRACKING_TOKEN=SECRET)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if not wait:
        return proc
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-8000:]
    return Launched(output, proc.pid)


def sweep_runs(uri, experiment, sweep):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}'")
    parents = [r for r in runs if r.data.tags[ROLE_TAG] == "sweep"]
    trials = [r for r in runs if r.data.tags[ROLE_TAG] == "trial"]
    return client, parents, trials


# -- Independent records of what happened, to compare MLflow with -----------------------------


@dataclass
class TuneTrial:
    """One trial as Tune recorded it in the sweep's storage (not as our logger saw it)."""

    status: str  # TERMINATED | ERROR | ...
    results: pd.DataFrame  # every result Tune received from the trial (its result.json)
    num_failures: int  # Tune's own count of the trial's failures (each one is a retry)


def tune_trials(sweep_dir: Path) -> dict[str, TuneTrial]:
    """Trial id -> Tune's record, read with Tune's ExperimentAnalysis."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(sweep_dir))
    return {t.trial_id: TuneTrial(t.status, analysis.trial_dataframes[t.trial_id],
                                  t.run_metadata.num_failures) for t in analysis.trials}


def expected_mlflow_status(trial: TuneTrial, max_epochs: int) -> str:
    """What MLflow must say, decided from Tune's records alone: ERROR, or TERMINATED with a last
    result flagged `diverged` -> FAILED; TERMINATED having reached the last epoch -> FINISHED;
    TERMINATED before it (a scheduler stopped it early) -> KILLED."""
    if trial.status == "ERROR":
        return "FAILED"
    assert trial.status == "TERMINATED", trial.status
    last = trial.results.iloc[-1].get("diverged")
    if isinstance(last, (bool, np.bool_)) and last:
        return "FAILED"
    reached = max(tune_epochs(trial))
    assert 1 <= reached <= max_epochs
    return "FINISHED" if reached == max_epochs else "KILLED"


OPTUNA_STATE = {"FINISHED": "COMPLETE", "KILLED": "PRUNED", "FAILED": "FAIL"}


def assert_statuses_agree(client, trial_runs, tune: dict[str, TuneTrial], max_epochs: int,
                          optuna_states: dict[str, str] | None = None) -> dict[str, str]:
    """Every Tune trial has exactly one MLflow run, whose status Tune's record implies and
    which logged the epochs Tune received; with ``optuna_states`` (trial id -> Optuna state
    name) the searcher's study must agree too. Returns trial id -> status."""
    by_trial = {r.data.tags[TRIAL_TAG]: r for r in trial_runs}
    assert len(by_trial) == len(trial_runs), "a trial has two MLflow runs"
    assert set(by_trial) == set(tune), (sorted(by_trial), sorted(tune))
    statuses = {}
    for trial_id, trial in tune.items():
        expected = expected_mlflow_status(trial, max_epochs)
        assert by_trial[trial_id].info.status == expected, (trial_id, trial.status, expected)
        # Every epoch Tune received is logged, up to the last one it received.
        epochs = tune_epochs(trial)
        history = client.get_metric_history(by_trial[trial_id].info.run_id, "val_loss")
        logged = {m.step for m in history}
        assert set(epochs) <= logged and max(logged, default=0) == max(epochs, default=0), (
            trial_id, sorted(logged), epochs)
        if optuna_states is not None:
            assert optuna_states[trial_id] == OPTUNA_STATE[expected], trial_id
        statuses[trial_id] = expected
    return statuses


def tune_epochs(trial: TuneTrial) -> list[int]:
    """The epochs a trial reported to Tune (a diverged trial's final result is no epoch).

    After ``Tuner.restore`` a resumed trial's result files hold only the results since the
    restore (seen with Ray 2.60), so this can miss a resumed trial's earlier epochs."""
    results = trial.results
    if "diverged" in results:
        results = results[~results["diverged"].eq(True)]
    return sorted(set(int(e) for e in results["epoch"]))


def assert_epochs_logged_once(client, run, key="val_loss") -> list[int]:
    """Every metric of the run has each epoch at most once (counted per step, so a re-logged
    epoch is caught) and, in the order they were logged (time stamps), strictly increasing
    epochs: after a restart logging continued, it did not start over. ``key``, logged every
    epoch, has epochs 1..n without gaps. Returns those epochs."""
    for name in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, name)
        counts = Counter(m.step for m in history)
        assert all(n == 1 for n in counts.values()), (name, sorted(counts.items()))
        in_time = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
        assert all(a < b for a, b in zip(in_time, in_time[1:])), (name, in_time)
    epochs = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
    assert epochs == list(range(1, len(epochs) + 1)), (key, epochs)
    return epochs


def assert_no_config_repeated(trial_runs) -> None:
    """No two trials of the sweep evaluated the same sampled parameters."""
    searched = [tuple((k, r.data.params[k]) for k in sorted(
        r.data.tags["ifsearch.searched"].split(","))) for r in trial_runs]
    assert len(set(searched)) == len(searched), searched


def ray_actor_processes(launcher_pid: int) -> Counter:
    """How many processes of each actor class the sweep's local Ray started (Ray's own record:
    each worker process's log file names its actor class). A restarted Train worker group, or
    a trial Tune retried, adds processes: this counts attempts without asking our code."""
    from ray._common.utils import get_default_ray_temp_dir

    sessions = sorted(Path(get_default_ray_temp_dir()).glob(f"session_*_{launcher_pid}"))
    assert sessions, f"no Ray session of process {launcher_pid}"
    counts = Counter()
    for log in (sessions[-1] / "logs").rglob("worker-*.out"):  # the newest: pids recycle
        with open(log, errors="replace") as f:
            head = [f.readline() for _ in range(4)]
        counts.update({line.split(":")[2].strip() for line in head
                       if line.startswith(":actor_name:")})
    return counts


@pytest.mark.slow
def test_sweep_logs_to_mlflow_exports_and_warm_starts(tmp_path, mlflow_server):
    warm = tmp_path / "warm.yaml"
    warm_config = {k: dict(v) for k, v in TINY_SPACE["base"].items()}
    warm_config["train"].update({"lr": 0.01, "weight_decay": 7.0e-5})
    warm.write_text(yaml.safe_dump(warm_config))
    out = launch(tmp_path, mlflow_server, "--name", "e2e", "--warm-start", str(warm)).output
    assert "best config:" in out and "MLflow UI:" in out

    client, parents, trials = sweep_runs(mlflow_server, tmp_path.name, "e2e")
    assert len(parents) == 1 and len(trials) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["scheduler"] == "asha" and "ray_version" in parent.data.params
    parent_files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "trials.csv", "plots"} <= parent_files
    plots = {f.path for f in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/val_loss_vs_epoch.png" in plots

    # Statuses and epochs as Tune recorded them: ASHA's early stops are KILLED, full trials
    # FINISHED, and each run has every epoch its trial reported.
    tune = tune_trials(tmp_path / "sweeps" / "e2e")
    statuses = assert_statuses_agree(client, trials, tune, max_epochs=4)
    assert "KILLED" in statuses.values(), "ASHA stopped no trial early"
    assert all(t.num_failures == 0 for t in tune.values())
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["train.lr"] and run.data.params["loss.name"] == "influencer"
        assert "training_iteration" not in run.data.metrics  # no Tune bookkeeping
        assert len(run.data.tags[WORKER_NODE_TAG]) > 20 and run.data.tags[WORKER_HOST_TAG]
        assert_epochs_logged_once(client, run)

    # Warm start: the given config is the first trial evaluated.
    assert sorted(r.data.tags[TRIAL_NUMBER_TAG] for r in trials) == ["1", "2", "3", "4"]
    first = [r for r in trials if r.data.tags[TRIAL_NUMBER_TAG] == "1"][0]
    assert float(first.data.params["train.lr"]) == pytest.approx(0.01)
    assert float(first.data.params["train.weight_decay"]) == pytest.approx(7.0e-5)
    assert statuses[first.data.tags[TRIAL_TAG]] == "FINISHED"  # the best trial is never cut

    best = tmp_path / "sweeps" / "e2e" / "best_config.yaml"
    details = json.loads(best.with_name("best_config_trial.json").read_text())
    assert details["checkpoint"] and details["metric"] == "val_loss"
    config = load_config(best)
    assert config.train.epochs == 4 and config.data.num_points == 192
    best_run = [r for r in trials if r.data.tags[TRIAL_TAG] == details["trial_id"]][0]
    assert float(best_run.data.params["train.lr"]) == pytest.approx(config.train.lr)

    retrain = subprocess.run(
        [sys.executable, "-m", "ifsearch.train", "--config", str(best),
         "--output-dir", str(tmp_path / "retrain"), "--set", "train.epochs=1"],
        capture_output=True, text=True, timeout=300,
    )
    assert retrain.returncode == 0, retrain.stderr
    assert (tmp_path / "retrain" / "checkpoint.pt").exists()

    exported = tmp_path / "exported.yaml"
    export = subprocess.run(
        [sys.executable, "-m", "ifsearch.export", "--experiment", tmp_path.name,
         "--mlflow-uri", mlflow_server, "--metric", "val_loss", "--mode", "min", "--top", "2",
         "--output", str(exported)],
        capture_output=True, text=True, timeout=120,
    )
    assert export.returncode == 0, export.stderr
    assert load_config(exported) == config
    exported_details = json.loads(tmp_path.joinpath("exported_trial.json").read_text())
    assert exported_details["trial_id"] == details["trial_id"]
    assert exported_details["checkpoint"] == details["checkpoint"]
    assert exported.with_name("exported_rank2.yaml").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_sweep_resumes_without_duplicates(tmp_path, mlflow_server, sig):
    epochs = 8
    proc = launch(tmp_path, mlflow_server, "--name", "resumable", "--scheduler", "fifo",
                  "--max-epochs", str(epochs), wait=False)
    client = MlflowClient(mlflow_server)
    deadline, ready = time.time() + 300, False
    try:
        # Interrupt once a trial is done and another is mid-training: 2-5 of its 8 epochs
        # logged, so a checkpoint exists (every 2nd epoch) and epochs are left when the signal
        # lands (a narrower window is missed when the 0.5 s epochs outpace these queries).
        while time.time() < deadline and not ready:
            exp = client.get_experiment_by_name(tmp_path.name)
            runs = [] if exp is None else client.search_runs(
                [exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
            done = [r for r in runs if r.info.status != "RUNNING"]
            midway = [r for r in runs if r.info.status == "RUNNING" and 2 <= len(
                client.get_metric_history(r.info.run_id, "val_loss")) <= epochs - 3]
            ready = bool(done and midway)
            time.sleep(0.5)
        assert ready, "no moment with a finished trial and one mid-training"
        if sig == signal.SIGINT:  # Ctrl+C reaches the whole foreground process group
            os.killpg(proc.pid, sig)
        else:  # `kill` or a batch scheduler signals the launcher
            os.kill(proc.pid, sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output[-3000:]
    printed = [line.strip() for line in output.splitlines()
               if line.strip().startswith("python -m ifsearch.launch --resume --name resumable")]
    assert printed, output[-3000:]
    _, parents, before = sweep_runs(mlflow_server, tmp_path.name, "resumable")
    # Nothing is left RUNNING: the parent and the unfinished trials are KILLED + interrupted.
    assert all(r.info.status != "RUNNING" for r in parents + before)
    assert parents[0].info.status == "KILLED"
    assert parents[0].data.tags[INTERRUPTED_TAG] == "true"
    # Interrupted trials that had logged epochs (and so had checkpoints) must resume them.
    cut = {r.data.tags[TRIAL_TAG]: len(client.get_metric_history(r.info.run_id, "val_loss"))
           for r in before if INTERRUPTED_TAG in r.data.tags and r.data.tags[ROLE_TAG] == "trial"}
    assert any(cut.values()), "no interrupted trial had logged an epoch"

    # The printed command repeats the budget and every option: Tune does not restore those.
    out = launch(tmp_path, mlflow_server, *shlex.split(printed[-1])[3:]).output
    assert "resuming sweep resumable" in out
    client, parents, trials = sweep_runs(mlflow_server, tmp_path.name, "resumable")
    trial_ids = [r.data.tags[TRIAL_TAG] for r in trials]
    assert len(parents) == 1
    assert len(trial_ids) == len(set(trial_ids)) == 4  # no trial ran twice, none was lost
    assert parents[0].info.status == "FINISHED"
    assert not any(INTERRUPTED_TAG in r.data.tags for r in parents + trials)
    # The Optuna study survived too: resumed trials kept their Optuna trial, their epochs went
    # on, and its states agree with Tune's record and MLflow.
    import optuna

    study = optuna.load_study(study_name="resumable", storage="sqlite:///"
                              f"{tmp_path / 'sweeps' / 'resumable' / 'optuna.db'}")
    by_tune_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert sorted(by_tune_id) == sorted(trial_ids)
    assert sorted(t.number for t in study.trials) == list(range(len(trial_ids)))
    assert_statuses_agree(client, trials, tune_trials(tmp_path / "sweeps" / "resumable"),
                          max_epochs=epochs,
                          optuna_states={k: t.state.name for k, t in by_tune_id.items()})
    resumed = 0
    for run in trials:
        logged = assert_epochs_logged_once(client, run)
        optuna_trial = by_tune_id[run.data.tags[TRIAL_TAG]]
        # Epochs checkpointed but never received by Tune before the interruption reach MLflow
        # from the checkpoint (tracking), not the searcher: Optuna may lack those, no others.
        steps = sorted(optuna_trial.intermediate_values)
        assert set(steps) <= set(logged) and steps[-1] == logged[-1], (steps, logged)
        logged_before = cut.get(run.data.tags[TRIAL_TAG], 0)
        if logged_before and len(logged) > logged_before:  # it trained again after --resume
            starts = [m.value for m in client.get_metric_history(run.info.run_id,
                                                                 "start_epoch")]
            # The resumed process started from its checkpoint, not at epoch 1 (epochs it
            # had checkpointed but Tune never received are logged from that checkpoint).
            assert max(starts) > 1, (starts, logged_before)
            resumed += 1
    assert resumed, "no interrupted trial trained again after --resume"
    # The searcher did not suggest a config twice.
    assert_no_config_repeated(trials)


def test_bad_space_fails_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"space": {"loss.margn": {"type": "uniform", "low": 0,
                                                           "high": 1}}}))
    run = subprocess.run([sys.executable, "-m", "ifsearch.launch", "--space", str(bad),
                          "--mlflow-uri", "http://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2
    assert "bad.yaml" in run.stderr and "loss.margn" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "runs").exists()


def test_unreachable_mlflow_uri_fails_before_ray_starts(tmp_path):
    run = subprocess.run([sys.executable, "-m", "ifsearch.launch",
                          "--mlflow-uri", "http://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2
    assert "http://127.0.0.1:9" in run.stderr and "Traceback" not in run.stderr


def test_worker_resources_are_parsed_and_checked():
    assert parse_worker_resources(["trainer=1", "a100 = 0.5"]) == {"trainer": 1.0, "a100": 0.5}
    assert parse_worker_resources([]) == {}
    for bad in ("trainer", "=1", "trainer=0", "trainer=-1", "trainer=x", "trainer=inf"):
        with pytest.raises(ConfigError, match="NAME=AMOUNT"):
            parse_worker_resources([bad])
    with pytest.raises(ConfigError, match="--gpus-per-worker"):
        parse_worker_resources(["GPU=1"])


def test_cluster_options_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("IFSEARCH_STORAGE", "s3://bucket/sweeps")
    args = build_parser().parse_args([])
    assert args.address == "10.0.0.1:6379" and args.storage == "s3://bucket/sweeps"
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.delenv("IFSEARCH_STORAGE")
    args = build_parser().parse_args([])
    assert args.address is None and args.storage is None


@pytest.mark.parametrize("options, message", [
    (["--worker-resource", "trainer=1"], "--worker-resource needs a Ray cluster"),
    (["--address", "auto", "--worker-resource", "trainer"], "expected NAME=AMOUNT"),
    (["--wait-for-nodes", "-1"], "--wait-for-nodes = -1.0: must be >= 0"),
])
def test_bad_cluster_options_fail_before_ray_starts(tmp_path, monkeypatch, capsys, options,
                                                    message):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert launch_main(["--mlflow-uri", "http://127.0.0.1:9", *options]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_resume_command_repeats_every_option_given():
    argv = ["--space", "my space.yaml", "--max-epochs", "8", "--num-samples", "3",
            "--set", "data.num_points=64", "--set", "model.embed_dim=8", "--scheduler", "fifo",
            "--cpus-per-worker", "0.5", "--storage", "/tmp/s", "--experiment", "e", "--name", "n"]
    args = build_parser().parse_args(argv)
    words = shlex.split(resume_command(args, "n"))
    assert words[:6] == ["python", "-m", "ifsearch.launch", "--resume", "--name", "n"]
    again = build_parser().parse_args(words[3:])
    assert again.resume and vars(again) == {**vars(args), "resume": True}


def test_help_explains_every_option():
    text = build_parser().format_help()
    for option in ("--space", "--num-samples", "--max-concurrent", "--scheduler", "--searcher",
                   "--workers-per-trial", "--gpus-per-worker", "--address", "--storage",
                   "--mlflow-uri", "--experiment", "--name", "--resume", "--warm-start",
                   "--seed", "--set", "--worker-resource", "--wait-for-nodes"):
        assert option in text
    assert "nsga2" in text and "hyperband" in text


@pytest.mark.parametrize("searcher", ["tpe", "random", "cmaes", "nsga2"])
@pytest.mark.parametrize("scheduler", ["asha", "hyperband", "median", "fifo"])
def test_every_searcher_and_scheduler_builds(tmp_path, searcher, scheduler):
    from ifsearch.search.cli import plan_sweep
    from ifsearch.search.sweep import build_scheduler, build_searcher

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(TINY_SPACE))
    args = build_parser().parse_args(["--space", str(space), "--searcher", searcher,
                                      "--scheduler", scheduler, "--max-epochs", "3"])
    plan = plan_sweep(args)
    assert plan.max_epochs == 3 and plan.grace_period == 1
    search_alg = build_searcher(plan, f"sqlite:///{tmp_path / 'optuna.db'}")
    if searcher == "nsga2":  # multi-objective: quality vs cost
        assert search_alg._metric == ["val_loss", "epoch_seconds"]
    assert type(build_scheduler(plan)).__name__ == {
        "asha": "AsyncHyperBandScheduler", "hyperband": "HyperBandScheduler",
        "median": "MedianStoppingRule", "fifo": "FIFOScheduler"}[scheduler]


@pytest.mark.slow
def test_diverging_trial_fails_once_without_retries(tmp_path, mlflow_server):
    """A trial whose loss turns NaN fails once: Train does not restart its workers and Tune
    does not retry it (Ray's records of processes and failures say so), MLflow says FAILED
    with the reason, and it neither crashes the sweep nor becomes the best config."""
    diverging = tmp_path / "diverging.yaml"
    config = {k: dict(v) for k, v in TINY_SPACE["base"].items()}
    config["train"].update({"lr": 1.0e30, "weight_decay": 0.0})
    diverging.write_text(yaml.safe_dump(config))
    sweep = launch(tmp_path, mlflow_server, "--name", "nan", "--warm-start", str(diverging),
                   "--num-samples", "2", "--max-epochs", "2", "--scheduler", "fifo")

    client, parents, trials = sweep_runs(mlflow_server, tmp_path.name, "nan")
    by_number = {int(r.data.tags[TRIAL_NUMBER_TAG]): r for r in trials}
    failed, healthy = by_number[1], by_number[2]
    assert failed.info.status == "FAILED"
    assert "DivergenceError: training diverged" in failed.data.tags[ERROR_TAG]
    assert "val_loss" not in failed.data.metrics  # nothing recorded for the bad epoch
    assert healthy.info.status == "FINISHED"
    assert parents[0].info.status == "FINISHED"
    best = load_config(tmp_path / "sweeps" / "nan" / "best_config.yaml")
    assert best.train.lr == pytest.approx(float(healthy.data.params["train.lr"]))

    # One attempt per trial: one trial process and one Train worker process (one train_loop
    # run) per trial, and no failure in Tune's books; a retried divergence starts more.
    tune = tune_trials(tmp_path / "sweeps" / "nan")
    processes = ray_actor_processes(sweep.pid)
    assert (processes["ImplicitFunc"], processes["RayTrainWorker"]) == (2, 2), processes
    assert [t.num_failures for t in tune.values()] == [0, 0]
    assert_statuses_agree(client, trials, tune, max_epochs=2)
    diverged = tune[failed.data.tags[TRIAL_TAG]]
    assert diverged.status == "TERMINATED" and diverged.results["diverged"].iloc[-1]
    assert "DivergenceError" in diverged.results["error"].iloc[-1]


@pytest.mark.slow
def test_mlflow_outage_mid_sweep_is_spooled_and_synced(tmp_path):
    """The server dies mid-sweep: training goes on, logging is kept locally with a warning,
    and `python -m ifsearch.tracking sync` uploads it once the server is back."""
    root = tmp_path / "mlflow"
    url = start_local_server(root).url
    proc = launch(tmp_path, url, "--name", "outage", wait=False)
    client = MlflowClient(url)
    try:
        deadline = time.time() + 300
        logged = []
        while time.time() < deadline and not logged:
            exp = client.get_experiment_by_name(tmp_path.name)
            runs = [] if exp is None else client.search_runs(
                [exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
            logged = [r for r in runs if "val_loss" in r.data.metrics]
            time.sleep(0.5)
        assert logged, "no trial logged a metric in time"
        stop_local_server(root)  # the outage
        output, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stop_local_server(root)
    assert proc.returncode == 0, output[-4000:]
    spool = tmp_path / "sweeps" / "outage" / "mlflow_spool.jsonl"
    assert "is unreachable" in output and f"python -m ifsearch.tracking sync {spool}" in output
    assert spool.exists() and (tmp_path / "sweeps" / "outage" / "best_config.yaml").exists()

    url = start_local_server(root).url  # the server is back (same store, maybe another port)
    try:
        sync = subprocess.run([sys.executable, "-m", "ifsearch.tracking", "sync", str(spool),
                               "--mlflow-uri", url], capture_output=True, text=True, timeout=300)
        assert sync.returncode == 0, sync.stderr
        assert not spool.exists()  # renamed to .synced-<time>: a second sync has nothing to do
        client, parents, trials = sweep_runs(url, tmp_path.name, "outage")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert "best_config.yaml" in {f.path for f in client.list_artifacts(parents[0].info.run_id)}
        assert len(trials) == 4
        assert_statuses_agree(client, trials, tune_trials(tmp_path / "sweeps" / "outage"),
                              max_epochs=4)
        for run in trials:  # none lost or doubled, in order
            assert assert_epochs_logged_once(client, run)
    finally:
        stop_local_server(root)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["ray::RayTrainWorker", "ray::ImplicitFunc"],
                         ids=["train-worker", "trial-driver"])
def test_killed_process_resumes_the_trial_from_its_checkpoint(tmp_path, mlflow_server, victim):
    """SIGKILL a Train worker (Train restarts the worker group) or the trial's own process
    (Tune restarts the trial): the trial resumes from its last checkpoint, its epochs continue
    in the same MLflow run, and the sweep finishes. One trial at a time, so the local Ray has
    the CPUs of one trial only: the restart gets them only if the dead run's workers' placement
    group was freed (for a dead trial process, by ``FreeWorkersOfDeadTrials``)."""
    from ifsearch.tracking.server import process_tree

    epochs = 8
    proc = launch(tmp_path, mlflow_server, "--name", "faulty", "--num-samples", "1",
                  "--max-concurrent", "1",
                  "--max-epochs", str(epochs), "--scheduler", "fifo",
                  "--set", "data.num_points=768", "--set", "data.train_scenes=18", wait=False)
    client = MlflowClient(mlflow_server)
    try:
        deadline, run = time.time() + 300, None
        while time.time() < deadline:  # kill once epoch 2 is logged (a checkpoint exists)
            exp = client.get_experiment_by_name(tmp_path.name)
            runs = [] if exp is None else client.search_runs(
                [exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
            if runs and runs[0].data.metrics.get("epoch_seconds") is not None and len(
                    client.get_metric_history(runs[0].info.run_id, "val_loss")) >= 2:
                run = runs[0]
                break
            time.sleep(0.2)
        assert run is not None, "the trial never reached epoch 2"
        pids = [p for p in process_tree(proc.pid)
                if Path(f"/proc/{p}/cmdline").read_bytes().startswith(victim.encode())]
        assert pids, f"no {victim} process under the launcher"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    run = client.get_run(run.info.run_id)
    tune = tune_trials(tmp_path / "sweeps" / "faulty")
    assert assert_statuses_agree(client, [run], tune, max_epochs=epochs) == {
        run.data.tags[TRIAL_TAG]: "FINISHED"}
    assert assert_epochs_logged_once(client, run) == list(range(1, epochs + 1))
    resumed = [m.value for m in client.get_metric_history(run.info.run_id, "start_epoch")]
    assert max(resumed) > 1, "the trial started over instead of resuming its checkpoint"
    # The fault was retried by the layer that owns it: a new Train worker group, and for a
    # dead trial process also a Tune retry (Ray's records, not ours).
    processes = ray_actor_processes(proc.pid)
    # Helpers Ray Train and Tune start per run, which trials do without (trainables/driver.py):
    # the driver frees a dead run's placement group, and reads its reports from the controller.
    assert processes["PlacementGroupCleaner"] == processes["_QueueActor"] == 0, processes
    trial = next(iter(tune.values()))
    if victim == "ray::RayTrainWorker":
        assert (processes["ImplicitFunc"], processes["RayTrainWorker"]) == (1, 2), processes
        assert trial.num_failures == 0
    else:
        assert (processes["ImplicitFunc"], processes["RayTrainWorker"]) == (2, 2), processes
        assert trial.num_failures == 1


@pytest.mark.slow
def test_no_secret_reaches_the_mlflow_store(mlflow_store, tmp_path):
    """Credentials in the environment (and Ray's auth token) are never logged: scan every file
    of the server's store (sqlite database and artifacts) after the sweeps of this module."""
    root, url = mlflow_store
    launch(tmp_path, url, "--name", "secret", "--num-samples", "1", "--max-epochs", "1")
    secrets = [SECRET.encode()]
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file() and token.read_text().strip():
        secrets.append(token.read_text().strip().encode())
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in files) and len(files) > 5
    leaks = [str(p) for p in files for secret in secrets if secret in p.read_bytes()]
    assert not leaks


def test_more_gpus_than_the_machine_has_fails_fast(tmp_path, mlflow_server):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    started = time.time()
    run = subprocess.run([sys.executable, "-m", "ifsearch.launch", "--gpus-per-worker", "1",
                          "--mlflow-uri", mlflow_server, "--storage", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2
    assert "a trial needs 1 GPUs but this machine has 0" in run.stderr, run.stderr
    assert time.time() - started < 60 and "Traceback" not in run.stderr


def _listening_hosts(port: int) -> set[str]:
    """Addresses a local TCP port listens on, from /proc/net/tcp{,6} ('::' = every interface)."""
    hosts = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A = LISTEN
                if width == 8:
                    hosts.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    hosts.add("::" if set(address) == {"0"} else address)
    return hosts


@pytest.mark.slow
def test_mlflow_server_and_ray_dashboard_listen_on_loopback_only(mlflow_server):
    import argparse
    from urllib.parse import urlparse

    import ray

    from ifsearch.search.sweep import start_ray

    assert _listening_hosts(urlparse(mlflow_server).port) == {"127.0.0.1"}
    args = argparse.Namespace(address=None, workers_per_trial=1, cpus_per_worker=1.0,
                              gpus_per_worker=0.0, max_concurrent=1, wait_for_nodes=0.0)
    start_ray(args)
    try:
        dashboard = ray._private.worker.global_worker.node.webui_url  # host:port
        assert dashboard.startswith("127.0.0.1:")
        assert _listening_hosts(int(dashboard.rsplit(":", 1)[1])) == {"127.0.0.1"}
    finally:
        ray.shutdown()


# -- What the user sees (issue 15): a quiet console, checks before side effects -----------------

@pytest.mark.slow
def test_console_is_quiet_by_default_and_the_log_holds_the_rest(tmp_path, mlflow_server):
    quiet = launch(tmp_path, mlflow_server, "--name", "quiet", "--num-samples", "2",
                   "--max-epochs", "1", "--scheduler", "fifo").output
    for line in ("trial", "status", "epoch", "val_loss", "best trial: quiet/t0",
                 "sweep efficiency:", "quiet/t01 finished all 1 epochs",
                 "quiet/t02 finished all 1 epochs"):
        assert line in quiet, (line, quiet)
    # Ray Train's controller logs from the trial's driver (trainables/ray_report.py runs it
    # there): "(train_driver_fn pid=...) Started training worker group of size 1".
    noises = ("RayTrainWorker", "Started training worker group", "Result for")
    for noise in (*noises, "PreemptionWatcher"):
        assert noise not in quiet, (noise, quiet)
    log = (tmp_path / "sweeps" / "quiet" / "launch.log").read_text()
    assert f"log (Ray, Ray Train and Tune output): {tmp_path / 'sweeps' / 'quiet'}" in quiet
    for noise in noises:
        assert noise in log, noise
    assert "best trial: quiet/t0" in log  # the log alone tells the whole story

    loud = launch(tmp_path, mlflow_server, "--name", "loud", "--num-samples", "1",
                  "--max-epochs", "1", "--scheduler", "fifo", "--verbose").output
    for noise in noises:
        assert noise in loud, noise
    assert not (tmp_path / "sweeps" / "loud" / "launch.log").exists()


def _new_ray_processes(since: float) -> list[str]:
    import psutil

    found = []
    for proc in psutil.process_iter(["name", "cmdline", "create_time"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["create_time"] >= since and ("raylet" in cmd or "gcs_server" in cmd):
            found.append(cmd[:120])
    return found


@pytest.mark.slow
@pytest.mark.parametrize("case", ["resume without state", "study exists", "too many GPUs"])
def test_a_refused_sweep_leaves_no_server_or_ray_behind(tmp_path, case):
    """Every check that can refuse a sweep runs before the local MLflow server or Ray starts
    (no --mlflow-uri here: a local server would be started under runs/mlflow)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    space = tmp_path / "tiny_space.yaml"
    space.write_text(yaml.safe_dump(TINY_SPACE))
    args = ["--space", str(space), "--storage", str(tmp_path / "sweeps"), "--name", "refused"]
    if case == "resume without state":
        args.append("--resume")
        message = "--resume: no Tune experiment state in"
    elif case == "study exists":  # a study of that name left in the sweep folder
        import optuna

        (tmp_path / "sweeps" / "refused").mkdir(parents=True)
        optuna.create_study(study_name="refused", storage="sqlite:///"
                            f"{tmp_path / 'sweeps' / 'refused' / 'optuna.db'}")
        message = "the Optuna study 'refused' already exists"
    else:
        args += ["--gpus-per-worker", "1"]
        message = "a trial needs 1 GPUs but this machine has"
    started = time.time()
    run = subprocess.run([sys.executable, "-m", "ifsearch.launch", *args], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 2, run.stdout + run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "runs" / "mlflow").exists()  # no local MLflow server
    assert _new_ray_processes(started) == []
