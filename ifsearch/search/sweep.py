"""Run a planned sweep on Ray: resources, Tuner (or restore), MLflow runs, best-config export."""

from __future__ import annotations

import argparse
import os
import platform
import signal
import time
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient
from ray import tune

from ifsearch.errors import IfsearchError
from ifsearch.search.console import LOG_NAME, Console, ProgressTable, say
from ifsearch.search.export import write_best_config
from ifsearch.search.plan import (
    PROGRESS_METRICS,
    SweepPlan,
    local_tracking_uri,
    sweep_location,
)
from ifsearch.search.report import (
    asha_milestones,
    slot_efficiency,
    sweep_rung_trust,
    write_plots,
    write_trials_csv,
)
from ifsearch.search.resources import (
    DRIVER_CPUS,
    check_local_trial,
    local_concurrency,
    local_machine,
    local_ray_cpus,
)
from ifsearch.search.searcher import (  # noqa: F401  (build_searcher: re-exported for callers)
    build_scheduler,
    build_search_alg,
    build_searcher,
    default_storage,
    restored_search,
)
from ifsearch.tracking.runs import (
    DIVERGED,
    INTERRUPTED_TAG,
    UNREACHABLE,
    MlflowTrialLogger,
    RunWriter,
    Spool,
    environment_params,
    find_or_create_parent_run,
    finish_parent_run,
    mark_interrupted,
    sweep_view_link,
)
from ifsearch.tracking.server import free_port, redact_uri
from trainables import TrialSettings, train_driver_fn
from trainables.driver import LOCAL_TRAIN_ENV
from trainables.ray_report import (
    FreeWorkersOfDeadTrials,
    StartupPhases,
    reserved_placement_groups,
)
from trainables.worker_pool import free_kept_workers

SPOOL_NAME = "mlflow_spool.jsonl"  # MLflow records kept while the server is unreachable


def required_metrics(plan: SweepPlan) -> tuple[str, ...]:
    """Result keys Tune's strict metric check requires: the searcher's and the scheduler's."""
    names = [plan.metric] + (["epoch_seconds"] if plan.searcher == "nsga2" else [])
    scheduler_metric = build_scheduler(plan).metric
    names += [scheduler_metric] if scheduler_metric else []
    return tuple(dict.fromkeys(names))


def rung_epochs(plan: SweepPlan) -> tuple[int, ...]:
    """Epochs at which the plan's scheduler may stop or pause a trial: they always checkpoint.

    ASHA judges a trial at its first epoch >= each rung, grace_period * reduction_factor**k up
    to max_epochs (Ray's ``_Bracket``, one bracket); a stopped trial's checkpoint is then its
    last epoch's. HyperBand pauses trials at band boundaries it picks as trials arrive and
    resumes them from their checkpoint, so every epoch is one. The median rule and FIFO only
    stop trials (no resume): every ``train.checkpoint_every`` epochs and the last suffice.
    """
    if plan.scheduler == "hyperband":
        return tuple(range(1, plan.max_epochs + 1))
    if plan.scheduler != "asha":
        return ()
    return tuple(asha_milestones(plan.grace_period, plan.max_epochs,
                                 plan.space.scheduler.get("reduction_factor", 2)))


def worker_bundle(args: argparse.Namespace, custom: dict[str, float] | None = None) -> dict:
    """The Ray resources one Train worker reserves: CPU, GPU (if any) and custom resources."""
    bundle = {"CPU": float(args.cpus_per_worker), **(custom or {})}
    if args.gpus_per_worker:
        bundle["GPU"] = float(args.gpus_per_worker)
    return bundle


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(name, 0.0) >= amount for name, amount in bundle.items())


def _describe(resources: dict[str, float]) -> str:
    """``1 CPU, 1 GPU, 2 trainer``: schedulable resources, without Ray's memory/node entries."""
    return ", ".join(f"{amount:g} {name}" for name, amount in sorted(resources.items())
                     if not name.startswith(("node:", "memory", "object_store_memory")))


def wait_for_a_fitting_node(bundle: dict[str, float], address: str, wait: float) -> None:
    """Return once a live node can hold one worker; ask the autoscaler and wait up to ``wait`` s.

    A request that no node can satisfy would otherwise wait forever in Ray's queue.
    """
    def live_nodes() -> list[dict]:
        return [n["Resources"] for n in ray.nodes() if n.get("Alive")]

    if any(_fits(bundle, node) for node in live_nodes()):
        return
    if wait > 0:
        from ray.autoscaler.sdk import request_resources

        say(f"no node of {address} can hold a worker ({_describe(bundle)}) yet; asking the "
              f"autoscaler and waiting up to {wait:g} s (--wait-for-nodes)")
        request_resources(bundles=[bundle])
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                if any(_fits(bundle, node) for node in live_nodes()):
                    return
                time.sleep(min(5.0, wait / 10))
        finally:
            request_resources(bundles=[])  # the trials' own requests drive scaling from here
    nodes = "; ".join(_describe(node) for node in live_nodes()) or "none"
    raise IfsearchError(
        f"each worker asks for {_describe(bundle)} but no node of {address} has that "
        f"(live nodes: {nodes}); lower --cpus-per-worker/--gpus-per-worker, check "
        "--worker-resource against the nodes' `ray start --resources`, or, on an autoscaling "
        "cluster whose workers are not up yet, pass --wait-for-nodes SECONDS"
    )


def start_ray(args: argparse.Namespace,
              worker_resources: dict[str, float] | None = None) -> tuple[int, str]:
    """Join --address, or start a local Ray; return (max concurrent trials, description).

    Tune does not count Train's worker resources, so concurrency is bounded here from what the
    workers need. Locally the drivers are idle while their workers train, so Ray gets one extra
    logical CPU per concurrent trial and the log says so. A request no node can ever satisfy is
    refused here instead of waiting forever. On a cluster an explicit --max-concurrent may
    exceed what the live nodes hold (the autoscaler adds nodes for pending workers).
    """
    workers, cpus, gpus = args.workers_per_trial, args.cpus_per_worker, args.gpus_per_worker
    if args.address:
        ray.init(address=args.address)
        bundle = worker_bundle(args, worker_resources)
        wait_for_a_fitting_node(bundle, args.address, args.wait_for_nodes)
        total = ray.cluster_resources()
        per_trial = {name: workers * amount for name, amount in bundle.items()}
        per_trial["CPU"] += DRIVER_CPUS
        fit = int(min(total.get(name, 0.0) // amount for name, amount in per_trial.items()))
        if fit < 1 and not args.wait_for_nodes:
            raise IfsearchError(
                f"one trial reserves {_describe(per_trial)} (driver + {workers} worker(s)) but "
                f"the cluster at {args.address} has {_describe(total)}; lower "
                "--workers-per-trial or the per-worker resources, or pass --wait-for-nodes on "
                "an autoscaling cluster")
        concurrent = args.max_concurrent or max(fit, 1)
        note = (f"Ray cluster {args.address}: {_describe(total)}; one trial reserves "
                f"{_describe(per_trial)} (driver + {workers} worker(s)), {fit} fit now")
        if concurrent > fit:
            note += f"; --max-concurrent {concurrent} relies on the autoscaler for the rest"
        return concurrent, note
    cores, local_gpus = local_machine()
    check_local_trial(workers, cpus, gpus, cores, local_gpus)  # the launcher checked it too
    fit = local_concurrency(workers, cpus, gpus, cores, local_gpus)
    concurrent = args.max_concurrent or fit
    num_cpus = local_ray_cpus(concurrent, workers, cpus, cores)
    # Ray Train's State API users (its state actor; its placement-group cleaner, which ifsearch's
    # trials no longer start) find their cluster through the State API, which gives up when
    # several Ray instances run on one machine ("Found multiple active Ray instances"); with
    # the cleaner, the placement groups of stopped trials were then never freed and the sweep
    # hung. So pin the GCS port and tell every process of this cluster its address.
    gcs_port = free_port("")  # the GCS listens on every interface
    address = f"{ray.util.get_node_ip_address()}:{gcs_port}"
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)
    try:
        ray.init(num_cpus=num_cpus, num_gpus=local_gpus, dashboard_host="127.0.0.1",
                 include_dashboard=True, runtime_env={"env_vars": {"RAY_ADDRESS": address,
                                                                   **LOCAL_TRAIN_ENV}})
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    note = (f"local Ray on {cores} cores with {num_cpus} logical CPUs: each of "
            f"{concurrent} concurrent trials reserves {DRIVER_CPUS:g} CPU for its idle driver + "
            f"{workers}x{cpus:g} for its workers")
    if concurrent > fit:
        note += f" (--max-concurrent {concurrent} > the {fit} that fit: trials share cores)"
    return concurrent, note


def run_sweep(plan: SweepPlan, args: argparse.Namespace, tracking_uri: str | None) -> int:
    """Run (or resume) the sweep and export the best config; returns the exit code.

    Every check that can refuse the sweep ran before (``ifsearch.search.cli``); the side effects
    start here: Ray, then the local MLflow server when no ``tracking_uri`` was given. At the
    default verbosity the terminal gets only the console's lines (``ifsearch.search.console``).
    """
    started = time.time()
    sweep_uri, local_dir = sweep_location(plan.storage, plan.name)
    with Console(local_dir / LOG_NAME, verbose=args.verbose):
        try:
            return _run_sweep(plan, args, tracking_uri, sweep_uri, local_dir, started)
        finally:  # here, so the workers' last forwarded lines still go to the log
            if ray.is_initialized():
                ray.shutdown()


def _run_sweep(plan: SweepPlan, args: argparse.Namespace, tracking_uri: str | None,
               sweep_uri: str, local_dir: Path, started: float) -> int:
    concurrent, where = start_ray(args, plan.worker_resources)
    say(where)
    tracking_uri = tracking_uri or local_tracking_uri(say=say)
    settings = TrialSettings(
        space=plan.space, num_workers=args.workers_per_trial,
        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
        custom_resources=plan.worker_resources, storage_path=f"{sweep_uri}/train",
        mlflow={"tracking_uri": tracking_uri, "experiment": args.experiment, "sweep": plan.name},
        required_metrics=required_metrics(plan),
        checkpoint_epochs=rung_epochs(plan),
    )
    client = MlflowClient(tracking_uri)
    parent_params = {
        "space": str(args.space), "scheduler": plan.scheduler, "searcher": plan.searcher,
        "num_samples": plan.num_samples, "max_epochs": plan.max_epochs,
        "grace_period": plan.grace_period, "metric": plan.metric, "mode": plan.mode,
        "rung_metric": f"{plan.rung_metric}:{plan.rung_mode}",
        "seed": plan.seed, "workers_per_trial": args.workers_per_trial,
        "cpus_per_worker": args.cpus_per_worker, "gpus_per_worker": args.gpus_per_worker,
        "worker_resources": ",".join(f"{k}={v:g}" for k, v in plan.worker_resources.items()),
        "ray_address": args.address or "local", "max_concurrent": concurrent,
        "overrides": " ".join(args.overrides),
        "host": platform.node(), **environment_params(),
    }
    parent_run_id = find_or_create_parent_run(client, args.experiment, plan.name, parent_params,
                                              [Path(args.space)])
    ui_link = sweep_view_link(client, tracking_uri, args.experiment, plan.name, plan.metric,
                              plan.mode, list(plan.space.params))
    trainable = tune.with_resources(
        tune.with_parameters(train_driver_fn, settings=settings), {"cpu": DRIVER_CPUS}
    )
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table takes chosen columns
    if args.resume:
        say(f"resuming sweep {plan.name} from {sweep_uri}")
        # The run config (MLflow logger, reporter) is restored from the experiment with it.
        tuner = tune.Tuner.restore(sweep_uri, trainable=trainable, resume_errored=True)
        num_samples, study_url = _resume_search(tuner, plan, args)
    else:
        num_samples = plan.num_samples
        study_url = plan.optuna_storage or default_storage(local_dir)
        if not plan.optuna_storage:
            local_dir.mkdir(parents=True, exist_ok=True)  # sqlite makes the file, not the dir
        logger = MlflowTrialLogger(tracking_uri, args.experiment, plan.name,
                                   plan.space, plan.max_epochs,
                                   spool_path=local_dir / SPOOL_NAME)
        table = ProgressTable(plan.name, list(plan.space.params), plan.metric, plan.mode,
                              plan.max_epochs)
        reporter = tune.CLIReporter(
            metric_columns=list(PROGRESS_METRICS),
            parameter_columns=list(plan.space.params)[:6],
            metric=plan.metric, mode=plan.mode, sort_by_metric=True, max_report_frequency=15,
        )
        # A trial whose own process dies is restarted once; its Train run (same name) resumes
        # from the last checkpoint. Worker deaths are retried inside Train (trainables/).
        # StartupPhases edits each trial's first result (start-up phases): before the logger.
        # FreeWorkersOfDeadTrials frees the workers of a trial whose driver process died.
        run_config = tune.RunConfig(name=plan.name, storage_path=plan.storage,
                                    callbacks=[StartupPhases(), logger, table,
                                               FreeWorkersOfDeadTrials()],
                                    progress_reporter=reporter,
                                    failure_config=tune.FailureConfig(max_failures=1))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(  # the search_alg limits concurrency itself
                search_alg=build_search_alg(plan, study_url, concurrent),
                scheduler=build_scheduler(plan), num_samples=plan.num_samples,
                # A finished trial's driver process takes the next trial: no new process, no
                # second import of Ray Train and torch (docs/benchmarks.md, start-up phases).
                reuse_actors=True,
            ),
            run_config=run_config,
        )
    say(f"sweep {plan.name}: {num_samples} trials x <= {plan.max_epochs} epochs, "
          f"{plan.searcher} + {plan.scheduler}, {concurrent} at once; MLflow {tracking_uri} "
          f"(experiment {args.experiment!r})")
    say(f"MLflow UI:     {ui_link}")  # the sweep's runs, best first
    if study_url:
        say(f"Optuna study {plan.name!r} in {redact_uri(study_url)} (open it with "
              f"optuna-dashboard or optuna.load_study)")
        client.set_tag(parent_run_id, "ifsearch.optuna_study", plan.name)
        client.set_tag(parent_run_id, "ifsearch.optuna_storage", redact_uri(study_url))
    # Tune turns SIGINT into a clean stop that saves the experiment; give SIGTERM (what
    # schedulers and `kill` send) the same meaning instead of dying mid-write.
    previous = signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        results = tuner.fit()
    finally:
        signal.signal(signal.SIGTERM, previous)
    # Tune has ended the trials' drivers; the Train workers each kept for its next trial
    # (trainables/worker_pool.py) go too.
    free_kept_workers()
    if _interrupted(sweep_uri, num_samples):
        try:
            marked = mark_interrupted(client, args.experiment, plan.name)
            runs = f"{marked} MLflow run(s) are marked KILLED ({INTERRUPTED_TAG}=true)"
        except UNREACHABLE as exc:
            runs = f"MLflow is unreachable ({type(exc).__name__}), runs were not marked"
        say(f"\nsweep {plan.name} interrupted: its state is saved in {sweep_uri} and {runs}. "
              f"Continue it with:\n  {plan.resume_command}")
        return 130
    efficiency = slot_efficiency(results, started, time.time(), concurrent)
    leaked = reserved_placement_groups() if args.address is None else 0
    if leaked:
        say(f"warning: {leaked} placement group(s) still reserved after the last trial: some "
            "trial's Train workers were never freed, and their CPUs were missing for the rest "
            "of the sweep (an ifsearch bug: please report it with the sweep's launch.log)")
    return _finish(plan, results, client, parent_run_id, tracking_uri, args, sweep_uri, local_dir,
                   ui_link, efficiency)


def _resume_search(tuner: tune.Tuner, plan: SweepPlan,
                   args: argparse.Namespace) -> tuple[int, str | None]:
    """Point a restored sweep's search at its budget and study; return (trials, study URL).

    ``--num-samples`` raises (or keeps) the budget, ``--optuna-storage`` moves the study,
    ``--warm-start`` is evaluated next unless the study has tried it already. The database is
    connected here, so an unreachable one fails before Tune starts.
    """
    search = restored_search(tuner)
    if search is None:  # started before ifsearch kept its own study: Ray's state as saved
        say("this sweep was started with Ray's OptunaSearch: it resumes as saved, without a "
              "persisted Optuna study or a new --num-samples")
        return plan.num_samples, None
    if args.num_samples is not None:
        search.num_samples = args.num_samples
    searcher = search.optuna
    if plan.optuna_storage:
        searcher.storage = plan.optuna_storage
    if plan.warm_start:
        searcher.enqueue_on_restore = [plan.warm_start]
    searcher.rdb()
    return search.num_samples, searcher.storage


def _interrupted(sweep_uri: str, num_samples: int) -> bool:
    """True when the saved experiment has trials left to run (fit returned early)."""
    trials = tune.ExperimentAnalysis(sweep_uri).trials
    unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    return bool(unfinished) or len(trials) < num_samples


def _finish(plan, results, client, parent_run_id, tracking_uri, args, sweep_uri: str,
            local_dir: Path, ui_link: str, efficiency: dict[str, float]) -> int:
    """Pick the best trial, write and log best_config.yaml, the trials CSV and plots; say how
    much of the slot-time trained and whether the scheduler's rungs could be trusted."""
    ok = [r for r in results if r.error is None and plan.metric in (r.metrics or {})
          and not r.metrics.get(DIVERGED)]
    if not ok:
        try:
            finish_parent_run(client, parent_run_id, status="FAILED")
        except UNREACHABLE:
            pass  # the error below is what matters
        raise IfsearchError(f"no trial of sweep {plan.name} reported {plan.metric}; see the "
                            f"trial errors above and {sweep_uri}")
    best = results.get_best_result(plan.metric, plan.mode, scope="last",
                                   filter_nan_and_inf=True)
    sampled = {k: v for k, v in best.config.items() if k in plan.space.params}
    config = plan.space.resolve(sampled)
    checkpoint = best.metrics.get("checkpoint_path")
    best_path = write_best_config(config, local_dir / "best_config.yaml", {
        "metric": plan.metric, "mode": plan.mode, "sweep": plan.name,
        "trial_id": best.metrics.get("trial_id"), "checkpoint": checkpoint,
        "metrics": {k: v for k, v in best.metrics.items() if isinstance(v, (int, float))},
        "searched": sampled,
    })
    report = local_dir / "report"  # kept next to best_config.yaml (and spooled if need be)
    csv_path = write_trials_csv(results, report / "trials.csv")
    plots = write_plots(results, plan, report / "plots")
    trust = sweep_rung_trust(results, plan)
    tags = {}
    if trust is not None:
        tags["ifsearch.rung_trust"] = trust["summary"]
    finish = {
        "kind": "parent_end", "sweep": plan.name, "status": "FINISHED",
        # best_<objective> is already logged, once per finished trial (MlflowTrialLogger).
        "metrics": {k: best.metrics[k] for k in ("AP", "AP50", "AP25", "AP50_agnostic")
                    if k in best.metrics and k != plan.metric},
        "sweep_metrics": {"slot_efficiency": efficiency["slot_efficiency"]},
        "artifacts": [str(p) for p in (best_path, best_path.with_name("best_config_trial.json"),
                                       csv_path)],
        "artifact_dirs": {"plots": str(plots)},
        "tags": {"ifsearch.best_trial": str(best.metrics.get("trial_id")),
                 "ifsearch.checkpoint": str(checkpoint), **tags},
    }
    spool = Spool(local_dir / SPOOL_NAME, tracking_uri, args.experiment)
    if spool.path.exists():  # trial logging waits there: the parent goes last, after it
        spool.append(finish)
        say(spool.warning(IfsearchError("some records could not be sent")))
    else:
        try:
            RunWriter(client, args.experiment).apply(finish)
        except UNREACHABLE as exc:
            spool.append(finish)
            say(spool.warning(exc))
    failed = len(results) - len(ok)
    # ResultGrid lists trials in creation order, the order of their names (<sweep>/tNN)
    trial_ids = [r.metrics.get("trial_id") for r in results if r.metrics]
    best_id = best.metrics.get("trial_id")
    best_name = (f"{plan.name}/t{trial_ids.index(best_id) + 1:02d}" if best_id in trial_ids
                 else str(best_id))
    say("\nbest trial: " + best_name + "  " + " ".join(
        f"{k}={best.metrics[k]:.4f}" for k in dict.fromkeys((plan.metric, "AP50", "AP50_agnostic"))
        if k in best.metrics))
    for key, value in sampled.items():
        say(f"  {key}: {value}")
    say(f"best config:   {best_path}")
    say(f"checkpoint:    {checkpoint}")
    say(f"MLflow UI:     {ui_link}")
    say(f"retrain:       python -m ifsearch.train --config {best_path}")
    say(f"warm start:    python -m ifsearch.launch --warm-start {best_path}")
    say(f"sweep efficiency: {efficiency['slot_efficiency']:.0%} of the slot-time went into "
        f"training and validation epochs ({efficiency['epoch_seconds']:.0f} s of "
        f"{efficiency['slot_seconds']:.0f} slot-seconds; the rest: Ray, MLflow and trial "
        "start-up, reports, idle slots)")
    if trust is not None and trust["trustworthy"] is False:
        say(trust["summary"])
    if failed:
        say(f"{failed} trial(s) failed; their errors are in {sweep_uri}")
    return 0
