"""TensorFlow's CheckpointManager with the parts of its save that a run need not pay each
time cut (trainer/checkpoint/store.py builds its CheckpointStore on it)."""

from __future__ import annotations

import time

import tensorflow as tf
from tensorflow.python.checkpoint import checkpoint_management
from tensorflow.python.eager import context
from tensorflow.python.util import compat

# TensorFlow's `checkpoint` state file: written at most this often during a run (0.5 ms of
# the writer's time per save, profiled) and at its end. Resume does not go by it: recover()
# rewrites it from the manifests before the manager reads it (trainer/checkpoint/integrity.py).
STATE_EVERY = 30.0
_clock = time.monotonic  # (a test sets its own)


class Manager(tf.train.CheckpointManager):
    """tf.train.CheckpointManager, with the costs of its save that a run need not pay cut.

    Profiled on an asynchronous write of the default model, where the writer's Python holds
    the GIL that the loop waits for (py-spy --gil: every ms of it costs the loop most of a ms).
    - `save` is TensorFlow's CheckpointManager.save and Checkpoint._write (TF 2.21) as this
      project calls them: eager, numbered by the step, no checkpoint_interval. Cut: TF's own
      metrics (write time, and the checkpoint's size: a glob and a stat of every match),
      the CheckpointOptions and an `inspect.signature` of each write callback (one callback,
      `written`, called directly), the eager increment of the save counter
      where the async snapshot has made it in its own call (`counted`). ~0.5 ms of the
      writer's GIL time per save.
    - TensorFlow writes the state file twice per save: before its retention sweep (so that
      a preemption during the sweep finds the new checkpoint listed) and after. Here it is
      written after only. Resume does not go by the state file to find checkpoints (the
      manifests decide which are good), and integrity.recover rewrites it when it misses
      the newest good one, before the manager reads it; a kill between retention and the
      write is tested in tests/test_checkpoints.py.
    - The sweep hands each retired checkpoint to `retire(prefix)` (CheckpointStore._retire),
      which finds its files with one directory listing, where TensorFlow globs each pattern.
    - After the sweep, the state file is written at most every STATE_EVERY seconds (at once
      when keep_checkpoint_every_n_hours kept a checkpoint out of the list), and at the end
      of the run (CheckpointStore.wait / pending_writes): TensorFlow's own tools
      (tf.train.latest_checkpoint) find the newest checkpoint of a finished run, and one at
      most STATE_EVERY seconds old during a run.

    Which checkpoints the sweep retires, and which keep_checkpoint_every_n_hours preserves, is
    TensorFlow's `_sweep` logic, copied from TF 2.21 (tested with a clock that the test
    sets).
    """

    def __init__(self, *args, retire, **kwargs):
        super().__init__(*args, **kwargs)
        self._retire = retire
        self._state_at = -STATE_EVERY  # when the state file was last written (monotonic)
        self._state_stale = False  # a save since then is not listed in it
        self._preserved = False  # this sweep kept a checkpoint for keep_every_n_hours

    def save(self, checkpoint_number: int, written=None, counted: bool = False) -> str:
        """Write checkpoint `<prefix>-<checkpoint_number>`, call `written(path)` once its files
        are complete (the manifest), then retire old ones; return its path. `counted`: the save
        counter has already been incremented for this save (checkpoint/snapshot.py)."""
        if self._checkpoint_interval is not None or not context.executing_eagerly():
            raise NotImplementedError("Manager.save: eager saves without checkpoint_interval")
        if not counted:
            self._checkpoint.save_counter.assign_add(1, read_value=False)
        path = self._checkpoint._saver.save(file_prefix=f"{self._prefix}-{checkpoint_number}")
        path = compat.as_str(path.numpy() if tf.is_tensor(path) else path)
        if context.is_async():  # (as Checkpoint._write; its unconditional call, a no-op here,
            context.async_wait()  # cost the writer ~0.25 ms of wall time a save, profiled)
        if written is not None:  # (the files are complete: the manifest may name them)
            written(path)
        # TensorFlow's _record_and_sweep_state, with the state file written after the sweep
        self._maybe_delete.pop(path, None)  # an overwritten checkpoint goes to the end
        self._maybe_delete[path] = checkpoint_management.time.time()  # TF's manager's clock
        self._latest_checkpoint = path
        self._sweep()
        self._record_state()
        return path

    def _record_state(self):
        # every STATE_EVERY s, and at once when keep_every_n_hours kept one out of the list
        # (a recover() after a kill would otherwise take it for a newer, retained one)
        if self._preserved or _clock() - self._state_at >= STATE_EVERY:
            self.write_state()
        else:
            self._state_stale = True

    def write_state(self) -> None:
        """TensorFlow's state file, listing every retained checkpoint (the newest first in
        `tf.train.latest_checkpoint`'s eyes)."""
        super()._record_state()
        self._state_at, self._state_stale, self._preserved = _clock(), False, False

    def flush_state(self) -> None:
        """The state file, if a save since it was written is not listed (the end of a run)."""
        if self._state_stale:
            self.write_state()

    def _sweep(self):
        if not self._max_to_keep:
            return
        while len(self._maybe_delete) > self._max_to_keep:
            prefix, timestamp = self._maybe_delete.popitem(last=False)
            hours = self._keep_checkpoint_every_n_hours
            if hours and timestamp - hours * 3600.0 >= self._last_preserved_timestamp:
                self._last_preserved_timestamp = timestamp
                self._preserved = True
                continue
            self._retire(prefix)
