"""The study: Influencer Loss vs Hungarian matching, each tuned by the project's own sweep.

Runs ``python -m ifsearch.launch`` for ``search_spaces/influencer_default.yaml`` and
``search_spaces/hungarian_baseline.yaml`` with the same budget (trials x epochs, searcher seed,
scheduler), retrains each sweep's ``best_config.yaml`` with several seeds and more epochs, and
retrains the Influencer best config once more with ``loss.mask_prob`` flipped (sigmoid <-> softmax).
It reports final val AP / AP50 / AP25 and duplicate rate (mean +- std over seeds), the
wall-clock time to reach AP50 >= 0.5, AP50-vs-time curves, and the Optuna parameter importances
rebuilt from each sweep's Tune results (``ifsearch.sweep_report.study_from_results``).

    python benchmarks/study.py                 # 20 trials x <= 15 epochs per sweep, retrains of
                                               # 40 epochs x 3 seeds (+3 flipped): ~25-35 min
    python benchmarks/study.py --quick         # 6 x <= 6, 15 epochs x 2 seeds (+1): ~6-8 min
    python benchmarks/study.py --smoke-test    # 2 x 1 on tiny scenes, 1 epoch x 1 seed: ~3 min;
                                               # writes to a temp file, never docs/

Everything the study runs lands under ``--work`` (default ``runs/study``): the sweeps' Tune
folders (``sweeps/``), their logs, the MLflow store (``mlflow.db``; browse it with
``mlflow ui --backend-store-uri sqlite:///runs/study/mlflow.db``) and the retrains
(``retrain/<variant>/seed<k>/metrics.jsonl``). No server or Ray process is left running: each
sweep is one launcher process (its own local Ray) in its own process group, reaped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
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
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
for _path in (str(BENCHMARKS), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from launcher import end_launcher, launcher_env  # noqa: E402
from report import DOCS, IMAGES, markdown_table, save_figure, write_section  # noqa: E402

SECTION = "study"
TITLE = "The study: Influencer Loss vs Hungarian matching, each tuned by its own sweep"
SPACES = {
    "influencer": REPO / "search_spaces" / "influencer_default.yaml",
    "hungarian": REPO / "search_spaces" / "hungarian_baseline.yaml",
}
TARGET_AP50 = 0.5  # "time to AP50 = 0.5"
PLOT_NAME = "study_ap50_vs_time.png"
SMOKE_SETS = ("data.num_points=256", "data.train_scenes=8", "data.val_scenes=4")


@dataclass(frozen=True)
class Budget:
    """What one mode runs. Both sweeps get the same num_samples x max_epochs."""

    num_samples: int  # trials per sweep
    max_epochs: int  # epochs per trial (ASHA may stop earlier)
    epochs: int  # epochs of each retrain (more than the sweep: time to AP50 0.5)
    seeds: tuple[int, ...]  # retrain seeds of each best config
    flip_seeds: tuple[int, ...]  # retrain seeds of the flipped-mask_prob Influencer config
    sets: tuple[str, ...] = ()  # --set for sweeps and retrains
    estimate: str = ""


BUDGETS = {
    "full": Budget(20, 15, 40, (0, 1, 2), (0, 1, 2), estimate="~25-35 min on 2 CPU cores"),
    "quick": Budget(6, 6, 15, (0, 1), (0,), estimate="~6-8 min on 2 CPU cores"),
    "smoke": Budget(2, 1, 1, (0,), (0,), SMOKE_SETS, estimate="~3 min"),
}


@dataclass
class Sweep:
    """One finished launcher run and what the study reads back from it."""

    loss: str
    name: str
    folder: Path
    wall_s: float
    best_config: Path
    best: dict  # best_config_trial.json
    trials: list[dict] = field(default_factory=list)  # {"config", "metrics", "epochs"}
    importances: dict[str, dict[str, float] | str] = field(default_factory=dict)
    params: list[str] = field(default_factory=list)  # searched (after --set fixed any)
    stalled: bool = False  # interrupted after --stall-timeout without a new epoch report


@dataclass
class Run:
    """One retrain: a variant of a best config with one seed, its per-epoch metrics."""

    variant: str
    seed: int
    history: list[dict]
    wall_s: float

    @property
    def final(self) -> dict:
        return self.history[-1]

    def cumulative_seconds(self) -> list[float]:
        total, out = 0.0, []
        for m in self.history:
            total += m["epoch_seconds"]
            out.append(total)
        return out

    def reach(self, target: float = TARGET_AP50) -> tuple[int, float] | None:
        """(epoch, cumulative seconds) of the first epoch with AP50 >= target, else None."""
        for m, seconds in zip(self.history, self.cumulative_seconds()):
            if m["AP50"] >= target:
                return int(m["epoch"]), seconds
        return None


# ------------------------------------------------------------------------------------ running


class Clock:
    """Progress lines with the elapsed time of the whole study."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, text: str) -> None:
        minutes, seconds = divmod(int(self.elapsed()), 60)
        print(f"[{minutes:02d}:{seconds:02d}] {text}", flush=True)


def _last_status(log_path: Path) -> str:
    """The newest "Number of trials: ..." line of Tune's progress table, if any."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("Number of trials"):
            return line.strip()
    return ""


def _reported_bytes(experiment: Path | None) -> int:
    """Size of all trials' result.json files: grows with every reported epoch."""
    if experiment is None or not experiment.exists():
        return 0
    total = 0
    for path in experiment.glob("*/result.json"):
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


def other_ray_instances() -> list[int]:
    """Pids of the GCS servers of local Ray instances running on this machine now."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if b"gcs_server" in (proc / "cmdline").read_bytes().split(b"\0")[0]:
                    pids.append(int(proc.name))
    return pids


def _other_rays_note() -> str:
    others = other_ray_instances()
    if len(others) <= 1:  # our own sweep's
        return ""
    return (f"{len(others)} local Ray instances are running on this machine and share its "
            "CPUs; run the study alone.")


def run_sweep(loss: str, budget: Budget, args: argparse.Namespace, work: Path, log: Clock,
              stamp: str) -> Sweep:
    """One ``python -m ifsearch.launch`` run with cwd = ``work``; nothing lands in the repo."""
    name = f"study-{loss}-{stamp}"
    storage = args.storage or str(work / "sweeps")
    cmd = [sys.executable, "-m", "ifsearch.launch", "--space", str(SPACES[loss]),
           "--name", name, "--storage", storage, "--mlflow-uri", args.mlflow_uri,
           "--experiment", args.experiment, "--seed", str(args.search_seed),
           "--num-samples", str(budget.num_samples), "--max-epochs", str(budget.max_epochs)]
    for item in budget.sets:
        cmd += ["--set", item]
    cmd += args.launch_args
    log_path = work / "logs" / f"sweep-{loss}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"sweep {loss}: {SPACES[loss].name}, {budget.num_samples} trials x <= "
        f"{budget.max_epochs} epochs (log: {log_path})")
    started = time.perf_counter()
    experiment = Path(storage) / name if "://" not in storage else None
    stalled_at: float | None = None  # when the stall detector sent SIGINT
    with open(log_path, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        # Own session: the launcher and its local Ray form one process group we can reap.
        proc = subprocess.Popen(cmd, cwd=work, env=launcher_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            next_note, last_size, last_change = started + 60, -1, started
            while proc.poll() is None:
                time.sleep(1.0)
                now = time.perf_counter()
                if now >= next_note:
                    next_note += 60
                    status = _last_status(log_path)
                    log(f"  sweep {loss} running {now - started:.0f} s"
                        + (f": {status}" if status else ""))
                size = _reported_bytes(experiment)
                if size != last_size:
                    last_size, last_change = size, now
                elif stalled_at is not None and now - stalled_at > 180:
                    break  # the launcher ignores SIGINT: the finally clause escalates
                elif stalled_at is None and args.stall_timeout and \
                        now - last_change > args.stall_timeout:
                    stalled_at = now
                    log(f"  sweep {loss}: no trial reported an epoch for "
                        f"{args.stall_timeout:.0f} s; interrupting it (SIGINT) and going on with "
                        f"the trials it finished. {_other_rays_note()}")
                    os.killpg(proc.pid, signal.SIGINT)
        finally:
            end_launcher(proc, grace=60.0)
    wall = time.perf_counter() - started
    # Exported files go to <storage>/<name> for a local storage, else <cwd>/runs/sweeps/<name>.
    folder = Path(storage) / name if "://" not in storage else work / "runs" / "sweeps" / name
    best_config = folder / "best_config.yaml"
    if (proc.returncode != 0 and stalled_at is None) or not best_config.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"sweep {loss} ({name}) exited with {proc.returncode} and no "
                           f"{best_config}; the end of {log_path}:\n{tail}")
    best = json.loads((folder / "best_config_trial.json").read_text())
    sweep = Sweep(loss, name, folder, wall, best_config, best, stalled=stalled_at is not None)
    read_trials(sweep, f"{storage.rstrip('/')}/{name}", list(budget.sets))
    value = best.get("metrics", {}).get("AP50", float("nan"))
    log(f"  sweep {loss} done in {wall:.0f} s: {len(sweep.trials)} trials, best trial "
        f"{best.get('trial_id')} AP50 {value:.3f}")
    return sweep


def read_trials(sweep: Sweep, experiment_path: str, sets: list[str]) -> None:
    """Every trial's config and last metrics from the Tune folder, and the importances.

    The importances come from the same Optuna study the sweep plots for MLflow
    (``ifsearch.sweep_report.study_from_results``): PED-ANOVA is Optuna 5's default (what the
    sweep's ``param_importances.png`` shows); fANOVA (seeded) is the classic second opinion.
    """
    import optuna
    from ray.tune import ExperimentAnalysis, ResultGrid

    from ifsearch.search_space import load_search_space
    from ifsearch.sweep_report import study_from_results

    space = load_search_space(SPACES[sweep.loss], sets)  # as the launcher saw it
    sweep.params = list(space.params)
    grid = ResultGrid(ExperimentAnalysis(experiment_path))
    for result in grid:
        frame = result.metrics_dataframe
        sweep.trials.append({
            "config": {k: v for k, v in (result.config or {}).items() if k in space.params},
            "metrics": dict(result.metrics or {}),
            "epochs": 0 if frame is None or "epoch" not in frame else int(frame["epoch"].max()),
            "error": result.error is not None,
        })
    plan = SimpleNamespace(metric=space.objective["metric"], mode=space.objective["mode"],
                           space=space, name=sweep.name)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with contextlib.redirect_stdout(sys.stderr):  # "plots leave out trial ..." notes
        study = study_from_results(grid, plan)
    values = {t.value for t in study.trials}
    if len(values) < 2:  # Optuna would return equal shares; say what happened instead
        reason = f"n/a (all {len(study.trials)} trials scored {plan.metric} {values or '-'})"
        sweep.importances = {"PED-ANOVA": reason, "fANOVA": reason}
        return
    evaluators = {
        "PED-ANOVA": lambda: optuna.importance.PedAnovaImportanceEvaluator(),
        "fANOVA": lambda: optuna.importance.FanovaImportanceEvaluator(seed=0),
    }
    for label, make in evaluators.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sweep.importances[label] = optuna.importance.get_param_importances(
                    study, evaluator=make())
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            sweep.importances[label] = f"n/a ({exc})"


def retrain(variant: str, config_path: Path, seed: int, extra: list[str], budget: Budget,
            work: Path, log: Clock) -> Run:
    """Train one variant/seed in this process with ``train_loop``; per-epoch metrics kept."""
    from ifsearch.config import load_config
    from ifsearch.train import train_loop

    output = work / "retrain" / variant / f"seed{seed}"
    shutil.rmtree(output, ignore_errors=True)  # metrics.jsonl is appended to: start clean
    overrides = [*budget.sets, *extra, f"train.seed={seed}", f"train.epochs={budget.epochs}",
                 f"train.output_dir={output}", "train.resume=false"]
    config = load_config(config_path, overrides)
    history: list[dict] = []
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(output / "train.log", "w") as out, contextlib.redirect_stdout(out):
        train_loop(config, report=lambda metrics, checkpoint: history.append(dict(metrics)))
    wall = time.perf_counter() - started
    (output / "checkpoint.pt").unlink(missing_ok=True)  # only the metrics are needed
    run = Run(variant, seed, history, wall)
    reached = run.reach()
    log(f"  {variant} seed {seed}: {len(history)} epochs in {wall:.0f} s, final AP50 "
        f"{run.final['AP50']:.3f} AP {run.final['AP']:.3f} dup {run.final['duplicate_rate']:.2f}"
        f", AP50 >= {TARGET_AP50}: "
        + (f"epoch {reached[0]} ({reached[1]:.1f} s)" if reached else "not reached"))
    return run


# ----------------------------------------------------------------------------------- summary


def _mean_std(values: list[float], digits: int = 3) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _stats(values: list[float]) -> tuple[float, float]:
    mean = statistics.mean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[Run]) -> dict:
    """Mean/std inputs of one variant over its seeds."""
    reached = [r.reach() for r in runs]
    return {
        "n": len(runs),
        **{k: [r.final[k] for r in runs] for k in ("AP", "AP50", "AP25", "duplicate_rate")},
        "best_AP50": [max(m["AP50"] for m in r.history) for r in runs],
        # median: robust to a few epochs slowed by other load on the machine
        "epoch_s": [statistics.median(m["epoch_seconds"] for m in r.history) for r in runs],
        "reach_s": [x[1] for x in reached if x], "reach_epoch": [x[0] for x in reached if x],
    }


def _reach_cell(s: dict, key: str, digits: int) -> str:
    count = f"{len(s[key])}/{s['n']} seeds"
    if not s[key]:
        return f"not reached (0/{s['n']} seeds)"
    return f"{_mean_std([float(v) for v in s[key]], digits)} ({count})"


def variants_table(labels: dict[str, str], groups: dict[str, list[Run]]) -> str:
    rows = []
    for variant, runs in groups.items():
        s = summarize(runs)
        rows.append([labels[variant], s["n"], _mean_std(s["AP"]), _mean_std(s["AP50"]),
                     _mean_std(s["AP25"]), _mean_std(s["duplicate_rate"], 2),
                     _mean_std(s["best_AP50"]),
                     _reach_cell(s, "reach_epoch", 1), _reach_cell(s, "reach_s", 1),
                     _mean_std(s["epoch_s"], 2)])
    return markdown_table(
        ["variant", "seeds", "AP", "AP50", "AP25", "duplicate rate", "best-epoch AP50",
         f"epochs to AP50 ≥ {TARGET_AP50}", f"seconds to AP50 ≥ {TARGET_AP50}",
         "s / epoch (median)"], rows)


def seeds_table(labels: dict[str, str], groups: dict[str, list[Run]]) -> str:
    rows = []
    for variant, runs in groups.items():
        for run in runs:
            m, reached = run.final, run.reach()
            rows.append([labels[variant], run.seed, f"{m['AP']:.3f}", f"{m['AP50']:.3f}",
                         f"{m['AP25']:.3f}", f"{m['duplicate_rate']:.2f}",
                         f"{m['unclaimed_rate']:.2f}", f"{m['active_queries']:.1f}",
                         f"epoch {reached[0]}, {reached[1]:.1f} s" if reached else "not reached",
                         f"{run.wall_s:.0f}"])
    return markdown_table(["variant", "seed", "AP", "AP50", "AP25", "duplicate rate",
                           "unclaimed rate", "active queries", f"AP50 ≥ {TARGET_AP50} at",
                           "wall s"], rows)


def sweeps_table(sweeps: dict[str, Sweep], budget: Budget) -> str:
    rows = []
    for loss, sweep in sweeps.items():
        values = [t["metrics"].get("AP50") for t in sweep.trials if not t["error"]]
        values = [v for v in values if v is not None]
        full = sum(1 for t in sweep.trials if t["epochs"] >= budget.max_epochs)
        best = sweep.best.get("metrics", {})
        name = SPACES[loss].name + (" (interrupted: stalled)" if sweep.stalled else "")
        rows.append([loss, name, len(sweep.trials), full,
                     len(sweep.trials) - full,
                     f"{best.get('AP50', float('nan')):.3f}",
                     f"{statistics.median(values):.3f}" if values else "n/a",
                     f"{sweep.wall_s:.0f}"])
    return markdown_table(["loss", "space", "trials", f"ran all {budget.max_epochs} epochs",
                           "stopped early (ASHA)", "best trial AP50", "median trial AP50",
                           "sweep wall s"], rows)


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def importance_table(sweeps: dict[str, Sweep]) -> str:
    rows = []
    for loss, sweep in sweeps.items():
        ped, fan = sweep.importances.get("PED-ANOVA"), sweep.importances.get("fANOVA")
        searched = sweep.best.get("searched", {})
        params = list(sweep.params)
        if isinstance(ped, dict):
            params.sort(key=lambda p: -ped.get(p, 0.0))
        for rank, param in enumerate(params, start=1):
            rows.append([loss, rank, f"`{param}`",
                         f"{ped[param]:.2f}" if isinstance(ped, dict) and param in ped else
                         (ped if isinstance(ped, str) else "–"),
                         f"{fan[param]:.2f}" if isinstance(fan, dict) and param in fan else
                         (fan if isinstance(fan, str) else "–"),
                         _value(searched.get(param, "–"))])
    return markdown_table(["loss", "rank", "parameter", "importance (PED-ANOVA)",
                           "importance (fANOVA)", "best trial's value"], rows)


def mask_prob_in_sweep(sweep: Sweep) -> str:
    rows = []
    by_choice: dict[str, list[float]] = {}
    for trial in sweep.trials:
        choice = trial["config"].get("loss.mask_prob")
        if choice is not None and "AP50" in trial["metrics"]:
            by_choice.setdefault(choice, []).append(trial["metrics"]["AP50"])
    for choice, values in sorted(by_choice.items()):
        rows.append([choice, len(values), f"{max(values):.3f}", f"{statistics.mean(values):.3f}"])
    if not rows:
        return "(no finished Influencer trial reported `loss.mask_prob`)"
    return markdown_table(["`loss.mask_prob`", "sweep trials", "best AP50", "mean AP50 "
                           "(early-stopped trials at their last epoch)"], rows)


def mask_prob_sentence(labels: dict[str, str], groups: dict[str, list[Run]], picked: str) -> str:
    """The flipped-mask_prob retrain against the sweep's pick, in one paragraph."""
    a, b = summarize(groups["influencer"]), summarize(groups["influencer_flip"])
    other = "sigmoid" if picked == "softmax" else "softmax"
    better = statistics.mean(b["AP50"]) > statistics.mean(a["AP50"])
    return (f"The Influencer sweep's best trial uses `loss.mask_prob: {picked}`. Retrained with "
            f"`{other}` and everything else equal, it reached final AP50 "
            f"{_mean_std(b['AP50'])} ({b['n']} seed(s)) against {_mean_std(a['AP50'])} "
            f"({a['n']} seed(s)) with `{picked}`; AP {_mean_std(b['AP'])} vs "
            f"{_mean_std(a['AP'])}, duplicate rate {_mean_std(b['duplicate_rate'], 2)} vs "
            f"{_mean_std(a['duplicate_rate'], 2)}. At this config `"
            f"{other if better else picked}` is the better choice by final AP50"
            + (f", although the other weights were tuned with `{picked}`." if better else
               f" (the other weights were tuned with `{picked}`, which favours it)."))


def plot(labels: dict[str, str], groups: dict[str, list[Run]], path: Path) -> Path:
    """AP50 and duplicate rate vs cumulative wall-clock seconds, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"influencer": "tab:red", "influencer_flip": "tab:orange",
               "hungarian": "tab:blue"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, runs in groups.items():
        for i, run in enumerate(runs):
            x = run.cumulative_seconds()
            kwargs = dict(color=colours.get(variant, "grey"), lw=1.4, alpha=0.85,
                          marker="o", ms=2.5, label=labels[variant] if i == 0 else None)
            left.plot(x, [m["AP50"] for m in run.history], **kwargs)
            right.plot(x, [m["duplicate_rate"] for m in run.history], **kwargs)
    left.axhline(TARGET_AP50, color="grey", ls="--", lw=1)
    left.set_xlabel("wall-clock seconds (cumulative train + validation)")
    left.set_ylabel("val AP50")
    left.set_title("AP50 vs time, one line per seed", fontsize=10)
    left.legend(fontsize=8, loc="upper left")
    right.set_xlabel("wall-clock seconds (cumulative train + validation)")
    right.set_ylabel("duplicate rate")
    right.set_title("ground-truth instances matched by > 1 prediction", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def verdict(labels: dict[str, str], groups: dict[str, list[Run]]) -> tuple[str, str]:
    """(who won and by how much, where the Influencer Loss loses), from the numbers."""
    inf, hun = summarize(groups["influencer"]), summarize(groups["hungarian"])
    n = min(inf["n"], hun["n"])
    (mi, si), (mh, sh) = _stats(inf["AP50"]), _stats(hun["AP50"])
    delta, noise = mi - mh, math.hypot(si, sh)
    spread = (f"Influencer {mi:.3f} ± {si:.3f} vs Hungarian {mh:.3f} ± {sh:.3f} final val AP50 "
              f"(mean ± std over {n} seed{'s' if n > 1 else ''})")
    ap = (f"AP {statistics.mean(inf['AP']):.3f} vs {statistics.mean(hun['AP']):.3f}, "
          f"AP25 {statistics.mean(inf['AP25']):.3f} vs {statistics.mean(hun['AP25']):.3f}")
    if n < 2:
        won = (f"**{'Influencer Loss' if delta > 0 else 'Hungarian baseline'} ahead, one seed "
               f"only (no spread):** {spread}; {ap}.")
    elif abs(delta) <= noise:
        won = (f"**No clear winner:** {spread}: the difference ({delta:+.3f}) is within the "
               f"seed spread (±{noise:.3f}, the two stds combined); {ap}.")
    else:
        name = "The Influencer Loss" if delta > 0 else "The Hungarian baseline"
        loser = mh if delta > 0 else mi
        ratio = f", {max(mi, mh) / loser:.1f}x the loser's" if loser >= 0.01 else ""
        times = f"{abs(delta) / noise:.1f}x" if noise else "far above"
        won = (f"**{name} won** by {abs(delta):.3f} AP50 ({times} the seed spread "
               f"±{noise:.3f}{ratio}): {spread}; {ap}.")
    if "influencer_flip" in groups:
        flip = summarize(groups["influencer_flip"])
        won += (f" With `loss.mask_prob` flipped, the Influencer config reached "
                f"{_mean_std(flip['AP50'])} AP50 ({labels['influencer_flip']}).")

    losses = []
    for key, name, higher_better, digits in (
            ("AP", "AP (IoU 0.5:0.9)", True, 3), ("AP50", "AP50", True, 3),
            ("AP25", "AP25", True, 3), ("duplicate_rate", "duplicate rate", False, 2),
            ("epoch_s", "median seconds per epoch", False, 2)):
        a, b = statistics.mean(inf[key]), statistics.mean(hun[key])
        if (a < b) if higher_better else (a > b):
            losses.append(f"{name} {a:.{digits}f} vs {b:.{digits}f}")
    if len(inf["reach_s"]) < len(hun["reach_s"]):
        losses.append(f"AP50 ≥ {TARGET_AP50} reached by {len(inf['reach_s'])}/{inf['n']} seeds "
                      f"vs {len(hun['reach_s'])}/{hun['n']}")
    elif inf["reach_s"] and hun["reach_s"] and \
            statistics.mean(inf["reach_s"]) > statistics.mean(hun["reach_s"]):
        losses.append(f"time to AP50 ≥ {TARGET_AP50} {statistics.mean(inf['reach_s']):.1f} s vs "
                      f"{statistics.mean(hun['reach_s']):.1f} s")
    where = ("Measured here, the Influencer Loss (its sweep's best config) is behind the "
             "Hungarian baseline on: " + "; ".join(losses) + "." if losses else
             "Measured here, the Influencer Loss is behind the Hungarian baseline on none of "
             "AP, AP50, AP25, duplicate rate, time to AP50 0.5 and seconds per epoch.")
    return won, where


def render(labels: dict[str, str], groups: dict[str, list[Run]], sweeps: dict[str, Sweep],
           budget: Budget, mode: str, image_link: str, total_s: float,
           search_seed: int = 0) -> str:
    won, where = verdict(labels, groups)
    inf_sweep = sweeps["influencer"]
    picked = inf_sweep.best.get("searched", {}).get("loss.mask_prob", "?")
    sets = ", with " + " ".join(f"`--set {s}`" for s in budget.sets) if budget.sets else ""
    n_trials = budget.num_samples
    from ifsearch.config import load_config

    config = load_config(sweeps["hungarian"].best_config)
    data = (f"{config.data.name} scenes of {config.data.num_points} points, "
            f"{config.data.train_scenes} training / {config.data.val_scenes} validation")
    model = (f"{config.model.embed_dim}-wide, {config.model.encoder_layers} EdgeConv + "
             f"{config.model.decoder_layers} decoder layers")
    seeds = ", ".join(map(str, budget.seeds))
    flip_seeds = ", ".join(map(str, budget.flip_seeds))
    if len(budget.flip_seeds) < len(budget.seeds):
        flip_seeds += " (fewer than the main variants, to fit the budget)"
    target = TARGET_AP50
    return f"""
Mode `{mode}` ({budget.estimate}); this run took {total_s / 60:.1f} min in all.

{won}

### Protocol

- **Sweeps**: `python -m ifsearch.launch` on `search_spaces/influencer_default.yaml` and
  `search_spaces/hungarian_baseline.yaml`, unchanged except for the budget: {n_trials} trials x
  <= {budget.max_epochs} epochs each, the spaces' TPE searcher (searcher seed
  {search_seed}) and ASHA scheduler; the objective is val AP50 at a trial's last epoch. Both
  share the data ({data}) and the model ({model}){sets}; the Influencer space also searches
  `model.num_queries` (8..24; the Hungarian space fixes 12).
- **Retrains**: each sweep's `best_config.yaml`, trained again by `ifsearch.train.train_loop`
  for {budget.epochs} epochs (sweep trials ran at most {budget.max_epochs}) with seeds
  {seeds} (model init and data order; the scenes are the same), one run at a time on the
  whole machine, variants interleaved seed by seed, after one discarded warm-up epoch. The
  Influencer best config is also retrained with `loss.mask_prob` flipped, seeds
  {flip_seeds}.
- **Metrics**: validation AP / AP50 / AP25 (ScanNet protocol) and duplicate rate (instances
  matched by more than one prediction at IoU > 0.5) at the last epoch. *Time to AP50 ≥ {target}*:
  cumulative `epoch_seconds` (training + validation) up to the first epoch with AP50 ≥ {target};
  mean ± std over the seeds that reached it. Seconds depend on the machine and its load; epochs
  do not.

### Sweeps (equal budgets)

{sweeps_table(sweeps, budget)}

### Retrained best configs

{variants_table(labels, groups)}

![AP50 and duplicate rate vs wall-clock time, per seed]({image_link})

Per seed (last epoch):

{seeds_table(labels, groups)}

### Sigmoid vs softmax

{mask_prob_sentence(labels, groups, picked)}

Within the sweep (each trial at its last epoch; trials differ in all other parameters too):

{mask_prob_in_sweep(inf_sweep)}

### Hyperparameter importances found by the sweeps

Optuna importances of val AP50 over each sweep's trials, rebuilt from the Tune results with
`ifsearch.sweep_report.study_from_results` (the study the sweep plots to MLflow); normalised to
sum to 1 per loss and evaluator. With {n_trials} trials per sweep, early-stopped trials
counted at their truncated AP50, they are rough: read them as "what this sweep leaned on", not
as a property of the loss. The two evaluators disagreeing is itself the measure of that
roughness.

{importance_table(sweeps)}

### Where the Influencer Loss loses

{where}

Caveats: the scenes are small and the budgets tiny (a laptop study), so absolute AP is low, and
a config picked after at most {budget.max_epochs} epochs is not necessarily the best one at
{budget.epochs}; with {len(budget.seeds)} seed(s) per variant the stds are themselves
uncertain. The duplicate rate is
the loss's known weak spot (its soft maximum over queries rewards several queries claiming one
instance); `eval.dedup_iou` (mask NMS at inference) is off in both spaces.

### Running it

```bash
python benchmarks/study.py                # full: {BUDGETS['full'].estimate}
python benchmarks/study.py --quick        # {BUDGETS['quick'].estimate}
python benchmarks/study.py --smoke-test   # {BUDGETS['smoke'].estimate}; temp files, not docs/
```

At full size on a GPU cluster: start Ray on the nodes (`ray start --head` on one node,
`ray start --address HEAD:6379` on the others), give the sweeps a storage path every node sees
and a shared MLflow server, put GPU and larger data/model settings in `--set` (passed to the
sweeps and the retrains) and launcher flags in `--launch-arg`, and run the script on a node with
a GPU (the retrains run where the script runs):

```bash
python benchmarks/study.py --num-samples 64 --max-epochs 50 --epochs 100 --seeds 0,1,2,3,4 \\
  --storage /shared/ifsearch/study --mlflow-uri http://mlflow.internal:5000 \\
  --launch-arg=--address=auto --launch-arg=--gpus-per-worker=1 \\
  --launch-arg=--workers-per-trial=1 --launch-arg=--cpus-per-worker=4 \\
  --set train.device=auto --set data.num_points=4096 --set data.train_scenes=2000 \\
  --set data.val_scenes=200 --set model.embed_dim=128 --set model.ffn_dim=512
```

The launcher bounds concurrent trials by the cluster's GPUs (`--max-concurrent` caps it) and
refuses a trial that no node can hold.
"""


# ---------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/study.py",
        description="Influencer Loss vs Hungarian: equal-budget sweeps, seeded retrains of the "
                    "best configs, sigmoid vs softmax, importances; writes the 'study' section "
                    "of docs/benchmarks.md and docs/img/" + PLOT_NAME,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help=f"small budgets: {BUDGETS['quick'].estimate}")
    mode.add_argument("--smoke-test", action="store_true",
                      help="tiny sweeps/retrains on tiny scenes; writes to a temp folder unless "
                           "--out/--images are given, never to docs/")
    p.add_argument("--out", type=Path, default=None,
                   help=f"markdown file of the section (default {DOCS.relative_to(REPO)})")
    p.add_argument("--images", type=Path, default=None,
                   help=f"folder for {PLOT_NAME} (default {IMAGES.relative_to(REPO)})")
    p.add_argument("--work", type=Path, default=None,
                   help="scratch folder: sweeps, logs, MLflow store, retrains "
                        "(default runs/study; a temp folder with --smoke-test)")
    p.add_argument("--num-samples", type=int, default=None, help="trials per sweep")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs per sweep trial")
    p.add_argument("--epochs", type=int, default=None, help="epochs per retrain")
    p.add_argument("--seeds", default=None,
                   help="retrain seeds, comma-separated (the flipped variant gets the same)")
    p.add_argument("--search-seed", type=int, default=0, help="searcher seed of both sweeps")
    p.add_argument("--storage", default=None,
                   help="Tune storage of the sweeps (default <work>/sweeps; on a cluster a "
                        "path every node sees)")
    p.add_argument("--mlflow-uri", default=None,
                   help="tracking URI for the sweeps (default sqlite:///<work>/mlflow.db: no "
                        "server process)")
    p.add_argument("--experiment", default="study", help="MLflow experiment name")
    p.add_argument("--stall-timeout", type=float, default=300.0,
                   help="interrupt a sweep when no trial has reported an epoch for this many "
                        "seconds (0 = never) and go on with the trials it finished")
    p.add_argument("--set", dest="sets", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="config override for both sweeps and every retrain (repeatable)")
    p.add_argument("--launch-arg", dest="launch_args", action="append", default=[],
                   metavar="ARG", help="extra argument for ifsearch.launch, e.g. "
                                       "--launch-arg=--gpus-per-worker=1 (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mode = "smoke" if args.smoke_test else "quick" if args.quick else "full"
    budget = BUDGETS[mode]
    budget = replace(
        budget,
        num_samples=args.num_samples or budget.num_samples,
        max_epochs=args.max_epochs or budget.max_epochs,
        epochs=args.epochs or budget.epochs,
        sets=(*budget.sets, *args.sets),
    )
    if args.seeds:
        seeds = tuple(int(s) for s in args.seeds.split(","))
        budget = replace(budget, seeds=seeds, flip_seeds=seeds)
    temp = Path(tempfile.mkdtemp(prefix="ifsearch-study-")) if mode == "smoke" else None
    work = (args.work or (temp / "work" if temp else REPO / "runs" / "study")).resolve()
    out = args.out or (temp / "benchmarks.md" if temp else DOCS)
    images = args.images or (temp / "img" if temp else IMAGES)
    work.mkdir(parents=True, exist_ok=True)
    args.mlflow_uri = args.mlflow_uri or f"sqlite:///{work / 'mlflow.db'}"
    log = Clock()
    log(f"study ({mode}, {budget.estimate}): work {work}, section -> {out}, plot -> {images}")
    others = other_ray_instances()
    if others:
        log(f"warning: {len(others)} other local Ray instance(s) running on this machine "
            f"(gcs_server pids {others}): they share the CPUs, so timings will be disturbed")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    sweeps = {loss: run_sweep(loss, budget, args, work, log, stamp) for loss in SPACES}

    from ifsearch.config import load_config

    picked = load_config(sweeps["influencer"].best_config).loss.mask_prob
    other = "sigmoid" if picked == "softmax" else "softmax"
    labels = {
        "influencer": f"Influencer ({picked}, sweep's best)",
        "influencer_flip": f"Influencer ({other}, otherwise the sweep's best)",
        "hungarian": "Hungarian (sweep's best)",
    }
    plan = [("influencer", sweeps["influencer"].best_config, [], budget.seeds),
            ("hungarian", sweeps["hungarian"].best_config, [], budget.seeds),
            ("influencer_flip", sweeps["influencer"].best_config,
             [f"loss.mask_prob={other}"], budget.flip_seeds)]
    # One discarded epoch first, so the first measured run does not pay one-time costs (thread
    # pools, first-call allocations); then variants interleaved seed by seed, so a change in the
    # machine's load during the study does not fall on one variant only.
    log(f"retrains: {budget.epochs} epochs each, seeds {list(budget.seeds)} "
        f"(flipped mask_prob: {list(budget.flip_seeds)}); one warm-up epoch first")
    retrain("warmup", sweeps["hungarian"].best_config, 0, [], replace(budget, epochs=1), work,
            lambda text: None)
    groups: dict[str, list[Run]] = {variant: [] for variant, *_ in plan}
    for seed in sorted({s for *_, seeds in plan for s in seeds}):
        for variant, config_path, extra, seeds in plan:
            if seed in seeds:
                groups[variant].append(retrain(variant, config_path, seed, extra, budget, work,
                                               log))
    (work / "retrains.json").write_text(json.dumps(
        {v: [{"seed": r.seed, "wall_s": r.wall_s, "history": r.history} for r in runs]
         for v, runs in groups.items()}, indent=1))

    image = plot(labels, {k: groups[k] for k in ("influencer", "influencer_flip", "hungarian")},
                 Path(images) / PLOT_NAME)
    link = os.path.relpath(image.resolve(), Path(out).resolve().parent)
    body = render(labels, groups, sweeps, budget, mode, link, log.elapsed(),
                  args.search_seed)
    write_section(SECTION, TITLE, body, path=out)
    won, _ = verdict(labels, groups)
    log(f"wrote section '{SECTION}' to {out} and {image}")
    print(won.replace("**", ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
