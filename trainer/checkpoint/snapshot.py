"""An async checkpoint's snapshot (trainer/checkpoint/async_save.py): every saveable value of
the checkpoint read on the loop's thread, in one tf.function call that also makes a save's
assignments and checks finiteness. The reads share the variables' buffers (copy-on-write
keeps them intact while training goes on)."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context
from tensorflow.python.framework import ops
from tensorflow.python.ops import resource_variable_ops
from tensorflow.python.trackable import base as trackable_base
from tensorflow.python.trackable import python_state
from tensorflow.python.training.saving import saveable_object, saveable_object_util

from trainer import executor, nonfinite
from trainer.tfcall import flat_caller


def _materialize(value):
    """A concrete, immutable tensor for one `_serialize_to_tensors` entry."""
    if isinstance(value, dict):  # sliced values: {slice_spec: tensor}
        return {k: _materialize(v) for k, v in value.items()}
    if isinstance(value, saveable_object.SaveSpec):  # e.g. a variable's deferred read
        value = value.tensor
    if value is None:
        raise ValueError("checkpoint.async: an uninitialized variable cannot be snapshotted")
    return tf.identity(value)


def _plain_variable(obj) -> tf.Variable | None:
    """The local tf.Variable whose value is `obj`'s whole checkpoint entry, if it is one
    (a TF resource variable, or a Keras 3 variable wrapping one); None otherwise."""
    inner = obj.value if isinstance(obj, keras.Variable) else obj
    return inner if type(inner) is resource_variable_ops.ResourceVariable else None


def _inner(var):
    """The tf.Variable holding `var`'s value (itself if it is one)."""
    plain = _plain_variable(var)
    return var if plain is None else plain


def snapshot(
    checkpoint: tf.train.Checkpoint,
    plans: dict,
    objects: tuple,
    assign: Sequence[tuple[tf.Variable, object]] = (),
    check: Sequence[tf.Variable] = (),
) -> tuple[list[tuple[object, dict]], list[tf.Variable]]:
    """(frozen, nonfinite): `frozen` is [(trackable, {checkpoint key: frozen tensor})] for every
    saveable object among `objects` (`object_graph(checkpoint)`), the save counter last (its
    value after this save's increment: the write need not read it); `nonfinite` lists the
    floating variables of `check` that hold a NaN or Inf.

    `assign` (variable, value) pairs are written first, in the same call: a save's counters.
    The same call increments the checkpoint's save counter, as the CheckpointManager's save
    does (its eager increment on the writer's thread held the GIL ~0.1 ms, profiled), unless
    a variable of `check` is not finite (then nothing is written); a write refused before
    its files are saved takes the count back (AsyncCheckpointWriter._run).
    Which objects are plain variables is worked out once per object graph (cached in
    `plans`); the assignments, the reads of those and the finiteness of `check` are one
    tf.function call: ~0.3 ms, against ~1 ms for eager assigns, a separate check and the
    reads (profiled). The reads alias the variables' buffers; copy-on-write keeps them
    intact when training updates the variables (for the 300 MB state that copy cost the
    loop 6-26 ms a save, measured: a small part of its async save's cost, BENCHMARKS.md).
    """
    assigned = tuple(var for var, _ in assign)
    key = tuple(map(id, objects)), tuple(map(id, assigned)), tuple(map(id, check))
    if key not in plans:
        plans[key] = _Plan(checkpoint, objects, assigned, check)
    plan = plans[key]
    with executor.running_on(plan.executor):
        values, finite, count = plan.read(*plan.inputs([value for _, value in assign]))
    frozen = [
        (obj, {trackable_base.VARIABLE_VALUE_KEY: value})
        for obj, value in zip(plan.plain, values, strict=True)
    ]
    for obj in plan.others:
        tensors = obj._serialize_to_tensors()  # the Trackable protocol
        frozen.append((obj, {k: _materialize(v) for k, v in tensors.items()}))
    frozen.append((checkpoint.save_counter, {trackable_base.VARIABLE_VALUE_KEY: count}))
    flags = finite.numpy()[: len(plan.checked)]  # (one True stands in for an empty check)
    nonfinite = [var for var, ok in zip(plan.checked, flags, strict=True) if not ok]
    return frozen, nonfinite


class _Plan:
    """How to snapshot one object graph: its plain variables (read in one tf.function, which
    also makes the assignments and checks finiteness), and its other saveables. It holds every
    object of the graph, so the ids in its cache key stay theirs."""

    def __init__(self, checkpoint, objects, assigned, check):
        self.objects = objects
        self.plain, variables, self.others = [], [], []
        for obj in objects:
            if obj is checkpoint.save_counter:
                continue
            if isinstance(obj, python_state.PythonState) or getattr(obj, "get_slot_names", None):
                raise NotImplementedError(
                    f"checkpoint.async: {type(obj).__name__} is not supported; "
                    "use checkpoint.async=false"
                )
            if (var := _plain_variable(obj)) is not None:
                self.plain.append(obj)
                variables.append(var)
            elif saveable_object_util.trackable_has_serialize_to_tensor(obj):
                self.others.append(obj)
            elif obj._gather_saveables_for_checkpoint():
                raise NotImplementedError(
                    f"checkpoint.async: {type(obj).__name__} uses legacy SaveableObjects; "
                    "use checkpoint.async=false"
                )
        self.assigned = [_inner(v) for v in assigned]
        self.dtypes = sorted({tf.as_dtype(v.dtype) for v in self.assigned}, key=str)
        # the assigned values travel as one vector per dtype
        self.groups = [
            [i for i, v in enumerate(self.assigned) if v.dtype == d] for d in self.dtypes
        ]
        self.checked = nonfinite.floating(check)
        checked = [_inner(v) for v in self.checked]
        assigned, groups, counter = self.assigned, self.groups, checkpoint.save_counter

        @tf.function(autograph=False)
        def read(*vectors):
            for group, vector in zip(groups, vectors, strict=True):
                for i, value in zip(group, tf.unstack(vector, num=len(group)), strict=True):
                    assigned[i].assign(value, read_value=False)
            values = [v.read_value() for v in variables]  # after the assignments (TF orders
            # a variable's stateful ops as written)
            read = {id(v): value for v, value in zip(variables, values, strict=True)}
            # (the checked variables are among them: one read each, not two)
            flags = nonfinite.finite_flags(
                [read[id(v)] if id(v) in read else v.read_value() for v in checked]
            )
            counter.assign_add(tf.cast(tf.reduce_all(flags), counter.dtype), read_value=False)
            return values, flags, counter.read_value()  # (after the increment: TF orders them)

        example = self.inputs([np.zeros((), d.as_numpy_dtype) for d in [v.dtype for v in assigned]])
        self.read = flat_caller(read, *example)
        devices = [v.device for v in [*variables, *assigned, *checked, counter]]
        self.executor = executor.for_checkpoint(devices, self.read.graph)

    def inputs(self, values: list) -> list[tf.Tensor]:
        """`values` (one per assigned variable) as the read function's vectors: made as
        tf.constant makes them (an EagerTensor on the context's device), without its Python
        layers (~0.15 ms a save on the loop's thread, against ~0.02 ms timed in a tight
        loop: a save's Python runs with cold caches)."""
        device = context.context().device_name
        return [
            ops.EagerTensor([values[i] for i in group], device, dtype.as_datatype_enum)
            for group, dtype in zip(self.groups, self.dtypes, strict=True)
        ]
