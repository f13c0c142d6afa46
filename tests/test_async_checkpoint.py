"""checkpoint.async=true: snapshot semantics, integrity, errors, one write at a time, exact resume."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, env, losses, train_in_process

from trainer import executor
from trainer.checkpoint.manifest import list_checkpoints, verify
from trainer.checkpoint.store import CheckpointStore
from trainer.config import UserError
from trainer.nonfinite import NonFiniteLoss
from trainer.rewind import read_scalars
from trainer.state import TrainState


def _state() -> tuple[TrainState, callable]:
    """A TrainState with BatchNorm statistics, Dropout RNG state and Adam slots; and a train step."""
    keras.utils.clear_session(free_memory=False)  # the same variable paths in every _state()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.layers.Dense(16),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(1),
        ]
    )
    model(tf.zeros((2, 4)))
    optimizer = keras.optimizers.Adam(0.01)
    optimizer.build(model.trainable_variables)
    x, y = tf.random.normal((8, 4)), tf.random.normal((8, 1))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x, training=True) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    return TrainState(model, optimizer), step


def _values(state: TrainState) -> list[np.ndarray]:
    return [np.array(v) for v in state.model.variables + state.optimizer.variables] + [
        np.array(v) for v in state.rng
    ]


def _parts(state: TrainState) -> dict[str, list[np.ndarray]]:
    """_values by kind: weights, BatchNorm statistics, Adam's slots (and step), RNG state."""
    statistics = [v for v in state.model.non_trainable_weights if "moving" in v.path]
    assert statistics  # (the model has its BatchNorm's)
    return {
        "weights": [np.array(v) for v in state.model.trainable_weights],
        "batchnorm statistics": [np.array(v) for v in statistics],
        "optimizer": [np.array(v) for v in state.optimizer.variables],
        "rng": [np.array(v) for v in state.rng],
    }


def _store(directory, state, **kw) -> CheckpointStore:
    return CheckpointStore(
        str(directory),
        state.checkpoint,
        max_to_keep=5,
        keep_every_n_hours=None,
        manifest_extra={},
        **{"async_write": True, **kw},
    )


def test_async_save_writes_the_values_of_the_save_step_while_training_goes_on(tmp_path):
    state, step = _state()
    store = _store(tmp_path, state)
    release = threading.Event()
    write = store._write
    store._write = lambda s, *a: (release.wait(), write(s, *a))  # held until training moved on
    expected = {}
    for at in (1, 2, 3):  # three saves: TF's own async checkpoint fails on the second
        step()
        expected[at] = _values(state)
        before = _parts(state)
        store.save(at, assign=state.assignments(at, 0))
        assert store.busy() and not (tmp_path / f"ckpt-{at}.index").exists()  # not written yet
        for _ in range(3):
            step()  # BN statistics, slots, weights and RNG state all change under the write
        for kind, arrays in _parts(state).items():
            changed = [not np.array_equal(a, b) for a, b in zip(before[kind], arrays, strict=True)]
            assert any(changed), f"training did not change the {kind} under the write"
        release.set()
        store.wait()
        release.clear()
    for at, values in expected.items():
        prefix = str(tmp_path / f"ckpt-{at}")
        assert verify(prefix).ok
        fresh, _ = _state()
        fresh.checkpoint.restore(prefix).assert_existing_objects_matched()
        assert fresh.after_restore() == at
        for a, b in zip(values, _values(fresh), strict=True):
            np.testing.assert_array_equal(a, b)


def test_async_files_equal_a_synchronous_save_bit_for_bit(tmp_path):
    """The async write writes exactly what TF's eager save writes: the first save with the
    traced save (async_save._compiled_save), the next ones with bundle_save's own writer
    (checked against that first save's files), the snapshot and the traced save on
    TensorFlow's single-threaded executor (on this one-CPU machine)."""
    state, step = _state()
    sync = _store(tmp_path / "sync", state, async_write=False)
    fast = _store(tmp_path / "async", state)
    counter = state.checkpoint.save_counter
    writers = []
    for at in (1, 2, 3):
        step()
        sync.save(at, assign=state.assignments(at, 0))
        counter.assign_sub(1)  # the async save numbers itself as the sync one did
        fast.save(at)
        fast.wait()
        writers.append(fast.async_writer.last_writer)
        for name in (f"ckpt-{at}.index", f"ckpt-{at}.data-00000-of-00001"):
            assert (tmp_path / "sync" / name).read_bytes() == (
                tmp_path / "async" / name
            ).read_bytes()
    assert writers == ["tensorflow", "bundle", "bundle"]
    writer = fast.async_writer
    assert [on for _, on in writer._savers.values()] == [executor.SINGLE_THREADED]
    assert [plan.executor for plan in writer._plans.values()] == [executor.SINGLE_THREADED]


def test_checkpoint_functions_leave_the_single_threaded_executor_when_it_cannot_run_them():
    """executor.for_checkpoint: single-threaded for one CPU device and no control flow;
    tensors on two devices (a send between them), or a tf.cond, take the default one."""
    plain = tf.function(lambda x: x * 2.0).get_concrete_function(tf.TensorSpec([], tf.float32))
    branchy = tf.function(lambda x: tf.cond(x > 0, lambda: x, lambda: -x)).get_concrete_function(
        tf.TensorSpec([], tf.float32)
    )
    cpu0, cpu1 = "/job:localhost/replica:0/task:0/device:CPU:0", "/device:CPU:1"
    assert executor.for_checkpoint([cpu0, cpu0], plain.graph) == executor.SINGLE_THREADED
    assert executor.for_checkpoint([cpu0, cpu1], plain.graph) == ""
    assert executor.for_checkpoint(["/device:GPU:0"], plain.graph) == ""
    assert executor.for_checkpoint([cpu0], branchy.graph) == ""


def test_a_failed_background_write_surfaces_and_leaves_no_good_checkpoint(tmp_path):
    state, _ = _state()
    store = _store(tmp_path, state)

    def broken(prefix, step):
        raise OSError("disk full")

    store.write_manifest = broken
    store.save(1)  # returns at once: the failure happens on the writer's thread
    with pytest.raises(OSError, match="disk full") as err:  # a disk error keeps its type
        store.wait()
    assert err.value.checkpoint_step == 1  # and names the step whose write failed
    assert not verify(str(tmp_path / "ckpt-1")).ok
    store.wait()  # reported once


def test_a_variable_added_after_the_first_save_is_refused_then_planned_in(tmp_path):
    """The object graph is walked once on the loop's thread; the writer walks it again and
    refuses a snapshot that misses an object, rather than write a checkpoint without it. The
    refused save does not count: ckpt-3 holds save counter 2, as a synchronous run's would."""
    state, step = _state()
    store = _store(tmp_path, state)
    store.save(1, assign=state.assignments(1, 0))
    store.wait()
    state.checkpoint.extra = tf.Variable(7.0)  # a new object, after the first save's walk
    step()
    store.save(2, assign=state.assignments(2, 0))
    with pytest.raises(UserError, match=r"objects changed .* ckpt-2 was not written"):
        store.wait()
    assert not verify(str(tmp_path / "ckpt-2")).ok and verify(str(tmp_path / "ckpt-1")).ok
    store.save(3, assign=state.assignments(3, 0))  # planned again: the new variable is in
    store.wait()
    reader = tf.train.load_checkpoint(str(tmp_path / "ckpt-3"))
    assert reader.get_tensor("extra/.ATTRIBUTES/VARIABLE_VALUE") == 7.0
    assert reader.get_tensor("save_counter/.ATTRIBUTES/VARIABLE_VALUE") == 2


@pytest.mark.parametrize("how", ["async", "sync", "sync_snapshot"])
def test_a_save_with_nonfinite_weights_is_refused_and_names_the_variable(tmp_path, how):
    """store.save's assignments and finiteness check (async, and sync by the snapshot: one
    call with the snapshot; sync: TensorFlow's eager save after its own check)."""
    state, _ = _state()
    store = _store(
        tmp_path, state, async_write=how == "async", snapshot_sync=how == "sync_snapshot"
    )
    checked = state.model.variables + state.optimizer.variables
    refused = []

    def refuse(bad):
        refused.append([v.path for v in bad])
        raise NonFiniteLoss("refused")

    state.loop.best_eval_loss = 0.25
    store.save(1, assign=state.assignments(1, 3), check=checked, on_nonfinite=refuse)
    store.wait()
    kernel = state.model.layers[-1].kernel
    kernel.assign(tf.tensor_scatter_nd_update(kernel, [[0, 0]], [float("inf")]))
    with pytest.raises(NonFiniteLoss):
        store.save(2, assign=state.assignments(2, 3), check=checked, on_nonfinite=refuse)
    store.wait()
    assert refused == [[kernel.path]]
    assert not (tmp_path / "ckpt-2.index").exists()
    assert store.checkpoint.save_counter.numpy() == 1  # (the refused save is not counted)
    written = tf.train.load_checkpoint(str(tmp_path / "ckpt-1"))
    assert written.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 1
    assert written.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE") == 3
    assert written.get_tensor("loop/best_eval_loss/.ATTRIBUTES/VARIABLE_VALUE") == 0.25


def test_at_most_one_write_in_flight_and_saves_keep_their_order(tmp_path):
    state, _ = _state()
    store = _store(tmp_path, state)
    active, peak, order = [0], [0], []
    lock = threading.Lock()
    write = store._write

    def counting(s, *a):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        threading.Event().wait(0.05)
        write(s, *a)
        order.append(s)
        with lock:
            active[0] -= 1

    store._write = counting
    for at in (1, 2, 3):
        store.save(at, assign=state.assignments(at, 0))
    store.wait()
    assert peak[0] == 1 and order == [1, 2, 3]
    assert [verify(p).ok for p in list_checkpoints(str(tmp_path))] == [True, True, True]


def test_the_store_is_busy_while_a_background_write_runs(tmp_path):
    """What the save budget waits for before it knows an async save's cost (trainer/loop.py)."""
    state, _ = _state()
    store = _store(tmp_path, state)
    release = threading.Event()
    assert not store.busy()
    store.save(1, before_write=release.wait, assign=state.assignments(1, 0))
    assert store.busy()  # the write waits in before_write
    assert not (tmp_path / "ckpt-1.index").exists()  # (it has not written yet)
    release.set()
    store.wait()
    assert not store.busy()
    assert verify(str(tmp_path / "ckpt-1")).ok


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_writer_thread_runs_at_a_lower_priority_and_the_loop_thread_does_not(tmp_path):
    from trainer.checkpoint.async_save import WRITER_NICE

    state, _ = _state()
    store = _store(tmp_path, state)
    seen = {}
    write = store._write

    def recording(s, *a):
        tid = threading.get_native_id()
        seen[s] = (tid, os.getpriority(os.PRIO_PROCESS, tid))
        write(s, *a)

    store._write = recording
    loop = threading.get_native_id()
    loop_nice = os.getpriority(os.PRIO_PROCESS, loop)
    if loop_nice >= 19:
        pytest.skip("the tests run at the lowest priority already: no lower one to check")
    for at in (1, 2):
        store.save(at, assign=state.assignments(at, 0))
    store.wait()
    writer_nice = min(19, loop_nice + WRITER_NICE)
    (writer,) = {tid for tid, _ in seen.values()}  # one writer thread for both writes...
    assert writer != loop  # ...and not the loop's
    assert writer_nice > loop_nice and seen == {1: (writer, writer_nice), 2: (writer, writer_nice)}
    assert os.getpriority(os.PRIO_PROCESS, loop) == loop_nice
    assert [verify(p).ok for p in list_checkpoints(str(tmp_path))] == [True, True]


CRASH = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    from test_async_checkpoint import _state, _store
    state, step = _state()
    store = _store({d!r}, state)
    store.save(1, assign=state.assignments(1, 0)); store.wait()
    # Die on the writer's thread after TensorFlow wrote ckpt-2's files, before its manifest.
    store.write_manifest = lambda prefix, s: os._exit(9)
    step(); store.save(2, assign=state.assignments(2, 0))
    store.wait()
    """
)


@pytest.mark.slow
def test_a_crash_during_a_background_write_leaves_the_previous_checkpoint_as_latest(tmp_path):
    script = CRASH.format(tests=str(REPO / "tests"), d=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env(), capture_output=True, timeout=120
    )
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    assert os.path.exists(tmp_path / "ckpt-2.index")  # the files are there...
    assert not verify(str(tmp_path / "ckpt-2")).ok  # ...but they do not verify
    latest = CheckpointStore(
        str(tmp_path), None, max_to_keep=1, keep_every_n_hours=None, manifest_extra={}, write=False
    ).latest_good(report=open(os.devnull, "w"))
    assert latest.step == 1


@pytest.mark.slow
def test_async_and_steps_per_execution_resume_exactly(tmp_path):
    """Interrupted + resumed (async saves, K=3 not dividing checkpoint.every) equals an
    uninterrupted synchronous K=1 run bit for bit, Dropout included."""
    common = [
        "model=dropout_mlp",
        "trainer.max_steps=40",
        "trainer.log_every=1",
        "trainer.eval_every=20",
        "checkpoint.every=10",
    ]
    fast = ["trainer.steps_per_execution=3", "checkpoint.async=true"]
    # In this process (no signal here); the uninterrupted run goes between the two halves,
    # so nothing the first half left in memory can carry over into the resume.
    a, b = tmp_path / "uninterrupted", tmp_path / "resumed"
    first = train_in_process(b, *common, *fast, "trainer.stop_at=20")
    assert first.returncode == 0, first.stderr[-2000:]
    assert train_in_process(a, *common).returncode == 0
    second = train_in_process(b, *common, *fast)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Resuming from step 20" in second.stderr
    assert losses(a) == losses(b) and len(losses(b)) == 40
    tb = read_scalars(str(b / "tensorboard" / "train"), "loss")  # batched TensorBoard writes
    assert [s for s, _ in tb] == list(range(1, 41))
    # chunks end on checkpoint steps: the checkpoints are at multiples of 10, and all verify
    prefixes = list_checkpoints(str(b / "checkpoints"))
    assert [os.path.basename(p) for p in prefixes] == ["ckpt-20", "ckpt-30", "ckpt-40"]
    assert all(verify(p).ok for p in prefixes)
