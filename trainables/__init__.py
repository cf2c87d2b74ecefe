"""Ray Tune trainables: one trial = ``train_driver_fn`` building a Ray Train ``TorchTrainer`` whose
workers run ``train_fn_per_worker`` around the plain ``ifsearch.train.train_loop``.

Layers, named as in Ray's own guide: ``train_fn_per_worker`` (each worker), ``train_driver_fn``
(one trial), and the ``Tuner`` (``ifsearch.search.sweep``). Every call into Ray's
report/checkpoint API lives in ``trainables/ray_report.py`` so the next rename of that API touches
one file. A trial's driver keeps its Train workers for its next trial
(``trainables/worker_pool.py``).

The names are imported on first use (PEP 562): every Ray process that unpickles something from
this package (the trial driver unpickles ``train_driver_fn``, and runs the Train controller with
its callbacks) imports ``trainables`` first, and only the worker needs the training loop
(torch, the model), so the package itself imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainables.driver import TrialSettings, train_driver_fn
    from trainables.worker import train_fn_per_worker

__all__ = ["TrialSettings", "train_driver_fn", "train_fn_per_worker"]
_HOME = {"TrialSettings": "trainables.driver", "train_driver_fn": "trainables.driver",
         "train_fn_per_worker": "trainables.worker"}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'trainables' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
