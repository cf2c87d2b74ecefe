"""ifsearch.search.report's early-stopping check on hand-made trial histories with known answers."""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from ray.tune.schedulers.async_hyperband import _Bracket

from ifsearch.search.report import (
    asha_rungs,
    histories_from_results,
    rung_agreement,
    rung_trust,
    sweep_rung_trust,
)


def _histories(rung: dict[str, float], final: dict[str, float], rung_epoch=2, last=4,
               metric="AP50", rung_metric=None) -> dict:
    """Trials with a value at ``rung_epoch`` and, when in ``final``, at ``last``."""
    out = {}
    for trial, value in rung.items():
        at_rung = {metric: 0.0, rung_metric: value} if rung_metric else {metric: value}
        history = {1: {metric: 0.0}, rung_epoch: at_rung}
        if trial in final:
            history[last] = {metric: final[trial]}
        out[trial] = history
    return out


# t1..t6 ran to the end; t7 was stopped after the rung. The rung ranks the six in the reverse
# of their final order.
REVERSED_RUNG = {"t1": 0.1, "t2": 0.2, "t3": 0.3, "t4": 0.4, "t5": 0.5, "t6": 0.6, "t7": 0.0}
FINAL = {"t1": 0.9, "t2": 0.8, "t3": 0.7, "t4": 0.6, "t5": 0.5, "t6": 0.4}


def test_reversed_rung_stops_the_final_best_and_is_untrustworthy():
    histories = _histories(REVERSED_RUNG, FINAL)
    (row,) = rung_agreement(histories, [2], reduction_factor=2, rung_metric="AP50",
                            final_metric="AP50")
    # By hand: cutoff = median of the 7 rung values (t7 included: it reached the rung) = 0.3;
    # stopped = strictly below: t7, t1, t2 (t3 sits on the cutoff and survives, as in Ray).
    assert row["reached"] == 7 and row["complete"] == 6
    assert row["cutoff"] == pytest.approx(0.3)
    assert row["stopped_complete"] == 2
    assert row["top_stopped_ids"] == ["t1", "t2"] and row["top_stopped"] == 2
    assert row["spearman"] == pytest.approx(-1.0)
    verdict = rung_trust(histories, [2], reduction_factor=2, rung_metric="AP50",
                         final_metric="AP50")
    assert verdict["trustworthy"] is False
    assert verdict["summary"].startswith("this sweep pruned with an untrustworthy rung")
    assert "epoch 2" in verdict["summary"] and "2 of the final top 5" in verdict["summary"]


def test_faithful_rung_is_trustworthy():
    rung = {**FINAL, "t7": 0.0}  # the rung already ranks them as the end does
    histories = _histories(rung, FINAL)
    verdict = rung_trust(histories, [2], reduction_factor=2, rung_metric="AP50",
                         final_metric="AP50", top_k=3)
    (row,) = verdict["rungs"]
    # cutoff = median of [0, .4, .5, .6, .7, .8, .9] = 0.6: t7, t6, t5 stopped; top 3 survive
    assert row["cutoff"] == pytest.approx(0.6)
    assert row["stopped_complete"] == 2 and row["top_stopped"] == 0
    assert row["spearman"] == pytest.approx(1.0)
    assert verdict["trustworthy"] is True


def test_minimised_rung_metric_is_judged_as_ray_does():
    # val_loss at the rung: lower is better; it ranks like the final AP50 does.
    loss = {"t1": 1.0, "t2": 2.0, "t3": 3.0, "t4": 4.0, "t5": 5.0, "t6": 6.0, "t7": 10.0}
    histories = _histories(loss, FINAL, rung_metric="val_loss")
    (row,) = rung_agreement(histories, [2], reduction_factor=2, rung_metric="val_loss",
                            rung_mode="min", final_metric="AP50")
    # Ray negates in min mode: cutoff of the negated values is -4, so losses above 4 stop.
    assert row["cutoff"] == pytest.approx(4.0)
    assert row["stopped_complete"] == 2  # t5, t6 (and t7, not complete)
    assert row["top_stopped_ids"] == ["t5"]
    assert row["spearman"] == pytest.approx(1.0)  # sign turned: +1 = agrees with the end


def test_cutoff_is_rays_own_on_the_same_values():
    values = [0.0, 0.13, 0.2, 0.2, 0.41, 0.5, 0.77, 0.9]
    rung = {f"t{i}": v for i, v in enumerate(values)}
    histories = _histories(rung, {"t0": 0.1, "t1": 0.2, "t2": 0.3})
    bracket = _Bracket(min_t=1, max_t=8, reduction_factor=3, s=0)
    (row,) = rung_agreement(histories, [2], reduction_factor=3, rung_metric="AP50",
                            final_metric="AP50")
    assert row["cutoff"] == pytest.approx(bracket.cutoff(dict(rung)))


@pytest.mark.parametrize("grace,max_t,rf", [(10, 60, 3), (1, 8, 2), (10, 90, 3), (2, 15, 3),
                                            (3, 3, 2)])
def test_rungs_are_rays_milestones(grace, max_t, rf):
    bracket = _Bracket(min_t=grace, max_t=max_t, reduction_factor=rf, s=0)
    milestones = sorted(m for m, _ in bracket._rungs)
    assert asha_rungs(grace, max_t, rf) == [m for m in milestones if m < max_t]


def test_too_few_complete_trials_is_no_verdict():
    histories = _histories(REVERSED_RUNG, {"t1": 0.9, "t2": 0.8, "t3": 0.7})
    verdict = rung_trust(histories, [2], reduction_factor=2, rung_metric="AP50",
                         final_metric="AP50")
    assert verdict["trustworthy"] is None
    assert "too few trials ran to the end (3 < 6)" in verdict["summary"]


def test_tied_rung_gives_no_correlation_and_stops_nothing():
    rung = {t: 0.0 for t in REVERSED_RUNG}  # every trial reports AP50 0 at the rung
    (row,) = rung_agreement(_histories(rung, FINAL), [2], reduction_factor=2,
                            rung_metric="AP50", final_metric="AP50")
    assert math.isnan(row["spearman"]) and row["top_stopped"] == 0


class _Result:
    def __init__(self, trial_id, rows):
        self.metrics = {"trial_id": trial_id}
        self.metrics_dataframe = pd.DataFrame(rows)


def test_histories_from_results_keeps_the_resumed_report_of_an_epoch():
    results = [
        _Result("a", [{"epoch": 1, "AP50": 0.1, "x": 1}, {"epoch": 2, "AP50": 0.2, "x": 1},
                      {"epoch": 2, "AP50": 0.25, "x": 1}]),  # epoch 2 again after a restore
        _Result("b", [{"epoch": 1, "AP50": np.nan}]),
    ]
    histories = histories_from_results(results, ["AP50", "missing"])
    assert histories["a"] == {1: {"AP50": 0.1}, 2: {"AP50": 0.25}}
    assert list(histories["b"]) == [1]


def test_sweep_rung_trust_reads_the_plan():
    rows = {t: [{"epoch": 1, "AP50": 0.0}, {"epoch": 2, "AP50": v}] for t, v in
            REVERSED_RUNG.items()}
    for t, v in FINAL.items():
        rows[t] += [{"epoch": 3, "AP50": 0.0}, {"epoch": 4, "AP50": v}]
    results = [_Result(t, r) for t, r in rows.items()]
    space = SimpleNamespace(scheduler={"name": "asha", "reduction_factor": 2})
    plan = SimpleNamespace(scheduler="asha", grace_period=2, max_epochs=4, metric="AP50",
                           mode="max", rung_metric="AP50", rung_mode="max", space=space)
    verdict = sweep_rung_trust(results, plan)
    # rungs: Ray's milestones for grace 2, max 4, rf 2 are 2 and 4; 4 is the end -> [2]
    assert [r["epoch"] for r in verdict["rungs"]] == [2]
    assert verdict["trustworthy"] is False and verdict["rungs"][0]["top_stopped"] == 2
    assert sweep_rung_trust(results, SimpleNamespace(**{**vars(plan), "scheduler": "fifo"})) \
        is None


def test_slot_efficiency_is_epoch_time_over_slot_time_of_this_session():
    from ifsearch.search.report import slot_efficiency

    frames = [
        # 3 epochs of 10 s; the first was reported before this session (a resumed sweep)
        pd.DataFrame({"epoch_seconds": [10.0, 10.0, 10.0], "timestamp": [50, 120, 130]}),
        pd.DataFrame({"epoch_seconds": [5.0, float("nan")], "timestamp": [140, 150]}),
        pd.DataFrame({"val_loss": [1.0]}),  # a trial with no epoch report (failed at start)
    ]
    results = [SimpleNamespace(metrics_dataframe=f) for f in frames]
    got = slot_efficiency(results, started=100.0, ended=150.0, slots=2)
    # (10 + 10 + 5) s of epochs in 50 s x 2 slots
    assert got == {"slot_efficiency": 0.25, "epoch_seconds": 25.0, "slot_seconds": 100.0}
    assert slot_efficiency(results, 100.0, 100.0, 2)["slot_efficiency"] == 0.0
