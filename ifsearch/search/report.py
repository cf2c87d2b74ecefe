"""End-of-sweep artifacts: a CSV of all trials, plots (AP vs epoch, Optuna importances), and
whether the scheduler's early stopping could be trusted (rung values vs final values)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from scipy import stats  # noqa: E402

from ifsearch.search.space import ParamSpec  # noqa: E402


def write_trials_csv(results, path: Path) -> Path:
    """One row per trial: its last reported metrics and its sampled parameters."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results.get_dataframe().to_csv(path, index=False)
    return path


def write_plots(results, plan, directory: Path) -> Path:
    """metric_vs_epoch.png for every trial, plus Optuna's importance / parallel-coordinate plots."""
    directory.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or plan.metric not in frame or "epoch" not in frame:
            continue
        ax.plot(frame["epoch"], frame[plan.metric], marker="o", ms=3,
                label=str(result.metrics.get("trial_id", "")))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"val {plan.metric}")
    ax.set_title(f"{plan.name}\n{plan.metric} per epoch (early-stopped trials end early)",
                 fontsize=9)
    if len(results) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(directory / f"{plan.metric}_vs_epoch.png", dpi=120)
    plt.close(fig)

    study = study_from_results(results, plan)
    plots = {
        "param_importances.png": optuna.visualization.matplotlib.plot_param_importances,
        "parallel_coordinate.png": optuna.visualization.matplotlib.plot_parallel_coordinate,
    }
    for name, plot in plots.items():
        try:  # needs >= 2 finished trials with varying parameters
            with warnings.catch_warnings():  # "experimental" notices, not problems
                warnings.simplefilter("ignore")
                axes = plot(study)
            axes.figure.set_size_inches(8, 5)
            axes.figure.tight_layout()
            axes.figure.savefig(directory / name, dpi=120)
            plt.close(axes.figure)
        except (ValueError, RuntimeError) as exc:
            print(f"skipped {name}: {exc}")
    return directory


def study_from_results(results, plan) -> optuna.Study:
    """An Optuna study rebuilt from Tune's results through Optuna's public API, for plotting."""
    study = optuna.create_study(direction="maximize" if plan.mode == "max" else "minimize")
    for result in results:
        value = (result.metrics or {}).get(plan.metric)
        if result.error is not None or value is None or result.metrics.get("diverged"):
            continue
        params = {k: v for k, v in result.config.items() if k in plan.space.params}
        try:
            trial = optuna.trial.create_trial(
                params=params,
                distributions={k: _distribution(plan.space.params[k]) for k in params},
                value=float(value),
            )
        except ValueError:  # e.g. a warm-start point outside the searched ranges
            print(f"plots leave out trial {result.metrics.get('trial_id')}: its parameters "
                  "lie outside the search space")
            continue
        study.add_trial(trial)
    return study


def _distribution(p: ParamSpec) -> optuna.distributions.BaseDistribution:
    if p.type == "choice":
        return optuna.distributions.CategoricalDistribution(p.values)
    if p.type == "int":
        return optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.is_log,
                                                    step=p.step or 1)
    return optuna.distributions.FloatDistribution(p.low, p.high, log=p.is_log, step=p.step)


# --------------------------------------------------------------------------------------------
# Is early stopping trustworthy? (rung values vs final values)

Histories = dict[str, dict[int, dict[str, float]]]  # trial id -> {epoch: {metric: value}}


def histories_from_results(results, metrics: Sequence[str]) -> Histories:
    """Per-trial metric histories from Tune's results (each result's ``metrics_dataframe``).

    A trial that was restored may report an epoch twice; the later report wins, as it is the one
    the resumed run continued from. Trials without an ``epoch`` column are left out.
    """
    histories: Histories = {}
    for index, result in enumerate(results):
        frame = result.metrics_dataframe
        if frame is None or "epoch" not in frame:
            continue
        trial_id = str((result.metrics or {}).get("trial_id", index))
        history: dict[int, dict[str, float]] = {}
        for row in frame.to_dict("records"):
            values = {m: float(row[m]) for m in metrics if m in row and row[m] is not None}
            if not math.isnan(float(row["epoch"])):
                history[int(row["epoch"])] = values
        histories[trial_id] = history
    return histories


def asha_milestones(grace_period: int, max_epochs: int, reduction_factor: float) -> list[int]:
    """Every epoch at which Ray's ASHA judges a trial (one bracket), ascending.

    Ray's ``_Bracket`` places ``int(log(max_t / grace) / log(rf) + 1)`` milestones at
    ``grace * rf**k`` and judges a trial at its first reported epoch >= each: ``ceil`` of it.
    """
    count = int(np.log(max_epochs / grace_period) / np.log(reduction_factor) + 1)
    return sorted({math.ceil(grace_period * reduction_factor ** k) for k in range(count)})


def asha_rungs(grace_period: int, max_epochs: int, reduction_factor: float) -> list[int]:
    """The milestones before the last epoch: a rung at ``max_epochs`` itself stops nothing."""
    return [r for r in asha_milestones(grace_period, max_epochs, reduction_factor)
            if r < max_epochs]


def _value_at(history: dict[int, dict[str, float]], epoch: int, metric: str) -> float | None:
    """The first reported value at or after ``epoch``: the result ASHA judges at that rung."""
    for e in sorted(history):
        if e >= epoch:
            value = history[e].get(metric)
            return None if value is None or math.isnan(value) else value
    return None


def rung_agreement(histories: Histories, rungs: Sequence[int], *, reduction_factor: float,
                   rung_metric: str, final_metric: str, mode: str = "max",
                   rung_mode: str | None = None, final_epoch: int | None = None,
                   top_k: int = 5) -> list[dict]:
    """For each rung: does the rung's ranking agree with the final one? One dict per rung.

    Over the trials that ran to the end (a ``final_metric`` value at ``final_epoch``, by
    default the last epoch any trial reported):

    * ``spearman`` (and ``p_value``): Spearman's rank correlation (``scipy.stats.spearmanr``)
      between each trial's ``rung_metric`` at the rung and its ``final_metric`` at the end, with
      the sign turned so that +1 always means "the rung ranks them as the end does" (also when
      one metric is minimised and the other maximised). NaN when either side is constant.
    * ``top_stopped``: how many of the final top-``top_k`` trials the rung's cutoff would have
      stopped (``stopped``: how many of all the trials that reached the rung). The cutoff is
      ASHA's rule (Ray's ``_Bracket.cutoff``): the ``(1 - 1/reduction_factor)`` percentile
      (numpy's linear interpolation) of the rung values, and a trial is stopped when its value
      is strictly worse than it, so ASHA keeps about the top ``1/reduction_factor``. Ray
      applies it asynchronously, to the trials that reached the rung before; here it is
      applied to every trial that reached the rung (``reached``), the order-free version of
      the same rule.

    In a sweep that ASHA pruned, the trials that ran to the end are the ones that survived:
    their correlation is measured on a narrowed range. Histories of unpruned runs (a FIFO
    sweep, seeded retrains) answer the question without that bias.

    Args:
        histories: trial id -> {epoch: {metric: value}}.
        rungs: the epochs at which trials are judged (``asha_rungs``).
        reduction_factor: ASHA's reduction factor (>= 2 in practice).
        rung_metric: what the scheduler judges at a rung.
        final_metric: what the search optimises (the value at ``final_epoch``).
        mode: "max" or "min", of ``final_metric``.
        rung_mode: "max" or "min", of ``rung_metric`` (default: ``mode``).
        final_epoch: the last epoch of a complete trial.
        top_k: the size of the final top group.
    """
    rung_mode = rung_mode or mode
    if final_epoch is None:
        final_epoch = max((max(h) for h in histories.values() if h), default=0)
    final = {t: h[final_epoch][final_metric] for t, h in histories.items()
             if final_metric in h.get(final_epoch, {})
             and not math.isnan(h[final_epoch][final_metric])}
    sign_final = 1.0 if mode == "max" else -1.0
    sign_rung = 1.0 if rung_mode == "max" else -1.0
    ranked = sorted(final, key=lambda t: (-sign_final * final[t], t))
    top = set(ranked[:top_k])
    rows = []
    for rung in rungs:
        reached = {t: v for t, h in histories.items()
                   if (v := _value_at(h, rung, rung_metric)) is not None}
        # Ray multiplies by -1 in min mode and stops what is below the cutoff: do the same.
        signed = {t: sign_rung * v for t, v in reached.items()}
        cutoff = (float(np.nanpercentile(list(signed.values()),
                                         (1 - 1 / reduction_factor) * 100))
                  if signed else math.nan)
        stopped = {t for t, v in signed.items() if v < cutoff}
        both = [t for t in ranked if t in reached]
        rho, p_value = math.nan, math.nan
        if len(both) >= 3:
            xs = [signed[t] for t in both]
            ys = [sign_final * final[t] for t in both]
            if len(set(xs)) > 1 and len(set(ys)) > 1:
                result = stats.spearmanr(xs, ys)
                rho, p_value = float(result.statistic), float(result.pvalue)
        rows.append({
            "epoch": rung, "reached": len(reached), "complete": len(both),
            "cutoff": sign_rung * cutoff if signed else math.nan,
            "spearman": rho, "p_value": p_value,
            "stopped": len(stopped), "stopped_complete": len(stopped & set(both)),
            "top": len(top & set(both)), "top_stopped": len(stopped & top),
            "top_stopped_ids": sorted(stopped & top),
        })
    return rows


def rung_trust(histories: Histories, rungs: Sequence[int], *, reduction_factor: float,
               rung_metric: str, final_metric: str, mode: str = "max",
               rung_mode: str | None = None, final_epoch: int | None = None, top_k: int = 5,
               min_spearman: float = 0.5, min_complete: int = 6) -> dict:
    """A verdict on a sweep's early stopping, for its end-of-sweep report.

    ``trustworthy`` is False when some rung ranks the complete trials unlike the end
    (Spearman below ``min_spearman``: less than a moderate agreement) or would have stopped one
    of the final top-``top_k``; True when no rung does either; None when fewer than
    ``min_complete`` trials ran to the end (too few to tell). A rung whose values are all equal
    (NaN correlation) stops nothing and counts neither way. ``summary`` says it in one line;
    ``rungs`` holds ``rung_agreement``'s rows.
    """
    rows = rung_agreement(histories, rungs, reduction_factor=reduction_factor,
                          rung_metric=rung_metric, final_metric=final_metric, mode=mode,
                          rung_mode=rung_mode, final_epoch=final_epoch, top_k=top_k)
    complete = max((r["complete"] for r in rows), default=0)
    verdict = {"trustworthy": None, "rungs": rows, "complete": complete, "top_k": top_k,
               "rung_metric": rung_metric, "final_metric": final_metric,
               "min_spearman": min_spearman}
    if not rows:
        verdict["summary"] = "no rung before the last epoch: nothing was judged early"
        return verdict
    if complete < min_complete:
        verdict["summary"] = (f"too few trials ran to the end ({complete} < {min_complete}) to "
                              f"judge the rungs")
        return verdict
    bad = []
    for r in rows:
        why = []
        if not math.isnan(r["spearman"]) and r["spearman"] < min_spearman:
            why.append(f"Spearman {r['spearman']:.2f} with the final {final_metric}")
        if r["top_stopped"]:
            why.append(f"{r['top_stopped']} of the final top {r['top']} would have been stopped")
        if why:
            bad.append(f"epoch {r['epoch']} ({'; '.join(why)})")
    verdict["trustworthy"] = not bad
    verdict["summary"] = (
        f"this sweep pruned with an untrustworthy rung ({rung_metric}): " + ", ".join(bad)
        if bad else
        f"the rungs ({rung_metric} at epochs {', '.join(str(r['epoch']) for r in rows)}) rank "
        f"the {complete} complete trials like the final {final_metric} (Spearman >= "
        f"{min_spearman}) and stop none of its top {top_k}")
    return verdict


def sweep_rung_trust(results, plan, **options) -> dict | None:
    """``rung_trust`` of a finished sweep, from its Tune results and its plan; None without ASHA.

    The rung metric is the scheduler's own (``plan.rung_metric``: ``--rung-metric``, else the
    space's ``scheduler.metric``, else the objective); rungs, reduction factor and final epoch
    come from the plan. For the end-of-sweep summary: print ``summary`` when ``trustworthy`` is
    False.

    Args:
        results: Tune's ``ResultGrid`` (or any iterable of results with ``metrics`` and
            ``metrics_dataframe``).
        plan: the ``SweepPlan`` (``scheduler``, ``grace_period``, ``max_epochs``, ``metric``,
            ``mode``, ``rung_metric``, ``rung_mode``, ``space.scheduler``).
        options: passed to ``rung_trust`` (``top_k``, ``min_spearman``, ``min_complete``).
    """
    if plan.scheduler != "asha":
        return None
    scheduler = plan.space.scheduler
    rung_metric, rung_mode = plan.rung_metric, plan.rung_mode  # --rung-metric or the space's
    rf = scheduler.get("reduction_factor", 2)
    histories = histories_from_results(results, sorted({plan.metric, rung_metric}))
    return rung_trust(histories, asha_rungs(plan.grace_period, plan.max_epochs, rf),
                      reduction_factor=rf, rung_metric=rung_metric, final_metric=plan.metric,
                      mode=plan.mode, rung_mode=rung_mode, final_epoch=plan.max_epochs,
                      **options)


# ----------------------------------------------------------------------------------------------
# How much of the sweep's slot-time went into training


def slot_efficiency(results, started: float, ended: float, slots: int) -> dict[str, float]:
    """The fraction of the sweep's slot-time spent in training and validation epochs.

    ``sum(epoch_seconds) / ((ended - started) * slots)`` over the epochs reported between
    ``started`` and ``ended`` (this session of the sweep: a resumed sweep counts its own epochs
    and its own wall-clock). What is not in it: Ray and MLflow start-up, each trial's start-up,
    report and checkpoint overhead, and slots left idle (a sweep's tail, a stalled trial).

    Args:
        results: Tune's ``ResultGrid`` (or results with a ``metrics_dataframe`` holding
            ``epoch_seconds`` and Tune's ``timestamp``, in Unix seconds).
        started, ended: the session's wall-clock bounds, in Unix seconds.
        slots: trials that could run at once.

    Returns:
        ``{"slot_efficiency", "epoch_seconds", "slot_seconds"}``; efficiency 0 when no time
        passed.
    """
    epoch_seconds = 0.0
    for result in results:
        frame = getattr(result, "metrics_dataframe", None)
        if frame is None or "epoch_seconds" not in frame or "timestamp" not in frame:
            continue
        # Tune's timestamp is whole seconds: a report in the session's first second counts.
        session = frame[(frame["timestamp"] >= int(started)) & (frame["timestamp"] <= ended)]
        epoch_seconds += float(session["epoch_seconds"].fillna(0).sum())
    slot_seconds = max(ended - started, 0.0) * max(slots, 1)
    return {"slot_efficiency": epoch_seconds / slot_seconds if slot_seconds > 0 else 0.0,
            "epoch_seconds": epoch_seconds, "slot_seconds": slot_seconds}
