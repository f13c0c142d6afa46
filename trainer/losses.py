"""What training minimizes and what it reports: the `loss` group and the `metrics` list.

`loss=auto` (the default) takes the loss from the task: mean squared error for regression,
cross-entropy on logits for classification. `loss=custom` takes any `keras.losses.Loss`
subclass, or a function f(y_true, y_pred), by `_target_`. The task's own metric (MAE or
accuracy) is always logged; `metrics=[...]` adds Keras metrics (classes or functions) by
`_target_`. The loop sums a loss per example over the global batch, so every loss is used
through its unreduced form (`Loss.call`), whatever reduction it was built with.

Training metrics are stateful: their totals since the last log line are variables, held in
the checkpoint (trainer/state.py) so that a resume logs the same values. Evaluation uses a
second set of the same metrics, reset at each eval.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import keras
import tensorflow as tf
from keras.src.losses.losses import LossFunctionWrapper  # what Keras wraps its own in
from omegaconf import DictConfig, OmegaConf

from trainer import targets
from trainer.config import UserError

# keys of a metrics.jsonl row that a user metric must not take
RESERVED = {"step", "split", "event", "loss", "loss_avg", "mae", "accuracy", "learning_rate"}
RESERVED |= {"grad_norm", "batch_ids_hash", "steps_per_sec", "restored_step"}


@dataclass
class Objective:
    """The loss per example, the task metric, extra metrics, and the loss `.keras` stores."""

    loss_fn: object  # (y, pred) -> [batch] float32
    keras_loss: object  # for model.compile: carried by the .keras export
    metric_name: str  # 'mae' | 'accuracy'
    metric_fn: object  # (y, pred) -> [batch]
    train_metrics: list = field(default_factory=list)  # stateful; checkpointed
    eval_metrics: list = field(default_factory=list)  # the same metrics, for evaluation


def per_example_loss(task: str):
    """The loss per example: mean squared error, or cross-entropy on logits."""
    if task == "classification":
        return lambda y, pred: keras.losses.sparse_categorical_crossentropy(
            y, pred, from_logits=True
        )
    return lambda y, pred: tf.reduce_mean(tf.square(tf.cast(y, pred.dtype) - pred), axis=-1)


def per_example_metric(task: str) -> tuple[str, callable]:
    """The task metric per example: ('accuracy', correct) or ('mae', absolute error)."""
    if task == "classification":
        return "accuracy", lambda y, pred: tf.cast(
            tf.equal(tf.cast(y, tf.int64), tf.argmax(pred, axis=-1)), tf.float32
        )
    return "mae", lambda y, pred: tf.reduce_mean(tf.abs(tf.cast(y, pred.dtype) - pred), axis=-1)


def keras_loss(task: str):
    """The task's loss as a serializable Keras object, for `model.compile` (and so `.keras`)."""
    if task == "classification":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return keras.losses.MeanSquaredError()


def build_objective(cfg: DictConfig, task: str) -> Objective:
    """The run's loss and metrics (call inside the strategy's scope: metrics own variables)."""
    name, metric_fn = per_example_metric(task)
    loss_cfg = cfg.get("loss") or {"name": "auto"}
    if loss_cfg.get("name", "auto") == "auto":
        extra = sorted(set(loss_cfg) - {"name"})
        if extra:
            raise UserError(
                f"loss.{extra[0]}: loss=auto takes no arguments (its loss comes from the task); "
                f"for a loss of your choice: loss=custom loss._target_=... +loss.{extra[0]}=..."
            )
        objective = Objective(per_example_loss(task), keras_loss(task), name, metric_fn)
    else:
        loss = custom_loss(loss_cfg)
        objective = Objective(per_example(loss, task), loss, name, metric_fn)
    entries = cfg.get("metrics") or []
    if OmegaConf.is_config(entries):
        entries = OmegaConf.to_container(entries, resolve=True)
    if not isinstance(entries, list):
        raise UserError(
            f"metrics: received {entries!r}; allowed: a list of _target_s, e.g. "
            "metrics=[keras.metrics.RootMeanSquaredError]"
        )
    objective.train_metrics = [custom_metric(e, i) for i, e in enumerate(entries)]
    objective.eval_metrics = [custom_metric(e, i) for i, e in enumerate(entries)]
    names = [name]
    for i, m in enumerate(objective.train_metrics):
        if m.name in RESERVED or m.name in names:
            raise UserError(
                f"metrics[{i}]: its name {m.name!r} is taken (by the run's own logs or another "
                "metric); give it another with name=..., e.g. "
                f"metrics=[{{_target_:{type(m).__module__}.{type(m).__name__},name:my_{m.name}}}]"
            )
        names.append(m.name)
    return objective


def custom_loss(loss_cfg: DictConfig) -> keras.losses.Loss:
    """`loss._target_` as a Keras Loss: a Loss subclass built with the keys given, or a
    function wrapped (its extra keys as keyword arguments) so that `.keras` can store it."""
    path = loss_cfg._target_
    target = targets.import_target("loss._target_", path)
    kwargs = targets.arguments(loss_cfg, ("name", "_target_"))
    if inspect.isclass(target) and issubclass(target, keras.losses.Loss):
        targets.check_arguments("loss", target, kwargs)
        return targets.call("loss", target, kwargs)
    if inspect.isfunction(target) or inspect.isbuiltin(target):
        names, _ = targets.accepted(target)
        if len(names) < 2:
            raise UserError(
                f"loss._target_: received {path!r}, a function of {len(names)} argument(s); "
                "allowed: a function f(y_true, y_pred, ...) or a keras.losses.Loss subclass"
            )
        targets.check_arguments("loss", target, kwargs)
        return LossFunctionWrapper(target, name=target.__name__, **kwargs)
    raise UserError(
        f"loss._target_: received {path!r}, {targets.kind(target)}; allowed: a keras.losses.Loss "
        "subclass or a function f(y_true, y_pred)"
    )


def per_example(loss: keras.losses.Loss, task: str):
    """(y, pred) -> one loss per example from a Keras Loss, unreduced: the values `call`
    returns, averaged over any further axes; a loss that returns one number for the batch
    counts it once per example."""

    def fn(y, pred):
        y = tf.cast(y, pred.dtype) if task == "regression" else y
        values = tf.cast(loss.call(y, pred), tf.float32)
        if values.shape.rank == 0:
            return tf.fill(tf.shape(pred)[:1], values)
        if values.shape.rank > 1:
            values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
        return values

    return fn


def custom_metric(entry, i: int) -> keras.metrics.Metric:
    """One `metrics` entry ('pkg.Name' or {_target_: 'pkg.Name', arg: value}) as a Keras
    Metric: a Metric subclass built with its arguments, or a function f(y_true, y_pred)
    averaged (MeanMetricWrapper)."""
    key = f"metrics[{i}]"
    if isinstance(entry, str):
        path, kwargs = entry, {}
    elif isinstance(entry, dict) and "_target_" in entry:
        path, kwargs = entry["_target_"], {k: v for k, v in entry.items() if k != "_target_"}
    else:
        raise UserError(
            f"{key}: received {entry!r}; allowed: a dotted path (keras.metrics.AUC) or "
            "{_target_: ..., <argument>: ...}"
        )
    target = targets.import_target(f"{key}._target_", path)
    if inspect.isclass(target) and issubclass(target, keras.metrics.Metric):
        targets.check_arguments(key, target, kwargs)
        return targets.call(key, target, kwargs)
    if inspect.isfunction(target):
        names, _ = targets.accepted(target)
        targets.check_arguments(key, target, {k: v for k, v in kwargs.items() if k != "name"})
        name = kwargs.pop("name", target.__name__)
        if len(names) < 2:
            raise UserError(f"{key}: received {path!r}; allowed: a function f(y_true, y_pred)")
        return keras.metrics.MeanMetricWrapper(target, name=name, **kwargs)
    raise UserError(
        f"{key}._target_: received {path!r}, {targets.kind(target)}; allowed: a keras.metrics.Metric "
        "subclass or a function f(y_true, y_pred)"
    )
