"""The inner steps (Orbit's split): `chunk(k)` runs k train steps in one traced call, and
`evaluate(dataset)` the eval pass; the outer loop (trainer/loop.py) decides when to call them."""

from __future__ import annotations

import tensorflow as tf

from trainer import executor
from trainer.distribute import precision
from trainer.optim import learning_rate_fn, step_counter
from trainer.tfcall import flat_caller


def make_chunk_fn(strategy, model, optimizer, loss_fn, metric_fn, global_batch, **options):
    """`for_iterator(iterator)` -> `chunk(k)` (a traced tf.function, called through its concrete
    function: `k` must be an int32 scalar tensor) running `k` train steps on batches
    from `iterator`; it returns one [4 + len(metrics), k] tensor: per step the loss, grad
    norm, metric and learning rate, then each of `metrics` (Keras metrics, their result since
    the last step that was a multiple of `log_every`: they are reset after such a step); and
    a [k] float64 tensor: per step the `batch_ids_hash` of its global batch (the sum of its
    rows' id terms, trainer/data/memory.py). No eager ops. Options: metrics, log_every,
    jit_compile (the step compiled by XLA), executor (trainer.executor: trainer/executor.py).

    The iterator is captured, not passed: an iterator argument is bound again on every call
    (its type spec hashed), ~0.1 ms of the ~2 ms a 10-step chunk takes (profiled). A new
    iterator (after a rollback) gets a new function, traced once.
    """
    _known(options, "metrics", "log_every", "jit_compile", "executor")
    replicas = strategy.num_replicas_in_sync
    learning_rate = learning_rate_fn(optimizer)
    metrics, log_every = options.get("metrics", ()), options.get("log_every", 1)

    def step_fn(x, y, id_terms):
        with tf.GradientTape() as tape:
            pred = tf.cast(model(x, training=True), tf.float32)
            loss = tf.reduce_sum(loss_fn(y, pred)) / global_batch
            if model.losses:
                loss += tf.add_n(model.losses) / replicas
            scaled = optimizer.scale_loss(loss)  # loss scaling under mixed_float16, else loss
        tvars = model.trainable_variables
        grads = tape.gradient(scaled, tvars)
        optimizer.apply_gradients(zip(grads, tvars, strict=True))
        for m in metrics:
            m.update_state(y, pred)
        return (
            loss,
            precision.grad_norm(optimizer, grads) / replicas,
            tf.reduce_sum(metric_fn(y, pred)) / global_batch,
            tf.reduce_sum(id_terms),
        )

    if options.get("jit_compile"):  # each step one XLA cluster (not the loop around it)
        step_fn = tf.function(step_fn, jit_compile=True, autograph=False)
    chosen = []  # the executor, chosen at the first trace (trainer/executor.py)

    def for_iterator(iterator):  # through its concrete function: tf.function's dispatch
        # was ~0.1 ms of a ~2 ms chunk (profiled)
        trace = lambda: flat_caller(tf.function(lambda k: chunk(iterator, k)), tf.constant(1))  # noqa: E731
        how = dict(strategy=strategy, model=model, inputs=iterator.element_spec[0])
        setting = options.get("executor", "default")
        return executor.traced(trace, chosen, setting, batch=global_batch, **how)

    def chunk(iterator, k):
        losses = tf.TensorArray(tf.float32, size=k)
        norms = tf.TensorArray(tf.float32, size=k)
        metric = tf.TensorArray(tf.float32, size=k)
        rates = tf.TensorArray(tf.float32, size=k)
        hashes = tf.TensorArray(tf.float64, size=k)
        extra = [tf.TensorArray(tf.float32, size=k) for _ in metrics]
        # iterations == the step at a chunk's start (sync_iterations), read once before the loop
        start = tf.cast(tf.convert_to_tensor(step_counter(optimizer)), tf.int64)
        for i in tf.range(k):
            rates = rates.write(i, learning_rate(start + tf.cast(i, tf.int64)))
            x, y, terms = next(iterator)
            loss, norm, m, h = strategy.run(step_fn, args=(x, y, terms))
            losses = losses.write(i, strategy.reduce("SUM", loss, axis=None))
            norms = norms.write(i, strategy.reduce("SUM", norm, axis=None))
            metric = metric.write(i, strategy.reduce("SUM", m, axis=None))
            hashes = hashes.write(i, strategy.reduce("SUM", h, axis=None))
            if metrics:
                extra = [
                    e.write(i, tf.cast(m.result(), tf.float32))
                    for e, m in zip(extra, metrics, strict=True)
                ]
                if (start + tf.cast(i, tf.int64) + 1) % log_every == 0:
                    for m in metrics:  # the next log line's values start here
                        m.reset_state()
        stats = [losses.stack(), norms.stack(), metric.stack(), rates.stack()]
        stats = tf.stack(stats + [e.stack() for e in extra])
        return stats, hashes.stack()

    return for_iterator


def _known(options: dict, *names: str) -> None:
    if unknown := set(options) - set(names):
        raise TypeError(f"unknown options {sorted(unknown)}; allowed: {', '.join(names)}")


def make_eval_fn(model, loss_fn, metric_fn, metrics=()):
    """`evaluate(dataset)` -> (mean loss, mean task metric, {name: result} of `metrics`
    (Keras metrics, reset first)) over the dataset's (x, y) batches."""

    @tf.function
    def batch_sums(x, y):
        pred = tf.cast(model(x, training=False), tf.float32)
        for m in metrics:
            m.update_state(y, pred)
        return tf.reduce_sum(loss_fn(y, pred)), tf.reduce_sum(metric_fn(y, pred))

    def evaluate(dataset) -> tuple[float, float, dict]:
        loss = metric = 0.0
        n = 0
        for m in metrics:
            m.reset_state()
        for x, y in dataset:
            a, b = batch_sums(x, y)
            loss, metric, n = loss + float(a), metric + float(b), n + int(x.shape[0])
        results = {m.name: float(tf.convert_to_tensor(m.result())) for m in metrics}
        return loss / n, metric / n, results  # (a result may be a replicated variable)

    return evaluate
