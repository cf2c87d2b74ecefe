"""Ray Train wiring without Tune: a trial's trainer (``build_trainer``: its own torch backend,
checkpoint cadence) splits the data over DDP workers, a same-named run resumes its
checkpoint, and a trial's driver runs its next runs on the workers it kept."""

import contextlib
import math
import threading
import time

import pytest
import ray
from ray.experimental import internal_kv

from ifsearch.config import config_from_dict
from trainables.driver import TrialSettings, build_trainer

SCENES, BATCH = 8, 2


def tiny(epochs, scenes=SCENES):
    return config_from_dict({
        "data": {"num_points": 128, "train_scenes": scenes, "val_scenes": 2, "max_instances": 3,
                 "batch_size": BATCH},
        "model": {"embed_dim": 16, "num_heads": 2, "ffn_dim": 32, "decoder_layers": 1,
                  "num_queries": 4},
        "train": {"epochs": epochs, "device": "cpu", "num_threads": 1},
    })


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=3, dashboard_host="127.0.0.1")
    yield
    ray.shutdown()


def fit(tmp_path, epochs, workers):
    settings = TrialSettings(space=None, num_workers=workers, storage_path=str(tmp_path))
    return build_trainer(tiny(epochs), settings, f"ddp{workers}").fit()


@pytest.mark.slow
def test_two_workers_split_the_scenes_and_resume(tmp_path, local_ray):
    one = fit(tmp_path, epochs=1, workers=1)
    assert one.metrics["steps_per_epoch"] == math.ceil(SCENES / BATCH)
    two = fit(tmp_path, epochs=1, workers=2)
    # Half each: the process group is up (trainables/backend.py hands two workers to Ray's).
    assert two.metrics["steps_per_epoch"] == math.ceil(SCENES / 2 / BATCH)
    assert two.checkpoint is not None
    assert (tmp_path / "ddp2").exists()

    # The same run name finds the run's latest checkpoint and continues from epoch 2.
    resumed = fit(tmp_path, epochs=2, workers=2)
    assert resumed.metrics["epoch"] == 2
    assert resumed.metrics["start_epoch"] == 2  # epoch 1 was not trained again
    assert list(resumed.metrics_dataframe["epoch"]) == [1, 2]

    # Runs that ended by themselves removed their worker groups: none is left in Ray's key-value
    # store for free_workers (it would hold a key per trial for the sweep's whole life).
    assert internal_kv._internal_kv_list("placement_group:", namespace="ifsearch") == []


@pytest.mark.slow
def test_a_stopped_run_leaves_no_workers_reserved(tmp_path, local_ray, caplog):
    """Stop a run after its first report (what Tune's scheduler does to a trial): ``fit()``
    raises ``TrialStopped``, every report made so far was handed over, the controller aborted
    the run itself (the driver did not have to free the workers behind its back), and no
    placement group is left holding the workers' CPUs (Ray's own table, and its free CPUs)."""
    from trainables.driver import TrialStopped

    # Every CPU is free once the run is over: the total, not what is free now (the runs of the
    # test before may still be handing theirs back).
    cpus = ray.cluster_resources()["CPU"]
    reports = []
    settings = TrialSettings(space=None, num_workers=1, storage_path=str(tmp_path))
    trainer = build_trainer(tiny(1000), settings, "stopped", on_report=reports.append,
                            should_stop=lambda: len(reports) >= 1)
    with pytest.raises(TrialStopped):
        trainer.fit()
    assert [r["epoch"] for r in reports] == [1]
    assert "still busy" not in caplog.text  # TrialTorchTrainer.abort's fallback
    assert not [t for t in threading.enumerate() if t.name == "train-controller-stopped"]
    _all_cpus_free(cpus)


def _all_cpus_free(cpus):
    """No placement group is left holding CPUs (Ray's own table), and all ``cpus`` are free."""
    from ray.util.placement_group import placement_group_table

    assert [g["state"] for g in placement_group_table().values()
            if g["state"] != "REMOVED"] == []
    deadline = time.time() + 30  # Ray frees resources asynchronously
    while ray.available_resources().get("CPU") != cpus and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == cpus


@pytest.mark.slow
def test_a_driver_runs_its_next_runs_on_the_workers_it_kept(tmp_path, local_ray, monkeypatch):
    """``keep_workers`` (a trial's driver): a run that finishes, one stopped after its first
    report (what the scheduler does), and a third: all three train on the one worker process
    Ray started for the first (Ray's own actor table). So the stopped run's training ended
    within a second, mid-epoch (its epochs take several seconds): else the third run would
    have given up waiting for it and started a new worker. Each run is its own: the third
    trains both its epochs from scratch. Releasing the kept workers (the driver ending) frees
    their placement group and CPUs."""
    from ray.util.state import list_actors

    from trainables import worker_pool
    from trainables.driver import TrialStopped

    def train_workers():
        return {actor.actor_id for actor in list_actors(
            filters=[("class_name", "=", "RayTrainWorker")], limit=10_000)}

    monkeypatch.setattr(worker_pool, "SETTLE_S", 1.0)
    cpus = ray.cluster_resources()["CPU"]
    before = train_workers()
    settings = TrialSettings(space=None, num_workers=1, storage_path=str(tmp_path))

    def run(name, epochs, stop_after=None, scenes=SCENES):
        reports = []
        trainer = build_trainer(
            tiny(epochs, scenes), settings, name, on_report=reports.append, keep_workers=True,
            should_stop=(lambda: len(reports) >= stop_after) if stop_after else None)
        with contextlib.suppress(TrialStopped):
            trainer.fit()
        return reports

    try:
        assert [r["epoch"] for r in run("kept_a", 2)] == [1, 2]
        stopped = run("kept_b", 1000, stop_after=1, scenes=100 * SCENES)
        assert [r["epoch"] for r in stopped] == [1]
        assert stopped[0]["epoch_seconds"] > 2 * worker_pool.SETTLE_S
        third = run("kept_c", 2)
        assert [r["epoch"] for r in third] == [1, 2]
        assert third[-1]["start_epoch"] == 1  # not a resumed run
        assert len(train_workers() - before) == 1
    finally:
        worker_pool.release()
    _all_cpus_free(cpus)

