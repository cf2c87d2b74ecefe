"""ifsearch's Optuna searcher and the scheduler's rung metric.

Fast tests drive the searcher by hand, in the order Tune's controller calls it, and compare the
persisted study with hand-written Optuna states; the slow ones run real sweeps and compare the
study with Tune's own record of every trial.
"""

import math
import pickle
import re
import shutil
import types

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import TrialScheduler
from test_cli import TINY_SPACE, launch, mlflow_server, mlflow_store, sweep_runs  # noqa: F401

from ifsearch.errors import ConfigError, IfsearchError
from ifsearch.search.cli import build_parser, plan_sweep
from ifsearch.search.searcher import (
    TUNE_TRIAL_ATTR,
    OptunaSearcher,
    SweepGenerator,
    build_scheduler,
)
from ifsearch.search.space import load_search_space

COMPLETE, PRUNED, FAIL = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL


def lr_space(trial):
    trial.suggest_float("train.lr", 1.0e-4, 1.0e-2, log=True)


def make_searcher(tmp_path, metric="val_loss", mode="min", sampler=None, name="sweep",
                  max_epochs=4):
    return OptunaSearcher(lr_space, metric, mode, sampler or optuna.samplers.RandomSampler(0),
                          f"sqlite:///{tmp_path / 'optuna.db'}", name, max_epochs)


def study_by_tune_id(url, name="sweep"):
    """{Tune trial id: FrozenTrial} as Optuna itself reads the database."""
    study = optuna.load_study(study_name=name, storage=url)
    return {t.user_attrs[TUNE_TRIAL_ATTR]: t for t in study.trials}


def result(epoch, value, iteration=None, **extra):
    return {"epoch": epoch, "val_loss": value, "training_iteration": iteration or epoch, **extra}


# --------------------------------------------------------------------------------------------
# The state mapping, driven as Tune's controller drives it


def test_each_way_a_trial_ends_gives_optunas_state_and_intermediate_values(tmp_path):
    s = make_searcher(tmp_path)
    for tid in ("full", "stopped", "first_rung", "errored", "diverged", "restored", "at_max"):
        s.suggest(tid)
    # Ran all 4 epochs; Tune passes the last result once more when the function returns.
    for e, v in ((1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)):
        s.on_trial_result("full", result(e, v))
    s.on_trial_result("full", result(4, 6.0))
    s.on_trial_complete("full", result(4, 6.0))
    # ASHA stops it on its epoch-2 result: Tune skips on_trial_result for that result.
    s.on_trial_result("stopped", result(1, 9.5))
    s.on_trial_complete("stopped", result(2, 9.1))
    s.on_trial_complete("first_rung", result(1, 9.7))  # stopped at its first report
    s.on_trial_result("errored", result(1, 9.2))
    s.on_trial_complete("errored", error=True)
    s.on_trial_result("diverged", result(1, 9.3))
    s.on_trial_complete("diverged", result(2, math.nan, diverged=True))
    # Restored from its epoch-1 checkpoint: training_iteration restarts, epoch 2 comes again
    # (with another value: the first one is kept, as Optuna's Trial.report does).
    for e, v, it in ((1, 9.0, 1), (2, 8.5, 2), (2, 8.4, 1), (3, 8.0, 2), (4, 7.5, 3)):
        s.on_trial_result("restored", result(e, v, it))
    s.on_trial_complete("restored", result(4, 7.5, 3))
    # ASHA also stops every trial that reaches max_t: it ran all its epochs.
    for e, v in ((1, 9.9), (2, 9.8), (3, 9.7)):
        s.on_trial_result("at_max", result(e, v))
    s.on_trial_complete("at_max", result(4, 9.6))

    expected = {  # (state, values, intermediate values), written out by hand
        "full": (COMPLETE, [6.0], {1: 9.0, 2: 8.0, 3: 7.0, 4: 6.0}),
        "stopped": (PRUNED, [9.1], {1: 9.5, 2: 9.1}),  # PRUNED keeps the last value
        "first_rung": (PRUNED, [9.7], {1: 9.7}),
        "errored": (FAIL, None, {1: 9.2}),
        "diverged": (FAIL, None, {1: 9.3}),
        "restored": (COMPLETE, [7.5], {1: 9.0, 2: 8.5, 3: 8.0, 4: 7.5}),
        "at_max": (COMPLETE, [9.6], {1: 9.9, 2: 9.8, 3: 9.7, 4: 9.6}),
    }
    trials = study_by_tune_id(s.storage)
    assert {tid: (t.state, t.values, t.intermediate_values)
            for tid, t in trials.items()} == expected
    assert [trials[tid].number for tid in expected] == list(range(7))


def test_multi_objective_trials_get_states_without_intermediate_values(tmp_path):
    s = make_searcher(tmp_path, metric=["AP50", "epoch_seconds"], mode=["max", "min"],
                      sampler=optuna.samplers.NSGAIISampler(seed=0))
    for tid in ("full", "stopped", "errored"):
        s.suggest(tid)
    for e in (1, 2, 3):
        s.on_trial_result("full", {"epoch": e, "AP50": 0.1 * e, "epoch_seconds": 2.0})
    s.on_trial_complete("full", {"epoch": 4, "AP50": 0.4, "epoch_seconds": 2.5})
    s.on_trial_result("stopped", {"epoch": 1, "AP50": 0.0, "epoch_seconds": 2.0})
    s.on_trial_complete("stopped", {"epoch": 2, "AP50": 0.0, "epoch_seconds": 2.0})
    s.on_trial_complete("errored", error=True)
    trials = study_by_tune_id(s.storage)
    assert {tid: (t.state, t.values, t.intermediate_values) for tid, t in trials.items()} == {
        "full": (COMPLETE, [0.4, 2.5], {}),
        "stopped": (PRUNED, None, {}),
        "errored": (FAIL, None, {}),
    }
    assert "train.lr" in s.suggest("next")  # NSGA-II samples on after PRUNED and FAIL trials


def test_a_restored_searcher_keeps_its_trials_and_continues_the_numbering(tmp_path):
    s = make_searcher(tmp_path)
    pickled_by_the_tuner = pickle.dumps(s)  # Tuner() pickles the search_alg before fit
    s.suggest("done")
    s.on_trial_complete("done", result(4, 6.0))
    s.suggest("running")
    s.on_trial_result("running", result(1, 9.0))
    s.on_trial_result("running", result(2, 8.0))
    s.save(str(tmp_path / "searcher-state.pkl"))  # Tune's periodic experiment checkpoint
    s.suggest("lost")  # asked after the last save: Tune will never run it

    restored = pickle.loads(pickled_by_the_tuner)
    restored.restore(str(tmp_path / "searcher-state.pkl"))
    restored.on_trial_result("running", result(2, 8.2, iteration=1))  # from its checkpoint
    restored.on_trial_result("running", result(3, 7.0, iteration=2))
    restored.on_trial_complete("running", result(4, 6.5, iteration=3))
    config = restored.suggest("new")

    trials = study_by_tune_id(s.storage)
    assert {tid: (t.number, t.state) for tid, t in trials.items()} == {
        "done": (0, COMPLETE), "running": (1, COMPLETE), "lost": (2, FAIL),
        "new": (3, TrialState.RUNNING)}
    assert trials["running"].intermediate_values == {1: 9.0, 2: 8.0, 3: 7.0, 4: 6.5}
    # The sampler continues from its saved state: no config that ran is suggested again.
    assert config["train.lr"] not in (trials["done"].params["train.lr"],
                                      trials["running"].params["train.lr"])


def test_a_restored_searcher_follows_a_moved_database(tmp_path):
    s = make_searcher(tmp_path)
    pickled_by_the_tuner = pickle.dumps(s)
    s.suggest("running")
    s.on_trial_result("running", result(1, 9.0))
    s.save(str(tmp_path / "state.pkl"))
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(tmp_path / "optuna.db", moved / "optuna.db")

    restored = pickle.loads(pickled_by_the_tuner)
    restored.storage = f"sqlite:///{moved / 'optuna.db'}"  # what --optuna-storage does
    restored.restore(str(tmp_path / "state.pkl"))
    restored.on_trial_complete("running", result(2, 8.0))
    assert study_by_tune_id(restored.storage)["running"].state == PRUNED
    assert study_by_tune_id(s.storage)["running"].state == TrialState.RUNNING  # untouched

    restored.storage = f"sqlite:///{tmp_path / 'empty.db'}"
    restored._study = restored._storage_obj = None  # as after pickling
    with pytest.raises(IfsearchError, match=r"'sweep' is not in sqlite:///.*empty\.db.*"
                                            r"--optuna-storage"):
        restored.study


def test_a_new_sweep_refuses_an_existing_study(tmp_path):
    make_searcher(tmp_path)
    with pytest.raises(IfsearchError, match=r"study 'sweep' already exists in sqlite:///.*"
                                            r"--resume --name sweep"):
        make_searcher(tmp_path)


def test_warm_start_is_the_first_trial_and_not_repeated_on_resume(tmp_path):
    s = OptunaSearcher(lr_space, "val_loss", "min", optuna.samplers.RandomSampler(0),
                       f"sqlite:///{tmp_path / 'optuna.db'}", "sweep", 4,
                       points_to_evaluate=[{"train.lr": 0.005}])
    pickled_by_the_tuner = pickle.dumps(s)
    assert s.suggest("warm") == {"train.lr": 0.005}
    s.save(str(tmp_path / "state.pkl"))

    def resumed_with_warm_start(lr):
        restored = pickle.loads(pickled_by_the_tuner)
        restored.enqueue_on_restore = [{"train.lr": lr}]  # what --resume --warm-start does
        restored.restore(str(tmp_path / "state.pkl"))
        return restored.suggest(f"after {lr}")

    assert resumed_with_warm_start(0.005) != {"train.lr": 0.005}  # tried already
    assert resumed_with_warm_start(0.002) == {"train.lr": 0.002}  # a new one goes first


def test_a_lost_database_is_rebuilt_from_the_checkpoint(tmp_path):
    s = make_searcher(tmp_path)
    pickled_by_the_tuner = pickle.dumps(s)
    s.suggest("done")
    s.on_trial_result("done", result(1, 9.0))
    s.on_trial_complete("done", result(2, 8.0))
    s.suggest("running")
    s.on_trial_result("running", result(1, 9.5))
    s.save(str(tmp_path / "state.pkl"))
    (tmp_path / "optuna.db").unlink()  # lost with the head node
    shared = f"sqlite:///{tmp_path / 'shared.db'}"  # a database that holds another sweep too
    optuna.create_study(study_name="other", storage=shared).optimize(lambda t: 0.0, n_trials=3)

    restored = pickle.loads(pickled_by_the_tuner)
    restored.storage = shared  # --resume --optuna-storage
    restored.restore(str(tmp_path / "state.pkl"))
    restored.on_trial_complete("running", result(4, 7.0))
    restored.suggest("new")
    trials = study_by_tune_id(restored.storage)
    assert {tid: (t.number, t.state, t.intermediate_values) for tid, t in trials.items()} == {
        "done": (0, PRUNED, {1: 9.0, 2: 8.0}), "running": (1, COMPLETE, {1: 9.5, 4: 7.0}),
        "new": (2, TrialState.RUNNING, {})}


def test_the_budget_can_grow_when_a_sweep_resumes(tmp_path):
    saved = {"counter": 4, "total_samples": 4, "finished": True, "experiment": None}
    generator = SweepGenerator(make_searcher(tmp_path), 4)
    generator.set_state(dict(saved))
    assert generator.is_finished()  # same budget: nothing left to run
    generator.num_samples = 6  # --resume --num-samples 6
    generator.set_state(dict(saved))
    assert not generator.is_finished() and generator.total_samples == 6


# --------------------------------------------------------------------------------------------
# The rung metric: the scheduler, the space file, the command line

ZERO_OBJECTIVE_SPACE = {
    "space": {"train.lr": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2}},
    "objective": {"metric": "AP50", "mode": "max"},
    "budget": {"num_samples": 4, "max_epochs": 4, "grace_period": 1},
}


def plan_for(tmp_path, space, *options):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return plan_sweep(build_parser().parse_args(["--space", str(path), *options]))


def asha_decisions(scheduler, results):
    """Feed each trial's first-rung result to a real Ray scheduler; its decisions."""
    decisions = []
    for number, metrics in enumerate(results):
        trial = types.SimpleNamespace(trial_id=f"t{number}")
        scheduler.on_trial_add(None, trial)
        decisions.append(scheduler.on_trial_result(None, trial, {"epoch": 1, **metrics}))
    return decisions


def test_a_rung_metric_stops_trials_whose_objective_is_tied(tmp_path):
    results = [{"AP50": 0.0, "val_loss": v} for v in (9.0, 9.5, 9.8, 8.0)]
    C, S = TrialScheduler.CONTINUE, TrialScheduler.STOP
    tied = build_scheduler(plan_for(tmp_path, ZERO_OBJECTIVE_SPACE))
    assert asha_decisions(tied, results) == [C, C, C, C]  # zeros are never below the cutoff
    space = {**ZERO_OBJECTIVE_SPACE, "scheduler": {"name": "asha", "metric": "val_loss",
                                                   "mode": "min"}}
    # 9.5 > 9.0; 9.8 > median(9.0, 9.5); 8.0 is the best so far.
    assert asha_decisions(build_scheduler(plan_for(tmp_path, space)), results) == [C, S, S, C]
    cli = build_scheduler(plan_for(tmp_path, ZERO_OBJECTIVE_SPACE, "--rung-metric", "val_loss:min"))
    assert asha_decisions(cli, results) == [C, S, S, C]


@pytest.mark.parametrize("scheduler", ["asha", "hyperband", "median"])
def test_every_stopping_scheduler_uses_the_rung_metric(tmp_path, scheduler):
    plan = plan_for(tmp_path, ZERO_OBJECTIVE_SPACE, "--scheduler", scheduler,
                    "--rung-metric", "AP25:max")
    built = build_scheduler(plan)
    assert (built.metric, built._mode) == ("AP25", "max")
    assert (plan.metric, plan.mode) == ("AP50", "max")  # the searcher's objective is unchanged


def test_the_rung_metric_defaults_to_the_objective(tmp_path):
    plan = plan_for(tmp_path, {**ZERO_OBJECTIVE_SPACE, "objective": {"metric": "val_loss",
                                                                     "mode": "min"}})
    assert (plan.rung_metric, plan.rung_mode) == ("val_loss", "min")
    plan = plan_for(tmp_path, ZERO_OBJECTIVE_SPACE, "--rung-metric", "AP50")
    assert (plan.rung_metric, plan.rung_mode) == ("AP50", "max")


@pytest.mark.parametrize("scheduler, message", [
    ({"name": "asha", "metric": "val_los", "mode": "min"},
     r"scheduler\.metric: 'val_los' is not a reported metric \(did you mean val_loss\?\)"),
    ({"name": "asha", "metric": "val_loss", "mode": "minimum"},
     r"scheduler\.mode: 'minimum' must be one of \['min', 'max'\]"),
    ({"name": "asha", "metric": "mCov", "mode": "max"},
     r"scheduler\.metric: 'mCov' is not reported for data\.name = 'synthetic', only for "
     r"\['s3dis'\]; or remove it"),
    ({"name": "asha", "metric": "val_loss"},
     r"scheduler\.mode: missing: say whether a lower or a higher val_loss is better, e\.g\. "
     r"scheduler: \{metric: val_loss, mode: min\}"),
    ({"name": "asha", "mode": "min"},
     r"scheduler\.mode: 'min' without scheduler\.metric: the rungs compare the objective "
     r"\(AP50, mode max\); remove it"),
    ({"name": "fifo", "metric": "val_loss", "mode": "min"},
     r"scheduler\.metric: is not used by scheduler 'fifo', which stops no trial early: "
     r"remove it"),
])
def test_bad_scheduler_metrics_are_named_with_their_fix(tmp_path, scheduler, message):
    path = tmp_path / "rungs.yaml"
    path.write_text(yaml.safe_dump({**ZERO_OBJECTIVE_SPACE, "scheduler": scheduler}))
    with pytest.raises(ConfigError, match=r"rungs\.yaml: " + message):
        load_search_space(path)


@pytest.mark.parametrize("options, message", [
    (["--rung-metric", "val_loss"], "--rung-metric val_loss: say whether a lower or a higher "
                                    "val_loss is better, e.g. --rung-metric val_loss:min"),
    (["--rung-metric", "val_loss:down"], "--rung-metric val_loss:down: mode 'down' must be one "
                                         "of ['min', 'max']"),
    (["--rung-metric", "AP33:max"], "--rung-metric AP33:max: 'AP33' is not a reported metric"),
    (["--rung-metric", "mCov:max"], "'mCov' is not reported for data.name = 'synthetic'"),
    (["--rung-metric", "val_loss:min", "--scheduler", "fifo"],
     "--rung-metric val_loss:min: scheduler 'fifo' stops no trial early"),
    (["--optuna-storage", "optuna.db"], "--optuna-storage 'optuna.db' is not a database URL"),
])
def test_bad_rung_metric_and_storage_options_fail_before_ray(tmp_path, options, message):
    with pytest.raises(ConfigError) as caught:
        plan_for(tmp_path, ZERO_OBJECTIVE_SPACE, *options)
    assert message in str(caught.value)


def test_help_documents_the_rung_metric_and_the_study():
    text = " ".join(build_parser().format_help().split())
    assert "--rung-metric METRIC[:min|max]" in text and "val_loss:min" in text
    assert "--optuna-storage URL" in text and "optuna-dashboard" in text


# --------------------------------------------------------------------------------------------
# Real sweeps: the study against Tune's own record of every trial


def tune_expectations(sweep_dir, metric, max_epochs):
    """{Tune trial id: (state, values, intermediate values)} from Tune's experiment files.

    The rule is Optuna's semantics applied to what Tune recorded: an errored or diverged trial
    FAILs; one that reported ``max_epochs`` epochs is COMPLETE with its last value; one stopped
    earlier is PRUNED and keeps its last epoch's value. Every reported epoch is an intermediate
    value (its first report, if a restore reported it twice).
    """
    analysis = tune.ExperimentAnalysis(str(sweep_dir))
    expected = {}
    for trial in analysis.trials:
        frame = analysis.trial_dataframes.get(trial.trial_id)
        rows = [] if frame is None else frame.to_dict("records")
        epochs = {}
        for row in rows:
            diverged = row.get("diverged")  # NaN in rows without it
            if not (diverged == diverged and diverged) and int(row["epoch"]) not in epochs:
                epochs[int(row["epoch"])] = row[metric]
        last = trial.last_result or {}
        if trial.status == "ERROR" or last.get("diverged"):
            expected[trial.trial_id] = (FAIL, None, epochs)
        elif max(epochs) == max_epochs:
            expected[trial.trial_id] = (COMPLETE, [last[metric]], epochs)
        else:
            expected[trial.trial_id] = (PRUNED, [epochs[max(epochs)]], epochs)
    return expected


def optuna_record(url, name):
    return {tid: (t.state, t.values, t.intermediate_values)
            for tid, t in study_by_tune_id(url, name).items()}


def tiny_config(tmp_path, name, **train):
    config = {k: dict(v) for k, v in TINY_SPACE["base"].items()}
    config["train"].update(train)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow
def test_the_study_records_what_tune_did_and_resume_continues_it(tmp_path, mlflow_server):
    """A tiny ASHA sweep: the warm start (lr 1e-2) is far better than the sampled trials (lr
    ~1e-7), so whichever of them reaches the first rung after it is stopped there; resumed with a
    larger budget and a warm start that diverges, the same study gets the new trials."""
    anchor = tiny_config(tmp_path, "anchor", lr=1.0e-2, weight_decay=7.0e-5)
    out = launch(tmp_path, mlflow_server, "--name", "truth", "--warm-start", anchor,
                 "--num-samples", "3", "--max-epochs", "3").output
    sweep = tmp_path / "sweeps" / "truth"
    url = f"sqlite:///{sweep / 'optuna.db'}"
    assert f"Optuna study 'truth' in {url}" in out
    _, parents, _ = sweep_runs(mlflow_server, tmp_path.name, "truth")
    assert parents[0].data.tags["ifsearch.optuna_storage"] == url
    # The sweep efficiency on the parent run is the printed one, and its epoch seconds are
    # those Tune recorded for the trials (all of them ran in this session).
    printed = re.search(r"sweep efficiency: (\d+)% .*\((\d+) s of (\d+) slot-seconds", out)
    assert printed, out
    percent, epoch_s, slot_s = (int(group) for group in printed.groups())
    logged = parents[0].data.metrics["slot_efficiency"]
    assert 0 < logged <= 1 and f"{logged:.0%}" == f"{percent}%"
    assert abs(logged * slot_s - epoch_s) <= 1
    frames = tune.ExperimentAnalysis(str(sweep)).trial_dataframes.values()
    tune_epoch_s = sum(frame["epoch_seconds"].sum() for frame in frames)
    assert abs(tune_epoch_s - epoch_s) <= 0.5  # printed in whole seconds
    # slot_s is printed in whole seconds too: a relative error of at most 0.5 / slot_s
    assert logged == pytest.approx(tune_epoch_s / slot_s, rel=1 / slot_s)

    expected = tune_expectations(sweep, "val_loss", 3)
    assert optuna_record(url, "truth") == expected
    states = [state for state, _, _ in expected.values()]
    assert COMPLETE in states and PRUNED in states, states
    before = study_by_tune_id(url, "truth")

    diverging = tiny_config(tmp_path, "diverging", lr=1.0e30, weight_decay=0.0)
    out = launch(tmp_path, mlflow_server, "--resume", "--name", "truth", "--num-samples", "5",
                 "--warm-start", diverging, "--max-epochs", "3").output
    assert "resuming sweep truth" in out
    expected = tune_expectations(sweep, "val_loss", 3)
    assert len(expected) == 5 and optuna_record(url, "truth") == expected
    after = study_by_tune_id(url, "truth")
    assert sorted(t.number for t in after.values()) == list(range(5))  # numbering continues
    for tid, trial in before.items():  # the first trials kept their Optuna trials
        assert (after[tid].number, after[tid].state) == (trial.number, trial.state)
    params = [tuple(sorted(t.params.items())) for t in after.values()]
    assert len(set(params)) == 5  # no config was suggested twice
    diverged = [t for t in after.values() if t.number == 3][0]  # the new warm start goes first
    assert diverged.params["train.lr"] == 1.0e30 and diverged.state == FAIL


@pytest.mark.slow
def test_asha_stops_trials_whose_objective_is_tied_at_zero(tmp_path, mlflow_server):
    """Objective AP50, which stays 0 on these tiny scenes; the rungs compare val_loss, so the
    sampled trials (lr ~1e-7) that reach the first rung after the warm start (lr 1e-2) stop.
    One trial at a time, so the local Ray has one trial's CPUs: a stopped trial whose workers'
    placement group were left reserved would keep the next trial waiting forever."""
    space = tmp_path / "zero_objective.yaml"
    space.write_text(yaml.safe_dump({**TINY_SPACE, "objective": {"metric": "AP50",
                                                                 "mode": "max"}}))
    anchor = tiny_config(tmp_path, "anchor", lr=1.0e-2, weight_decay=7.0e-5)
    out = launch(tmp_path, mlflow_server, "--space", str(space),  # the last --space counts
                 "--name", "tied", "--warm-start", anchor, "--num-samples", "3",
                 "--max-epochs", "2", "--rung-metric", "val_loss:min",
                 "--max-concurrent", "1").output
    assert "placement group(s) still reserved" not in out
    analysis = tune.ExperimentAnalysis(str(tmp_path / "sweeps" / "tied"))
    frames = [analysis.trial_dataframes[t.trial_id] for t in analysis.trials]
    assert len(frames) == 3
    assert all((frame["AP50"] == 0).all() for frame in frames)  # the objective ties everywhere
    epochs = sorted(int(frame["epoch"].max()) for frame in frames)
    assert epochs[0] == 1 and epochs[-1] == 2, epochs  # some stopped at the rung, one ran on


# --------------------------------------------------------------------------------------------
# --searcher-impl: Ray's stock OptunaSearch, kept for benchmarks/search_efficiency.py


def test_searcher_impl_ray_builds_rays_optuna_search_with_the_same_sampler(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    from ifsearch.search.searcher import build_search_alg

    space = {**ZERO_OBJECTIVE_SPACE, "searcher": {"name": "tpe", "seed": 3}}
    ours = build_search_alg(plan_for(tmp_path, space, "--name", "a"),
                            f"sqlite:///{tmp_path / 'a.db'}", 2)
    assert isinstance(ours, SweepGenerator) and isinstance(ours.optuna, OptunaSearcher)
    plan = plan_for(tmp_path, space, "--searcher-impl", "ray", "--name", "b")
    theirs = build_search_alg(plan, f"sqlite:///{tmp_path / 'b.db'}", 2)
    assert not isinstance(theirs, SweepGenerator)  # Tune's own budget: no ifsearch resume
    assert type(theirs.searcher) is OptunaSearch and theirs.max_concurrent == 2
    # Same sampler and seed: the first configs equal those of a plain seeded TPE study.
    reference = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=3))
    for number in range(2):
        expected = reference.ask()
        plan.space.define_by_run(expected)
        assert theirs.suggest(f"t{number}") == expected.params
        assert ours.optuna.suggest(f"t{number}") == expected.params
    # The difference the benchmark measures: a trial the scheduler stopped at epoch 1 of 4.
    for searcher in (theirs, ours.optuna):
        searcher.on_trial_result("t0", {"epoch": 1, "training_iteration": 1, "AP50": 0.25})
        searcher.on_trial_complete("t0", {"epoch": 1, "training_iteration": 1, "AP50": 0.25})
    stock = optuna.load_study(study_name="b", storage=f"sqlite:///{tmp_path / 'b.db'}")
    told = optuna.load_study(study_name="a", storage=f"sqlite:///{tmp_path / 'a.db'}")
    assert (stock.trials[0].state, stock.trials[0].value) == (COMPLETE, 0.25)  # truncated
    assert told.trials[0].state == PRUNED  # TPE ranks it after every COMPLETE trial
    assert stock.trials[0].intermediate_values == told.trials[0].intermediate_values == {1: 0.25}


def test_searcher_impl_is_refused_when_unknown():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--searcher-impl", "optuna"])
