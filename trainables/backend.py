"""The torch backend of a trial's ``TorchTrainer``: Ray's own, minus two start-up costs.

1. The Train controller unpickles the backend config it is given, and Ray's ``TorchConfig``
   lives in a module that imports torch: every trial's controller paid a torch import (~1.9 s of
   CPU on the 2-core benchmark machine) on the start-up path, although it never runs torch.
   ``TrialTorchConfig`` has ``TorchConfig``'s fields and hands the work to Ray's torch backend,
   imported where that work runs: the workers' context manager in the workers, the process
   group set-up in the controller only for groups of two or more.
2. A single worker has nobody to talk to: ``train_loop`` trains a group of one like the plain
   loop (no DDP, no all-reduce), so Ray's gloo/NCCL rendezvous would be pure start-up cost.

Both ends mark their time for ``trainables/startup.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework

from trainables import startup


@dataclass
class TrialTorchConfig(BackendConfig):
    """``ray.train.torch.TorchConfig``'s fields and behaviour, without importing torch here.

    Attributes:
        backend: the torch.distributed backend; ``TorchTrainer`` picks nccl (GPU) or gloo.
        init_method: "env" or "tcp", as in ``TorchConfig``.
        timeout_s: seconds for process-group operations.
    """

    backend: str | None = None
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _TrialTorchBackend

    @property
    def train_func_context(self):
        """Ray's: pins each worker to its CUDA device (evaluated where the trainer is built)."""
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": self.init_method,
                "timeout_s": self.timeout_s}

    def torch_config(self):
        """The equivalent ``TorchConfig``, for Ray's torch backend (imports torch)."""
        from ray.train.torch import TorchConfig

        return TorchConfig(**self.to_dict())


class _TrialTorchBackend(Backend):
    # As Ray's _TorchBackend: workers of a node see each other's GPUs (NCCL needs it).
    share_cuda_visible_devices = True

    def on_start(self, worker_group, backend_config: TrialTorchConfig) -> None:
        startup.CONTROLLER_MARKS["backend_start"] = startup.now()
        if len(worker_group) > 1:
            from ray.train.torch.config import _TorchBackend

            _TorchBackend().on_start(worker_group, backend_config.torch_config())
        startup.CONTROLLER_MARKS["backend_ready"] = startup.now()

    def on_shutdown(self, worker_group, backend_config: TrialTorchConfig) -> None:
        # A group of one has no process group to destroy.
        if len(worker_group) > 1:
            from ray.train.torch.config import _TorchBackend

            _TorchBackend().on_shutdown(worker_group, backend_config.torch_config())
