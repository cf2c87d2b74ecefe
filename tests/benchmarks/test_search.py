"""Benchmarks: the search-efficiency bookkeeping exactly, both scripts' CLIs in smoke mode.

The smoke runs are real (local Ray, real launcher sweeps) but tiny, write to ``tmp_path`` only and
check the written table, never timings. Each script runs as a subprocess, as a user runs it, so
its Ray runtime ends with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import search_efficiency as se  # noqa: E402
from search_efficiency import Report, TrialInfo, read_sweep  # noqa: E402

LAUNCH = 1000.0  # the launcher's start, epoch seconds


def _trial(trial_id: str, start: float, values: list[float], epoch_s: float = 1.0) -> TrialInfo:
    """A trial whose first report comes 10 s after its start, then one every ``epoch_s``."""
    reports = [Report(trial_id, i + 1, v, start + 10 + i * epoch_s, epoch_s)
               for i, v in enumerate(values)]
    return TrialInfo(trial_id, start, 10.0, 10.0 - epoch_s, reports)


def _sweep(arm: se.Arm, seed: int, points: list[tuple[float, float]]) -> se.Sweep:
    """A sweep whose reports come at (seconds after the launch, value), one trial each."""
    trials = [TrialInfo(f"{arm.key}{seed}-{i}", LAUNCH + t - 1, 1.0, 0.5,
                        [Report(f"{arm.key}{seed}-{i}", 1, v, LAUNCH + t)])
              for i, (t, v) in enumerate(points)]
    return se.Sweep(arm, seed, se.sweep_name(arm, seed), {"launch_time": LAUNCH}, trials)


def test_incumbent_is_the_best_so_far_by_wall_clock_within_the_budget():
    # a reports at t = 10, 11, 12 (after the launch); b at 10.5, 11.5
    a = _trial("a", LAUNCH, [0.1, 0.2, 0.9])
    b = _trial("b", LAUNCH + 0.5, [0.5, 0.3])
    assert se.incumbent([a, b], LAUNCH, horizon=11.9) == [(10.0, 0.1), (10.5, 0.5)]
    assert se.incumbent([a, b], LAUNCH, horizon=12.0) == [(10.0, 0.1), (10.5, 0.5),
                                                          (12.0, 0.9)]
    # a loss: lower is better
    assert se.incumbent([a, b], LAUNCH, 100, mode="min") == [(10.0, 0.1)]


def test_time_to_reach_and_the_mean_curve_by_hand():
    curve = [(10.0, 0.2), (50.0, 0.4), (100.0, 0.5)]
    assert se.time_to_reach(curve, 0.4) == 50.0  # equal counts as reached
    assert se.time_to_reach(curve, 0.45) == 100.0
    assert se.time_to_reach(curve, 0.51) is None
    assert se.time_to_reach([(5.0, 3.0), (9.0, 1.0)], 2.0, mode="min") == 9.0
    other = [(20.0, 0.3), (80.0, 0.6)]
    # defined once both have reported (t = 20); then at every change of either
    expected = [(20.0, 0.25, 0.2, 0.3), (50.0, 0.35, 0.3, 0.4), (80.0, 0.5, 0.4, 0.6),
                (100.0, 0.55, 0.5, 0.6)]
    got = se.mean_curve([curve, other])
    assert len(got) == len(expected)
    for row, want in zip(got, expected, strict=True):
        assert row == pytest.approx(want)
    assert se.mean_curve([curve, []]) == []  # a seed that never reported: no mean


BASE = [[(10.0, 0.2), (50.0, 0.4), (100.0, 0.5)], [(20.0, 0.3), (80.0, 0.6)]]


def _result(goal: list[list[tuple[float, float]]]) -> dict:
    sweeps = [_sweep(se.BASELINE, seed, points) for seed, points in enumerate(BASE)]
    sweeps += [_sweep(se.GOAL_ARM, seed, points) for seed, points in enumerate(goal)]
    return se.analyse(sweeps, horizon=120.0, mode="max")


def test_time_to_reach_the_baselines_final_best_per_seed_and_on_the_mean():
    result = _result([[(5.0, 0.1), (30.0, 0.55)], [(15.0, 0.7)]])
    # target: mean of the baseline's final bests (0.5, 0.6); its mean curve gets there at 100 s
    assert result["target"] == pytest.approx(0.55)
    base, goal = result["arms"][se.BASELINE.key], result["arms"][se.GOAL_ARM.key]
    assert base["reach"] == 100.0
    # goal mean curve: 15 s -> (0.1 + 0.7) / 2 = 0.4; 30 s -> (0.55 + 0.7) / 2 = 0.625
    assert goal["reach"] == 30.0 and goal["ratio"] == pytest.approx(0.3)
    # per seed, against that seed's own baseline (0.5 reached by it at 100 s, 0.6 at 80 s)
    assert base["per_seed"][0]["reach"] == 100.0 and base["per_seed"][1]["reach"] == 80.0
    assert goal["per_seed"][0]["reach"] == 30.0
    assert goal["per_seed"][0]["ratio"] == pytest.approx(0.3)
    assert goal["per_seed"][1]["reach"] == 15.0
    assert goal["per_seed"][1]["ratio"] == pytest.approx(15 / 80)
    sentence = se.goal_sentence(result, "AP50", 2)
    assert sentence.startswith("**Goal met**: TPE + ASHA, ifsearch's searcher reached random "
                               "+ FIFO's final best (val AP50 0.550, mean over 2 seeds), which "
                               "random + FIFO itself reached after 100 s, after 30 s: 30% of")
    assert "reached on 2 of 2, within 50% of random + FIFO's time on 2 of 2." in sentence


def test_goal_sentence_when_too_slow_or_never():
    slow = _result([[(5.0, 0.1), (30.0, 0.55)], [(60.0, 0.7)]])
    goal = slow["arms"][se.GOAL_ARM.key]
    assert goal["reach"] == 60.0  # the mean exists from 60 s: (0.55 + 0.7) / 2
    sentence = se.goal_sentence(slow, "AP50", 2)
    assert sentence.startswith("**Goal not met**") and "after 60 s: 60% of" in sentence
    assert "reached on 2 of 2, within 50% of random + FIFO's time on 1 of 2." in sentence
    never = _result([[(5.0, 0.1), (30.0, 0.45)], [(15.0, 0.5)]])
    sentence = se.goal_sentence(never, "AP50", 2)
    assert sentence.startswith("**Goal not met**: TPE + ASHA, ifsearch's searcher did not "
                               "reach random + FIFO's final best")
    assert "within the 120 s budget (its mean best: 0.475)" in sentence
    assert "reached on 0 of 2" in sentence  # 0.45 < 0.5 and 0.5 < 0.6
    # the baseline never reported in one seed: no target, no verdict
    empty = se.analyse([_sweep(se.BASELINE, 0, []), _sweep(se.GOAL_ARM, 0, [(5.0, 0.9)])],
                       horizon=120.0, mode="max")
    assert se.goal_sentence(empty, "AP50", 1).startswith("**No answer**")


def test_shortfall_says_where_the_allowed_time_went_only_when_the_goal_is_missed():
    goal = [[(5.0, 0.1), (30.0, 0.55)], [(60.0, 0.7)]]
    sweeps = [_sweep(se.BASELINE, seed, points) for seed, points in enumerate(BASE)]
    sweeps += [_sweep(se.GOAL_ARM, seed, points) for seed, points in enumerate(goal)]
    slow = se.analyse(sweeps, horizon=120.0, mode="max")
    sentence = se.shortfall_sentence(sweeps, slow, "AP50")
    # allowed: 50 % of the baseline's 100 s; first reports 10, 20, 5, 60 s: median 15 s;
    # the baseline's mean curve stops improving at 100 s of 120; the goal arm ends at 0.625
    assert "the goal allows 50 s (50% of 100 s)" in sentence
    assert "came 15 s after its launcher started (median over 4 sweeps" in sentence
    assert "leaving 35 s" in sentence and "did not improve in the last 20 s" in sentence
    assert "mean best was val AP50 0.625, better than that target (0.550)" in sentence
    met = _result([[(5.0, 0.1), (30.0, 0.55)], [(15.0, 0.7)]])
    assert se.shortfall_sentence(sweeps, met, "AP50") == ""


def test_the_written_space_is_the_same_in_every_checkout(tmp_path):
    """Its bytes feed the settings hash that guards a work folder: no absolute path in it."""
    args = types.SimpleNamespace(max_epochs=None, grace_period=None)
    source = REPO / "search_spaces" / "influencer_default.yaml"
    text = se.write_space(source, tmp_path, se.MODES["full"], args).read_text()
    assert str(REPO) not in text
    assert "from search_spaces/influencer_default.yaml:" in text


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
    lines = []
    for line in body.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break  # the end of the first table
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
    assert float(rows[1]["Ray's other processes (cores)"]) > 0  # at least raylet ran
    assert rows[0]["machine"] in ("idle", "**busy**")
    assert "Goal (< 10% overhead for one worker)" in text
    assert "- ray-1: machine load: " in text and "Ray's busiest other processes" in text
    assert (tmp_path / "img" / "throughput.png").stat().st_size > 0


@pytest.mark.slow
def test_search_efficiency_smoke_writes_its_section_and_a_rerun_skips(tmp_path):
    out, work = tmp_path / "benchmarks.md", tmp_path / "work"
    text = _run("search_efficiency.py", out, "--workdir", str(work), timeout=600)
    rows = _table(text, "search_efficiency")
    assert [r["arm"] for r in rows] == [a.label for a in se.ARMS]
    for row in rows:
        assert row["seeds"] == "1"
        best = row["best val AP50 at 60 s, mean ± std [min .. max]"]
        assert best == "n/a" or 0.0 <= float(best.split()[0]) <= 1.0
    body = text.split("<!-- begin search_efficiency -->")[1]
    assert any(goal in body for goal in ("**Goal met**", "**Goal not met**", "**No answer**"))
    assert "### Were ASHA's rungs trustworthy?" in body
    assert "| arm | rung epoch |" in body
    # every arm's launcher ran the right searcher: Ray's arm persisted Ray's study
    for arm in se.ARMS:
        log = (work / "logs" / f"{se.sweep_name(arm, 0)}.log").read_text()
        assert f"--searcher-impl {arm.impl}" in log and f"{arm.searcher} + {arm.scheduler}" in log
        assert (work / f"{se.sweep_name(arm, 0)}.json").exists()
    assert (tmp_path / "img" / "search_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    # A rerun finds every sweep finished: it only rebuilds the section.
    stamps = {p: p.stat().st_mtime for p in (work / "logs").iterdir()}
    again = subprocess.run([sys.executable, str(BENCHMARKS / "search_efficiency.py"),
                            "--smoke-test", "--out", str(out), "--workdir", str(work)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "3 finished earlier; 0 to run" in again.stdout
    assert {p: p.stat().st_mtime for p in (work / "logs").iterdir()} == stamps
    # ... and refuses to mix sweeps of another budget into the same folder
    other = subprocess.run([sys.executable, str(BENCHMARKS / "search_efficiency.py"),
                            "--smoke-test", "--wall", "30", "--workdir", str(work)],
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "wall_s: 60.0 -> 30.0" in other.stderr


def test_idle_is_judged_on_other_processes_cpu_not_the_load_average_before():
    """A load average left by the benchmark's own previous mode does not make a run 'busy';
    other processes using half a core does."""
    from load import OtherLoad

    load = OtherLoad()
    load.cores, load.loadavg_before = 0.02, 2.0
    assert not load.busy and "idle" in load.verdict()
    load.cores = 0.5
    assert load.busy and "NOT idle" in load.verdict()


def _fifo_histories(rung_values: dict[str, list[float]], final: list[float]) -> dict:
    """Trials t0..tn: each candidate's value at epoch 2 and AP50 at the last epoch (4)."""
    histories = {}
    for i, final_value in enumerate(final):
        at_rung = {metric: values[i] for metric, values in rung_values.items()}
        histories[f"t{i}"] = {2: at_rung, 4: {**at_rung, "AP50": final_value}}
    return histories


def test_rung_metric_choice_prunes_where_the_objective_ties_at_zero():
    import rung_metric as rm

    settings = rm.SpaceSettings("space", "AP50", "max", max_epochs=4, rungs=(2,),
                                reduction_factor=2, configured="AP50")
    final = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    histories = _fifo_histories({
        "AP50": [0.0] * 8,  # the class head has not learnt yet: every trial tied at 0
        "AP50_agnostic": [0.05, 0.1, 0.2, 0.15, 0.3, 0.35, 0.5, 0.4],  # the masks separate them
        "AP25": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
        "val_loss": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],  # lower is better: ranks backwards
    }, final)
    rows = {r["metric"]: r for r in rm.judge(histories, settings)}
    # By hand: ASHA's cutoff is the median; a trial is stopped when strictly worse than it.
    assert rows["AP50"]["rungs"][0]["stopped"] == 0 and not rows["AP50"]["prunes"]
    # The agnostic AP's median is (0.2 + 0.3) / 2 = 0.25: t0..t3 are below it, and t3 is the
    # 5th best at the end (final top 5 = t3..t7).
    assert [r["stopped"] for r in rows["AP50_agnostic"]["rungs"]] == [4]
    assert rows["AP50_agnostic"]["top_stopped"] == 1
    # AP25 ranks exactly as the end does; its cutoff (0.45) stops t3 as well (8 trials, a top 5
    # and half stopped: some top-5 trial always goes), so the tie is broken by the Spearman.
    assert rows["AP25"]["top_stopped"] == 1 and rows["AP25"]["mean_spearman"] == 1.0
    assert rows["val_loss"]["top_stopped"] == 4  # keeps the four worst, stops t4..t7
    assert [r["best_stopped"] for r in rows["val_loss"]["rungs"]] == [True]  # t7 among them
    assert [r["best_stopped"] for r in rows["AP25"]["rungs"]] == [False]
    assert rm.choose(list(rows.values()))["metric"] == "AP25"
    # Without AP25 the agnostic AP wins over the backwards val_loss and the non-pruning AP50.
    rows.pop("AP25")
    assert rm.choose(list(rows.values()))["metric"] == "AP50_agnostic"


def test_throughput_judges_each_ray_mode_against_the_plain_loop_on_the_same_threads():
    import throughput as tp

    def measured(mode, workers, threads, points_per_second):
        epochs = [{"points_per_second": points_per_second, "epoch_seconds": 1.0}] * 3
        return tp.Measurement(mode, workers, threads, epochs, wall_s=10.0)

    text = tp.render([measured("plain", 0, 2, 16000), measured("plain-1t", 0, 1, 10000),
                      measured("ray-1", 1, 2, 12000), measured("ray-1-1t", 1, 1, 9500),
                      measured("ray-2", 2, 1, 15000)], {"cores": 2}, tp.FULL_DATA, 3, None)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| Ray Train")]
    # By hand: 1 - 12000/16000, 1 - 9500/10000 (one thread each), 1 - 15000/16000.
    assert [row[6] for row in rows] == ["25.0 %", "5.0 %", "6.2 %"]
    assert "**Goal (< 10% overhead for one worker): not met**" in text
    assert "**Goal at one torch thread (a sweep's default trial): met**" in text
