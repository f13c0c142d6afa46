"""What can be read about a run without TensorFlow: its logged metrics, its hyperparameters,
and whether it is complete, so that a sweep skips a finished job before TensorFlow loads.

`finished(cfg, run_dir)` answers from files only: the newest checkpoint's manifest (its step,
its files' sizes, its index's SHA-256, its state layout, the structural part of its config
and, for `data=records`, the data it recorded: the dataset's id and training shards, read as
a single run reads them, trainer/data/record_files.py) and the exports. When it cannot tell (a
data file given by path, whose contents only loading can compare; `trainer.resume=never`;
multi-worker), or the records differ, it returns None and the run takes the usual path
(Session.open), which decides the same thing with TensorFlow (and refuses other records).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from trainer.checkpoint.export import missing as missing_exports
from trainer.checkpoint.files import sha256_file
from trainer.checkpoint.fingerprint import STATE_LAYOUT, structural, upgraded
from trainer.data import record_files

METRICS_FILE = "metrics.jsonl"
_MANIFEST = re.compile(r"ckpt-(\d+)\.manifest\.json$")
_CKPT_FILE = re.compile(r"ckpt-(\d+)")


def read_metrics(run_dir: str) -> list[dict]:
    """Every record of `<run>/metrics.jsonl` (a torn last line from a kill is skipped)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def last_records(run_dir: str) -> dict:
    """{"loss": the last logged training loss, "eval": {metric: value} of the last eval}."""
    out: dict = {}
    for r in read_metrics(run_dir):
        if r.get("split") == "eval":
            out["eval"] = {k[len("eval_") :]: v for k, v in r.items() if k.startswith("eval_")}
            out["eval_step"] = r.get("step")
        elif "loss" in r:
            out["loss"] = r["loss"]
    return out


def hparams_of(cfg: DictConfig) -> dict:
    """The run's hyperparameters as TensorBoard's HPARAMS tab shows them (flat, scalars only)."""
    flat = {
        "model": str(cfg.model._target_),
        "optimizer": str(cfg.optimizer.get("_target_")).rpartition(".")[2],
        "schedule": cfg.schedule.get("_target_") or cfg.schedule.name,
        "loss": cfg.loss.get("_target_") or cfg.loss.name if "loss" in cfg else "auto",
        "data": cfg.data.name,
    }
    for group in ("model", "optimizer", "data", "trainer", "checkpoint"):
        for key, value in OmegaConf.to_container(cfg[group], resolve=True).items():
            if isinstance(value, (bool, int, float, str)) and key not in ("name", "_target_"):
                flat[f"{group}.{key}"] = value
    return flat


@dataclass
class Finished:
    """A run that had reached trainer.max_steps: its step and last logged metrics."""

    step: int
    final_loss: float | None
    eval: dict = field(default_factory=dict)


def _newest_manifest(ckpt_dir: str) -> dict | None:
    """The newest checkpoint's manifest if its files match it (sizes, the index's SHA-256,
    which pins the CRC32C of every tensor); None if the newest checkpoint has none or differs."""
    try:
        names = os.listdir(ckpt_dir)
    except OSError:
        return None
    steps = [int(m.group(1)) for n in names if (m := _CKPT_FILE.match(n))]
    if not steps:
        return None
    prefix = os.path.join(ckpt_dir, f"ckpt-{max(steps)}")
    try:
        with open(prefix + ".manifest.json") as f:
            manifest = json.load(f)
        for name, meta in manifest["files"].items():
            path = os.path.join(ckpt_dir, name)
            if os.path.getsize(path) != meta["size"]:
                return None
            if "sha256" in meta and sha256_file(path) != meta["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def finished(cfg: DictConfig, run_dir: str) -> Finished | None:
    """The complete run in `run_dir` that a rerun with `cfg` would leave as it is, or None
    (not complete, or only Session.open can tell: see the module docstring)."""
    tc = cfg.trainer
    if tc.resume == "never" or cfg.distribute.name == "multi_worker" or "path" in cfg.data:
        return None
    manifest = _newest_manifest(os.path.join(run_dir, "checkpoints"))
    if manifest is None or int(manifest.get("step", -1)) < int(tc.max_steps):
        return None
    now = json.loads(json.dumps(structural(cfg)))  # as the manifest stores it
    then = upgraded(manifest.get("structural") or {})
    if manifest.get("state_layout") != STATE_LAYOUT or then != now:
        return None
    if not _same_records(cfg, manifest):
        return None  # other records (Session.open refuses them, and says why), or unreadable
    if missing_exports(run_dir, int(manifest["step"])):
        return None
    last = last_records(run_dir)
    return Finished(int(manifest["step"]), last.get("loss"), last.get("eval", {}))


def _same_records(cfg: DictConfig, manifest: dict) -> bool:
    """For `data=records` (the data group names its files, whose contents the structural
    config leaves out): whether the records it names now are those the checkpoint recorded
    (`data_shape`: the dataset's id and set of training shards), read from their description
    and sizes as a run reads them (record_files.current_signature). True for other data."""
    if "files" not in cfg.data:
        return True
    then = manifest.get("data_shape")
    return then is not None and then == record_files.current_signature(cfg.data)


def has_checkpoint(run_dir: str) -> bool:
    """Whether `run_dir` holds a committed checkpoint (a manifest: written last)."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(ckpt_dir) and any(
        n.startswith("ckpt-") and n.endswith(".manifest.json") for n in os.listdir(ckpt_dir)
    )


def interrupted_message(run_dir: str | None, name: str, resume_hint: str) -> tuple[int, str]:
    """(exit code, the line to print) for a run stopped by a signal outside its training
    loop (start-up or export): 3 if a checkpoint is there to resume from, else 4."""
    if run_dir is not None and has_checkpoint(run_dir):
        return 3, (
            f"interrupted ({name}) outside the training loop; the checkpoints in "
            f"{os.path.join(run_dir, 'checkpoints')} are intact. {resume_hint}"
        )
    return 4, (
        f"interrupted ({name}) before the first checkpoint: nothing to resume; rerun the "
        "command to start"
    )
