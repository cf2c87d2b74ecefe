"""ifsearch's Optuna searcher and the scheduler's rung metric.

Fast tests drive the searcher by hand, in the order Tune's controller calls it, and compare the
persisted study with hand-written Optuna states; the slow ones run real sweeps and compare the
study with Tune's own record of every trial.
"""

import math
import pickle
import shutil
import types

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from ray.tune.schedulers import TrialScheduler

from ifsearch.errors import ConfigError, IfsearchError
from ifsearch.launch import build_parser, plan_sweep
from ifsearch.searcher import (
    TUNE_TRIAL_ATTR,
    OptunaSearcher,
    SweepGenerator,
    build_scheduler,
)
from ifsearch.search_space import load_search_space

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
    restored._study = restored._storage_obj = None
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
    assert s.suggest("warm") == {"train.lr": 0.005}
    s.enqueue({"train.lr": 0.005})  # --resume --warm-start with the same file
    assert s.suggest("next") != {"train.lr": 0.005}
    s.enqueue({"train.lr": 0.002})  # a new warm start is evaluated next
    assert s.suggest("third") == {"train.lr": 0.002}


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
