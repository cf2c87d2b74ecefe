"""The study's numbers and words: statistics, the verdict, tables and plots (benchmarks/study.py).

Everything here is a function of what the study left on disk (retrain histories, sweep trials,
the two effective search spaces), so the section can be rebuilt without training anything
(``python benchmarks/study.py --report-only``) and the verdict can be tested on hand-made numbers.

Statistics: the difference between two variants is the difference of their means over seeds
with a 95 % interval from Welch's t (``scipy.stats.ttest_ind(equal_var=False)``): unequal
variances, no pairing (seed k of one loss has nothing in common with seed k of the other but
the number). A side is named ahead or behind only when that interval excludes 0; otherwise the
two are "level". With one seed on either side there is no interval, and nothing is named.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from report import markdown_table, save_figure

TARGETS = (0.5, 0.7)  # "epochs / seconds to AP50 >= 0.5 and >= 0.7"
CONFIDENCE = 0.95


@dataclass
class Run:
    """One retrain (a variant of a best config, one seed): its per-epoch metrics, in order."""

    variant: str
    seed: int
    history: list[dict]

    @property
    def final(self) -> dict:
        return self.history[-1]

    @property
    def epochs(self) -> int:
        return len(self.history)

    def value(self, key: str) -> float | None:
        """The last epoch's ``key``, None when this build does not report it."""
        value = self.final.get(key)
        return None if value is None else float(value)

    def cumulative_seconds(self) -> list[float]:
        """Seconds of training + validation up to each epoch (``epoch_seconds`` summed)."""
        total, out = 0.0, []
        for m in self.history:
            total += m["epoch_seconds"]
            out.append(total)
        return out

    def reach(self, target: float, key: str = "AP50") -> tuple[int, float] | None:
        """(epoch, cumulative seconds) of the first epoch with ``key`` >= target, else None."""
        for m, seconds in zip(self.history, self.cumulative_seconds()):
            if m.get(key) is not None and m[key] >= target:
                return int(m["epoch"]), seconds
        return None

    def reach_censored(self, target: float, key: str = "AP50") -> tuple[float, float, bool]:
        """(epochs, seconds, reached): a run that never reached counts as one epoch past its end.

        That is a lower bound of its true time to the target, so comparing with it can only
        understate how far behind a run that never got there is.
        """
        reached = self.reach(target, key)
        if reached:
            return float(reached[0]), reached[1], True
        seconds = self.cumulative_seconds()
        per_epoch = seconds[-1] / max(len(seconds), 1)
        return float(self.epochs + 1), seconds[-1] + per_epoch, False

    def median_epoch_seconds(self) -> float:
        """Median seconds per epoch: robust to a few epochs slowed by other load."""
        return statistics.median(m["epoch_seconds"] for m in self.history)


# ------------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``m ± s`` over seeds (``m`` alone for one seed, ``n/a`` for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def welch_interval(a: Sequence[float], b: Sequence[float],
                   confidence: float = CONFIDENCE) -> dict:
    """Mean of ``a`` minus mean of ``b`` with its Welch's-t interval (None without one).

    Returns ``{"diff", "low", "high", "p", "n_a", "n_b"}``; ``low``/``high``/``p`` are None when a
    side has fewer than two values or both sides have no spread (the t statistic is undefined).
    """
    from scipy import stats

    a, b = [float(x) for x in a], [float(x) for x in b]
    out = {"diff": math.nan, "low": None, "high": None, "p": None, "n_a": len(a), "n_b": len(b)}
    if not a or not b:
        return out
    out["diff"] = statistics.mean(a) - statistics.mean(b)
    if len(a) < 2 or len(b) < 2:
        return out
    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        if out["diff"] != 0:  # no spread at all: the difference is exact
            out.update(low=out["diff"], high=out["diff"], p=0.0)
        return out
    result = stats.ttest_ind(a, b, equal_var=False)
    interval = result.confidence_interval(confidence)
    out.update(low=float(interval.low), high=float(interval.high), p=float(result.pvalue))
    return out


def reading(interval: dict, higher_is_better: bool) -> str:
    """'ahead' / 'behind' (of the first side) when the interval excludes 0, else 'level'."""
    if interval["low"] is None:
        return "level"
    if interval["low"] > 0:
        return "ahead" if higher_is_better else "behind"
    if interval["high"] < 0:
        return "behind" if higher_is_better else "ahead"
    return "level"


def interval_text(interval: dict, digits: int = 3) -> str:
    """``+0.012 [-0.020, +0.044]`` or ``+0.012 (no interval: one seed)``."""
    if math.isnan(interval["diff"]):
        return "n/a"
    diff = f"{interval['diff']:+.{digits}f}"
    if interval["low"] is None:
        return f"{diff} (no interval: fewer than 2 seeds a side)"
    return f"{diff} [{interval['low']:+.{digits}f}, {interval['high']:+.{digits}f}]"


# ---------------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class Aspect:
    """One comparison of the verdict: a per-run number and which way is better."""

    key: str  # row id
    label: str  # words in the verdict and table
    group: str  # "final AP", "convergence speed", "duplicates", "cost"
    value: Callable[[Run], float | None]
    higher_is_better: bool
    digits: int = 3


def _final(key: str) -> Callable[[Run], float | None]:
    return lambda run: run.value(key)


def _to_target(target: float, seconds: bool) -> Callable[[Run], float]:
    return lambda run: run.reach_censored(target)[1 if seconds else 0]


ASPECTS = (
    Aspect("AP50", "final AP50", "final AP", _final("AP50"), True),
    Aspect("AP50_agnostic", "final class-agnostic AP50", "final AP", _final("AP50_agnostic"),
           True),
    Aspect("AP", "final AP", "final AP", _final("AP"), True),
    *(Aspect(f"epochs_to_{t}", f"epochs to AP50 ≥ {t}", "convergence speed",
             _to_target(t, False), False, 1) for t in TARGETS),
    *(Aspect(f"seconds_to_{t}", f"seconds to AP50 ≥ {t}", "convergence speed",
             _to_target(t, True), False, 1) for t in TARGETS),
    Aspect("duplicate_rate", "duplicate rate", "duplicates", _final("duplicate_rate"), False, 2),
    Aspect("unclaimed_rate", "unclaimed rate", "duplicates", _final("unclaimed_rate"), False, 2),
    Aspect("epoch_seconds", "seconds per epoch", "cost", Run.median_epoch_seconds, False, 2),
)


def compare(first: list[Run], second: list[Run], aspects: Sequence[Aspect] = ASPECTS) -> list[dict]:
    """Each aspect of ``first`` vs ``second``: values, interval of the difference, reading."""
    rows = []
    for aspect in aspects:
        a = [v for v in map(aspect.value, first) if v is not None]
        b = [v for v in map(aspect.value, second) if v is not None]
        interval = welch_interval(a, b)
        rows.append({"aspect": aspect, "a": a, "b": b, "interval": interval,
                     "reading": reading(interval, aspect.higher_is_better) if a and b else "n/a"})
    return rows


def verdict(influencer: list[Run], hungarian: list[Run]) -> dict:
    """The study's verdict, generated from the numbers (nothing here is hand-written per run).

    Returns ``{"headline", "where", "rows"}``: ``headline`` names a winner only when the 95 %
    interval of the difference in final class-aware AP50 excludes 0 (else "level"), and adds
    the class-agnostic AP50 the same way; ``where`` lists what the Influencer Loss is ahead on,
    behind on and level on (final AP, convergence speed, duplicates, cost per epoch); ``rows``
    are ``compare``'s rows for the tables.
    """
    rows = compare(influencer, hungarian)
    by_key = {r["aspect"].key: r for r in rows}
    n_i, n_h = len(influencer), len(hungarian)

    def side(r: dict) -> str:
        a, b, d = r["a"], r["b"], r["aspect"].digits
        return (f"Influencer {mean_std(a, d)} vs Hungarian {mean_std(b, d)}, difference "
                f"{interval_text(r['interval'], d)}")

    ap50 = by_key["AP50"]
    if ap50["reading"] == "n/a":
        headline = "**No verdict:** a loss has no finished retrain."
    else:
        name = {"ahead": "**The Influencer Loss wins on final AP50**",
                "behind": "**The Hungarian baseline wins on final AP50**",
                "level": "**Level on final AP50**"}[ap50["reading"]]
        why = ("the 95 % interval of the difference excludes 0" if ap50["reading"] != "level"
               else "no interval: one seed a side" if ap50["interval"]["low"] is None
               else "the 95 % interval of the difference includes 0")
        headline = (f"{name} ({why}; Welch's t over {n_i} vs {n_h} seeds): {side(ap50)} "
                    f"(mean ± std; Influencer minus Hungarian [95 % interval]).")
        agnostic = by_key["AP50_agnostic"]
        if agnostic["reading"] == "n/a":
            headline += " Class-agnostic AP50: not reported by this build."
        else:
            word = {"ahead": "the Influencer Loss ahead", "behind": "the Hungarian baseline ahead",
                    "level": "level"}[agnostic["reading"]]
            headline += f" Class-agnostic AP50 (masks only): {word}, {side(agnostic)}."
    buckets: dict[str, list[str]] = {"ahead": [], "behind": [], "level": []}
    for r in rows:
        if r["reading"] in buckets:
            buckets[r["reading"]].append(f"{r['aspect'].label} ({side(r)})")
    parts = []
    for word in ("ahead", "behind", "level"):
        items = buckets[word]
        parts.append(f"{word} on {'; '.join(items)}" if items else f"{word} on nothing")
    where = ("Where the Influencer Loss stands against the Hungarian baseline, one aspect at a "
             "time (named only when the 95 % interval excludes 0): " + ". ".join(parts) + ".")
    return {"headline": headline, "where": where, "rows": rows}


def convergence_sentence(groups: dict[str, list[Run]], labels: dict[str, str]) -> str:
    """Epochs and seconds to AP50 0.5 / 0.7 of each variant, in words."""
    parts = []
    for variant, runs in groups.items():
        if not runs:
            continue
        items = []
        for target in TARGETS:
            reached = [r.reach(target) for r in runs]
            got = [x for x in reached if x]
            if got:
                items.append(f"AP50 ≥ {target} after {mean_std([x[0] for x in got], 1)} epochs / "
                             f"{mean_std([x[1] for x in got], 0)} s ({len(got)}/{len(runs)} "
                             "seeds)")
            else:
                items.append(f"AP50 ≥ {target} never reached (0/{len(runs)} seeds)")
        parts.append(f"{labels.get(variant, variant)}: " + ", ".join(items))
    return "; ".join(parts) + "."


# ----------------------------------------------------------------------------------- tables


def verdict_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        d = r["aspect"].digits
        body.append([r["aspect"].label, mean_std(r["a"], d), mean_std(r["b"], d),
                     interval_text(r["interval"], d),
                     "n/a" if r["interval"]["p"] is None else f"{r['interval']['p']:.3f}",
                     r["reading"]])
    return markdown_table(["aspect", "Influencer", "Hungarian",
                           "difference [95 % interval, Welch]", "p", "Influencer is"], body)


def _reach_cell(runs: list[Run], target: float, seconds: bool) -> str:
    got = [x for x in (r.reach(target) for r in runs) if x]
    if not got:
        return f"– (0/{len(runs)})"
    return f"{mean_std([x[1 if seconds else 0] for x in got], 0 if seconds else 1)} " \
           f"({len(got)}/{len(runs)})"


def variants_table(groups: dict[str, list[Run]], labels: dict[str, str]) -> str:
    rows = []
    for variant, runs in groups.items():
        if not runs:
            continue

        def col(key: str, digits: int = 3, runs: list[Run] = runs) -> str:
            return mean_std([r.value(key) for r in runs], digits)

        rows.append([labels.get(variant, variant), len(runs), col("AP50"), col("AP50_agnostic"),
                     col("AP"), col("AP25"), col("duplicate_rate", 2), col("unclaimed_rate", 2),
                     col("active_queries", 1),
                     *(_reach_cell(runs, t, s) for s in (False, True) for t in TARGETS),
                     mean_std([r.median_epoch_seconds() for r in runs], 2)])
    return markdown_table(
        ["variant", "seeds", "AP50", "AP50 agnostic", "AP", "AP25", "duplicate rate",
         "unclaimed rate", "active queries",
         *(f"epochs to AP50 ≥ {t}" for t in TARGETS),
         *(f"seconds to AP50 ≥ {t}" for t in TARGETS), "s / epoch"], rows)


def seeds_table(groups: dict[str, list[Run]], labels: dict[str, str]) -> str:
    rows = []
    for variant, runs in groups.items():
        for run in runs:
            def cell(key: str, digits: int = 3, run: Run = run) -> str:
                value = run.value(key)
                return "n/a" if value is None else f"{value:.{digits}f}"

            reached = run.reach(TARGETS[0])
            rows.append([labels.get(variant, variant), run.seed, run.epochs, cell("AP50"),
                         cell("AP50_agnostic"), cell("AP"), cell("duplicate_rate", 2),
                         cell("unclaimed_rate", 2),
                         f"epoch {reached[0]}, {reached[1]:.0f} s" if reached else "not reached",
                         f"{run.cumulative_seconds()[-1]:.0f}"])
    return markdown_table(["variant", "seed", "epochs", "AP50", "AP50 agnostic", "AP",
                           "duplicate rate", "unclaimed rate", f"AP50 ≥ {TARGETS[0]} at",
                           "train + val s"], rows)


def ablation_table(base: list[Run], flips: dict[str, list[Run]], labels: dict[str, str]) -> str:
    """One row per flip of the Influencer best config: AP50s, duplicates, unclaimed, vs best."""
    rows = []
    for variant, runs in {"influencer": base, **flips}.items():
        if not runs:
            continue
        vs = "(reference)"
        if variant != "influencer":
            vs = interval_text(welch_interval([r.value("AP50") for r in runs],
                                              [r.value("AP50") for r in base]))
        rows.append([labels.get(variant, variant), len(runs),
                     mean_std([r.value("AP50") for r in runs]),
                     mean_std([r.value("AP50_agnostic") for r in runs]),
                     mean_std([r.value("duplicate_rate") for r in runs], 2),
                     mean_std([r.value("unclaimed_rate") for r in runs], 2), vs])
    return markdown_table(["variant", "seeds", "AP50", "AP50 agnostic", "duplicate rate",
                           "unclaimed rate", "AP50 minus the best config's [95 % interval]"],
                          rows)


def _describe_param(spec) -> str:
    if spec.type == "choice":
        text = "choice: " + ", ".join(str(v) for v in spec.values)
    else:
        scale = "log " if spec.is_log else ""
        step = f" step {spec.step:g}" if spec.step else ""
        text = f"{spec.type} {scale}{spec.low:g} .. {spec.high:g}{step}".replace(
            "loguniform log", "loguniform")
    if spec.when:
        text += " (when " + ", ".join(f"{k} = {v}" for k, v in spec.when.items()) + ")"
    return text


def spaces_table(spaces: dict[str, Any]) -> str:
    """Every searched parameter per side, from the loaded study spaces (not hand-written)."""
    names = list(dict.fromkeys(k for space in spaces.values() for k in space.params))
    rows = []
    for name in names:
        cells = []
        for space in spaces.values():
            if name in space.params:
                cells.append(_describe_param(space.params[name]))
            else:
                cells.append("not searched")
        rows.append([f"`{name}`", *cells])
    return markdown_table(["parameter", *(f"{loss} space" for loss in spaces)], rows)


def rung_table(analyses: list[tuple[str, dict]]) -> str:
    """``ifsearch.search.report.rung_trust`` verdicts, one row per (population, rung)."""
    rows = []
    for label, result in analyses:
        for r in result["rungs"]:
            rho = "n/a" if math.isnan(r["spearman"]) else f"{r['spearman']:+.2f}"
            rows.append([label, result["rung_metric"], r["epoch"], r["reached"], r["complete"],
                         "n/a" if math.isnan(r["cutoff"]) else f"{r['cutoff']:.3f}", rho,
                         f"{r['top_stopped']} of {r['top']}",
                         {True: "yes", False: "no", None: "too few"}[result["trustworthy"]]])
        if not result["rungs"]:
            rows.append([label, result["rung_metric"], "–", "–", "–", "–", "–", "–",
                         result["summary"]])
    return markdown_table(["population", "rung metric", "rung epoch", "reached the rung",
                           "ran to the end", "ASHA cutoff", "Spearman (rung vs final AP50)",
                           "final top 5 the cutoff would stop", "trustworthy"], rows)


# ------------------------------------------------------------------------------------ plots


def plot_curves(groups: dict[str, list[Run]], labels: dict[str, str], path: Path,
                title: str) -> Path:
    """AP50 vs epoch and vs cumulative seconds, one line per seed, one colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agnostic = any(r.value("AP50_agnostic") is not None for runs in groups.values()
                   for r in runs)
    panels = 3 if agnostic else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    colours = plt.get_cmap("tab10")
    for index, (variant, runs) in enumerate(groups.items()):
        for i, run in enumerate(runs):
            epochs = [m["epoch"] for m in run.history]
            kwargs = {"color": colours(index % 10), "lw": 1.2, "alpha": 0.8,
                      "label": labels.get(variant, variant) if i == 0 else None}
            axes[0].plot(epochs, [m["AP50"] for m in run.history], **kwargs)
            axes[1].plot(run.cumulative_seconds(), [m["AP50"] for m in run.history], **kwargs)
            if agnostic:
                axes[2].plot(epochs, [m.get("AP50_agnostic", math.nan) for m in run.history],
                             **kwargs)
    for ax, xlabel, ylabel in zip(axes, ("epoch", "seconds (train + validation, cumulative)",
                                         "epoch"),
                                  ("val AP50", "val AP50", "val AP50, class-agnostic")):
        for target in TARGETS:
            ax.axhline(target, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title + " (one line per seed)", fontsize=10)
    return save_figure(fig, path)
