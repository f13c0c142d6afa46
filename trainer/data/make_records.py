"""The record converter behind scripts/make_records.py: any data source to TFRecord shards.

    python scripts/make_records.py data=csv data.path=houses.csv data.target=price --out data/houses --shards 16

It reads the source the `data` overrides name (the same sources and the same fixed
train/validation split as in-memory training, trainer/data/memory.py), writes the training rows
into `--shards` shards and the validation rows into `--val-shards` shards, each a file of
tf.train.Example records (`id`: the row in the source, `x`, `y`), and `description.json`
(trainer/data/records.py) with each shard's example count, size and CRC-32. The synthetic
sources and a user's random-access source (`data=custom`) are read block by block, so a
dataset larger than memory never is in memory.

Everything is written into a temporary directory beside `--out`, fsynced, and renamed to
`--out` at the end: an interrupted conversion leaves no half dataset, and an existing one is
never overwritten. Exit codes: 0 written, 2 bad input.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys

import numpy as np

from trainer.checkpoint.files import varint
from trainer.config import UserError

_OUT_OF_SOURCE = ("records",)
_SOURCE_BLOCK = 4096  # rows of a data=custom source read (in parallel) per block


def _varint(n: int) -> bytes:
    if n < 0:  # ids are rows and labels are checked >= 0: never negative here
        raise ValueError(f"cannot encode {n}: ids and labels must be >= 0")
    return varint(n)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return bytes([tag]) + _varint(len(payload)) + payload


def _entry(key: bytes, feature: bytes) -> bytes:
    """One entry of Features' map<string, Feature>."""
    return _field(0x0A, _field(0x0A, key) + _field(0x12, feature))


def _int64_feature(values) -> bytes:
    """Feature{int64_list: packed varints} (values >= 0)."""
    return _field(0x1A, _field(0x0A, b"".join(_varint(int(v)) for v in values)))


def _float_prefix(key: bytes, n: int) -> bytes:
    """A map entry {key: Feature{float_list: n floats}} up to its 4*n value bytes (the same
    for every row: the rows' bytes follow it)."""
    whole = _entry(key, _field(0x12, _field(0x0A, bytes(4 * n))))
    return whole[: len(whole) - 4 * n]


def encode_examples(ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> list[bytes]:
    """Serialized tf.train.Example records {id: int64, x: floats, y: floats or int64},
    encoded directly (tf.train.Example objects cost 54 us a row with 240 features; this
    5 us with 250, measured). tests/test_records.py checks the bytes parse back as the same Example."""
    n = len(ids)
    xb = np.ascontiguousarray(x, dtype="<f4").reshape(n, -1)
    x_prefix = _float_prefix(b"x", xb.shape[1])
    if np.issubdtype(y.dtype, np.integer):
        yv = np.asarray(y, np.int64).reshape(n, -1)
        y_entries = [_entry(b"y", _int64_feature(row)) for row in yv]
    else:
        yb = np.ascontiguousarray(y, dtype="<f4").reshape(n, -1)
        y_prefix = _float_prefix(b"y", yb.shape[1])
        y_entries = [y_prefix + row.tobytes() for row in yb]
    records = []
    for i in range(n):
        body = _entry(b"id", _int64_feature((ids[i],))) + x_prefix + xb[i].tobytes()
        records.append(_field(0x0A, body + y_entries[i]))
    return records


class _ShardWriter:
    """Rows of one split written in order over `shards` files of near-equal counts."""

    def __init__(self, out: str, split: str, shards: int, total: int):
        self.out, self.split, self.shards, self.total = out, split, shards, total
        self.counts = [0] * shards
        self.names = [f"{split}-{j:05d}-of-{shards:05d}.tfrecord" for j in range(shards)]
        self._written, self._current, self._writer = 0, -1, None

    def _shard_of(self, k: int) -> int:
        return k * self.shards // self.total

    def write(self, ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        import tensorflow as tf

        for record in encode_examples(ids, x, y):
            j = self._shard_of(self._written)
            if j != self._current:
                if self._writer is not None:
                    self._writer.close()
                self._writer = tf.io.TFRecordWriter(os.path.join(self.out, self.names[j]))
                self._current = j
            self._writer.write(record)
            self.counts[j] += 1
            self._written += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _rows(cfg):
    """(task, output units, feature shape), the numbers of train and val rows, and a
    generator of (ids, x, y, split)."""
    from trainer.data import source as user_source
    from trainer.data.memory import STREAMED, read_source, split_ids

    if cfg.name in STREAMED:
        n = int(cfg.num_samples)
        if n < 2:
            raise UserError(f"data.num_samples: received {n}; allowed: an integer >= 2")
        if cfg.task not in ("auto", "regression"):
            raise UserError(
                f"data.task: received {cfg.task!r}; data={cfg.name} is a regression set "
                "(allowed: regression)"
            )
        val, _ = split_ids(n, float(cfg.val_fraction))
        is_val = np.zeros(n, bool)
        is_val[val] = True

        source = STREAMED[cfg.name](cfg)
        first = next(source)  # its shapes; written first, then the rest

        def blocks():
            for start, x, y in itertools.chain([first], source):
                ids = np.arange(start, start + len(x), dtype=np.int64)
                v = is_val[start : start + len(x)]
                yield ids[~v], x[~v], y[~v], "train"
                yield ids[v], x[v], y[v], "val"

        meta = ("regression", first[2].shape[1], first[1].shape[1:])
        return meta, n - len(val), len(val), blocks()
    arrays = None
    if cfg.name == "custom":  # the user's function: arrays, or a source read block by block
        arrays = user_source.call_custom(cfg)
        if isinstance(arrays, user_source.SourceData):
            return _source_rows(arrays)
    x, y, task, units, _ = read_source(cfg, arrays)
    val, train = split_ids(len(x), float(cfg.val_fraction))

    def whole():
        yield train.astype(np.int64), x[train], y[train], "train"
        yield val.astype(np.int64), x[val], y[val], "val"

    return (task, units, x.shape[1:]), len(train), len(val), whole()


class _Moments:
    """Running sums of the training rows, block by block: their mean and standard deviation
    per feature (and per target column of a regression), as trainer/data/standardize.py takes them."""

    def __init__(self):
        self.n, self.sx, self.sxx, self.sy, self.syy = 0, 0.0, 0.0, 0.0, 0.0
        self.rows = 0

    def add(self, x: np.ndarray, y: np.ndarray | None) -> None:
        x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        self.n = self.n + np.isfinite(x).sum(0)  # per feature: NaN left out, as in-memory
        self.sx, self.sxx = self.sx + np.nansum(x, 0), self.sxx + np.nansum(x * x, 0)
        if y is not None:
            y = np.asarray(y, np.float64).reshape(len(y), -1)
            self.rows = self.rows + np.isfinite(y).sum(0)
            self.sy, self.syy = self.sy + np.nansum(y, 0), self.syy + np.nansum(y * y, 0)

    def statistics(self) -> dict:
        def mean_std(s, ss, n):
            mean = s / n
            std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
            return mean.tolist(), np.where(std > 0, std, 1.0).tolist()

        out = dict(zip(("x_mean", "x_std"), mean_std(self.sx, self.sxx, self.n), strict=True))
        if np.any(self.rows):
            out.update(
                zip(("y_mean", "y_std"), mean_std(self.sy, self.syy, self.rows), strict=True)
            )
        return out


def _source_rows(data):
    """`_rows` of a random-access source: its training then validation rows, read in blocks
    of _SOURCE_BLOCK rows (in parallel, as training reads them), never all at once."""

    def blocks():
        for split, ids in (("train", data.train_ids), ("val", data.val_ids)):
            starts = range(0, len(ids), _SOURCE_BLOCK)
            for start, (x, y) in zip(starts, data.rows_dataset(ids, _SOURCE_BLOCK), strict=True):
                yield ids[start : start + _SOURCE_BLOCK], x.numpy(), y.numpy(), split

    meta = (data.task, data.output_units, data.feature_shape)
    return meta, len(data.train_ids), len(data.val_ids), blocks()


def convert(cfg, out: str, shards: int, val_shards: int, progress: bool = True) -> dict:
    """Write the dataset `cfg` (the data group) names into `out`; return its description."""
    from tqdm import tqdm

    from trainer.checkpoint.files import fsync_path, write_text_atomic
    from trainer.data.record_files import DESCRIPTION, FORMAT, VERSION, dataset_id, file_crc32

    (task, units, feature_shape), n_train, n_val, rows = _rows(cfg)
    if n_train < shards:
        raise UserError(f"--shards: received {shards}; the source has only {n_train} training rows")
    val_shards = min(val_shards, n_val)
    parent = os.path.dirname(os.path.abspath(out))
    tmp = os.path.join(parent, f".{os.path.basename(out)}.partial-{os.getpid()}")
    os.makedirs(tmp)
    try:
        writers = {
            "train": _ShardWriter(tmp, "train", shards, n_train),
            "val": _ShardWriter(tmp, "val", val_shards, n_val),
        }
        with tqdm(total=n_train + n_val, unit="ex", desc="records", disable=not progress) as bar:
            sums = _Moments()
            for ids, x, y, split in rows:
                if len(ids):
                    writers[split].write(ids, x, y)
                    bar.update(len(ids))
                    if split == "train":
                        sums.add(x, y if task == "regression" else None)
        shard_list = []
        for split, w in writers.items():
            w.close()
            for name, count in zip(w.names, w.counts, strict=True):
                path = os.path.join(tmp, name)
                fsync_path(path)
                shard_list.append(
                    {
                        "file": name,
                        "split": split,
                        "examples": count,
                        "bytes": os.path.getsize(path),
                        "crc32": file_crc32(path),
                    }
                )
        integer_y = task == "classification"
        desc = {
            "format": FORMAT,
            "version": VERSION,
            "feature_shape": list(feature_shape),
            "y_shape": [] if integer_y else [int(units)],
            "y_dtype": "int64" if integer_y else "float32",
            "task": task,
            "output_units": int(units),
            "examples": {"train": n_train, "val": n_val},
            "source": _source(cfg),
            "shards": shard_list,
            "standardize": sums.statistics(),  # the training rows' (trainer/data/standardize.py)
        }
        desc["dataset_id"] = dataset_id(desc)
        write_text_atomic(os.path.join(tmp, DESCRIPTION), json.dumps(desc, indent=1) + "\n")
        fsync_path(tmp)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked): the rename below replaces it
        os.rename(tmp, out)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return desc


def _source(cfg) -> dict:
    from omegaconf import OmegaConf

    src = OmegaConf.to_container(cfg, resolve=True)
    src.pop("batch_size", None)
    return src


def _arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python scripts/make_records.py",
        description="Convert a data source (data=... overrides) into TFRecord shards.",
    )
    parser.add_argument("--out", required=True, help="a new (or empty) directory")
    parser.add_argument("--shards", type=int, default=16, help="training shards (default 16)")
    parser.add_argument(
        "--val-shards",
        type=int,
        default=None,
        help="validation shards (default: about shards x data.val_fraction, at least 1)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args, overrides = parser.parse_known_args(argv)
    for o in overrides:
        if o.startswith("-") or "=" not in o:
            raise UserError(
                f"received {o!r}; allowed: --out DIR, --shards N, --val-shards N, --quiet and "
                "data overrides like data=csv data.path=houses.csv"
            )
    return args, overrides


def _compose(overrides: list[str]):
    from trainer.preflight import check

    problem = check(overrides)
    if problem:
        raise UserError(problem)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer.config import CONF_DIR, register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides).data


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = _arguments(argv)
        if args.shards < 1:
            raise UserError(f"--shards: received {args.shards}; allowed: an integer >= 1")
        if os.path.islink(args.out.rstrip("/")) or os.path.ismount(args.out):
            raise UserError(
                f"--out: received {args.out!r}; it is a link or a mount point (the finished "
                "dataset is renamed into place): name a new directory"
            )
        if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
            raise UserError(
                f"--out: received {args.out!r}; it already exists and is not an empty "
                "directory (nothing was written; choose a new directory)"
            )
        cfg = _compose(overrides)
        if cfg.name in _OUT_OF_SOURCE:
            raise UserError(
                "data: received 'records'; allowed: a source to convert (csv, npz, digits, "
                "synthetic_regression, synthetic_sequence)"
            )
        val_shards = args.val_shards
        if val_shards is None:
            val_shards = max(1, round(args.shards * float(cfg.val_fraction)))
        if val_shards < 1:
            raise UserError(f"--val-shards: received {val_shards}; allowed: an integer >= 1")
        desc = convert(cfg, args.out, args.shards, val_shards, progress=not args.quiet)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = desc["examples"]
    print(
        f"wrote {n['train']} training and {n['val']} validation examples in "
        f"{len(desc['shards'])} shards to {args.out} (dataset {desc['dataset_id']})"
    )
    return 0
