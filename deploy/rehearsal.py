"""The cluster runbook rehearsed on one machine: a multi-node Ray cluster, PostgreSQL-backed MLflow.

``python deploy/rehearsal.py`` (also ``make rehearsal``) runs the steps of
``deploy/README.md`` without a cloud and checks what they promise:

1. PostgreSQL on 127.0.0.1 (Debian's packages; a fresh data dir, password auth),
2. ``mlflow server`` on 127.0.0.1 with that database as its backend store,
3. a Ray head (``ray start --head``) and a worker node (``ray start --address``), each with its
   own temp dir, token authentication (``RAY_AUTH_MODE=token``) and a custom ``trainer``
   resource on the worker node only,
4. a small sweep submitted with ``ray job submit --working-dir . -- python -m ifsearch.launch
   --address auto --worker-resource trainer=1 ...``, so every trial trains on the worker node,
5. checks: the job succeeded, every trial's MLflow run names the worker node, and the runs are
   rows in PostgreSQL,
6. runbook step 6: a longer sweep on a second cluster, killed outright after its first
   checkpoint, resumed with ``--resume --name`` on a third cluster from the same storage;
   then everything started here is stopped (``--keep`` leaves the first cluster and MLflow
   running until Ctrl-C, to look at the Ray dashboard and the MLflow UI).

Only processes started here are stopped (those carrying the cluster's :data:`MARKER_ENV` in
their environment and the process groups of its ``ray start`` calls); ``ray stop``, which
stops every Ray on the machine, is never used. ``tests/deploy/test_rehearsal.py`` drives the same
pieces.

Why one script of ~530 lines: it is the runbook, step by step, with the services it starts and
stops (PostgreSQL, MLflow, Ray nodes) beside the steps that use them; it sits in ``deploy/``
next to the runbook it rehearses, outside the library.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from ifsearch.errors import IfsearchError
from ifsearch.tracking.server import (
    free_port,
    live_processes,
    start_local_server,
    stop_local_server,
)

MARKER_ENV = "IFSEARCH_LOCAL_CLUSTER"  # = a cluster's id, in the environment of its processes
TRAINER_RESOURCE = "trainer"  # custom resource only the worker node has
REPO = Path(__file__).resolve().parents[1]
# The rehearsal's sweep: the default space on tiny scenes (an epoch takes about a second).
REHEARSAL_SPACE = REPO / "search_spaces" / "influencer_default.yaml"
REHEARSAL_SETTINGS = ("--set", "data.num_points=256", "--set", "data.train_scenes=8",
                      "--set", "data.val_scenes=4", "--set", "model.decoder_layers=1")


class LocalClusterError(IfsearchError):
    """A service of the local cluster could not be started or did not answer."""


def _wait(what: str, ready, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.3)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log and log.exists() \
        else ""
    raise LocalClusterError(f"{what} did not come up within {timeout:.0f} s"
                            + (f"; last lines of {log}:\n{tail}" if tail else ""))


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment holds ``MARKER_ENV=marker`` (children included)."""
    needle = f"{MARKER_ENV}={marker}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:  # gone, or not ours to read
                continue
    return pids


def stop_marked(marker: str, groups: Iterable[int] = (), grace: float = 10.0,
                signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGKILL)) -> None:
    """Stop every process carrying ``marker`` and the process ``groups``: SIGTERM, then SIGKILL.

    Both are needed: Ray's agents rewrite their environment when they set their process title
    (the marker is gone), and its workers leave the group of the ``ray start`` that made them.
    """
    groups = set(groups)

    def members() -> list[int]:
        marked = set(marked_pids(marker))
        return [pid for pid, _, pgid in live_processes() if pid in marked or pgid in groups]

    for sig in signals:
        for pid in members():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and members():
            time.sleep(0.2)


# ----------------------------------------------------------------------------------- PostgreSQL


@dataclass
class Postgres:
    """A running PostgreSQL server on 127.0.0.1 with one database for MLflow."""

    host: str
    port: int
    user: str
    database: str
    password: str = field(repr=False)
    bin_dir: Path = Path("/usr/bin")

    @property
    def uri(self) -> str:
        """SQLAlchemy URI without the password (libpq takes it from ``$PGPASSWORD``)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    def psql(self, sql: str) -> str:
        """Run one SQL statement with ``psql``; its unaligned output."""
        run = subprocess.run(
            [str(self.bin_dir / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", self.database,
             "-c", sql],
            env=dict(os.environ, PGPASSWORD=self.password), capture_output=True, text=True,
            timeout=60)
        if run.returncode:
            raise LocalClusterError(f"psql {sql!r} failed: {run.stderr.strip()}")
        return run.stdout.strip()


def postgres_bin_dir() -> Path:
    """Where ``initdb``, ``postgres`` and ``psql`` live (Debian keeps them off PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if candidates:
        return candidates[-1].parent
    raise LocalClusterError("PostgreSQL is not installed (no initdb on PATH or under "
                            "/usr/lib/postgresql/*/bin); install Debian's `postgresql` package "
                            "(`make postgres` does it)")


@contextmanager
def postgres(database: str = "mlflow", user: str = "ifsearch") -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster on 127.0.0.1 (random port and password), removed at exit.

    PostgreSQL refuses to run as root, so as root its files belong to the ``postgres`` user and
    its programs run through ``runuser``.
    """
    bin_dir = postgres_bin_dir()
    root = Path(tempfile.mkdtemp(prefix="ifsearch-pg-"))  # short, world-traversable parent
    data, log, pwfile = root / "data", root / "server.log", root / "pwfile"
    password = secrets.token_urlsafe(24)
    pwfile.write_text(password + "\n")
    as_owner: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(pwfile, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    env = dict(os.environ)
    port = free_port()
    server = None
    try:
        init = subprocess.run(
            [*as_owner, str(bin_dir / "initdb"), "-D", str(data), "-U", user,
             "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8", "--no-sync"],
            env=env, capture_output=True, text=True, timeout=120)
        if init.returncode:
            raise LocalClusterError(f"initdb failed: {init.stderr.strip()[-2000:]}")
        pwfile.unlink()
        with open(log, "ab") as out:
            server = subprocess.Popen(
                [*as_owner, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
                 "-c", "listen_addresses=127.0.0.1", "-k", str(root), "-c", "fsync=off"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
        admin = Postgres("127.0.0.1", port, user, "postgres", password, bin_dir)

        def ready() -> bool:
            if server.poll() is not None:
                raise LocalClusterError(f"postgres exited with {server.returncode}:\n"
                                        f"{log.read_text(errors='replace')[-2000:]}")
            try:
                admin.psql("select 1")
                return True
            except LocalClusterError:
                return False

        _wait(f"PostgreSQL on 127.0.0.1:{port}", ready, 60, log)
        admin.psql(f'create database "{database}"')
        yield replace(admin, database=database)
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)  # "fast" shutdown
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------------------- Ray


@dataclass
class RayCluster:
    """A Ray cluster of local nodes, each from its own ``ray start`` with its own temp dir."""

    gcs_address: str
    dashboard_url: str
    token_path: Path
    marker: str
    temp_root: Path
    groups: list[int] = field(default_factory=list)  # process groups of its `ray start`s

    def crash(self) -> None:
        """Kill every process of the cluster and its jobs at once (SIGKILL): a lost head."""
        stop_marked(self.marker, self.groups, signals=(signal.SIGKILL,))

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment of a client of this cluster: token auth on, this cluster's token."""
        env = dict(os.environ if base is None else base)
        env.pop("RAY_ADDRESS", None)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        env.pop("RAY_AUTH_TOKEN", None)
        return env

    def nodes(self) -> list[dict]:
        """The live nodes as the State API lists them (node_id, is_head_node, resources_total)."""
        run = subprocess.run([ray_cli(), "list", "nodes", "--address", self.dashboard_url,
                              "--format", "json", "--detail"],
                             env=self.client_env(), capture_output=True, text=True, timeout=60)
        if run.returncode:
            raise LocalClusterError(f"ray list nodes failed: {run.stderr.strip()[-2000:]}")
        return [n for n in json.loads(run.stdout) if n.get("state") == "ALIVE"]

    def submit(self, entrypoint: list[str], working_dir: Path, timeout: float = 900,
               env: dict[str, str] | None = None, wait: bool = True
               ) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir DIR -- ENTRYPOINT``: waits for the job, tails its log.

        The return code is ``ray job submit``'s: 0 only when the job succeeded (with
        ``wait=False``: when it was submitted).
        """
        command = [ray_cli(), "job", "submit", "--address", self.dashboard_url,
                   "--working-dir", str(working_dir), *([] if wait else ["--no-wait"]),
                   "--", *entrypoint]
        return subprocess.run(command, env=self.client_env(env), capture_output=True,
                              text=True, timeout=timeout)


def ray_cli() -> str:
    """The ``ray`` program of this Python environment (not whatever else is on PATH)."""
    return str(Path(sys.executable).with_name("ray"))


def _ray_start(args: list[str], env: dict[str, str], log: Path, groups: list[int]) -> None:
    """``ray start ARGS`` in a new process group, added to ``groups`` (its daemons stay in it)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([ray_cli(), "start", "--disable-usage-stats", *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    groups.append(proc.pid)
    if proc.wait(timeout=180):
        raise LocalClusterError(f"`ray start {' '.join(args)}` failed ({proc.returncode}); last "
                                f"lines of {log}:\n" +
                                "\n".join(log.read_text(errors="replace").splitlines()[-25:]))


def _agent_ports() -> list[str]:
    """Every port a node would otherwise take from a fixed default (another Ray may hold it)."""
    return ["--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port())]


@contextmanager
def ray_cluster(head_cpus: float = 1, worker_cpus: float = 2,
                trainers: float = 2) -> Iterator[RayCluster]:
    """A head node and one worker node with ``trainers`` units of :data:`TRAINER_RESOURCE`.

    Token authentication is on (a fresh token in the cluster's temp dir, never
    ``~/.ray/auth_token``); the dashboard listens on 127.0.0.1. Every process of the cluster
    (and of jobs run on it) is stopped at exit.
    """
    marker = uuid.uuid4().hex  # this cluster's own: crash() must not touch anything else
    temp_root = Path(tempfile.mkdtemp(prefix="ifs-ray-"))  # short: Ray's socket paths are long
    token_path = temp_root / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    gcs_port, dashboard_port = free_port(), free_port()
    cluster = RayCluster(gcs_address=f"127.0.0.1:{gcs_port}",
                         dashboard_url=f"http://127.0.0.1:{dashboard_port}",
                         token_path=token_path, marker=marker, temp_root=temp_root)
    # Nodes run this environment's Python first, so a job's `python -m ...` finds ifsearch.
    env = cluster.client_env()
    # RAY_ADDRESS: Ray Train's placement-group cleaner finds the cluster by it, not by scanning
    # for GCS processes (which fails when other Ray instances run on this machine).
    env.update({MARKER_ENV: marker, "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_ADDRESS": cluster.gcs_address,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    groups = cluster.groups
    try:
        _ray_start(["--head", "--port", str(gcs_port), "--num-cpus", f"{head_cpus:g}",
                    "--temp-dir", str(temp_root / "head"), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(dashboard_port),
                    "--ray-client-server-port", str(free_port()), *_agent_ports()],
                   env, temp_root / "head.log", groups)
        _ray_start(["--address", cluster.gcs_address, "--num-cpus", f"{worker_cpus:g}",
                    "--resources", json.dumps({TRAINER_RESOURCE: trainers}),
                    "--temp-dir", str(temp_root / "worker"), *_agent_ports()],
                   env, temp_root / "worker.log", groups)
        _wait("the worker node", lambda: len(cluster.nodes()) == 2, 60)
        yield cluster
    finally:
        stop_marked(marker, groups)
        shutil.rmtree(temp_root, ignore_errors=True)


# ----------------------------------------------------------------------------------- rehearsal


@contextmanager
def mlflow_on_postgres(db: Postgres, root: Path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with ``db`` as backend store (artifacts under ``root``).

    The password reaches the server as ``$PGPASSWORD``, so it is in no URI, log or command line.
    """
    server = start_local_server(root, backend_store_uri=db.uri,
                                env={"PGPASSWORD": db.password})
    try:
        yield server.url
    finally:
        stop_local_server(root)


def rehearsal_entrypoint(storage: Path, mlflow_uri: str, experiment: str, name: str,
                         epochs: int = 2, *extra: str) -> list[str]:
    """The runbook's launcher command, on a small sweep whose workers need a ``trainer``."""
    return ["python", "-m", "ifsearch.launch", "--address", "auto",
            "--worker-resource", f"{TRAINER_RESOURCE}=1",
            "--space", str(REHEARSAL_SPACE.relative_to(REPO)), *REHEARSAL_SETTINGS,
            "--num-samples", "2", "--max-epochs", str(epochs), "--scheduler", "fifo",
            "--storage", str(storage), "--mlflow-uri", mlflow_uri,
            "--experiment", experiment, "--name", name, *extra]


def trial_runs(mlflow_uri: str, experiment: str, sweep: str) -> list:
    """The sweep's trial runs in MLflow (empty before the first one exists)."""
    from mlflow.tracking import MlflowClient

    from ifsearch.tracking.runs import ROLE_TAG, SWEEP_TAG, tag_filter

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id],
                              tag_filter({SWEEP_TAG: sweep, ROLE_TAG: "trial"}))


def sweep_rows(db: Postgres, sweep: str) -> int:
    """Rows of MLflow's ``runs`` table in PostgreSQL that belong to ``sweep`` (parent + trials)."""
    from ifsearch.tracking.runs import SWEEP_TAG

    return int(db.psql("select count(*) from runs r join tags t on t.run_uuid = r.run_uuid "
                       f"where t.key = '{SWEEP_TAG}' and t.value = '{sweep}'"))


@dataclass
class Rehearsal:
    """What one rehearsal saw; ``checks`` are the runbook's promises, each True or False."""

    job: subprocess.CompletedProcess
    head_node: str
    worker_node: str
    trial_nodes: dict[str, str]  # MLflow trial run id -> node id its rank-0 worker reported
    postgres_runs: int  # rows of MLflow's `runs` table in PostgreSQL tagged with the sweep
    checks: dict[str, bool]


def rehearse(cluster: RayCluster, db: Postgres, mlflow_uri: str, storage: Path, name: str,
             experiment: str = "rehearsal") -> Rehearsal:
    """Submit the sweep with ``ray job submit --working-dir`` and check where it went."""
    from ifsearch.tracking.runs import WORKER_NODE_TAG

    nodes = cluster.nodes()
    head = next(n["node_id"] for n in nodes if n["is_head_node"])
    worker = next(n["node_id"] for n in nodes if not n["is_head_node"])
    job = cluster.submit(rehearsal_entrypoint(storage, mlflow_uri, experiment, name), REPO)
    trial_nodes = {r.info.run_id: r.data.tags.get(WORKER_NODE_TAG, "")
                   for r in trial_runs(mlflow_uri, experiment, name)}
    rows = sweep_rows(db, name)
    checks = {
        "the job succeeded": job.returncode == 0,
        "2 trial runs in MLflow": len(trial_nodes) == 2,
        "every trial trained on the worker node":
            bool(trial_nodes) and set(trial_nodes.values()) == {worker},
        "the runs are rows in PostgreSQL (2 trials + the sweep)": rows == 3,
    }
    return Rehearsal(job, head, worker, trial_nodes, rows, checks)


def rehearse_head_loss(db: Postgres, mlflow_uri: str, storage: Path, name: str,
                       experiment: str = "rehearsal", epochs: int = 6
                       ) -> tuple[dict[str, bool], subprocess.CompletedProcess]:
    """Runbook step 6: lose the whole cluster mid-sweep, start a new one, ``--resume``.

    The first cluster is killed (SIGKILL, head, worker and the job's launcher alike) once a trial
    has a checkpoint; the sweep then goes on from ``storage`` on a fresh cluster. Returns the
    checks and the resuming job's ``ray job submit``.
    """
    from mlflow.tracking import MlflowClient

    with ray_cluster() as first:
        submitted = first.submit(rehearsal_entrypoint(storage, mlflow_uri, experiment, name,
                                                      epochs), REPO, wait=False)
        if submitted.returncode:
            raise LocalClusterError(f"ray job submit failed: {submitted.stderr[-2000:]}")

        def resumable() -> bool:  # Tune's experiment state and one Train checkpoint exist
            sweep = storage / name
            return any(sweep.glob("experiment_state*.json")) and \
                any(sweep.glob("train/train_*/checkpoint_*"))

        _wait("the sweep's first checkpoint", resumable, 300)
        finished_before_crash = (storage / name / "best_config.yaml").exists()
        first.crash()
    with ray_cluster() as second:
        job = second.submit(rehearsal_entrypoint(storage, mlflow_uri, experiment, name, epochs,
                                                 "--resume"), REPO)
    runs = trial_runs(mlflow_uri, experiment, name)
    client = MlflowClient(mlflow_uri)
    steps = [sorted({m.step for m in client.get_metric_history(r.info.run_id, "AP50")})
             for r in runs]
    checks = {
        "the cluster was lost mid-sweep (a checkpoint, no export yet)": not finished_before_crash,
        "the resumed job succeeded": job.returncode == 0,
        "still 2 trial runs (no duplicates), all FINISHED":
            len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs),
        f"every trial has epochs 1..{epochs} in MLflow":
            steps == [list(range(1, epochs + 1))] * 2,
        "3 runs of the sweep in PostgreSQL": sweep_rows(db, name) == 3,
        "best_config.yaml exported": (storage / name / "best_config.yaml").exists(),
    }
    return checks, job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python deploy/rehearsal.py",
        description="Rehearse deploy/README.md on this machine: PostgreSQL-backed MLflow, a Ray "
                    "head + worker node with token auth, a sweep by `ray job submit`; checks "
                    "where trials ran and that MLflow stored them in PostgreSQL.")
    parser.add_argument("--keep", action="store_true",
                        help="leave everything running after the checks until Ctrl-C")
    parser.add_argument("--no-head-loss", dest="head_loss", action="store_false",
                        help="skip runbook step 6 (lose the cluster mid-sweep, resume on a new "
                             "one; about 2 minutes)")
    args = parser.parse_args(argv)
    step = iter(range(1, 100))

    def say(text: str) -> None:
        print(f"[{next(step)}] {text}", flush=True)

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ifs-rehearsal-")))
        say("PostgreSQL on 127.0.0.1 ...")
        db = stack.enter_context(postgres())
        say(f"MLflow server with backend store {db.uri} ...")
        mlflow_uri = stack.enter_context(mlflow_on_postgres(db, work / "mlflow"))
        say(f"Ray head (1 CPU) + worker node (2 CPU, 2 {TRAINER_RESOURCE}), token auth ...")
        cluster = stack.enter_context(ray_cluster())
        say(f"ray job submit --working-dir {REPO} -- python -m ifsearch.launch --address auto "
            f"--worker-resource {TRAINER_RESOURCE}=1 ... (2 trials x 2 epochs)")
        result = rehearse(cluster, db, mlflow_uri, work / "shared" / "sweeps",
                          f"rehearsal-{time.strftime('%Y%m%d-%H%M%S')}")
        print("\n".join(result.job.stdout.splitlines()[-20:]) or result.job.stderr, flush=True)
        say(f"checks (worker node {result.worker_node[:12]}, head {result.head_node[:12]})")
        for what, ok in result.checks.items():
            print(f"    {'ok    ' if ok else 'FAILED'} {what}", flush=True)
        checks = dict(result.checks)
        if args.head_loss:
            say("runbook step 6: a sweep of 2 trials x 6 epochs on a second cluster, which is "
                "killed (SIGKILL) after its first checkpoint; a third cluster resumes it ...")
            lost, job = rehearse_head_loss(db, mlflow_uri, work / "shared" / "sweeps",
                                           f"rehearsal-lost-{time.strftime('%Y%m%d-%H%M%S')}")
            if not all(lost.values()):
                print("\n".join(job.stdout.splitlines()[-20:]) or job.stderr, flush=True)
            for what, ok in lost.items():
                print(f"    {'ok    ' if ok else 'FAILED'} {what}", flush=True)
            checks.update(lost)
        if args.keep:
            print(f"running until Ctrl-C: Ray dashboard {cluster.dashboard_url} (export "
                  f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={cluster.token_path}), "
                  f"MLflow UI {mlflow_uri}", flush=True)
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
        say("stopping everything started here")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
