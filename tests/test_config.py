"""Config loading, overrides and validation: every error names the file, the key and the value."""

import pytest
import yaml

from ifsearch.config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from ifsearch.errors import ConfigError, IfsearchError


def write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_are_valid_and_round_trip(tmp_path):
    config = config_from_dict({})
    assert config == Config()
    path = save_config(config, tmp_path / "out" / "config.yaml")
    assert load_config(path) == config


def test_partial_file_keeps_other_defaults(tmp_path):
    path = write(tmp_path, {"loss": {"name": "hungarian", "mask_weight": 3}, "train": {"lr": 0.01}})
    config = load_config(path)
    assert config.loss.name == "hungarian"
    assert config.loss.mask_weight == 3.0 and isinstance(config.loss.mask_weight, float)
    assert config.train.lr == 0.01
    assert config.model == Config().model


def test_overrides_parse_values_as_yaml(tmp_path):
    path = write(tmp_path, {"loss": {"margin": 1.0}})
    config = load_config(path, ["loss.margin=1.5", "model.masked_attention=true",
                                "data.classes=[box, sphere]", "loss.mask_prob=softmax"])
    assert config.loss.margin == 1.5
    assert config.model.masked_attention is True
    assert config.data.classes == ["box", "sphere"]
    assert config.loss.mask_prob == "softmax"


def test_unknown_key_names_file_key_and_valid_keys(tmp_path):
    path = write(tmp_path, {"loss": {"temprature": 0.5}})
    with pytest.raises(ConfigError, match=r"cfg\.yaml: loss\.temprature: unknown key.*temperature"):
        load_config(path)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section 'optim'.*'train'"):
        load_config(write(tmp_path, {"optim": {"lr": 1}}))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs = 'ten': expected an integer"):
        load_config(write(tmp_path, {"train": {"epochs": "ten"}}))
    with pytest.raises(ConfigError, match=r"model\.masked_attention = 1: expected true/false"):
        load_config(write(tmp_path, {"model": {"masked_attention": 1}}))


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, {"loss": {"name": "dice", "temperature": -1},
                            "data": {"min_instances": 5, "max_instances": 2}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "3 problems" in text
    assert "loss.name = 'dice': must be one of ['influencer', 'hungarian']" in text
    assert "loss.temperature = -1.0: must be > 0" in text
    assert "data.max_instances = 2: must be >= data.min_instances (5)" in text
    assert "cfg.yaml" in text


def test_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.num_heads = 3: must divide model\.embed_dim"):
        config_from_dict({"model": {"num_heads": 3, "embed_dim": 64}})
    with pytest.raises(ConfigError, match=r"data\.classes.*unknown synthetic classes \['torus'\]"):
        config_from_dict({"data": {"classes": ["box", "torus"]}})
    with pytest.raises(ConfigError, match=r"data\.max_instances = 20: must be <= 16"):
        config_from_dict({"data": {"max_instances": 20}})
    with pytest.raises(ConfigError, match=r"model\.num_queries = 4: must be >= data\.max_instances"):
        config_from_dict({"model": {"num_queries": 4}, "data": {"max_instances": 5}})


def test_real_dataset_rules():
    with pytest.raises(ConfigError, match=r"data\.root = '': must name the s3dis dataset folder "
                                          r"\(README \"Datasets\""):
        config_from_dict({"data": {"name": "s3dis"}})
    with pytest.raises(ConfigError, match=r"unknown s3dis classes \['box'\]"):
        config_from_dict({"data": {"name": "s3dis", "root": "x", "classes": ["chair", "box"]}})
    with pytest.raises(ConfigError, match=r"data\.test_area = 7: must be an S3DIS area, 1\.\.6"):
        config_from_dict({"data": {"name": "s3dis", "root": "x", "test_area": 7}})
    with pytest.raises(ConfigError, match=r"data\.name = 'scannet': must be one of"):
        config_from_dict({"data": {"name": "scannet"}})
    with pytest.raises(ConfigError, match=r"model\.backbone_channels = \[32\]: needs at least two"):
        config_from_dict({"model": {"backbone_channels": [32]}})
    # Real datasets: 0 scenes = all, COCO classes are checked against its json when loaded, and
    # more instances than queries is allowed (a room has more objects than a synthetic scene).
    config = config_from_dict({"data": {"name": "coco", "root": "x", "train_scenes": 0,
                                        "val_scenes": 0, "classes": ["person"]},
                               "model": {"num_queries": 4}})
    assert config.data.classes == ["person"]


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match=r"--set 'lr=0\.1': expected section\.key=value"):
        apply_overrides({}, ["lr=0.1"])
    with pytest.raises(ConfigError, match=r"--set 'train\.lr': expected section\.key=value"):
        apply_overrides({}, ["train.lr"])


def test_override_typo_is_rejected():
    raw = apply_overrides({}, ["train.epochz=3"])
    with pytest.raises(ConfigError, match=r"--set: train\.epochz: unknown key"):
        config_from_dict(raw, source="--set")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "loss: [unclosed"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_errors_share_one_base_class():
    assert issubclass(ConfigError, IfsearchError)
    assert config_to_dict(Config())["loss"]["name"] == "influencer"


def test_readme_documents_every_config_key():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for section, values in config_to_dict(Config()).items():
        for key in values:
            assert f"`{section}.{key}`" in readme, f"README.md does not document {section}.{key}"


def test_loss_choices_name_key_value_and_allowed_values():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"loss": {"mean": "harmonic", "class_target": "hungarian",
                                   "spill_weight": -1.0, "duplicate_weight": -0.5}})
    text = str(info.value)
    assert "loss.mean = 'harmonic': must be one of ['geometric', 'arithmetic']" in text
    assert ("loss.class_target = 'hungarian': must be one of ['threshold', 'best_query', 'soft']"
            in text)
    assert "loss.spill_weight = -1.0: must be >= 0" in text
    assert "loss.duplicate_weight = -0.5: must be >= 0" in text
    config = config_from_dict({"loss": {"mean": "arithmetic", "class_target": "soft",
                                        "spill_weight": 0.5, "duplicate_weight": 1.0}})
    from ifsearch.losses import build_criterion

    criterion = build_criterion(config.loss, num_classes=3)
    assert criterion.class_target == "soft"
    assert (criterion.mask_loss.mean, criterion.mask_loss.spill_weight,
            criterion.mask_loss.duplicate_weight) == ("arithmetic", 0.5, 1.0)
