"""The torch backend of a trial's ``TorchTrainer``: Ray's ``TorchConfig``, timed, with no
process group for a group of one.

A single worker has nobody to talk to: ``train_loop`` already trains it like the plain loop (no
DDP, no all-reduce), so the gloo/NCCL rendezvous Ray would set up is pure start-up cost. Groups
of two or more get Ray's own set-up unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from trainables import startup


class _TrialTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        startup.CONTROLLER_MARKS["backend_start"] = startup.now()
        if len(worker_group) > 1:
            super().on_start(worker_group, backend_config)
        startup.CONTROLLER_MARKS["backend_ready"] = startup.now()


@dataclass
class TrialTorchConfig(TorchConfig):
    """``TorchConfig`` whose backend marks its set-up and skips it for one worker."""

    @property
    def backend_cls(self):
        return _TrialTorchBackend
