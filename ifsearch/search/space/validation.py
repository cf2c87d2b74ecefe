"""Loading a search-space file: every problem of the file found at once, before Ray starts.

A typo in a key or an impossible range would otherwise surface minutes later inside a worker,
once per trial. ``load_search_space`` reports all problems together in one ``ConfigError``, each
naming the file, the key, the value and the fix, so one edit fixes the file. The format is
``search_spaces/README.md``; the result is a ``schema.SearchSpace``.

Why ~530 lines: one method per part of that format (base, space, each parameter, conditions,
objective, budget, scheduler, searcher), each rule beside its message and fix; pydantic could
not keep those messages (README "Layout").
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any

from ifsearch.config import Config, apply_overrides, config_from_dict, read_yaml_mapping
from ifsearch.errors import ConfigError
from ifsearch.search.space.schema import (
    BUDGET_KEYS,
    DATASET_METRICS,
    DEFAULT_GRACE_PERIOD,
    DEFAULT_MAX_EPOCHS,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_OBJECTIVE,
    DEFAULT_REDUCTION_FACTOR,
    DEFAULT_SCHEDULER,
    DEFAULT_SEARCHER,
    KNOWN_METRICS,
    MODES,
    OBJECTIVE_KEYS,
    PARAM_KEYS,
    PARAM_TYPES,
    REDUCTION_SCHEDULERS,
    RUNG_SCHEDULERS,
    SCHEDULER_KEYS,
    SCHEDULERS,
    SEARCHER_KEYS,
    SEARCHERS,
    TOP_LEVEL_KEYS,
    ParamSpec,
    SearchSpace,
    dependency_order,
    problems_summary,
)

_SENTINEL = "\x00source"  # stands in for the source in config_from_dict messages we re-word


def load_search_space(path: str | Path, overrides: list[str] | None = None) -> SearchSpace:
    """Load and validate a search-space YAML file.

    Args:
        path: the YAML file.
        overrides: ``section.key=value`` strings applied to ``base`` (values parsed as YAML). An
            override of a searched key pins it: the key is removed from ``space``, so a search
            can be narrowed from the command line without editing the file.

    Returns:
        The validated ``SearchSpace``.

    Raises:
        ConfigError: listing every problem at once, each with file, key, value and fix.
    """
    raw = read_yaml_mapping(path, "search space file", f"with keys {list(TOP_LEVEL_KEYS)}")
    return _Validator(str(path), raw, overrides or []).run()


class _Validator:
    """Collects every problem of one file; ``run`` raises them together or returns the space."""

    def __init__(self, src: str, raw: dict, overrides: list[str]) -> None:
        self.src = src
        self.raw = raw
        self.overrides = overrides
        self.errors: list[str] = []
        self.fields = _config_fields()

    def err(self, where: str, text: str) -> None:
        self.errors.append(f"{self.src}: {where}: {text}")

    def run(self) -> SearchSpace:
        for key in self.raw:
            if key not in TOP_LEVEL_KEYS:
                self.err(str(key), f"unknown top-level key{_did_you_mean(key, TOP_LEVEL_KEYS)}; "
                         f"valid keys: {list(TOP_LEVEL_KEYS)}")
        base = self.check_base(self.raw.get("base"))
        params = self.check_space(self.raw.get("space"))
        pinned = self.apply_overrides(base, params)
        for key in list(params):
            if key in pinned:
                del params[key]  # an override pins a searched key
        objective = self.check_objective(self.raw.get("objective"))
        dataset = (base.get("data") or {}).get("name", "synthetic")
        if dataset not in DATASET_METRICS.get(objective["metric"], (dataset,)):
            self.err("objective.metric", f"{objective['metric']!r} is not reported for "
                     f"data.name = {dataset!r}, only for "
                     f"{list(DATASET_METRICS[objective['metric']])}")
        budget = self.check_budget(self.raw.get("budget"), base)
        scheduler = self.check_named("scheduler", self.raw.get("scheduler"), DEFAULT_SCHEDULER,
                                     SCHEDULERS, SCHEDULER_KEYS)
        searcher = self.check_named("searcher", self.raw.get("searcher"), DEFAULT_SEARCHER,
                                    SEARCHERS, SEARCHER_KEYS)
        self.check_scheduler_options(scheduler, budget)
        self.check_rung_metric(scheduler, objective, dataset)
        self.check_searcher_options(searcher)
        for key in params:
            section, name = key.split(".")
            if name in (base.get(section) or {}):
                self.err(f"space.{key}", f"is also fixed in base.{key} = {base[section][name]!r}; "
                         "a key is either fixed or searched: remove one of them")
        self.check_conditions(params, base)
        space = SearchSpace(self.src, base, params, objective, budget, scheduler, searcher)
        if not self.errors:
            self.check_values(space)
        if self.errors:
            raise ConfigError(problems_summary(self.errors))
        return space

    # -- base and overrides -------------------------------------------------------------------

    def check_base(self, raw: Any) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.err("base", f"must be a mapping of config sections, got {raw!r}; "
                     f"e.g. base: {{train: {{lr: 0.001}}}}")
            return {}
        base: dict[str, Any] = {}
        for section, values in raw.items():
            if section not in self.fields:
                self.err(f"base.{section}", f"unknown config section"
                         f"{_did_you_mean(section, self.fields)}; valid sections: "
                         f"{sorted(self.fields)}")
                continue
            if values is None:
                continue
            if not isinstance(values, dict):
                self.err(f"base.{section}", f"must be a mapping of keys, got {values!r}")
                continue
            base[section] = {}
            for key, value in values.items():
                if key not in self.fields[section]:
                    self.err(f"base.{section}.{key}", _unknown_key(section, key, self.fields))
                    continue
                base[section][key] = value
        return base

    def apply_overrides(self, base: dict, params: dict[str, ParamSpec]) -> set[str]:
        """Apply overrides to ``base`` in place; return the dotted keys they set."""
        pinned: set[str] = set()
        for item in self.overrides:
            try:
                merged = apply_overrides(base, [item])
            except ConfigError as exc:
                self.errors.append(f"{self.src}: {exc}")
                continue
            key = item.partition("=")[0].strip()
            section, name = key.split(".")
            if section not in self.fields or name not in self.fields[section]:
                self.err(f"--set {item!r}", _unknown_key(section, name, self.fields))
                continue
            base.clear()
            base.update(merged)
            pinned.add(key)
        return pinned & set(params)

    # -- space ---------------------------------------------------------------------------------

    def check_space(self, raw: Any) -> dict[str, ParamSpec]:
        if raw is None:
            self.err("space", "missing; a search space needs at least one searched parameter, "
                     "e.g. space: {loss.margin: {type: uniform, low: 0.5, high: 2.0}}")
            return {}
        if not isinstance(raw, dict) or not raw:
            self.err("space", f"must be a non-empty mapping of 'section.key' to a distribution, "
                     f"got {raw!r}")
            return {}
        params: dict[str, ParamSpec] = {}
        for key, spec in raw.items():
            parsed = self.check_param(str(key), spec)
            if parsed is not None:
                params[parsed.name] = parsed
        return params

    def check_param(self, key: str, spec: Any) -> ParamSpec | None:
        where = f"space.{key}"
        parts = key.split(".")
        if len(parts) != 2 or not all(parts):
            self.err(where, "a searched key must be a dotted config key 'section.key', e.g. "
                     f"loss.margin; sections: {sorted(self.fields)}")
            return None
        section, name = parts
        if section not in self.fields or name not in self.fields[section]:
            self.err(where, _unknown_key(section, name, self.fields))
            return None
        if not isinstance(spec, dict):
            self.err(where, f"must be a mapping like {{type: uniform, low: 0.5, high: 2.0}}, "
                     f"got {spec!r}")
            return None
        n_errors = len(self.errors)
        for k in spec:
            if k not in PARAM_KEYS:
                self.err(where, f"unknown option {k!r}{_did_you_mean(str(k), PARAM_KEYS)}; "
                         f"valid options: {list(PARAM_KEYS)}")
        ptype = spec.get("type")
        if ptype not in PARAM_TYPES:
            self.err(where, f"type {ptype!r} is not a known distribution"
                     f"{_did_you_mean(str(ptype), PARAM_TYPES)}; valid types: "
                     f"{list(PARAM_TYPES)}")
            return None
        annotation = self.fields[section][name]
        p = ParamSpec(key, ptype, spec.get("low"), spec.get("high"), spec.get("values"),
                      spec.get("step"), spec.get("log", False), spec.get("when"))
        if not isinstance(p.log, bool):
            self.err(where, f"log ({p.log!r}) must be true or false")
        if ptype == "choice":
            self.check_choice(where, p)
        else:
            self.check_numeric(where, p, annotation)
        if p.when is not None and (not isinstance(p.when, dict) or not p.when):
            self.err(where, f"when ({p.when!r}) must be a mapping of dotted config keys to a "
                     "value or a list of values, e.g. when: {loss.name: influencer}")
            p.when = None
        return p if len(self.errors) == n_errors else None

    def check_choice(self, where: str, p: ParamSpec) -> None:
        for k in ("low", "high", "step"):
            if getattr(p, k) is not None:
                self.err(where, f"{k} is not used by type choice; list the options in values")
        if p.log:
            self.err(where, "log is not used by type choice; remove it")
        if not isinstance(p.values, list) or not p.values:
            self.err(where, f"values ({p.values!r}) must be a non-empty list of options, e.g. "
                     "values: [sigmoid, softmax]")
            return
        for v in p.values:
            if v is not None and not isinstance(v, (bool, int, float, str)):
                self.err(where, f"choice value {v!r} must be a scalar (string, number, bool); "
                         "Optuna cannot suggest lists or mappings")
        scalars = [v for v in p.values if not isinstance(v, (list, dict))]
        if len(set(map(repr, scalars))) != len(scalars):
            self.err(where, f"values {p.values!r} has duplicates; list each option once")

    def check_numeric(self, where: str, p: ParamSpec, annotation: Any) -> None:
        if p.values is not None:
            self.err(where, f"values is only used by type choice, not {p.type}; use low/high")
        allowed = {int: ("int",), float: ("uniform", "loguniform", "int")}.get(annotation, ())
        if p.type not in allowed:
            hint = (f"use {' or '.join(allowed)} or choice" if allowed
                    else "this key only takes a choice")
            self.err(where, f"type {p.type} does not fit the config field "
                     f"({getattr(annotation, '__name__', annotation)}); {hint}")
            return
        ok = True
        for k in ("low", "high"):
            v = getattr(p, k)
            if v is None:
                self.err(where, f"missing {k}; type {p.type} needs low and high")
                ok = False
            elif p.type == "int" and (isinstance(v, bool) or not isinstance(v, int)):
                self.err(where, f"{k} ({v!r}) must be an integer for type int")
                ok = False
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                self.err(where, f"{k} ({v!r}) must be a finite number")
                ok = False
        if ok and p.low >= p.high:
            self.err(where, f"low ({p.low!r}) must be < high ({p.high!r}); swap them, or fix "
                     "the key in base if it should not be searched")
        if ok and p.is_log and p.low <= 0:
            self.err(where, f"low ({p.low!r}) must be > 0 for a log scale ({p.type}"
                     f"{', log: true' if p.log else ''}); use a positive low or type uniform")
        if p.step is not None:
            if p.type == "int" and (isinstance(p.step, bool) or not isinstance(p.step, int)):
                self.err(where, f"step ({p.step!r}) must be an integer for type int")
            elif isinstance(p.step, bool) or not isinstance(p.step, (int, float)) or p.step <= 0:
                self.err(where, f"step ({p.step!r}) must be a positive number")
            elif p.is_log:
                self.err(where, f"step ({p.step!r}) cannot be combined with a log scale "
                         "(Optuna rejects it); remove step or the log scale")

    def check_conditions(self, params: dict[str, ParamSpec], base: dict) -> None:
        """``when`` keys must be config keys; searched ones must be choices with those values."""
        for spec in params.values():
            for key, allowed in (spec.when or {}).items():
                where = f"space.{spec.name}.when.{key}"
                parts = str(key).split(".")
                if len(parts) != 2 or parts[0] not in self.fields \
                        or parts[1] not in self.fields[parts[0]]:
                    self.err(where, "condition on an unknown config key; "
                             + _unknown_key(parts[0], parts[-1], self.fields))
                    continue
                if key == spec.name:
                    self.err(where, "a parameter cannot be conditional on itself")
                    continue
                options = allowed if isinstance(allowed, list) else [allowed]
                other = params.get(key)
                if other is not None and other.type != "choice":
                    self.err(where, f"tests {key}, a {other.type} parameter; conditions can only "
                             "test choice parameters or fixed keys (floats never compare equal)")
                elif other is not None:
                    bad = [v for v in options if v not in other.values]
                    if bad:
                        self.err(where, f"value(s) {bad!r} can never hold: space.{key} only "
                                 f"takes {other.values!r}")
        _, cycle = dependency_order(params)
        if cycle:
            self.err("space", f"conditions form a cycle between {sorted(cycle)}; a parameter's "
                     "when may only test parameters that do not (indirectly) test it")

    # -- objective, budget, scheduler, searcher ----------------------------------------------

    def check_objective(self, raw: Any) -> dict[str, Any]:
        objective = dict(DEFAULT_OBJECTIVE)
        if raw is None:
            return objective
        if not isinstance(raw, dict):
            self.err("objective", f"must be a mapping like {{metric: AP50, mode: max}}, "
                     f"got {raw!r}")
            return objective
        for k in raw:
            if k not in OBJECTIVE_KEYS:
                self.err(f"objective.{k}", f"unknown key; valid keys: {list(OBJECTIVE_KEYS)}")
        objective.update({k: v for k, v in raw.items() if k in OBJECTIVE_KEYS})
        if objective["metric"] not in KNOWN_METRICS:
            self.err("objective.metric", f"{objective['metric']!r} is not a reported metric"
                     f"{_did_you_mean(str(objective['metric']), KNOWN_METRICS)}; known metrics: "
                     f"{list(KNOWN_METRICS)}")
        if objective["mode"] not in MODES:
            self.err("objective.mode", f"{objective['mode']!r} must be one of {list(MODES)} "
                     "(max for AP, min for losses and rates)")
        return objective

    def check_budget(self, raw: Any, base: dict) -> dict[str, int]:
        base_epochs = (base.get("train") or {}).get("epochs")
        budget = {"num_samples": DEFAULT_NUM_SAMPLES,
                  "max_epochs": base_epochs if base_epochs is not None else DEFAULT_MAX_EPOCHS}
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.err("budget", f"must be a mapping like {{num_samples: 8, max_epochs: 8, "
                     f"grace_period: 2}}, got {raw!r}")
            raw = {}
        for k in raw:
            if k not in BUDGET_KEYS:
                self.err(f"budget.{k}", f"unknown key{_did_you_mean(str(k), BUDGET_KEYS)}; "
                         f"valid keys: {list(BUDGET_KEYS)}")
        budget.update({k: v for k, v in raw.items() if k in BUDGET_KEYS})
        budget.setdefault("grace_period", min(DEFAULT_GRACE_PERIOD, budget["max_epochs"])
                          if _positive_int(budget["max_epochs"]) else DEFAULT_GRACE_PERIOD)
        for k in BUDGET_KEYS:
            if not _positive_int(budget[k]):
                self.err(f"budget.{k}", f"{budget[k]!r} must be a positive integer")
        if _positive_int(budget["grace_period"]) and _positive_int(budget["max_epochs"]) \
                and budget["grace_period"] > budget["max_epochs"]:
            self.err("budget.grace_period", f"{budget['grace_period']!r} must be <= "
                     f"budget.max_epochs ({budget['max_epochs']!r}): a trial cannot be judged "
                     "after more epochs than it runs")
        if "max_epochs" in raw and base_epochs is not None and base_epochs != raw["max_epochs"]:
            self.err("base.train.epochs", f"{base_epochs!r} disagrees with budget.max_epochs "
                     f"({raw['max_epochs']!r}), which sets train.epochs; remove one of them")
        return budget

    def check_named(self, section: str, raw: Any, default: dict, names: tuple,
                    keys: tuple) -> dict[str, Any]:
        out = dict(default)
        if raw is None:
            return out
        if not isinstance(raw, dict):
            self.err(section, f"must be a mapping like {{name: {names[0]}}}, got {raw!r}")
            return out
        for k in raw:
            if k not in keys:
                self.err(f"{section}.{k}", f"unknown option{_did_you_mean(str(k), keys)}; "
                         f"valid options: {list(keys)}")
        if "name" in raw and raw["name"] != default["name"]:
            out = {"name": raw["name"]}  # drop defaults that belong to the default choice
        out.update({k: v for k, v in raw.items() if k in keys})
        if out["name"] not in names:
            self.err(f"{section}.name", f"{out['name']!r} is not a known {section}"
                     f"{_did_you_mean(str(out['name']), names)}; valid names: {list(names)}")
        return out

    def check_scheduler_options(self, scheduler: dict, budget: dict) -> None:
        name = scheduler.get("name")
        if name in REDUCTION_SCHEDULERS:
            scheduler.setdefault("reduction_factor", DEFAULT_REDUCTION_FACTOR)
            rf = scheduler["reduction_factor"]
            if isinstance(rf, bool) or not isinstance(rf, (int, float)) or rf < 2:
                self.err("scheduler.reduction_factor", f"{rf!r} must be a number >= 2 (the "
                         "fraction of trials kept at each rung is 1/reduction_factor)")
        elif "reduction_factor" in scheduler:
            self.err("scheduler.reduction_factor", f"is not used by scheduler {name!r}; only "
                     f"{list(REDUCTION_SCHEDULERS)} take it: remove it")

    def check_rung_metric(self, scheduler: dict, objective: dict, dataset: str) -> None:
        """``scheduler.metric``/``mode``: what the rungs compare; default: the objective."""
        name = scheduler.get("name")
        if name not in RUNG_SCHEDULERS:
            for k in ("metric", "mode"):
                if k in scheduler:
                    self.err(f"scheduler.{k}", f"is not used by scheduler {name!r}, which stops "
                             "no trial early: remove it")
            return
        if "metric" not in scheduler:
            if "mode" in scheduler:
                self.err("scheduler.mode", f"{scheduler['mode']!r} without scheduler.metric: "
                         f"the rungs compare the objective ({objective['metric']}, mode "
                         f"{objective['mode']}); remove it, or add the metric it is meant for")
            scheduler["metric"], scheduler["mode"] = objective["metric"], objective["mode"]
            return
        metric = scheduler["metric"]
        problem = metric_problem(metric, dataset)
        if problem:
            self.err("scheduler.metric", f"{problem}; or remove it to compare trials on the "
                     "objective")
        if "mode" not in scheduler:
            if metric == objective["metric"]:
                scheduler["mode"] = objective["mode"]
            else:
                self.err("scheduler.mode", f"missing: say whether a lower or a higher {metric} "
                         f"is better, e.g. scheduler: {{metric: {metric}, mode: min}}")
        elif scheduler["mode"] not in MODES:
            self.err("scheduler.mode", f"{scheduler['mode']!r} must be one of {list(MODES)} "
                     "(max for AP, min for losses and rates)")

    def check_searcher_options(self, searcher: dict) -> None:
        for k in ("seed", "n_startup_trials"):
            if k in searcher and not (_positive_int(searcher[k]) or searcher[k] == 0):
                self.err(f"searcher.{k}", f"{searcher[k]!r} must be an integer >= 0")
        if "n_startup_trials" in searcher and searcher.get("name") != "tpe":
            self.err("searcher.n_startup_trials", "is only used by searcher 'tpe'; remove it")

    # -- values against the config ------------------------------------------------------------

    def check_values(self, space: SearchSpace) -> None:
        """Build a config for each boundary/choice value; report what the config rejects.

        Only ``low``/``high`` and each option are tried (not every interior value); the range
        checks above cover the rest for monotone rules such as ``>= 0``.
        """
        base_raw = space.base_dict()
        try:
            config_from_dict(base_raw, source=_SENTINEL)
        except ConfigError as exc:
            for line in _problems(exc):
                self.err("base", line)
            return
        seen: set[tuple[str, str]] = set()
        for spec in space.params.values():
            candidates = spec.values if spec.type == "choice" else [spec.low, spec.high]
            for value in candidates:
                raw = copy.deepcopy(base_raw)
                for key, allowed in (spec.when or {}).items():  # test it where it is used
                    s, n = key.split(".")
                    raw.setdefault(s, {})[n] = allowed[0] if isinstance(allowed, list) else allowed
                s, n = spec.name.split(".")
                raw.setdefault(s, {})[n] = value
                try:
                    config_from_dict(raw, source=_SENTINEL)
                except ConfigError as exc:
                    for line in _problems(exc):
                        text = (f"value {value!r} is invalid for the config: {line}; change the "
                                "range/options to valid values")
                        if (spec.name, text) not in seen:
                            seen.add((spec.name, text))
                            self.err(f"space.{spec.name}", text)


# --------------------------------------------------------------------------------------------
# Helpers


def metric_problem(metric: Any, dataset: str) -> str | None:
    """Why ``metric`` cannot rank trials on ``dataset`` (unknown, or not reported there)."""
    if not isinstance(metric, str) or metric not in KNOWN_METRICS:
        return (f"{metric!r} is not a reported metric{_did_you_mean(str(metric), KNOWN_METRICS)}"
                f"; known metrics: {list(KNOWN_METRICS)}")
    if dataset not in DATASET_METRICS.get(metric, (dataset,)):
        return (f"{metric!r} is not reported for data.name = {dataset!r}, only for "
                f"{list(DATASET_METRICS[metric])}")
    return None


def _config_fields() -> dict[str, dict[str, Any]]:
    """``{section: {key: type annotation}}`` of ``Config``, the source of valid keys."""
    out: dict[str, dict[str, Any]] = {}
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(cls)
        out[section.name] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return out


def _unknown_key(section: str, key: str, fields: dict[str, dict[str, Any]]) -> str:
    if section not in fields:
        return (f"unknown config section {section!r}{_did_you_mean(section, fields)}; valid "
                f"sections: {sorted(fields)}")
    valid = sorted(fields[section])
    return (f"unknown config key {section}.{key}{_did_you_mean(key, valid, section + '.')}; "
            f"valid keys of {section}: {valid}")


def _did_you_mean(word: str, options: Any, prefix: str = "") -> str:
    names = [str(o) for o in options]
    close = difflib.get_close_matches(str(word), names, n=1)
    if not close:  # abbreviations and extensions: "lrate" -> "lr", "temp" -> "temperature"
        close = [n for n in names if len(n) >= 2 and (str(word).startswith(n)
                                                       or n.startswith(str(word)))][:1]
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _problems(exc: ConfigError) -> list[str]:
    """The individual problems of a ``config_from_dict`` error, without our sentinel source."""
    lines = [ln[4:] if ln.startswith("  - ") else ln for ln in str(exc).splitlines()[1:]]
    if not lines:
        lines = [str(exc)]
    return [ln.replace(f"{_SENTINEL}: ", "").replace(_SENTINEL, "") for ln in lines]
