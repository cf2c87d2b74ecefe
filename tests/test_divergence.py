"""A diverging trial fails once: ranks agree, the worker's last result says why, MLflow says FAILED.

The sweep-level proof (Tune's records, Ray's worker processes, MLflow) is
``tests/search/test_cli.py::test_diverging_trial_fails_once_without_retries``.
"""

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ifsearch.config import config_from_dict
from ifsearch.errors import DivergenceError
from ifsearch.search.space import load_search_space
from ifsearch.tracking.runs import ERROR_TAG, MlflowTrialLogger
from trainables.worker import divergence_result

TINY = {
    "data": {"num_points": 128, "train_scenes": 8, "val_scenes": 2, "max_instances": 3,
             "batch_size": 2},
    "model": {"embed_dim": 16, "num_heads": 2, "ffn_dim": 32, "decoder_layers": 1,
              "num_queries": 4},
    "train": {"epochs": 2, "device": "cpu", "num_threads": 1, "warmup_epochs": 0.0},
}
NAN_AT_CALL = 2  # rank 1's criterion returns NaN on its 2nd call: epoch 1, step 2


class _NanOnCall(torch.nn.Module):
    """Wraps a criterion; its ``call``-th forward returns a NaN term (one rank only)."""

    def __init__(self, criterion, call):
        super().__init__()
        self.criterion, self.call, self.calls = criterion, call, 0

    def forward(self, outputs, targets):
        self.calls += 1
        parts = self.criterion(outputs, targets)
        if self.calls == self.call:
            key = next(iter(parts))
            parts[key] = parts[key] * math.nan
        return parts


def _rank(rank, world, init_file, out_dir):
    import ifsearch.train as train

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    if rank == 1:
        build = train.build_criterion
        train.build_criterion = lambda *a, **k: _NanOnCall(build(*a, **k), NAN_AT_CALL)
    config = config_from_dict({**TINY, "train": {**TINY["train"],
                                                 "output_dir": f"{out_dir}/r{rank}"}})
    try:
        train.train_loop(config)
        outcome = "finished"
    except DivergenceError as exc:
        outcome = f"DivergenceError epoch={exc.epoch} step={exc.step}: {exc}"
    except Exception as exc:  # e.g. gloo's timeout when the ranks disagree
        outcome = f"{type(exc).__name__}: {exc}"
    with open(f"{out_dir}/outcome{rank}.txt", "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_stop_together_when_one_rank_diverges(tmp_path):
    """Only rank 1's loss turns NaN; both ranks must raise at the same step (a rank that
    stopped alone would leave the other waiting in DDP's all-reduce until gloo's timeout)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(rank, 2, tmp_path / "init", str(tmp_path)))
             for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    outcomes = [(tmp_path / f"outcome{rank}.txt").read_text() for rank in range(2)
                if (tmp_path / f"outcome{rank}.txt").exists()]
    assert len(outcomes) == 2, outcomes
    for outcome in outcomes:
        assert outcome.startswith("DivergenceError epoch=1 step=2:"), outcomes
    assert "another rank" in outcomes[0] and "another rank" not in outcomes[1]
    assert not (tmp_path / "r0" / "metrics.jsonl").exists()  # the bad epoch left no record


def test_divergence_result_ranks_nowhere_and_says_why():
    exc = DivergenceError("training diverged: the loss is not finite at epoch 3, step 2",
                          epoch=3, step=2)
    result = divergence_result(exc, ["AP50", "epoch_seconds"])
    assert result["diverged"] is True
    assert result["error"] == f"DivergenceError: {exc}"
    assert math.isnan(result["AP50"]) and math.isnan(result["epoch_seconds"])
    assert result["epoch"] == 2  # the last completed epoch: no progress for the schedulers
    first = divergence_result(DivergenceError("x", epoch=1, step=1), ["val_loss"])
    assert first["epoch"] == 0


class _Trial:
    def __init__(self, trial_id, last_result):
        self.trial_id, self.last_result = trial_id, last_result


def test_logger_marks_a_diverged_trial_failed_and_logs_nothing_for_its_bad_epoch(tmp_path):
    space = load_search_space(Path(__file__).parents[1] / "search_spaces"
                              / "influencer_default.yaml")
    logger = MlflowTrialLogger("http://127.0.0.1:9", "exp", "sweep", space=space, max_epochs=4,
                               spool_path=tmp_path / "spool.jsonl")
    sent = []
    logger._send = sent.append  # the records it would write to MLflow or the spool
    good = {"epoch": 1, "val_loss": 3.0, "AP50": 0.1}
    bad = {**divergence_result(DivergenceError("training diverged: ...", epoch=2, step=1),
                               ["val_loss"]), "trial_id": "t1"}
    logger.on_trial_result(0, [], _Trial("t1", good), good)
    logger.on_trial_result(0, [], _Trial("t1", bad), bad)
    assert [r["kind"] for r in sent] == ["result"] and sent[0]["step"] == 1
    logger.on_trial_complete(0, [], _Trial("t1", bad))
    end = sent[-1]
    assert end["kind"] == "end" and end["status"] == "FAILED"
    assert end["tags"][ERROR_TAG] == "DivergenceError: training diverged: ..."
    # A healthy trial stopped early is still KILLED, one that ran the budget FINISHED.
    logger.on_trial_complete(0, [], _Trial("t2", {"epoch": 2, "val_loss": 1.0}))
    logger.on_trial_complete(0, [], _Trial("t3", {"epoch": 4, "val_loss": 1.0}))
    assert [r["status"] for r in sent[-2:]] == ["KILLED", "FINISHED"]
