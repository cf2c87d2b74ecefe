"""The plan of a sweep: what ``ifsearch.search.cli`` decides and ``ifsearch.search.sweep`` runs.

Below both (the CLI imports it, the sweep and the searcher import it; it imports neither), so
the command-line module is imported by nothing but its entry point ``python -m ifsearch.launch``.
Also where a sweep's files and its MLflow server are found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ifsearch.errors import IfsearchError
from ifsearch.search.space import SearchSpace
from ifsearch.tracking.server import check_tracking_uri, running_server, start_local_server

RUNS_DIR = Path("runs")
# ifsearch's OptunaSearcher, or Ray's stock OptunaSearch (benchmarks/search_efficiency.py)
SEARCHER_IMPLS = ("ifsearch", "ray")
PROGRESS_METRICS = ("epoch", "AP50", "AP", "AP25", "val_loss", "duplicate_rate", "epoch_seconds")


@dataclass
class SweepPlan:
    """Everything the sweep needs, decided and validated before Ray starts."""

    space: SearchSpace
    name: str
    storage: str
    num_samples: int
    max_epochs: int
    grace_period: int
    scheduler: str
    searcher: str
    seed: int
    metric: str
    mode: str
    warm_start: dict | None
    worker_resources: dict[str, float]
    rung_metric: str  # what the scheduler's rungs compare (default: the objective)
    rung_mode: str
    optuna_storage: str | None  # the study's database URL; None = sqlite in the sweep dir
    # "ifsearch" (OptunaSearcher, the truth told) or "ray" (Ray's OptunaSearch, for the
    # efficiency benchmark's comparison only)
    searcher_impl: str = "ifsearch"
    # the command that continues this sweep, printed when it is interrupted (the CLI knows
    # its options; the sweep does not)
    resume_command: str = ""


def sweep_location(storage: str, name: str) -> tuple[str, Path]:
    """(the sweep's Tune folder, as a path or URI; the local folder of its exported files).

    Storage may be a URI (s3://...): it is joined as text, and the exported files (best config,
    report, Optuna's default sqlite study, the log) then go to runs/sweeps/<name> locally.
    """
    sweep_uri = f"{storage.rstrip('/')}/{name}"
    local_dir = Path(sweep_uri) if "://" not in sweep_uri else RUNS_DIR / "sweeps" / name
    return sweep_uri, local_dir


def resolve_tracking_uri(cli_uri: str | None, start_local: bool = True) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI (both checked), else the local server."""
    return given_tracking_uri(cli_uri) or local_tracking_uri(start=start_local)


def given_tracking_uri(cli_uri: str | None) -> str | None:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, checked (reachable); None when neither is set."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        check_tracking_uri(uri)
    return uri or None


def local_tracking_uri(start: bool = True, say=print) -> str:
    """The local MLflow server under runs/mlflow: reused when running, else started (``start``).

    Starting it is a side effect a refused sweep must not leave behind: the launcher calls this
    only once every check has passed (and Ray is up).
    """
    root = RUNS_DIR / "mlflow"
    server = running_server(root)
    if server is None:
        if not start:
            raise IfsearchError(f"no --mlflow-uri, no $MLFLOW_TRACKING_URI and no local server "
                                f"under {root}; start one with `python -m "
                                f"ifsearch.tracking_server start`")
        say(f"starting a local MLflow server under {root} ...")
        server = start_local_server(root)
    return server.url
