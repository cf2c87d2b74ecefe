"""Benchmarks: the search-efficiency bookkeeping exactly, both scripts' CLIs in smoke mode.

The smoke runs are real (local Ray, real launcher sweeps) but tiny, write to ``tmp_path`` only and
check the written table, never timings. Each script runs as a subprocess, as a user runs it, so
its Ray runtime ends with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from search_efficiency import Report, TrialInfo, budget_curve, read_sweep  # noqa: E402


def _trial(trial_id: str, start: float, values: list[float], epoch_s: float = 1.0) -> TrialInfo:
    """A trial whose first report comes 10 s after its start, then one every ``epoch_s``."""
    reports = [Report(trial_id, i + 1, v, start + 10 + i * epoch_s, epoch_s)
               for i, v in enumerate(values)]
    return TrialInfo(trial_id, start, 10.0, 10.0 - epoch_s, reports)


def test_budget_curve_cuts_reports_by_wall_clock_time():
    # a reports at t = 10, 11, 12; b at t = 10.5, 11.5: by time a1 b1 a2 b2 | a3 (cut)
    a = _trial("a", 0.0, [0.1, 0.2, 0.9])
    b = _trial("b", 0.5, [0.5, 0.3])
    curve = budget_curve([a, b], budget=4)
    assert [(r.trial_id, r.epoch) for _, _, r in curve] == [("a", 1), ("b", 1), ("a", 2),
                                                            ("b", 2)]
    assert [used for used, _, _ in curve] == [1, 2, 3, 4]
    assert [best for _, best, _ in curve] == [0.1, 0.5, 0.5, 0.5]  # a's 0.9 is over budget


def test_read_sweep_uses_tune_start_time_and_first_result(tmp_path):
    sweep = tmp_path / "sweep"
    trial_dir = sweep / "train_driver_fn_abc_1"
    trial_dir.mkdir(parents=True)
    rows = [
        {"epoch": 1, "AP50": 0.0, "epoch_seconds": 2.0, "trial_id": "abc",
         "timestamp": 1030, "time_total_s": 30.25},
        {"epoch": 2, "AP50": 0.25, "epoch_seconds": 2.0, "trial_id": "abc",
         "timestamp": 1032, "time_total_s": 32.5},
    ]
    (trial_dir / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    state = {"trial_data": [[json.dumps({"trial_id": "abc"}), json.dumps({"start_time": 1000.0})]]}
    (sweep / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))

    (trial,) = read_sweep(sweep)
    assert trial.start == 1000.0
    assert trial.first_report_s == 30.25
    assert trial.startup_s == pytest.approx(28.25)  # minus the first epoch's own time
    assert [(r.epoch, r.value, r.time) for r in trial.reports] == [(1, 0.0, 1030.25),
                                                                   (2, 0.25, 1032.5)]
    # Without the state file the start falls back to timestamp - time_total_s.
    next(sweep.glob("experiment_state-*")).unlink()
    assert read_sweep(sweep)[0].start == pytest.approx(1030 - 30.25)


def _run(script: str, out: Path, *args: str, timeout: float) -> str:
    docs = REPO / "docs" / "benchmarks.md"
    before = docs.read_text() if docs.exists() else None
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke-test", "--out",
                          str(out), *args], cwd=out.parent, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (docs.read_text() if docs.exists() else None) == before  # smoke never writes docs/
    return out.read_text()


def _table(text: str, section: str) -> list[dict[str, str]]:
    """The first markdown table of a section, as one dict per row."""
    body = text.split(f"<!-- begin {section} -->")[1].split(f"<!-- end {section} -->")[0]
    lines = [line for line in body.splitlines() if line.startswith("|")]
    headers = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(headers, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in lines[2:]]


@pytest.mark.slow
def test_throughput_smoke_writes_its_section(tmp_path):
    out = tmp_path / "benchmarks.md"
    text = _run("throughput.py", out, "--modes", "plain,ray-1", "--epochs", "1", timeout=240)
    rows = _table(text, "throughput")
    assert list(rows[0]) == ["mode", "workers", "torch threads/worker",
                             "train points/s (median, steady)", "epoch s (median, steady)",
                             "run wall-clock s", "overhead vs plain (points/s)",
                             "wall-clock vs plain", "Ray's other processes (cores)", "machine"]
    assert [(r["mode"], r["workers"]) for r in rows] == [("plain loop", "- (no Ray)"),
                                                         ("Ray Train", "1")]
    for row in rows:
        assert float(row["train points/s (median, steady)"].replace(",", "")) > 0
        assert float(row["run wall-clock s"]) > 0
    assert rows[1]["overhead vs plain (points/s)"].endswith("%")
    assert float(rows[1]["Ray's other processes (cores)"]) > 0  # at least the controller ran
    assert rows[0]["machine"] in ("idle", "**busy**")
    assert "Goal (< 10% overhead for one worker)" in text
    assert "- ray-1: machine load: " in text and "ray::TrainController" in text
    assert (tmp_path / "img" / "throughput.png").stat().st_size > 0


@pytest.mark.slow
def test_search_efficiency_smoke_writes_its_section(tmp_path):
    out = tmp_path / "benchmarks.md"
    text = _run("search_efficiency.py", out, timeout=300)
    rows = _table(text, "search_efficiency")
    assert list(rows[0]) == ["strategy", "seed", "trials run", "trial-epochs used (budget)",
                             "best AP50 within budget",
                             "budget to reach 90% of best (trial-epochs)",
                             "median start-up overhead s", "median time to first report s",
                             "wall-clock to spend budget s"]
    assert sorted(r["strategy"] for r in rows) == ["TPE + ASHA", "random + FIFO"]
    for row in rows:
        used, budget = row["trial-epochs used (budget)"].replace("(", "").rstrip(")").split()
        assert 1 <= int(used) <= int(budget) == 2
        assert 1 <= int(row["trials run"]) <= 2
        assert 0.0 <= float(row["best AP50 within budget"]) <= 1.0
        assert float(row["median start-up overhead s"]) > 0
        assert float(row["median time to first report s"]) >= float(
            row["median start-up overhead s"])
    assert (tmp_path / "img" / "search_efficiency.png").stat().st_size > 0
