"""Forward + backward time of the Influencer criterion vs the Hungarian criterion (matching included).

For each grid point (N points, M queries, K instances, a batch of scenes) the script times
``sum(criterion(outputs, targets).values()).backward()`` for

- ``InfluencerCriterion`` (``LossConfig`` defaults: softmax mask probabilities; also sigmoid at the
  goal point),
- ``HungarianCriterion`` (Mask2Former: sigmoid BCE + dice cost, ``linear_sum_assignment`` on the
  host, then BCE + dice on the matched pairs; every point, ``num_points=0``, the ``LossConfig``
  default),
- a floor: one log-softmax (log-sigmoid in sigmoid mode) forward + backward over the same (N, M)
  logits, i.e. the cost of merely touching the loss's input once each way.

Only the criterion is timed: the outputs are leaf tensors built beforehand, gradients are reset to
None between repetitions, and the criterion sees one decoder layer (no ``aux_outputs``) unless a row
says otherwise. CPU: ``time.perf_counter`` around each repetition; CUDA: CUDA events. Both after
warm-up repetitions, reporting the median.

Usage::

    python benchmarks/loss_speed.py [--device cpu|cuda|all] [--quick] [--smoke-test]
                                    [--repeats R] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import IMAGES, markdown_table, write_section  # noqa: E402

from ifsearch.config import LossConfig  # noqa: E402
from ifsearch.losses import build_criterion  # noqa: E402

NUM_CLASSES = 20  # class head width C (+1 "no object"); it barely matters for the time
FOREGROUND = 0.7  # fraction of the points that belong to some instance
GOAL = (20_000, 400, 50)  # (N, M, K) where the goals are checked
GOAL_SPEEDUP = 5.0  # Influencer at least this many times faster than Hungarian ...
GOAL_FLOOR = 3.0  # ... and at most this many times the floor
HEADERS = [
    "N", "M", "K", "batch", "device", "mask_prob", "aux layers", "influencer ms", "hungarian ms",
    "floor ms", "Hungarian/Influencer", "Influencer/floor",
]


@dataclass(frozen=True)
class Case:
    """One grid point. ``aux`` auxiliary decoder layers are added (deep supervision) when > 0."""

    n: int
    m: int
    k: int
    batch: int = 2
    mask_prob: str = "softmax"
    aux: int = 0


@dataclass
class Result:
    case: Case
    device: str
    influencer_ms: float
    hungarian_ms: float
    floor_ms: float

    @property
    def speedup(self) -> float:
        """Hungarian time / Influencer time."""
        return self.hungarian_ms / self.influencer_ms

    @property
    def over_floor(self) -> float:
        """Influencer time / floor time."""
        return self.influencer_ms / self.floor_ms

    def row(self) -> list[object]:
        c = self.case
        return [
            c.n, c.m, c.k, c.batch, self.device, c.mask_prob, c.aux,
            f"{self.influencer_ms:.1f}", f"{self.hungarian_ms:.1f}", f"{self.floor_ms:.1f}",
            f"{self.speedup:.1f}", f"{self.over_floor:.2f}",
        ]


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def make_targets(n: int, k: int, generator: torch.Generator, device: str) -> dict:
    """K instances partitioning ~70% of the N points into contiguous runs of random length.

    Contiguous runs mimic spatially sorted point clouds; the remaining 30% are background.
    """
    foreground = int(FOREGROUND * n)
    k = min(k, foreground)
    cuts = torch.randperm(foreground - 1, generator=generator)[: k - 1] + 1  # k-1 distinct cuts
    bounds = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([foreground])])
    instance = torch.zeros(n, dtype=torch.long)  # (N,) 0 = background, 1..K = instance
    for i in range(k):
        instance[bounds[i]: bounds[i + 1]] = i + 1
    masks = instance[None, :] == torch.arange(1, k + 1)[:, None]  # (K, N) bool
    labels = torch.randint(NUM_CLASSES, (k,), generator=generator)  # (K,)
    return {"labels": labels.to(device), "masks": masks.to(device)}


def make_inputs(case: Case, device: str, seed: int = 0) -> tuple[dict, list[dict]]:
    """Leaf outputs {"pred_logits": (B, M, C+1), "pred_masks": B x (N, M)} and B targets."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> torch.Tensor:
        return (2.0 * torch.randn(*shape, generator=g)).to(device).requires_grad_(True)

    def layer() -> dict:
        return {
            "pred_logits": leaf(case.batch, case.m, NUM_CLASSES + 1),
            "pred_masks": [leaf(case.n, case.m) for _ in range(case.batch)],
        }

    outputs = layer()
    if case.aux:
        outputs["aux_outputs"] = [layer() for _ in range(case.aux)]
    targets = [make_targets(case.n, case.k, g, device) for _ in range(case.batch)]
    return outputs, targets


def leaves(outputs: dict) -> list[torch.Tensor]:
    """Every leaf tensor of the outputs (all layers)."""
    layers = [outputs, *outputs.get("aux_outputs", [])]
    return [t for lay in layers for t in (lay["pred_logits"], *lay["pred_masks"])]


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def time_once_ms(step: Callable[[], None], reset: Callable[[], None], device: str) -> float:
    """Milliseconds of one ``step()``; ``reset()`` (dropping gradients) runs before, untimed.

    On CUDA the time is taken with CUDA events around the step (the host syncs sit outside the
    timed region); on CPU with ``time.perf_counter``.
    """
    reset()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return 1000.0 * (time.perf_counter() - t0)


def median_ms(steps: dict[str, Callable[[], None]], reset: Callable[[], None], device: str,
              repeats: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of each step over ``repeats`` runs, after ``warmup`` untimed runs.

    The steps are interleaved (a, b, c, a, b, c, ...) so that load from other processes on the
    machine hits them alike.
    """
    for step in steps.values():
        for _ in range(warmup):
            reset()
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            samples[name].append(time_once_ms(step, reset, device))
    return {name: statistics.median(values) for name, values in samples.items()}


def floor_step(outputs: dict, mask_prob: str) -> Callable[[], None]:
    """One log-softmax (or log-sigmoid) forward + backward per (N, M) mask matrix of every layer."""
    matrices = [m for lay in [outputs, *outputs.get("aux_outputs", [])] for m in lay["pred_masks"]]

    def step() -> None:
        total = 0.0
        for x in matrices:
            log_p = torch.log_softmax(x, dim=1) if mask_prob == "softmax" else \
                torch.nn.functional.logsigmoid(x)
            total = total + log_p.sum()
        total.backward()

    return step


def criterion_step(criterion: torch.nn.Module, outputs: dict, targets: list[dict]
                   ) -> Callable[[], None]:
    def step() -> None:
        losses = criterion(outputs, targets)
        sum(losses.values()).backward()

    return step


def run_case(case: Case, device: str, repeats: int, warmup: int) -> Result:
    """Time the Influencer criterion, the Hungarian criterion and the floor on one grid point."""
    outputs, targets = make_inputs(case, device)
    params = leaves(outputs)

    def reset() -> None:
        for p in params:
            p.grad = None

    influencer = build_criterion(
        LossConfig(name="influencer", mask_prob=case.mask_prob), num_classes=NUM_CLASSES
    ).to(device)
    hungarian = build_criterion(LossConfig(name="hungarian"), num_classes=NUM_CLASSES).to(device)
    steps = {
        "influencer": criterion_step(influencer, outputs, targets),
        "hungarian": criterion_step(hungarian, outputs, targets),
        "floor": floor_step(outputs, case.mask_prob),
    }
    times = median_ms(steps, reset, device, repeats, warmup)
    return Result(case, device, times["influencer"], times["hungarian"], times["floor"])
