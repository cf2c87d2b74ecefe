"""The search service: a Ray Tune + Optuna sweep over a search space, logged to MLflow.

Modules, in the order a sweep uses them:

- ``cli``: ``python -m ifsearch.launch``'s options and checks (everything validated before Ray
  starts); imported by nothing but that entry module.
- ``plan``: the ``SweepPlan`` the CLI hands to the sweep, where a sweep's files and its MLflow
  server are; below both, so neither imports the other's module.
- ``space``: search-space YAML files (``schema``: parameters, budget, objective, scheduler,
  searcher; ``validation``: ``load_search_space``).
- ``resources``: what one trial reserves and whether the machine or cluster can hold it.
- ``searcher``: the Optuna searcher that tells Optuna the truth (PRUNED, FAIL, COMPLETE) and
  persists its study.
- ``sweep``: the Tuner: Ray start, scheduler, searcher, MLflow callback, the run and its end.
- ``console``: what the terminal shows while a sweep runs.
- ``report``: the sweep's figures (importances, rung agreement, efficiency).
- ``export``: ``best_config.yaml`` from a sweep or from MLflow (``python -m ifsearch.export``).

The single-run library (``ifsearch.config``, ``train``, ``data``, ``models``, ``losses``,
``metrics``, ``inference``, ``evaluation``) never imports this package.
"""
