"""Which TensorFlow executor runs the train step (`trainer.executor`, README "Performance").

TensorFlow runs a traced function's ops on an executor. Its default one hands every op that
becomes ready to the inter-op thread pool, so independent ops (a layer's weight gradient and
its input gradient, say) run side by side; each hand-off costs microseconds. Its single-
threaded executor runs every op in turn on the calling thread (an op still splits its own
work over the intra-op pool). Measured on 2 cores, step time single-threaded / default
(BENCHMARKS.md, "A faster step"): 0.49-0.77x for the small shipped models, whose ops take
microseconds, and 1.15-1.34x for a conv net and a 256-unit MLP, whose ops are large enough
that running two at once pays.

`auto` picks by the size of the step: single-threaded when the model's forward pass on one
batch counts fewer than AUTO_MAX_FLOPS floating-point operations (TensorFlow's own op
statistics, on a trace of the forward pass with the batch's shapes, and at least two per
weight and example), on one CPU device, and when the step holds no control flow
(CONTROL_FLOW). The choice depends on the model, the batch shape, the step's ops and the
devices, never on timing, so a run and its resumes on the same machine choose the same
executor (the two executors differ in the last bit of some results: TensorFlow optimizes
the step's graph differently for each).
"""

from __future__ import annotations

import contextlib
import logging
import sys

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context

SINGLE_THREADED = "SINGLE_THREADED_EXECUTOR"  # TensorFlow's name for it
# Control-flow ops: a step holding one stays on the default executor (mixed_float16's
# step, whose loss scaling is a tf.cond, hung on the single-threaded one inside TensorFlow, deaf
# to signals; README "Performance")
CONTROL_FLOW = frozenset({"If", "StatelessIf", "Case", "StatelessCase", "While", "StatelessWhile"})
AUTO_MAX_FLOPS = 2_000_000  # forward-pass flops per batch below which auto is single-threaded


@contextlib.contextmanager
def running_on(executor: str):
    """Functions traced and called on this thread inside the block use `executor` ("" is
    TensorFlow's default). The setting is TensorFlow's per-thread function-call option."""
    options = context.context().function_call_options
    before = options.executor_type
    options.executor_type = executor
    try:
        yield
    finally:
        options.executor_type = before


def traced(trace, chosen: list, setting: str, **how):
    """The train chunk `trace()` builds (a flat_caller), traced and called on the executor in
    `chosen[0]`. The first call chooses it (choose(setting, **how); a step that refuses()
    the single-threaded executor is traced again on the default one) and keeps it in
    `chosen`, so that a chunk traced later (after a rollback) runs where the first did."""
    if not chosen:
        chosen.append(choose(setting, **how))
        call = _trace_on(trace, chosen[0])
        if chosen[0] and refuses(call.graph, setting):
            chosen[0] = ""
            call = _trace_on(trace, "")  # again, on the default executor
    else:
        call = _trace_on(trace, chosen[0])
    if not chosen[0]:
        return call

    def run(*args):
        with running_on(chosen[0]):
            return call(*args)

    run.variables = call.variables
    return run


def _trace_on(trace, executor: str):
    with running_on(executor):
        return trace()


def choose(setting: str, strategy, model, inputs, batch: int) -> str:
    """The executor for `trainer.executor=setting` ("" for TensorFlow's default): `inputs`
    is the spec (or nest of specs) of the model's input batch, `batch` its size where a spec
    leaves it open."""
    if setting == "default":
        return ""
    # Ops that wait for another device or worker (all-reduces, sends: a GPU's graph has
    # them too) need the default one.
    if type(strategy).__name__ != "_DefaultDistributionStrategy" or _accelerators():
        return ""
    if setting == "single_threaded":
        return SINGLE_THREADED
    specs = tf.nest.flatten(inputs)
    if not all(type(s) is tf.TensorSpec and s.shape.rank is not None for s in specs):
        return ""  # ragged, sparse or of unknown rank: not counted, the default

    def sized(spec: tf.TensorSpec) -> tf.TensorSpec:
        shape = spec.shape.as_list()
        return tf.TensorSpec(
            [batch if d is None and i == 0 else d for i, d in enumerate(shape)],
            spec.dtype,
        )

    sized_inputs = tf.nest.map_structure(sized, inputs)
    if any(None in spec.shape.as_list() for spec in tf.nest.flatten(sized_inputs)):
        return ""  # a dimension that varies from batch to batch: no count, the default
    try:
        flops = forward_flops(model, sized_inputs)
    except Exception:  # noqa: BLE001 (a model TensorFlow cannot count: the default executor)
        return ""
    # TensorFlow's statistics skip ops they have no count for (an einsum, a custom op, a
    # nested tf.function): at least a multiply-add per weight and example is counted
    weights = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    examples = tf.nest.flatten(sized_inputs)[0].shape[0] or batch
    return SINGLE_THREADED if max(flops, 2 * weights * examples) < AUTO_MAX_FLOPS else ""


def for_checkpoint(devices: list[str], graph) -> str:
    """The executor of an async checkpoint's traced functions (trainer/checkpoint/
    async_save.py: the snapshot's reads, the save), whose tensors are on `devices`:
    single-threaded when they are all on one CPU device, no accelerator is present and the
    function holds no control flow; else the default.

    Each is a handful of ops; on the default executor every op is handed to the inter-op
    pool, whose threads wake on either core, beside the loop. Run on the calling thread
    instead, an async save of the default model cost the loop 1.3 ms less; for the 300 MB
    state the two were within the noise (BENCHMARKS.md, "Saves measured within one run")."""
    specs = {(s.device_type, s.device_index) for s in map(tf.DeviceSpec.from_string, devices)}
    if len(specs) != 1 or next(iter(specs))[0] != "CPU" or _accelerators():
        return ""
    return "" if _control_flow(graph, top_level=True) else SINGLE_THREADED


def _accelerators() -> bool:
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def refuses(graph, setting: str) -> bool:
    """Whether the train chunk traced as `graph` must leave the single-threaded executor: its
    step (the functions its loop runs) holds control flow. A `single_threaded` setting is told
    so on stderr."""
    found = _control_flow(graph, top_level=False)  # (the chunk's own loop is top-level)
    if found and setting == "single_threaded":
        print(
            f"note: trainer.executor=single_threaded: the train step holds control flow "
            f"({', '.join(found)}), which can hang TensorFlow's single-threaded executor; it "
            "runs on the default executor",
            file=sys.stderr,
        )
    return bool(found)


def _control_flow(graph, top_level: bool) -> list[str]:
    """The CONTROL_FLOW ops in `graph`'s nested functions, and in the graph itself if
    `top_level`, sorted."""
    graph_def = graph.as_graph_def()
    nodes = [n for f in graph_def.library.function for n in f.node_def]
    nodes += graph_def.node if top_level else []
    return sorted({node.op for node in nodes} & CONTROL_FLOW)


def forward_flops(model, spec) -> int:
    """Floating-point operations of `model`'s forward pass (training=True) on a batch of
    `spec`, as TensorFlow's op statistics count them on a trace (a trace only: nothing runs,
    no variable changes). Ops inside a loop count once."""
    from tensorflow.python.profiler import model_analyzer, option_builder

    graph = tf.function(lambda x: model(x, training=True)).get_concrete_function(spec).graph
    builder = option_builder.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    quiet = logging.getLogger("tensorflow")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the TF1 profiler's deprecation notes
    try:
        return int(model_analyzer.profile(graph, options=options).total_float_ops)
    finally:
        quiet.setLevel(level)
