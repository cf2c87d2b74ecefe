"""Search efficiency: at one wall-clock budget, how soon does each search find a good config?

Three arms, each a real sweep (``python -m ifsearch.launch`` as a subprocess, its own local Ray,
MLflow in a sqlite file of the work folder), on the same space, data and trial budget:

* **random + FIFO**: random configurations, every trial trained to ``max_epochs``;
* **TPE + ASHA, Ray's OptunaSearch** (``--searcher-impl ray``): the behaviour before ifsearch had
  its own searcher; a trial ASHA stops is told to Optuna as COMPLETE with its truncated value;
* **TPE + ASHA, ifsearch's searcher** (the default): the stopped trial is told PRUNED, with its
  intermediate values, so TPE ranks it after the finished ones.

Equal wall-clock: every sweep runs for ``W`` seconds from the moment its launcher starts (Ray's
start-up included: a user pays it), is then interrupted (SIGINT: Tune saves its state, the
launcher exits), and every epoch report is read back with its wall-clock time (``read_sweep``).
Each sweep gets more trials than can start in ``W`` (``NUM_SAMPLES``), so none runs out early.
The incumbent at time t is the best objective any epoch report made before t (a checkpointed
model one could keep). Reported: the incumbent vs wall-clock (mean and min..max over searcher
seeds, a plot), and the wall-clock each arm needs to reach random + FIFO's final best (per seed,
and on the mean curves); plus whether ASHA's rungs were trustworthy (``rung_trust``) and what
each searcher told Optuna (the sweep's ``optuna.db``).

Goal (issue 13): ifsearch's TPE + ASHA reaches random + FIFO's final best in <= 50 % of the
wall-clock random + FIFO needs. The section says whether it was met, generated from the numbers.

Why one script of ~880 lines: like every benchmark here it is one standalone command that writes
one section of docs/benchmarks.md (run, read back, judge, write); its parts are used nowhere
else, and the shared pieces live in ``launcher.py`` and ``report.py``.

    python benchmarks/search_efficiency.py                # 5 seeds x 3 arms x 6 min: ~1.6 h
    python benchmarks/search_efficiency.py --quick        # 2 seeds x 3 arms x 2 min: ~14 min
    python benchmarks/search_efficiency.py --smoke-test   # 1 seed x 3 arms x 60 s, tiny scenes
    python benchmarks/search_efficiency.py --report-only  # rebuild the section from --workdir

Sweeps run one at a time (arms interleaved seed by seed, so a change of the machine's load does
not fall on one arm only). Resumable: a finished (arm, seed) sweep is recorded in
``<workdir>/<sweep>.json`` and skipped by a rerun; one interrupted midway is set aside and run
again from its start (a wall-clock budget cannot be resumed). Only the full mode writes
docs/benchmarks.md and docs/img/; --quick writes into its work folder, --smoke-test into a
temporary folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
for _path in (str(BENCHMARKS), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from launcher import end_launcher, launcher_env  # noqa: E402
from report import DOCS, IMAGES, markdown_table, save_figure, write_section  # noqa: E402

SECTION = "search_efficiency"
TITLE = "Search efficiency: TPE + ASHA vs random + FIFO at equal wall-clock"
# The space users start from (README, `make demo`): the search a user runs by default, on scenes
# small enough that a trial takes seconds, so a 6-minute sweep tries tens of configurations.
DEFAULT_SPACE = REPO / "search_spaces" / "influencer_default.yaml"
IMAGE = "search_efficiency.png"
SMOKE_SETS = ("data.num_points=256", "data.train_scenes=8", "data.val_scenes=4")
# More trials than can start in any budget here (a trial takes seconds at least): the sweep is
# stopped by the clock, never by running out of trials.
NUM_SAMPLES = 10_000
END_S = 20.0  # seconds to stop a launcher and its Ray after W (for the time estimate only)
GOAL_RATIO = 0.5  # issue 13: ifsearch's TPE + ASHA needs <= 50 % of random + FIFO's wall-clock


@dataclass(frozen=True)
class Arm:
    key: str  # the sweep names' prefix
    label: str
    searcher: str  # --searcher
    scheduler: str  # --scheduler
    impl: str  # --searcher-impl


ARMS = (
    Arm("random-fifo", "random + FIFO", "random", "fifo", "ifsearch"),
    Arm("tpe-asha-ray", "TPE + ASHA, Ray's OptunaSearch", "tpe", "asha", "ray"),
    Arm("tpe-asha-ifsearch", "TPE + ASHA, ifsearch's searcher", "tpe", "asha", "ifsearch"),
)
BASELINE, GOAL_ARM = ARMS[0], ARMS[2]


@dataclass(frozen=True)
class Mode:
    """What one mode runs: the budget W per sweep, the searcher seeds, the trial budget."""

    wall_s: float
    seeds: tuple[int, ...]
    max_epochs: int | None = None  # None: the space's budget.max_epochs
    grace_period: int | None = None  # None: the space's budget.grace_period
    sets: tuple[str, ...] = ()


MODES = {
    # 3 arms x 5 seeds x (6 min + ~20 s to stop): ~1.6 h on 2 cores.
    "full": Mode(360.0, (0, 1, 2, 3, 4)),
    "quick": Mode(120.0, (0, 1)),
    # 3 epochs with a rung at 1 and 2, so ASHA stops trials even in a minute.
    "smoke": Mode(60.0, (0,), max_epochs=3, grace_period=1, sets=SMOKE_SETS),
}


class BenchmarkError(Exception):
    """Something the user must fix before the benchmark can go on (the message says what)."""


# ---------------------------------------------------------------------------- reading sweeps


@dataclass
class Report:
    """One epoch report of one trial."""

    trial_id: str
    epoch: int
    value: float
    time: float  # wall-clock seconds (epoch time) when Tune received it
    seconds: float = 0.0  # the epoch's own epoch_seconds (training + validation)
    values: dict[str, float] = field(default_factory=dict)  # the other metrics read


@dataclass
class TrialInfo:
    trial_id: str
    start: float  # Tune's trial start time (RUNNING), epoch seconds
    first_report_s: float  # trial start -> first epoch report (Ray's trainable clock)
    startup_s: float  # first_report_s minus the first epoch's own epoch_seconds
    reports: list[Report] = field(default_factory=list)


def _trial_start_times(sweep_dir: Path) -> dict[str, float]:
    """trial id -> Tune's ``run_metadata.start_time`` from the newest experiment_state file."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
        starts = {}
        for trial_json, meta_json in data["trial_data"]:
            trial, meta = json.loads(trial_json), json.loads(meta_json)
            if meta.get("start_time") is not None:
                starts[trial["trial_id"]] = float(meta["start_time"])
        return starts
    except (ValueError, KeyError, TypeError):  # a format change: fall back to result timestamps
        return {}


def read_sweep(sweep_dir: Path, metric: str = "AP50",
               extra: Sequence[str] = ()) -> list[TrialInfo]:
    """Every trial of a Tune experiment folder with its epoch reports, ordered by start time.

    Clocks (all Ray's own): Tune sets a trial's ``start_time`` when the trial's actor is up and
    it is marked RUNNING (``experiment_state-*.json``); every result carries ``time_total_s``, the
    trainable's seconds since its first ``train()`` call. A report's wall-clock time is
    ``start_time + time_total_s`` (sub-second; the result's own ``timestamp`` is whole seconds and
    is the fallback when the state file lacks the trial: ``start = timestamp - time_total_s``).
    Time to first report = ``time_total_s`` of the first result; start-up overhead = that minus
    the first epoch's own ``epoch_seconds`` (training + validation inside ``train_loop``), i.e.
    Ray Train's controller and worker start-up, process group, data and model build, and the
    checkpoint report. ``extra`` metrics are kept in each report's ``values`` when present.
    """
    starts = _trial_start_times(sweep_dir)
    trials = []
    for result_file in sweep_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "epoch" in r and metric in r]
        if not rows:
            continue
        first = rows[0]
        trial_id = first["trial_id"]
        start = starts.get(trial_id, first["timestamp"] - first["time_total_s"])
        info = TrialInfo(
            trial_id=trial_id, start=start, first_report_s=first["time_total_s"],
            startup_s=first["time_total_s"] - first.get("epoch_seconds", 0.0),
        )
        info.reports = [Report(trial_id, int(r["epoch"]), float(r[metric]),
                               start + r["time_total_s"], float(r.get("epoch_seconds", 0.0)),
                               {m: float(r[m]) for m in extra if r.get(m) is not None})
                        for r in rows]
        trials.append(info)
    return sorted(trials, key=lambda t: t.start)


def told_states(sweep_dir: Path, name: str, max_epochs: int) -> dict[str, int]:
    """What the searcher told Optuna, from the sweep's own study (``optuna.db``).

    ``COMPLETE`` counts trials told finished, ``truncated`` those of them whose last
    intermediate step is below ``max_epochs`` (stopped early yet told COMPLETE: Ray's
    OptunaSearch); RUNNING ones were still training when the budget ran out.
    """
    import optuna

    path = sweep_dir / "optuna.db"
    if not path.exists():
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{path}")
    except KeyError:
        return {}
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
        if trial.state.name == "COMPLETE" and \
                max(trial.intermediate_values, default=max_epochs) < max_epochs:
            counts["truncated"] = counts.get("truncated", 0) + 1
    return counts


# --------------------------------------------------------------------- incumbent vs wall-clock

Curve = list[tuple[float, float]]  # (seconds since the launcher started, best so far), ascending


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def incumbent(trials: list[TrialInfo], launch_time: float, horizon: float,
              mode: str = "max") -> Curve:
    """The best objective reported so far, at each report that improved it, up to ``horizon``.

    Times are seconds since ``launch_time`` (the launcher's start); reports after ``horizon``
    are left out (the budget is spent).
    """
    reports = sorted((r for t in trials for r in t.reports), key=lambda r: r.time)
    curve: Curve = []
    for report in reports:
        elapsed = report.time - launch_time
        if elapsed > horizon:
            break
        if not curve or _better(report.value, curve[-1][1], mode):
            curve.append((elapsed, report.value))
    return curve


def value_at(curve: Curve, t: float) -> float | None:
    """The incumbent at time ``t`` (None before the first report)."""
    value = None
    for when, best in curve:
        if when > t:
            break
        value = best
    return value


def time_to_reach(curve: Curve, target: float, mode: str = "max") -> float | None:
    """The first time the incumbent is at least as good as ``target``; None if it never is."""
    for when, best in curve:
        if best == target or _better(best, target, mode):
            return when
    return None


def mean_curve(curves: list[Curve]) -> list[tuple[float, float, float, float]]:
    """(t, mean, min, max) of the incumbents over seeds, at every time one of them changes.

    Defined from the time every seed has reported (an incumbent before its first report has no
    value); empty if some seed never reported.
    """
    if not curves or any(not c for c in curves):
        return []
    start = max(c[0][0] for c in curves)
    times = sorted({t for c in curves for t, _ in c if t >= start} | {start})
    out = []
    for t in times:
        values = [value_at(c, t) for c in curves]
        out.append((t, statistics.fmean(values), min(values), max(values)))
    return out


def analyse(sweeps: list[Sweep], horizon: float, mode: str) -> dict:
    """Per arm: incumbents, their mean, time to reach random + FIFO's final best; the goal.

    The target of the mean curves is the mean over seeds of random + FIFO's final best; a
    seed's own target is its random + FIFO sweep's final best (seeds paired by number: the
    same number seeds a different sampler, so the pairing only fixes which target a seed gets).
    """
    by_arm: dict[str, dict[int, Sweep]] = {}
    for sweep in sweeps:
        by_arm.setdefault(sweep.arm.key, {})[sweep.seed] = sweep
    curves = {arm: {seed: incumbent(s.trials, s.meta["launch_time"], horizon, mode)
                    for seed, s in seeds.items()} for arm, seeds in by_arm.items()}
    base = curves.get(BASELINE.key, {})
    finals = {seed: c[-1][1] for seed, c in base.items() if c}
    target = statistics.fmean(finals.values()) if finals and len(finals) == len(base) else None
    arms = {}
    for key, seeds in curves.items():
        mean = mean_curve(list(seeds.values()))
        per_seed = {}
        for seed, curve in seeds.items():
            own = finals.get(seed)
            per_seed[seed] = {
                "final": curve[-1][1] if curve else None,
                "target": own,
                "reach": time_to_reach(curve, own, mode) if own is not None else None,
            }
        arms[key] = {
            "curves": seeds, "mean": mean, "per_seed": per_seed,
            "reach": (time_to_reach([(t, m) for t, m, _, _ in mean], target, mode)
                      if target is not None else None),
        }
    for key, info in arms.items():
        for seed, row in info["per_seed"].items():
            base_t = arms.get(BASELINE.key, {}).get("per_seed", {}).get(seed, {}).get("reach")
            row["ratio"] = row["reach"] / base_t if row["reach"] is not None and base_t else None
    base_t = arms.get(BASELINE.key, {}).get("reach")
    for info in arms.values():
        info["ratio"] = info["reach"] / base_t if info["reach"] is not None and base_t else None
    return {"arms": arms, "target": target, "mode": mode, "horizon": horizon}


def goal_sentence(result: dict, metric: str, seeds: int) -> str:
    """Whether ifsearch's TPE + ASHA met the goal, in words generated from ``analyse``."""
    arms, target, horizon = result["arms"], result["target"], result["horizon"]
    base, goal = arms.get(BASELINE.key), arms.get(GOAL_ARM.key)
    if base is None or goal is None or target is None or base["reach"] is None:
        return (f"**No answer**: {BASELINE.label} reported no epoch within the {horizon:.0f} s "
                "budget in some seed, so there is no final best to reach.")
    what = (f"{BASELINE.label}'s final best (val {metric} {target:.3f}, mean over {seeds} "
            f"seed{'s' if seeds > 1 else ''}), which {BASELINE.label} itself reached after "
            f"{base['reach']:.0f} s")
    if goal["reach"] is None:
        best = (f"its mean best: {goal['mean'][-1][1]:.3f}" if goal["mean"] else
                "in some seed it reported no epoch")
        head = (f"**Goal not met**: {GOAL_ARM.label} did not reach {what}, within the "
                f"{horizon:.0f} s budget ({best}).")
    else:
        met = goal["ratio"] <= GOAL_RATIO
        head = (f"**Goal {'met' if met else 'not met'}**: {GOAL_ARM.label} reached {what}, "
                f"after {goal['reach']:.0f} s: {goal['ratio']:.0%} of that wall-clock (goal "
                f"<= {GOAL_RATIO:.0%}).")
    rows = goal["per_seed"].values()
    reached = sum(1 for r in rows if r["reach"] is not None)
    within = sum(1 for r in rows if r["ratio"] is not None and r["ratio"] <= GOAL_RATIO)
    return (f"{head} Per seed (each against its own seed's {BASELINE.label} final best): "
            f"reached on {reached} of {len(rows)}, within {GOAL_RATIO:.0%} of "
            f"{BASELINE.label}'s time on {within} of {len(rows)}.")


def first_report_s(sweep: Sweep) -> float | None:
    """Seconds from the sweep's launcher start to its first epoch report; None without one."""
    first = min((r.time for t in sweep.trials for r in t.reports), default=None)
    return None if first is None else first - sweep.meta["launch_time"]


def shortfall_sentence(sweeps: list[Sweep], result: dict, metric: str) -> str:
    """Where the time the goal allows went, when the goal is not met (empty otherwise).

    Measured, not judged: how many seconds the goal allows (``GOAL_RATIO`` of random + FIFO's
    time to its final best), how many of them pass before any sweep reports an epoch (median
    launcher start -> first report: Ray, MLflow and the first trials' processes), how long
    random + FIFO ran on without improving, and the goal arm's mean best at the budget's end.
    """
    arms, target, mode = result["arms"], result["target"], result["mode"]
    base, goal = arms.get(BASELINE.key), arms.get(GOAL_ARM.key)
    if base is None or goal is None or base["reach"] is None or (
            goal["ratio"] is not None and goal["ratio"] <= GOAL_RATIO):
        return ""
    allowed = GOAL_RATIO * base["reach"]
    firsts = [seconds for seconds in map(first_report_s, sweeps) if seconds is not None]
    first = statistics.median(firsts)
    sentence = (f"Where the time went: the goal allows {allowed:.0f} s ({GOAL_RATIO:.0%} of "
                f"{base['reach']:.0f} s); a sweep's first epoch report came {first:.0f} s after "
                f"its launcher started (median over {len(firsts)} sweeps: Ray, MLflow and the "
                f"first trials' processes start), leaving {max(allowed - first, 0.0):.0f} s to "
                f"beat a best that {BASELINE.label} found early: its mean curve did not improve "
                f"in the last {result['horizon'] - base['reach']:.0f} s of the budget.")
    if goal["mean"]:
        final = goal["mean"][-1][1]
        better = final > target if mode == "max" else final < target
        sentence += (f" At the budget's end {GOAL_ARM.label}'s mean best was val {metric} "
                     f"{final:.3f}, {'better' if better else 'not better'} than that target "
                     f"({target:.3f}).")
    return sentence


# ----------------------------------------------------------------------------- running sweeps


@dataclass
class Sweep:
    """One finished (arm, seed) sweep: its record and its trials."""

    arm: Arm
    seed: int
    name: str
    meta: dict  # launch_time, ran_s, returncode, ended_early, concurrent, load, settings
    trials: list[TrialInfo]
    told: dict[str, int] = field(default_factory=dict)


@dataclass
class Settings:
    """What every sweep of one work folder must share (a rerun with others is refused)."""

    wall_s: float
    space_sha: str
    max_epochs: int
    grace_period: int
    sets: tuple[str, ...]
    rung_metric: str | None
    launch_args: tuple[str, ...]


def sweep_name(arm: Arm, seed: int) -> str:
    return f"{arm.key}-seed{seed}"


def write_space(source: Path, workdir: Path, mode: Mode, args: argparse.Namespace) -> Path:
    """The space as the benchmark runs it: the source with its trial budget replaced.

    The header names the source relative to the repository, so the file (and the settings hash
    ``check_settings`` compares) is the same in any checkout: ``--report-only`` from another
    clone than the one that ran the sweeps finds them.
    """
    import yaml

    raw = yaml.safe_load(source.read_text())
    budget = raw.setdefault("budget", {})
    budget["num_samples"] = NUM_SAMPLES
    for key, value in (("max_epochs", args.max_epochs or mode.max_epochs),
                       ("grace_period", args.grace_period or mode.grace_period)):
        if value:
            budget[key] = value
    path = workdir / "space.yaml"
    path.write_text(f"# Written by benchmarks/search_efficiency.py from {_rel(source)}: its trial "
                    "budget replaced.\n" + yaml.safe_dump(raw, sort_keys=False))
    return path


def check_settings(workdir: Path, settings: Settings) -> None:
    """Record the folder's settings on first use; refuse a rerun with other ones."""
    path = workdir / "benchmark.json"
    current = json.loads(json.dumps(asdict(settings)))
    if not path.exists():
        path.write_text(json.dumps(current, indent=1))
        return
    before = json.loads(path.read_text())
    changed = [f"{k}: {before.get(k)!r} -> {current.get(k)!r}" for k in sorted(current)
               if before.get(k) != current.get(k)]
    if changed:
        raise BenchmarkError(f"{workdir} holds sweeps run with other settings ({'; '.join(changed)}"
                             "); rerun with the same options, or pass another --workdir")


def _concurrency(log_path: Path) -> int | None:
    """Trials at once, from the launcher's "sweep NAME: ..., N at once" line."""
    try:
        found = re.search(r", (\d+) at once;", log_path.read_text(errors="replace"))
    except OSError:
        return None
    return int(found.group(1)) if found else None


def run_sweep(arm: Arm, seed: int, *, space: Path, workdir: Path, settings: Settings,
              log=print) -> dict:
    """One launcher run in ``workdir``, interrupted once ``settings.wall_s`` have passed.

    Returns the sweep's record (also written to ``<workdir>/<name>.json``, which marks it done).
    """
    name = sweep_name(arm, seed)
    cmd = [sys.executable, "-m", "ifsearch.launch", "--space", str(space),
           "--searcher", arm.searcher, "--scheduler", arm.scheduler,
           "--searcher-impl", arm.impl, "--name", name, "--storage", str(workdir / "sweeps"),
           "--mlflow-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--experiment",
           "search_efficiency", "--seed", str(seed)]
    if arm.scheduler == "asha" and settings.rung_metric:
        cmd += ["--rung-metric", settings.rung_metric]
    for item in settings.sets:
        cmd += ["--set", item]
    cmd += list(settings.launch_args)
    log_path = workdir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load = [os.getloadavg()[0]]
    with open(log_path, "w") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        # Own session: the launcher and its local Ray form one process group that SIGINT stops
        # cleanly (Tune saves, the launcher exits 130) and end_launcher reaps.
        launch_time = time.time()
        proc = subprocess.Popen(cmd, cwd=workdir, env=launcher_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None and time.time() - launch_time < settings.wall_s:
                time.sleep(0.2)
            ended_early = proc.poll() is not None
            ran = time.time() - launch_time
            load.append(os.getloadavg()[0])
            if not ended_early:
                os.killpg(proc.pid, signal.SIGINT)
        finally:
            end_launcher(proc, grace=90.0)
    if ended_early and proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise BenchmarkError(f"{name}: the launcher exited with {proc.returncode} after "
                             f"{ran:.0f} s, before its budget; the end of {log_path}:\n{tail}")
    meta = {"launch_time": launch_time, "ran_s": ran, "returncode": proc.returncode,
            "ended_early": ended_early, "concurrent": _concurrency(log_path),
            "load_1min": load, "settings": asdict(settings)}
    (workdir / f"{name}.json").write_text(json.dumps(meta, indent=1))
    return meta


def load_sweep(arm: Arm, seed: int, workdir: Path, metric: str, extra: Sequence[str],
               max_epochs: int) -> Sweep:
    """A sweep that ``run_sweep`` finished in ``workdir``, read back from its files."""
    name = sweep_name(arm, seed)
    meta = json.loads((workdir / f"{name}.json").read_text())
    folder = workdir / "sweeps" / name
    return Sweep(arm, seed, name, meta, read_sweep(folder, metric, extra),
                 told_states(folder, name, max_epochs))


def run_all(arms: Sequence[Arm], seeds: Sequence[int], *, space: Path, workdir: Path,
            settings: Settings, report_only: bool, log=print) -> None:
    """Every (arm, seed) sweep not finished yet, one at a time, arms interleaved per seed."""
    todo = [(arm, seed) for seed in seeds for arm in arms
            if not (workdir / f"{sweep_name(arm, seed)}.json").exists()]
    done = len(arms) * len(seeds) - len(todo)
    if report_only:
        if todo:
            raise BenchmarkError(f"--report-only: {len(todo)} sweep(s) not finished in "
                                 f"{workdir}: " + ", ".join(sweep_name(a, s) for a, s in todo))
        return
    log(f"{len(arms) * len(seeds)} sweeps of {settings.wall_s:.0f} s, {done} finished earlier; "
        f"{len(todo)} to run: ~{len(todo) * (settings.wall_s + END_S) / 60:.0f} min")
    for index, (arm, seed) in enumerate(todo):
        name = sweep_name(arm, seed)
        stale = workdir / "sweeps" / name
        if stale.exists():  # interrupted midway: its clock cannot be resumed; keep it aside
            stale.rename(stale.with_name(f"{name}.stale-{time.strftime('%H%M%S')}"))
        left = (len(todo) - index) * (settings.wall_s + END_S)
        log(f"[{index + 1}/{len(todo)}] {name}: {arm.label}, seed {seed}, {settings.wall_s:.0f} s "
            f"(log: {workdir / 'logs' / (name + '.log')}); ~{left / 60:.0f} min left")
        meta = run_sweep(arm, seed, space=space, workdir=workdir, settings=settings, log=log)
        if meta["ended_early"]:
            log(f"  {name}: the launcher ended by itself after {meta['ran_s']:.0f} s")


# -------------------------------------------------------------------------------- reporting


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.0f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"{statistics.fmean(values):.3f} ± {std:.3f} "
            f"[{min(values):.3f} .. {max(values):.3f}]")


def rung_analyses(sweeps: list[Sweep], *, rung_metric: str, rung_mode: str, metric: str,
                  mode: str, grace: int, max_epochs: int, rf: float,
                  horizon: float) -> list[tuple[str, dict]]:
    """``rung_trust`` of each arm's trials (seeds pooled), reports within the budget only.

    The ASHA arms are judged on what they ran; random + FIFO's trials, which nobody stopped,
    are judged at the same rungs: the unbiased answer to "would these rungs have been right?".
    """
    from ifsearch.search.report import asha_rungs, rung_trust

    rungs = asha_rungs(grace, max_epochs, rf)
    out = []
    for arm in ARMS:
        histories: dict[str, dict[int, dict[str, float]]] = {}
        for sweep in (s for s in sweeps if s.arm == arm):
            for trial in sweep.trials:
                history = {}
                for r in trial.reports:
                    if r.time - sweep.meta["launch_time"] <= horizon:
                        history[r.epoch] = {**r.values, metric: r.value}
                histories[f"seed{sweep.seed}/{trial.trial_id}"] = history
        label = arm.label + (" (unpruned: judged at the same rungs)"
                             if arm.scheduler == "fifo" else "")
        out.append((label, rung_trust(histories, rungs, reduction_factor=rf,
                                      rung_metric=rung_metric, rung_mode=rung_mode,
                                      final_metric=metric, mode=mode, final_epoch=max_epochs)))
    return out


def rung_table(analyses: list[tuple[str, dict]]) -> str:
    rows = []
    for label, result in analyses:
        for r in result["rungs"]:
            rho = "n/a" if math.isnan(r["spearman"]) else f"{r['spearman']:+.2f}"
            rows.append([label, r["epoch"], r["reached"], r["complete"], rho,
                         f"{r['top_stopped']} of {r['top']}",
                         {True: "yes", False: "no", None: "too few"}[result["trustworthy"]]])
        if not result["rungs"]:
            rows.append([label, "–", "–", "–", "–", "–", result["summary"]])
    return markdown_table(["arm", "rung epoch", "trials that reached it", "ran to the end",
                           "Spearman (rung vs final)", "final top 5 the cutoff would stop",
                           "trustworthy"], rows)


def _told(counts: dict[str, int]) -> str:
    if not counts:
        return "n/a"
    parts = [f"{counts.get(s, 0)} {s}" for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
             if counts.get(s)]
    if counts.get("truncated"):
        parts.append(f"({counts['truncated']} of the COMPLETE stopped early)")
    return ", ".join(parts)


def render(sweeps: list[Sweep], result: dict, *, metric: str, seeds: Sequence[int],
           space: Path, settings: Settings, rung: tuple[str, str], rf: float,
           analyses: list[tuple[str, dict]], image: str | None) -> str:
    """The section's markdown: protocol, tables, plot, goal sentence, rung trust."""
    horizon = settings.wall_s
    by = {arm.key: [s for s in sweeps if s.arm == arm] for arm in ARMS}
    arms = result["arms"]
    base_t = arms.get(BASELINE.key, {}).get("reach")
    rows = []
    for arm in ARMS:
        runs, info = by[arm.key], arms.get(arm.key)
        if not runs or info is None:
            continue
        per = info["per_seed"]
        finals = [r["final"] for r in per.values() if r["final"] is not None]
        reached = [r["reach"] for r in per.values() if r["reach"] is not None]
        # each trial's reports within the budget, per sweep
        in_time = [[[r for r in t.reports if r.time - s.meta["launch_time"] <= horizon]
                    for t in s.trials] for s in runs]
        started = [sum(1 for reps in sweep if reps) for sweep in in_time]
        epochs = sum(len(reps) for sweep in in_time for reps in sweep)
        full = sum(1 for sweep in in_time for reps in sweep
                   if any(r.epoch >= settings.max_epochs for r in reps))
        startups = [t.startup_s for s in runs for t in s.trials]
        rows.append([
            arm.label, len(runs), _mean_std(finals), _seconds(info["reach"]),
            _ratio(info["reach"] / base_t if info["reach"] is not None and base_t else None),
            f"{len(reached)} of {len(per)}"
            + (f" (median {statistics.median(reached):.0f} s)" if reached else ""),
            f"{statistics.fmean(started):.1f}", f"{epochs / len(runs):.1f}",
            f"{full / len(runs):.1f}",
            _fmt(statistics.median(startups), 1) if startups else "n/a",
        ])
    table = markdown_table(
        ["arm", "seeds", f"best val {metric} at {horizon:.0f} s, mean ± std [min .. max]",
         "wall-clock to reach the target (mean curve) s", f"vs {BASELINE.label}",
         "seeds that reached their own target", "trials with a report (mean)",
         "trial-epochs (mean)", f"trials that ran all {settings.max_epochs} epochs (mean)",
         "median trial start-up s"], rows)
    seed_rows = []
    for arm in ARMS:
        for s in by[arm.key]:
            r = arms[arm.key]["per_seed"][s.seed]
            first = first_report_s(s)
            seed_rows.append([
                arm.label, s.seed, _fmt(r["final"]), _fmt(r["target"]), _seconds(r["reach"]),
                _ratio(r["ratio"]), len(s.trials),
                _fmt(first, 0) if first is not None else "none",
                s.meta.get("concurrent") or "?", _told(s.told),
                " -> ".join(f"{v:.1f}" for v in s.meta.get("load_1min", [])),
            ])
    seed_table = markdown_table(
        ["arm", "seed", f"best {metric} at {horizon:.0f} s", "target (this seed's "
         f"{BASELINE.label} best)", "time to reach s", f"vs {BASELINE.label}'s time",
         "trials", "launcher start -> first report s", "trials at once", "told to Optuna",
         "load average (1 min) at start -> end"], seed_rows)
    loads = [v for s in sweeps for v in s.meta.get("load_1min", [])]
    cores = os.cpu_count() or 1
    sets = ", ".join(f"`{s}`" for s in settings.sets) or "none (the space's `base` block)"
    ended = [s.name for s in sweeps if s.meta.get("ended_early")]
    rung_metric, rung_mode = rung
    why = shortfall_sentence(sweeps, result, metric)
    lines = [
        f"Space `{_rel(space)}` (data and model of its `base` block; `--set`: {sets}), objective "
        f"val {metric} ({result['mode']}), at most {settings.max_epochs} epochs per trial; ASHA "
        f"with grace period {settings.grace_period} and reduction factor {rf:g}, judging its "
        f"rungs on `{rung_metric}` ({rung_mode}). Three arms: **{ARMS[0].label}**; "
        f"**{ARMS[1].label}** (`--searcher-impl ray`: a trial ASHA stops is told to Optuna as "
        f"COMPLETE with its truncated value, the behaviour before ifsearch had its own "
        f"searcher); **{ARMS[2].label}** (the default: such a trial is PRUNED). Each sweep ran "
        f"for **{horizon:.0f} s of wall-clock from its launcher's start** (Ray's start-up "
        "included), one sweep at a time, then was interrupted; every arm had more trials than "
        f"could start ({NUM_SAMPLES}). Searcher seeds {', '.join(map(str, seeds))} (they "
        "change only the sampled configurations; data and model initialisation are the same "
        "in every trial). The incumbent at time t is the best val "
        f"{metric} any epoch report made before t. The **target** is {BASELINE.label}'s final "
        "best (mean over seeds for the mean curves; per seed, that seed's own), and the "
        "wall-clock to reach it is when the incumbent first equals or beats it. "
        f"Load average during the sweeps: {min(loads, default=0):.1f} .. "
        f"{max(loads, default=0):.1f} on {cores} cores (wall-clock comparisons need an idle "
        "machine).",
        "",
        goal_sentence(result, metric, len(seeds)),
        "",
        *([why, ""] if why else []),
        table,
        "",
    ]
    if image:
        lines += [f"![best val {metric} so far vs wall-clock, mean and min..max over seeds]"
                  f"({image})", ""]
    ray_arm, goal_arm = arms.get(ARMS[1].key), arms.get(GOAL_ARM.key)
    if ray_arm and goal_arm:
        r, g = ray_arm["reach"], goal_arm["reach"]
        if r is None and g is None:
            compare = "neither TPE + ASHA arm reached the target on its mean curve"
        elif r is None or g is None:
            first = GOAL_ARM if r is None else ARMS[1]
            compare = f"only {first.label} reached the target on its mean curve"
        else:
            compare = (f"{GOAL_ARM.label} reached the target {abs(r - g):.0f} s "
                       f"{'earlier' if g < r else 'later' if g > r else 'at the same time'} "
                       f"than {ARMS[1].label} ({g:.0f} vs {r:.0f} s)")
        lines += [f"PRUNED vs truncated COMPLETE: {compare}. With {len(seeds)} seed"
                  f"{'s' if len(seeds) > 1 else ''} a difference smaller than the seeds' "
                  "spread (the min .. max columns) is noise.", ""]
    if ended:
        lines += [f"Ended by itself before the budget: {', '.join(ended)} (see their logs).", ""]
    lines += [
        "### Were ASHA's rungs trustworthy?",
        "",
        "`ifsearch.search.report.rung_trust` over each arm's trials (seeds pooled): at each rung, "
        "Spearman's rank correlation between the rung value and the final value over the trials "
        "that ran to the end, and how many of the final top 5 the rung's cutoff would have "
        "stopped (untrustworthy: Spearman < 0.5 or a top-5 trial stopped). The ASHA arms' "
        "complete trials are the ones ASHA let through; random + FIFO's trials were never "
        "stopped, so its rows answer the question without that selection.",
        "",
        rung_table(analyses),
        "",
        *[f"- {label}: {res['summary']}" for label, res in analyses],
        "",
        "<details><summary>Per seed</summary>",
        "",
        seed_table,
        "",
        "</details>",
    ]
    return "\n".join(lines)


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def plot(result: dict, metric: str, horizon: float, path: Path) -> Path:
    """Incumbent vs wall-clock: per arm the mean over seeds, its min..max band, each seed thin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {ARMS[0].key: "#4c72b0", ARMS[1].key: "#c44e52", ARMS[2].key: "#dd8452"}
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for arm in ARMS:
        info = result["arms"].get(arm.key)
        if info is None:
            continue
        colour = colours[arm.key]
        for curve in info["curves"].values():
            if curve:
                xs, ys = zip(*curve)
                ax.step([*xs, horizon], [*ys, ys[-1]], where="post", color=colour, lw=0.7,
                        alpha=0.3)
        if info["mean"]:
            ts, means, lows, highs = zip(*info["mean"])
            ts = [*ts, horizon]
            ax.step(ts, [*means, means[-1]], where="post", color=colour, lw=2.0,
                    label=f"{arm.label} (mean)")
            ax.fill_between(ts, [*lows, lows[-1]], [*highs, highs[-1]], step="post",
                            color=colour, alpha=0.12)
        if info["reach"] is not None:
            ax.axvline(info["reach"], color=colour, ls=":", lw=1.2)
    if result["target"] is not None:
        ax.axhline(result["target"], color="grey", ls="--", lw=1.0,
                   label=f"target: {BASELINE.label}'s final best (mean)")
    ax.set_xlim(0, horizon)
    ax.set_xlabel("wall-clock since the launcher started (s)")
    ax.set_ylabel(f"best val {metric} so far")
    ax.set_title("Search efficiency at equal wall-clock (band: min..max over seeds; dotted: "
                 "time to reach the target)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/search_efficiency.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="2 seeds x 120 s per sweep (~14 min); writes into its work folder")
    mode.add_argument("--smoke-test", action="store_true",
                      help="1 seed x 60 s per sweep on tiny scenes, 3 epochs per trial; a "
                           "temporary folder unless --workdir/--out are given, never docs/")
    p.add_argument("--wall", type=float, default=None,
                   help="wall-clock budget W of each sweep in seconds, from its launcher's "
                        "start (default 360; 120 with --quick; 60 with --smoke-test)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated searcher seeds (default 0,1,2,3,4; 0,1 with --quick)")
    p.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="search-space YAML")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="epochs per trial (default: the space's budget.max_epochs)")
    p.add_argument("--grace-period", type=int, default=None,
                   help="ASHA's first rung (default: the space's budget.grace_period)")
    p.add_argument("--rung-metric", default=None, metavar="METRIC[:min|max]",
                   help="what ASHA's rungs compare (the launcher's --rung-metric; default: the "
                        "space's scheduler.metric, else the objective)")
    p.add_argument("--set", dest="sets", action="append", default=None,
                   metavar="SECTION.KEY=VALUE",
                   help="passed to every launcher (default: none; tiny scenes with "
                        "--smoke-test)")
    p.add_argument("--launch-arg", dest="launch_args", action="append", default=[],
                   metavar="ARG", help="extra launcher argument for every sweep, e.g. "
                                       "--launch-arg=--max-concurrent=2 (repeatable)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file whose 'search_efficiency' section is (re)written "
                        "(default: docs/benchmarks.md; <workdir>/benchmarks.md with --quick "
                        "or --smoke-test)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="sweeps, logs, MLflow store and the record of finished sweeps; a rerun "
                        "skips those (default runs/search_efficiency, "
                        "runs/search_efficiency-quick with --quick, a temporary folder with "
                        "--smoke-test)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the section from --workdir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ifsearch.errors import IfsearchError
    from ifsearch.search.cli import parse_rung_metric
    from ifsearch.search.space import load_search_space

    name = "smoke" if args.smoke_test else "quick" if args.quick else "full"
    mode = MODES[name]
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else mode.seeds
    sets = tuple(args.sets) if args.sets is not None else mode.sets
    temp = Path(tempfile.mkdtemp(prefix="ifsearch_search_eff_")) \
        if name == "smoke" and args.workdir is None else None
    default_work = {"full": REPO / "runs" / "search_efficiency",
                    "quick": REPO / "runs" / "search_efficiency-quick"}
    workdir = (args.workdir or temp or default_work[name]).resolve()
    out = (args.out or (DOCS if name == "full" else workdir / "benchmarks.md")).resolve()
    images = IMAGES if out == DOCS.resolve() else out.parent / "img"
    workdir.mkdir(parents=True, exist_ok=True)
    # SIGTERM (kill, a batch scheduler) stops like Ctrl-C: the running sweep is ended cleanly.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    started = time.perf_counter()
    try:
        space_file = write_space(args.space, workdir, mode, args)
        space = load_search_space(space_file, list(sets))
        metric, obj_mode = space.objective["metric"], space.objective["mode"]
        max_epochs, grace = space.budget["max_epochs"], space.budget["grace_period"]
        rung = parse_rung_metric(args.rung_metric, space, "asha")
        rf = space.scheduler.get("reduction_factor", 2)
        settings = Settings(
            wall_s=args.wall or mode.wall_s,
            space_sha=hashlib.sha256(space_file.read_bytes()).hexdigest()[:16],
            max_epochs=max_epochs, grace_period=grace, sets=sets,
            rung_metric=args.rung_metric, launch_args=tuple(args.launch_args))
        check_settings(workdir, settings)
        print(f"search efficiency ({name}) in {workdir}; section -> {out}", flush=True)
        run_all(ARMS, seeds, space=space_file, workdir=workdir, settings=settings,
                report_only=args.report_only, log=lambda text: print(text, flush=True))
    except (BenchmarkError, IfsearchError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: finished sweeps are kept in {workdir}; run the same command again "
              "to continue", flush=True)
        return 130
    extra = (rung[0],) if rung[0] != metric else ()
    sweeps = [load_sweep(arm, seed, workdir, metric, extra, max_epochs)
              for seed in seeds for arm in ARMS]
    result = analyse(sweeps, settings.wall_s, obj_mode)
    analyses = rung_analyses(sweeps, rung_metric=rung[0], rung_mode=rung[1], metric=metric,
                             mode=obj_mode, grace=grace, max_epochs=max_epochs, rf=rf,
                             horizon=settings.wall_s)
    image = plot(result, metric, settings.wall_s, images / IMAGE)
    body = render(sweeps, result, metric=metric, seeds=seeds, space=args.space,
                  settings=settings, rung=rung, rf=rf, analyses=analyses,
                  image=os.path.relpath(image, out.parent))
    write_section(SECTION, TITLE, body, path=out)
    print(f"wrote section '{SECTION}' of {out} and {image} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    print(goal_sentence(result, metric, len(seeds)).replace("**", ""), flush=True)
    if temp is not None and args.out is None:
        shutil.rmtree(workdir / "sweeps", ignore_errors=True)  # the section and plot stay
    return 0


if __name__ == "__main__":
    sys.exit(main())
