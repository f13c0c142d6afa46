"""What is in a run's checkpoints: the logic behind scripts/inspect_checkpoints.py.

- `checkpoint_table(run_dir)`: every checkpoint (including those set aside in
  `checkpoints/bad/`) with step, time, size and whether it verifies against its manifest;
- `variable_table(run_dir, step)`: the variables of one checkpoint with shape and dtype;
- `config_diff(run_dir, overrides, step)`: how the config `python -m trainer <overrides>`
  would get differs from the one a checkpoint was written with, marking the keys that would
  make a resume be refused.
"""

from __future__ import annotations

import datetime as dt
import glob
import os
from dataclasses import dataclass

from trainer.checkpoint.fingerprint import flatten
from trainer.checkpoint.manifest import checkpoint_files, list_checkpoints, read_manifest, verify
from trainer.config import UserError


@dataclass
class Row:
    step: int
    time: str
    size: int
    ok: bool
    status: str
    where: str


def _ckpt_dir(run_dir: str) -> str:
    d = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(d):
        raise UserError(f"RUN: received {run_dir!r}; it has no checkpoints/ directory")
    return d


def _manifest(prefix: str) -> dict | None:
    try:
        return read_manifest(prefix)
    except (OSError, ValueError):
        return None


def _row(prefix: str, where: str) -> Row:
    verdict = verify(prefix)
    manifest = _manifest(prefix) or {}
    files = checkpoint_files(prefix)
    stamp = manifest.get("time") or max((os.path.getmtime(p) for p in files), default=0)
    when = dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return Row(
        step=verdict.step,
        time=when,
        size=sum(os.path.getsize(p) for p in files),
        ok=verdict.ok,
        status="ok" if verdict.ok else verdict.reason,
        where=where,
    )


def checkpoint_table(run_dir: str) -> list[Row]:
    """Every checkpoint of the run, oldest first; set-aside ones (checkpoints/bad/) last."""
    directory = _ckpt_dir(run_dir)
    rows = [_row(p, "checkpoints/") for p in list_checkpoints(directory)]
    for sub in sorted(glob.glob(os.path.join(glob.escape(directory), "bad", "*"))):
        for p in list_checkpoints(sub):
            row = _row(p, os.path.relpath(sub, run_dir) + "/")
            row.ok = False  # set aside: never used again, whatever it verifies as now
            rows.append(row)
    return rows


def format_checkpoint_table(rows: list[Row]) -> str:
    lines = [f"{'step':>8}  {'time (UTC)':<19}  {'size':>10}  {'verifies':<8}  where"]
    for r in rows:
        verdict = "yes" if r.status == "ok" else f"NO: {r.status}"
        lines.append(f"{r.step:>8}  {r.time:<19}  {r.size:>10}  {verdict:<8}  {r.where}")
    return "\n".join(lines)


def _prefix(run_dir: str, step: int | None) -> str:
    prefixes = list_checkpoints(_ckpt_dir(run_dir))
    if step is None:
        good = [p for p in prefixes if verify(p).ok]
        if not good:
            raise UserError(f"RUN: received {run_dir!r}; no checkpoint there verifies")
        return good[-1]
    for p in prefixes:
        if p.endswith(f"ckpt-{step}"):
            return p
    steps = [int(p.rsplit("-", 1)[1]) for p in prefixes]
    raise UserError(f"STEP: received {step}; allowed: one of the checkpoint steps {steps}")


def variable_table(run_dir: str, step: int) -> list[tuple[str, list[int], str]]:
    """(name, shape, dtype) of every variable saved in checkpoint `step`, by its readable
    path (the key `tf.train.load_checkpoint(...).get_tensor` takes is TensorFlow's escaped
    form of it, followed by /.ATTRIBUTES/VARIABLE_VALUE)."""
    import tensorflow as tf

    from trainer.state import readable

    prefix = _prefix(run_dir, step)
    try:
        reader = tf.train.load_checkpoint(prefix)
    except Exception as e:
        raise UserError(
            f"STEP: checkpoint {prefix} cannot be read ({str(e).splitlines()[0]})"
        ) from None
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    return [
        (readable(name), list(shapes[name]), dtypes[name].name)
        for name in sorted(shapes)
        if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
    ]


def config_diff(run_dir: str, overrides: list[str], step: int | None = None) -> list[tuple]:
    """[(key, in the checkpoint, now, structural?)] for every key whose value differs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from trainer.checkpoint.fingerprint import structural
    from trainer.config import CONF_DIR, register_schemas
    from trainer.preflight import message

    prefix = _prefix(run_dir, step)
    then_cfg = (_manifest(prefix) or {}).get("config")
    if then_cfg is None:
        raise UserError(f"checkpoint {prefix} has no config in its manifest")
    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except Exception as e:
        raise UserError(message(e, list(overrides))) from None
    finally:
        GlobalHydra.instance().clear()
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    then = flatten(then_cfg)
    structural_keys = set(structural(cfg))
    return [
        (k, then.get(k, "<absent>"), now.get(k, "<absent>"), k in structural_keys)
        for k in sorted(set(now) | set(then))
        if then.get(k, "<absent>") != now.get(k, "<absent>")
    ]
