"""The search service end to end: real local Ray, real `mlflow server`, real CLI processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ifsearch.config import load_config
from ifsearch.errors import ConfigError
from ifsearch.launch import build_parser, parse_worker_resources
from ifsearch.launch import main as launch_main
from ifsearch.tracking import (
    INTERRUPTED_TAG,
    ROLE_TAG,
    SWEEP_TAG,
    TRIAL_NUMBER_TAG,
    TRIAL_TAG,
    WORKER_HOST_TAG,
    WORKER_NODE_TAG,
)
from ifsearch.tracking_server import start_local_server, stop_local_server

REPO = Path(__file__).resolve().parents[1]

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


def launch(tmp_path, uri, *extra, timeout=420, wait=True):
    space = tmp_path / "tiny_space.yaml"
    space.write_text(yaml.safe_dump(TINY_SPACE))
    cmd = [sys.executable, "-m", "ifsearch.launch", "--space", str(space),
           "--storage", str(tmp_path / "sweeps"), "--mlflow-uri", uri,
           "--experiment", tmp_path.name, "--max-concurrent", "2", *extra]
    env = dict(os.environ, RAY_DEDUP_LOGS="0", IFSEARCH_TEST_SECRET=SECRET,
               AWS_SECRET_ACCESS_KEY=SECRET, MLFLOW_TRACKING_TOKEN=SECRET)
    if not wait:
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run.stdout


def sweep_runs(uri, experiment, sweep):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}'")
    parents = [r for r in runs if r.data.tags[ROLE_TAG] == "sweep"]
    trials = [r for r in runs if r.data.tags[ROLE_TAG] == "trial"]
    return client, parents, trials


@pytest.mark.slow
def test_sweep_logs_to_mlflow_exports_and_warm_starts(tmp_path, mlflow_server):
    warm = tmp_path / "warm.yaml"
    warm_config = {k: dict(v) for k, v in TINY_SPACE["base"].items()}
    warm_config["train"].update({"lr": 0.01, "weight_decay": 7.0e-5})
    warm.write_text(yaml.safe_dump(warm_config))
    out = launch(tmp_path, mlflow_server, "--name", "e2e", "--warm-start", str(warm))
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

    statuses = {}
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["train.lr"] and run.data.params["loss.name"] == "influencer"
        assert "training_iteration" not in run.data.metrics  # no Tune bookkeeping
        assert len(run.data.tags[WORKER_NODE_TAG]) > 20 and run.data.tags[WORKER_HOST_TAG]
        history = client.get_metric_history(run.info.run_id, "val_loss")
        epochs = [m.step for m in history]
        assert epochs == list(range(1, len(epochs) + 1))
        # FINISHED when all 4 epochs ran, KILLED when ASHA stopped the trial early.
        expected = "FINISHED" if len(epochs) == 4 else "KILLED"
        assert run.info.status == expected
        statuses[run.data.tags[TRIAL_TAG]] = expected
    assert "KILLED" in statuses.values(), "ASHA stopped no trial early"

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
    proc = launch(tmp_path, mlflow_server, "--name", "resumable", wait=False)
    client = MlflowClient(mlflow_server)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # interrupt once some but not all trials are done
            exp = client.get_experiment_by_name(tmp_path.name)
            done = [] if exp is None else client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`{ROLE_TAG}` = 'trial' and attributes.status != 'RUNNING'")
            if done:
                break
            time.sleep(1)
        assert done, "no trial finished in time"
        if sig == signal.SIGINT:  # Ctrl+C reaches the whole foreground process group
            os.killpg(proc.pid, sig)
        else:  # `kill` or a batch scheduler signals the launcher
            os.kill(proc.pid, sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output[-3000:]
    assert "--resume --name resumable" in output
    _, parents, before = sweep_runs(mlflow_server, tmp_path.name, "resumable")
    # Nothing is left RUNNING: the parent and the unfinished trials are KILLED + interrupted.
    assert all(r.info.status != "RUNNING" for r in parents + before)
    assert parents[0].info.status == "KILLED"
    assert parents[0].data.tags[INTERRUPTED_TAG] == "true"

    out = launch(tmp_path, mlflow_server, "--resume", "--name", "resumable")
    assert "resuming sweep resumable" in out
    _, parents, trials = sweep_runs(mlflow_server, tmp_path.name, "resumable")
    trial_ids = [r.data.tags[TRIAL_TAG] for r in trials]
    assert len(parents) == 1
    assert len(trial_ids) == len(set(trial_ids)) == 4  # no trial ran twice, none was lost
    assert all(r.info.status in ("FINISHED", "KILLED") for r in trials)
    assert parents[0].info.status == "FINISHED"
    assert not any(INTERRUPTED_TAG in r.data.tags for r in parents + trials)
    # The searcher state survived: the resumed sweep sampled only the missing trials.
    configs = {(r.data.params["train.lr"], r.data.params["train.weight_decay"]) for r in trials}
    assert len(configs) == 4
    # So did the Optuna study: resumed trials kept their Optuna trial and its epochs went on.
    import optuna

    study = optuna.load_study(study_name="resumable", storage="sqlite:///"
                              f"{tmp_path / 'sweeps' / 'resumable' / 'optuna.db'}")
    by_tune_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert sorted(by_tune_id) == sorted(trial_ids)
    for run in trials:
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "val_loss")}
        optuna_trial = by_tune_id[run.data.tags[TRIAL_TAG]]
        assert sorted(optuna_trial.intermediate_values) == sorted(steps)
        assert optuna_trial.state.name == {"FINISHED": "COMPLETE",
                                           "KILLED": "PRUNED"}[run.info.status]


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
    from ifsearch.launch import plan_sweep
    from ifsearch.sweep import build_scheduler, build_searcher

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
def test_diverging_trial_fails_alone_with_its_reason(tmp_path, mlflow_server):
    """A trial whose loss turns NaN is failed (not retried into garbage), says why in MLflow,
    and neither crashes the sweep nor becomes the best config."""
    diverging = tmp_path / "diverging.yaml"
    config = {k: dict(v) for k, v in TINY_SPACE["base"].items()}
    config["train"].update({"lr": 1.0e30, "weight_decay": 0.0})
    diverging.write_text(yaml.safe_dump(config))
    launch(tmp_path, mlflow_server, "--name", "nan", "--warm-start", str(diverging),
           "--num-samples", "2", "--max-epochs", "2", "--scheduler", "fifo")

    _, parents, trials = sweep_runs(mlflow_server, tmp_path.name, "nan")
    by_number = {int(r.data.tags[TRIAL_NUMBER_TAG]): r for r in trials}
    failed, healthy = by_number[1], by_number[2]
    assert failed.info.status == "FAILED"
    assert "DivergenceError: training diverged" in failed.data.tags["ifsearch.error"]
    assert healthy.info.status == "FINISHED"
    assert parents[0].info.status == "FINISHED"
    best = load_config(tmp_path / "sweeps" / "nan" / "best_config.yaml")
    assert best.train.lr == pytest.approx(float(healthy.data.params["train.lr"]))


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
        for run in trials:
            assert run.info.status in ("FINISHED", "KILLED")
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
            assert sorted(steps) == list(range(1, len(steps) + 1)) and steps  # none lost or doubled
    finally:
        stop_local_server(root)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["ray::RayTrainWorker", "ray::ImplicitFunc"],
                         ids=["train-worker", "trial-driver"])
def test_killed_process_resumes_the_trial_from_its_checkpoint(tmp_path, mlflow_server, victim):
    """SIGKILL a Train worker (Train restarts the worker group) or the trial's own process
    (Tune restarts the trial): the trial resumes from its last checkpoint, its epochs continue
    in the same MLflow run, and the sweep finishes."""
    from ifsearch.tracking_server import process_tree

    epochs = 8
    proc = launch(tmp_path, mlflow_server, "--name", "faulty", "--num-samples", "1",
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
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))
    assert steps[-1] == epochs and set(steps) == set(range(1, epochs + 1))
    resumed = [m.value for m in client.get_metric_history(run.info.run_id, "start_epoch")]
    assert max(resumed) > 1, "the trial started over instead of resuming its checkpoint"


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

    from ifsearch.sweep import start_ray

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
