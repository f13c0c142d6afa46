"""The checkpoint-state part of the benchmark: a ~300 MB TrainState's save and restore, sizes, RSS.

The state is the repository's own `models.MySubclassedModel` made wide (25M parameters for
the default sizes) with Adam's two slots: 100 MB of weights + 200 MB of slots, all random.
It goes through the real `CheckpointStore` (TensorFlow write + manifest + retention), sync and
async, against writing the same arrays with numpy.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from trainer import nonfinite
from trainer.bench.common import _rss
from trainer.checkpoint.manifest import checkpoint_files, verify
from trainer.checkpoint.store import CheckpointStore
from trainer.state import TrainState


def _big_state(units: int, features: int) -> TrainState:
    from models import MySubclassedModel

    model = MySubclassedModel(num_units=units, output_units=1)
    model(tf.zeros((1, features)))
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    for v in model.weights + optimizer.variables:
        if v.dtype == "float32":  # real-looking (incompressible) values, not fresh zeros
            v.assign(rng.standard_normal(tuple(v.shape), dtype=np.float32))
    return TrainState(model, optimizer)


def _numpy_write(arrays: list[np.ndarray], path: str, fsync: bool = False) -> float:
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for a in arrays:
            np.save(f, a)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t0


_VMSTAT = ("pgscan_direct", "allocstall_normal", "allocstall_movable", "nr_dirty")


def _vmstat() -> dict[str, int]:
    """The kernel's memory-pressure counters (direct reclaim, dirty pages) from /proc/vmstat."""
    try:
        with open("/proc/vmstat") as f:
            pairs = (line.split() for line in f)
            return {k: int(v) for k, v in pairs if k in _VMSTAT}
    except OSError:
        return {}


def data_position_bytes(workdir: str) -> dict:
    """On the default data (synthetic_regression, 10 features, batch 32): the bytes of a real
    checkpoint holding our data position (the step and epoch counters), against a checkpoint
    of the tf.data iterator users would otherwise save: the whole training set shuffled
    (`shuffle(len(x))`, as Keras users do), batched, repeated, three batches in."""
    from trainer.bench.common import compose
    from trainer.data import memory as data_lib

    cfg = compose([])
    data = data_lib.load_data(cfg.data)
    counters = {"step": tf.Variable(3, dtype=tf.int64), "epoch": tf.Variable(0, dtype=tf.int64)}
    ours = tf.train.Checkpoint(**counters).write(os.path.join(workdir, "position", "ckpt"))
    ds = tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train))
    ds = ds.shuffle(len(data.x_train), seed=0).batch(int(cfg.data.batch_size)).repeat()
    it = iter(ds)
    for _ in range(3):
        next(it)
    theirs = tf.train.Checkpoint(iterator=it).write(os.path.join(workdir, "iterator", "ckpt"))
    reader = tf.train.load_checkpoint(ours)
    tensor_bytes = sum(
        reader.get_tensor(k).nbytes
        for k in reader.get_variable_to_dtype_map()
        if k.startswith(("step", "epoch"))
    )
    size = lambda prefix: sum(os.path.getsize(p) for p in checkpoint_files(prefix))  # noqa: E731
    return {
        "data_position_bytes": tensor_bytes,  # the counters' tensors in the checkpoint
        "data_position_checkpoint_bytes": size(ours),  # a checkpoint of only them, files
        "tf_data_iterator_bytes": size(theirs),
        "tf_data_iterator_note": f"shuffle({len(data.x_train)}).batch({cfg.data.batch_size}) "
        f"over the default data ({data.feature_shape[0]} features): the iterator checkpoint",
    }


# Every timing state_io records, one list per kind, one entry per round (round 0: warm-up).
_TRIALS = (
    "sync", "manifest", "async_block", "async_total", "numpy", "restore",
    "update", "update_after_snapshot", "verify", "tf_write",
    "sync_with_delete", "numpy_fresh", "guard", "copy",
    "nondurable", "nondurable_with_delete", "numpy_fresh_fsync",
)  # fmt: skip


def _stores(state: TrainState, workdir: str) -> dict[str, CheckpointStore]:
    """The real stores under test: durable sync, non-durable sync (no fsync), and async."""
    return {
        kind: CheckpointStore(
            os.path.join(workdir, kind),
            state.checkpoint,
            max_to_keep=1,
            keep_every_n_hours=None,
            manifest_extra={},
            async_write=kind == "async",
            durable=kind != "sync_nondurable",
        )
        for kind in ("sync", "sync_nondurable", "async")
    }


def _optimizer_step(state: TrainState):
    """`update()`: one optimizer step over every weight and slot; returns its seconds."""
    grads = [tf.ones_like(v) * 1e-3 for v in state.model.trainable_variables]

    def update() -> float:
        t0 = time.perf_counter()
        state.optimizer.apply_gradients(zip(grads, state.model.trainable_variables, strict=True))
        _ = [v.numpy() for v in state.optimizer.variables[:1]]  # wait for the update
        return time.perf_counter() - t0

    return update


def _time_sync_saves(stores: dict, step: int, assign, t: dict, pressure: list) -> str:
    """One round's durable sync save (then its manifest alone) and non-durable sync save, with
    the kernel's memory-pressure deltas over the latter; the durable checkpoint's prefix."""
    # os.sync() before each timed write: every write starts with no dirty pages queued
    # by the previous one (kernel writeback throttling made the order matter otherwise)
    os.sync()
    t0 = time.perf_counter()
    t["sync"].append(stores["sync"].save(step, assign=assign))  # what the loop waits for
    stores["sync"].wait()  # retention's background delete of the previous checkpoint
    t["sync_with_delete"].append(time.perf_counter() - t0)
    prefix = stores["sync"].manager.latest_checkpoint
    t0 = time.perf_counter()
    stores["sync"].write_manifest(prefix, step)  # the manifest part of a save, on its own
    t["manifest"].append(time.perf_counter() - t0)
    # the same save without durability (no fsync): what the bimodal figure was about
    os.sync()
    before = _vmstat()
    t0 = time.perf_counter()
    t["nondurable"].append(stores["sync_nondurable"].save(step, assign=assign))
    stores["sync_nondurable"].wait()
    t["nondurable_with_delete"].append(time.perf_counter() - t0)
    after = _vmstat()
    pressure.append(
        {k: after.get(k, 0) - before.get(k, 0) for k in _VMSTAT}
        | {"nr_dirty_before": before.get("nr_dirty", 0)}
    )
    return prefix


def _time_async_save(store: CheckpointStore, step: int, assign, update, t: dict) -> None:
    """One round's optimizer update, then an async save: its blocking part, the update that
    follows its snapshot, and its whole write."""
    t["update"].append(update())
    os.sync()
    t0 = time.perf_counter()
    t["async_block"].append(store.save(step, assign=assign))
    # the first update after a snapshot copies each variable it changes (copy-on-write)
    t["update_after_snapshot"].append(update())
    store.wait()
    t["async_total"].append(time.perf_counter() - t0)


def _time_numpy_baselines(arrays: list[np.ndarray], workdir: str, t: dict) -> None:
    """One round's numpy writes of the same arrays, and one in-memory copy of them."""
    path = os.path.join(workdir, "numpy.bin")
    # numpy replacing its previous copy (truncating the file frees the old blocks, as
    # retention does for a checkpoint), and numpy writing a fresh file (the old one
    # removed untimed): a raw page-cache write
    os.sync()
    t["numpy"].append(_numpy_write(arrays, path))
    os.remove(path)
    os.sync()
    t["numpy_fresh"].append(_numpy_write(arrays, path))
    os.remove(path)
    os.sync()
    t["numpy_fresh_fsync"].append(_numpy_write(arrays, path, fsync=True))
    t0 = time.perf_counter()
    copies = [np.array(a, copy=True) for a in arrays]  # one in-memory copy of the state
    t["copy"].append(time.perf_counter() - t0)
    del copies


def _time_verify_write_restore(
    state: TrainState, store: CheckpointStore, prefix: str, workdir: str, t: dict
) -> None:
    """One round's resume check of `prefix`, TensorFlow's write alone, and the restore."""
    t0 = time.perf_counter()
    assert verify(prefix).ok  # what a resume checks: every tensor read back and CRC-checked
    t["verify"].append(time.perf_counter() - t0)
    os.sync()
    t0 = time.perf_counter()
    raw = state.checkpoint.write(os.path.join(workdir, "raw", "ckpt"))  # TF alone
    t["tf_write"].append(time.perf_counter() - t0)
    for path in checkpoint_files(raw):
        os.remove(path)
    t0 = time.perf_counter()
    store.restore(prefix)
    t["restore"].append(time.perf_counter() - t0)


def state_io(m: dict, workdir: str, log) -> dict:
    """Sync vs async save of a big TrainState, the numpy baseline, restore, sizes."""
    state = _big_state(m["units"], m["features"])
    variables = state.model.weights + state.optimizer.variables
    arrays = [v.numpy() for v in variables]
    stores = _stores(state, workdir)
    update = _optimizer_step(state)
    update()  # trace / warm up
    t = {k: [] for k in _TRIALS}
    pressure = []  # per round: /proc/vmstat deltas over the non-durable save (see BENCHMARKS.md)
    guard = nonfinite.nonfinite_variables(variables)  # the loop's check before every save
    # Round 0 is a warm-up, left out of the medians: its writes pay one-time costs (tracing,
    # first allocations, the disk's state from earlier work) that differ per kind of write.
    for r in range(m["state_rounds"] + 1):
        step = r + 1
        # The loop's counters are written as part of each save. Its finiteness guard (reads
        # every weight and slot before a save of either kind; for async saves, in the
        # snapshot's call) is timed on its own, not in either save's time.
        assign = state.assignments(step, 0)
        t0 = time.perf_counter()
        guard()
        t["guard"].append(time.perf_counter() - t0)
        prefix = _time_sync_saves(stores, step, assign, t, pressure)
        _time_async_save(stores["async"], step, assign, update, t)
        _time_numpy_baselines(arrays, workdir, t)
        _time_verify_write_restore(state, stores["sync"], prefix, workdir, t)
        log(
            f"  round {r}{' (warm-up)' if r == 0 else ''}: sync {t['sync'][-1]:.3f} s (manifest {t['manifest'][-1]:.3f}), async "
            f"blocks {t['async_block'][-1]:.4f} s / writes {t['async_total'][-1]:.3f} s, numpy "
            f"{t['numpy'][-1]:.3f} s, restore {t['restore'][-1]:.3f} s"
        )
    state_bytes = sum(a.nbytes for a in arrays)
    return _state_io_results(t, pressure, stores, prefix, state_bytes, workdir)


def _state_io_results(
    t: dict, pressure: list, stores: dict, prefix: str, state_bytes: int, workdir: str
) -> dict:
    """state_io's figures: medians over the rounds after the warm-up, ratios, sizes."""
    med = {k: float(statistics.median(v[1:])) for k, v in t.items()}
    ckpt_bytes = sum(os.path.getsize(p) for p in checkpoint_files(prefix))
    # like for like, neither fsyncs: the non-durable save (retention's delete included) over
    # numpy replacing its previous copy; per round, for the distribution
    ratios = [a / b for a, b in zip(t["nondurable_with_delete"][1:], t["numpy"][1:], strict=True)]
    return {
        "save_vs_numpy": float(statistics.median(ratios)),
        "save_vs_numpy_rounds": ratios,
        "save_vs_numpy_min_median_max": [min(ratios), statistics.median(ratios), max(ratios)],
        "memory_pressure_rounds": pressure[1:],
        # durability: the durable sync save against numpy writing and fsyncing a fresh file
        "durable_save_vs_numpy_fsync": med["sync"] / med["numpy_fresh_fsync"],
        "durable_sync_save_s": med["sync"],
        "nondurable_sync_save_s": med["nondurable"],
        "durability_cost_s": med["sync"] - med["nondurable"],
        "numpy_fresh_fsync_s": med["numpy_fresh_fsync"],
        # the floor of an async save's cost: one in-memory copy + a page-cache write of it
        "state_copy_s": med["copy"],
        "async_floor_s": med["copy"] + med["numpy_fresh"],
        "save_blocking_vs_numpy_fresh": med["sync"] / med["numpy_fresh"],
        "state_mb": state_bytes / 1e6,
        "sync_save_s": med["sync"],
        "sync_save_manifest_s": med["manifest"],
        "async_block_s": med["async_block"],
        "async_total_s": med["async_total"],
        "async_write_thread_s": stores["async"].async_writer.last_write_seconds,
        "sync_save_with_retention_delete_s": med["sync_with_delete"],
        "numpy_write_s": med["numpy"],
        "numpy_fresh_file_write_s": med["numpy_fresh"],
        # tf.train.Checkpoint.write() alone: no manager bookkeeping, no manifest
        "tf_checkpoint_write_s": med["tf_write"],
        # on resume: sizes, the index's SHA-256, and every tensor against its CRC32C
        "verify_s": med["verify"],
        "tf_write_vs_numpy_fresh": med["tf_write"] / med["numpy_fresh"],
        "restore_s": med["restore"],
        "optimizer_update_s": med["update"],
        "optimizer_update_after_snapshot_s": med["update_after_snapshot"],
        "nonfinite_guard_s": med["guard"],
        "checkpoint_mb": ckpt_bytes / 1e6,
        "checkpoint_over_state": ckpt_bytes / state_bytes,
        **data_position_bytes(workdir),
        "trials_s": t,
    }


def peak_rss(m: dict) -> dict:
    """Peak RSS of a default training run, and of the big state trained with sync/async saves."""
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as d:
        out = {
            "train_default_mb": _rss(
                [f"trainer.max_steps={m['rss_steps']}"], os.path.join(d, "default")
            )
        }
        if not m["rss_big_state"]:  # quick and smoke modes: the default run only
            return out
        big = [
            f"model.num_units={m['units']}",
            f"data.num_features={m['features']}",
            "trainer.max_steps=21",
            "trainer.stop_at=20",  # stopped, not completed: no export of the big model
            "trainer.log_every=5",
            "trainer.eval_every=1000",
            "checkpoint.every=10",
        ]
        for kind in ("sync", "async"):
            out[f"train_big_state_{kind}_mb"] = _rss(
                [*big, f"checkpoint.async={str(kind == 'async').lower()}"], os.path.join(d, kind)
            )
        out["note"] = "big state: the ~300 MB state trained 20 steps with a checkpoint every 10"
    return out
