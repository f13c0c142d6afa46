"""Every option of every config group composes; the schema stops typos and wrong types."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trainer.config import CONF_DIR, UserError, validate

GROUPS = ["model", "optimizer", "schedule", "loss", "data", "trainer", "checkpoint", "distribute"]
NEEDS = {  # options that need further keys from the user
    ("model", "custom"): ["model._target_=models.DropoutMLP"],
    ("optimizer", "custom"): ["optimizer._target_=keras.optimizers.Nadam"],
    ("schedule", "custom"): ["schedule._target_=keras.optimizers.schedules.PolynomialDecay"],
    ("loss", "custom"): ["loss._target_=keras.losses.Huber"],
    ("data", "custom"): ["data._target_=user_parts.make_arrays"],
    ("data", "npz"): ["data.path=x.npz"],
    ("data", "csv"): ["data.path=x.csv", "data.target=y"],
    ("data", "records"): ["data.files=data/x/train-*.tfrecord"],
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(compose, group, option):
    cfg = compose([f"{group}={option}", *NEEDS.get((group, option), [])])
    assert OmegaConf.select(cfg, group) is not None
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if (group, option) not in (("data", "npz"), ("data", "csv")):
        validate(cfg)
    if group in ("schedule", "loss", "data"):
        assert cfg[group].name == option
    if group == "optimizer":  # every key of a shipped option is an argument of its class
        from trainer.optim import build_optimizer

        optimizer = build_optimizer(cfg.optimizer, cfg.schedule, 100)
        assert type(optimizer).__name__ == cfg.optimizer._target_.rpartition(".")[2]


def test_defaults_match_the_cli_contract(compose):
    cfg = compose()
    assert cfg.data.name == "synthetic_regression"
    assert cfg.trainer.seed == 0 and cfg.trainer.resume == "auto" and cfg.trainer.deterministic
    for key in (
        "trainer.max_steps",
        "trainer.log_every",
        "trainer.eval_every",
        "trainer.steps_per_execution",
        "checkpoint.every",
        "checkpoint.max_to_keep",
        "checkpoint.keep_every_n_hours",
        "checkpoint.async",
        "distribute.logical_cpus",
        "data.batch_size",
        "optimizer.learning_rate",
    ):
        assert OmegaConf.select(cfg, key, default="absent") != "absent", key


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("trainer.max_stepz=5", "max_stepz"),  # typo'd key
        ("trainer.max_steps=abc", "max_steps"),  # wrong type
        ("optimizer.momentum=0.9", "momentum"),  # key of another option (adam has none)
        ("checkpoint.async=maybe", "async"),
        ("model=nonexistent", "nonexistent"),  # unknown group option
    ],
)
def test_schema_rejects_at_compose_time(compose, override, fragment):
    with pytest.raises(Exception) as err:
        compose([override])
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("trainer.max_steps=-5", "trainer.max_steps"),
        ("data.batch_size=0", "data.batch_size"),
        ("optimizer.learning_rate=0", "optimizer.learning_rate"),
        ("optimizer.learning_rate=-0.1", "optimizer.learning_rate"),
        ("trainer.resume=sometimes", "trainer.resume"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("trainer.stop_at=5000", "trainer.stop_at"),
        ("trainer.executor=threads", "trainer.executor"),
    ],
)
def test_validate_names_key_value_and_allowed(compose, override, key):
    cfg = compose([override])
    with pytest.raises(UserError) as err:
        validate(cfg)
    msg = str(err.value)
    assert msg.startswith(key) and "received" in msg and "allowed" in msg
    assert override.split("=")[1] in msg


@pytest.mark.parametrize("strategy", ["mirrored", "multi_worker"])
def test_async_checkpoints_only_with_the_default_strategy(compose, strategy):
    cfg = compose(["checkpoint.async=true", f"distribute={strategy}"])
    with pytest.raises(
        UserError,
        match=f"checkpoint.async: received True; allowed: false with distribute={strategy}",
    ):
        validate(cfg)
