"""Ray Train wiring without Tune: DDP splits the data, a same-named run resumes its checkpoint."""

import math

import pytest
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ifsearch.config import config_from_dict, config_to_dict
from trainables import train_fn_per_worker

SCENES, BATCH = 8, 2


def tiny(epochs):
    return config_from_dict({
        "data": {"num_points": 128, "train_scenes": SCENES, "val_scenes": 2, "max_instances": 3,
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
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": config_to_dict(tiny(epochs)), "trial_id": "test"},
        scaling_config=ScalingConfig(num_workers=workers),
        run_config=RunConfig(name=f"ddp{workers}", storage_path=str(tmp_path)),
    )
    return trainer.fit()


@pytest.mark.slow
def test_two_workers_split_the_scenes_and_resume(tmp_path, local_ray):
    one = fit(tmp_path, epochs=1, workers=1)
    assert one.metrics["steps_per_epoch"] == math.ceil(SCENES / BATCH)
    two = fit(tmp_path, epochs=1, workers=2)
    assert two.metrics["steps_per_epoch"] == math.ceil(SCENES / 2 / BATCH)  # half each
    assert two.checkpoint is not None
    assert (tmp_path / "ddp2").exists()

    # The same run name finds the run's latest checkpoint and continues from epoch 2.
    resumed = fit(tmp_path, epochs=2, workers=2)
    assert resumed.metrics["epoch"] == 2
    assert resumed.metrics["start_epoch"] == 2  # epoch 1 was not trained again
    assert list(resumed.metrics_dataframe["epoch"]) == [1, 2]
