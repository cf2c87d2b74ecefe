"""Start (or reuse) a small local MLflow tracking server, stop it, and check remote ones.

With no ``--mlflow-uri`` / ``MLFLOW_TRACKING_URI`` the launcher calls :func:`start_local_server`:
it runs ``python -m mlflow server`` bound to 127.0.0.1 with a sqlite backend
(``<root>/mlflow.db``) and proxied artifacts stored under ``<root>/artifacts``, waits for
``/health`` and leaves the server running so the UI can be browsed after the search ends.

The documented way to manage that server by hand::

    python -m ifsearch.tracking_server start  [--root runs/mlflow] [--port 5000]
                                              [--backend-store-uri postgresql://...]
    python -m ifsearch.tracking_server status [--root runs/mlflow]
    python -m ifsearch.tracking_server stop   [--root runs/mlflow]

Files under ``root``: ``mlflow.db`` (runs, metrics, params), ``artifacts/`` (artifact store),
``server.json`` (pid, url, port of the running server) and ``server.log`` (its output).

Memory: MLflow 3.x's server also launches Huey job-runner consumer processes (used only for
GenAI features such as judges, online scoring and trace rollups; ~240 MB each) and 4 uvicorn
workers by default. A local server for a hyperparameter search needs neither, so we set
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` and ``--workers 1`` by default (see
:data:`SMALL_SERVER_ENV`), which keeps the whole process tree to a few hundred MB.

Only the standard library is used for HTTP so the checks work without extra dependencies.

Why one module of ~570 lines: one job, the life of a tracking server (start or reuse, stop,
status, the checks of a given URI with their error messages, and the command line around them);
the pieces share the ``server.json`` record and the process handling.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ifsearch.errors import IfsearchError

DEFAULT_ROOT = Path("runs/mlflow")
DEFAULT_HOST = "127.0.0.1"
PREFERRED_PORT = 5000

#: Environment that keeps a local tracking server small: no Huey job-runner consumers.
SMALL_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
#: uvicorn worker processes for the local server (MLflow's default is 4).
DEFAULT_WORKERS = 1

_STATE_FILE = "server.json"
_LOG_FILE = "server.log"
_DB_FILE = "mlflow.db"
_ARTIFACT_DIR = "artifacts"

_STOP_HINT = "python -m ifsearch.tracking_server stop --root {root}"


class TrackingServerError(IfsearchError):
    """The MLflow tracking server cannot be started, reached or stopped."""


@dataclass
class LocalServer:
    """A running local ``mlflow server`` (``pid`` leads its own process group)."""

    url: str
    pid: int
    root: Path
    log_path: Path


# --------------------------------------------------------------------------------------- HTTP


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    # The local server is on loopback: never send those requests through an HTTP(S) proxy.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return host in {"localhost", "127.0.0.1", "::1"} or host.startswith("127.")


def _http_get(url: str, timeout: float, headers: dict[str, str] | None = None) -> int:
    """GET ``url``; return the status code (raises ``HTTPError`` for >= 400, ``URLError``...)."""
    request = urllib.request.Request(url, headers=headers or {})
    opener = _no_proxy_opener() if _is_loopback(url) else urllib.request.build_opener()
    with opener.open(request, timeout=timeout) as response:
        response.read(1024)
        return response.status


def _health_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        return _http_get(url.rstrip("/") + "/health", timeout) == 200
    except (OSError, ValueError):  # URLError and HTTPError are OSErrors; ValueError: bad URL
        return False


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow itself would send (token or basic auth from the environment)."""
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        raw = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {raw}"}
    return {}


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail early, with a clear message, when the tracking server at ``uri`` is unreachable.

    ``http(s)://`` URIs: ``GET {uri}/health`` must answer 200; servers without ``/health`` (404)
    are checked with ``GET {uri}/api/2.0/mlflow/experiments/search?max_results=1`` instead.
    Local stores (``file:``, plain paths, ``sqlite:`` and other database URIs, ``databricks``)
    need no server and are accepted as they are.

    Raises:
        TrackingServerError: naming the URI, the error, and how to fix it.
    """
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme not in {"http", "https"}:
        return
    base = uri.rstrip("/")
    fix = (
        "Start that server (or fix the URI), or unset MLFLOW_TRACKING_URI / drop --mlflow-uri "
        "to let ifsearch start a local one (python -m ifsearch.tracking_server start)."
    )
    headers = _auth_headers()
    url = base + "/health"
    try:
        try:
            status = _http_get(url, timeout, headers)
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
            url = base + "/api/2.0/mlflow/experiments/search?max_results=1"
            status = _http_get(url, timeout, headers)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            fix = (
                "The server is up but refused the request: set MLFLOW_TRACKING_TOKEN or "
                "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD. " + fix
            )
        raise TrackingServerError(
            f"MLflow tracking server {uri} is not usable: GET {url} answered HTTP {exc.code} "
            f"({exc.reason}). {fix}"
        ) from exc
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingServerError(
            f"MLflow tracking server {uri} is unreachable: GET {url} failed ({reason}). {fix}"
        ) from exc
    if status != 200:
        raise TrackingServerError(
            f"MLflow tracking server {uri} is not usable: GET {url} answered HTTP {status}. {fix}"
        )


# ---------------------------------------------------------------------------------- processes


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is a finished child of this process (else a zombie looks alive)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie we cannot reap (not our child) is dead too
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _group_alive(pgid: int) -> bool:
    _reap(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Only zombies left (e.g. the leader, our own unreaped child) count as gone.
    return any(_pid_alive(pid) for pid in _group_members(pgid)) or _pid_alive(pgid)


def live_processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every live process, from Linux ``/proc``.

    Zombies are left out: they have exited, as ``_pid_alive`` also says.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # the command name may contain ")" or spaces: split after its last ")"
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                found.append((int(entry.name), int(fields[1]), int(fields[2])))
    return found


def _group_members(pgid: int) -> list[int]:
    return [pid for pid, _, group in live_processes() if group == pgid]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux ``/proc``); empty when ``pid`` is gone."""
    children: dict[int, list[int]] = {}
    live = set()
    for child, parent, _ in live_processes():
        live.add(child)
        children.setdefault(parent, []).append(child)
    if pid not in live:
        return []
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def tree_rss_bytes(pid: int) -> int:
    """Sum of the resident set sizes of ``pid`` and its descendants (0 when unknown)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for member in process_tree(pid):
        try:
            total += int(Path(f"/proc/{member}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port free on ``host`` right now (``""``: on every interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _pick_port(host: str) -> int:
    return PREFERRED_PORT if _port_free(host, PREFERRED_PORT) else free_port(host)


def _log_tail(log_path: Path, lines: int = 30) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


# ------------------------------------------------------------------------------- server state


def _read_state(root: Path) -> dict | None:
    try:
        state = json.loads((root / _STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int):
        return None
    return state


def _write_state(root: Path, state: dict) -> None:
    tmp = root / (_STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(root / _STATE_FILE)


def _looks_like_mlflow_server(pid: int) -> bool:
    cmd = _cmdline(pid)
    return "mlflow" in cmd and "server" in cmd


def running_server(root: Path | str) -> LocalServer | None:
    """The server recorded in ``root/server.json`` if its pid is alive and ``/health`` answers."""
    root = Path(root).resolve()
    state = _read_state(root)
    if state is None or not _pid_alive(state["pid"]):
        return None
    if not _health_ok(str(state.get("url", ""))):
        return None
    return LocalServer(url=state["url"], pid=state["pid"], root=root, log_path=root / _LOG_FILE)


def start_local_server(
    root: Path | str,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    timeout: float = 60.0,
    *,
    workers: int = DEFAULT_WORKERS,
    small: bool = True,
    backend_store_uri: str | None = None,
    env: dict[str, str] | None = None,
) -> LocalServer:
    """Start (or reuse) a local ``mlflow server`` that keeps its state under ``root``.

    ``root/mlflow.db`` (sqlite backend), ``root/artifacts`` (proxied artifact store),
    ``root/server.json`` (pid, url, port), ``root/server.log`` (server output).
    ``backend_store_uri`` replaces the sqlite file with another database, e.g.
    ``postgresql://user@127.0.0.1:5432/mlflow`` (password from ``$PGPASSWORD`` rather than the
    URI; a password in the URI is masked in ``server.json`` and the log). ``env`` adds to the
    server's environment (e.g. ``{"PGPASSWORD": ...}``).

    Reuse: if ``root/server.json`` names a live pid whose ``/health`` answers, that server is
    returned and no other is started. Otherwise the port is ``port`` if given, else 5000 when
    free, else any free port; ``python -m mlflow server ...`` is started with
    ``sys.executable`` (so this environment's MLflow is used), detached in its own session
    (it outlives the launcher; stop it with ``python -m ifsearch.tracking_server stop``), and
    ``/health`` is polled until it answers.

    ``small`` (default) disables MLflow's Huey job runners, and ``workers`` sets the number of
    uvicorn workers (default 1), which keeps the server's memory small.

    Raises:
        TrackingServerError: the server exited early or did not answer within ``timeout``
            seconds (with the last lines of ``server.log`` and the command), or a recorded
            server is alive but unhealthy, or the requested port is taken.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # Serialize concurrent launchers on the same root so only one server is started.
    with open(root / ".server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _start_locked(root, host, port, timeout, workers, small, backend_store_uri,
                                 env or {})
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def redact_uri(uri: str) -> str:
    """``scheme://user:secret@host/db`` -> ``scheme://user:***@host/db``; other text unchanged."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.scheme or parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _start_locked(
    root: Path, host: str, port: int | None, timeout: float, workers: int, small: bool,
    backend_store_uri: str | None, extra_env: dict[str, str],
) -> LocalServer:
    log_path = root / _LOG_FILE
    state = _read_state(root)
    if state is not None and _pid_alive(state["pid"]) and _looks_like_mlflow_server(state["pid"]):
        # Recorded server is alive: reuse it once healthy (it may still be starting).
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _pid_alive(state["pid"]):
            if _health_ok(state["url"]):
                return LocalServer(url=state["url"], pid=state["pid"], root=root, log_path=log_path)
            time.sleep(0.25)
        if _pid_alive(state["pid"]):
            raise TrackingServerError(
                f"The MLflow server recorded in {root / _STATE_FILE} (pid {state['pid']}, "
                f"{state['url']}) is running but {state['url']}/health does not answer. "
                f"Stop it with `{_STOP_HINT.format(root=root)}` and start again. Last lines of "
                f"{log_path}:\n{_log_tail(log_path)}"
            )
    # No live server recorded (missing, stale or dead): start a new one.
    (root / _STATE_FILE).unlink(missing_ok=True)

    if port is None:
        port = _pick_port(host)
    elif not _port_free(host, port):
        raise TrackingServerError(
            f"Cannot start the MLflow server on {host}:{port}: the port is already in use. "
            "Pass another --port, or omit it to pick a free one."
        )
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{port}"
    artifacts = root / _ARTIFACT_DIR
    artifacts.mkdir(exist_ok=True)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri or f"sqlite:///{root / _DB_FILE}",
        "--artifacts-destination", str(artifacts),
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
    ]  # fmt: skip
    shown = " ".join(redact_uri(part) for part in command)  # for logs, state and errors
    env = dict(os.environ, **extra_env)
    if small:
        env.update(SMALL_SERVER_ENV)
    env.pop("MLFLOW_TRACKING_URI", None)  # the server is the store; do not point it elsewhere

    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shown}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
            env=env,
            start_new_session=True,
        )
    _write_state(
        root,
        {
            "pid": proc.pid,
            "url": url,
            "port": port,
            "host": host,
            "root": str(root),
            "log": str(log_path),
            "command": shown,
            "started_at": time.time(),
        },
    )

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            (root / _STATE_FILE).unlink(missing_ok=True)
            raise TrackingServerError(
                f"The MLflow server exited with code {proc.returncode} before answering "
                f"{url}/health.\nCommand: {shown}\nLast lines of {log_path}:\n"
                f"{_log_tail(log_path)}"
            )
        if _health_ok(url, timeout=1.0):
            return LocalServer(url=url, pid=proc.pid, root=root, log_path=log_path)
        if time.monotonic() > deadline:
            _terminate_group(proc.pid)
            proc.wait()
            (root / _STATE_FILE).unlink(missing_ok=True)
            raise TrackingServerError(
                f"The MLflow server did not answer {url}/health within {timeout:.0f} s; it was "
                f"stopped.\nCommand: {shown}\nLast lines of {log_path}:\n"
                f"{_log_tail(log_path)}"
            )
        time.sleep(0.25)


def _terminate_group(pgid: int, grace: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return
            time.sleep(0.1)


def stop_local_server(root: Path | str) -> bool:
    """Stop the server recorded in ``root/server.json`` (its whole process group).

    Sends SIGTERM (SIGKILL after 10 s), waits for the processes to go, removes
    ``server.json``. Returns False when no server was running.
    """
    root = Path(root).resolve()
    state = _read_state(root)
    if state is None:
        return False
    pid = state["pid"]
    was_running = _pid_alive(pid) and _looks_like_mlflow_server(pid)
    if was_running:
        _terminate_group(pid)
        if _group_alive(pid):
            raise TrackingServerError(
                f"Could not stop the MLflow server process group {pid} recorded in "
                f"{root / _STATE_FILE}; kill it by hand (kill -9 -- -{pid})."
            )
        _reap(pid)  # when we started it, collect it now rather than leave a zombie
    (root / _STATE_FILE).unlink(missing_ok=True)
    return was_running


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m ifsearch.tracking_server {start,stop,status} [--root DIR] [--port P]``."""
    parser = argparse.ArgumentParser(
        prog="python -m ifsearch.tracking_server",
        description="Start, stop or inspect the local MLflow tracking server used by ifsearch.",
    )
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="server directory (default: runs/mlflow)"
    )
    parser.add_argument("--port", type=int, default=None, help="port (default: 5000 or a free one)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="bind address (default: 127.0.0.1)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for /health")
    parser.add_argument("--backend-store-uri", default=None,
                        help="database for runs instead of <root>/mlflow.db, e.g. "
                             "postgresql://USER@HOST:PORT/DB (password in $PGPASSWORD)")
    args = parser.parse_args(argv)
    root = args.root.resolve()

    try:
        if args.action == "start":
            server = start_local_server(root, host=args.host, port=args.port, timeout=args.timeout,
                                        backend_store_uri=args.backend_store_uri)
            print(f"MLflow UI: {server.url}  (pid {server.pid}, log {server.log_path})")
            print(f"Stop it with: {_STOP_HINT.format(root=root)}")
            return 0
        if args.action == "stop":
            if stop_local_server(root):
                print(f"Stopped the MLflow server under {root}.")
            else:
                print(f"No MLflow server running under {root}.")
            return 0
        server = running_server(root)
        if server is None:
            state = _read_state(root)
            note = f" (stale {root / _STATE_FILE} for pid {state['pid']})" if state else ""
            print(f"not running: no MLflow server under {root}{note}")
            return 1
        rss_mb = tree_rss_bytes(server.pid) / 2**20
        print(f"running: {server.url}  pid {server.pid}  rss {rss_mb:.0f} MB  root {root}")
        print(f"log: {server.log_path}")
        print(f"Stop it with: {_STOP_HINT.format(root=root)}")
        return 0
    except TrackingServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
