"""A trial's start-up, phase by phase: the phase arithmetic, the rung epochs that always
checkpoint, and (slow) a real sweep whose every trial logs every phase to MLflow."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ifsearch.search.cli import build_parser, plan_sweep
from trainables import startup

REPO = Path(__file__).resolve().parents[2]


def chain(step=1.0):
    """Marks one ``step`` apart, in the order they happen."""
    return {name: 100.0 + i * step for i, name in enumerate(startup.MARKS)}


def test_phases_tile_the_interval_and_the_total_leaves_out_the_epoch():
    marks = chain(step=0.5)
    phases = startup.phases(marks, epoch_seconds=0.3)
    names = [f"startup_{name}_s" for name, *_ in startup.PHASES]
    assert list(phases) == [*names, "startup_total_s"]
    assert all(phases[name] == pytest.approx(0.5) for name in names)
    span = marks["tune_result"] - marks["tune_add"]
    assert sum(phases[name] for name in names) == pytest.approx(span)
    assert phases["startup_total_s"] == pytest.approx(span - 0.3)


def test_a_missing_mark_gives_no_phases():
    marks = chain()
    del marks["backend_ready"]
    assert startup.phases(marks, 1.0) == {}


def test_marks_travel_as_prefixed_keys_and_are_removed():
    result = {"epoch": 1, **startup.as_metrics({"data_built": 5.0, "model_built": 6.0})}
    assert result["startup_at_data_built"] == 5.0
    assert startup.pop_marks(result) == {"data_built": 5.0, "model_built": 6.0}
    assert result == {"epoch": 1}


def _plan(tmp_path, scheduler, max_epochs, grace, reduction):
    space = {"base": {"data": {"num_points": 128}},
             "space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
             "objective": {"metric": "val_loss", "mode": "min"},
             "budget": {"num_samples": 2, "max_epochs": max_epochs, "grace_period": grace},
             "scheduler": {"name": scheduler,
                           **({"reduction_factor": reduction} if reduction else {})}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return plan_sweep(build_parser().parse_args(["--space", str(path)]))


@pytest.mark.parametrize("max_epochs,grace,reduction",
                         [(8, 2, 2), (8, 1, 2), (10, 1, 3), (27, 1, 3), (10, 1, 2.5), (4, 4, 2)])
def test_asha_rung_epochs_are_where_rays_asha_judges_trials(tmp_path, max_epochs, grace,
                                                           reduction):
    from ifsearch.search.sweep import build_scheduler, rung_epochs

    plan = _plan(tmp_path, "asha", max_epochs, grace, reduction)
    # Ray's own bracket: it judges a trial at its first reported epoch >= each milestone.
    (bracket,) = build_scheduler(plan)._brackets
    assert rung_epochs(plan) == tuple(sorted(math.ceil(m) for m, _ in bracket._rungs))


def test_hyperband_checkpoints_every_epoch_and_fifo_none(tmp_path):
    from ifsearch.search.sweep import rung_epochs

    assert rung_epochs(_plan(tmp_path, "hyperband", 5, 1, 2)) == (1, 2, 3, 4, 5)
    assert rung_epochs(_plan(tmp_path, "fifo", 5, 1, None)) == ()
    assert rung_epochs(_plan(tmp_path, "median", 5, 1, None)) == ()


# The phases a trial's start-up is cut into, written out here rather than taken from the code,
# so that a phase dropped from trainables/startup.py (or never logged) fails the test.
EXPECTED_PHASES = ("trial_actor", "train_controller", "worker_group", "train_context",
                   "backend_setup", "start_callbacks", "train_fn_launch", "dataset", "model",
                   "first_epoch", "first_report")

TINY_SPACE = {
    "base": {
        "data": {"num_points": 192, "train_scenes": 6, "val_scenes": 3, "max_instances": 3,
                 "batch_size": 3},
        "model": {"embed_dim": 16, "num_heads": 2, "ffn_dim": 32, "decoder_layers": 1},
    },
    "space": {"train.lr": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2}},
    "objective": {"metric": "val_loss", "mode": "min"},
    "budget": {"num_samples": 3, "max_epochs": 2, "grace_period": 1},
    "scheduler": {"name": "fifo"},
    "searcher": {"name": "random", "seed": 0},
}


@pytest.mark.slow
def test_every_trial_logs_every_startup_phase(tmp_path):
    """Three trials, two at a time (so the third reuses a finished trial's actor): each MLflow
    trial run holds every phase, none negative; the phases tile Tune's creation of the trial to
    its first result, and MLflow's own clocks (run start, first metric) fall inside that chain."""
    from mlflow.tracking import MlflowClient

    from ifsearch.tracking.runs import ROLE_TAG, tag_filter

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(TINY_SPACE))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = subprocess.run(
        [sys.executable, "-m", "ifsearch.launch", "--space", str(space), "--name", "phases",
         "--storage", str(tmp_path / "sweeps"), "--mlflow-uri", uri, "--experiment", "phases",
         "--max-concurrent", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("phases")
    trials = client.search_runs([experiment.experiment_id], tag_filter({ROLE_TAG: "trial"}))
    assert len(trials) == 3
    for trial in trials:
        metrics = trial.data.metrics
        phases = {name: metrics.get(f"startup_{name}_s") for name in EXPECTED_PHASES}
        assert None not in phases.values(), f"missing phases: {phases}"
        assert all(value >= 0 for value in phases.values()), phases
        assert not any(key.startswith("startup_at_") for key in metrics)  # raw marks dropped
        first = min(client.get_metric_history(trial.info.run_id, "epoch_seconds"),
                    key=lambda m: m.step)
        total = metrics["startup_total_s"]
        assert sum(phases.values()) == pytest.approx(total + first.value, abs=1e-6)
        # MLflow's own clock: the run opens when Tune has started the trial's actor, i.e. after
        # the trial's creation and before train_driver_fn runs (the first metric is logged a few
        # ms after Tune received the result, which dates the creation).
        created = first.timestamp / 1000 - (total + first.value)
        run_start = trial.info.start_time / 1000
        assert created - 0.05 <= run_start <= created + phases["trial_actor"] + 0.05


@pytest.mark.slow
def test_startup_benchmark_smoke_writes_its_section(tmp_path):
    """The benchmark's smoke mode: one tiny sweep, a phase table in a temporary file (never
    docs/), every phase row filled, and the machine's load said. No timing is checked."""
    docs = REPO / "docs" / "benchmarks.md"
    before = docs.read_text()
    out = tmp_path / "benchmarks.md"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "startup.py"), "--smoke-test",
                          "--out", str(out), "--label", "smoke"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert docs.read_text() == before
    body = out.read_text().split("<!-- begin startup -->")[1].split("<!-- end startup -->")[0]
    rows = [line for line in body.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| seconds: median") and "smoke, 1 at once" in rows[0]
    for name in EXPECTED_PHASES + ("**start-up**", "**report overhead per epoch**"):
        (row,) = [r for r in rows if f"`{name}`" in r.split("|")[1] or name in r.split("|")[1]]
        float(row.split("|")[2].split()[0])  # a median was measured ("-" if none)
    (total,) = [r for r in rows if "**start-up**" in r]
    median = total.split("|")[2].split()[0]
    assert f"**Goal (issue 13), latest run (smoke)**: median start-up {median} s at 1 at once" \
        in body
    assert "machine load: " in body
    assert (tmp_path / "startup.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["influencer", "hungarian"])
def test_only_a_hungarian_run_imports_the_assignment_solver(tmp_path, loss):
    """scipy.optimize (the Hungarian matcher's solver, ~0.3 s to import) stays off the start
    path of an Influencer trial's fresh worker; a Hungarian run still gets it when it matches."""
    code = ("import sys, trainables.worker\n"
            "from ifsearch.train import main\n"
            f"assert main([*sys.argv[1:], '--output-dir', {str(tmp_path)!r}]) == 0\n"
            "print('scipy.optimize' in sys.modules)\n")
    sets = ["loss.name=" + loss, "data.num_points=256", "data.train_scenes=2", "data.val_scenes=1",
            "model.embed_dim=16", "model.ffn_dim=32", "model.num_heads=2", "train.epochs=1",
            "train.device=cpu"]
    out = subprocess.run([sys.executable, "-c", code, *(a for s in sets for a in ("--set", s))],
                         cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.splitlines()[-1] == str(loss == "hungarian")
