"""Trial start-up and per-epoch report cost of a sweep, phase by phase.

Runs ``python -m ifsearch.launch`` on small FIFO sweeps of the default space, one trial at a time
(``--max-concurrent 1``) and two at once, each logging to a local MLflow server of its own, and
reads every trial's MLflow run back:

- start-up phases: the ``startup_<phase>_s`` metrics of the trial's first epoch
  (``trainables/startup.py`` says where each is measured); ``startup_total_s`` = Tune creating
  the trial to its first result, minus that epoch's own ``epoch_seconds``;
- without those metrics (code before they existed, ``--repo``): the total from MLflow's own
  clocks, first ``epoch_seconds`` metric's timestamp - run start - that epoch's seconds (the run
  starts once the trial's actor is up, so this misses the trial actor's start);
- report overhead: time between two consecutive results of a trial (MLflow metric timestamps)
  minus the later epoch's ``epoch_seconds``: the report barrier, checkpoint copies, the
  controller's poll and Tune's result handling;
- slot idle between trials (one at a time only): Tune creating a trial (its first result's time
  minus its phases) - the previous trial's MLflow end; the MLflow start without phases.

Each run is kept under a label in ``docs/data/startup.json`` and the section shows every label
side by side, so a before/after pair is two runs: ``--label before --repo <old checkout>`` and
``--label after``. The load of the rest of the machine during each run is measured
(``benchmarks/load.py``) and printed with the table.

    python benchmarks/startup.py --label after          # ~6 min on 2 cores -> docs/benchmarks.md
    python benchmarks/startup.py --smoke-test           # one 2-trial sweep; a temporary file only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
for _path in (str(BENCHMARKS), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from launcher import end_launcher  # noqa: E402
from load import OtherLoad  # noqa: E402
from report import DOCS, markdown_table, write_section  # noqa: E402

from trainables.startup import PHASE_PREFIX, PHASES, TOTAL_KEY  # noqa: E402

SECTION = "startup"
TITLE = "Trial start-up and report cost, phase by phase"
DATA = REPO / "docs" / "data" / "startup.json"
SPACE = REPO / "search_spaces" / "influencer_default.yaml"
# (max concurrent, trials, epochs): enough trials for a median, epochs for report gaps.
FULL = ((1, 5, 3), (2, 6, 3))
SMOKE = ((1, 2, 2),)
SMOKE_SETS = ["data.num_points=256", "data.train_scenes=8", "data.val_scenes=4"]
EXPERIMENT = "startup_benchmark"


@dataclass
class TrialTiming:
    """One trial's start-up phases (seconds) and its report overheads."""

    phases: dict[str, float]
    total_s: float  # startup_total_s, or MLflow's estimate when the phases are absent
    mlflow_total_s: float  # MLflow's estimate: a cross-check of the phases' clock chain
    first_epoch_s: float
    report_overhead_s: list[float] = field(default_factory=list)
    created_ms: int = 0  # Tune created the trial (MLflow's run start when phases are absent)
    end_ms: int = 0


@dataclass
class SweepTiming:
    concurrent: int
    trials: list[TrialTiming]
    wall_s: float
    load: str
    busy: bool
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by process title

    def gaps_between_trials(self) -> list[float]:
        """Seconds a slot stood empty: a trial's start - the previous one's end (one at a time)."""
        if self.concurrent != 1:
            return []
        ordered = sorted(self.trials, key=lambda t: t.created_ms)
        return [(b.created_ms - a.end_ms) / 1000 for a, b in zip(ordered, ordered[1:])
                if a.end_ms]


def launch_env(repo: Path) -> dict[str, str]:
    """This environment with ``repo`` first on PYTHONPATH: the launcher runs that code."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(repo), *filter(None, [os.environ.get("PYTHONPATH")])]))


def run_sweep(concurrent: int, trials: int, epochs: int, *, repo: Path, workdir: Path,
              tracking_uri: str, sets: list[str], timeout: float, log=print) -> SweepTiming:
    """One launcher run (its own local Ray) in ``workdir``; returns its trials' timings."""
    name = f"c{concurrent}-{time.strftime('%H%M%S')}"
    # Each checkout sweeps its own influencer_default.yaml: an older one cannot read newer keys.
    space = repo / SPACE.relative_to(REPO)
    cmd = [sys.executable, "-m", "ifsearch.launch", "--space", str(space),
           "--num-samples", str(trials), "--max-epochs", str(epochs),
           "--max-concurrent", str(concurrent), "--scheduler", "fifo", "--searcher", "random",
           "--name", name, "--storage", str(workdir / "sweeps"), "--mlflow-uri", tracking_uri,
           "--experiment", EXPERIMENT]
    for item in sets:
        cmd += ["--set", item]
    log_path = workdir / f"{name}.log"
    log(f"{name}: {trials} trials x {epochs} epochs, {concurrent} at once (log: {log_path})")
    started = time.perf_counter()
    with open(log_path, "w") as log_file, OtherLoad() as load:
        proc = subprocess.Popen(cmd, cwd=workdir, env=launch_env(repo), stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name}: not finished after {timeout:.0f} s; see {log_path}")
        finally:
            end_launcher(proc, grace=60.0)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-40:])
        raise RuntimeError(f"{name}: launcher exited with {proc.returncode}:\n{tail}")
    timings = read_trials(tracking_uri, name)
    log(f"  {len(timings)} trials in {wall:.0f} s; {load.verdict()}")
    return SweepTiming(concurrent, timings, wall, load.verdict(), load.busy, dict(load.ours))


def read_trials(tracking_uri: str, sweep: str) -> list[TrialTiming]:
    """Every trial run of ``sweep`` with its phases and report overheads, from MLflow."""
    from mlflow.tracking import MlflowClient

    from ifsearch.tracking.runs import ROLE_TAG, SWEEP_TAG, tag_filter

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id],
                              tag_filter({SWEEP_TAG: sweep, ROLE_TAG: "trial"}))
    timings = []
    for run in runs:
        history = sorted(client.get_metric_history(run.info.run_id, "epoch_seconds"),
                         key=lambda m: m.step)
        if not history:
            continue
        first = history[0]
        mlflow_total = (first.timestamp - run.info.start_time) / 1000 - first.value
        phases = {key: value for key, value in run.data.metrics.items()
                  if key.startswith(PHASE_PREFIX) and key != TOTAL_KEY}
        # A trial restarted mid-run logs its phases twice; the last value is the restart's.
        total = run.data.metrics.get(TOTAL_KEY, mlflow_total)
        overheads = [(b.timestamp - a.timestamp) / 1000 - b.value
                     for a, b in zip(history, history[1:]) if b.step == a.step + 1]
        created = run.info.start_time
        if TOTAL_KEY in run.data.metrics:  # the phases start at Tune's creation of the trial
            created = int(first.timestamp - 1000 * (total + first.value))
        timings.append(TrialTiming(phases, total, mlflow_total, first.value, overheads,
                                   created, run.info.end_time or 0))
    return timings


def _median(values: list[float]) -> str:
    if not values:
        return "-"
    text = f"{statistics.median(values):.2f}"
    return text if len(values) < 2 else f"{text} ({min(values):.2f}-{max(values):.2f})"


def summarize(sweep: SweepTiming) -> dict[str, str]:
    """Row name -> "median (min-max)" for one sweep."""
    rows = {}
    for name, _, _, _ in PHASES:
        values = [t.phases[f"{PHASE_PREFIX}{name}_s"] for t in sweep.trials
                  if f"{PHASE_PREFIX}{name}_s" in t.phases]
        rows[name] = _median(values)
    rows["startup_total"] = _median([t.total_s for t in sweep.trials])
    rows["mlflow_total"] = _median([t.mlflow_total_s for t in sweep.trials])
    rows["report_overhead"] = _median([o for t in sweep.trials for o in t.report_overhead_s])
    rows["epoch"] = _median([t.first_epoch_s for t in sweep.trials])
    rows["between_trials"] = _median(sweep.gaps_between_trials())
    return rows


ROW_LABELS = {
    **{name: f"`{name}`: {text}" for name, _, _, text in PHASES},
    "startup_total": "**start-up** (Tune creating the trial to its first result, minus the "
                     "first epoch)",
    "mlflow_total": "start-up by MLflow's clocks (run start, once the trial actor is up, to "
                    "the first metric, minus the epoch)",
    "report_overhead": "**report overhead per epoch** (between two results, minus the epoch)",
    "epoch": "first epoch's own `epoch_seconds` (training + validation)",
    "between_trials": "slot idle between trials (a trial's end to the next one's creation)",
}


def cpu_per_trial(sweep: SweepTiming) -> dict[str, float]:
    """CPU seconds per trial of each kind of process (all processes of that title / trials).

    CPU time, unlike wall-clock, barely depends on what else runs on the machine: this is the
    work a trial's start-up and training cost, wherever it went."""
    trials = max(len(sweep.trials), 1)
    return {title: cpu / trials for title, cpu in sorted(sweep.cpu.items(), key=lambda i: -i[1])}


# Issue 13's goal: median start-up (seconds) on 2 cores, by trials at once.
GOALS = {"1": 3.0, "2": 6.0}


def goal_line(data: dict) -> str:
    """Whether the latest run (the last label written) meets the start-up goal."""
    label, run = list(data.items())[-1]
    parts = []
    for key, goal in GOALS.items():
        if key in run["sweeps"]:
            median = float(run["sweeps"][key]["rows"]["startup_total"].split()[0])
            verdict = "met" if median <= goal else "not met"
            parts.append(f"{median:.2f} s at {key} at once (goal <= {goal:g} s: {verdict})")
    return (f"**Goal (issue 13), latest run ({label})**: median start-up "
            + "; ".join(parts) + ".")


def render(data: dict) -> str:
    """The section body: one column per (label, concurrency), medians over trials."""
    columns = [(label, key) for label, run in data.items() for key in sorted(run["sweeps"])]
    headers = ["seconds: median (min-max) over trials"] + [
        f"{label}, {key} at once" for label, key in columns]
    rows = [[text] + [data[label]["sweeps"][key]["rows"].get(name, "-")
                      for label, key in columns]
            for name, text in ROW_LABELS.items()]
    cpu = {(label, key): data[label]["sweeps"][key].get("cpu_per_trial", {})
           for label, key in columns}
    titles = sorted({t for per in cpu.values() for t, v in per.items() if v >= 0.2},
                    key=lambda t: -max(per.get(t, 0.0) for per in cpu.values()))
    cpu_rows = [[f"`{title}`"] + [f"{cpu[c][title]:.1f}" if title in cpu[c] else "-"
                                  for c in columns] for title in titles]
    cpu_rows.append(["**all processes**"] + [f"{sum(cpu[c].values()):.1f}" for c in columns])
    lines = [
        "Small FIFO sweeps of `search_spaces/influencer_default.yaml` (random searcher, "
        "`--max-epochs 3`), run with `python -m ifsearch.launch` against a local MLflow server; "
        "every number is read back from the trials' MLflow runs. The phases tile the interval "
        "from Tune creating a trial to Tune receiving its first result; where each mark is "
        "taken is in `trainables/startup.py`. Start-up excludes the first epoch's own "
        "training and validation (its checkpoint write stays in).",
        "",
        markdown_table(headers, rows),
        "",
        goal_line(data),
        "",
        "CPU seconds per trial, by process (all of the sweep's processes: the launcher with "
        "Tune and the MLflow logging, Ray's daemons, and each trial's actors; the workers' "
        "includes their 3 epochs of training; CPU time hardly "
        "depends on the machine's other load, unlike the seconds above; processes under 0.2 s "
        "left out):",
        "",
        markdown_table(["CPU s per trial"] + headers[1:], cpu_rows),
        "",
    ]
    for label, run in data.items():
        for key in sorted(run["sweeps"]):
            sweep = run["sweeps"][key]
            lines.append(f"- {label}, {key} at once ({run['date']}, code {run['code']}, "
                         f"{sweep['trials']} trials, sweep wall-clock {sweep['wall_s']:.0f} s): "
                         f"{sweep['load']}")
    lines += ["", EXPLANATION]
    if any(s["busy"] for run in data.values() for s in run["sweeps"].values()):
        lines += ["", "**Some runs above were disturbed** by other processes (see the load "
                      "lines): rerun them on an idle machine before comparing numbers."]
    return "\n".join(lines)


EXPLANATION = """\
What a trial's start-up is made of, and what the launcher does about it (issue 13):

- **Processes.** A trial is a Tune actor (the driver) that builds a `TorchTrainer`; Ray Train
  then starts a controller actor, a synchronisation actor and the workers: fresh Python
  processes that each import Ray (and most of them Ray Train, with pandas and Ray Data) before
  doing anything, one to three CPU seconds each. Cut: a finished trial's driver runs the next
  trial (Tune's `reuse_actors`; a trial stopped by the scheduler has its Train run aborted
  first, `TrialTorchTrainer.abort`); the Train controller runs on a thread of the driver, not
  as an actor of its own (`ray_report.ControllerThread`), so a reused driver has it imported
  already; no Ray Data `DatasetManager` actor for runs without Ray datasets; no preemption
  watcher on a local Ray; no placement-group cleaner actor (the controller frees the placement
  group of a run that ends or is aborted, the sweep that of a trial whose driver died:
  `FreeWorkersOfDeadTrials`); no Tune result-queue actor (the driver takes the controller's
  reports from its outbox: `trainables/ray_report.py`). And the driver keeps its last run's
  Train workers and their placement group for its next trial (`trainables/worker_pool.py`):
  Ray Train sets each worker up anew for the new run (train context, result queue, training
  thread), but the processes, with torch and the training loop imported, carry over; a trial
  stopped by the scheduler ends its training at the next step (`train_loop`'s `stop`).
- **Imports.** The controller (now the driver) used to import torch only to unpickle Ray's
  `TorchConfig` (`trainables/backend.py` keeps torch out of it). The worker's torch, the training loop and
  `torch._dynamo` (imported by torch's first optimizer, in the `model` phase) are needed;
  `scipy.optimize` (the Hungarian matcher's solver) is imported on the first match only, so
  Influencer trials' workers never import it.
- **torch.distributed** for a group of one: skipped (`backend_setup`).
- **Datasets**: the synthetic scenes are generated lazily, per item, so building them costs
  milliseconds (`dataset`): nothing to cache or share. S3DIS is converted once per sweep
  before Ray starts (`ifsearch.search.cli.prepare_data`).
- **Reports.** Ray Train's controller hands a report to Tune only when it polls its workers,
  every 2 s by default, and a worker whose previous report is unpolled waits: ~1 s per epoch of
  a 1 s epoch. Trials poll every 0.2 s (`trainables.driver.TRAIN_ENV`). A checkpoint goes with
  every `train.checkpoint_every`-th epoch (default 2), the scheduler's rung epochs and the last
  one, copied once (it was staged, then copied again), and not at all on the other epochs.

Why keep the workers rather than warm new ones: Ray prestarts idle worker processes only
when it starts, an actor never takes a prestarted one (with or without a runtime environment)
nor a process another task or actor has used, and `preload_python_modules` only moves the
imports into the actor's start (all measured on Ray 2.60). What is left is the first trial of
each slot (a new driver and new workers: the max of each phase) and, per trial, the run's
synchronisation actor, a new process that starts beside the run (the CPU table) but is not
waited for before the first report.
"""


def code_version(repo: Path) -> str:
    out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                         text=True, cwd=repo)
    return out.stdout.strip() or "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke-test", action="store_true",
                   help="one sweep of 2 tiny trials x 2 epochs, one at a time; writes only to "
                        "--out or a temporary file, never docs/")
    p.add_argument("--label", default="current",
                   help="name of this run's columns (e.g. before / after)")
    p.add_argument("--repo", type=Path, default=REPO,
                   help="checkout whose code the sweeps run (older code logs no phases: its "
                        "start-up comes from MLflow's clocks)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file whose 'startup' section is (re)written (default: "
                        "docs/benchmarks.md; a temporary file with --smoke-test)")
    p.add_argument("--data", type=Path, default=None,
                   help=f"JSON file keeping every label's results (default: {DATA}; next to "
                        "--out otherwise)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per sweep")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out
    if out is None:
        out = (Path(tempfile.mkdtemp(prefix="ifsearch_bench_")) / "benchmarks.md"
               if args.smoke_test else DOCS)
    out = out.resolve()
    data_path = args.data or (DATA if out == DOCS.resolve() else out.with_name("startup.json"))
    data = json.loads(data_path.read_text()) if data_path.exists() else {}

    from ifsearch.tracking.server import start_local_server, stop_local_server

    scratch = Path(tempfile.mkdtemp(prefix="ifsearch_startup_"))
    sweeps = {}
    try:
        server = start_local_server(scratch / "mlflow")
        try:
            for concurrent, trials, epochs in (SMOKE if args.smoke_test else FULL):
                sweep = run_sweep(concurrent, trials, epochs, repo=args.repo.resolve(),
                                  workdir=scratch, tracking_uri=server.url,
                                  sets=SMOKE_SETS if args.smoke_test else [],
                                  timeout=args.timeout)
                sweeps[str(concurrent)] = {
                    "rows": summarize(sweep), "trials": len(sweep.trials),
                    "wall_s": sweep.wall_s, "load": sweep.load, "busy": sweep.busy,
                    "cpu_per_trial": cpu_per_trial(sweep),
                    "raw": [asdict(t) for t in sweep.trials]}
        finally:
            stop_local_server(scratch / "mlflow")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    data[args.label] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "code": code_version(args.repo), "sweeps": sweeps}
    data_path.parent.mkdir(parents=True, exist_ok=True)
    data_path.write_text(json.dumps(data, indent=1) + "\n")
    write_section(SECTION, TITLE, render(data), path=out)
    print(f"wrote section '{SECTION}' of {out} and {data_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
