"""Which metric should ASHA's rungs compare? Measured on unpruned sweeps of the shipped spaces.

ASHA stops a trial at a rung when its rung value is strictly worse than the rung's cutoff (Ray's
``_Bracket.cutoff``). A good rung metric does two things at the space's rungs: it ranks the
trials as the objective at the last epoch will (so the trials it stops were not going to win),
and it separates them (a metric tied at the cutoff, as the class-aware AP50 is at 0 while the
class head is still learning, stops nobody and the sweep pays full price for every trial).

For each shipped space this script runs one **random + FIFO** sweep (``python -m
ifsearch.launch --searcher random --scheduler fifo``): every trial trains to the space's
``max_epochs``, nobody stops it, so each candidate metric can be judged at the space's rungs
without the bias of a pruned sweep (the survivors' narrowed range). Per candidate and rung:

* **Spearman** between the candidate at the rung and the objective at the end
  (``ifsearch.search.report.rung_agreement``; +1 = the rung ranks as the end does);
* **final top-k stopped**: how many of the final top ``TOP_K`` the rung's cutoff would stop;
* **stopped**: how many trials the cutoff would stop at all, against the ``1 - 1/rf`` ASHA aims
  at (ties at the cutoff survive).

The choice per space (the ``chosen`` column) is the candidate that stops the fewest of the
final top-k over its rungs, then has the highest mean Spearman, among those that stop at least
half of what ASHA aims at (a metric that prunes nothing saves nothing). The space files carry
the choice in ``scheduler: {metric, mode}``; this script only reports it.

    python benchmarks/rung_metric.py                 # 3 spaces, ~20 min on 2 cores
    python benchmarks/rung_metric.py --smoke-test    # one tiny sweep, a temporary page
    python benchmarks/rung_metric.py --report-only   # rebuild the section from --workdir

Resumable: a finished sweep is recorded in ``<workdir>/<sweep>.json`` and not run again (after
changing a space's ranges or budget, remove its record and sweep folder to measure it anew).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
for _path in (str(BENCHMARKS), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from launcher import end_launcher, launcher_env  # noqa: E402
from report import markdown_table, write_section  # noqa: E402
from search_efficiency import read_sweep  # noqa: E402

SECTION = "rung_metric"
TITLE = "Rung metric: what ASHA's rungs should compare"
SPACES = REPO / "search_spaces"
# (space file, trials): enough unpruned trials for a top 5 and a rank correlation; the demo's
# epochs are ~7 s, the research spaces' ~1 s.
FULL = (("quickstart.yaml", 12), ("influencer_default.yaml", 20),
        ("hungarian_baseline.yaml", 20))
SMOKE = (("influencer_default.yaml", 4),)
# Tiny scenes and 3 epochs, so the rungs fall at epochs 1 and 2 (space_settings(..., 3, 1)).
SMOKE_ARGS = ["--max-epochs", "3", "--set", "data.num_points=256", "--set",
              "data.train_scenes=8", "--set", "data.val_scenes=4"]
# Candidates and their better direction. val_loss is the loss the trial trains on, so its
# scale moves with the searched loss weights: measured, not assumed to be comparable.
CANDIDATES = (("AP50", "max"), ("AP50_agnostic", "max"), ("AP25", "max"),
              ("val_loss", "min"))
TOP_K = 5
SEED = 0


@dataclass(frozen=True)
class SpaceSettings:
    """What the benchmark reads from a space file: objective, budget and ASHA's rungs."""

    name: str
    objective: str
    mode: str
    max_epochs: int
    rungs: tuple[int, ...]
    reduction_factor: float
    configured: str  # the rung metric the file sets (scheduler.metric, else the objective)


def space_settings(path: Path, max_epochs: int | None = None,
                   grace_period: int | None = None) -> SpaceSettings:
    """The space file's objective, budget and rungs (``max_epochs``/``grace_period`` override
    its budget: the smoke test's 3 epochs)."""
    from ifsearch.search.report import asha_rungs
    from ifsearch.search.space import load_search_space

    space = load_search_space(path)
    epochs = max_epochs or space.budget["max_epochs"]
    grace = min(grace_period or space.budget["grace_period"], epochs)
    rf = space.scheduler.get("reduction_factor", 2)
    return SpaceSettings(path.stem, space.objective["metric"], space.objective["mode"], epochs,
                         tuple(asha_rungs(grace, epochs, rf)), rf,
                         space.scheduler.get("metric", space.objective["metric"]))


def judge(histories: dict, settings: SpaceSettings, candidates=CANDIDATES,
          top_k: int = TOP_K) -> list[dict]:
    """One row per candidate: its rung rows (``rung_agreement``) and the aggregate used to choose.

    ``histories``: trial id -> {epoch: {metric: value}}, of trials nobody stopped.
    """
    from ifsearch.search.report import rung_agreement

    keep = 1 / settings.reduction_factor
    sign = 1.0 if settings.mode == "max" else -1.0
    finals = {t: h[settings.max_epochs][settings.objective] for t, h in histories.items()
              if settings.objective in h.get(settings.max_epochs, {})}
    best = max(finals, key=lambda t: sign * finals[t], default=None)
    rows = []
    for metric, mode in candidates:
        rungs = rung_agreement(histories, settings.rungs,
                               reduction_factor=settings.reduction_factor, rung_metric=metric,
                               rung_mode=mode, final_metric=settings.objective,
                               mode=settings.mode, final_epoch=settings.max_epochs, top_k=top_k)
        for r in rungs:
            r["aimed"] = r["reached"] * (1 - keep)
            r["best_stopped"] = best in r["top_stopped_ids"]
        rhos = [r["spearman"] for r in rungs if not math.isnan(r["spearman"])]
        rows.append({
            "metric": metric, "mode": mode, "rungs": rungs,
            "top_stopped": sum(r["top_stopped"] for r in rungs),
            "mean_spearman": statistics.fmean(rhos) if rhos else math.nan,
            "prunes": all(r["stopped"] >= r["aimed"] / 2 for r in rungs) if rungs else False,
        })
    return rows


def choose(rows: list[dict]) -> dict | None:
    """The rule in the module docstring: prunes, fewest final top-k stopped, best Spearman."""
    pruning = [r for r in rows if r["prunes"]]
    if not pruning:
        return None
    return min(pruning, key=lambda r: (r["top_stopped"], -_or(r["mean_spearman"], -2.0)))


def _or(value: float, default: float) -> float:
    return default if math.isnan(value) else value


# --------------------------------------------------------------------------------------------
# Running the sweeps


def run_sweep(space: Path, trials: int, workdir: Path, launch_args=(), log=print) -> dict:
    """One random + FIFO launcher run to its end; its record in ``<workdir>/<name>.json``."""
    name = f"fifo-{space.stem}"
    record_path = workdir / f"{name}.json"
    if record_path.exists():
        log(f"{name}: done before, skipped ({record_path})")
        return json.loads(record_path.read_text())
    cmd = [sys.executable, "-m", "ifsearch.launch", "--space", str(space),
           "--searcher", "random", "--scheduler", "fifo", "--num-samples", str(trials),
           "--seed", str(SEED), "--name", name, "--storage", str(workdir / "sweeps"),
           "--mlflow-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--experiment", "rung_metric"]
    cmd += list(launch_args)
    log_path = workdir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"{name}: {trials} trials, log {log_path}")
    started = time.time()
    with open(log_path, "w") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=workdir, env=launcher_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait()
        finally:
            end_launcher(proc, grace=90.0)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{name}: the launcher exited with {proc.returncode}; the end of "
                         f"{log_path}:\n{tail}")
    record = {"space": space.name, "trials": trials, "launch_args": list(launch_args),
              "wall_s": time.time() - started, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                     time.gmtime(started))}
    record_path.write_text(json.dumps(record, indent=1))
    return record


def histories_of(workdir: Path, space: Path, objective: str) -> dict:
    extra = [m for m, _ in CANDIDATES if m != objective]
    trials = read_sweep(workdir / "sweeps" / f"fifo-{space.stem}", objective, extra)
    return {t.trial_id: {r.epoch: {**r.values, objective: r.value} for r in t.reports}
            for t in trials}


# --------------------------------------------------------------------------------------------
# The section


def _rho(value: float) -> str:
    return "n/a (tied)" if math.isnan(value) else f"{value:+.2f}"


def render(results: list[tuple[SpaceSettings, dict, list[dict]]]) -> str:
    parts = [__doc__.split("\n\n")[1].replace("\n", " "),
             "The candidates are judged at each space's own rungs; `chosen` marks the rule's "
             "pick, `configured` what the space file sets (`scheduler.metric`)."]
    for settings, record, rows in results:
        pick = choose(rows)
        table = []
        for row in rows:
            mark = []
            if pick is row:
                mark.append("chosen")
            if row["metric"] == settings.configured:
                mark.append("configured")
            for r in row["rungs"]:
                table.append([f"`{row['metric']}` ({row['mode']})", r["epoch"],
                              _rho(r["spearman"]), f"{r['top_stopped']} of {r['top']}",
                              "yes" if r["best_stopped"] else "no",
                              f"{r['stopped']} of {r['reached']} (aims at {r['aimed']:.0f})",
                              ", ".join(mark)])
        parts.append(
            f"**{settings.name}.yaml** ({record['trials']} random configurations, FIFO, "
            f"{settings.max_epochs} epochs each, ASHA rungs at epochs "
            f"{', '.join(map(str, settings.rungs)) or 'none'} with reduction factor "
            f"{settings.reduction_factor:g}; objective {settings.objective}; run "
            f"{record['date']}, {record['wall_s'] / 60:.1f} min"
            + (f"; `{' '.join(record['launch_args'])}`" if record["launch_args"] else "")
            + "):\n\n"
            + markdown_table(["rung metric", "rung epoch", "Spearman with the final objective",
                              f"final top {TOP_K} the cutoff would stop", "... the best one",
                              "trials the cutoff would stop", ""], table)
            + "\n\n" + _verdict(settings, pick))
    return "\n\n".join(parts)


def _verdict(settings: SpaceSettings, pick: dict | None) -> str:
    if pick is None:
        return "No candidate prunes at these rungs: a FIFO scheduler costs the same here."
    agree = ("the space file sets it" if pick["metric"] == settings.configured else
             f"the space file sets `{settings.configured}`")
    return (f"Chosen: `{pick['metric']}` ({pick['mode']}): stops {pick['top_stopped']} of the "
            f"final top {TOP_K} over the rungs, mean Spearman {_rho(pick['mean_spearman'])}; "
            f"{agree}.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "benchmarks" / "rung_metric")
    p.add_argument("--smoke-test", action="store_true",
                   help="one tiny 4-trial sweep, the section written to a temporary page")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the section from the sweeps already in --workdir")
    args = p.parse_args(argv)
    plan, launch_args, page = FULL, [], None
    if args.smoke_test:
        plan, launch_args = SMOKE, SMOKE_ARGS
        args.workdir = Path(tempfile.mkdtemp(prefix="rung_metric_"))
        page = args.workdir / "benchmarks.md"
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for file_name, trials in plan:
        space = SPACES / file_name
        settings = (space_settings(space, max_epochs=3, grace_period=1) if args.smoke_test
                    else space_settings(space))
        if args.report_only:
            record = json.loads((args.workdir / f"fifo-{space.stem}.json").read_text())
        else:
            record = run_sweep(space, trials, args.workdir, launch_args)
        rows = judge(histories_of(args.workdir, space, settings.objective), settings)
        results.append((settings, record, rows))
        pick = choose(rows)
        print(f"{settings.name}: " + _verdict(settings, pick))
    path = write_section(SECTION, TITLE, render(results), path=page)
    print(f"section '{SECTION}' written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
