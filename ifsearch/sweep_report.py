"""End-of-sweep artifacts: a CSV of all trials and plots (AP vs epoch, Optuna importances)."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402

from ifsearch.search_space import ParamSpec  # noqa: E402


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
