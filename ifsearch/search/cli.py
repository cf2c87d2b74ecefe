"""``python -m ifsearch.launch``: a Ray Tune + Optuna sweep over a search space, logged to MLflow.

With no options it runs ``search_spaces/quickstart.yaml`` (the demo) on synthetic scenes on a
local Ray runtime, logs to a local MLflow server it starts (or reuses) on 127.0.0.1, and ends by
writing and printing the best config. Everything is validated before Ray starts. The options and
their checks live here; the sweep itself is ``ifsearch.search.sweep``, handed a ``plan.SweepPlan``.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

from ifsearch.config import config_from_dict, load_config
from ifsearch.errors import ConfigError, IfsearchError
from ifsearch.search.plan import (
    RUNS_DIR,
    SEARCHER_IMPLS,
    SweepPlan,
    given_tracking_uri,
    sweep_location,
)
from ifsearch.search.resources import check_local_trial, local_machine
from ifsearch.search.space import (
    MODES,
    RUNG_SCHEDULERS,
    SCHEDULERS,
    SEARCHERS,
    SearchSpace,
    load_search_space,
    metric_problem,
)
from ifsearch.tracking.server import redact_uri

DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "quickstart.yaml"
STORAGE_ENV = "IFSEARCH_STORAGE"  # default --storage, e.g. set once on every cluster node


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ifsearch.launch",
        description="Search InfluencerFormer hyperparameters with Ray Tune + Optuna; every trial "
                    "is a Ray Train run, logged to MLflow; the best config is exported.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--space", type=Path, default=DEFAULT_SPACE,
                   help="search-space YAML (format: search_spaces/README.md)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="trials to run (default: the space's budget.num_samples)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="epochs per trial without early stopping (default: budget.max_epochs)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials running at once (default: from the CPUs/GPUs Ray reports)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="early stopping: asha, hyperband, median stopping, or fifo (none); "
                        "default: the space's scheduler.name")
    p.add_argument("--rung-metric", default=None, metavar="METRIC[:min|max]",
                   help="the metric the scheduler's rungs compare, e.g. val_loss:min, when the "
                        "objective ties young trials (AP50 = 0 stops nothing); the searcher "
                        "still optimises the objective. Default: the space's scheduler.metric, "
                        "else the objective")
    p.add_argument("--searcher", choices=SEARCHERS, default=None,
                   help="Optuna sampler: tpe, random, cmaes, nsga2 "
                        "(multi-objective: the objective metric vs epoch_seconds); default: the "
                        "space's searcher.name")
    p.add_argument("--searcher-impl", choices=SEARCHER_IMPLS, default="ifsearch",
                   help="which code tells Optuna what Tune did: ifsearch's searcher (trials the "
                        "scheduler stopped are PRUNED) or Ray's stock OptunaSearch (they are "
                        "COMPLETE with their truncated value). Exists so "
                        "benchmarks/search_efficiency.py can measure the difference; keep the "
                        "default otherwise (ray: no --resume of the study, no --num-samples "
                        "raise on resume)")
    p.add_argument("--workers-per-trial", type=int, default=1,
                   help="Ray Train workers (DDP ranks) per trial")
    p.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="CPUs each worker reserves (also its torch thread count)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs each worker reserves (0 = CPU training)")
    p.add_argument("--worker-resource", dest="worker_resources", action="append", default=[],
                   metavar="NAME=AMOUNT",
                   help="a custom Ray resource each worker also reserves (repeatable), e.g. "
                        "--worker-resource trainer=1 to keep training on the nodes started "
                        "with `ray start --resources '{\"trainer\": 4}'`; needs --address")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join: 'auto' or host:port (default: $RAY_ADDRESS, which "
                        "`ray job submit` sets; without it a local Ray is started)")
    p.add_argument("--wait-for-nodes", type=float, default=0.0, metavar="SECONDS",
                   help="on an autoscaling cluster: when no live node can hold a worker yet, "
                        "ask the autoscaler for one and wait this long (0 = fail at once)")
    p.add_argument("--storage", default=os.environ.get(STORAGE_ENV),
                   help="where Tune/Train keep experiment state and checkpoints: a local dir "
                        "or a path/URI every node shares (s3://..., NFS) on clusters "
                        f"(default: ${STORAGE_ENV}, else runs/sweeps)")
    p.add_argument("--mlflow-uri", default=None,
                   help="MLflow tracking server (default: $MLFLOW_TRACKING_URI, else a local "
                        "server under runs/mlflow, started if needed and left running)")
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="database of the sweep's Optuna study (named after the sweep), for "
                        "optuna.load_study and optuna-dashboard: an SQLAlchemy URL such as "
                        "postgresql://user@host/db (default: sqlite:///<sweep dir>/optuna.db, "
                        "under runs/sweeps/<name> when --storage is a URI; --resume reopens "
                        "the sweep's own study unless this is given)")
    p.add_argument("--experiment", default="ifsearch", help="MLflow experiment name")
    p.add_argument("--name", default=None,
                   help="sweep name (Tune experiment + MLflow parent run); default: "
                        "<space name>-<date>-<time>")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep --name (default: the newest sweep of this space) "
                        "from its Tune state: finished trials are kept, others resume")
    p.add_argument("--warm-start", type=Path, default=None,
                   help="a config YAML (e.g. an exported best_config.yaml) evaluated as the "
                        "first trial")
    p.add_argument("--seed", type=int, default=None,
                   help="searcher seed (default: the space's searcher.seed)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show Ray's, Ray Train's and Tune's own output on the terminal (by "
                        "default it goes to launch.log in the sweep folder, and the terminal "
                        "shows the phases, the live trial table and the summary)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="fix a config value for every trial (repeatable), e.g. "
                        "--set data.num_points=2048; a searched key becomes fixed")
    return p


def resume_command(args: argparse.Namespace, name: str) -> str:
    """The command that continues sweep ``name``: ``--resume --name`` plus every option given
    that differs from its default. Tune restores its own state, but the budget, --set values
    and resources come from the command line again, so they must be repeated."""
    parser = build_parser()
    defaults = parser.parse_args([])
    words = ["python", "-m", "ifsearch.launch", "--resume", "--name", name,
             "--space", str(args.space)]
    for action in parser._actions:
        dest = action.dest
        if not action.option_strings or dest in ("help", "resume", "name", "space"):
            continue
        value = getattr(args, dest)
        if value == getattr(defaults, dest):
            continue
        flag = action.option_strings[-1]
        if isinstance(value, bool):
            words.append(flag)
        elif isinstance(value, list):
            for item in value:
                words += [flag, str(item)]
        else:
            words += [flag, str(value)]
    return " ".join(shlex.quote(word) for word in words)


def plan_sweep(args: argparse.Namespace) -> SweepPlan:
    """Validate the space, CLI and warm-start file; pick the sweep name and storage."""
    space = load_search_space(args.space, args.overrides)
    worker_resources = parse_worker_resources(args.worker_resources)
    if worker_resources and not args.address:
        raise ConfigError("--worker-resource needs a Ray cluster (--address or $RAY_ADDRESS): "
                          "a local Ray has no custom resources")
    _absolute_data_paths(space)
    budget = space.budget
    if args.max_epochs is not None:  # the budget sets every trial's train.epochs
        budget["max_epochs"] = args.max_epochs
        budget["grace_period"] = min(budget["grace_period"], args.max_epochs)
    max_epochs, grace = budget["max_epochs"], budget["grace_period"]
    num_samples = args.num_samples or budget["num_samples"]
    for flag, value in (("--num-samples", num_samples), ("--max-epochs", max_epochs),
                        ("--workers-per-trial", args.workers_per_trial),
                        ("--max-concurrent", args.max_concurrent or 1)):
        if value < 1:
            raise ConfigError(f"{flag} = {value}: must be >= 1")
    if not args.wait_for_nodes >= 0:
        raise ConfigError(f"--wait-for-nodes = {args.wait_for_nodes}: must be >= 0 seconds")
    storage = args.storage or str((RUNS_DIR / "sweeps").resolve())
    name = args.name
    if args.resume and name is None:
        name = _newest_sweep(storage, args.space)
    if name is None:
        name = f"{Path(args.space).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    warm = None
    if args.warm_start is not None:
        warm = space.point_from_config(load_config(args.warm_start))
    scheduler = args.scheduler or space.scheduler["name"]
    rung_metric, rung_mode = parse_rung_metric(args.rung_metric, space, scheduler)
    if args.optuna_storage is not None:
        _check_database_url(args.optuna_storage)
    _check_sweep_state(storage, name, args.resume, args.optuna_storage)
    return SweepPlan(
        space=space, name=name, storage=storage, num_samples=num_samples,
        max_epochs=max_epochs, grace_period=grace, scheduler=scheduler,
        searcher=args.searcher or space.searcher["name"],
        seed=args.seed if args.seed is not None else space.searcher.get("seed", 0),
        metric=space.objective["metric"], mode=space.objective["mode"], warm_start=warm,
        worker_resources=worker_resources, rung_metric=rung_metric, rung_mode=rung_mode,
        optuna_storage=args.optuna_storage, searcher_impl=args.searcher_impl,
        resume_command=resume_command(args, name),
    )


def parse_rung_metric(text: str | None, space: SearchSpace, scheduler: str) -> tuple[str, str]:
    """``--rung-metric METRIC[:min|max]``, else the space's scheduler.metric, else the objective.

    Without ``:mode`` the metric must be the objective (whose mode it takes): a wrong guess of
    the direction would stop the best trials.
    """
    objective = space.objective
    if text is None:
        return (space.scheduler.get("metric", objective["metric"]),
                space.scheduler.get("mode", objective["mode"]))
    if scheduler not in RUNG_SCHEDULERS:
        raise ConfigError(f"--rung-metric {text}: scheduler {scheduler!r} stops no trial early; "
                          f"use it with --scheduler {' / '.join(RUNG_SCHEDULERS)}")
    metric, sep, mode = text.partition(":")
    dataset = (space.base.get("data") or {}).get("name", "synthetic")
    problem = metric_problem(metric, dataset)
    if problem:
        raise ConfigError(f"--rung-metric {text}: {problem}")
    if not sep:
        if metric != objective["metric"]:
            raise ConfigError(f"--rung-metric {text}: say whether a lower or a higher {metric} "
                              f"is better, e.g. --rung-metric {metric}:min")
        mode = objective["mode"]
    if mode not in MODES:
        raise ConfigError(f"--rung-metric {text}: mode {mode!r} must be one of {list(MODES)}, "
                          "e.g. val_loss:min or AP25:max")
    return metric, mode


def _check_sweep_state(storage: str, name: str, resume: bool, optuna_storage: str | None) -> None:
    """Refuse, before anything starts, a --resume with no saved state and a new sweep whose
    Optuna study already exists (its trials would mix with the old ones)."""
    sweep_uri, local_dir = sweep_location(storage, name)
    if resume:
        from ray.tune import Tuner  # reads the folder (or bucket); starts nothing

        if not Tuner.can_restore(sweep_uri):
            raise ConfigError(f"--resume: no Tune experiment state in {sweep_uri}; pass the "
                              "--name (and --storage) of a sweep that was started")
        return
    from ifsearch.search.searcher import STUDY_FILE, default_storage

    if optuna_storage is None and not (local_dir / STUDY_FILE).exists():
        return  # a new sweep's default study file: nothing to collide with
    import optuna

    url = optuna_storage or default_storage(local_dir)
    try:
        names = optuna.study.get_all_study_names(storage=url)
    except Exception as exc:  # sqlalchemy's errors: unreachable, bad credentials, ...
        raise ConfigError(f"cannot open the Optuna storage {redact_uri(url)}: "
                          f"{type(exc).__name__}: {exc}; check --optuna-storage") from None
    if name in names:
        raise ConfigError(
            f"the Optuna study {name!r} already exists in {redact_uri(url)}: a new sweep of that "
            f"name would mix its trials with the old ones; continue it with --resume --name "
            f"{name}, pick another --name, or delete the study (optuna delete-study "
            f"--study-name {name} --storage URL)")


def _check_database_url(url: str) -> None:
    """Refuse a --optuna-storage that is not an SQLAlchemy URL before anything starts."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except ArgumentError:
        raise ConfigError(f"--optuna-storage {redact_uri(url)!r} is not a database URL; e.g. "
                          "sqlite:////abs/path/optuna.db or postgresql://user@host/db") from None


def parse_worker_resources(items: list[str]) -> dict[str, float]:
    """``["trainer=1", ...]`` -> ``{"trainer": 1.0}``; CPU/GPU have their own options."""
    resources = {}
    for item in items:
        name, sep, amount = item.partition("=")
        name = name.strip()
        try:
            value = float(amount)
        except ValueError:
            value = math.nan
        if not sep or not name or not value > 0 or math.isinf(value):
            raise ConfigError(f"--worker-resource {item!r}: expected NAME=AMOUNT with AMOUNT > 0, "
                              "e.g. trainer=1")
        if name.upper() in ("CPU", "GPU"):
            raise ConfigError(f"--worker-resource {item!r}: use --{name.lower()}s-per-worker")
        resources[name] = value
    return resources


def _absolute_data_paths(space: SearchSpace) -> None:
    """Make data.root / data.cache_dir absolute: trials run in their own working directories."""
    data = space.base.get("data", {})
    for key in ("root", "cache_dir"):
        if isinstance(data.get(key), str) and data[key].strip():
            data[key] = str(Path(data[key]).expanduser().resolve())


def prepare_data(space: SearchSpace, source: str) -> None:
    """Check a real dataset (and build the S3DIS cache) once, before Ray and any trial starts."""
    data = space.base.get("data", {})
    if data.get("name", "synthetic") == "synthetic":
        return  # generated on the fly
    from ifsearch.data.build import prepare_data as prepare

    prepare(config_from_dict({"data": data}, source=source))


def _newest_sweep(storage: str, space_path: Path) -> str:
    root = Path(storage)
    candidates = sorted(root.glob(f"{Path(space_path).stem}-*"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(f"--resume: no sweep of {Path(space_path).name} under {root}; pass "
                          "--name of the sweep to resume")
    return candidates[-1].name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # MLflow's client retries a dead server for minutes by default; the sweep's logger would
    # block Tune meanwhile. Fail fast and spool instead (ifsearch.tracking.runs).
    for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),
                       ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")):
        os.environ.setdefault(key, value)
    try:
        plan = plan_sweep(args)
        if not args.address:  # real cores, not the logical CPUs Ray gets: before anything starts
            check_local_trial(args.workers_per_trial, args.cpus_per_worker,
                              args.gpus_per_worker, *local_machine())
        prepare_data(plan.space, str(args.space))
        tracking_uri = given_tracking_uri(args.mlflow_uri)  # the local server starts later
    except IfsearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ifsearch.search.sweep import run_sweep  # imports Ray: only once the inputs are known good

    try:
        return run_sweep(plan, args, tracking_uri)
    except IfsearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
