"""A snapshot (async, or a sync save's on one device) written as TensorFlow's checkpoint files
by trainer/checkpoint/bundle.py, in place of TensorFlow's save, for states of up to
OWN_MAX_BYTES.

The plan of one object graph (BundleSaver) is made at its first write, which TensorFlow's
save makes as before (the traced save for async writes, the eager one for sync saves): the
saver's own walk (save_util.serialize_graph_view, with the snapshot standing in for the
objects as in the traced save) gives each checkpoint key, in the order the saver writes
them, and the object-graph proto. The files TensorFlow wrote are then compared with this
module's bytes for the same snapshot; only if they are equal, bit for bit, are later
snapshots of that graph written here. Anything the plan does not cover (sliced or
partitioned variables, variant tensors, registered savers, a large state, a difference in
any byte) keeps TensorFlow's save for that graph.

Measured within runs (scripts/save_ab.py traced-save, BENCHMARKS.md "session 14"): with
TensorFlow's traced save, an async save of the default model cost the loop 1.0-1.3 ms more.
"""

from __future__ import annotations

import os

import google_crc32c
import numpy as np
import tensorflow as tf
from tensorflow.python.checkpoint import save_util
from tensorflow.python.trackable import base as trackable_base

from trainer.checkpoint import bundle

OWN_MAX_BYTES = 4 << 20  # larger states keep TensorFlow's save (its checksums run without the GIL)


class Unsupported(Exception):
    """This object graph's snapshot is written by TensorFlow's traced save (the reason)."""


class TooLarge(Unsupported):
    """The state is above OWN_MAX_BYTES: TensorFlow's save is this writer's plan for it."""


class Declined(str):
    """Why this writer does not write an object graph; `large`: only its size (expected, and
    not worth a word to the user)."""

    large = False


class BundleSaver:
    """Writes snapshots of one object graph with bundle.write. `sources[i]` says where the
    i-th key's value comes from: an index into the snapshot's flat tensors (the save counter
    among them), or "graph" (the object-graph proto, fixed for the graph)."""

    def __init__(self, checkpoint: tf.train.Checkpoint, frozen_map, flat: list):
        saver = checkpoint._saver
        tensors, _, registered, proto = save_util.serialize_graph_view(
            saver._graph_view, frozen_map, cache=None
        )
        if registered:
            raise Unsupported("registered savers")
        if google_crc32c.implementation != "c":
            raise Unsupported("google-crc32c has no compiled implementation here")
        position = {id(t): i for i, t in enumerate(flat)}
        keys, self.sources, dtypes, total = [], [], [], 0
        for by_key in tensors.values():
            for key, value in by_key.items():
                if isinstance(value, dict):
                    raise Unsupported(f"{key} is saved in slices")
                if id(value) in position:
                    source = position[id(value)]
                else:
                    raise Unsupported(f"{key} is not a snapshot tensor")
                dtype = tf.as_dtype(value.dtype)
                if dtype in (tf.variant, tf.resource):
                    raise Unsupported(f"{key} is a {dtype.name} tensor")
                keys.append(key)
                self.sources.append(source)
                dtypes.append(dtype.as_datatype_enum)
                total += value.shape.num_elements() * (dtype.size if dtype != tf.string else 1)
        if total > OWN_MAX_BYTES:
            raise TooLarge(f"{total} bytes")
        keys.append(trackable_base.OBJECT_GRAPH_PROTO_KEY)
        self.sources.append("graph")
        dtypes.append(bundle.DT_STRING)
        self.graph = np.array(proto.SerializeToString(), dtype=object)
        self.layout = bundle.Layout(keys, dtypes)
        self.strings = [d == bundle.DT_STRING for d in dtypes]
        self.objects = tuple(frozen_map)  # (held: the writer's cache is keyed by their ids)

    def values(self, flat: list) -> list:
        """One numpy array per key: the snapshot's buffers (not copies) and the object graph."""
        out = []
        for source, string in zip(self.sources, self.strings, strict=True):
            if source == "graph":
                out.append(self.graph)
                continue
            tensor = flat[source]
            out.append(np.asarray(tensor.numpy(), dtype=object) if string else tensor._numpy())
        return out

    def save(self, prefix: str, flat: list, sync: bool = False) -> bundle.Written:
        return bundle.write(prefix, self.layout, self.values(flat), sync)

    def matches(self, prefix: str, flat: list) -> bool:
        """Are the files TensorFlow wrote at `prefix`, for the snapshot `flat`, this writer's
        bytes for it?"""
        pieces, index = bundle.encode(self.layout, self.values(flat))
        data = b"".join(bytes(memoryview(p)) for p in pieces)
        for suffix, ours in ((bundle.DATA_SUFFIX, data), (bundle.INDEX_SUFFIX, index)):
            with open(prefix + suffix, "rb") as f:
                if f.read() != ours:
                    return False
        return True


def plan(checkpoint, frozen_map, flat: list, prefix: str) -> BundleSaver | Declined:
    """After TensorFlow's traced save wrote a snapshot at `prefix`: a BundleSaver for this
    object graph if its bytes equal those files, else the reason it is not used. `frozen_map`
    maps each saveable object to its stand-in serializing the snapshot (async_save._Frozen),
    `flat` is the snapshot's tensors."""
    try:
        saver = BundleSaver(checkpoint, frozen_map, flat)
        if not saver.matches(prefix, flat):
            return Declined("its bytes differ from TensorFlow's files")
        if (size := os.path.getsize(prefix + bundle.DATA_SUFFIX)) > OWN_MAX_BYTES:
            raise TooLarge(f"{size} bytes")  # (strings counted in full)
    except Unsupported as e:
        declined = Declined(str(e))
        declined.large = isinstance(e, TooLarge)
        return declined
    except Exception as e:  # noqa: BLE001 (whatever the plan missed: TensorFlow's save stays)
        return Declined(f"{type(e).__name__}: {e}")
    return saver
