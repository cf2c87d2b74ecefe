"""Search efficiency: TPE + ASHA vs random + FIFO at the same compute budget (trial-epochs).

Runs real sweeps with the launcher (``python -m ifsearch.launch`` as a subprocess, its own local
Ray, MLflow in a sqlite file of a scratch folder) and reads every trial's per-epoch results back
from the Tune experiment folder (``<storage>/<name>/<trial>/result.json``).

Budget B trial-epochs (one epoch of one trial = one unit): random + FIFO runs B / max_epochs full
trials. TPE + ASHA gets enough samples to spend B even if ASHA stopped every trial at its first
rung (B / grace_period); the benchmark stops that sweep (SIGINT: Tune saves its state and the
launcher finishes normally) once B epochs have been reported, and both histories are cut at the
same point: all epoch reports of a sweep, ordered by wall-clock time, first B kept. Reported per
sweep: best val AP50 within the budget; the budget at which the best-so-far first reaches 90 % of
that best; and each trial's start-up overhead from Ray's own clocks (see ``read_sweep``).

    python benchmarks/search_efficiency.py                 # 2 seeds, B=48: ~13 min on 2 cores
    python benchmarks/search_efficiency.py --quick         # 1 seed, B=24: ~4 min
    python benchmarks/search_efficiency.py --smoke-test    # 2 trials x 1 epoch each, tiny data
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
for _path in (str(BENCHMARKS), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from launcher import end_launcher, launcher_env  # noqa: E402
from report import DOCS, IMAGES, markdown_table, save_figure, write_section  # noqa: E402

SECTION = "search_efficiency"
TITLE = "Search efficiency: TPE + ASHA vs random + FIFO"
DEFAULT_SPACE = REPO / "search_spaces" / "influencer_default.yaml"
STRATEGIES = (("random", "fifo"), ("tpe", "asha"))
LABELS = {("random", "fifo"): "random + FIFO", ("tpe", "asha"): "TPE + ASHA"}
SMOKE_SETS = ["data.num_points=256", "data.train_scenes=8", "data.val_scenes=4"]
REACH = 0.9  # "reached" = best-so-far >= 90 % of the final best within the budget


@dataclass
class Report:
    """One epoch report of one trial."""

    trial_id: str
    epoch: int
    value: float
    time: float  # wall-clock seconds (epoch time) when Tune received it
    seconds: float = 0.0  # the epoch's own epoch_seconds (training + validation)


@dataclass
class TrialInfo:
    trial_id: str
    start: float  # Tune's trial start time (RUNNING), epoch seconds
    first_report_s: float  # trial start -> first epoch report (Ray's trainable clock)
    startup_s: float  # first_report_s minus the first epoch's own epoch_seconds
    reports: list[Report] = field(default_factory=list)


@dataclass
class SweepResult:
    searcher: str
    scheduler: str
    seed: int
    name: str
    wall_s: float
    trials: list[TrialInfo]
    stopped_at_budget: bool = False

    @property
    def label(self) -> str:
        return LABELS.get((self.searcher, self.scheduler), f"{self.searcher} + {self.scheduler}")


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


def read_sweep(sweep_dir: Path, metric: str = "AP50") -> list[TrialInfo]:
    """Every trial of a Tune experiment folder with its epoch reports, ordered by start time.

    Clocks (all Ray's own): Tune sets a trial's ``start_time`` when the trial's actor is up and
    it is marked RUNNING (``experiment_state-*.json``); every result carries ``time_total_s``, the
    trainable's seconds since its first ``train()`` call. A report's wall-clock time is
    ``start_time + time_total_s`` (sub-second; the result's own ``timestamp`` is whole seconds and
    is the fallback when the state file lacks the trial: ``start = timestamp - time_total_s``).
    Time to first report = ``time_total_s`` of the first result; start-up overhead = that minus
    the first epoch's own ``epoch_seconds`` (training + validation inside ``train_loop``), i.e.
    Ray Train's controller and worker start-up, process group, data and model build, and the
    checkpoint report.
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
                               start + r["time_total_s"], float(r.get("epoch_seconds", 0.0)))
                        for r in rows]
        trials.append(info)
    return sorted(trials, key=lambda t: t.start)


def budget_curve(trials: list[TrialInfo], budget: int) -> list[tuple[int, float, Report]]:
    """(cumulative trial-epochs, best-so-far, report) for the first ``budget`` reports by time."""
    reports = sorted((r for t in trials for r in t.reports), key=lambda r: r.time)[:budget]
    curve, best = [], -math.inf
    for used, report in enumerate(reports, start=1):
        best = max(best, report.value)
        curve.append((used, best, report))
    return curve


def summarize(sweep: SweepResult, budget: int) -> dict:
    """The table row of one sweep: best within budget, budget to reach 90 %, overheads."""
    curve = budget_curve(sweep.trials, budget)
    in_budget = {r.trial_id for _, _, r in curve}
    trials = [t for t in sweep.trials if t.trial_id in in_budget]
    best = curve[-1][1] if curve else float("nan")
    reach = None
    if curve and best > 0:
        reach = next(used for used, value, _ in curve if value >= REACH * best)
    start = min((t.start for t in trials), default=0.0)
    return {
        "strategy": sweep.label, "seed": sweep.seed, "trials": len(trials),
        "trials_total": len(sweep.trials), "used": len(curve),
        "used_total": sum(len(t.reports) for t in sweep.trials), "best": best, "reach": reach,
        "startup": statistics.median(t.startup_s for t in trials) if trials else float("nan"),
        "first_report": (statistics.median(t.first_report_s for t in trials)
                         if trials else float("nan")),
        "budget_wall": (curve[-1][2].time - start) if curve else float("nan"),
        "epoch_s": (statistics.median(r.seconds for _, _, r in curve)
                    if curve else float("nan")),
        "sweep_wall": sweep.wall_s, "stopped": sweep.stopped_at_budget, "curve": curve,
    }


# ------------------------------------------------------------------------------- running sweeps


def _count_reports(sweep_dir: Path) -> int:
    total = 0
    for result_file in sweep_dir.glob("*/result.json"):
        try:
            total += sum(1 for line in result_file.read_text().splitlines() if line.strip())
        except OSError:
            pass
    return total


STALL_HINT = (
    "no new epoch report for {stall:.0f} s; the end of the log says why. (Such a stall was "
    "once caused by another Ray instance on the machine: Ray Train's placement-group cleaner "
    "could not find its cluster and a stopped trial's CPUs were never freed; the launcher now "
    "gives its processes RAY_ADDRESS.) Log: {log}"
)


def run_sweep(searcher: str, scheduler: str, seed: int, *, space: Path, budget: int,
              max_epochs: int, num_samples: int, workdir: Path, sets: list[str],
              timeout: float, stall: float, log=print) -> SweepResult:
    """One launcher run in ``workdir`` (cwd: nothing lands in the repo), stopped at the budget."""
    name = f"{searcher}-{scheduler}-seed{seed}"
    storage = workdir / "sweeps"
    cmd = [sys.executable, "-m", "ifsearch.launch", "--space", str(space),
           "--searcher", searcher, "--scheduler", scheduler, "--num-samples", str(num_samples),
           "--max-epochs", str(max_epochs), "--name", name, "--storage", str(storage),
           "--mlflow-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--experiment",
           "search_efficiency", "--seed", str(seed)]
    for item in sets:
        cmd += ["--set", item]
    log_path = workdir / f"{name}.log"
    log(f"{name}: {num_samples} trials x <= {max_epochs} epochs, stop at {budget} trial-epochs "
        f"(log: {log_path})")
    started = time.perf_counter()
    stopped = False
    with open(log_path, "w") as log_file:
        # Own session: the launcher and the local Ray it starts form one process group that we
        # can interrupt (SIGINT = Ctrl-C: Tune saves and the launcher exits normally) and reap.
        proc = subprocess.Popen(cmd, cwd=workdir, env=launcher_env(), stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        reported, last_progress = 0, time.perf_counter()
        try:
            while proc.poll() is None:
                now = time.perf_counter()
                if now - started > timeout:
                    raise RuntimeError(f"{name}: no result after {timeout:.0f} s; see {log_path}")
                count = _count_reports(storage / name)
                if count > reported:
                    reported, last_progress = count, now
                elif not stopped and now - last_progress > stall:
                    raise RuntimeError(f"{name}: stalled after {reported} trial-epochs: "
                                       + STALL_HINT.format(stall=stall, log=log_path))
                if (num_samples * max_epochs > budget and not stopped
                        and count >= budget):
                    stopped = True  # the rest of the sweep would be cut anyway: stop it
                    log(f"  {budget} trial-epochs reported after "
                        f"{time.perf_counter() - started:.0f} s: interrupting the sweep")
                    os.killpg(proc.pid, signal.SIGINT)
                time.sleep(1.0)
        finally:
            end_launcher(proc, grace=90.0)
    wall = time.perf_counter() - started
    if proc.returncode != 0 and not stopped:
        tail = "\n".join(log_path.read_text().splitlines()[-40:])
        raise RuntimeError(f"{name}: launcher exited with {proc.returncode}:\n{tail}")
    (workdir / f"{name}.json").write_text(json.dumps({"wall_s": wall, "stopped": stopped}))
    trials = read_sweep(storage / name)
    log(f"  {len(trials)} trials, {sum(len(t.reports) for t in trials)} trial-epochs, "
        f"{wall:.0f} s")
    return SweepResult(searcher, scheduler, seed, name, wall, trials, stopped)


def load_sweep(searcher: str, scheduler: str, seed: int, workdir: Path) -> SweepResult:
    """A sweep that ``run_sweep`` already ran in ``workdir`` (for --report-only)."""
    name = f"{searcher}-{scheduler}-seed{seed}"
    meta = json.loads((workdir / f"{name}.json").read_text())
    return SweepResult(searcher, scheduler, seed, name, meta["wall_s"],
                       read_sweep(workdir / "sweeps" / name), meta["stopped"])


# ------------------------------------------------------------------------------------ reporting


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def render(rows: list[dict], budget: int, max_epochs: int, seeds: list[int], sets: list[str],
           image: str | None, grace: int) -> str:
    """Table, plot and the honest reading of a small experiment."""
    table = markdown_table(
        ["strategy", "seed", "trials run", "trial-epochs used (budget)",
         "best AP50 within budget", f"budget to reach {REACH:.0%} of best (trial-epochs)",
         "median start-up overhead s", "median time to first report s",
         "wall-clock to spend budget s"],
        [[r["strategy"], r["seed"], r["trials"], f"{r['used']} ({budget})", _fmt(r["best"]),
          r["reach"] if r["reach"] is not None else "n/a (best is 0)", _fmt(r["startup"], 1),
          _fmt(r["first_report"], 1), _fmt(r["budget_wall"], 0)] for r in rows],
    )
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["strategy"], []).append(r)
    data = (", ".join(f"`{s}`" for s in sets) if sets
            else "the space's own data and model (its `base` block)")
    lines = [
        f"Space `search_spaces/influencer_default.yaml` ({data}), objective val AP50, "
        f"at most {max_epochs} epoch{'s' if max_epochs > 1 else ''} per trial, budget {budget} "
        f"trial-epochs per sweep, searcher seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))} (data and model initialisation are the same in every "
        "trial; the seed only changes the sampled configurations). "
        f"Random + FIFO runs {budget // max_epochs} full trials; TPE + ASHA (grace period "
        f"{grace}, reduction factor 2) runs as many trials as fit, and its sweep is stopped once "
        f"{budget} epochs are reported. Both histories are cut at the same point: all epoch "
        f"reports of the sweep ordered by wall-clock time, first {budget} kept. Start-up "
        "overhead = a trial's time from Tune's start (RUNNING) to its first report "
        "(`time_total_s` of the first result) minus that epoch's own `epoch_seconds`: Ray "
        "Train's controller and worker start-up, data and model build and the checkpoint "
        "report. Wall-clock to spend the budget runs from the first trial's start to the "
        f"{budget}th report (Ray's start-up and the launcher's export are not in it). The "
        "launcher runs its default concurrency (one trial per core), so start-up and training "
        "of concurrent trials compete for the CPU.",
        "",
        table,
        "",
    ]
    if image:
        lines += [f"![best-so-far AP50 vs trial-epochs]({image})", ""]
    if len(by) == 2:
        n = len(seeds)
        stats = {k: (statistics.mean(r["best"] for r in v), statistics.mean(r["trials"] for r in v),
                     statistics.median(r["startup"] for r in v),
                     statistics.median(r["epoch_s"] for r in v),
                     statistics.mean(r["budget_wall"] for r in v)) for k, v in by.items()}
        (a, sa), (b, sb) = sorted(stats.items(), key=lambda kv: -kv[1][0])
        if sa[0] <= 0:
            verdict = (f"No strategy reached a non-zero AP50 within {budget} trial-epochs, so "
                       "this run compares nothing but costs.")
        else:
            best = {(r["strategy"], r["seed"]): r["best"] for r in rows}
            wins = sum(1 for seed in seeds if best[a, seed] > best[b, seed])
            ties = sum(1 for seed in seeds if best[a, seed] == best[b, seed])
            verdict = (
                f"Mean best AP50 over {n} seed{'s' if n > 1 else ''}: {a} {sa[0]:.3f}, "
                f"{b} {sb[0]:.3f} ({a} ahead on {wins} of {n} seeds"
                f"{f', tied on {ties}' if ties else ''}). With {n} "
                f"seed{'s' if n > 1 else ''} and {budget} trial-epochs this is an anecdote, not "
                "a ranking: AP50 at this laptop budget is low and one lucky configuration moves "
                "a sweep's best by more than the gap, so the difference may well be noise."
            )
        cost = []
        for k, v in stats.items():
            cost.append(f"{k} tried {v[1]:.1f} configurations (mean) and spent the budget in "
                        f"{v[4]:.0f} s")
        tpe, rnd = stats.get("TPE + ASHA"), stats.get("random + FIFO")
        ratio = ""
        if tpe and rnd and tpe[3] > 0:
            slower = tpe[4] > rnd[4]
            ratio = (f" A trial's start-up (median {tpe[2]:.0f} s) costs as much wall-clock as "
                     f"~{tpe[2] / tpe[3]:.0f} of its epochs (median {tpe[3]:.1f} s), and every "
                     "trial ASHA stops early is replaced by a new one that pays it again: "
                     + ("so at equal trial-epochs TPE + ASHA took longer in wall-clock here; "
                        "early stopping pays off when epochs, not start-up, dominate a trial."
                        if slower else
                        "even so TPE + ASHA spent the budget no slower here."))
        lines.append(verdict + " Costs: " + "; ".join(cost) + "." + ratio)
    return "\n".join(lines)


def plot(rows: list[dict], budget: int, path: Path) -> Path:
    """Best-so-far AP50 vs cumulative trial-epochs: one colour per strategy, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"random + FIFO": "#4c72b0", "TPE + ASHA": "#dd8452"}
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for r in rows:
        if not r["curve"]:
            continue
        xs = [used for used, _, _ in r["curve"]]
        ys = [best for _, best, _ in r["curve"]]
        ax.step(xs, ys, where="post", color=colours.get(r["strategy"]),
                linestyle=styles[r["seed"] % len(styles)],
                label=f"{r['strategy']} (seed {r['seed']})")
    ax.set_xlim(0, budget)
    ax.set_xlabel("cumulative trial-epochs")
    ax.set_ylabel("best val AP50 so far")
    ax.set_title("Search efficiency at equal budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="1 seed, budget 24 trial-epochs (~4 min on 2 cores)")
    mode.add_argument("--smoke-test", action="store_true",
                      help="2 trials x 1 epoch per strategy on tiny data; writes only to --out "
                           "or a temporary file, never docs/")
    p.add_argument("--budget", type=int, default=None,
                   help="trial-epochs per sweep (default 48; 24 with --quick; 2 with "
                        "--smoke-test)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="epochs per trial (default: the space's budget.max_epochs; 1 with "
                        "--smoke-test)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated searcher seeds (default 0,1; 0 with --quick or "
                        "--smoke-test)")
    p.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="search-space YAML")
    p.add_argument("--set", dest="sets", action="append", default=None,
                   metavar="SECTION.KEY=VALUE",
                   help="passed to the launcher (default: none; tiny data with --smoke-test)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file whose 'search_efficiency' section is (re)written "
                        "(default: docs/benchmarks.md; a temporary file with --smoke-test)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch folder for sweeps, logs and MLflow (default: a temporary "
                        "folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the section from the sweeps a previous run left "
                        "in --workdir (run with --keep); same budget/seeds options")
    p.add_argument("--parallel", action="store_true", default=None,
                   help="run both strategies of a seed at the same time (default with "
                        "--smoke-test only: they compete for the CPU, so timings mean little)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds before one sweep counts as hung")
    p.add_argument("--stall-timeout", type=float, default=240.0,
                   help="seconds without a new epoch report before a sweep counts as stalled")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ifsearch.search_space import load_search_space

    smoke = args.smoke_test
    space = load_search_space(args.space, [])
    max_epochs = args.max_epochs or (1 if smoke else space.budget["max_epochs"])
    grace = min(space.budget["grace_period"], max_epochs)
    budget = args.budget or (2 if smoke else 24 if args.quick else 48)
    seeds = [int(s) for s in (args.seeds or ("0" if smoke or args.quick else "0,1")).split(",")]
    sets = args.sets if args.sets is not None else (SMOKE_SETS if smoke else [])
    if budget < max_epochs or budget % max_epochs:
        print(f"error: --budget {budget} must be a multiple of --max-epochs {max_epochs} "
              "(random + FIFO runs budget / max_epochs full trials)", file=sys.stderr)
        return 2
    out = args.out
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="ifsearch_bench_")) / "benchmarks.md" if smoke else DOCS
    out = out.resolve()
    image_dir = IMAGES if out == DOCS.resolve() else out.parent / "img"
    if args.report_only and args.workdir is None:
        print("error: --report-only needs the --workdir of a run made with --keep",
              file=sys.stderr)
        return 2
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="ifsearch_search_eff_"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    parallel = smoke if args.parallel is None else args.parallel
    rows = []

    def one(seed: int, searcher: str, scheduler: str) -> dict:
        # FIFO: budget / max_epochs full trials. ASHA: enough trials to spend the budget even if
        # every trial stopped at the first rung; the sweep is interrupted once it is spent.
        samples = budget // max_epochs if scheduler == "fifo" else math.ceil(budget / grace)
        if args.report_only:
            return summarize(load_sweep(searcher, scheduler, seed, workdir), budget)
        sweep = run_sweep(searcher, scheduler, seed, space=args.space, budget=budget,
                          max_epochs=max_epochs, num_samples=samples, workdir=workdir,
                          sets=sets, timeout=args.timeout, stall=args.stall_timeout)
        return summarize(sweep, budget)

    failed = False
    try:
        for seed in seeds:
            if parallel:
                with ThreadPoolExecutor(len(STRATEGIES)) as pool:
                    rows += list(pool.map(lambda st, seed=seed: one(seed, *st), STRATEGIES))
            else:
                rows += [one(seed, *strategy) for strategy in STRATEGIES]
    except RuntimeError as exc:
        failed = True
        print(f"error: {exc}\n(scratch folder kept: {workdir})", file=sys.stderr)
        return 1
    finally:
        if not (args.keep or args.report_only or failed):
            shutil.rmtree(workdir, ignore_errors=True)
    rows.sort(key=lambda r: (r["strategy"], r["seed"]))
    image = plot(rows, budget, image_dir / "search_efficiency.png")
    body = render(rows, budget, max_epochs, seeds, sets,
                  image=os.path.relpath(image, out.parent), grace=grace)
    write_section(SECTION, TITLE, body, path=out)
    print(f"wrote section '{SECTION}' of {out} and {image} "
          f"({time.perf_counter() - started:.0f} s)")
    for r in rows:
        print(f"  {r['strategy']:14s} seed {r['seed']}: trials {r['trials']}/{r['trials_total']} "
              f"used {r['used']}/{budget} (reported {r['used_total']}) best AP50 "
              f"{_fmt(r['best'])} reach90 {r['reach']} startup {_fmt(r['startup'], 1)} s "
              f"first report {_fmt(r['first_report'], 1)} s budget wall "
              f"{_fmt(r['budget_wall'], 0)} s sweep wall {r['sweep_wall']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
