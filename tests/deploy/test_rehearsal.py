"""A real two-node Ray cluster on 127.0.0.1 with token auth, MLflow on PostgreSQL, `ray job submit`.

The pieces of the runbook's local rehearsal (`python deploy/rehearsal.py`): the first two
tests run its two steps; everything the module starts, it stops.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy"))

from rehearsal import (  # noqa: E402  (deploy/rehearsal.py: a script, not a package)
    TRAINER_RESOURCE,
    marked_pids,
    mlflow_on_postgres,
    postgres,
    ray_cli,
    ray_cluster,
    rehearse,
    rehearse_head_loss,
)

from ifsearch.tracking.runs import SWEEP_TAG, WORKER_HOST_TAG  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(cluster, db, mlflow_uri, work dir): the services of the rehearsal, stopped at the end."""
    work = tmp_path_factory.mktemp("cluster")
    with postgres() as db, mlflow_on_postgres(db, work / "mlflow") as uri, \
            ray_cluster() as cluster:
        yield cluster, db, uri, work
    assert marked_pids(cluster.marker) == []  # nothing of the cluster or of its jobs is left


def test_sweep_submitted_as_a_job_trains_on_the_worker_node_and_logs_to_postgres(stack):
    cluster, db, uri, work = stack
    storage = work / "shared" / "sweeps"
    result = rehearse(cluster, db, uri, storage, "job-sweep", experiment="cluster-test")
    output = result.job.stdout + result.job.stderr
    assert result.checks == dict.fromkeys(result.checks, True), output[-6000:]
    assert "Job 'raysubmit_" in output and "succeeded" in output
    # The head (which has CPUs of its own) trained nothing: the workers needed a `trainer`.
    assert result.head_node != result.worker_node
    assert result.head_node not in result.trial_nodes.values()
    # MLflow keeps runs, per-epoch metrics and tags in PostgreSQL, not in a local file.
    run_ids = ",".join(f"'{run}'" for run in result.trial_nodes)
    assert int(db.psql(f"select count(*) from metrics where key = 'AP50' "
                       f"and run_uuid in ({run_ids})")) == 2 * 2  # 2 trials x 2 epochs
    assert db.psql(f"select count(distinct value) from tags where key = '{WORKER_HOST_TAG}' "
                   f"and run_uuid in ({run_ids})") == "1"
    assert db.psql("select p.value from params p join tags t on t.run_uuid = p.run_uuid "
                   f"where p.key = 'ray_address' and t.key = '{SWEEP_TAG}' "
                   "and t.value = 'job-sweep'") == "auto"  # the parent run's
    assert not (work / "mlflow" / "mlflow.db").exists()
    # Tune's state and the export are in the shared storage every node writes to.
    assert (storage / "job-sweep" / "best_config.yaml").exists()
    assert list((storage / "job-sweep" / "train").glob("train_*/checkpoint_*"))
    assert db.psql(f"select count(*) from tags where key = '{SWEEP_TAG}' "
                   "and value = 'job-sweep'") == "3"
    # Neither the database password nor the cluster's Ray token is stored anywhere by MLflow.
    token = cluster.token_path.read_text().strip()
    for secret in (db.password, token):
        for table in ("params", "tags"):
            assert db.psql(f"select count(*) from {table} where value like '%{secret}%'") == "0"
        leaks = [p for p in (work / "mlflow").rglob("*")
                 if p.is_file() and secret.encode() in p.read_bytes()]
        assert not leaks


def test_a_sweep_survives_losing_its_cluster_and_resumes_on_a_new_one(stack):
    """Runbook step 6, with the first test's cluster still running beside (two Ray instances)."""
    _, db, uri, work = stack
    checks, job = rehearse_head_loss(db, uri, work / "shared" / "sweeps", "lost-head",
                                     experiment="cluster-test")
    assert checks == dict.fromkeys(checks, True), (job.stdout + job.stderr)[-6000:]


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["no-token", "wrong-token"])
def test_a_job_without_the_cluster_token_is_refused(stack, token):
    cluster = stack[0]
    env = cluster.client_env()
    env.pop("RAY_AUTH_TOKEN_PATH")
    env["HOME"] = str(stack[3])  # no ~/.ray/auth_token to fall back on
    if token:
        env["RAY_AUTH_TOKEN"] = token
    job = subprocess.run(
        [ray_cli(), "job", "submit", "--address", cluster.dashboard_url, "--",
         "python", "-c", "print('ran')"],
        env=env, capture_output=True, text=True, timeout=120)
    output = job.stdout + job.stderr
    assert job.returncode != 0 and "ran\n" not in job.stdout
    assert "AuthenticationError" in output or "Unauthorized" in output, output[-3000:]


@pytest.mark.parametrize("options, expected", [
    (["--gpus-per-worker", "1"], "each worker asks for 1 CPU, 1 GPU but no node"),
    (["--cpus-per-worker", "3"], "each worker asks for 3 CPU but no node"),
    (["--worker-resource", "a100=1"], "each worker asks for 1 CPU, 1 a100 but no node"),
    (["--workers-per-trial", "3", "--worker-resource", f"{TRAINER_RESOURCE}=1"],
     "one trial reserves 4 CPU, 3 trainer (driver + 3 worker(s)) but the cluster"),
], ids=["gpu", "cpus", "custom", "too-many-workers"])
def test_a_client_launcher_refuses_what_the_cluster_cannot_hold(stack, tmp_path, options,
                                                                 expected):
    """The launcher joins from outside the cluster (token auth) and fails in seconds."""
    cluster, _, uri, _ = stack
    started = time.time()
    run = subprocess.run(
        [sys.executable, "-m", "ifsearch.launch", "--address", cluster.gcs_address,
         "--mlflow-uri", uri, "--storage", str(tmp_path / "s"), *options],
        env=cluster.client_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert expected in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert time.time() - started < 60


def test_wait_for_nodes_asks_the_autoscaler_then_gives_up(stack, tmp_path):
    cluster, _, uri, _ = stack
    started = time.time()
    run = subprocess.run(
        [sys.executable, "-m", "ifsearch.launch", "--address", cluster.gcs_address,
         "--mlflow-uri", uri, "--storage", str(tmp_path / "s"), "--gpus-per-worker", "1",
         "--wait-for-nodes", "4"],
        env=cluster.client_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2
    assert "asking the autoscaler and waiting up to 4 s" in run.stdout
    assert "no node of" in run.stderr and time.time() - started >= 4
