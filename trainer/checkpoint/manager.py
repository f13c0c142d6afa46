"""TensorFlow's CheckpointManager with the parts of its save that a run need not pay each
time cut (trainer/checkpoint/store.py builds its CheckpointStore on it)."""

from __future__ import annotations

import time

import tensorflow as tf
from tensorflow.python.checkpoint import checkpoint as tf_checkpoint

# TensorFlow's `checkpoint` state file: written at most this often during a run (0.5 ms of
# the writer's time per save, profiled) and at its end. Resume does not go by it: recover()
# rewrites it from the manifests before the manager reads it (trainer/checkpoint/integrity.py).
STATE_EVERY = 30.0
_clock = time.monotonic  # (a test sets its own)


SIZES: dict[str, int] = {}  # prefix -> bytes, as write_manifest found them (see below)
_tf_checkpoint_size = getattr(tf_checkpoint, "_get_checkpoint_size", None)


def _checkpoint_size(prefix: str) -> int:
    """TensorFlow's checkpoint-size metric after each write, from the sizes the manifest has
    just recorded: TensorFlow globs `prefix*` and stats each match (0.3-1 ms of the writer's
    time, profiled; the glob of ckpt-1* also counts ckpt-10's files)."""
    size = SIZES.pop(prefix, None)
    return size if size is not None or _tf_checkpoint_size is None else _tf_checkpoint_size(prefix)


if _tf_checkpoint_size is not None:
    tf_checkpoint._get_checkpoint_size = _checkpoint_size


class Manager(tf.train.CheckpointManager):
    """tf.train.CheckpointManager, with three of its save's costs cut.

    Profiled on an asynchronous write of the default model, where the writer's thread competes
    with training for the CPU: together ~0.8 ms of a ~3 ms write.
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
        self._swept = True  # False from the start of a save until its sweep
        self._state_at = -STATE_EVERY  # when the state file was last written (monotonic)
        self._state_stale = False  # a save since then is not listed in it
        self._preserved = False  # this sweep kept a checkpoint for keep_every_n_hours

    def save(self, checkpoint_number=None, check_interval=True, options=None):
        self._swept = False
        try:
            return super().save(checkpoint_number, check_interval, options)
        finally:
            self._swept = True

    def _record_state(self):
        if not self._swept:  # the call before the sweep is skipped (see the class docstring)
            return
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
        self._swept = True
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
