"""Defaults of the fair comparison: which class-target rule and which inference settings.

Issue 12 gave the Influencer Loss the class targets and the inference Mask2Former gives Hungarian
matching; this script measures which of the new options should be the defaults. It trains every
variant below with ``python -m ifsearch.train`` on the default synthetic config (``--epochs``
epochs, seeds 0..N-1, one thread per run, two runs at a time), then evaluates each final
checkpoint again under every inference setting (top-k pairs, point assignment, mask NMS), and
writes the tables into its section of docs/benchmarks.md.

    python benchmarks/fair_defaults.py                  # 5 variants x 3 seeds x 15 epochs
    python benchmarks/fair_defaults.py --smoke-test     # tiny scenes, 1 epoch; a temp file

Runs land in ``--work`` (default ``runs/fair_defaults``); a run whose ``metrics.jsonl`` already
holds every epoch is not trained again, so an interrupted run of the script continues.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
for _path in (str(BENCHMARKS), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from launcher import launcher_env  # noqa: E402
from report import markdown_table, write_section  # noqa: E402

SECTION = "fair_defaults"
TITLE = "Defaults of the fair comparison: class targets and inference"
# Training variants: --set values on top of the built-in defaults (softmax Influencer Loss).
TRAIN_VARIANTS = {
    "Influencer softmax, class_target threshold 0.5 (the old rule)": [
        "loss.class_target=threshold"],
    "Influencer softmax, class_target best_query": ["loss.class_target=best_query"],
    "Influencer softmax, class_target soft": ["loss.class_target=soft"],
    "Influencer sigmoid, class_target best_query": [
        "loss.mask_prob=sigmoid", "loss.class_target=best_query"],
    "Hungarian (Mask2Former criterion)": ["loss.name=hungarian"],
}
# Inference settings applied to every final checkpoint (EvalConfig fields).
EVAL_VARIANTS = {
    "topk = M, threshold masks": {},
    "topk = 3M": {"topk": "3M"},
    "argmax masks": {"assign": "argmax"},
    "mask NMS at IoU 0.5": {"dedup_iou": 0.5},
}
METRICS = ("AP50", "AP50_agnostic", "AP", "AP_agnostic", "duplicate_rate", "unclaimed_rate",
           "active_queries")
SMOKE_SETS = ["data.num_points=256", "data.train_scenes=8", "data.val_scenes=4"]


def run_dir(work: Path, variant: str, seed: int) -> Path:
    slug = "".join(c if c.isalnum() else "_" for c in variant.lower()).strip("_")
    return work / slug / f"seed{seed}"


def finished(directory: Path, epochs: int) -> bool:
    """True when the run's metrics.jsonl holds its last epoch."""
    path = directory / "metrics.jsonl"
    if not path.exists():
        return False
    lines = path.read_text().splitlines()
    return bool(lines) and json.loads(lines[-1]).get("epoch") == epochs


def train_all(jobs: list[tuple[str, int, Path]], args: argparse.Namespace, sets: list[str]) -> None:
    """Train the unfinished runs, ``args.parallel`` at a time, each on one thread."""
    todo = [job for job in jobs if not finished(job[2], args.epochs)]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already done; training {len(todo)}",
          flush=True)
    running: list[tuple[subprocess.Popen, str]] = []
    started = time.time()
    done = 0
    while todo or running:
        while todo and len(running) < args.parallel:
            variant, seed, directory = todo.pop(0)
            directory.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "ifsearch.train", "--output-dir", str(directory)]
            for item in [*sets, *TRAIN_VARIANTS[variant], f"train.seed={seed}",
                         f"train.epochs={args.epochs}", "train.num_threads=1",
                         "train.device=cpu"]:
                command += ["--set", item]
            log = open(directory / "train.log", "a")
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                    env=launcher_env())
            running.append((proc, f"{variant} / seed {seed}"))
        time.sleep(2)
        for proc, label in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, label))
            done += 1
            if proc.returncode != 0:
                raise SystemExit(f"training failed ({label}); see its train.log")
            elapsed = time.time() - started
            left = elapsed / done * (len(todo) + len(running))
            print(f"  done {label}  ({done} this session, ~{left / 60:.0f} min left)", flush=True)


def evaluate_checkpoint(directory: Path, overrides: dict) -> dict[str, float]:
    """The final checkpoint's val metrics under the given EvalConfig overrides."""
    import torch
    from torch.utils.data import DataLoader

    from ifsearch.config import load_config
    from ifsearch.data.build import build_datasets, collate_fn
    from ifsearch.losses import build_criterion
    from ifsearch.train import CHECKPOINT_NAME, build_model, evaluate

    config = load_config(directory / "config.yaml")
    values = dict(overrides)
    if values.get("topk") == "3M":
        values["topk"] = 3 * config.model.num_queries
    config.eval = replace(config.eval, **values)
    torch.set_num_threads(1)
    _, val_set = build_datasets(config)
    loader = DataLoader(val_set, batch_size=config.data.batch_size, collate_fn=collate_fn(config))
    model = build_model(config, len(val_set.class_names))
    state = torch.load(directory / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    criterion = build_criterion(config.loss, num_classes=len(val_set.class_names))
    return evaluate(model, criterion, loader, config, torch.device("cpu"))


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def render(results: dict, curves: dict, args: argparse.Namespace, sets: list[str],
           seconds: float) -> str:
    """Markdown: the training variants under default inference, the inference settings, the
    ratio the issue asks about, and AP50 per epoch."""
    seeds = list(range(args.seeds))
    default_eval = next(iter(EVAL_VARIANTS))
    rows = []
    for variant in TRAIN_VARIANTS:
        cells = [variant]
        for metric in METRICS:
            cells.append(mean_std([results[variant][s][default_eval][metric] for s in seeds]))
        aware = [results[variant][s][default_eval]["AP50"] for s in seeds]
        agnostic = [results[variant][s][default_eval]["AP50_agnostic"] for s in seeds]
        ratio = statistics.mean(aware) / statistics.mean(agnostic) if statistics.mean(
            agnostic) > 0 else float("nan")
        cells.append(f"{ratio:.2f}")
        rows.append(cells)
    main_table = markdown_table(["variant", *METRICS, "AP50 / AP50_agnostic"], rows)
    finding = conclusion(results, seeds, default_eval)

    eval_rows = []
    for variant in TRAIN_VARIANTS:
        for name in EVAL_VARIANTS:
            eval_rows.append([variant, name] + [
                mean_std([results[variant][s][name][m] for s in seeds])
                for m in ("AP50", "AP50_agnostic", "AP", "duplicate_rate")])
    eval_table = markdown_table(["variant", "inference", "AP50", "AP50_agnostic", "AP",
                                 "duplicate_rate"], eval_rows)

    marks = sorted({e for e in (1, 2, 5, 10, args.epochs) if e <= args.epochs})
    curve_rows = [[variant] + [mean_std([curves[variant][s][e - 1] for s in seeds])
                               for e in marks] for variant in TRAIN_VARIANTS]
    curve_table = markdown_table(["variant", *[f"epoch {e}" for e in marks]], curve_rows)
    setting = " ".join(f"`--set {s}`" for s in sets) or "no `--set`"
    return f"""
Every variant trains the built-in default config (`python -m ifsearch.train`: synthetic scenes
of 1024 points, 64 training / 16 validation scenes, 12 queries, 3 decoder layers, softmax
Influencer Loss with unit weights; {setting}) for {args.epochs} epochs with seeds
{", ".join(map(str, seeds))} (model init and data order), one thread per run, two runs at a time;
then each final checkpoint is evaluated again under every inference setting. Mean ± std over the
seeds; the runs' epochs took {seconds / 60:.0f} min in all (summed `epoch_seconds`). AP50 is class-aware (ScanNet protocol); AP50_agnostic treats
every instance and prediction as one class (one prediction per query with a non-empty mask,
scored mask score x objectness); duplicate/unclaimed rates and active queries are read from every
non-empty query mask.

**Training variants** (inference: top-k pairs with k = M = 12, threshold masks, no NMS):

{main_table}

The last column is the share of the class-agnostic AP50 that survives once classes count: when
the Influencer variants keep as large a share as Hungarian, the class head no longer decides the
comparison. {finding}

**Inference settings** on the same checkpoints:

{eval_table}

**Val AP50 during training** (default inference, evaluated after each epoch):

{curve_table}
"""


def conclusion(results: dict, seeds: list[int], eval_name: str) -> str:
    """One generated sentence: the best Influencer variant and its share vs Hungarian's."""
    def mean(variant: str, metric: str) -> float:
        return statistics.mean(results[variant][s][eval_name][metric] for s in seeds)

    hungarian = next(v for v in TRAIN_VARIANTS if v.startswith("Hungarian"))
    influencer = [v for v in TRAIN_VARIANTS if v != hungarian]
    best = max(influencer, key=lambda v: mean(v, "AP50"))

    def share(variant: str) -> float:
        agnostic = mean(variant, "AP50_agnostic")
        return mean(variant, "AP50") / agnostic if agnostic > 0 else float("nan")

    verb = "keeps at least" if share(best) >= share(hungarian) else "keeps less than"
    return (f"The best Influencer variant here is *{best}* (mean AP50 "
            f"{mean(best, 'AP50'):.3f} vs {mean(hungarian, 'AP50'):.3f} for Hungarian); it "
            f"{verb} Hungarian's share ({share(best):.2f} vs {share(hungarian):.2f}).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2, help="runs trained at once")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the runs go (default runs/fair_defaults; a temp dir with "
                             "--smoke-test)")
    parser.add_argument("--smoke-test", action="store_true",
                        help="tiny scenes, 1 epoch, 1 seed; writes a temporary file, not docs/")
    parser.add_argument("--output", type=Path, default=None, help="markdown file to write")
    args = parser.parse_args(argv)
    sets: list[str] = []
    output = args.output
    if args.smoke_test:
        args.epochs, args.seeds = 1, 1
        sets = list(SMOKE_SETS)
        args.work = args.work or Path(tempfile.mkdtemp(prefix="fair_defaults_"))
        output = output or args.work / "benchmarks.md"
    args.work = args.work or REPO / "runs" / "fair_defaults"
    jobs = [(v, s, run_dir(args.work, v, s)) for v in TRAIN_VARIANTS for s in range(args.seeds)]
    train_all(jobs, args, sets)
    results: dict = {}
    curves: dict = {}
    seconds = 0.0
    for variant, seed, directory in jobs:
        results.setdefault(variant, {})[seed] = {
            name: evaluate_checkpoint(directory, overrides)
            for name, overrides in EVAL_VARIANTS.items()}
        lines = (directory / "metrics.jsonl").read_text().splitlines()
        curves.setdefault(variant, {})[seed] = [json.loads(line)["AP50"] for line in lines]
        seconds += sum(json.loads(line)["epoch_seconds"] for line in lines)
    body = render(results, curves, args, sets, seconds)
    path = write_section(SECTION, TITLE, body, path=output)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
