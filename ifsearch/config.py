"""Typed configuration: one dataclass per section, every default in one place with the reason.

A config is plain data. It is loaded from YAML (``load_config``), changed by ``key=value``
overrides (``apply_overrides``), checked as a whole before anything runs (``validate`` reports all
problems at once, each naming the file, key and value), and written back to YAML (``save_config``)
so a run is reproducible from the file it wrote.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ifsearch.catalog import MAX_INSTANCES, S3DIS_CLASSES, SHAPE_CLASSES
from ifsearch.errors import ConfigError

LOSS_NAMES = ("influencer", "hungarian")
MASK_PROB_MODES = ("sigmoid", "softmax")  # ifsearch.losses.influencer.MASK_PROB_MODES
MEANS = ("geometric", "arithmetic")  # ifsearch.losses.influencer.MEANS
CLASS_TARGETS = ("threshold", "best_query", "soft")  # ifsearch.losses.criterion.CLASS_TARGETS
SCHEDULES = ("cosine", "poly", "constant")
DEVICES = ("auto", "cpu", "cuda")
DATASETS = ("synthetic", "s3dis", "coco")
IMAGE_DATASETS = ("coco",)


@dataclass
class DataConfig:
    """Which scenes to train and evaluate on (README "Datasets" has the layouts and commands)."""

    # synthetic (embedded, point clouds) | s3dis (point clouds) | coco (images)
    name: str = "synthetic"
    root: str = ""  # dataset folder for s3dis / coco; unused by synthetic
    # [] = every class of the dataset, in its order; else a subset (others become background)
    classes: list[str] = field(default_factory=list)
    num_points: int = 1024  # synthetic: points per scene; s3dis: most points in a training crop
    min_instances: int = 2  # synthetic: K is drawn per scene from [min_instances, max_instances]
    max_instances: int = 5
    noise: float = 0.005  # synthetic: xyz noise std in metres
    density_jitter: float = 0.3  # synthetic: scene point count varies by +-30%
    # synthetic: scenes; s3dis: training crops per epoch (0 = one per room); coco: images (0 = all)
    train_scenes: int = 64
    # synthetic: scenes; s3dis: test-area rooms (0 = all); coco: images (0 = all)
    val_scenes: int = 16
    seed: int = 0  # scene generation / crop sampling seed; train and val never share a scene
    batch_size: int = 4
    # S3DIS
    test_area: int = 5  # the standard split: evaluate on Area 5, train on the other five
    voxel_size: float = 0.05  # metres; one point per voxel, for training crops and evaluation
    block_size: float = 3.0  # metres; training crops are block_size x block_size columns (0 = room)
    augment: bool = True  # training crops: rotation about z, scaling, jitter
    cache_dir: str = ""  # HDF5 cache folder; "" = $XDG_CACHE_HOME/ifsearch or ~/.cache/ifsearch
    # COCO
    train_split: str = "train2017"  # annotations/instances_<split>.json and images in <split>/
    val_split: str = "val2017"
    image_size: int = 128  # longer side resized to this, then padded to a square


@dataclass
class ModelConfig:
    """InfluencerFormer: EdgeConv point encoder + Mask2Former-style transformer mask decoder."""

    embed_dim: int = 64  # D, width of point embeddings and queries
    encoder_layers: int = 2  # EdgeConv layers (local kNN aggregation)
    k_neighbors: int = 12  # kNN size of each EdgeConv layer
    num_queries: int = 12  # M learned queries; at least data.max_instances
    decoder_layers: int = 3  # L decoder layers; each one gives an auxiliary output
    num_heads: int = 4
    ffn_dim: int = 128
    dropout: float = 0.0
    masked_attention: bool = False  # Mask2Former masked cross-attention from the previous layer
    # Image pathway (data.name = coco): CNN stage widths, strides 4, 8, 16, ...; the decoder
    # attends to every level but the finest, which gives the (H/4, W/4) mask embeddings
    backbone_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    backbone_blocks: int = 1  # residual blocks per backbone stage


@dataclass
class LossConfig:
    """Which criterion, and all its weights. Unused keys of the other criterion are ignored."""

    name: str = "influencer"  # influencer | hungarian: the comparison switch
    # Influencer Loss (DESIGN.md "The loss")
    attr_weight: float = 1.0
    rep_weight: float = 1.0
    bg_weight: float = 1.0
    margin: float = 1.0  # profiles are in [0,1]^M; distinct one-hot profiles are sqrt(2) apart
    temperature: float = 1.0
    # sigmoid | softmax (over queries + a background slot). softmax is the default here: on the
    # synthetic scenes it reached AP50 0.35 vs 0.07 for sigmoid in the same 15 epochs, because
    # queries compete for each point instead of one query's mask spilling over other instances.
    mask_prob: str = "softmax"
    # geometric (the seed: every point of an instance must agree) | arithmetic (the seed's ablation)
    mean: str = "geometric"
    # How the class head's targets come from the claims (losses/criterion.py): threshold |
    # best_query | soft. best_query is the default: at 15 epochs on this config (3 seeds,
    # docs/benchmarks.md "Defaults of the fair comparison") it reached AP50 0.82 vs 0.64 for the
    # threshold rule (soft: 0.82, the same within the seed spread, but best_query gives one
    # query per instance its class as Hungarian matching does, deterministically).
    class_target: str = "best_query"
    claim_threshold: float = 0.5  # threshold rule: claim probability a query needs for a class
    # Terms beyond the seed, 0 = off (not computed) until a search shows they help:
    spill_weight: float = 0.0  # a claiming query's probability on other instances' points
    duplicate_weight: float = 0.0  # claims on an instance by all but its strongest query
    # Shared by both criteria
    class_weight: float = 2.0
    no_object_weight: float = 0.1  # Mask2Former's eos_coef
    deep_supervision: bool = True
    # Hungarian baseline (Mask2Former defaults)
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    cost_class: float = 2.0
    cost_mask: float = 5.0
    cost_dice: float = 5.0
    num_points: int = 0  # points sampled for matching/loss; 0 = all points


@dataclass
class TrainConfig:
    """Optimisation, evaluation cadence, output and resumption."""

    epochs: int = 15
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0  # linear warm-up length, in epochs
    schedule: str = "cosine"  # cosine | poly | constant after warm-up
    poly_power: float = 0.9
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    amp: bool = True  # bf16 autocast, only ever used on CUDA
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # model init and data order
    output_dir: str = "runs/train"
    resume: bool = True  # continue from output_dir/checkpoint.pt when it exists
    # Save a checkpoint every this many epochs, and always after the last one (and at a sweep's
    # scheduler rungs). 2: a crash redoes at most one epoch, while a sweep's Ray Train run copies
    # half the checkpoints it did at 1 (docs/benchmarks.md "Trial start-up and report cost").
    checkpoint_every: int = 2
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    log_every: int = 0  # print the loss every this many steps; 0 = once per epoch


ASSIGN_MODES = ("threshold", "argmax")  # eval.assign (ifsearch.inference)


@dataclass
class EvalConfig:
    """Turning the mask matrix into instances, and scoring them (ifsearch/inference.py)."""

    min_region_size: int = 10  # ScanNet ignores smaller GT instances (100 on real data)
    mask_threshold: float = 0.5  # a point belongs to a query's mask when p > this
    # threshold: p > mask_threshold, masks may overlap (Mask2Former). argmax: each point to its
    # most probable query (softmax: or the background slot; sigmoid: if p > mask_threshold).
    # threshold stays the default: argmax moved softmax Influencer AP50 by < 0.02 and cost
    # Hungarian 0.10 (docs/benchmarks.md "Defaults of the fair comparison").
    assign: str = "threshold"
    # (query, class) pairs kept per scene, a query may appear with several classes; 0 = as many
    # as queries, Mask2Former's default (test_topk_per_image = num_queries). 3M changed AP50 by
    # < 0.01 for every loss (docs/benchmarks.md "Defaults of the fair comparison").
    topk: int = 0
    # 0 = keep duplicates (Mask2Former has no NMS); else mask-IoU NMS above this IoU between pairs
    # of different queries. NMS at 0.5 raised Hungarian's AP50 0.75 -> 0.81 and left softmax
    # Influencer models unchanged (no overlapping masks): a knob for both spaces, off by default.
    dedup_iou: float = 0.0
    # S3DIS coverage metrics (mCov...) count pairs with score >= this; the diagnostics count
    # every non-empty query mask, whatever its score
    diagnostic_score_threshold: float = 0.5


@dataclass
class Config:
    """The fully resolved configuration of one training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# Loading, overriding, validating, saving


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict of the config (YAML/JSON/MLflow friendly)."""
    return dataclasses.asdict(config)


def flatten_config(config: Config) -> dict[str, Any]:
    """``{"section.key": value}`` for every field: the names search spaces and MLflow params use."""
    return {
        f"{section}.{key}": value
        for section, values in config_to_dict(config).items()
        for key, value in values.items()
    }


def config_from_dict(raw: Any, source: str = "<dict>") -> Config:
    """Build and validate a Config from a nested dict; every problem is reported at once.

    Args:
        raw: nested mapping {section: {key: value}}; missing keys take their defaults.
        source: where the dict came from (a file name), used in error messages.
    """
    errors: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {raw!r}")
    config = Config()
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for section_name, values in raw.items():
        if section_name not in sections:
            errors.append(
                f"{source}: unknown section {section_name!r}; valid sections: {sorted(sections)}"
            )
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            errors.append(f"{source}: section {section_name!r} must be a mapping, got {values!r}")
            continue
        section = getattr(config, section_name)
        hints = typing.get_type_hints(type(section))
        known = {f.name for f in dataclasses.fields(section)}
        for key, value in values.items():
            where = f"{source}: {section_name}.{key}"
            if key not in known:
                errors.append(f"{where}: unknown key; valid keys: {sorted(known)}")
                continue
            try:
                setattr(section, key, _coerce(value, hints[key]))
            except (TypeError, ValueError) as exc:
                errors.append(f"{where} = {value!r}: {exc}")
    errors.extend(_check(config, source))
    if errors:
        raise ConfigError(_summary(errors))
    return config


def read_yaml_mapping(path: str | Path, what: str, expected: str) -> dict:
    """A YAML file whose top level is a mapping ({} when empty), or a ConfigError saying why not.

    Args:
        path: the file.
        what: what the file is, for messages ("config file", "search space file").
        expected: what the top level should hold, for messages.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping {expected}, got {raw!r}")
    return raw or {}


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file, apply ``key=value`` overrides, and validate the result."""
    raw = read_yaml_mapping(path, "config file", "of sections")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source=str(path))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of ``raw`` with ``section.key=value`` overrides (values parsed as YAML)."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"--set {item!r}: expected section.key=value, e.g. --set loss.margin=1.5 "
                f"(sections: {[f.name for f in dataclasses.fields(Config)]})"
            )
        section, name = parts
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from exc
        if not isinstance(merged.get(section), dict):
            merged[section] = {}
        merged[section][name] = value
    return merged


def config_to_yaml(config: Config) -> str:
    """The full config (every key, resolved) as YAML, loadable by ``load_config``."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def save_config(config: Config, path: str | Path) -> Path:
    """Write ``config_to_yaml(config)`` to ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(config))
    return path


def _summary(errors: list[str]) -> str:
    lines = "\n".join(f"  - {e}" for e in errors)
    return f"invalid configuration ({len(errors)} problem{'s' * (len(errors) > 1)}):\n{lines}"


def _coerce(value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (list, typing.List):  # noqa: UP006
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list of {item_type.__name__}, got {type(value).__name__}")
        return [_coerce(v, item_type) for v in value]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported annotation {annotation}")  # no optional fields so far
    if annotation is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true/false, got {type(value).__name__}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise TypeError(f"expected an integer, got {type(value).__name__}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {type(value).__name__}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__}")
        return value
    raise TypeError(f"unsupported annotation {annotation}")


def _check(config: Config, source: str) -> list[str]:
    """Cross-field rules; each message names the key, the value and the rule."""
    errors: list[str] = []

    def rule(ok: bool, key: str, value: Any, text: str) -> None:
        if not ok:
            errors.append(f"{source}: {key} = {value!r}: {text}")

    d, m, lo, t, e = config.data, config.model, config.loss, config.train, config.eval
    synthetic = d.name == "synthetic"
    rule(d.name in DATASETS, "data.name", d.name, f"must be one of {list(DATASETS)}")
    rule(synthetic or d.root.strip() != "", "data.root", d.root,
         f"must name the {d.name} dataset folder (README \"Datasets\" says where to download "
         "it and the layout expected)")
    rule(d.num_points >= 64, "data.num_points", d.num_points, "must be >= 64")
    rule(d.min_instances >= 0, "data.min_instances", d.min_instances, "must be >= 0")
    rule(
        d.min_instances <= d.max_instances,
        "data.max_instances",
        d.max_instances,
        f"must be >= data.min_instances ({d.min_instances})",
    )
    rule(not synthetic or d.max_instances <= MAX_INSTANCES, "data.max_instances",
         d.max_instances, f"must be <= {MAX_INSTANCES}: more objects do not fit a synthetic room")
    rule(len(set(d.classes)) == len(d.classes), "data.classes", d.classes, "has duplicates")
    known_classes = {"synthetic": SHAPE_CLASSES, "s3dis": S3DIS_CLASSES}.get(d.name)
    if known_classes is not None:  # COCO's categories are in its json, checked when loaded
        unknown = sorted(set(d.classes) - set(known_classes))
        rule(not unknown, "data.classes", d.classes,
             f"unknown {d.name} classes {unknown}; choose from {list(known_classes)} "
             "([] = all)")
    rule(d.noise >= 0, "data.noise", d.noise, "must be >= 0")
    rule(0 <= d.density_jitter < 1, "data.density_jitter", d.density_jitter, "must be in [0, 1)")
    least = 1 if synthetic else 0
    rule(d.train_scenes >= least, "data.train_scenes", d.train_scenes, f"must be >= {least}")
    rule(d.val_scenes >= least, "data.val_scenes", d.val_scenes, f"must be >= {least}")
    rule(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    rule(1 <= d.test_area <= 6, "data.test_area", d.test_area, "must be an S3DIS area, 1..6")
    rule(d.voxel_size >= 0, "data.voxel_size", d.voxel_size, "must be >= 0 (0 = every point)")
    rule(d.block_size >= 0, "data.block_size", d.block_size, "must be >= 0 (0 = whole room)")
    rule(d.image_size >= 32, "data.image_size", d.image_size, "must be >= 32")
    for key in ("train_split", "val_split"):
        value = getattr(d, key)
        rule(value.strip() != "" and "/" not in value, f"data.{key}", value,
             "must be a COCO split name such as train2017 (no slashes)")

    rule(m.embed_dim >= 8, "model.embed_dim", m.embed_dim, "must be >= 8")
    rule(
        m.embed_dim % max(m.num_heads, 1) == 0,
        "model.num_heads",
        m.num_heads,
        f"must divide model.embed_dim ({m.embed_dim})",
    )
    rule(m.num_heads >= 1, "model.num_heads", m.num_heads, "must be >= 1")
    rule(m.encoder_layers >= 1, "model.encoder_layers", m.encoder_layers, "must be >= 1")
    rule(m.k_neighbors >= 1, "model.k_neighbors", m.k_neighbors, "must be >= 1")
    rule(m.num_queries >= 1, "model.num_queries", m.num_queries, "must be >= 1")
    rule(not synthetic or m.num_queries >= d.max_instances, "model.num_queries", m.num_queries,
         f"must be >= data.max_instances ({d.max_instances}): each instance needs a query")
    rule(len(m.backbone_channels) >= 2, "model.backbone_channels", m.backbone_channels,
         "needs at least two stages: the finest gives masks, the others are attended to")
    rule(all(c >= 8 for c in m.backbone_channels), "model.backbone_channels",
         m.backbone_channels, "every stage width must be >= 8")
    rule(m.backbone_blocks >= 1, "model.backbone_blocks", m.backbone_blocks, "must be >= 1")
    rule(m.decoder_layers >= 1, "model.decoder_layers", m.decoder_layers, "must be >= 1")
    rule(m.ffn_dim >= 1, "model.ffn_dim", m.ffn_dim, "must be >= 1")
    rule(0 <= m.dropout < 1, "model.dropout", m.dropout, "must be in [0, 1)")

    rule(lo.name in LOSS_NAMES, "loss.name", lo.name, f"must be one of {list(LOSS_NAMES)}")
    rule(lo.mask_prob in MASK_PROB_MODES, "loss.mask_prob", lo.mask_prob,
         f"must be one of {list(MASK_PROB_MODES)}")
    rule(lo.temperature > 0, "loss.temperature", lo.temperature, "must be > 0")
    rule(lo.margin >= 0, "loss.margin", lo.margin, "must be >= 0")
    rule(lo.mean in MEANS, "loss.mean", lo.mean, f"must be one of {list(MEANS)}")
    rule(lo.class_target in CLASS_TARGETS, "loss.class_target", lo.class_target,
         f"must be one of {list(CLASS_TARGETS)}")
    rule(0 < lo.claim_threshold <= 1, "loss.claim_threshold", lo.claim_threshold,
         "must be in (0, 1]")
    rule(0 <= lo.no_object_weight, "loss.no_object_weight", lo.no_object_weight, "must be >= 0")
    rule(lo.num_points >= 0, "loss.num_points", lo.num_points, "must be >= 0 (0 = all points)")
    for key in ("attr_weight", "rep_weight", "bg_weight", "spill_weight", "duplicate_weight",
                "class_weight", "mask_weight", "dice_weight", "cost_class", "cost_mask",
                "cost_dice"):
        value = getattr(lo, key)
        rule(value >= 0, f"loss.{key}", value, "must be >= 0")

    rule(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    rule(t.lr > 0, "train.lr", t.lr, "must be > 0")
    rule(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    rule(t.warmup_epochs >= 0, "train.warmup_epochs", t.warmup_epochs, "must be >= 0")
    rule(t.schedule in SCHEDULES, "train.schedule", t.schedule, f"must be one of {list(SCHEDULES)}")
    rule(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0 disables)")
    rule(t.device in DEVICES, "train.device", t.device, f"must be one of {list(DEVICES)}")
    rule(t.num_threads >= 0, "train.num_threads", t.num_threads, "must be >= 0")
    rule(t.log_every >= 0, "train.log_every", t.log_every, "must be >= 0")
    rule(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every,
         "must be >= 1 (1 = after every epoch)")

    rule(e.min_region_size >= 0, "eval.min_region_size", e.min_region_size, "must be >= 0")
    rule(0 < e.mask_threshold < 1, "eval.mask_threshold", e.mask_threshold, "must be in (0, 1)")
    rule(0 <= e.dedup_iou <= 1, "eval.dedup_iou", e.dedup_iou, "must be in [0, 1] (0 = off)")
    rule(e.assign in ASSIGN_MODES, "eval.assign", e.assign, f"must be one of {list(ASSIGN_MODES)}")
    rule(e.topk >= 0, "eval.topk", e.topk, "must be >= 0 (0 = as many as model.num_queries)")
    rule(0 <= e.diagnostic_score_threshold <= 1, "eval.diagnostic_score_threshold",
         e.diagnostic_score_threshold, "must be in [0, 1]")
    return errors
