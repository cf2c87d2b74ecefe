"""Training throughput: the plain loop vs Ray Train with one and two workers.

Same model, same synthetic data, same epochs; what differs is who runs ``train_loop``:

- ``plain``: ``ifsearch.train.train_loop(config)`` called in this process (what
  ``python -m ifsearch.train`` does), with every core as torch threads;
- ``plain-1t``: the same with one torch thread (the per-worker share of the two-worker run);
- ``ray-1``: a Ray Train ``TorchTrainer`` with one worker owning every core;
- ``ray-1-1t``: one worker with one torch thread, as a sweep's trials run by default (one CPU
  per worker): compared with ``plain-1t``, on the same threads, while Ray's own processes have
  the other core;
- ``ray-2``: two DDP workers (gloo) with one core and one torch thread each.

The Ray runs are built by ``trainables.driver.build_trainer``, as a trial builds them (same
worker function, backend, controller poll interval and checkpoint cadence), but fitted directly,
without Tune, so the number is Train's overhead alone; the per-trial start-up of a Tune sweep is
measured phase by phase by ``benchmarks/startup.py``.

Every mode runs under ``benchmarks/load.OtherLoad``: the CPU other processes of the machine used
meanwhile is printed and written with the table (a shared machine's numbers say little), and for
the Ray modes the CPU of Ray's own processes besides the training workers (synchronisation
actor, dashboard, raylet, ...), which is what one worker shares its cores with. The Train
controller runs in this script's process, as it runs in a trial's driver
(``trainables.ray_report.ControllerThread``), and is not counted.

``train_loop`` reports ``points_per_second`` over the training steps only (data loading, forward,
backward, optimizer; group-wide under DDP) and ``epoch_seconds`` (training + validation); the
table takes the median over the steady epochs (epoch 1 is warm-up and is left out) and the wall
clock of the whole run (for Ray: ``TorchTrainer.fit()``, i.e. worker start-up, process group,
training, evaluation and checkpoint reporting; ``ray.init`` is paid once per session and is
reported separately).

    python benchmarks/throughput.py                      # ~4-5 min on 2 cores -> docs/benchmarks.md
    python benchmarks/throughput.py --smoke-test         # seconds; writes a temporary file only
    python benchmarks/throughput.py --out /tmp/throughput.md --epochs 4 --modes plain,ray-1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
for _path in (str(BENCHMARKS), str(REPO)):  # report.py; ifsearch + trainables when run as a script
    if _path not in sys.path:
        sys.path.insert(0, _path)

from load import OtherLoad  # noqa: E402
from report import DOCS, IMAGES, markdown_table, save_figure, write_section  # noqa: E402

SECTION = "throughput"
TITLE = "Training throughput: plain loop vs Ray Train"
MODES = ("plain", "plain-1t", "ray-1", "ray-1-1t", "ray-2")
# The plain mode each Ray mode is compared with: the same torch threads per process, except
# ray-2, whose two single-thread workers together have the compute of the plain loop on all cores.
BASELINE = {"ray-1": "plain", "ray-1-1t": "plain-1t", "ray-2": "plain"}
GOAL = 0.10  # Ray Train's overhead for one worker should stay under 10 %

# ~1 minute per measurement on 2 cores with the default model: 64 scenes of ~1024 points.
FULL_DATA = {"num_points": 1024, "train_scenes": 64, "val_scenes": 8}
SMOKE_DATA = {"num_points": 256, "train_scenes": 8, "val_scenes": 4}


@dataclass
class Measurement:
    """One run of one mode: its per-epoch metrics and the wall clock of the whole run."""

    mode: str
    workers: int
    threads: int
    epochs: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    load: str = ""  # the machine's load while this mode ran (load.OtherLoad.verdict)
    busy: bool = False
    ray_cores: float | None = None  # Ray's processes besides the workers, average cores
    ray_top: str = ""  # the busiest of them

    def steady(self) -> list[dict]:
        """Epochs after the first (warm-up); all epochs when there is only one."""
        return self.epochs[1:] or self.epochs

    @property
    def points_per_second(self) -> float:
        return statistics.median(e["points_per_second"] for e in self.steady())

    @property
    def epoch_seconds(self) -> float:
        return statistics.median(e["epoch_seconds"] for e in self.steady())


def bench_config(data: dict, epochs: int, threads: int, output_dir: Path):
    """The benchmark config: default model and loss, synthetic data, CPU, a fresh output dir."""
    from ifsearch.config import config_from_dict

    return config_from_dict({
        "data": dict(data),
        "train": {"epochs": epochs, "num_threads": threads, "device": "cpu", "resume": False,
                  "output_dir": str(output_dir)},
    }, source="benchmarks/throughput.py")


def run_plain(config, mode: str) -> Measurement:
    """``train_loop(config)`` in this process, timing the whole call."""
    import torch

    from ifsearch.train import train_loop

    before = torch.get_num_threads()
    result = Measurement(mode=mode, workers=0, threads=config.train.num_threads)
    started = time.perf_counter()
    try:
        train_loop(config, report=lambda metrics, checkpoint: result.epochs.append(dict(metrics)))
    finally:
        result.wall_s = time.perf_counter() - started
        torch.set_num_threads(before)  # train_loop sets the process-wide thread count
    return result


def run_ray(config, mode: str, workers: int, storage: Path) -> Measurement:
    """A trial's ``TorchTrainer`` (``trainables.driver.build_trainer``), one CPU per thread."""
    from trainables.driver import TrialSettings, build_trainer

    threads = config.train.num_threads
    # No search space: the config is given whole. No Tune: no Tune callbacks.
    settings = TrialSettings(space=None, num_workers=workers, cpus_per_worker=float(threads),
                             storage_path=str(storage))
    trainer = build_trainer(config, settings, f"throughput_{mode}")
    started = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - started
    if result.error is not None:
        raise RuntimeError(f"{mode}: the Ray Train run failed: {result.error}")
    return Measurement(mode=mode, workers=workers, threads=threads,
                       epochs=_ray_epochs(result), wall_s=wall)


def _ray_epochs(result) -> list[dict]:
    """Per-epoch metrics of a Train run, from the metrics file its last checkpoint holds (Ray's
    metrics table lists only the reports that carried a checkpoint)."""
    import json

    from ifsearch.train import METRICS_NAME

    with result.checkpoint.as_directory() as directory:
        lines = (Path(directory) / METRICS_NAME).read_text().splitlines()
    return sorted((json.loads(line) for line in lines if line.strip()),
                  key=lambda row: row["epoch"])


def _measured(run, *args) -> Measurement:
    """``run(*args)`` under ``OtherLoad``: the machine's load and Ray's own CPU go with it."""
    with OtherLoad() as load:
        result = run(*args)
    result.load, result.busy = load.verdict(), load.busy
    if result.workers:
        ray = {title: cpu for title, cpu in load.ours.items()
               if title.startswith("ray::") or title in ("raylet", "gcs_server", "dashboard.py",
                                                          "agent.py", "log_monitor.py")}
        ray.pop("ray::RayTrainWorker", None)
        result.ray_cores = sum(ray.values()) / max(load.wall, 1e-9)
        top = sorted(ray.items(), key=lambda item: -item[1])[:4]
        result.ray_top = ", ".join(f"{title} {cpu / load.wall:.3f}" for title, cpu in top)
    if result.busy:
        print(f"  WARNING: {result.load}; the numbers of {result.mode} are disturbed",
              flush=True)
    return result


def measure(modes: list[str], data: dict, epochs: int, scratch: Path,
            log=print) -> tuple[list[Measurement], dict]:
    """Run each mode once; plain modes first, before Ray starts, as a user without Ray would."""
    cores = os.cpu_count() or 1
    per_worker = max(cores // 2, 1)
    results, info = [], {"cores": cores}
    for mode in [m for m in modes if m.startswith("plain")]:
        threads = cores if mode == "plain" else 1
        log(f"{mode}: train_loop, {threads} torch thread(s), {epochs} epochs ...")
        config = bench_config(data, epochs, threads, scratch / mode)
        results.append(_measured(run_plain, config, mode))
        log(f"  {results[-1].points_per_second:.0f} pts/s, {results[-1].wall_s:.1f} s")
    ray_modes = [m for m in modes if m.startswith("ray")]
    if ray_modes:
        import ray

        from trainables.driver import LOCAL_TRAIN_ENV

        # Like the launcher (dashboard on, so Ray's own background processes are counted; the
        # Ray Train settings of a local sweep, so no preemption watcher), but exactly one
        # logical CPU per core: the workers own the machine, nothing oversubscribes.
        # Workers' scratch dirs (trainables/worker.py uses mkdtemp) go to our scratch folder
        # (TMPDIR for the workers only: Ray itself would move its session dir there too). The
        # Train controller runs in this process (trainables.ray_report.ControllerThread): the
        # local settings go into its environment too, as the sweep's reach its trials' drivers.
        for key, value in LOCAL_TRAIN_ENV.items():
            os.environ.setdefault(key, value)
        started = time.perf_counter()
        ray.init(address="local", num_cpus=cores, dashboard_host="127.0.0.1",
                 include_dashboard=True, log_to_driver=False,
                 runtime_env={"env_vars": {"TMPDIR": str(scratch), **LOCAL_TRAIN_ENV}})
        info["ray_init_s"] = time.perf_counter() - started
        try:
            for mode in ray_modes:
                workers = 2 if mode == "ray-2" else 1
                threads = cores if mode == "ray-1" else per_worker
                log(f"{mode}: TorchTrainer, {workers} worker(s) x {threads} torch thread(s) ...")
                config = bench_config(data, epochs, threads, scratch / mode)
                results.append(_measured(run_ray, config, mode, workers,
                                         scratch / "ray_storage"))
                log(f"  {results[-1].points_per_second:.0f} pts/s, {results[-1].wall_s:.1f} s")
        finally:
            ray.shutdown()
    return results, info


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _outside_epochs(r: Measurement) -> float:
    """Seconds of the run outside the epochs: start-up, data/model build, reporting, teardown."""
    return r.wall_s - sum(e["epoch_seconds"] for e in r.epochs)


def render(results: list[Measurement], info: dict, data: dict, epochs: int,
           image: str | None) -> str:
    """The section body: table, plot link and what the numbers mean."""
    by_mode = {r.mode: r for r in results}
    plain = by_mode.get("plain")
    rows = []
    for r in results:
        base = by_mode.get(BASELINE.get(r.mode, ""))
        if base is not None:
            overhead = _pct(1 - r.points_per_second / base.points_per_second)
            wall = _pct(r.wall_s / base.wall_s - 1)
        else:
            overhead = wall = "-"
        rows.append([
            "plain loop" if r.mode.startswith("plain") else "Ray Train",
            r.workers if r.workers else "- (no Ray)",
            r.threads,
            f"{r.points_per_second:,.0f}",
            f"{r.epoch_seconds:.2f}",
            f"{r.wall_s:.1f}",
            overhead,
            wall,
            "-" if r.ray_cores is None else f"{r.ray_cores:.3f}",
            ("**busy**" if r.busy else "idle") if r.load else "-",
        ])
    table = markdown_table(
        ["mode", "workers", "torch threads/worker", "train points/s (median, steady)",
         "epoch s (median, steady)", "run wall-clock s", "overhead vs plain (points/s)",
         "wall-clock vs plain", "Ray's other processes (cores)", "machine"], rows)
    steady = "epochs 2.." + str(epochs) if epochs > 1 else "the only epoch (no warm-up skipped)"
    lines = [
        f"Synthetic scenes (`data.num_points={data['num_points']}`, "
        f"`train_scenes={data['train_scenes']}`, `val_scenes={data['val_scenes']}`), default "
        f"model and loss, {epochs} epoch{'s' if epochs > 1 else ''}, CPU, {info['cores']} "
        "cores. Points/s counts the training steps only (all workers together); medians over "
        f"{steady}. Wall-clock is the whole run: `train_loop` for the plain loop, "
        "`TorchTrainer.fit()` for Ray (worker start-up, process group, training, validation, "
        "a checkpoint every `train.checkpoint_every` epochs and after the last). Overhead = "
        "1 - Ray/plain (points/s) against the plain loop on the same torch threads (ray-2's "
        "two single-thread workers: against the plain loop on all cores). \"Ray's other "
        "processes\": average cores used by Ray's processes besides the training workers "
        "(synchronisation actor, dashboard, raylet, ...; not the Train controller, which runs "
        "in the benchmark's process) over the run; \"machine\": whether other "
        "processes of the machine competed (details below).",
        "",
        table,
        "",
    ]
    if image:
        lines += [f"![training points/s per mode]({image})", ""]
    ray1, ray2, ray1t = by_mode.get("ray-1"), by_mode.get("ray-2"), by_mode.get("ray-1-1t")
    plain1 = by_mode.get("plain-1t")
    if plain is not None and ray1 is not None:
        overhead = 1 - ray1.points_per_second / plain.points_per_second
        verdict = "met" if overhead < GOAL else "not met"
        lines.append(
            f"**Goal (< {GOAL:.0%} overhead for one worker): {verdict}** — one Ray Train worker "
            f"trains at {ray1.points_per_second:,.0f} points/s vs {plain.points_per_second:,.0f} "
            f"for the plain loop (overhead {_pct(overhead)}; negative = Ray was faster; one run "
            "per mode on a shared machine, so a few percent either way is noise). The training "
            "step is the same code in both; what Ray adds is outside it: the worker start-up, "
            "the per-epoch report barrier and checkpoint upload (in the epoch and wall-clock "
            f"columns, not in points/s). The whole run took {ray1.wall_s:.1f} s vs "
            f"{plain.wall_s:.1f} s; outside the epochs {_outside_epochs(ray1):.1f} s vs "
            f"{_outside_epochs(plain):.1f} s (the plain loop's is building data and model; "
            "Ray's adds starting the Train controller and the worker processes, torch.distributed "
            "and the reports) — a fixed cost per run, paid again by every trial of a sweep."
        )
    if plain1 is not None and ray1t is not None:
        overhead = 1 - ray1t.points_per_second / plain1.points_per_second
        verdict = "met" if overhead < GOAL else "not met"
        lines += ["", (
            f"**Goal at one torch thread (a sweep's default trial): {verdict}** — one Ray Train "
            f"worker with one thread trains at {ray1t.points_per_second:,.0f} points/s vs "
            f"{plain1.points_per_second:,.0f} for the plain loop with one thread (overhead "
            f"{_pct(overhead)}). Here Ray's own processes (raylet, dashboard, ...) and the Train "
            "controller's polls "
            "run on the core the worker leaves free; with every core given to torch threads "
            "(the row above) they take cycles from the training threads, which wait for each "
            "other at every operation.")]
    # Same compute, same code, same threads: one Ray worker cannot be clearly faster than the
    # plain loop, nor one thread faster than two. If it is, other load disturbed the runs and
    # the numbers mean little. (Two single-thread DDP processes can beat one two-thread process:
    # they skip intra-op threading, so ray-2 is not judged here.)
    suspicious = []
    if plain is not None:
        if ray1 is not None and ray1.points_per_second > 1.1 * plain.points_per_second:
            ratio = ray1.points_per_second / plain.points_per_second
            suspicious.append(f"{ray1.mode} is {ratio:.1f}x the plain loop")
        if (ray1t is not None and plain1 is not None
                and ray1t.points_per_second > 1.1 * plain1.points_per_second):
            ratio = ray1t.points_per_second / plain1.points_per_second
            suspicious.append(f"{ray1t.mode} is {ratio:.1f}x the plain loop on one thread")
        if plain1 is not None and plain1.points_per_second > plain.points_per_second:
            suspicious.append("one torch thread beat two")
    if suspicious:
        lines += ["", f"**These numbers are disturbed** ({'; '.join(suspicious)}): with the same "
                      "compute and the same training code that cannot happen on an idle machine, "
                      "so other processes competed for the cores (oversubscribed torch threads "
                      "slow down a lot). Rerun on a quiet machine before reading anything into "
                      "them."]
    if ray2 is not None and plain is not None:
        text = (
            f"Two workers on {info['cores']} cores: {ray2.points_per_second:,.0f} points/s "
            f"(overhead {_pct(1 - ray2.points_per_second / plain.points_per_second)} vs the "
            "plain loop). "
            "They cannot scale here: each worker gets one core and one torch thread, so the pair "
            "has the same compute as one worker with two threads, and pays for DDP's gradient "
            "all-reduce (gloo) on top. "
        )
        if plain1 is not None:
            eff = ray2.points_per_second / (2 * plain1.points_per_second)
            text += (
                f"Against twice the single-thread plain loop ({plain1.points_per_second:,.0f} "
                f"points/s each), the scaling efficiency is {eff:.0%}; two threads of one process "
                f"reach {plain.points_per_second / plain1.points_per_second:.2f}x one thread. "
            )
        text += ("Data parallelism pays off with one worker per GPU or per node, not by "
                 "splitting two cores.")
        lines += ["", text]
    lines += ["", "Load while each mode ran (`benchmarks/load.py`):", ""]
    lines += [f"- {r.mode}: {r.load}" + (f"; Ray's busiest other processes (cores): "
                                         f"{r.ray_top}" if r.ray_top else "")
              for r in results if r.load]
    if any(r.busy for r in results):
        lines += ["", "**The machine was not idle during this run**: other processes used the "
                      "cores (see above), so the points/s and overheads are disturbed. Rerun on "
                      "an idle machine before reading anything into them."]
    if "ray_init_s" in info:
        lines += ["", f"`ray.init` (local, dashboard on) took {info['ray_init_s']:.1f} s once "
                      "before the Ray runs; it is not in the wall-clock column."]
    return "\n".join(lines)


def plot(results: list[Measurement], path: Path) -> Path:
    """Bar chart of training points/s per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.mode}\n{r.threads} thr" if not r.workers
              else f"{r.mode}\n{r.workers} wkr x {r.threads} thr" for r in results]
    values = [r.points_per_second for r in results]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    bars = ax.bar(labels, values, color=["#4c72b0" if r.mode.startswith("plain") else "#dd8452"
                                         for r in results])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_ylabel("training points/s")
    ax.set_xlabel("mode (thr = torch threads per process, wkr = Ray Train workers); "
                  "median over epochs 2..N", fontsize=8)
    ax.set_title("Training throughput: plain loop vs Ray Train")
    ax.margins(y=0.15)
    return save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke-test", action="store_true",
                   help="tiny data, 1 epoch, modes plain and ray-1; writes only to --out or a "
                        "temporary file, never docs/")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file whose 'throughput' section is (re)written "
                        "(default: docs/benchmarks.md; a temporary file with --smoke-test)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per run (default 6; 1 with --smoke-test); epoch 1 is warm-up")
    p.add_argument("--modes", default=None,
                   help=f"comma-separated subset of {','.join(MODES)} "
                        "(default: all; plain,ray-1 with --smoke-test)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    smoke = args.smoke_test
    epochs = args.epochs or (1 if smoke else 6)
    modes = (args.modes or ("plain,ray-1" if smoke else ",".join(MODES))).split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown or epochs < 1:
        print(f"error: --modes {unknown} unknown (choose from {MODES}) or --epochs {epochs} < 1",
              file=sys.stderr)
        return 2
    out = args.out
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="ifsearch_bench_")) / "benchmarks.md" if smoke else DOCS
    out = out.resolve()
    image_dir = IMAGES if out == DOCS.resolve() else out.parent / "img"
    data = SMOKE_DATA if smoke else FULL_DATA

    scratch = Path(tempfile.mkdtemp(prefix="ifsearch_throughput_"))
    started = time.perf_counter()
    try:
        results, info = measure(modes, data, epochs, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    image = plot(results, image_dir / "throughput.png")
    body = render(results, info, data, epochs, image=os.path.relpath(image, out.parent))
    write_section(SECTION, TITLE, body, path=out)
    print(f"wrote section '{SECTION}' of {out} and {image} "
          f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
