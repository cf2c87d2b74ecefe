"""The study: Influencer Loss vs Hungarian matching, each searched fairly, at a budget that plateaus.

Four stages, each resumable, all under ``--work`` (default ``runs/study``):

1. **Sweeps**: ``python -m ifsearch.launch`` on ``search_spaces/study_influencer.yaml`` and
   ``search_spaces/study_hungarian.yaml`` (same data, model, shared ranges and budget; the
   parameter table in the section is generated from the two files), TPE + ASHA.
2. **Retrains**: each sweep's ``best_config.yaml`` with several seeds for more epochs than a
   trial (``python -m ifsearch.train``, one run per process).
3. **Ablations**: the Influencer best config with one factor flipped at a time (``ABLATIONS``).
4. **Report**: the verdict (Welch's t interval of the difference, named only when it excludes
   0), convergence speed, ablation table, whether ASHA's rungs could be trusted, importances,
   plots; written to the ``study`` section of docs/benchmarks.md (``study_report.py``).

    python benchmarks/study.py                 # the full study: hours on 2 cores (--status)
    python benchmarks/study.py --quick         # a small dry run of every stage
    python benchmarks/study.py --smoke-test    # tiny, ~minutes; temp files, never docs/

In the background, continuing where it stopped whenever it is started again::

    mkdir -p runs/study && nohup python benchmarks/study.py >> runs/study/study.log 2>&1 &
    python benchmarks/study.py --status        # what is done, what is left, time left

A rerun skips finished sweeps and retrain seeds (``metrics.jsonl`` holds every epoch), resumes
an interrupted sweep (``ifsearch.launch --resume --name``) and an interrupted retrain (from its
``checkpoint.pt``). ``study.lock`` keeps two copies from running in one work folder; Ctrl-C or
``kill PID`` stops it cleanly (the running sweep saves its state). ``study.json`` records the
budget a work folder was started with; a rerun with another budget is refused.

Why one script of ~1300 lines: the four stages share the work folder, the budget and the resume
rules, and each stage is a few hundred lines of orchestration that nothing else uses; the
section's statistics and tables are in ``study_report.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
for _path in (str(BENCHMARKS), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import study_report as sr  # noqa: E402
from launcher import end_launcher, launcher_env  # noqa: E402
from report import DOCS, IMAGES, markdown_table, write_section  # noqa: E402

SECTION = "study"
TITLE = "The study: Influencer Loss vs Hungarian matching, each searched fairly"
LOSSES = ("influencer", "hungarian")
SPACES = {loss: REPO / "search_spaces" / f"study_{loss}.yaml" for loss in LOSSES}
OBJECTIVE = "AP50"  # the spaces' objective; the verdict's main number
PLOTS = {"main": "study_ap50_curves.png", "ablations": "study_ablation_curves.png"}
SMOKE_SETS = ("data.num_points=256", "data.train_scenes=8", "data.val_scenes=4",
              "model.embed_dim=16", "model.ffn_dim=32")

# Seconds per epoch at the study size before anything is measured (2-core Xeon, default model,
# 1024 points, 64/32 scenes, one thread, measured while other jobs shared the machine): only the
# first ETA uses them; every later one uses the study's own measurements.
PRIOR_EPOCH_S = {"influencer": 6.5, "hungarian": 6.0}

# ---------------------------------------------------------------------------------- ablations

# The one-factor-at-a-time flips of the Influencer best config (issue 16 item 3), as data: a
# key's flips are its other values. A weight (0 = off) flips on/off: to 0 when the best config
# uses it, else to ON_WEIGHT.
ABLATIONS: dict[str, tuple] = {
    "loss.mask_prob": ("sigmoid", "softmax"),
    "loss.mean": ("geometric", "arithmetic"),
    "loss.class_target": ("threshold", "best_query", "soft"),
    "loss.deep_supervision": (True, False),
    "loss.spill_weight": ("off", "on"),
    "loss.duplicate_weight": ("off", "on"),
}
ON_WEIGHT = 1.0  # an extra term switched on: the middle of the spaces' choice 0.1 .. 3
# Smoke mode flips every factor too (7 extra 2-epoch retrains on tiny scenes, ~10 s each on an
# idle 2-core machine), so every override the full study makes runs end to end in the test.
SMOKE_ABLATIONS = tuple(ABLATIONS)


def flips(best: dict[str, Any], keys: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(variant id, label, override) for each flip of ``best`` (dotted key -> value)."""
    out = []
    for key in keys:
        name = key.split(".", 1)[1]
        current = best.get(key)
        if ABLATIONS[key] == ("off", "on"):
            on = current is not None and float(current) > 0
            state, value = ("off", 0.0) if on else ("on", ON_WEIGHT)
            out.append((f"flip-{name}-{state}", f"{key} {state} ({value:g})", f"{key}={value}"))
            continue
        for value in ABLATIONS[key]:
            if value != current:
                text = json.dumps(value) if isinstance(value, bool) else str(value)
                out.append((f"flip-{name}-{text}", f"{key} = {text}", f"{key}={text}"))
    return out


def count_flips(keys: tuple[str, ...]) -> int:
    """How many flips ``flips`` will make, before the best config is known."""
    return sum(1 if ABLATIONS[k] == ("off", "on") else len(ABLATIONS[k]) - 1 for k in keys)


# ------------------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """What one mode runs. Both sweeps get the same trials, epochs, rungs and searcher seed."""

    num_samples: int  # trials per sweep
    max_epochs: int  # epochs of a trial that ASHA does not stop
    grace_period: int  # ASHA's first rung: long enough for slow starters
    reduction_factor: int  # ASHA keeps the top 1/rf at each rung
    # ASHA's rung metric (the launcher's scheduler.metric, its direction in rung_mode); the
    # objective stays AP50. The full mode's choice is a placeholder until measured: the
    # section's rung table says whether the rungs could be trusted, for this metric and AP50.
    rung_metric: str
    epochs: int  # epochs of every retrain (the plateau, not the sweep's horizon)
    seeds: tuple[int, ...]  # retrain seeds of each best config
    ablation_seeds: tuple[int, ...]  # retrain seeds of each flip
    ablations: tuple[str, ...]  # keys of ABLATIONS to flip
    sets: tuple[str, ...] = ()  # --set for sweeps and retrains
    rung_mode: str = "max"  # the rung metric's better direction (every AP variant: max)


BUDGETS = {
    # 32 trials x <= 60 epochs, rungs 10 and 30; 5 seeds x 100 epochs; 3 seeds per flip.
    "full": Budget(32, 60, 10, 3, "AP50_agnostic", 100, (0, 1, 2, 3, 4), (0, 1, 2),
                   tuple(ABLATIONS)),
    "quick": Budget(8, 15, 3, 3, "AP50", 30, (0, 1, 2), (0,), tuple(ABLATIONS)),
    "smoke": Budget(2, 2, 1, 2, "AP50", 2, (0,), (0,), SMOKE_ABLATIONS, SMOKE_SETS),
}

# ---------------------------------------------------------------------------- the GPU recipe

# The study at full size on a GPU cluster, as (flag, value on the cluster, value in the smoke
# test). The section shows the cluster column; tests/benchmarks/test_study.py runs the smoke
# column (recipe_args(local=True)), so every flag of the documented command exists and works.
# A value of None drops the flag (only --address: the test has no cluster to join).
RECIPE = (
    ("--work", "/shared/ifsearch/study", "{tmp}/work"),
    ("--storage", "/shared/ifsearch/study/sweeps", "{tmp}/work/sweeps"),
    ("--mlflow-uri", "http://mlflow.internal:5000", "sqlite:///{tmp}/work/mlflow.db"),
    ("--launch-arg", "--address=auto", None),
    ("--launch-arg", "--gpus-per-worker=1", "--gpus-per-worker=0"),
    ("--launch-arg", "--cpus-per-worker=4", "--cpus-per-worker=1"),
    ("--launch-arg", "--workers-per-trial=1", "--workers-per-trial=1"),
    ("--set", "train.device=auto", "train.device=auto"),
    ("--set", "data.num_points=4096", "data.num_points=256"),
    ("--set", "data.train_scenes=2000", "data.train_scenes=8"),
    ("--set", "data.val_scenes=200", "data.val_scenes=4"),
    ("--set", "model.embed_dim=128", "model.embed_dim=16"),
    ("--set", "model.ffn_dim=512", "model.ffn_dim=32"),
)
# What ran of the recipe on a GPU: None until someone runs it there (fill in: date, GPU,
# command, outcome); the section prints it.
GPU_RUN_RECORD: str | None = None


def recipe_args(local: bool, tmp: str = "/tmp/study") -> list[str]:
    """The recipe's arguments: the cluster form, or the smoke test's local form."""
    args = []
    for flag, cluster, smoke in RECIPE:
        value = smoke if local else cluster
        if value is not None:
            args.append(f"{flag}={value.format(tmp=tmp)}" if flag == "--launch-arg"
                        else flag)
            if flag != "--launch-arg":
                args.append(value.format(tmp=tmp))
    return args


# ------------------------------------------------------------------------------ work folder


class StudyError(Exception):
    """Something the user must fix before the study can go on (the message says what)."""


@dataclass
class Work:
    """The study's folder and its files."""

    root: Path
    storage: str  # the sweeps' Tune storage (a path or URI)

    @property
    def state_path(self) -> Path:
        return self.root / "study.json"

    @property
    def lock_path(self) -> Path:
        return self.root / "study.lock"

    def space(self, loss: str) -> Path:
        return self.root / "spaces" / SPACES[loss].name

    def sweep_name(self, loss: str) -> str:
        return f"study-{loss}"

    def sweep_folder(self, loss: str) -> Path:
        """Where the launcher exports the sweep (for a URI storage: under the cwd, ``root``)."""
        if "://" in self.storage:
            return self.root / "runs" / "sweeps" / self.sweep_name(loss)
        return Path(self.storage) / self.sweep_name(loss)

    def sweep_log(self, loss: str) -> Path:
        return self.root / "logs" / f"sweep-{loss}.log"

    def retrain(self, variant: str, seed: int) -> Path:
        return self.root / "retrain" / variant / f"seed{seed}"

    def read_state(self) -> dict:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {}

    def write_state(self, state: dict) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_path)


@contextlib.contextmanager
def study_lock(work: Work):
    """Hold ``study.lock`` (flock) while the study runs; the kernel frees it if we die."""
    work.root.mkdir(parents=True, exist_ok=True)
    with open(work.lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip() or "?"
            raise StudyError(f"another study (pid {pid}) is running in {work.root}; watch it "
                             f"with `python benchmarks/study.py --status --work {work.root}`, or "
                             f"stop it with `kill {pid}` (it saves its state) and start this one "
                             "again") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_holder(work: Work) -> int | None:
    """The pid of the study running in ``work``, None when none is (reads, never takes, it)."""
    if not work.lock_path.exists():
        return None
    with open(work.lock_path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = handle.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def _alive_launcher(pid: int | None) -> bool:
    """Whether ``pid`` is a live ``ifsearch.launch`` process (an orphan of a killed study)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"ifsearch.launch" in cmdline


# ----------------------------------------------------------------------------------- spaces


def effective_space(text: str, budget: Budget, source: str = "") -> str:
    """A study space file as the study runs it: its budget and scheduler blocks replaced.

    The budget and scheduler come from the study's ``budget`` (so --quick and --smoke-test
    shrink both sweeps alike); the scheduler judges its rungs on ``budget.rung_metric``
    (``scheduler: {metric, mode}``, the launcher's rung-metric option; mode
    ``budget.rung_mode``) when that differs from the objective.
    """
    import yaml

    raw = yaml.safe_load(text)
    raw["budget"] = {"num_samples": budget.num_samples, "max_epochs": budget.max_epochs,
                     "grace_period": budget.grace_period}
    scheduler = {"name": "asha", "reduction_factor": budget.reduction_factor}
    if budget.rung_metric != raw.get("objective", {}).get("metric"):
        scheduler.update(metric=budget.rung_metric, mode=budget.rung_mode)
    raw["scheduler"] = scheduler
    header = (f"# Written by benchmarks/study.py from {source}: the study's budget and "
              "scheduler.\n# Edit the source, not this copy.\n")
    return header + yaml.safe_dump(raw, sort_keys=False)


def prepare_spaces(work: Work, budget: Budget) -> None:
    """Write both effective spaces and validate them (every problem at once, before any run)."""
    from ifsearch.search.space import load_search_space

    for loss in LOSSES:
        text = effective_space(SPACES[loss].read_text(), budget,
                               str(SPACES[loss].relative_to(REPO)))
        path = work.space(loss)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        load_search_space(path, list(budget.sets))


def fingerprint(budget: Budget, work: Work, search_seed: int) -> dict:
    """What must not change between two runs in one work folder (resuming mixes otherwise)."""
    spaces = {loss: hashlib.sha256(work.space(loss).read_bytes()).hexdigest()[:16]
              for loss in LOSSES}
    return {"budget": json.loads(json.dumps(asdict(budget))), "search_seed": search_seed,
            "spaces": spaces}


def check_fingerprint(work: Work, current: dict) -> None:
    state = work.read_state()
    before = state.get("fingerprint")
    if before is None:
        state["fingerprint"] = current
        state.setdefault("started", time.strftime("%Y-%m-%d %H:%M:%S"))
        work.write_state(state)
        return
    if before != current:
        changed = sorted(k for k in set(before) | set(current)
                         if before.get(k) != current.get(k))
        detail = []
        for key in changed:
            if isinstance(before.get(key), dict) and isinstance(current.get(key), dict):
                for sub in sorted(set(before[key]) | set(current[key])):
                    if before[key].get(sub) != current[key].get(sub):
                        detail.append(f"{key}.{sub}: {before[key].get(sub)!r} -> "
                                      f"{current[key].get(sub)!r}")
            else:
                detail.append(f"{key}: {before.get(key)!r} -> {current.get(key)!r}")
        raise StudyError(f"{work.root} holds a study started with other settings "
                         f"({'; '.join(detail)}); continue it with the same options, or start "
                         "afresh with another --work")


# ----------------------------------------------------------------------------------- clock


class Clock:
    """Progress lines with the wall-clock time of this process."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp} +{_duration(self.elapsed())}] {text}", flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


# ---------------------------------------------------------------------------------- sweeps


def sweep_action(work: Work, loss: str) -> str:
    """"done" (best config exported), "resume" (Tune state saved) or "fresh"."""
    folder = work.sweep_folder(loss)
    if (folder / "best_config.yaml").exists():
        return "done"
    if "://" not in work.storage:
        tune_folder = Path(work.storage) / work.sweep_name(loss)
        if any(tune_folder.glob("experiment_state-*.json")):
            return "resume"
    return "fresh"


def sweep_reports(work: Work, loss: str) -> tuple[int, list[float]]:
    """(trial-epochs reported so far, their epoch_seconds) from the trials' result.json."""
    if "://" in work.storage:
        return 0, []
    count, seconds = 0, []
    for path in (Path(work.storage) / work.sweep_name(loss)).glob("*/result.json"):
        with contextlib.suppress(OSError, ValueError):
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if "epoch" in row:
                        count += 1
                        seconds.append(float(row.get("epoch_seconds", math.nan)))
    return count, seconds


def _tune_status(log_path: Path) -> str:
    """The newest "Number of trials: ..." line of Tune's progress table, if any."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("Number of trials"):
            return line.strip()
    return ""


def run_sweep(loss: str, work: Work, budget: Budget, args: argparse.Namespace, log: Clock,
              eta) -> None:
    """Run, resume or skip the sweep of ``loss`` until its best config is exported."""
    for attempt in range(1, 4):
        action = sweep_action(work, loss)
        if action == "done":
            log(f"sweep {loss}: finished earlier ({work.sweep_folder(loss)}), skipped")
            return
        if action == "fresh" and "://" not in work.storage:
            stale = Path(work.storage) / work.sweep_name(loss)
            if stale.exists():  # started but never saved: start over, keep it for inspection
                stale.rename(stale.with_name(f"{stale.name}.stale-{time.strftime('%H%M%S')}"))
        stalled = _launch(loss, action, work, budget, args, log, eta)
        if not stalled:
            break
        log(f"sweep {loss}: stalled (no epoch for {args.stall_timeout:.0f} s); resuming it "
            f"(attempt {attempt + 1} of 3)")
    if sweep_action(work, loss) != "done":
        raise StudyError(f"sweep {loss} did not finish after 3 attempts; see "
                         f"{work.sweep_log(loss)}")


def _launch(loss: str, action: str, work: Work, budget: Budget, args: argparse.Namespace,
            log: Clock, eta) -> bool:
    """One launcher process; returns True when it was interrupted for a stall."""
    name = work.sweep_name(loss)
    cmd = [sys.executable, "-m", "ifsearch.launch", "--space", str(work.space(loss)),
           "--name", name, "--storage", work.storage, "--mlflow-uri", args.mlflow_uri,
           "--experiment", args.experiment, "--seed", str(args.search_seed)]
    if action == "resume":
        cmd.append("--resume")
    for item in budget.sets:
        cmd += ["--set", item]
    cmd += args.launch_args
    log_path = work.sweep_log(loss)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    verb = "resuming" if action == "resume" else "starting"
    log(f"sweep {loss}: {verb}, {budget.num_samples} trials x <= {budget.max_epochs} epochs, "
        f"ASHA rungs {asha_rungs(budget)} on {budget.rung_metric} (log: {log_path})")
    state = work.read_state()
    started = time.perf_counter()
    stalled = False
    with open(log_path, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        # Own session: the launcher and its local Ray form one process group we can reap.
        proc = subprocess.Popen(cmd, cwd=work.root, env=launcher_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        state.setdefault("launcher", {})[loss] = proc.pid
        state.setdefault("sweep_since", {})[loss] = time.time()  # for the ETA meanwhile
        work.write_state(state)
        try:
            next_note, next_count = started + 60, started
            count, last_count, last_change = 0, -1, started
            while proc.poll() is None:
                time.sleep(1.0)
                now = time.perf_counter()
                if now >= next_count:  # reading every result.json: not every second
                    next_count = now + 10
                    count, _ = sweep_reports(work, loss)
                    if count != last_count:
                        last_count, last_change = count, now
                if now >= next_note:
                    next_note += args.progress_every
                    status = _tune_status(log_path)
                    log(f"  sweep {loss}: {count} trial-epochs reported (~"
                        f"{expected_trial_epochs(budget):.0f} expected); "
                        f"{status + '; ' if status else ''}study time left {eta()}")
                if args.stall_timeout and now - last_change > args.stall_timeout:
                    stalled = True
                    break
        finally:
            end_launcher(proc, grace=90.0)
            state = work.read_state()
            state.setdefault("sweep_wall_s", {})
            state["sweep_wall_s"][loss] = state["sweep_wall_s"].get(loss, 0.0) + (
                time.perf_counter() - started)
            state.get("launcher", {}).pop(loss, None)
            state.get("sweep_since", {}).pop(loss, None)
            work.write_state(state)
    if stalled:
        return True
    if proc.returncode == 130:
        raise KeyboardInterrupt  # the launcher was interrupted from outside: stop here too
    if proc.returncode != 0 or sweep_action(work, loss) != "done":
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise StudyError(f"sweep {loss} ({name}) exited with {proc.returncode} without "
                         f"exporting a best config; the end of {log_path}:\n{tail}")
    log(f"sweep {loss}: done in {_duration(time.perf_counter() - started)} (this attempt)")
    return False


def asha_rungs(budget: Budget) -> list[int]:
    from ifsearch.search.report import asha_rungs as rungs

    return rungs(budget.grace_period, budget.max_epochs, budget.reduction_factor)


def expected_trial_epochs(budget: Budget) -> float:
    """Trial-epochs of one sweep if ASHA kept exactly the top 1/rf at each rung.

    Asynchronous ASHA promotes somewhat more (early trials face fewer rivals), so this is a
    lower bound; the ETA corrects it by the rate measured while the sweep runs.
    """
    milestones = [*asha_rungs(budget), budget.max_epochs]
    total, previous = 0.0, 0
    for k, milestone in enumerate(milestones):
        total += budget.num_samples / budget.reduction_factor ** k * (milestone - previous)
        previous = milestone
    return total


# --------------------------------------------------------------------------------- retrains


@dataclass
class Task:
    """One retrain: a config, the overrides of its variant, one seed."""

    variant: str
    label: str
    config: Path
    extra: tuple[str, ...]
    seed: int
    family: str  # which loss it trains (its seconds per epoch), for the ETA


def read_history(folder: Path) -> list[dict]:
    """``metrics.jsonl`` of a retrain, one entry per epoch (a re-run epoch replaces the first)."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    by_epoch = {}
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            by_epoch[int(row["epoch"])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def retrain_done(history: list[dict], epochs: int) -> bool:
    """Every epoch 1..epochs is in the history."""
    return {int(m["epoch"]) for m in history} >= set(range(1, epochs + 1))


def plan_retrains(work: Work, budget: Budget) -> tuple[list[Task], dict[str, str]]:
    """Every retrain of the study, seeds interleaved across variants, and the variant labels.

    Needs both best configs (the sweeps are done). Variants are interleaved seed by seed, so
    a change in the machine's load during the study does not fall on one variant only.
    """
    from ifsearch.config import flatten_config, load_config

    best = {loss: work.sweep_folder(loss) / "best_config.yaml" for loss in LOSSES}
    inf_best = flatten_config(load_config(best["influencer"]))
    labels = {"influencer": "Influencer (sweep's best)", "hungarian": "Hungarian (sweep's best)"}
    variants = [("influencer", best["influencer"], (), budget.seeds, "influencer"),
                ("hungarian", best["hungarian"], (), budget.seeds, "hungarian")]
    for variant, label, override in flips(inf_best, budget.ablations):
        labels[variant] = f"Influencer best, {label}"
        variants.append((variant, best["influencer"], (override,), budget.ablation_seeds,
                         "influencer"))
    tasks = []
    for seed in sorted({s for *_, seeds, _ in variants for s in seeds}):
        for variant, config, extra, seeds, family in variants:
            if seed in seeds:
                tasks.append(Task(variant, labels[variant], config, extra, seed, family))
    return tasks, labels


def run_retrains(tasks: list[Task], work: Work, budget: Budget, args: argparse.Namespace,
                 log: Clock, eta) -> None:
    """Run every unfinished retrain, ``args.jobs`` at a time, each in its own process."""
    todo = []
    for task in tasks:
        history = read_history(work.retrain(task.variant, task.seed))
        if retrain_done(history, budget.epochs):
            continue
        todo.append(task)
    done = len(tasks) - len(todo)
    log(f"retrains: {len(tasks)} runs of {budget.epochs} epochs, {done} finished earlier; "
        f"{len(todo)} to run, {args.jobs} at a time; study time left {eta()}")
    running: dict[subprocess.Popen, tuple[Task, int]] = {}
    last_note = time.perf_counter()
    try:
        while todo or running:
            while todo and len(running) < args.jobs:
                task = todo.pop(0)
                running[_start_retrain(task, work, budget, log, args.retrain_threads)] = (
                    task, 0)
            time.sleep(2.0)
            for proc, (task, attempts) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[proc]
                folder = work.retrain(task.variant, task.seed)
                history = read_history(folder)
                if proc.returncode == 0 and retrain_done(history, budget.epochs):
                    (folder / "checkpoint.pt").unlink(missing_ok=True)  # metrics suffice
                    _log_finished(task, history, log, eta)
                elif proc.returncode == 0 and attempts == 0:
                    # The checkpoint is ahead of the metrics file (a kill between the two
                    # writes): only a fresh run gives a whole history.
                    log(f"  {task.variant} seed {task.seed}: metrics incomplete after a clean "
                        "exit; starting it afresh")
                    (folder / "checkpoint.pt").unlink(missing_ok=True)
                    running[_start_retrain(task, work, budget, log,
                                           args.retrain_threads)] = (task, 1)
                else:
                    tail = "\n".join((folder / "train.log").read_text(
                        errors="replace").splitlines()[-20:])
                    raise StudyError(f"retrain {task.variant} seed {task.seed} failed (exit "
                                     f"{proc.returncode}); the end of {folder / 'train.log'}:"
                                     f"\n{tail}")
            if time.perf_counter() - last_note > args.progress_every and running:
                last_note = time.perf_counter()
                for task, _ in running.values():
                    history = read_history(work.retrain(task.variant, task.seed))
                    if history:
                        m = history[-1]
                        log(f"  {task.variant} seed {task.seed}: epoch {m['epoch']}/"
                            f"{budget.epochs}, AP50 {m['AP50']:.3f}; study time left {eta()}")
    finally:
        for proc in running:  # interrupted: each run keeps its checkpoint and resumes later
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        for proc in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _start_retrain(task: Task, work: Work, budget: Budget, log: Clock,
                   threads: int | None = None) -> subprocess.Popen:
    folder = work.retrain(task.variant, task.seed)
    folder.mkdir(parents=True, exist_ok=True)
    resuming = (folder / "checkpoint.pt").exists()
    overrides = [*budget.sets, *task.extra, f"train.seed={task.seed}",
                 f"train.epochs={budget.epochs}", f"train.output_dir={folder}",
                 "train.resume=true", *([f"train.num_threads={threads}"] if threads else [])]
    cmd = [sys.executable, "-m", "ifsearch.train", "--config", str(task.config)]
    for item in overrides:
        cmd += ["--set", item]
    done = len(read_history(folder))
    log(f"  {task.variant} seed {task.seed}: "
        + (f"resuming after epoch {done}" if resuming else "starting"))
    with open(folder / "train.log", "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        return subprocess.Popen(cmd, cwd=work.root, env=launcher_env(), stdout=out,
                                stderr=subprocess.STDOUT)


def _log_finished(task: Task, history: list[dict], log: Clock, eta) -> None:
    run = sr.Run(task.variant, task.seed, history)
    m = run.final
    reached = run.reach(sr.TARGETS[0])
    agnostic = run.value("AP50_agnostic")
    log(f"  {task.variant} seed {task.seed}: done, AP50 {m['AP50']:.3f}"
        + (f" (agnostic {agnostic:.3f})" if agnostic is not None else "")
        + f", duplicates {m['duplicate_rate']:.2f}, AP50 >= {sr.TARGETS[0]} "
        + (f"at epoch {reached[0]}" if reached else "never")
        + f", {run.median_epoch_seconds():.2f} s/epoch; study time left {eta()}")


# --------------------------------------------------------------------------- progress, ETA


def progress(work: Work, budget: Budget, jobs: int = 1, running: bool = True) -> dict:
    """What is done and what is left, with the seconds left estimated from measurements.

    Sweeps: trial-epochs left (``expected_trial_epochs`` minus those reported) at the sweep's
    measured rate (reported trial-epochs per second of its wall-clock, start-ups included),
    else the other sweep's rate, else ``PRIOR_EPOCH_S`` at one trial per core. Retrains: epochs
    left at the median measured seconds per epoch of their loss (its retrains, else its sweep
    trials, else the prior), ``jobs`` at a time. Ablations not planned yet (the Influencer
    sweep is running) count as ``count_flips`` variants. ``running``: a study is running now,
    so a sweep's current attempt counts in its wall-clock.
    """
    state = work.read_state()
    sweeps, rates = {}, {}
    for loss in LOSSES:
        count, seconds = sweep_reports(work, loss)
        wall = state.get("sweep_wall_s", {}).get(loss, 0.0)
        since = state.get("sweep_since", {}).get(loss)
        if running and since:
            wall += time.time() - since
        sweeps[loss] = {"action": sweep_action(work, loss), "reported": count, "wall_s": wall,
                        "epoch_s": _median(seconds)}
        if count >= 5 and wall > 0:
            rates[loss] = count / wall
    cores = os.cpu_count() or 1
    sweep_left = 0.0
    for loss, info in sweeps.items():
        if info["action"] == "done":
            continue
        left = max(expected_trial_epochs(budget) - info["reported"], 0.0)
        rate = rates.get(loss) or next(iter(rates.values()), None) or \
            cores / PRIOR_EPOCH_S[loss]
        sweep_left += left / rate
    histories: dict[str, list[float]] = {loss: [] for loss in LOSSES}
    runs = []
    if all(info["action"] == "done" for info in sweeps.values()):
        tasks, _ = plan_retrains(work, budget)
    else:  # the best configs are not known yet: count the runs the plan will hold
        tasks = [Task(v, v, Path(), (), s, v) for s in budget.seeds for v in LOSSES]
        tasks += [Task(f"flip{i}", "", Path(), (), s, "influencer")
                  for i in range(count_flips(budget.ablations)) for s in budget.ablation_seeds]
    for task in tasks:
        history = read_history(work.retrain(task.variant, task.seed))
        histories[task.family] += [m["epoch_seconds"] for m in history]
        runs.append((task, len(history)))
    retrain_left = 0.0
    for task, done in runs:
        per_epoch = (_median(histories[task.family]) or sweeps[task.family]["epoch_s"]
                     or PRIOR_EPOCH_S[task.family])
        retrain_left += max(budget.epochs - done, 0) * per_epoch
    finished = sum(1 for task, done in runs if done >= budget.epochs)
    return {"sweeps": sweeps, "runs": runs, "finished_runs": finished,
            "seconds_left": sweep_left + retrain_left / max(jobs, 1),
            "measured": bool(rates) or any(histories.values())}


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def print_status(work: Work, budget: Budget, jobs: int) -> None:
    holder = lock_holder(work)
    print(f"study in {work.root}: " + (f"running (pid {holder})" if holder else "not running"))
    if not work.state_path.exists():
        print("  nothing started yet")
    info = progress(work, budget, jobs, running=holder is not None)
    for loss, sweep in info["sweeps"].items():
        print(f"  sweep {loss}: {sweep['action']}, {sweep['reported']} trial-epochs reported "
              f"(~{expected_trial_epochs(budget):.0f} expected), {_duration(sweep['wall_s'])}")
    by_variant: dict[str, list[int]] = {}
    for task, done in info["runs"]:
        by_variant.setdefault(task.variant, []).append(done)
    for variant, done in by_variant.items():
        full = sum(1 for d in done if d >= budget.epochs)
        print(f"  retrain {variant}: {full}/{len(done)} seeds finished, epochs "
              f"{sum(min(d, budget.epochs) for d in done)}/{budget.epochs * len(done)}")
    source = "measured" if info["measured"] else "prior (nothing measured yet)"
    print(f"  time left: ~{_duration(info['seconds_left'])} ({source}; asynchronous ASHA "
          "promotes more trials than the estimate assumes)")


# ---------------------------------------------------------------------------------- report


@dataclass
class SweepResult:
    """A finished sweep as the report reads it."""

    loss: str
    best: dict  # best_config_trial.json
    wall_s: float
    params: list[str]
    trials: list[dict] = field(default_factory=list)  # {"config", "epochs", "error", "AP50"}
    histories: dict = field(default_factory=dict)  # trial id -> {epoch: {metric: value}}
    importances: dict[str, dict[str, float] | str] = field(default_factory=dict)


def read_sweep(loss: str, work: Work, budget: Budget) -> SweepResult:
    """Trials, per-epoch histories and Optuna importances of a finished sweep."""
    import optuna
    from ray.tune import ExperimentAnalysis, ResultGrid

    from ifsearch.search.report import histories_from_results, study_from_results
    from ifsearch.search.space import load_search_space

    space = load_search_space(work.space(loss), list(budget.sets))
    folder = work.sweep_folder(loss)
    best = json.loads((folder / "best_config_trial.json").read_text())
    wall = work.read_state().get("sweep_wall_s", {}).get(loss, math.nan)
    sweep = SweepResult(loss, best, wall, list(space.params))
    grid = ResultGrid(ExperimentAnalysis(f"{work.storage.rstrip('/')}/{work.sweep_name(loss)}"))
    metrics = sorted({OBJECTIVE, budget.rung_metric})
    sweep.histories = histories_from_results(grid, metrics)
    for result in grid:
        frame = result.metrics_dataframe
        sweep.trials.append({
            "config": {k: v for k, v in (result.config or {}).items() if k in space.params},
            "epochs": 0 if frame is None or "epoch" not in frame else int(frame["epoch"].max()),
            "error": result.error is not None,
            "AP50": (result.metrics or {}).get(OBJECTIVE),
        })
    plan = SimpleNamespace(metric=OBJECTIVE, mode="max", space=space, name=work.sweep_name(loss))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with contextlib.redirect_stdout(sys.stderr):
        study = study_from_results(grid, plan)
    values = {t.value for t in study.trials}
    if len(values) < 2:
        reason = f"n/a (all {len(study.trials)} trials scored AP50 {values or '-'})"
        sweep.importances = {"PED-ANOVA": reason, "fANOVA": reason}
        return sweep
    evaluators = {"PED-ANOVA": lambda: optuna.importance.PedAnovaImportanceEvaluator(),
                  "fANOVA": lambda: optuna.importance.FanovaImportanceEvaluator(seed=0)}
    for label, make in evaluators.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sweep.importances[label] = optuna.importance.get_param_importances(
                    study, evaluator=make())
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            sweep.importances[label] = f"n/a ({exc})"
    return sweep


def sweeps_table(sweeps: dict[str, SweepResult], budget: Budget) -> str:
    rows = []
    for loss, sweep in sweeps.items():
        ok = [t for t in sweep.trials if not t["error"]]
        full = sum(1 for t in ok if t["epochs"] >= budget.max_epochs)
        values = [t["AP50"] for t in ok if t["AP50"] is not None]
        best = sweep.best.get("metrics", {}).get(OBJECTIVE, math.nan)
        epochs = sum(t["epochs"] for t in sweep.trials)
        rows.append([loss, SPACES[loss].name, len(sweep.trials), full, len(ok) - full,
                     len(sweep.trials) - len(ok), f"{best:.3f}",
                     f"{statistics.median(values):.3f}" if values else "n/a", epochs,
                     _duration(sweep.wall_s)])
    return markdown_table(["loss", "space", "trials", f"ran all {budget.max_epochs} epochs",
                           "stopped by ASHA", "failed", "best trial AP50",
                           "median trial AP50 (last epoch)", "trial-epochs", "wall-clock"], rows)


def importance_table(sweeps: dict[str, SweepResult]) -> str:
    rows = []
    for loss, sweep in sweeps.items():
        ped, fan = sweep.importances.get("PED-ANOVA"), sweep.importances.get("fANOVA")
        searched = sweep.best.get("searched", {})
        params = list(sweep.params)
        if isinstance(ped, dict):
            params.sort(key=lambda p: -ped.get(p, 0.0))

        def cell(imp, param):
            if isinstance(imp, dict):
                return f"{imp[param]:.2f}" if param in imp else "–"
            return imp if isinstance(imp, str) else "–"

        for rank, param in enumerate(params, start=1):
            value = searched.get(param, "–")
            rows.append([loss, rank, f"`{param}`", cell(ped, param), cell(fan, param),
                         f"{value:.3g}" if isinstance(value, float) else str(value)])
    return markdown_table(["loss", "rank", "parameter", "importance (PED-ANOVA)",
                           "importance (fANOVA)", "best trial's value"], rows)


def rung_analyses(sweeps: dict[str, SweepResult], groups: dict[str, list[sr.Run]],
                  budget: Budget) -> tuple[list[tuple[str, dict]], str]:
    """``rung_trust`` on each sweep (its rung metric and AP50) and on the unpruned retrains.

    Returns the rows and a sentence on the slow starter: at each rung, how many seeds of each
    best config the cutoff (computed over all retrains together) would have stopped.
    """
    from ifsearch.search.report import rung_trust

    rungs = asha_rungs(budget)
    common = {"reduction_factor": budget.reduction_factor, "final_metric": OBJECTIVE}
    analyses = []
    # (rung metric, its direction): the sweeps' own, and AP50 (the objective) for comparison
    judged = dict.fromkeys(((budget.rung_metric, budget.rung_mode), (OBJECTIVE, "max")))
    for loss, sweep in sweeps.items():
        for metric, direction in judged:
            analyses.append((f"{loss} sweep, trials that ran to the end", rung_trust(
                sweep.histories, rungs, rung_metric=metric, rung_mode=direction,
                final_epoch=budget.max_epochs, **common)))
    retrains = {f"{variant}/seed{run.seed}": {int(m["epoch"]): m for m in run.history}
                for variant, runs in groups.items() for run in runs}
    pooled = []
    for metric, direction in judged:
        result = rung_trust(retrains, rungs, rung_metric=metric, rung_mode=direction,
                            final_epoch=budget.epochs, **common)
        analyses.append(("all retrains (unpruned)", result))
        pooled.append((metric, result))
    words = []
    metric, result = pooled[-1]  # AP50 at the rungs
    for row in result["rungs"]:
        cutoff = row["cutoff"]
        if math.isnan(cutoff):
            continue
        counts = []
        for variant in LOSSES:
            runs = groups.get(variant, [])
            below = sum(1 for r in runs
                        if (v := _at_epoch(r.history, row["epoch"], metric)) is not None
                        and v < cutoff)
            counts.append(f"{below}/{len(runs)} {variant} seeds")
        words.append(f"epoch {row['epoch']} (cutoff {metric} {cutoff:.3f}): " + ", ".join(counts))
    sentence = ("Judged together at the sweeps' rungs (ASHA's cutoff over all retrains' "
                f"{metric}), the best configs' seeds that would have been stopped: "
                + ("; ".join(words) if words else "none (no rung before the last epoch)") + ".")
    return analyses, sentence


def _at_epoch(history: list[dict], epoch: int, metric: str) -> float | None:
    for m in history:
        if int(m["epoch"]) >= epoch:
            return m.get(metric)
    return None


def gather_runs(tasks: list[Task], work: Work, budget: Budget) -> dict[str, list[sr.Run]]:
    """Finished retrains by variant, in plan order."""
    groups: dict[str, list[sr.Run]] = {}
    for task in tasks:
        history = read_history(work.retrain(task.variant, task.seed))
        groups.setdefault(task.variant, [])
        if retrain_done(history, budget.epochs):
            groups[task.variant].append(sr.Run(task.variant, task.seed,
                                               history[:budget.epochs]))
    return groups


def retrain_threads(tasks: list[Task], work: Work) -> str:
    """How many torch threads the retrains had, from each run's saved config: e.g. "2 threads
    (9 runs), 1 thread (22 runs)". A run resumed with another count is counted at its last."""
    counts: dict[int, int] = {}
    for task in tasks:
        saved = work.retrain(task.variant, task.seed) / "config.yaml"
        if saved.exists():
            threads = int(yaml.safe_load(saved.read_text())["train"]["num_threads"])
            counts[threads] = counts.get(threads, 0) + 1
    return ", ".join(f"{n} thread{'s' * (n != 1)} ({k} run{'s' * (k != 1)})"
                     for n, k in sorted(counts.items(), reverse=True)) or "–"


def render(work: Work, budget: Budget, mode: str, args: argparse.Namespace,
           images: Path, out: Path) -> tuple[str, dict]:
    """The section's markdown, and the verdict (for the console)."""
    from ifsearch.config import load_config
    from ifsearch.search.space import load_search_space

    spaces = {loss: load_search_space(work.space(loss), list(budget.sets)) for loss in LOSSES}
    sweeps = {loss: read_sweep(loss, work, budget) for loss in LOSSES}
    tasks, labels = plan_retrains(work, budget)
    groups = gather_runs(tasks, work, budget)
    main = {k: groups.get(k, []) for k in LOSSES}
    flipped = {k: v for k, v in groups.items() if k not in LOSSES}
    result = sr.verdict(main["influencer"], main["hungarian"])
    image_main = sr.plot_curves(main, labels, images / PLOTS["main"],
                                "Retrained best configs: val AP50")
    image_flips = sr.plot_curves({"influencer": main["influencer"], **flipped}, labels,
                                 images / PLOTS["ablations"],
                                 "Ablations of the Influencer best config: val AP50")
    link = {k: os.path.relpath(p.resolve(), out.resolve().parent)
            for k, p in (("main", image_main), ("ablations", image_flips))}
    analyses, slow_starter = rung_analyses(sweeps, groups, budget)
    config = load_config(work.sweep_folder("hungarian") / "best_config.yaml")
    data = (f"{config.data.name} scenes of {config.data.num_points} points, "
            f"{config.data.train_scenes} training / {config.data.val_scenes} validation")
    model = (f"{config.model.embed_dim}-wide, {config.model.encoder_layers} EdgeConv + "
             f"{config.model.decoder_layers} decoder layers, {config.model.num_queries} queries")
    sets = (" Both with " + " ".join(f"`--set {s}`" for s in budget.sets) + "."
            if budget.sets else "")
    picked = ", ".join(f"`{k}` = {v:.3g}" if isinstance(v, float) else f"`{k}` = {v}"
                       for k, v in sweeps["influencer"].best.get("searched", {}).items())
    missing = [f"{v}: {len(runs)}/{len(budget.seeds if v in LOSSES else budget.ablation_seeds)}"
               for v, runs in groups.items()
               if len(runs) < len(budget.seeds if v in LOSSES else budget.ablation_seeds)]
    state = work.read_state()
    rungs = asha_rungs(budget)
    recipe = " \\\n  ".join(_pairs(recipe_args(local=False)))
    sep = {"--launch-arg": "="}
    local = [f"`{flag}{sep.get(flag, ' ')}{cluster}` -> "
             + (f"`{flag}{sep.get(flag, ' ')}{smoke}`" if smoke else "dropped (no cluster)")
             for flag, cluster, smoke in RECIPE if smoke != cluster]
    gpu = GPU_RUN_RECORD or ("none recorded yet: no GPU was available where this study was "
                             "built; run the recipe on one and record the outcome in "
                             "`GPU_RUN_RECORD` (benchmarks/study.py)")
    body = f"""
Mode `{mode}`; work folder started {state.get('started', '?')}, this report written after
{_duration(sum(state.get('sweep_wall_s', {}).values()))} of sweeps plus the retrains' own
time (each run's seconds are in the tables).
{"**Incomplete:** retrains still missing (finished/planned): " + ", ".join(missing) + "."
 if missing else ""}

{result['headline']}

{result['where']}

**Convergence speed** (epochs and seconds of training + validation to reach AP50 0.5 and 0.7;
mean ± std over the seeds that reached it): {sr.convergence_sentence(main, labels)}

### Protocol

- **Spaces**: `search_spaces/study_influencer.yaml` and `search_spaces/study_hungarian.yaml`
  (table below, generated from the two files). Same data ({data}), model ({model}), optimiser
  range, class-head ranges (`loss.class_weight`, `loss.no_object_weight`),
  `loss.deep_supervision` and budget; each side searches its own loss terms.{sets}
- **Sweeps**: `python -m ifsearch.launch`, {budget.num_samples} trials x <= {budget.max_epochs}
  epochs each, TPE (searcher seed {args.search_seed}) + ASHA (grace period
  {budget.grace_period}, reduction factor {budget.reduction_factor}: rungs at epochs
  {", ".join(map(str, rungs)) or "none"}, judged on `{budget.rung_metric}`, higher
  {"better" if budget.rung_mode == "max" else "worse"}); the objective is val AP50 at a
  trial's last epoch.
- **Retrains**: each sweep's `best_config.yaml` trained again with `python -m ifsearch.train`
  for {budget.epochs} epochs, seeds {", ".join(map(str, budget.seeds))} (model init and data
  order; the scenes are the same), variants interleaved seed by seed; torch threads per run:
  {retrain_threads(tasks, work)}. The Influencer sweep picked {picked or "–"}.
- **Ablations**: the Influencer best config with one factor flipped at a time
  ({", ".join(f"`{k}`" for k in budget.ablations)}; an extra term "on" means weight
  {ON_WEIGHT:g}), seeds {", ".join(map(str, budget.ablation_seeds))}, {budget.epochs} epochs.
- **Statistics**: final-epoch values, mean ± std over seeds; the difference of two variants'
  means with a 95 % interval from Welch's t (`scipy.stats.ttest_ind(equal_var=False)`, unequal
  variances, unpaired seeds). A side is called ahead or behind only when the interval excludes
  0, otherwise level. A seed that never reached an AP50 target counts as one epoch past its end
  (a lower bound), so a comparison of convergence can only understate its delay.
- **Metrics**: val AP / AP50 / AP25 (ScanNet protocol), class-aware and class-agnostic; the
  duplicate rate (instances matched by more than one prediction at IoU > 0.5), unclaimed rate
  and active queries as this build's evaluator defines them. Seconds depend on the machine and
  its load, epochs do not.

### Searched parameters

{sr.spaces_table(spaces)}

### Sweeps

{sweeps_table(sweeps, budget)}

### Retrained best configs

{sr.variants_table(main, labels)}

![AP50 vs epoch and vs seconds, one line per seed]({link['main']})

{sr.verdict_table(result['rows'])}

### Ablations of the Influencer best config

{sr.ablation_table(main['influencer'], flipped, labels)}

![Ablations: AP50 vs epoch and vs seconds, one line per seed]({link['ablations']})

### Is early stopping trustworthy here?

For each population, at each ASHA rung: Spearman's rank correlation between the rung value and
the final AP50 over the runs that went to the end, and how many of the final top 5 ASHA's cutoff
would have stopped (`ifsearch.search.report.rung_trust`: the cutoff is the
`(1 - 1/{budget.reduction_factor})` percentile of the rung values of every run that reached the
rung; Ray applies the same rule asynchronously). A rung is untrustworthy when its Spearman is
below 0.5 or it would stop a final top-5 run. The sweeps' complete trials are the ones ASHA let
through (a narrowed range); the retrains are unpruned, so they measure the rung's bias without
that selection.

{sr.rung_table(analyses)}

{slow_starter}

### Hyperparameter importances found by the sweeps

Optuna importances of the last-epoch AP50 over each sweep's trials (rebuilt with
`ifsearch.search.report.study_from_results`; trials ASHA stopped count at their truncated AP50,
so read them as "what this sweep leaned on"). The two evaluators disagreeing is the measure of
their roughness.

{importance_table(sweeps)}

<details><summary>Per seed (last epoch)</summary>

{sr.seeds_table(groups, labels)}

</details>

### Running it

```bash
python benchmarks/study.py --status       # what is done and the time left; runs nothing
mkdir -p runs/study && nohup python benchmarks/study.py >> runs/study/study.log 2>&1 &
python benchmarks/study.py --report-only  # rebuild this section from runs/study
python benchmarks/study.py --quick        # every stage at a small budget
python benchmarks/study.py --smoke-test   # tiny; temp files, never docs/
```

Started again, it continues where it stopped: finished sweeps and retrain seeds are skipped, an
interrupted sweep is resumed (`ifsearch.launch --resume --name`), an interrupted retrain
continues from its checkpoint. `study.lock` keeps two copies out of one work folder.

### At full size on a GPU cluster

Start Ray on the nodes (`ray start --head`, then `ray start --address HEAD:6379` on the others),
give every node the same storage path and the MLflow server, and run on a GPU node (the retrains
run where the script runs):

```bash
python benchmarks/study.py \\
  {recipe}
```

Checked: `tests/benchmarks/test_study.py` runs this command line end to end at smoke size on a
2-core CPU machine with `--smoke-test` added and these values replaced (`{{tmp}}` is the test's
temporary folder):
{"; ".join(local)}. On a GPU: {gpu}.
"""
    return body, result


def _pairs(args: list[str]) -> list[str]:
    """``["--a", "1", "--b=2"]`` -> ``["--a 1", "--b=2"]`` (one flag per recipe line)."""
    out = []
    for arg in args:
        if out and not arg.startswith("--") and " " not in out[-1] and "=" not in out[-1]:
            out[-1] += f" {arg}"
        else:
            out.append(arg)
    return out


# -------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/study.py",
        description="Influencer Loss vs Hungarian: fair sweeps, seeded retrains, ablations, an "
                    "honest verdict; resumable. Writes the 'study' section of "
                    "docs/benchmarks.md and its plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="every stage at a small budget")
    mode.add_argument("--smoke-test", action="store_true",
                      help="tiny sweeps/retrains on tiny scenes; a temp folder unless --work/"
                           "--out/--images are given, never docs/")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--status", action="store_true",
                      help="print what is done and the time left, run nothing")
    what.add_argument("--report-only", action="store_true",
                      help="run nothing: rebuild the section from the work folder")
    what.add_argument("--stop-after", choices=("sweeps",), default=None,
                      help="stop once this stage is done (rerun to continue)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"markdown file of the section (default {DOCS.relative_to(REPO)})")
    p.add_argument("--images", type=Path, default=None,
                   help=f"folder for the plots (default {IMAGES.relative_to(REPO)})")
    p.add_argument("--work", type=Path, default=None,
                   help="the study's folder: sweeps, logs, MLflow store, retrains, state "
                        "(default runs/study; a temp folder with --smoke-test)")
    p.add_argument("--num-samples", type=int, default=None, help="trials per sweep")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs per sweep trial")
    p.add_argument("--grace-period", type=int, default=None, help="ASHA's first rung (epochs)")
    p.add_argument("--reduction-factor", type=int, default=None, help="ASHA's reduction factor")
    p.add_argument("--rung-metric", default=None, metavar="METRIC[:min|max]",
                   help="the metric ASHA judges rungs on (the launcher's scheduler.metric); "
                        "a metric other than AP50 needs its direction, e.g. val_loss:min")
    p.add_argument("--epochs", type=int, default=None, help="epochs per retrain")
    p.add_argument("--seeds", default=None, help="retrain seeds, comma-separated")
    p.add_argument("--ablation-seeds", default=None, help="seeds of each flip, comma-separated")
    p.add_argument("--ablations", default=None,
                   help="comma-separated keys of ABLATIONS to flip (default: the mode's)")
    p.add_argument("--search-seed", type=int, default=0, help="searcher seed of both sweeps")
    p.add_argument("--jobs", type=int, default=1,
                   help="retrains at once; each uses the config's train.num_threads (2 in the "
                        "study spaces), so with --jobs 2 on 2 cores add --retrain-threads 1")
    p.add_argument("--retrain-threads", type=int, default=None,
                   help="torch threads of each retrain (default: the config's). Not part of "
                        "the study's fingerprint: it changes the speed, and the floating-point "
                        "sums' order (as a seed does), not what is trained; the report says "
                        "how many threads each retrain had")
    p.add_argument("--storage", default=None,
                   help="Tune storage of the sweeps (default <work>/sweeps; on a cluster a "
                        "path every node sees)")
    p.add_argument("--mlflow-uri", default=None,
                   help="tracking URI of the sweeps (default sqlite:///<work>/mlflow.db)")
    p.add_argument("--experiment", default="study", help="MLflow experiment name")
    p.add_argument("--stall-timeout", type=float, default=600.0,
                   help="resume a sweep when no trial has reported an epoch for this many "
                        "seconds (0 = never)")
    p.add_argument("--progress-every", type=float, default=300.0,
                   help="seconds between progress lines")
    p.add_argument("--set", dest="sets", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="config override for both sweeps and every retrain (repeatable)")
    p.add_argument("--launch-arg", dest="launch_args", action="append", default=[],
                   metavar="ARG", help="extra argument for ifsearch.launch, e.g. "
                                       "--launch-arg=--gpus-per-worker=1 (repeatable)")
    return p


def _seeds(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(s) for s in text.split(",")) if text else None


def resolve_budget(args: argparse.Namespace) -> tuple[str, Budget]:
    mode = "smoke" if args.smoke_test else "quick" if args.quick else "full"
    budget = BUDGETS[mode]
    ablations = tuple(args.ablations.split(",")) if args.ablations else budget.ablations
    unknown = [k for k in ablations if k not in ABLATIONS]
    if unknown:
        raise StudyError(f"--ablations {unknown}: not a flip of ABLATIONS; choose from "
                         f"{list(ABLATIONS)}")
    changes = {k: v for k, v in {
        "num_samples": args.num_samples, "max_epochs": args.max_epochs,
        "grace_period": args.grace_period, "reduction_factor": args.reduction_factor,
        "epochs": args.epochs, "seeds": _seeds(args.seeds),
        "ablation_seeds": _seeds(args.ablation_seeds)}.items() if v is not None}
    # One --set per key, the later winning (a recipe's sizes replace the smoke mode's).
    sets = {item.partition("=")[0].strip(): item for item in (*budget.sets, *args.sets)}
    budget = replace(budget, ablations=ablations, sets=tuple(sets.values()), **changes)
    if args.rung_metric:
        metric, sep, direction = args.rung_metric.partition(":")
        if not sep and metric != OBJECTIVE:  # the launcher's rule: a guessed direction is
            raise StudyError(f"--rung-metric {metric}: say whether higher or lower is better, "
                             f"e.g. --rung-metric {metric}:max")  # the best trials stopped
        if direction not in ("", "min", "max"):
            raise StudyError(f"--rung-metric {args.rung_metric}: the mode must be min or max")
        budget = replace(budget, rung_metric=metric, rung_mode=direction or "max")
    if budget.grace_period > budget.max_epochs:
        raise StudyError(f"--grace-period {budget.grace_period} must be <= --max-epochs "
                         f"{budget.max_epochs}")
    if args.jobs < 1:
        raise StudyError(f"--jobs {args.jobs} must be >= 1")
    if args.retrain_threads is not None and args.retrain_threads < 1:
        raise StudyError(f"--retrain-threads {args.retrain_threads} must be >= 1")
    return mode, budget


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        mode, budget = resolve_budget(args)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    temp = Path(tempfile.mkdtemp(prefix="ifsearch-study-")) if mode == "smoke" else None
    root = (args.work or (temp / "work" if temp else REPO / "runs" / "study")).resolve()
    out = (args.out or (temp / "benchmarks.md" if temp else DOCS)).resolve()
    images = (args.images or (temp / "img" if temp else IMAGES)).resolve()
    work = Work(root, args.storage or str(root / "sweeps"))
    if args.status:
        print_status(work, budget, args.jobs)
        return 0
    args.mlflow_uri = args.mlflow_uri or f"sqlite:///{root / 'mlflow.db'}"
    log = Clock()
    # SIGTERM (kill, a batch scheduler) stops like Ctrl-C: sweeps save, retrains keep their
    # checkpoints. Raised here, not re-sent as SIGINT: a process started in the background by
    # a non-interactive shell (`study.py &`) inherits SIGINT ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with study_lock(work):
            return _run(work, budget, mode, args, out, images, log)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        log(f"interrupted: the finished work is kept in {root}; run the same command again to "
            "continue where it stopped")
        return 130


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _run(work: Work, budget: Budget, mode: str, args: argparse.Namespace, out: Path,
         images: Path, log: Clock) -> int:
    state = work.read_state()
    for loss, pid in state.get("launcher", {}).items():
        if _alive_launcher(pid):
            raise StudyError(f"the launcher of sweep {loss} from an earlier run (pid {pid}) is "
                             f"still running; stop it with `kill -INT -{pid}` (its Tune state "
                             "is saved) and start the study again")
    prepare_spaces(work, budget)
    check_fingerprint(work, fingerprint(budget, work, args.search_seed))
    log(f"study ({mode}) in {work.root}; section -> {out}, plots -> {images}")

    def eta() -> str:
        return "~" + _duration(progress(work, budget, args.jobs)["seconds_left"])

    if not args.report_only:
        log(f"time left before starting: {eta()}")
        for loss in LOSSES:
            run_sweep(loss, work, budget, args, log, eta)
        if args.stop_after == "sweeps":
            log("stopping after the sweeps (--stop-after sweeps); run again to continue")
            return 0
        tasks, _ = plan_retrains(work, budget)
        run_retrains(tasks, work, budget, args, log, eta)
    for loss in LOSSES:
        if sweep_action(work, loss) != "done":
            raise StudyError(f"--report-only: sweep {loss} is not finished in {work.root}")
    body, result = render(work, budget, mode, args, images, out)
    write_section(SECTION, TITLE, body, path=out)
    log(f"wrote section '{SECTION}' to {out} and plots to {images}")
    print(result["headline"].replace("**", ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
