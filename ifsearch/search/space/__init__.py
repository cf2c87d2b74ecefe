"""Search-space files: which config keys a search varies, and how it is run.

A search space is a YAML file (see ``search_spaces/README.md``) with fixed training-config values
(``base``), searched parameters keyed by dotted config key (``space``), the metric to optimise
(``objective``), the trial budget (``budget``) and the Ray Tune scheduler and Optuna searcher.

``schema``: the space as data (``ParamSpec``, ``SearchSpace`` and its Optuna/Tune/Config views)
and the names a file may use; ``validation``: ``load_search_space``, which checks a whole file
before Ray starts. The two were one 794-line module; the public names stay importable from here.
"""

from ifsearch.search.space.schema import (
    KNOWN_METRICS,
    MODES,
    RUNG_SCHEDULERS,
    SCHEDULERS,
    SEARCHERS,
    ParamSpec,
    SearchSpace,
)
from ifsearch.search.space.validation import load_search_space, metric_problem

__all__ = ["KNOWN_METRICS", "MODES", "RUNG_SCHEDULERS", "SCHEDULERS", "SEARCHERS", "ParamSpec",
           "SearchSpace", "load_search_space", "metric_problem"]
