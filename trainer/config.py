"""The config schema (Hydra structured configs) and the checks a schema cannot express.

Every YAML file in conf/ starts from one of these dataclasses (its `defaults` list names the
schema), so a typo'd key or a wrong type stops the run while Hydra composes the config,
before anything is written. `validate()` then checks values: ranges, files, combinations.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class UserError(Exception):
    """A mistake in the user's config or input: reported as one message, exit code 2."""


def first_few(items: list[str], limit: int, sep: str = ", ") -> str:
    """The first `limit` items joined, '(and N more)' after them when there are more."""
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


def check_file(path: str) -> str:
    """`data.path`, checked: a readable file (no TensorFlow needed: preflight runs it)."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise UserError(f"data.path: received {path!r}; no such file")
    if not os.access(path, os.R_OK):
        raise UserError(f"data.path: received {path!r}; the file is not readable")
    return path


# ---------------------------------------------------------------- trainer, checkpoint, distribute
@dataclass
class TrainerConfig:
    max_steps: int = 1000
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    steps_per_execution: int = 10
    resume: str = "auto"
    deterministic: bool = True
    init_from: str | None = None
    stop_at: int | None = None
    pause_at: int | None = None
    debug: bool = False
    precision: str = "float32"
    on_nonfinite: str = "stop"
    max_rollbacks: int = 3
    inter_op_threads: int = 0
    jit_compile: bool = False
    executor: str = "auto"


# `async` is a Python keyword, so this schema cannot be written as a `class` body; the
# dataclass is made from an annotations dict (no generated __init__/__repr__ that would name it).
CheckpointConfig = dataclass(init=False, repr=False, eq=False)(
    type(
        "CheckpointConfig",
        (),
        {
            "__annotations__": {
                "every": int,
                "max_to_keep": int,
                "keep_every_n_hours": float | None,
                "async": bool,
                "restore_rng": bool,
                "durable": bool,
                "every_seconds": float | None,
                "max_overhead": float | None,
                "remote": str | None,
                "remote_wait": float,
                "remote_every_seconds": float,
            },
            "every": 100,
            "max_to_keep": 3,
            "keep_every_n_hours": None,
            "async": False,
            "restore_rng": True,
            "durable": True,
            "every_seconds": 1800.0,
            "max_overhead": None,
            "remote": None,
            "remote_wait": 300.0,
            "remote_every_seconds": 60.0,
        },
    )
)


@dataclass
class DistributeConfig:
    name: str = "default"
    logical_cpus: int | None = None


@dataclass
class MirroredConfig(DistributeConfig):
    name: str = "mirrored"
    devices: list[str] | None = None


@dataclass
class MultiWorkerConfig(DistributeConfig):
    name: str = "multi_worker"
    communication: str = "auto"


# ---------------------------------------------------------------- optimizers
# No schema: each `optimizer` option is a Keras optimizer by `_target_`, its keys the
# constructor's arguments, checked against its signature when it is built (trainer/optim.py).
# A schema here would refuse `+optimizer.<any constructor argument>`.


# ---------------------------------------------------------------- schedules
@dataclass
class ConstantConfig:
    name: str = "constant"


@dataclass
class CosineConfig:
    name: str = "cosine"
    warmup_steps: int = 0
    decay_steps: int | None = None
    alpha: float = 0.0


@dataclass
class ExponentialConfig:
    name: str = "exponential"
    decay_steps: int = 100
    decay_rate: float = 0.9
    staircase: bool = False


# ---------------------------------------------------------------- data
@dataclass
class DataConfig:
    name: str = MISSING
    task: str = "regression"
    batch_size: int = 32
    val_fraction: float = 0.2
    standardize: bool | None = (
        None  # null: csv, npz, custom arrays, records (trainer/data/standardize.py)
    )


@dataclass
class SyntheticRegressionConfig(DataConfig):
    name: str = "synthetic_regression"
    num_samples: int = 2048
    num_features: int = 10
    noise: float = 0.1


@dataclass
class SyntheticSequenceConfig(DataConfig):
    name: str = "synthetic_sequence"
    num_samples: int = 1024
    seq_len: int = 16
    num_features: int = 4
    noise: float = 0.05


@dataclass
class DigitsConfig(DataConfig):
    name: str = "digits"
    task: str = "classification"


@dataclass
class NpzConfig(DataConfig):
    name: str = "npz"
    path: str = MISSING
    task: str = "auto"


@dataclass
class CsvConfig(DataConfig):
    name: str = "csv"
    path: str = MISSING
    target: str = MISSING
    task: str = "auto"


@dataclass
class RecordsConfig(DataConfig):
    name: str = "records"
    files: Any = MISSING  # a glob or a list of paths/globs of training shards
    val_files: Any = None  # null: the description's validation shards, else held-out shards
    description: str | None = None  # null: description.json beside the first training shard
    task: str = "auto"  # from the description
    val_fraction: float = 0.2  # shards held out when there are no validation shards
    lanes: int = 4
    cycle_shards: int = 4
    shuffle_buffer: int = 4096
    verify: str = "checksums"


# ---------------------------------------------------------------- verify (scripts/verify_resume.py)
@dataclass
class VerifyConfig:
    interrupt_at: int = 100
    interrupt: str = "stop"
    atol: float = 0.0
    timeout: float = 900.0
    out: str | None = None
    kills: int = 3
    seed: int = 0
    window: float = 0.5
    wipe: bool = False


@dataclass
class Config:
    model: Any = MISSING
    optimizer: Any = MISSING
    schedule: Any = MISSING
    data: Any = MISSING
    trainer: Any = MISSING
    checkpoint: Any = MISSING
    distribute: Any = MISSING
    loss: Any = MISSING
    metrics: Any = dataclasses.field(default_factory=list)  # `_target_`s (trainer/losses.py)
    verify: Any = None


SCHEMAS: dict[tuple[str | None, str], Any] = {
    (None, "schema"): Config,
    ("trainer", "trainer_schema"): TrainerConfig,
    ("checkpoint", "checkpoint_schema"): CheckpointConfig,
    ("distribute", "distribute_schema"): DistributeConfig,
    ("distribute", "mirrored_schema"): MirroredConfig,
    ("distribute", "multi_worker_schema"): MultiWorkerConfig,
    ("schedule", "constant_schema"): ConstantConfig,
    ("schedule", "cosine_schema"): CosineConfig,
    ("schedule", "exponential_schema"): ExponentialConfig,
    ("data", "synthetic_regression_schema"): SyntheticRegressionConfig,
    ("data", "synthetic_sequence_schema"): SyntheticSequenceConfig,
    ("data", "digits_schema"): DigitsConfig,
    ("data", "npz_schema"): NpzConfig,
    ("data", "csv_schema"): CsvConfig,
    ("data", "records_schema"): RecordsConfig,
    ("verify", "verify_schema"): VerifyConfig,
}


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent), and the `groups` resolver
    that `--help` lists the options with."""
    cs = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        cs.store(group=group, name=name, node=node)
    OmegaConf.register_new_resolver("groups", _groups_help, replace=True)


CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def group_options(group: str) -> list[str]:
    """The options of a config group a user chooses from: its YAML files (the schemas beside
    them in Hydra's ConfigStore are not options); none for a group not in conf/ (Hydra's own
    hydra/... groups, a key)."""
    folder = os.path.join(CONF_DIR, group)
    if not os.path.isdir(folder):
        return []
    return sorted(n[: -len(".yaml")] for n in os.listdir(folder) if n.endswith(".yaml"))


def _groups_help() -> str:
    """`group: option, ...` for the groups of the trainer's config (conf/config.yaml's
    defaults: not `verify`, which scripts/verify_resume.py's config adds)."""
    defaults = OmegaConf.load(os.path.join(CONF_DIR, "config.yaml")).defaults
    groups = sorted(next(iter(d)) for d in defaults if isinstance(d, DictConfig))
    return "\n".join(f"{g}: {', '.join(group_options(g))}" for g in groups)


# ---------------------------------------------------------------- value checks
_CHOICES = {
    "trainer.resume": ("auto", "never"),
    "trainer.on_nonfinite": ("stop", "rollback"),
    "data.task": ("regression", "classification", "auto"),
    "data.verify": ("checksums", "sizes"),
    "distribute.name": ("default", "mirrored", "multi_worker"),
    "distribute.communication": ("auto", "ring", "nccl"),
    "trainer.precision": ("float32", "mixed_float16", "mixed_bfloat16"),
    "trainer.executor": ("auto", "single_threaded", "default"),
}


def _bad(key: str, value: Any, allowed: str) -> UserError:
    return UserError(f"{key}: received {value!r}; allowed: {allowed}")


_AT_LEAST_0 = {
    "max_rollbacks": "an integer >= 0",
    "inter_op_threads": "0 (TensorFlow's choice) or more",
}


def validate(cfg: DictConfig) -> None:
    """Check values the schema's types cannot; raise UserError naming key, value, what is allowed."""
    groups = ("model", "optimizer", "schedule", "loss", "data", "trainer", "checkpoint")
    for group in (*groups, "distribute"):
        for key in sorted(OmegaConf.missing_keys(cfg[group])):
            raise UserError(f"{key}: no value given (it is required here); add {key}=...")
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value not in allowed:
            raise _bad(key, value, " | ".join(allowed))
    for group in ("trainer", "checkpoint", "schedule", "data"):
        schema = OmegaConf.get_type(cfg[group])
        if not dataclasses.is_dataclass(schema):
            continue  # a `_target_` option: its keys are checked against its signature
        known = {f.name for f in dataclasses.fields(schema)}
        extra = sorted(set(cfg[group]) - known)
        if extra:
            raise UserError(
                f"{group}.{extra[0]}: unknown key (received {cfg[group][extra[0]]!r}); "
                f"allowed keys in {group}: {', '.join(sorted(known))}"
            )
    positive_ints = [
        "trainer.max_steps",
        "trainer.log_every",
        "trainer.eval_every",
        "trainer.steps_per_execution",
        "checkpoint.every",
        "checkpoint.max_to_keep",
        "data.batch_size",
        "data.workers",
    ]
    for key in positive_ints:
        value = OmegaConf.select(cfg, key, default=1)  # (data.workers: data=custom only)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise _bad(key, value, "an integer > 0")
    for key, allowed in _AT_LEAST_0.items():
        if cfg.trainer.get(key, 0) < 0:
            raise _bad(f"trainer.{key}", cfg.trainer[key], allowed)
    lr = cfg.optimizer.get("learning_rate")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < float("inf"):
        raise _bad("optimizer.learning_rate", lr, "a finite number > 0")
    vf = cfg.data.val_fraction
    if not 0.0 < vf < 1.0:
        raise _bad("data.val_fraction", vf, "a number strictly between 0 and 1")
    for key in ("trainer.stop_at", "trainer.pause_at"):
        value = OmegaConf.select(cfg, key)
        if value is not None and not 0 < value <= cfg.trainer.max_steps:
            raise _bad(
                key, value, f"null or a step in 1..trainer.max_steps ({cfg.trainer.max_steps})"
            )
    seconds = cfg.checkpoint.get("every_seconds")
    if seconds is not None and not 0 < seconds < float("inf"):
        raise _bad("checkpoint.every_seconds", seconds, "null or a number of seconds > 0")
    budget = cfg.checkpoint.get("max_overhead")
    if budget is not None and not 0 < budget < 1:
        raise _bad("checkpoint.max_overhead", budget, "null or a fraction strictly between 0 and 1")
    if cfg.checkpoint.keep_every_n_hours is not None and not cfg.checkpoint.keep_every_n_hours > 0:
        raise _bad(
            "checkpoint.keep_every_n_hours",
            cfg.checkpoint.keep_every_n_hours,
            "null or a number > 0",
        )
    if cfg.schedule.name == "cosine":
        if cfg.schedule.warmup_steps < 0 or cfg.schedule.warmup_steps >= cfg.trainer.max_steps:
            raise _bad(
                "schedule.warmup_steps",
                cfg.schedule.warmup_steps,
                f"an integer in 0..trainer.max_steps-1 ({cfg.trainer.max_steps - 1})",
            )
    if cfg.checkpoint["async"] and cfg.distribute.name != "default":
        raise _bad(
            "checkpoint.async",
            True,
            f"false with distribute={cfg.distribute.name} (async saves snapshot plain "
            "variables only; distributed saves are collective)",
        )
    if "_target_" not in cfg.model:
        raise UserError(
            "model._target_: missing; give the class to train, e.g. model._target_=mypkg.MyModel"
        )
