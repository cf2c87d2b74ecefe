"""Ray Tune trainables: one trial = ``train_driver_fn`` building a Ray Train ``TorchTrainer`` whose
workers run ``train_fn_per_worker`` around the plain ``ifsearch.train.train_loop``.

Layers, named as in Ray's own guide: ``train_fn_per_worker`` (each worker), ``train_driver_fn``
(one trial), and the ``Tuner`` (``ifsearch.launch``). Every call into Ray's report/checkpoint API
lives in ``trainables/ray_report.py`` so the next rename of that API touches one file.
"""

from trainables.driver import TrialSettings, train_driver_fn
from trainables.worker import train_fn_per_worker

__all__ = ["TrialSettings", "train_driver_fn", "train_fn_per_worker"]
