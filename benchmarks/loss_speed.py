"""Forward + backward time of the Influencer vs the Hungarian criterion (matching included).

For each grid point (N points, M queries, K instances, a batch of scenes) the script times
``sum(criterion(outputs, targets).values()).backward()`` for

- ``InfluencerCriterion`` (``LossConfig`` defaults: softmax mask probabilities, geometric mean;
  also, at the goal point, sigmoid, the arithmetic mean and the spill-over term, which need the
  (K, M) sums of p besides those of log p),
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
import os
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

from report import IMAGES, markdown_table, save_figure, write_section  # noqa: E402

from ifsearch.config import LossConfig  # noqa: E402
from ifsearch.losses import build_criterion  # noqa: E402

NUM_CLASSES = 20  # class head width C (+1 "no object"); it barely matters for the time
FOREGROUND = 0.7  # fraction of the points that belong to some instance
GOAL = (20_000, 400, 50)  # (N, M, K) where the goals are checked
GOAL_SPEEDUP = 5.0  # Influencer at least this many times faster than Hungarian ...
GOAL_FLOOR = 3.0  # ... and at most this many times the floor
HEADERS = [
    "N", "M", "K", "batch", "device", "mask_prob", "variant", "aux layers", "influencer ms",
    "hungarian ms", "floor ms", "Hungarian/Influencer", "Influencer/floor",
]
SPILL_WEIGHT = 1.0  # any weight > 0 switches the spill-over term on; its value costs nothing


@dataclass(frozen=True)
class Case:
    """One grid point. ``aux`` auxiliary decoder layers are added (deep supervision) when > 0.

    ``mean`` and ``spill`` select the Influencer Loss variant (``loss.mean``, ``loss.spill_weight``
    > 0); the default one is the ``LossConfig`` default.
    """

    n: int
    m: int
    k: int
    batch: int = 2
    mask_prob: str = "softmax"
    aux: int = 0
    mean: str = "geometric"
    spill: bool = False

    @property
    def variant(self) -> str:
        """The loss variant as the table shows it: the mean, plus "+ spill" when it is on."""
        return self.mean + (" + spill" if self.spill else "")

    @property
    def default_variant(self) -> bool:
        return self.mean == "geometric" and not self.spill


def _cell(value: float, decimals: int = 1) -> str:
    """A time or ratio for the table: ``decimals`` decimals, or three significant digits below 1,
    so that no positive value reads 0.0 (a sub-ms smoke row on a quiet machine, or a ratio under
    a load spike)."""
    return f"{value:.{decimals}f}" if value >= 1.0 else f"{value:.3g}"


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
            c.n, c.m, c.k, c.batch, self.device, c.mask_prob, c.variant, c.aux,
            _cell(self.influencer_ms), _cell(self.hungarian_ms), _cell(self.floor_ms),
            _cell(self.speedup), _cell(self.over_floor, 2),
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

    loss_config = LossConfig(name="influencer", mask_prob=case.mask_prob, mean=case.mean,
                             spill_weight=SPILL_WEIGHT if case.spill else 0.0)
    influencer = build_criterion(loss_config, num_classes=NUM_CLASSES).to(device)
    hungarian = build_criterion(LossConfig(name="hungarian"), num_classes=NUM_CLASSES).to(device)
    steps = {
        "influencer": criterion_step(influencer, outputs, targets),
        "hungarian": criterion_step(hungarian, outputs, targets),
        "floor": floor_step(outputs, case.mask_prob),
    }
    times = median_ms(steps, reset, device, repeats, warmup)
    return Result(case, device, times["influencer"], times["hungarian"], times["floor"])


# --------------------------------------------------------------------------------------------------
# Grid, report, CLI
# --------------------------------------------------------------------------------------------------

AUX_LAYERS = 3  # ModelConfig.decoder_layers = 3 gives 3 auxiliary outputs besides the final one


def grid(quick: bool = False, smoke: bool = False) -> list[Case]:
    """The cases to time: one-factor sweeps through the goal point, then extremes and variants.

    N, M and K are each varied with the other two held at the goal point (N=20k, M=400, K=50), so
    every row differs from the goal row in one factor; the goal point itself is also timed in
    sigmoid mode, with the arithmetic mean, with the spill-over term and with the auxiliary layers
    of the default model. The corner N=100k, M=1000, K=200 closes the grid (the ~1 GB of logits per
    layer it needs fits in memory).
    """
    if smoke:
        return [Case(600, 16, 4), Case(600, 16, 4, mask_prob="sigmoid"), Case(300, 8, 3, aux=1),
                Case(300, 8, 3, mean="arithmetic"),
                Case(300, 8, 3, mask_prob="sigmoid", spill=True)]
    n0, m0, k0 = GOAL
    cases = [Case(n, m0, k0) for n in (4_000, 10_000, 20_000, 50_000, 100_000)]
    if not quick:
        cases += [Case(n0, m, k0) for m in (50, 100, 200, 1000)]
        cases += [Case(n0, m0, k) for k in (5, 20, 100, 200)]
        cases += [Case(100_000, 1000, 200)]
    cases += [Case(n0, m0, k0, mask_prob="sigmoid")]
    cases += [Case(n0, m0, k0, mean="arithmetic"), Case(n0, m0, k0, spill=True)]
    if not quick:
        cases += [Case(n0, m0, k0, aux=AUX_LAYERS)]
    return cases


def goal_sentences(results: list[Result]) -> str:
    """Plain statement of the goal on CPU at the goal point, per mask_prob mode."""
    lines = []
    for r in results:
        c = r.case
        if (c.n, c.m, c.k) != GOAL or c.aux or r.device != "cpu" or not c.default_variant:
            continue
        met = r.speedup >= GOAL_SPEEDUP and r.over_floor <= GOAL_FLOOR
        lines.append(
            f"- Goal at N={c.n}, M={c.m}, K={c.k}, batch {c.batch}, CPU, {c.mask_prob}: "
            f"**{'met' if met else 'not met'}**. The Influencer criterion takes "
            f"{r.influencer_ms:.0f} ms, {r.speedup:.1f}x faster than Hungarian matching "
            f"({r.hungarian_ms:.0f} ms; goal >= {GOAL_SPEEDUP:g}x) and {r.over_floor:.2f}x the "
            f"floor ({r.floor_ms:.0f} ms; goal <= {GOAL_FLOOR:g}x)."
        )
    return "\n".join(lines) or "- The goal point (CPU, N=20k, M=400, K=50) was not timed."


def plot(results: list[Result], path: Path) -> Path | None:
    """Log-log time vs N (M and K at the goal point, softmax) for both criteria and the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, m0, k0 = GOAL
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    batches = set()
    for device, style in (("cpu", "-"), ("cuda", "--")):
        rows = sorted(
            (r for r in results if r.device == device and r.case.m == m0 and r.case.k == k0
             and r.case.mask_prob == "softmax" and not r.case.aux and r.case.default_variant),
            key=lambda r: r.case.n,
        )
        if len(rows) < 2:
            continue
        n = [r.case.n for r in rows]
        for label, attr, color in (("Influencer", "influencer_ms", "C0"),
                                   ("Hungarian", "hungarian_ms", "C3"),
                                   ("floor (log-softmax)", "floor_ms", "0.5")):
            ax.plot(n, [getattr(r, attr) for r in rows], style, marker="o", color=color,
                    label=f"{label}, {device}")
        batches.update(r.case.batch for r in rows)
    if not batches:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("points N per scene")
    ax.set_ylabel(f"forward + backward, ms (batch {'/'.join(map(str, sorted(batches)))})")
    ax.set_title(f"Loss time vs N (M={m0}, K={k0}, one decoder layer)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def section_body(results: list[Result], repeats: int, warmup: int, image: str | None,
                 smoke: bool = False) -> str:
    rows = [r.row() for r in results]
    grid_text = (
        "Grid: N, M and K are each swept with the other two held at the goal point (N=20k, "
        "M=400, K=50), so each row differs from the goal row in one factor; plus the corner "
        "N=100k, M=1000, K=200, the goal point in sigmoid mode, with the arithmetic mean "
        "(`loss.mean`), with the spill-over term (`loss.spill_weight` > 0: both need the (K, M) "
        "sums of p, one more (K, N) x (N, M) product), and with aux layers. A full CPU run "
        "takes under 10 minutes on 2 cores (the corner row alone ~2 min)."
    )
    if smoke:
        grid_text = "Smoke test: a tiny grid and one repetition; it checks the script, not speed."
    text = [
        "Forward + backward time of `InfluencerCriterion` (default `LossConfig`: softmax mask "
        "probabilities, geometric mean, no optional terms; the goals are checked on it) and "
        "`HungarianCriterion` (Mask2Former: sigmoid BCE + dice cost on every "
        "point, `linear_sum_assignment`, then BCE + dice on the matched pairs), on random logits "
        "and K instances that partition 70% of the N points into contiguous runs (the rest is "
        "background). Only the criterion is timed (outputs are leaf tensors built beforehand, "
        "gradients dropped between repetitions), on the final decoder layer alone (no "
        "`aux_outputs`) except the row with aux layers, which adds the "
        f"{AUX_LAYERS} auxiliary outputs of the default 3-layer decoder (deep supervision). The "
        "floor is one log-softmax (log-sigmoid in sigmoid mode) forward + backward over the same "
        "(N, M) logits of every layer: the cost of merely touching the loss's input. Times are "
        f"medians of {repeats} repetition(s) after {warmup} warm-up(s), interleaving the three; "
        "CPU times with `time.perf_counter`, GPU times with CUDA events.",
        "",
        grid_text,
        "",
        markdown_table(HEADERS, rows),
        "",
        goal_sentences(results),
        "",
        "Why: the Hungarian criterion builds an (M, K) cost matrix from BCE and dice terms over "
        "all N points (O(K·M·N) products plus several elementwise passes over the (M, N) logits, "
        "BCE through PyTorch's log-sigmoid kernel), copies it to the host and solves "
        "`linear_sum_assignment` there (O(M·K²) for rectangular costs, O(M³) when K ~ M), one "
        "scene after the other. The Influencer Loss is O(K·N·M) dense products with no host "
        "synchronisation: in softmax mode it needs only the per-point log-sum-exp (log p = x - "
        "lse, and the background term is 1 - exp(-lse)), its backward is written by hand "
        "(`_MaskMatrixTerms` in `ifsearch/losses/influencer.py`) and keeps no (N, M) "
        "intermediate, so apart from two (K, N) x (N, M) matrix products its cost is that of "
        "the floor.",
    ]
    if image:
        text += ["", f"![Loss time vs N]({image})"]
    return "\n".join(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="all: CPU, and CUDA when a GPU is present")
    parser.add_argument("--quick", action="store_true", help="only the N sweep and the goal point")
    parser.add_argument("--smoke-test", action="store_true",
                        help="tiny grid, 1 repetition, writes to --out or a temporary file only")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repetitions per measurement (default 5, smoke 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file to write the section to (default docs/benchmarks.md)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Result]:
    """Run the grid, print the table, write the section (and the plot, except in smoke mode)."""
    args = parse_args(argv)
    repeats = args.repeats or (1 if args.smoke_test else 5)
    warmup = 1
    if repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {repeats}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else \
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = args.out
    if args.smoke_test and out is None:
        out = Path(tempfile.mkdtemp(prefix="loss_speed_")) / "benchmarks.md"

    results = []
    started = time.perf_counter()
    for device in devices:
        for case in grid(quick=args.quick, smoke=args.smoke_test):
            result = run_case(case, device, repeats, warmup)
            results.append(result)
            print(" | ".join(str(cell) for cell in result.row()), flush=True)
    print(f"\n{len(results)} rows in {time.perf_counter() - started:.0f} s\n")
    print(markdown_table(HEADERS, [r.row() for r in results]))
    print()
    print(goal_sentences(results))

    image = None
    if not args.smoke_test:
        png = IMAGES / "loss_speed.png" if out is None else out.with_suffix(".png")
        drawn = plot(results, png)
        if drawn is not None:
            doc_dir = (out or IMAGES.parent / "benchmarks.md").resolve().parent
            image = Path(os.path.relpath(drawn.resolve(), doc_dir)).as_posix()
    path = write_section(
        "loss_speed", "Loss speed: Influencer Loss vs Hungarian matching",
        section_body(results, repeats, warmup, image, smoke=args.smoke_test), path=out,
    )
    print(f"\nwrote section 'loss_speed' to {path}")
    return results


if __name__ == "__main__":
    main()
