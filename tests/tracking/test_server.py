"""Tests for ifsearch.tracking_server: real ``mlflow server`` processes on free loopback ports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ifsearch.errors import IfsearchError
from ifsearch.tracking.server import (
    TrackingServerError,
    _health_ok,
    _pid_alive,
    check_tracking_uri,
    main,
    process_tree,
    redact_uri,
    start_local_server,
    stop_local_server,
)

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    srv = start_local_server(root, port=_free_port(), timeout=90)
    yield srv
    stop_local_server(root)


@pytest.fixture
def stopper():
    roots: list[Path] = []
    yield roots.append
    for root in roots:
        stop_local_server(root)


# ------------------------------------------------------------------------------ fast tests


def test_error_is_an_ifsearch_error():
    assert issubclass(TrackingServerError, IfsearchError)


def test_check_tracking_uri_closed_port_names_the_uri():
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(TrackingServerError) as info:
        check_tracking_uri(uri, timeout=2)
    message = str(info.value)
    assert uri in message
    assert "MLFLOW_TRACKING_URI" in message and "--mlflow-uri" in message


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "sqlite:///tmp/x.db", "/tmp/mlruns"])
def test_check_tracking_uri_local_stores_need_no_server(uri):
    check_tracking_uri(uri)


@pytest.fixture
def fake_server():
    """A tiny HTTP server answering {path: status}; unknown paths get 404."""
    routes: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            status = routes.get(self.path.split("?")[0], 404)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", routes
    httpd.shutdown()
    httpd.server_close()


def test_check_tracking_uri_falls_back_when_health_404s(fake_server):
    uri, routes = fake_server
    routes["/api/2.0/mlflow/experiments/search"] = 200
    check_tracking_uri(uri)


@pytest.mark.parametrize(("route", "status"), [("/health", 500), ("/nothing", 404)])
def test_check_tracking_uri_bad_server_fails(fake_server, route, status):
    uri, routes = fake_server
    routes[route] = status
    with pytest.raises(TrackingServerError, match="HTTP") as info:
        check_tracking_uri(uri)
    assert uri in str(info.value)


def test_check_tracking_uri_auth_hint(fake_server):
    uri, routes = fake_server
    routes["/health"] = 401
    with pytest.raises(TrackingServerError, match="MLFLOW_TRACKING_TOKEN"):
        check_tracking_uri(uri)


def test_stop_and_status_without_server(tmp_path, capsys):
    assert stop_local_server(tmp_path) is False
    assert main(["status", "--root", str(tmp_path)]) == 1
    assert "not running" in capsys.readouterr().out


def test_start_on_taken_port_fails_clearly(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(TrackingServerError, match=str(port)):
            start_local_server(tmp_path, port=port)
    assert not (tmp_path / "server.json").exists()


# ------------------------------------------------------------------- real mlflow servers


@pytest.mark.slow
def test_start_writes_state_and_reuses(server):
    assert server.url.startswith("http://127.0.0.1:")
    assert _health_ok(server.url)
    state = json.loads((server.root / "server.json").read_text())
    assert state["pid"] == server.pid and state["url"] == server.url
    assert server.url.endswith(f":{state['port']}")
    assert (server.root / "mlflow.db").exists()
    again = start_local_server(server.root)
    assert again.pid == server.pid and again.url == server.url


@pytest.mark.slow
def test_client_logs_run_and_proxied_artifact(server, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(server.url)
    exp_id = client.create_experiment("tracking-server-test")
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "loss", 0.5, step=1)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    client.log_artifact(run.info.run_id, str(note))
    client.set_terminated(run.info.run_id)

    assert client.get_run(run.info.run_id).data.metrics["loss"] == 0.5
    stored = list((server.root / "artifacts").rglob("note.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "hello"


@pytest.mark.slow
def test_check_tracking_uri_running_server(server):
    check_tracking_uri(server.url)
    check_tracking_uri(server.url + "/")


@pytest.mark.slow
def test_cli_status_running(server):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "ifsearch.tracking_server", "status", "--root", str(server.root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "running" in result.stdout and server.url in result.stdout
    assert str(server.pid) in result.stdout and "stop" in result.stdout


@pytest.mark.slow
def test_stale_state_ignored_then_stop(tmp_path, stopper):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_port = _free_port()
    (tmp_path / "server.json").write_text(
        json.dumps({"pid": dead.pid, "url": f"http://127.0.0.1:{stale_port}", "port": stale_port})
    )
    stopper(tmp_path)

    srv = start_local_server(tmp_path, port=_free_port(), timeout=90)
    assert srv.pid != dead.pid
    assert _health_ok(srv.url)
    assert json.loads((tmp_path / "server.json").read_text())["pid"] == srv.pid

    assert stop_local_server(tmp_path) is True
    assert not _pid_alive(srv.pid)
    assert process_tree(srv.pid) == []
    assert not _health_ok(srv.url)
    assert not (tmp_path / "server.json").exists()
    assert stop_local_server(tmp_path) is False


def test_redact_uri_hides_only_the_password():
    assert redact_uri("postgresql://mlflow:s3cr3t@db:5432/mlflow") == \
        "postgresql://mlflow:***@db:5432/mlflow"
    for kept in ("postgresql://mlflow@db:5432/mlflow", "sqlite:////tmp/mlflow.db", "--port",
                 "/tmp/artifacts"):
        assert redact_uri(kept) == kept
