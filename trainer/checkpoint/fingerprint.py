"""What a checkpoint records about its config, and the check that a resume may use it.

The structural part of a config is what a checkpoint's tensors and the batches, initial
weights and random masks of each step depend on: the whole `model` group, the `data` group
(except where the file lives), the optimizer's class (its slot variables) and `trainer.seed`
(the batch order of every epoch, the initial weights, Dropout's masks). Changing any of it
under an existing run would load tensors into the wrong places or train on other batches
than the interrupted run would have, so a resume with a different structural part is
refused; max_steps, logging, eval and checkpoint cadence may change.

Nothing here loads TensorFlow (the store is imported where a manifest is read): a sweep
compares a finished job's manifest with its config before TensorFlow loads (trainer/sweep/runinfo.py).
"""

from __future__ import annotations

import hashlib
import json
import platform

from omegaconf import DictConfig, OmegaConf

# Recorded in every manifest. Checkpoints without it were written through TensorFlow's object
# graph (model=<the model>), which can miss variables: they are refused on resume.
STATE_LAYOUT = 2
# where the data lives and how it is checked (records: the dataset_id in data_shape is checked)
_NOT_STRUCTURAL = {"data.path", "data.files", "data.val_files", "data.description", "data.verify"}
_NOT_STRUCTURAL |= {"data.workers"}  # how many rows of a source are read at once


def flatten(value, prefix: str = "", out: dict | None = None) -> dict:
    """{"a.b": 1} from {"a": {"b": 1}}."""
    out = {} if out is None else out
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value
    return out


def structural(cfg: DictConfig) -> dict:
    """The flattened keys that must not change across a resume."""
    flat = flatten(
        {
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "data": OmegaConf.to_container(cfg.data, resolve=True),
            "optimizer": {"_target_": cfg.optimizer.get("_target_")},  # its slot variables
            "trainer": {"seed": int(cfg.trainer.seed)},
        }
    )
    return {k: v for k, v in flat.items() if k not in _NOT_STRUCTURAL}


# optimizers were named before they were `_target_`s: a checkpoint of then reads as of now
_OPTIMIZER_NAMES = {
    "sgd": "keras.optimizers.SGD",
    "adam": "keras.optimizers.Adam",
    "adamw": "keras.optimizers.AdamW",
    "rmsprop": "keras.optimizers.RMSprop",
}


def upgraded(recorded: dict) -> dict:
    """A manifest's structural keys as this version writes them (`optimizer.name: adam` ->
    `optimizer._target_: keras.optimizers.Adam`), so that its runs still resume."""
    out = dict(recorded)
    name = out.pop("optimizer.name", None)
    if name is not None and "optimizer._target_" not in out:
        out["optimizer._target_"] = _OPTIMIZER_NAMES.get(name, name)
    return out


def fingerprint(cfg: DictConfig) -> str:
    return hashlib.sha256(json.dumps(structural(cfg), sort_keys=True).encode()).hexdigest()[:16]


def versions() -> dict:
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def manifest_extra(cfg: DictConfig) -> dict:
    """Config-derived manifest fields: the whole config, its structural part and fingerprint."""
    return {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "structural": structural(cfg),
        "config_fingerprint": fingerprint(cfg),
        "versions": versions(),
    }


def structural_diff(cfg: DictConfig, prefix: str) -> dict[str, tuple]:
    """{key: (in checkpoint, now)} for structural keys that differ from checkpoint `prefix`."""
    from trainer.checkpoint.manifest import read_manifest

    then = upgraded(read_manifest(prefix).get("structural", {}))
    now = structural(cfg)
    return {
        k: (then.get(k), now.get(k))
        for k in sorted(set(then) | set(now))
        if then.get(k) != now.get(k)
    }
