"""Asynchronous checkpoints (`checkpoint.async=true`): snapshot on the loop thread, write on another.

TF 2.21's own `CheckpointOptions(enable_async=True)` fails on the second save with Keras 3
variables (README, "Performance"): it copies variables inside a tf.function, and Keras' copy creates a new
tf.Variable on every call. This module does the same job without that copy:

1. Snapshot (loop thread, ~0.5 ms for small models; snapshot.py): every saveable value read
   into an immutable tensor, in one tf.function call that also makes the caller's
   assignments (the loop's counters) and checks finiteness. The object graph is walked at
   the first save (as TF's own async checkpoint does); each write walks it again and
   refuses to write if it changed. The reads share the variables' buffers (copy-on-write
   keeps them intact while training goes on).
2. Write (one background thread): the caller's synchronous write (CheckpointManager save,
   then manifest) with the saver writing the snapshot, so the files, object graph and keys
   are a synchronous save's. The first write of an object graph runs TensorFlow's saver as
   one traced tf.function (`_compiled_save`); later ones write the same bytes with
   bundle_save.py when that first write showed they are equal (states up to 4 MiB).

Guarantees (those of synchronous saves, but that a checkpoint whose objects changed since the
first save is refused where a synchronous save would write it): the manifest is written only
after the checkpoint's files are complete, so a crash mid-write leaves a checkpoint that does not
verify; at most one write is in flight (a new save waits for the previous one); `wait()`
returns once the last write is complete and raises what the background thread raised; the
interpreter also waits for a write in flight at exit (concurrent.futures joins its worker
threads then).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence

import tensorflow as tf
from tensorflow.python.checkpoint import graph_view
from tensorflow.python.checkpoint import util as checkpoint_util
from tensorflow.python.trackable import base as trackable_base
from tensorflow.python.util import compat, object_identity

from trainer import executor
from trainer.checkpoint import bundle, bundle_save
from trainer.checkpoint.snapshot import snapshot
from trainer.config import UserError
from trainer.tfcall import flat_caller

_SWITCH_INTERVAL = 0.0002  # seconds: sys.setswitchinterval while a background write runs
WRITER_NICE = 10  # added to the writer thread's nice value (Linux), see lower_thread_priority


def lower_thread_priority() -> None:
    """Run the calling thread (the writer) WRITER_NICE nice levels below the loop's priority,
    on Linux (nice is per thread there).

    On the default executor, TensorFlow's inter-op threads keep both cores busy during
    training; at equal priority the scheduler took the writer's CPU from the train step's
    critical path. A save cost the loop 3.0-3.5 ms at nice 0, 2.2-2.7 ms at nice 10
    (BENCHMARKS.md, section 7). No privileges needed; the write takes longer in wall time.
    """
    if sys.platform.startswith("linux"):
        tid = threading.get_native_id()
        with contextlib.suppress(OSError):
            nice = os.getpriority(os.PRIO_PROCESS, tid)  # inherited from the loop's thread
            os.setpriority(os.PRIO_PROCESS, tid, min(19, nice + WRITER_NICE))


class _Frozen(trackable_base.Trackable):
    """Stands in for trackable `obj` at write time: serializes the tensors read at snapshot time."""

    def __init__(self, obj, tensors: dict):
        self._tensors = tensors
        full_name = checkpoint_util.get_full_name(obj)
        if full_name:  # a variable: the object graph records its name, as for `obj` itself
            self._should_act_as_resource_variable = True
            self._shared_name = full_name

    def _serialize_to_tensors(self):
        return self._tensors


def object_graph(checkpoint: tf.train.Checkpoint) -> tuple:
    """The objects of `checkpoint`, as TensorFlow's saver walks them (breadth first)."""
    checkpoint.save_counter  # noqa: B018 (created if missing, as the manager's first save does)
    objects, _ = graph_view.ObjectGraphView(checkpoint).breadth_first_traversal()
    return tuple(objects)


def _children_walk(root) -> list[int]:
    """The ids of every object reachable from `root` through its checkpoint dependencies:
    the objects of object_graph(), found in ~0.1 ms instead of ~0.25 ms (profiled) by asking
    each object for its children directly."""
    seen, queue = {id(root)}, [root]
    for obj in queue:  # breadth first; the list grows while it is walked
        for child in obj._trackable_children(save_type="checkpoint").values():
            if id(child) not in seen:
                seen.add(id(child))
                queue.append(child)
    return [id(obj) for obj in queue]


def graph_key(frozen: list) -> tuple:
    """What identifies a snapshot's object graph: its objects and their checkpoint keys."""
    return tuple(id(obj) for obj, _ in frozen), tuple(tuple(t) for _, t in frozen)


def _compiled_save(checkpoint: tf.train.Checkpoint, frozen: list, cache: dict, key, flat):
    """A replacement for `checkpoint._saver.save` writing the snapshot `frozen`.

    TF's eager save builds the object graph proto, a MultiDeviceSaver and the save ops in
    Python on every call: ~6 ms of GIL-holding CPU per save for the default model, against
    ~2 ms (mostly TF's C++, the GIL released) for the same code traced once into a
    tf.function with the snapshot's tensors as inputs (profiled). It runs on TensorFlow's
    single-threaded executor where it can (executor.for_checkpoint). The traced save builds
    the same ops, so it writes the same files, bit for bit; the save counter's value is the
    snapshot's (read after it incremented the counter). Cached in `cache` per object graph (`key`,
    graph_key()): the cached function holds the objects, so their ids stay theirs. `flat`:
    the snapshot's tensors, tf.nest.flatten of `frozen`'s dicts.
    """
    saver = checkpoint._saver
    objects = [obj for obj, _ in frozen]
    structure = [tensors for _, tensors in frozen]
    if key not in cache:
        devices = [t.device for t in flat]
        # Eager tensors carry full device names; the traced ones get the same (else the
        # saver would group them into another shard than a synchronous save does).
        task = tf.DeviceSpec.from_string(checkpoint.save_counter.device)
        task = task.replace(device_type=None, device_index=None).to_string()

        @tf.function(autograph=False)
        def save(prefix, values):
            values = [_on(device, v) for device, v in zip(devices, values, strict=True)]
            object_map = object_identity.ObjectIdentityDictionary()
            for obj, tensors in zip(
                objects, tf.nest.pack_sequence_as(structure, values), strict=True
            ):
                object_map[obj] = _Frozen(obj, tensors)
            saver._object_map = object_map
            try:
                with tf.device(task):
                    return type(saver).save(saver, prefix)  # the method: not save_snapshot
            finally:
                saver._object_map = None

        fn = flat_caller(save, tf.constant(""), flat)
        # on the writer's thread, one op after the other (executor.for_checkpoint)
        cache[key] = (
            fn,
            executor.for_checkpoint([*devices, checkpoint.save_counter.device], fn.graph),
        )
    fn, on = cache[key]

    def save_snapshot(file_prefix: str, options=None) -> str:
        os.makedirs(os.path.dirname(file_prefix), exist_ok=True)  # as TF's eager save does
        with executor.running_on(on):
            fn(tf.constant(file_prefix), flat)
        return file_prefix

    return save_snapshot


def _eager_save(saver, file_prefix: str, options=None) -> str:
    """TensorFlow's eager save of the checkpoint's objects (the method: `_run` shadows it)."""
    path = type(saver).save(saver, file_prefix)
    return compat.as_str(path.numpy() if tf.is_tensor(path) else path)


def _on(device: str, value):
    with tf.device(device):
        return tf.identity(value)


def refuse_nonfinite(variables: list) -> None:
    """The default of on_nonfinite: refuse the save with a ValueError naming `variables`."""
    names = [getattr(v, "path", None) or v.name for v in variables]
    raise ValueError(f"not saved: {names} hold NaN or Inf")


class AsyncCheckpointWriter:
    """Runs one checkpoint write at a time on a background thread, over a snapshot.

    `submit(step, write)` snapshots `checkpoint` now and calls `write(step)` on the thread with
    the checkpoint's saver reading from that snapshot. The thread is started once and kept
    (a thread per save cost the loop ~0.3 ms per save, profiled).
    """

    def __init__(self, checkpoint: tf.train.Checkpoint, durable: bool = True, inline=False):
        self.checkpoint = checkpoint
        self.durable = durable  # bundle_save's writer fsyncs the files it writes
        # inline: the store's synchronous saves (write_now), on the caller's thread; TensorFlow's
        # eager save writes the first save of each object graph (and any it declines)
        self.inline = inline
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="checkpoint", initializer=lower_thread_priority
        )
        self._future: concurrent.futures.Future | None = None
        self._error: BaseException | None = None
        self._error_step: int | None = None
        self.last_write_seconds: float | None = None  # wall time of the last completed write
        self._plans: dict = {}  # snapshot()'s, per object graph
        # The object graph is walked on the loop's thread at the first save only (~0.4 ms per
        # walk, profiled; TF's own async checkpoint also walks it once). Each write walks it
        # again on the writer's thread and refuses to write if it changed (see _run).
        self._objects: tuple | None = None
        self._walked: list[int] = []  # _children_walk() when _objects was planned
        self._savers: dict = {}  # _compiled_save()'s
        # per object graph: bundle_save's writer, or why it does not write that graph
        self._bundles: dict = {}
        self.last_writer: str | None = None  # "bundle" or "tensorflow": who wrote the last save
        self._written: bundle.Written | None = None  # what bundle_save wrote last (take_written)

    def submit(
        self,
        step: int,
        write: Callable[[int], None],
        assign: Sequence[tuple[tf.Variable, object]] = (),
        check: Sequence[tf.Variable] = (),
        on_nonfinite: Callable[[list[tf.Variable]], None] | None = None,
        before_start: Callable[[], None] | None = None,
    ) -> None:
        """Wait for the previous write (raising its error), make the `assign`ments, snapshot,
        call `before_start()`, start writing `step`. If a floating variable of `check` holds
        NaN or Inf, `on_nonfinite(those variables)` is called instead, to raise the caller's
        error (a ValueError follows if it returns), and nothing is written."""
        self.wait()
        frozen = self._snapshot(assign, check, on_nonfinite)
        if before_start is not None:
            before_start()
        self._future = self._pool.submit(self._run, step, write, frozen)

    def write_now(self, step: int, write, assign=(), check=(), on_nonfinite=None) -> bool:
        """A synchronous save by this writer (`inline`): the snapshot, then `write(step)` on
        this thread, its error raised here. The object graph is walked at every save (a
        synchronous save writes objects created since the last one: a new plan). False, with
        nothing done, when the snapshot cannot read an object of the checkpoint (Python state,
        legacy saveables): the caller saves with TensorFlow's eager save instead."""
        if self._objects is not None and _children_walk(self.checkpoint) != self._walked:
            self._objects = None
        try:
            frozen = self._snapshot(assign, check, on_nonfinite)
        except NotImplementedError:
            return False
        self._run(step, write, frozen)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return True

    def _snapshot(self, assign, check, on_nonfinite) -> list:
        if self._objects is None:
            self._objects = object_graph(self.checkpoint)
            self._walked = _children_walk(self.checkpoint)
        frozen, nonfinite = snapshot(self.checkpoint, self._plans, self._objects, assign, check)
        if nonfinite:
            if on_nonfinite is not None:
                on_nonfinite(nonfinite)
            refuse_nonfinite(nonfinite)  # whatever on_nonfinite did: nothing is written
        return frozen

    def _run(self, step: int, write: Callable[[int], None], frozen) -> None:
        saver = self.checkpoint._saver
        t0 = time.perf_counter()
        # While this thread runs Python, the loop thread waits for the GIL each time a train
        # chunk returns: up to the switch interval (5 ms). Profiled on a small model, that
        # made an async save cost the loop 2-3x a sync one; a short interval during the write
        # hands the GIL back promptly.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, _SWITCH_INTERVAL))
        started = []  # the save of the files began (the save counter then stays counted)
        self._written = None
        try:
            if not self.inline:  # (write_now walked it just before the snapshot)
                self._check_object_graph(step)
            # The manager's save calls saver.save: for this write, the snapshot's (an instance
            # attribute shadowing the method; nothing else saves while a write runs).
            save = self._saver_for(frozen)
            saver.save = lambda *a, **k: started.append(True) or save(*a, **k)
            write(step)
            self.last_write_seconds = time.perf_counter() - t0
        except BaseException as e:  # surfaced on the loop thread by wait()
            self._error, self._error_step = e, step
            if not started:  # refused, or the log sync failed: as if never counted (the
                # snapshot counted it; a synchronous save counts only once it writes)
                self.checkpoint.save_counter.assign_sub(1, read_value=False)
        finally:
            sys.setswitchinterval(interval)
            vars(saver).pop("save", None)

    def _saver_for(self, frozen: list):
        """The function writing snapshot `frozen` at a prefix: bundle_save's writer once the
        first write of this object graph (TensorFlow's traced save; inline, its eager save of
        the objects, whose values are the snapshot's) has shown that it writes the same bytes;
        TensorFlow's save until then, or for good if it does not."""
        key, flat = graph_key(frozen), tf.nest.flatten([t for _, t in frozen])
        own = self._bundles.get(key)
        if isinstance(own, bundle_save.BundleSaver):
            self.last_writer = "bundle"

            def save(file_prefix: str, options=None) -> str:
                self._written = own.save(file_prefix, flat, sync=self.durable)
                return file_prefix

            return save
        self.last_writer = "tensorflow"
        if self.inline:
            traced = functools.partial(_eager_save, self.checkpoint._saver)
        else:
            traced = _compiled_save(self.checkpoint, frozen, self._savers, key, flat)
        if own is not None:  # (the reason bundle_save does not write this graph)
            return traced

        def first(file_prefix: str, options=None) -> str:
            path = traced(file_prefix)
            frozen_map = object_identity.ObjectIdentityDictionary()
            for obj, tensors in frozen:
                frozen_map[obj] = _Frozen(obj, tensors)
            own = self._bundles[key] = bundle_save.plan(self.checkpoint, frozen_map, flat, path)
            if isinstance(own, bundle_save.Declined) and not own.large:  # said once a graph
                print(
                    f"note: checkpoint{'' if self.inline else '.async'}: TensorFlow's saver "
                    f"keeps writing this state's checkpoints ({own}), which costs the loop "
                    "~1 ms more a save than the project's writer (README, Performance)",
                    file=sys.stderr,
                )
            return path

        return first

    def take_written(self, prefix: str) -> bundle.Written | None:
        """What bundle_save's writer wrote for checkpoint `prefix` in this write (its files'
        sizes, the index's SHA-256, whether they are fsynced), for the manifest; None when
        TensorFlow's save wrote it."""
        written, self._written = self._written, None
        if written is not None and written.paths[0].startswith(prefix + "."):
            return written
        return None

    def _check_object_graph(self, step: int) -> None:
        """Refuse to write when the checkpoint's objects changed since the snapshot's plan was
        made: the snapshot would lack the new objects' values (and the traced save their
        entries). Conservative: an object added between this snapshot and its write refuses
        it too. The error surfaces at the next save or wait(); a caller that goes on gets
        a new plan at its next save."""
        now = _children_walk(self.checkpoint)
        if now != self._walked:
            before, self._objects = len(self._walked), None
            raise UserError(
                f"checkpoint.async: the checkpoint's objects changed after step {step} was "
                f"snapshotted ({before} objects planned, {len(now)} now), so ckpt-{step} was "
                "not written. A model that creates variables during training needs "
                "checkpoint.async=false."
            )

    def replan(self) -> None:
        """Walk the object graph again at the next save (after a restore, for instance)."""
        self.wait()
        self._objects = None

    def in_flight(self) -> bool:
        return self._future is not None and not self._future.done()

    def wait(self, raise_errors: bool = True) -> None:
        """Block until the write in flight (if any) is complete; re-raise its exception."""
        if self._future is not None:
            future, self._future = self._future, None
            future.result()  # _run keeps its errors in self._error; this raises any other
        if self._error is not None and raise_errors:
            error, self._error = self._error, None
            if isinstance(error, (OSError, tf.errors.OpError)):
                # A disk problem keeps its type (the caller turns it into one message) and
                # says which step's write failed, so that step's partial files are cleaned.
                error.checkpoint_step = self._error_step
                raise error
            if isinstance(error, UserError):
                raise error
            raise RuntimeError(f"background checkpoint write failed: {error!r}") from error

    @contextlib.contextmanager
    def pending(self):
        """On leaving the block, wait for the last write; its error is raised unless another
        exception is already on its way out (which it would otherwise hide)."""
        try:
            yield self
        except BaseException:
            self.wait(raise_errors=False)
            if self._error is not None:  # not raised, but never dropped in silence
                error, self._error = self._error, None
                print(
                    f"warning: the background write of checkpoint ckpt-{self._error_step} failed "
                    f"too ({str(error).splitlines()[0][:300]}); it does not count",
                    file=sys.stderr,
                )
            raise
        self.wait()
