"""Single-run training: ``python -m ifsearch.train --config FILE.yaml [--set key=value ...]``.

``train_loop(config)`` is the whole run as one plain function of a config: build data, model and
criterion; train with AdamW, warm-up + cosine/poly decay, gradient clipping and bf16 autocast on
GPU; evaluate instance AP and diagnostics on the val split every epoch; append the metrics to
``metrics.jsonl``; save a checkpoint; resume from it. Ray wraps this function (``trainables/``);
it never imports Ray. A ``report`` callback receives each epoch's metrics and checkpoint path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ifsearch.config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    load_config,
    save_config,
)
from ifsearch.data.build import build_datasets, collate_fn, is_image_dataset
from ifsearch.errors import CheckpointError, DivergenceError, IfsearchError
from ifsearch.evaluation import CocoEvaluator, PointCloudEvaluator
from ifsearch.inference import predict_instances
from ifsearch.losses import build_criterion
from ifsearch.models import ImageInfluencerFormer, InfluencerFormer

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
ReportFn = Callable[[dict, Path | None], None]
PhaseFn = Callable[[str], None]  # told "data", then "model", once each is built


def resolve_device(config: Config) -> torch.device:
    """"auto" picks CUDA when present; asking for CUDA without a GPU is an error, not a fallback."""
    wanted = config.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise IfsearchError("train.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a run is reproducible from its config."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(config: Config, num_classes: int) -> torch.nn.Module:
    """The model for the dataset's modality, initialised from ``train.seed``."""
    torch.manual_seed(config.train.seed)
    mask_prob = inference_mask_prob(config)  # masked attention reads masks as the loss does
    if is_image_dataset(config):
        return ImageInfluencerFormer(config.model, num_classes=num_classes, mask_prob=mask_prob)
    return InfluencerFormer(config.model, num_classes=num_classes, mask_prob=mask_prob)


def inference_mask_prob(config: Config) -> str:
    """How to read the mask matrix: the Hungarian baseline always trains sigmoid masks."""
    return config.loss.mask_prob if config.loss.name == "influencer" else "sigmoid"


def _to_device(batch: dict, device: torch.device):
    """(model input, targets) on ``device``: a list of (N_i, 6) clouds or a (B, 3, S, S) tensor."""
    if "images" in batch:
        inputs = batch["images"].to(device, non_blocking=True)
    else:
        inputs = [p.to(device, non_blocking=True) for p in batch["points"]]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]]
    return inputs, targets


def _num_points(inputs) -> int:
    """Points (or pixels) in a batch, for the throughput metric."""
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0] * inputs.shape[-2] * inputs.shape[-1]
    return sum(p.shape[0] for p in inputs)


def _lr_lambda(config: Config, steps_per_epoch: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine / poly / constant decay, per optimizer step."""
    t = config.train
    warmup = int(round(t.warmup_epochs * steps_per_epoch))
    total = max(t.epochs * steps_per_epoch, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if t.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if t.schedule == "poly":
            return (1.0 - progress) ** t.poly_power
        return 1.0

    return factor


@torch.no_grad()
def evaluate(model: torch.nn.Module, criterion: torch.nn.Module, loader: DataLoader,
             config: Config, device: torch.device) -> dict[str, float]:
    """Val loss plus the dataset's metrics (see ``ifsearch.evaluation``)."""
    model.eval()
    dataset = loader.dataset
    if is_image_dataset(config):
        # argmax masks come back as 0/1 "probs": cut them halfway after resampling
        cut = config.eval.mask_threshold if config.eval.assign == "threshold" else 0.5
        evaluator = CocoEvaluator(dataset, cut)
    else:
        evaluator = PointCloudEvaluator(list(dataset.class_names), config.eval.min_region_size,
                                        config.eval.diagnostic_score_threshold,
                                        coverage=config.data.name == "s3dis")
    losses = []
    for batch in loader:
        inputs, targets = _to_device(batch, device)
        with _autocast(config, device):
            outputs = model(inputs)
        losses.append(sum(criterion(outputs, targets).values()).float().item())
        predictions = predict_instances(
            outputs,
            mask_prob=inference_mask_prob(config),
            mask_threshold=config.eval.mask_threshold,
            dedup_iou=config.eval.dedup_iou,
            return_probs=is_image_dataset(config),
            topk=config.eval.topk,
            assign=config.eval.assign,
        )
        evaluator.process(batch, outputs, predictions)
    model.train()
    return {"val_loss": float(np.mean(losses)), **evaluator.evaluate()}


def _autocast(config: Config, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=config.train.amp and device.type == "cuda")


def save_checkpoint(path: Path, model, optimizer, scheduler, epoch: int, config: Config) -> None:
    """Write atomically (temp file + rename) so an interrupted save never leaves a torn file."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "config": config_to_dict(config),
        "torch_rng": torch.get_rng_state(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, config: Config) -> dict:
    """Read a checkpoint and check it was written by a run with the same model and data."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        epoch = int(state["epoch"])
        saved = config_from_dict(state["config"], source=str(path))
    except Exception as exc:  # any unreadable/truncated/foreign file
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); delete it "
            "to start afresh, or set train.resume=false"
        ) from exc
    for section in ("model", "data"):
        if getattr(saved, section) != getattr(config, section):
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written with a different '{section}' config; use "
                "another train.output_dir or set train.resume=false"
            )
    state["epoch"] = epoch
    return state


def train_loop(config: Config, report: ReportFn | None = None,
               on_phase: PhaseFn | None = None,
               checkpoint_epochs: Collection[int] = (),
               stop: threading.Event | None = None) -> dict[str, float]:
    """Train and evaluate one configuration; returns the last epoch's metrics.

    Runs as is on one process, or as one rank of a data-parallel group when torch.distributed is
    initialised (Ray Train does that): each rank then trains on its own shard of the scenes
    (DistributedSampler), gradients are averaged by DDP, and only rank 0 writes the checkpoint
    and metrics file. Every rank evaluates the whole (small) val split, so all ranks report the
    same metrics and call ``report`` equally often, as Ray's report barrier requires.

    Args:
        config: the fully resolved config.
        report: called after every epoch with (metrics, the checkpoint path when this epoch
            saved one on rank 0, else None).
        on_phase: called with "data" once the datasets are built and "model" once the model,
            criterion and optimizer are (and a checkpoint is restored): lets a caller time its
            start-up (``trainables/`` does) without this loop knowing about clocks or Ray.
        checkpoint_epochs: epochs that save a checkpoint besides every
            ``train.checkpoint_every``-th and the last (a sweep's scheduler rungs, where trials
            are stopped or paused).
        stop: set by another thread to end the run early: the loop returns at its next step
            with the last finished epoch's metrics, reporting nothing more (a sweep's trial
            worker kept for the next trial ends the trial the scheduler stopped this way:
            ``trainables/worker_pool.py``).
    """
    device = resolve_device(config)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    seed_everything(config.train.seed)
    # A group of one (a single Ray Train worker) trains like the plain loop: DDP's gradient
    # bucketing and all-reduce would only add copies.
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    output_dir = Path(config.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_config(config, output_dir / "config.yaml")
    checkpoint_path = output_dir / CHECKPOINT_NAME

    train_set, val_set = build_datasets(config)
    _tell(on_phase, "data")
    num_classes = len(train_set.class_names)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                 seed=config.train.seed)
    collate = collate_fn(config)
    train_loader = DataLoader(train_set, batch_size=config.data.batch_size, sampler=sampler,
                              collate_fn=collate)
    val_loader = DataLoader(val_set, batch_size=config.data.batch_size, collate_fn=collate)
    model = build_model(config, num_classes).to(device)
    criterion = build_criterion(config.loss, num_classes=num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr,
                                  weight_decay=config.train.weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, steps_per_epoch))

    start_epoch = 1
    if config.train.resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = state["epoch"] + 1
        print(f"resumed from {checkpoint_path} at epoch {state['epoch']}", flush=True)
    if rank == 0:  # metrics of epochs after the checkpoint (or of an earlier run) would mix in
        _keep_metrics_until(output_dir / METRICS_NAME, start_epoch - 1)
    ddp_model = DistributedDataParallel(model) if distributed else model
    _tell(on_phase, "model")

    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, config.train.epochs + 1):
        sampler.set_epoch(epoch)  # the shuffle depends only on (seed, epoch): resumable
        if hasattr(train_set, "set_epoch"):  # random crops/augmentation: also (seed, epoch)
            train_set.set_epoch(epoch)
        started = time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        num_points = 0
        for step, batch in enumerate(train_loader, start=1):
            if stop is not None and stop.is_set():
                return metrics
            inputs, targets = _to_device(batch, device)
            with _autocast(config, device):
                outputs = ddp_model(inputs)
            parts = criterion(outputs, targets)
            loss = sum(parts.values())
            # The step's one host sync (logging and the divergence check). With several ranks
            # it reads the group's mean loss, so every rank sees a non-finite loss at the same
            # step and they stop together: one rank leaving alone would hang the others in
            # DDP's gradient all-reduce. (The Influencer criterion syncs nowhere; Hungarian
            # matching copies its costs to the host.)
            seen = loss.detach()
            if distributed:
                seen = seen.clone()
                dist.all_reduce(seen)
                seen /= world
            loss_value = seen.item()
            if not math.isfinite(loss_value):
                raise _divergence(parts, epoch, step, scheduler.get_last_lr()[0])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
            optimizer.step()
            scheduler.step()
            sums["loss"] += loss_value
            for key, value in parts.items():
                if not key[-1].isdigit():  # last-layer terms; aux copies end in _{i}
                    sums[key] += value.detach()  # summed on the device: no host sync
            num_points += _num_points(inputs)
            if config.train.log_every and step % config.train.log_every == 0:
                print(f"  epoch {epoch} step {step}/{steps_per_epoch} loss {loss_value:.4f}",
                      flush=True)
        train_seconds = time.perf_counter() - started
        if distributed:  # throughput of the whole group, not of this rank
            total = torch.tensor([float(num_points)], device=device)
            dist.all_reduce(total)
            num_points = int(total.item())

        metrics = {"epoch": epoch}
        metrics.update({f"train_{k}": float(v) / steps_per_epoch for k, v in sums.items()})
        metrics.update(evaluate(model, criterion, val_loader, config, device))
        metrics["lr"] = scheduler.get_last_lr()[0]
        metrics["epoch_seconds"] = time.perf_counter() - started
        metrics["points_per_second"] = num_points / max(train_seconds, 1e-9)
        metrics["steps_per_epoch"] = steps_per_epoch  # per rank: DDP splits the scenes
        metrics["start_epoch"] = start_epoch  # > 1 when this process resumed a checkpoint

        saved = rank == 0 and (epoch % config.train.checkpoint_every == 0
                               or epoch == config.train.epochs or epoch in checkpoint_epochs)
        if rank == 0:
            with open(output_dir / METRICS_NAME, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if saved:
                save_checkpoint(checkpoint_path, model, optimizer, scheduler, epoch, config)
            print(_epoch_line(metrics, config.train.epochs), flush=True)
        if report is not None:
            report(metrics, checkpoint_path if saved else None)
    if not metrics:  # resumed a run that had already finished: its last epoch's metrics
        lines = (output_dir / METRICS_NAME).read_text().splitlines()
        metrics = json.loads(lines[-1]) if lines else {}
    return metrics


def _keep_metrics_until(path: Path, last_epoch: int) -> None:
    """Drop the lines of epochs after ``last_epoch`` (all of them for a fresh run, 0): epochs
    trained after the last checkpoint are trained again and must not be listed twice."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] <= last_epoch]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


def _tell(on_phase: PhaseFn | None, name: str) -> None:
    if on_phase is not None:
        on_phase(name)


def _divergence(parts: dict, epoch: int, step: int, lr: float) -> DivergenceError:
    """The error for a non-finite loss, naming the terms that went bad and what to change."""
    bad = [k for k, v in parts.items() if not torch.isfinite(v).item()]
    bad = bad or ["none on this rank (another rank's loss)"]
    return DivergenceError(
        f"training diverged: the loss is not finite at epoch {epoch}, step {step} (learning "
        f"rate {lr:.3g}; non-finite terms: {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}"
        "); lower train.lr, keep train.grad_clip > 0, or check the loss weights",
        epoch=epoch, step=step,
    )


def _epoch_line(m: dict, epochs: int) -> str:
    scores = "  ".join(f"{k} {m[k]:.3f}" for k in ("AP", "AP50", "AP50_agnostic", "AP75", "AP25",
                                                   "mCov", "mPrec", "mRec") if k in m)
    return (
        f"epoch {m['epoch']:>3}/{epochs}  loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}"
        f"  {scores}"
        f"  dup {m['duplicate_rate']:.2f}  unclaimed {m['unclaimed_rate']:.2f}"
        f"  active {m['active_queries']:.1f}  {m['points_per_second']:.0f} pts/s"
        f"  {m['epoch_seconds']:.1f}s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ifsearch.train",
        description="Train and evaluate one InfluencerFormer configuration (no Ray needed).",
    )
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config (e.g. configs/synthetic_default.yaml or an exported "
                             "best_config.yaml); built-in defaults when omitted")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set loss.name=hungarian "
                             "(repeatable; values are parsed as YAML)")
    parser.add_argument("--output-dir", default=None,
                        help="where metrics.jsonl, checkpoint.pt and config.yaml go "
                             "(same as --set train.output_dir=...)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved config as YAML and exit")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    try:
        if args.config is not None:
            config = load_config(args.config, overrides)
        else:
            config = config_from_dict(apply_overrides({}, overrides), source="--set")
        if args.print_config:
            print(config_to_yaml(config), end="")
            return 0
        print(f"training {config.loss.name} on {config.data.name} -> "
              f"{config.train.output_dir}", flush=True)
        metrics = train_loop(config)
    except IfsearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
