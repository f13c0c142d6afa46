"""`data=records` without TensorFlow: the description, the shards a config names, and what a
checkpoint records about them (the dataset's id and its set of training shards).

trainer/data/records.py opens the shards for training with these; a sweep compares a finished
job's checkpoint with the records its config names before TensorFlow loads
(trainer/sweep/runinfo.py), with the same code, so that it skips a job exactly when a single run
would find it complete.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import zlib
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig

from trainer.config import UserError, first_few

DESCRIPTION = "description.json"
FORMAT = "resumable-trainer records"
VERSION = 1


@dataclass(frozen=True)
class Shard:
    path: str
    examples: int
    bytes: int
    crc32: int


@dataclass
class Selection:
    """The shards a config names, checked against their description (names, splits, present)."""

    desc: dict
    desc_path: str
    train: list[Shard]
    val: list[Shard]


def file_crc32(path: str, chunk: int = 1 << 22) -> int:
    """CRC-32 of a whole file (zlib; releases the GIL, so shards are checked in parallel)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def dataset_id(description: dict) -> str:
    """The identity of a dataset: its features and every shard's name, count and CRC
    (recorded in each checkpoint's manifest: a resume on other data is refused)."""
    core = {
        k: description[k] for k in ("feature_shape", "y_shape", "y_dtype", "task", "output_units")
    }
    core["shards"] = sorted(
        (s["file"], s["split"], s["examples"], s["crc32"]) for s in description["shards"]
    )
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def signature(desc: dict, train: list[Shard]) -> dict:
    """Recorded in each checkpoint (`data_shape`): a resume on other records, or on another
    set of training shards of them, is refused (the stream depends on both)."""
    names = json.dumps([os.path.basename(s.path) for s in train])
    return {
        "feature_shape": list(desc["feature_shape"]),
        "output_units": int(desc["output_units"]),
        "task": desc["task"],
        "dataset_id": desc["dataset_id"],
        "training_shards": hashlib.sha256(names.encode()).hexdigest()[:16],
    }


def read_description(path: str) -> dict:
    try:
        with open(path) as f:
            desc = json.load(f)
    except OSError as e:
        raise UserError(
            f"data.description: cannot read {path!r} ({e.strerror}); write the shards and "
            "their description with scripts/make_records.py, or set data.description"
        ) from None
    except ValueError as e:
        raise UserError(f"data.description: {path!r} is not valid JSON ({e})") from None
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise UserError(
            f"data.description: {path!r} is not a description written by "
            f"scripts/make_records.py (format {FORMAT!r} expected)"
        )
    if desc.get("version") != VERSION:
        raise UserError(
            f"data.description: {path!r} has version {desc.get('version')!r}; this trainer "
            f"reads version {VERSION}"
        )
    try:
        desc["shards"] = [dict(s) for s in desc["shards"]]
        for s in desc["shards"]:
            s["examples"], s["bytes"], s["crc32"] = (
                int(s[k]) for k in ("examples", "bytes", "crc32")
            )
            if s["split"] not in ("train", "val") or not isinstance(s["file"], str):
                raise ValueError(f"shard {s['file']!r}: split {s['split']!r}")
        desc["feature_shape"] = [int(d) for d in desc["feature_shape"]]
        desc["y_shape"] = [int(d) for d in desc["y_shape"]]
        desc["output_units"] = int(desc["output_units"])
        if desc["task"] not in ("regression", "classification"):
            raise ValueError(f"task {desc['task']!r}")
        if desc["y_dtype"] not in ("float32", "int64"):
            raise ValueError(f"y_dtype {desc['y_dtype']!r}")
        desc["dataset_id"] = dataset_id(desc)  # computed, never trusted from the file
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"data.description: {path!r} lacks or garbles {e} (write it with "
            "scripts/make_records.py)"
        ) from None
    return desc


def expand(key: str, value) -> list[str]:
    """Sorted files matched by a glob, or by a list of paths and globs."""
    patterns = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not patterns:
        raise UserError(f"{key}: received an empty list; allowed: a glob or a list of paths")
    files: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(os.path.expanduser(str(pattern))))
        if not found:
            raise UserError(f"{key}: received {str(pattern)!r}; no file matches it")
        files += [f for f in found if f not in files]
    return files


def select(cfg: DictConfig) -> Selection:
    """The training and validation shards that `data.files` (and `data.val_files`, or the
    description's validation shards, or `data.val_fraction` held out) name, in the
    description's order; UserError for a shard missing, unknown, of the wrong split or
    named twice. The shards' contents are not read here (records.open_records checks them)."""
    files = expand("data.files", cfg.files)
    desc_path = cfg.get("description") or os.path.join(os.path.dirname(files[0]), DESCRIPTION)
    desc = read_description(os.path.expanduser(str(desc_path)))
    if cfg.task not in ("auto", desc["task"]):
        raise UserError(
            f"data.task: received {cfg.task!r}; the dataset in {desc_path} is "
            f"{desc['task']} (allowed: auto or {desc['task']})"
        )
    listed = {s["file"]: s for s in desc["shards"]}
    train = _shards("data.files", files, listed, desc_path, "train")
    train_names = {os.path.basename(s.path) for s in train}
    missing = [n for n, s in listed.items() if s["split"] == "train" and n not in train_names]
    if missing:
        raise UserError(
            f"data.files: {len(missing)} shard(s) listed in {desc_path} are not among the "
            f"files matched by {str(cfg.files)!r}: {first_few(sorted(missing), 3)} (missing?)"
        )
    if cfg.get("val_files"):
        given = expand("data.val_files", cfg.val_files)
        val = _shards("data.val_files", given, listed, desc_path, "val")
    else:
        here = os.path.dirname(train[0].path)
        names = sorted(n for n, s in listed.items() if s["split"] == "val")
        val = _shards("data.val_files", [os.path.join(here, n) for n in names], listed, desc_path)
        if not val:  # no validation shards: hold out a fraction of the training shards
            held = max(1, int(round(float(cfg.val_fraction) * len(train))))
            if held >= len(train):
                raise UserError(
                    f"data.val_fraction: the description has no validation shards and "
                    f"holding out {held} of {len(train)} training shard(s) would leave none to "
                    "train on; write validation shards (scripts/make_records.py) or set "
                    "data.val_files"
                )
            train, val = train[:-held], train[-held:]
    return Selection(desc, str(desc_path), train, val)


def _shards(
    key: str, files: list[str], listed: dict, desc_path: str, split: str | None = None
) -> list[Shard]:
    """The description's entries of `files`, in the description's order (so the stream
    does not depend on how the files were listed); of `split` only, each name once."""
    names = [os.path.basename(p) for p in files]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{key}: shard {twice[0]!r} is given twice (from two directories?)")
    order = {name: i for i, name in enumerate(listed)}
    files = sorted(files, key=lambda p: order.get(os.path.basename(p), -1))
    shards = []
    for path in files:
        entry = listed.get(os.path.basename(path))
        if entry is None:
            raise UserError(
                f"{key}: {path!r} is not a shard of the dataset described by {desc_path} "
                "(a description from another dataset?)"
            )
        if not os.path.isfile(path):
            raise UserError(f"{key}: shard {path!r} is missing")
        if split is not None and entry["split"] != split:
            raise UserError(
                f"{key}: {path!r} is a {entry['split']} shard in {desc_path}; allowed here: "
                f"{split} shards only (narrow the glob, e.g. 'train-*.tfrecord')"
            )
        shards.append(Shard(path, int(entry["examples"]), int(entry["bytes"]), int(entry["crc32"])))
    return shards


def size_problems(shards: list[Shard]) -> list[str]:
    """One line per shard whose size on disk is not its description's."""
    return [
        f"shard {s.path!r} has {size} bytes; its description says {s.bytes}"
        for s in shards
        if (size := os.path.getsize(s.path)) != s.bytes
    ]


def current_signature(cfg: DictConfig) -> dict | None:
    """The `data_shape` a run of the data group `cfg` would record (signature), from the
    description and the shards' names and sizes; None when opening the records would refuse
    them (the run then says why) or a shard is not of its described size. Their CRC-32s are
    not read: that is the run's check (data.verify)."""
    try:
        chosen = select(cfg)
        if size_problems(chosen.train + chosen.val):
            return None
    except (UserError, OSError):
        return None
    return signature(chosen.desc, chosen.train)
