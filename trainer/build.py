"""Runtime set-up and object construction: determinism, the model, and the TrainState that
holds it with its optimizer (trainer/optim.py) and metrics (trainer/losses.py)."""

from __future__ import annotations

import inspect
import sys

import keras
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from trainer import targets
from trainer.config import UserError
from trainer.data import standardize
from trainer.data.memory import Data


def setup_runtime(cfg: DictConfig) -> None:
    """A clean Keras session, seeds (Python, numpy, TF, Keras) and, if asked, op determinism.

    Clearing the session resets Keras' layer-name counters, so the model built next gets the
    same variable paths (the checkpoint's keys) in every process, and in every run of one
    process (tests, sweeps): `dense`, not `dense_7`.
    """
    _set_threads(int(cfg.trainer.get("inter_op_threads", 0)))
    keras.utils.clear_session(free_memory=False)
    keras.utils.set_random_seed(int(cfg.trainer.seed))
    if cfg.trainer.deterministic:
        tf.config.experimental.enable_op_determinism()


def _set_threads(inter_op: int) -> None:
    """trainer.inter_op_threads, before TensorFlow's runtime starts (its first op). A process
    that already ran one (tests, sweeps in one process) keeps the pools it has, and says so
    when they differ."""
    if tf.config.threading.get_inter_op_parallelism_threads() == inter_op:
        return
    try:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:  # "... cannot be modified after initialization"
        print(
            f"warning: trainer.inter_op_threads={inter_op} not applied: TensorFlow's runtime "
            "already started in this process with "
            f"{tf.config.threading.get_inter_op_parallelism_threads()}",
            file=sys.stderr,
        )


def _import_class(path: str):
    cls = targets.import_target("model._target_", path)
    if not (inspect.isclass(cls) and issubclass(cls, keras.Model)):
        raise UserError(
            f"model._target_: received {path!r}, {targets.kind(cls)}; allowed: a keras.Model subclass"
        )
    return cls


def model_kwargs(model_cfg: DictConfig, data: Data) -> dict:
    """Constructor arguments: the model group's keys, `output_units: null` filled from the data."""
    kwargs = OmegaConf.to_container(model_cfg, resolve=True)
    kwargs.pop("_target_", None)
    if "output_units" in kwargs and kwargs["output_units"] is None:
        kwargs["output_units"] = data.output_units
    return kwargs


def build_model(model_cfg: DictConfig, data: Data) -> keras.Model:
    """Instantiate `model._target_` with the model group's keys and build it on one batch."""
    cls = _import_class(model_cfg._target_)
    kwargs = model_kwargs(model_cfg, data)
    params = inspect.signature(cls.__init__).parameters
    allowed = [
        p
        for p, v in params.items()
        if p != "self" and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)
    ]
    for key in kwargs:
        if key not in allowed and key not in ("name", "dtype", "trainable"):
            raise UserError(f"model.{key}: not an argument of {cls.__name__}; allowed: {allowed}")
    try:
        model = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"model: {cls.__name__}({kwargs}) failed: {e}") from None
    try:
        model(tf.constant(data.sample(1)))  # build every variable before restore/optimizer
    except Exception as e:
        raise UserError(
            f"model: {cls.__name__} cannot take this data's inputs of shape {(None, *data.feature_shape)} "
            f"({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    out = model(tf.constant(data.sample(2)))
    if out.shape[-1] != data.output_units:
        raise UserError(
            f"model: {cls.__name__} outputs {out.shape[-1]} values per example; the data "
            f"({data.task}) needs {data.output_units}"
        )
    return model


def build_state(cfg: DictConfig, data: Data):
    """The model, its optimizer and their TrainState, as `fit` builds them (call it inside
    the strategy's scope): what a checkpoint of a run with config `cfg` holds."""
    from trainer.distribute import precision
    from trainer.losses import build_objective
    from trainer.optim import build_optimizer
    from trainer.state import TrainState

    model = build_model(cfg.model, data)
    stats = standardize.wanted(cfg.data, data)
    if stats is not None:  # the data's own units in and out (trainer/data/standardize.py)
        model = standardize.Standardized(model, **stats)
        model(tf.constant(data.sample(1)))
    optimizer = build_optimizer(cfg.optimizer, cfg.schedule, int(cfg.trainer.max_steps))
    optimizer = precision.wrap_optimizer(optimizer, cfg.trainer.get("precision", "float32"))
    objective = build_objective(cfg, data.task)
    objective.loss_fn = standardize.scaled_loss(objective.loss_fn, model)
    model.compile(optimizer=optimizer, loss=objective.keras_loss)
    optimizer.build(model.trainable_variables)
    state = TrainState(
        model,
        optimizer,
        include_rng=bool(cfg.checkpoint.get("restore_rng", True)),
        metrics=objective.train_metrics,
    )
    state.objective = objective
    return state
