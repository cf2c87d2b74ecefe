"""benchmarks/study.py: its verdict, statistics, flips, spaces and resume logic on hand-made
inputs, then end to end in --smoke-test mode (interrupted, resumed, rerun, with the GPU recipe's
flags)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import study  # noqa: E402
import study_report as sr  # noqa: E402

from ifsearch.search.space import load_search_space  # noqa: E402


def _run(variant: str, seed: int, ap50: list[float], seconds: float = 2.0, **final) -> sr.Run:
    """A retrain whose AP50 goes through ``ap50``, one epoch each, ``seconds`` per epoch."""
    history = [{"epoch": e, "AP50": v, "AP": v / 2, "epoch_seconds": seconds,
                "duplicate_rate": 0.1, "unclaimed_rate": 0.2}
               for e, v in enumerate(ap50, start=1)]
    history[-1].update(final)
    return sr.Run(variant, seed, history)


# ------------------------------------------------------------------------- the interval


def test_welch_interval_matches_the_textbook_formula():
    from scipy.stats import t

    a, b = [1.0, 2.0, 3.0], [4.0, 6.0, 8.0]
    # By hand: means 2 and 6, variances 1 and 4, n = 3 each.
    se = math.sqrt(1 / 3 + 4 / 3)
    df = (1 / 3 + 4 / 3) ** 2 / ((1 / 3) ** 2 / 2 + (4 / 3) ** 2 / 2)  # Welch-Satterthwaite
    half = t.ppf(0.975, df) * se
    got = sr.welch_interval(a, b)
    assert got["diff"] == pytest.approx(-4.0)
    assert got["low"] == pytest.approx(-4.0 - half) and got["high"] == pytest.approx(-4 + half)
    assert got["low"] < 0 < got["high"]  # 3 seeds this spread apart: no winner


def test_interval_needs_two_seeds_a_side():
    got = sr.welch_interval([0.8], [0.5, 0.6])
    assert got["diff"] == pytest.approx(0.25) and got["low"] is None
    assert sr.reading(got, higher_is_better=True) == "level"


def test_reading_follows_the_direction_of_better():
    ahead = {"diff": 0.2, "low": 0.1, "high": 0.3, "p": 0.01}
    assert sr.reading(ahead, higher_is_better=True) == "ahead"
    assert sr.reading(ahead, higher_is_better=False) == "behind"  # e.g. more duplicates
    assert sr.reading({**ahead, "low": -0.1}, True) == "level"


# --------------------------------------------------------------------------- the verdict


def test_verdict_names_the_winner_when_clearly_separated():
    inf = [_run("influencer", s, [0.1, 0.4, v], AP50_agnostic=0.9) for s, v in
           enumerate([0.50, 0.52, 0.51])]
    hun = [_run("hungarian", s, [0.6, 0.7, v], AP50_agnostic=0.91) for s, v in
           enumerate([0.80, 0.81, 0.79])]
    result = sr.verdict(inf, hun)
    assert result["headline"].startswith("**The Hungarian baseline wins on final AP50**")
    assert "excludes 0" in result["headline"] and "3 vs 3 seeds" in result["headline"]
    assert "-0.290 [" in result["headline"]  # 0.51 - 0.80, then its interval
    # the Influencer runs reach AP50 0.5 at epoch 3 vs 1 for Hungarian: behind on speed
    behind = result["where"].split("behind on ")[1].split(". level on")[0]
    assert "final AP50" in behind and "epochs to AP50 ≥ 0.5" in behind
    assert "seconds per epoch" in result["where"].split("level on ")[1]  # equal seconds


def test_verdict_says_level_when_the_interval_includes_zero():
    inf = [_run("influencer", s, [0.2, v]) for s, v in enumerate([0.70, 0.80, 0.75])]
    hun = [_run("hungarian", s, [0.2, v]) for s, v in enumerate([0.78, 0.72, 0.74])]
    result = sr.verdict(inf, hun)
    assert result["headline"].startswith("**Level on final AP50**")
    assert "includes 0" in result["headline"]
    assert "wins" not in result["headline"]
    assert "Class-agnostic AP50: not reported by this build" in result["headline"]


def test_verdict_with_one_seed_names_no_winner():
    result = sr.verdict([_run("influencer", 0, [0.9])], [_run("hungarian", 0, [0.1])])
    assert result["headline"].startswith("**Level on final AP50** (no interval: one seed")
    assert "ahead on nothing" in result["where"] and "behind on nothing" in result["where"]


def test_verdict_influencer_ahead_on_duplicates_only():
    inf = [_run("influencer", s, [0.5, 0.6], duplicate_rate=d) for s, d in
           enumerate([0.01, 0.02, 0.0])]
    hun = [_run("hungarian", s, [0.5, 0.6], duplicate_rate=d) for s, d in
           enumerate([0.30, 0.35, 0.32])]
    result = sr.verdict(inf, hun)
    ahead = result["where"].split("ahead on ")[1].split(". behind on")[0]
    assert ahead.startswith("duplicate rate")


def test_never_reaching_counts_as_one_epoch_past_the_end():
    run = _run("influencer", 0, [0.1, 0.2, 0.3], seconds=4.0)
    assert run.reach(0.5) is None
    assert run.reach_censored(0.5) == (4.0, 16.0, False)
    assert _run("hungarian", 0, [0.1, 0.6]).reach(0.5) == (2, 4.0)


# ---------------------------------------------------------------------------------- flips


def test_flips_are_the_other_values_of_each_factor():
    best = {"loss.mask_prob": "softmax", "loss.class_target": "best_query",
            "loss.deep_supervision": True, "loss.spill_weight": 0.3,
            "loss.duplicate_weight": 0.0, "loss.mean": "geometric"}
    got = {variant: override for variant, _, override in study.flips(best, tuple(study.ABLATIONS))}
    assert got == {
        "flip-mask_prob-sigmoid": "loss.mask_prob=sigmoid",
        "flip-mean-arithmetic": "loss.mean=arithmetic",
        "flip-class_target-threshold": "loss.class_target=threshold",
        "flip-class_target-soft": "loss.class_target=soft",
        "flip-deep_supervision-false": "loss.deep_supervision=false",
        "flip-spill_weight-off": "loss.spill_weight=0.0",
        "flip-duplicate_weight-on": f"loss.duplicate_weight={study.ON_WEIGHT}",
    }
    assert study.count_flips(tuple(study.ABLATIONS)) == len(got)


def test_every_flip_is_a_valid_override_of_this_build():
    """Every ablation, from either side of each factor, makes a config this build accepts."""
    from ifsearch.config import Config, apply_overrides, config_from_dict, config_to_dict

    for best in ({"loss.mask_prob": "sigmoid", "loss.mean": "geometric",
                  "loss.class_target": "threshold", "loss.deep_supervision": True,
                  "loss.spill_weight": 0.0, "loss.duplicate_weight": 0.5},
                 {"loss.mask_prob": "softmax", "loss.mean": "arithmetic",
                  "loss.class_target": "soft", "loss.deep_supervision": False,
                  "loss.spill_weight": 1.0, "loss.duplicate_weight": 0.0}):
        made = study.flips(best, tuple(study.ABLATIONS))
        assert len(made) == study.count_flips(tuple(study.ABLATIONS))
        for _, _, override in made:
            key, value = override.split("=")
            section, name = key.split(".")
            config = config_from_dict(apply_overrides(config_to_dict(Config()), [override]))
            assert str(getattr(getattr(config, section), name)).lower() == value.lower()
    assert set(study.SMOKE_ABLATIONS) <= set(study.ABLATIONS)


# --------------------------------------------------------------------------------- spaces


def _space(name: str) -> dict:
    return yaml.safe_load(study.SPACES[name].read_text())


def test_study_spaces_are_fair():
    inf, hun = _space("influencer"), _space("hungarian")
    assert inf["base"]["data"] == hun["base"]["data"]
    assert inf["base"]["model"] == hun["base"]["model"]
    assert inf["base"]["train"] == hun["base"]["train"]
    for key in ("objective", "budget", "scheduler", "searcher"):
        assert inf[key] == hun[key], key
    for key in ("train.lr", "loss.class_weight", "loss.no_object_weight",
                "loss.deep_supervision"):
        assert inf["space"][key] == hun["space"][key], key
    assert "model.num_queries" not in inf["space"] and "model.num_queries" not in hun["space"]
    data = inf["base"]["data"]
    assert data["num_points"] >= 1024 and data["train_scenes"] >= 64 and data["val_scenes"] >= 32
    budget = study.BUDGETS["full"]
    assert budget.num_samples >= 32 and budget.max_epochs >= 60 and budget.grace_period >= 10
    assert budget.epochs >= 100 and len(budget.seeds) >= 5 and len(budget.ablation_seeds) >= 3
    # the Influencer side searches every ablation of the study
    assert set(study.ABLATIONS) <= set(inf["space"])


def test_effective_space_carries_the_budget_and_the_rung_metric(tmp_path):
    """The written space holds the mode's budget and scheduler, and the launcher reads them."""
    from argparse import Namespace

    from ifsearch.search.cli import parse_rung_metric
    from ifsearch.search.searcher import build_scheduler

    text = study.SPACES["influencer"].read_text()
    full = study.effective_space(text, study.BUDGETS["full"])
    raw = yaml.safe_load(full)
    assert raw["space"] == _space("influencer")["space"]  # every line as the source has it
    assert raw["budget"] == {"num_samples": 32, "max_epochs": 60, "grace_period": 10}
    assert raw["scheduler"] == {"name": "asha", "reduction_factor": 3,
                                "metric": "AP50_agnostic", "mode": "max"}
    path = tmp_path / "full.yaml"
    path.write_text(full)
    space = load_search_space(path)
    assert parse_rung_metric(None, space, "asha") == ("AP50_agnostic", "max")
    plan = Namespace(rung_metric="AP50_agnostic", rung_mode="max", space=space, max_epochs=60,
                     grace_period=10, scheduler="asha")
    asha = build_scheduler(plan)  # Ray's own scheduler object, as the launcher builds it
    assert (asha._metric, asha._mode, asha._reduction_factor) == ("AP50_agnostic", "max", 3)
    # the smoke mode judges on the objective itself: no scheduler.metric at all
    smoke = yaml.safe_load(study.effective_space(text, study.BUDGETS["smoke"]))
    assert smoke["scheduler"] == {"name": "asha", "reduction_factor": 2}
    # a rung metric with its direction from the CLI reaches the file
    args = study.build_parser().parse_args(["--quick", "--rung-metric", "val_loss:min"])
    _, budget = study.resolve_budget(args)
    lower = yaml.safe_load(study.effective_space(text, budget))["scheduler"]
    assert (lower["metric"], lower["mode"]) == ("val_loss", "min")
    path.write_text(study.effective_space(text, budget))
    assert load_search_space(path).scheduler["mode"] == "min"


def test_rung_metric_without_a_direction_is_refused():
    args = study.build_parser().parse_args(["--quick", "--rung-metric", "val_loss"])
    with pytest.raises(study.StudyError, match="--rung-metric val_loss:max"):
        study.resolve_budget(args)
    args = study.build_parser().parse_args(["--quick", "--rung-metric", "AP50"])
    assert study.resolve_budget(args)[1].rung_metric == "AP50"  # the objective: its own mode


def test_spaces_table_lists_every_searched_parameter(tmp_path):
    spaces = {}
    for loss in study.LOSSES:
        text = study.effective_space(study.SPACES[loss].read_text(), study.BUDGETS["smoke"])
        (tmp_path / f"{loss}.yaml").write_text(text)
        spaces[loss] = load_search_space(tmp_path / f"{loss}.yaml")
    table = sr.spaces_table(spaces)
    for loss, space in spaces.items():
        for key in space.params:
            assert f"| `{key}` |" in table
    assert "| `train.lr` | loguniform 0.0001 .. 0.01 | loguniform 0.0001 .. 0.01 |" in table
    assert "| `loss.mask_weight` | not searched | loguniform 1 .. 20 |" in table
    assert ("| `loss.claim_threshold` | loguniform 0.05 .. 0.9 (when loss.class_target = "
            "threshold) | not searched |") in table


# ------------------------------------------------------------------------ resume logic


def test_sweep_action_reads_the_folder(tmp_path):
    work = study.Work(tmp_path, str(tmp_path / "sweeps"))
    folder = tmp_path / "sweeps" / "study-influencer"
    assert study.sweep_action(work, "influencer") == "fresh"
    folder.mkdir(parents=True)
    assert study.sweep_action(work, "influencer") == "fresh"  # no Tune state saved yet
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    assert study.sweep_action(work, "influencer") == "resume"
    (folder / "best_config.yaml").write_text("{}")
    assert study.sweep_action(work, "influencer") == "done"


def test_retrain_history_is_complete_only_with_every_epoch(tmp_path):
    rows = [{"epoch": 1, "AP50": 0.1}, {"epoch": 2, "AP50": 0.2}, {"epoch": 2, "AP50": 0.3},
            {"epoch": 4, "AP50": 0.4}]  # epoch 2 rerun after a resume; epoch 3 missing
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    history = study.read_history(tmp_path)
    assert [m["AP50"] for m in history] == [0.1, 0.3, 0.4]
    assert not study.retrain_done(history, 4)
    assert not study.retrain_done(history, 3)  # three epochs, but not 1..3
    assert study.retrain_done(history[:2], 2)


def test_expected_trial_epochs_by_hand():
    # 32 trials to epoch 10, a third on to 30, a ninth on to 60
    assert study.expected_trial_epochs(study.BUDGETS["full"]) == pytest.approx(
        32 * 10 + 32 / 3 * 20 + 32 / 9 * 30)


def test_a_second_study_in_one_folder_is_refused(tmp_path):
    work = study.Work(tmp_path, str(tmp_path / "sweeps"))
    with study.study_lock(work):
        assert study.lock_holder(work) == os.getpid()
        with pytest.raises(study.StudyError, match="another study .* is running"), \
                study.study_lock(work):
            pass
    assert study.lock_holder(work) is None


def test_a_changed_budget_is_refused(tmp_path):
    work = study.Work(tmp_path, str(tmp_path / "sweeps"))
    study.check_fingerprint(work, {"budget": {"epochs": 100}, "spaces": {"a": "1"}})
    study.check_fingerprint(work, {"budget": {"epochs": 100}, "spaces": {"a": "1"}})
    with pytest.raises(study.StudyError, match="budget.epochs: 100 -> 30"):
        study.check_fingerprint(work, {"budget": {"epochs": 30}, "spaces": {"a": "1"}})


def test_recipe_runs_with_the_same_flags_locally():
    cluster = [a.split("=")[0] if a.startswith("--launch-arg") else a
               for a in study.recipe_args(local=False) if a.startswith("--")]
    local = [a.split("=")[0] if a.startswith("--launch-arg") else a
             for a in study.recipe_args(local=True, tmp="/x") if a.startswith("--")]
    dropped = [flag for flag, _, smoke in study.RECIPE if smoke is None]
    assert dropped == ["--launch-arg"]  # only --address=auto
    assert sorted(local + dropped) == sorted(cluster)
    assert "--launch-arg=--address=auto" in study.recipe_args(local=False)
    assert "--launch-arg=--gpus-per-worker=1" in study.recipe_args(local=False)


@pytest.mark.slow
def test_an_interrupted_retrain_resumes_from_its_checkpoint(tmp_path):
    """A retrain stopped after epoch 1 (checkpoint + one metrics line) continues at epoch 2."""
    from ifsearch.config import Config, save_config

    config = Config()
    config.data.num_points, config.data.train_scenes, config.data.val_scenes = 256, 4, 2
    config.model.embed_dim, config.model.ffn_dim = 16, 32
    config.train.num_threads = 1
    path = save_config(config, tmp_path / "best.yaml")
    work = study.Work(tmp_path / "work", str(tmp_path / "work" / "sweeps"))
    task = study.Task("influencer", "x", path, (), 0, "influencer")
    budget = study.Budget(1, 1, 1, 2, "AP50", 2, (0,), (0,), ())
    folder = work.retrain("influencer", 0)
    # The state an interrupted run leaves: a checkpoint and the metrics of epoch 1.
    subprocess.run([sys.executable, "-m", "ifsearch.train", "--config", str(path), "--set",
                    f"train.output_dir={folder}", "--set", "train.epochs=1"],
                   env=dict(os.environ, PYTHONPATH=str(REPO)), check=True,
                   capture_output=True, timeout=300)
    assert len(study.read_history(folder)) == 1 and (folder / "checkpoint.pt").exists()

    # The script's own parser: a stand-in for its arguments would miss options added later.
    args = study.build_parser().parse_args(["--progress-every", "1e9", "--retrain-threads", "1"])
    lines = []
    study.run_retrains([task], work, budget, args, lines.append, lambda: "?")
    history = study.read_history(folder)
    assert [m["epoch"] for m in history] == [1, 2]
    assert history[1]["start_epoch"] == 2  # epoch 2 came from the resumed process
    resumed_command = (folder / "train.log").read_text().splitlines()
    assert any("train.num_threads=1" in line for line in resumed_command if line.startswith("$"))
    assert any("resuming after epoch 1" in line for line in lines)
    assert not (folder / "checkpoint.pt").exists()  # finished: only the metrics are kept

    lines.clear()
    study.run_retrains([task], work, budget, args, lines.append, lambda: "?")
    assert any("1 finished earlier; 0 to run" in line for line in lines)


# --------------------------------------------------------------------------- end to end


def _processes_in(path: Path) -> list[str]:
    """Live processes running in ``path`` (cwd) or naming it: a left-over Ray or launcher."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(path)) or str(path) in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


@pytest.mark.slow
def test_smoke_study_interrupted_resumed_and_rerun(tmp_path):
    """The GPU recipe's command line at smoke size: stopped mid-sweep, resumed, rerun."""
    out, images, work = tmp_path / "benchmarks.md", tmp_path / "img", tmp_path / "work"
    cmd = [sys.executable, "benchmarks/study.py", *study.recipe_args(local=True, tmp=tmp_path),
           "--smoke-test", "--out", str(out), "--images", str(images), "--progress-every", "30"]
    env = dict(os.environ, RAY_DEDUP_LOGS="0", PYTHONPATH=str(REPO))

    # 1. Interrupted (Ctrl-C / kill) once the Influencer sweep's first Train run is starting
    # (Train makes the sweep's train/ folder): the smoke trials' epochs take a fraction of a
    # second, so waiting for a reported epoch or checkpoint races the sweep's end.
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    sweep = work / "sweeps" / "study-influencer"
    while time.time() < deadline and first.poll() is None and \
            not (sweep / "train").exists():
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    text = first.communicate(timeout=300)[0]
    assert first.returncode == 130, text[-3000:]
    assert "run the same command again to continue" in text
    assert _processes_in(tmp_path) == []
    status = subprocess.run([*cmd, "--status"], check=False, cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert "not running" in status.stdout and "sweep influencer: resume" in status.stdout

    # 2. Rerun: the sweep resumes, the rest runs, the section is written.
    second = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "sweep influencer: resuming" in second.stdout
    assert "sweep hungarian: starting" in second.stdout
    assert "0 finished earlier" in second.stdout
    assert "time left" in second.stdout
    section = out.read_text()
    section = section[section.index("<!-- begin study -->"):section.index("<!-- end study -->")]
    assert "on final AP50**" in section  # the generated verdict
    assert "| parameter | influencer space | hungarian space |" in section
    assert "| `loss.mask_prob` | choice: sigmoid, softmax | not searched |" in section
    assert "| loss | space | trials |" in section
    assert "| aspect | Influencer | Hungarian | difference [95 % interval, Welch]" in section
    assert "| Influencer best, loss.mask_prob = " in section  # the ablation row
    assert "| population | rung metric | rung epoch |" in section
    assert "| influencer | 1 | `" in section and "| hungarian | 1 | `" in section
    assert "--launch-arg=--address=auto" in section and "--gpus-per-worker=1" in section
    for name in study.PLOTS.values():
        assert (images / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](img/{name})" in section
    metrics = work / "retrain" / "hungarian" / "seed0" / "metrics.jsonl"
    stamp = metrics.stat().st_mtime

    # 3. Rerun again: nothing left to train; the section is rebuilt from the folder.
    third = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-4000:] + third.stderr[-4000:]
    for loss in ("influencer", "hungarian"):
        assert f"sweep {loss}: finished earlier" in third.stdout
    assert "0 to run" in third.stdout
    assert metrics.stat().st_mtime == stamp
    assert _processes_in(tmp_path) == []  # the launchers and their local Ray are gone


def test_later_set_of_a_key_wins():
    args = study.build_parser().parse_args(["--smoke-test", "--set", "data.num_points=512",
                                            "--set", "train.lr=0.01"])
    _, budget = study.resolve_budget(args)
    assert budget.sets.count("data.num_points=512") == 1
    assert not any(s == "data.num_points=256" for s in budget.sets)
    assert "train.lr=0.01" in budget.sets


def test_time_left_uses_the_measured_sweep_rate(tmp_path):
    work = study.Work(tmp_path, str(tmp_path / "sweeps"))
    budget = study.BUDGETS["full"]
    trial = tmp_path / "sweeps" / "study-influencer" / "trial_0"
    trial.mkdir(parents=True)
    # 100 trial-epochs reported in 1000 s of this sweep: 0.1 trial-epochs per second
    trial.joinpath("result.json").write_text(
        "\n".join(json.dumps({"epoch": e, "epoch_seconds": 5.0}) for e in range(100)))
    work.write_state({"sweep_wall_s": {"influencer": 400.0},
                      "sweep_since": {"influencer": time.time() - 600.0}})
    info = study.progress(work, budget, running=True)
    expected = study.expected_trial_epochs(budget)
    sweeps = (expected - 100) / 0.1 + expected / 0.1  # hungarian: the influencer's rate
    retrain_epochs = budget.epochs * (2 * len(budget.seeds) + len(budget.ablation_seeds)
                                      * study.count_flips(budget.ablations))
    # the retrains' seconds per epoch: the influencer sweep's median (5 s), else the prior
    retrains = budget.epochs * len(budget.seeds) * study.PRIOR_EPOCH_S["hungarian"] + (
        retrain_epochs - budget.epochs * len(budget.seeds)) * 5.0
    assert info["seconds_left"] == pytest.approx(sweeps + retrains, rel=1e-3)
