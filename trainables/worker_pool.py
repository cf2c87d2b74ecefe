"""Train workers kept from one trial to the next of the same trial driver.

A Ray Train worker is a Ray actor, and Ray gives every actor a process of its own, new: ~0.9 s
to start it and ~1.5 s more to import torch and the training loop, on the start-up path of every
trial (docs/benchmarks.md, "Trial start-up"). Ray's ways to have processes ready do not reach
actors: neither its prestarted idle workers nor ``preload_python_modules`` (measured on Ray
2.60: an actor always got a fresh process). But Tune reuses a finished trial's driver for the
next trial (``reuse_actors``), and Ray Train sets a worker up anew for each run
(``RayTrainWorker.init_train_context``: context, result queue, training thread). So a driver
keeps its last run's workers and their placement group when the run ends (``KeptWorkerGroup``),
and its next run starts on them: only the processes and their imports carry over from trial to
trial, each run still gets its own train context, synchronisation actor and checkpoints.

A run that ends early (the scheduler stopped its trial) leaves its training thread running: the
kept workers are told to stop it (``RUN_STOP``, checked by ``train_loop`` at every step), and the
next run waits for that before it starts them. Workers that do not settle in time, or died,
are killed and their placement group removed; the next run then starts new ones, as Ray would.
A driver keeps one group: a run needing other workers (count, resources, runtime env) replaces
it. When the driver ends (Tune ends a trial actor it no longer needs with ``__ray_terminate__``,
which runs ``atexit`` handlers) its kept group is released.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.train.v2._internal.execution.context import get_train_context
from ray.train.v2._internal.execution.worker_group import Worker
from ray.train.v2._internal.execution.worker_group.placement_group_handle import (
    PlacementGroupHandle,
)
from ray.train.v2._internal.util import invoke_context_managers

from trainables import ray_report
from trainables.ray_report import TrialWorkerGroup

logger = logging.getLogger(__name__)

# Set in a kept worker when its run has been abandoned: the training loop returns at its next
# step and nothing more is reported (nobody would take it). Cleared when the worker's next run
# starts (``trainables.worker.train_fn_per_worker``).
RUN_STOP = threading.Event()

# How long a kept worker may take to end an abandoned run's training thread (one training step,
# or a report waiting on the killed synchronisation actor) before the workers are replaced.
SETTLE_S = 30.0


def settle_worker(wait_s: float) -> bool:
    """On a kept worker (``Worker.execute_async``): end the last run's training, if it still
    goes on, and tear down what ties the process to that run. True once nothing of it runs."""
    RUN_STOP.set()
    execution = get_train_context().execution_context
    deadline = time.monotonic() + wait_s
    while execution.training_thread_runner.is_running():
        # A report waiting for room in the result queue (nobody polls it now) is let go.
        with contextlib.suppress(queue.Empty):
            while True:
                execution.result_queue.get_nowait()
                execution.result_queue.task_done()
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    if "torch" in sys.modules:  # a group of two or more: its process group is the run's
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return True


@dataclass
class KeptGroup:
    """A worker group kept between two runs: its placement group and workers (ranks set by the
    next run), the requirements it meets, and the pending ``settle_worker`` calls."""

    requirements: str
    placement_group_handle: PlacementGroupHandle
    workers: list[Worker]
    settled: list

    def release(self) -> None:
        """Kill the workers and remove their placement group (what Ray's shutdown does)."""
        for worker in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(worker.actor)
        with contextlib.suppress(Exception):
            self.placement_group_handle.shutdown()


_KEPT: KeptGroup | None = None
_LOCK = threading.Lock()
# Kept groups are noted in Ray's key-value store under this prefix and the keeping process's
# worker id: Tune ends the drivers it still holds at the end of a sweep with ray.kill (no exit
# handler runs), and the sweep then frees what they kept (free_kept_workers).
_KEY_PREFIX = "kept_workers:"


def _key() -> str:
    return _KEY_PREFIX + ray.get_runtime_context().get_worker_id()


def keep(group: KeptGroup) -> None:
    """Keep ``group`` for this process's next run (releasing one kept before)."""
    global _KEPT
    with _LOCK:
        previous, _KEPT = _KEPT, group
    if previous is not None:
        previous.release()
    ray_report.remember_placement_group(_key(), group.placement_group_handle.placement_group)


def take(requirements: str) -> KeptGroup | None:
    """The kept group, settled, if it meets ``requirements``; else None (and it is released)."""
    global _KEPT
    with _LOCK:
        group, _KEPT = _KEPT, None
    if group is None:
        return None
    ray_report.forget_placement_group(_key())
    if group.requirements != requirements:
        group.release()
        return None
    try:
        settled = ray.get(group.settled, timeout=SETTLE_S + 5)
    except (RayActorError, GetTimeoutError) as error:
        logger.warning("Kept Train workers are gone or stuck (%s): starting new ones",
                       type(error).__name__)
        settled = [False]
    if not all(settled):
        group.release()
        return None
    return group


def release() -> None:
    """Release the kept group, if any: the driver is ending."""
    global _KEPT
    with _LOCK:
        group, _KEPT = _KEPT, None
    if group is not None and ray.is_initialized():
        group.release()
        ray_report.forget_placement_group(_key())


def free_kept_workers() -> int:
    """Remove the placement groups (and so the workers) that trial drivers still keep; call it
    once the sweep's trials are over. Returns how many there were."""
    keys = ray_report.placement_group_keys(_KEY_PREFIX)
    for key in keys:
        ray_report.free_placement_group(key)
    return len(keys)


atexit.register(release)


class KeptWorkerGroup(TrialWorkerGroup):
    """A trial's worker group that starts on the workers its driver kept from the last run, and
    is kept, not killed, when its run ends (shutdown or abort).

    Overrides three steps of Ray 2.60's ``WorkerGroup`` (``_create_placement_group``,
    ``_create_workers``, ``shutdown``/``abort``); the rest of the start (synchronisation actor,
    train context, backend, launching the train function) is Ray's own, run for each run.
    """

    _kept: KeptGroup | None = None

    def _requirements(self) -> str:
        context = self._worker_group_context
        return json.dumps([context.num_workers, context.resources_per_worker,
                           context.placement_strategy, str(context.label_selector),
                           self._get_worker_runtime_env(
                               self._train_run_context.run_config.worker_runtime_env)],
                          sort_keys=True, default=str)

    def _create_placement_group(self, scaling_config, worker_group_context):
        self._kept = take(self._requirements())
        if self._kept is not None:
            return self._kept.placement_group_handle
        return super()._create_placement_group(scaling_config, worker_group_context)

    def _create_workers(self, num_workers, placement_group, resources_per_worker,
                        placement_group_bundle_indices=None, starting_world_rank=0,
                        world_size=None, replica_group_size=None):
        if self._kept is None or placement_group_bundle_indices is not None:
            return super()._create_workers(
                num_workers, placement_group, resources_per_worker,
                placement_group_bundle_indices=placement_group_bundle_indices,
                starting_world_rank=starting_world_rank, world_size=world_size,
                replica_group_size=replica_group_size)
        workers = [Worker(w.actor, w.metadata, w.resources,
                          placement_group_bundle_index=w.placement_group_bundle_index)
                   for w in self._kept.workers]
        self._kept = None
        return TrialWorkerGroup._assign_worker_ranks(workers, starting_world_rank,
                                                     world_size, replica_group_size)

    def _keep_workers(self) -> None:
        """Hand this run's workers and placement group to the next run of this process; kill
        only the run's synchronisation actor. Their training is told to end now."""
        state = self._worker_group_state
        ray.kill(state.sync_actor)
        for worker in state.workers:  # the workers' own shutdown hooks (Ray Train's metrics)
            worker.actor.shutdown.remote()
        settled = [worker.execute_async(settle_worker, SETTLE_S) for worker in state.workers]
        keep(KeptGroup(self._requirements(), state.placement_group_handle,
                       list(state.workers), settled))

    # Ray's shutdown() and abort(), with _keep_workers() in place of killing the group.
    def shutdown(self):
        self._assert_active()
        with invoke_context_managers(
                [callback.on_worker_group_shutdown for callback in self._callbacks]):
            if self.has_started():
                for callback in self._callbacks:
                    callback.before_worker_group_shutdown(self)
                self._keep_workers()
            self._clear_state()
            for callback in self._callbacks:
                callback.after_worker_group_shutdown(self._worker_group_context)

    def abort(self):
        self._assert_active()
        for callback in self._callbacks:
            callback.before_worker_group_abort(self._worker_group_context)
        self._keep_workers()
        self._clear_state()
        for callback in self._callbacks:
            callback.after_worker_group_abort(self._worker_group_context)
