"""Search spaces as data: the searched parameters (``ParamSpec``) and the validated space
(``SearchSpace``) with its three views, plus the names a space file may use.

Built only by ``ifsearch.search.space.validation.load_search_space``, which checks a file as a
whole first. Three views of the same space serve the three consumers:

* ``SearchSpace.define_by_run`` - an Optuna define-by-run function for the Optuna searchers;
  the only view that supports conditional (``when``) parameters.
* ``SearchSpace.tune_param_space`` - Ray Tune distributions for searchers that use Tune's own
  spaces (random search); conditional parameters are left out and keep their base value.
* ``SearchSpace.resolve`` - one trial's sampled values -> a fully validated ``Config``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ifsearch.config import Config, config_from_dict, flatten_config
from ifsearch.errors import ConfigError

KNOWN_METRICS = (
    "AP",
    "AP50",
    "AP25",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AP_agnostic",
    "AP50_agnostic",
    "AP25_agnostic",
    "AP75_agnostic",
    "mCov",
    "mWCov",
    "mPrec",
    "mRec",
    "val_loss",
    "train_loss",
    "duplicate_rate",
    "unclaimed_rate",
    "active_queries",
    "epoch_seconds",
    "points_per_second",
)
TOP_LEVEL_KEYS = ("base", "space", "objective", "budget", "scheduler", "searcher")
PARAM_TYPES = ("uniform", "loguniform", "int", "choice")
PARAM_KEYS = ("type", "low", "high", "values", "step", "log", "when")
MODES = ("min", "max")
SCHEDULERS = ("asha", "hyperband", "median", "fifo")
SEARCHERS = ("tpe", "random", "cmaes", "nsga2")
OBJECTIVE_KEYS = ("metric", "mode")
# Metrics only some datasets report (ifsearch.evaluation): COCO has no class-aware AP25, only
# COCO has AP75/APs/APm/APl/AP75_agnostic, only S3DIS has the coverage metrics.
DATASET_METRICS = {
    "AP25": ("synthetic", "s3dis"),
    **{k: ("coco",) for k in ("AP75", "APs", "APm", "APl", "AP75_agnostic")},
    **{k: ("s3dis",) for k in ("mCov", "mWCov", "mPrec", "mRec")},
}
BUDGET_KEYS = ("num_samples", "max_epochs", "grace_period")
# Options that are passed on to the scheduler/searcher; anything else is a typo.
SCHEDULER_KEYS = ("name", "reduction_factor", "metric", "mode")
SEARCHER_KEYS = ("name", "seed", "n_startup_trials")
REDUCTION_SCHEDULERS = ("asha", "hyperband")  # the schedulers that take reduction_factor
RUNG_SCHEDULERS = ("asha", "hyperband", "median")  # the ones that compare trials on a metric

DEFAULT_OBJECTIVE = {"metric": "AP50", "mode": "max"}
DEFAULT_NUM_SAMPLES = 8
DEFAULT_MAX_EPOCHS = 8
DEFAULT_GRACE_PERIOD = 2
DEFAULT_SCHEDULER = {"name": "asha"}
DEFAULT_REDUCTION_FACTOR = 2
DEFAULT_SEARCHER = {"name": "tpe", "seed": 0}


@dataclass
class ParamSpec:
    """One searched parameter.

    Attributes:
        name: dotted config key, ``section.key`` (e.g. ``loss.margin``).
        type: ``uniform`` | ``loguniform`` | ``int`` | ``choice``.
        low: lower bound (inclusive) of numeric types.
        high: upper bound (inclusive) of numeric types.
        values: the options of a ``choice``.
        step: optional grid step of ``uniform``/``int`` (Optuna's ``step``: low, low+step, ...).
        log: sample on a log scale (``uniform``/``int``); ``loguniform`` implies it.
        when: condition ``{dotted key: value or [values]}``; the parameter is only sampled when
            every key has (one of) the value(s), otherwise it keeps its base value.
    """

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    values: list[Any] | None = None
    step: float | int | None = None
    log: bool = False
    when: dict[str, Any] | None = None

    @property
    def is_log(self) -> bool:
        """Whether the parameter is sampled log-uniformly."""
        return self.type == "loguniform" or bool(self.log)

    def condition_holds(self, values: dict[str, Any]) -> bool:
        """True when every ``when`` key has an allowed value in ``values`` (dotted keys)."""
        for key, allowed in (self.when or {}).items():
            options = allowed if isinstance(allowed, list) else [allowed]
            if key not in values or values[key] not in options:
                return False
        return True


@dataclass
class SearchSpace:
    """A validated search space; build it with ``load_search_space``.

    Attributes:
        path: the file it was loaded from (used in error messages).
        base: fixed config values as a nested ``{section: {key: value}}`` dict, overrides applied.
        params: searched parameters by dotted key, in file order.
        objective: ``{"metric": ..., "mode": "min" | "max"}``.
        budget: ``{"num_samples", "max_epochs", "grace_period"}``; ``max_epochs`` is every
            trial's ``train.epochs``.
        scheduler: ``{"name": ..., **options}``; asha/hyperband/median also get ``metric`` and
            ``mode``, what their rungs compare (default: the objective's).
        searcher: ``{"name": ..., **options}``.
    """

    path: str
    base: dict[str, Any]
    params: dict[str, ParamSpec]
    objective: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_OBJECTIVE))
    budget: dict[str, int] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCHEDULER))
    searcher: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SEARCHER))

    # ---------------------------------------------------------------------------------------

    def base_dict(self) -> dict[str, Any]:
        """The base values plus ``train.epochs = budget.max_epochs`` (a fresh copy)."""
        raw = copy.deepcopy(self.base)
        if "max_epochs" in self.budget:
            raw.setdefault("train", {})["epochs"] = self.budget["max_epochs"]
        return raw

    def resolve(self, sampled: dict[str, Any]) -> Config:
        """Build one trial's fully resolved, validated config.

        Args:
            sampled: values by dotted key (``trial.params`` or Ray's trial config). Keys that are
                not searched are allowed as long as they are config keys, so a warm-start point
                or a Ray config with extra constants resolves too.

        Raises:
            ConfigError: a key is not ``section.key`` or a value is invalid for its field.
        """
        raw = self.base_dict()
        errors = []
        for key, value in sampled.items():
            parts = key.split(".")
            if len(parts) != 2 or not all(parts):
                errors.append(f"{self.path}: sampled key {key!r}: expected 'section.key'")
                continue
            raw.setdefault(parts[0], {})
            if not isinstance(raw[parts[0]], dict):
                raw[parts[0]] = {}
            raw[parts[0]][parts[1]] = value
        if errors:
            raise ConfigError(problems_summary(errors))
        return config_from_dict(raw, source=f"{self.path} (resolved trial)")

    def ordered_params(self) -> list[ParamSpec]:
        """Params in dependency order: unconditional first, then each after what it tests."""
        return dependency_order(self.params)[0]

    def define_by_run(self, trial: Any) -> dict[str, Any] | None:
        """Optuna define-by-run function for Ray's ``OptunaSearch(space=...)``.

        Ray 2.60 calls it with (a wrapper of) an ``optuna.Trial``, records every
        ``trial.suggest_*`` call by its ``name`` as the trial's config, and merges a returned dict
        of constants on top; ``None`` means "no constants". It must not do any real work. Param
        names are the dotted keys; Ray only unflattens on ``/`` so they arrive unchanged.

        Conditional params are suggested only when their ``when`` holds for the values suggested
        so far or, for keys that are not searched, the base config; otherwise they are never
        suggested (so TPE does not learn from values that had no effect) and keep their base
        value in ``resolve``.

        Args:
            trial: an ``optuna.Trial`` (or Ray's suggest-capturing wrapper of one).

        Returns:
            None: there are no constants to add.
        """
        values = self._base_values()
        for spec in self.ordered_params():
            if not spec.condition_holds(values):
                continue
            if spec.type == "choice":
                value = trial.suggest_categorical(spec.name, list(spec.values or []))
            elif spec.type == "int":
                value = trial.suggest_int(
                    spec.name, int(spec.low), int(spec.high),
                    step=int(spec.step or 1), log=spec.is_log,
                )
            else:
                value = trial.suggest_float(
                    spec.name, float(spec.low), float(spec.high),
                    step=None if spec.step is None else float(spec.step), log=spec.is_log,
                )
            values[spec.name] = value
        return None

    def tune_param_space(self) -> dict[str, Any]:
        """The unconditional params as Ray Tune distributions, keyed by dotted key.

        For searchers that use Tune's own spaces (``random``/``BasicVariantGenerator``). Tune
        spaces cannot express ``when`` conditions, so conditional params are left out and keep
        their base value: use ``define_by_run`` (Optuna searchers) to search them. Bounds follow
        the file's inclusive ``high``: ``int`` becomes ``tune.randint(low, high + 1)`` (Tune's
        upper bound is exclusive); with a ``step`` > 1 it becomes ``tune.qrandint(low, high,
        step)``, whose grid is the multiples of ``step`` rather than Optuna's ``low + k*step``.
        """
        from ray import tune  # imported here: loading/validating a space must not need Ray

        space: dict[str, Any] = {}
        for spec in self.params.values():
            if spec.when:
                continue
            if spec.type == "choice":
                space[spec.name] = tune.choice(list(spec.values or []))
            elif spec.type == "int":
                low, high = int(spec.low), int(spec.high)
                step = int(spec.step or 1)
                if spec.is_log:
                    space[spec.name] = tune.lograndint(low, high + 1)
                elif step > 1:
                    space[spec.name] = tune.qrandint(low, high, step)
                else:
                    space[spec.name] = tune.randint(low, high + 1)
            elif spec.is_log:
                space[spec.name] = tune.loguniform(float(spec.low), float(spec.high))
            elif spec.step is not None:
                space[spec.name] = tune.quniform(float(spec.low), float(spec.high),
                                                 float(spec.step))
            else:
                space[spec.name] = tune.uniform(float(spec.low), float(spec.high))
        return space

    def point_from_config(self, config: Config) -> dict[str, Any]:
        """The searched keys' values in ``config``, for ``points_to_evaluate`` warm starts.

        Conditional params whose condition does not hold in ``config`` are left out, exactly as
        ``define_by_run`` would not suggest them. ``resolve(point_from_config(c))`` gives back
        ``c`` when ``c`` only differs from the base in searched keys.
        """
        flat = flatten_config(config)
        return {
            spec.name: flat[spec.name]
            for spec in self.params.values()
            if spec.condition_holds(flat)
        }

    def _base_values(self) -> dict[str, Any]:
        """Flat dotted-key values of the base config (defaults filled in)."""
        return flatten_config(config_from_dict(self.base_dict(), source=self.path))


# --------------------------------------------------------------------------------------------
# Shared with the validator


def dependency_order(params: dict[str, ParamSpec]) -> tuple[list[ParamSpec], set[str]]:
    """Params with no ``when`` first, then each after the searched params it tests.

    Returns the order and the names left in a cycle (empty when there is none); cyclic params
    are appended at the end so callers still see every param.
    """
    order: list[ParamSpec] = [p for p in params.values() if not p.when]
    placed = {p.name for p in order}
    pending = [p for p in params.values() if p.when]
    while pending:
        ready = [p for p in pending
                 if all(k in placed or k not in params for k in p.when or {})]
        if not ready:
            return order + pending, {p.name for p in pending}
        for p in ready:
            order.append(p)
            placed.add(p.name)
        pending = [p for p in pending if p.name not in placed]
    return order, set()


def problems_summary(errors: list[str]) -> str:
    lines = "\n".join(f"  - {e}" for e in errors)
    return f"invalid search space ({len(errors)} problem{'s' * (len(errors) > 1)}):\n{lines}"
