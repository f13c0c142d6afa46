"""The fit loop: restore-or-initialize, train in tf.function chunks, log, evaluate, checkpoint, export.

Resume order, in this one place (`_restore_or_initialize`):
  1. the run directory already has a checkpoint: resume from the newest one that verifies;
  2. `trainer.init_from` names a .keras artifact or a checkpoint: warm start from it;
  3. otherwise start from scratch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import tensorflow as tf
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from trainer import build, nonfinite, summaries
from trainer import data as data_lib
from trainer.checkpoint import export, integrity
from trainer.checkpoint.fingerprint import manifest_extra
from trainer.checkpoint.store import CheckpointStore, list_checkpoints, read_manifest
from trainer.checkpoint.warm_start import warm_start
from trainer.config import UserError, validate
from trainer.distribute import placement as distribute
from trainer.distribute import precision
from trainer.nonfinite import NonFiniteLoss
from trainer.optim import build_optimizer, learning_rate_fn
from trainer.signals import StopRequest
from trainer.state import STATE_LAYOUT, TrainState
from trainer.tfcall import flat_caller

__all__ = ["NonFiniteLoss", "RunResult", "fit"]


@dataclass
class RunResult:
    # "completed" | "stopped" (trainer.stop_at) | "interrupted" (signal) | "already_complete"
    # (a rerun of a run that had reached trainer.max_steps: nothing written but missing exports)
    status: str
    step: int
    resumed_from: int | None
    run_dir: str
    final_loss: float | None = None
    eval: dict = field(default_factory=dict)
    exports: dict = field(default_factory=dict)
    signal_name: str | None = None


def make_chunk_fn(strategy, model, optimizer, loss_fn, metric_fn, global_batch: int):
    """`for_iterator(iterator)` -> `chunk(k)` (a traced tf.function, called through its concrete
    function: `k` must be an int32 scalar tensor) running `k` train steps on batches
    from `iterator`; it returns one [4, k] tensor: per step the loss, grad norm, metric and
    learning rate (one device-to-host copy per chunk, no eager ops).

    The iterator is captured, not passed: an iterator argument is bound again on every call
    (its type spec hashed), ~0.1 ms of the ~2 ms a 10-step chunk takes (profiled). A new
    iterator (after a rollback) gets a new function, traced once.
    """
    replicas = strategy.num_replicas_in_sync
    learning_rate = learning_rate_fn(optimizer)

    def step_fn(x, y):
        with tf.GradientTape() as tape:
            pred = tf.cast(model(x, training=True), tf.float32)
            loss = tf.reduce_sum(loss_fn(y, pred)) / global_batch
            if model.losses:
                loss += tf.add_n(model.losses) / replicas
            scaled = optimizer.scale_loss(loss)  # loss scaling under mixed_float16, else loss
        tvars = model.trainable_variables
        grads = tape.gradient(scaled, tvars)
        optimizer.apply_gradients(zip(grads, tvars, strict=True))
        return (
            loss,
            precision.grad_norm(optimizer, grads) / replicas,
            tf.reduce_sum(metric_fn(y, pred)) / global_batch,
        )

    def for_iterator(iterator):
        # called through its concrete function: tf.function's per-call dispatch was ~0.1 ms
        # of a ~2 ms chunk (profiled)
        return flat_caller(tf.function(lambda k: chunk(iterator, k)), tf.constant(1))

    def chunk(iterator, k):
        losses = tf.TensorArray(tf.float32, size=k)
        norms = tf.TensorArray(tf.float32, size=k)
        metric = tf.TensorArray(tf.float32, size=k)
        rates = tf.TensorArray(tf.float32, size=k)
        # iterations == the step at a chunk's start (sync_iterations), read once before the loop
        start = tf.cast(tf.convert_to_tensor(optimizer.iterations), tf.int64)
        for i in tf.range(k):
            rates = rates.write(i, learning_rate(start + tf.cast(i, tf.int64)))
            x, y = next(iterator)
            loss, norm, m = strategy.run(step_fn, args=(x, y))
            losses = losses.write(i, strategy.reduce("SUM", loss, axis=None))
            norms = norms.write(i, strategy.reduce("SUM", norm, axis=None))
            metric = metric.write(i, strategy.reduce("SUM", m, axis=None))
        return tf.stack([losses.stack(), norms.stack(), metric.stack(), rates.stack()])

    return for_iterator


def make_eval_fn(model, loss_fn, metric_fn):
    @tf.function
    def batch_sums(x, y):
        pred = tf.cast(model(x, training=False), tf.float32)
        return tf.reduce_sum(loss_fn(y, pred)), tf.reduce_sum(metric_fn(y, pred))

    def evaluate(dataset) -> tuple[float, float]:
        loss = metric = 0.0
        n = 0
        for x, y in dataset:
            a, b = batch_sums(x, y)
            loss, metric, n = loss + float(a), metric + float(b), n + int(x.shape[0])
        return loss / n, metric / n

    return evaluate


def hparams_of(cfg: DictConfig) -> dict:
    flat = {
        "model": str(cfg.model._target_),
        "optimizer": cfg.optimizer.name,
        "schedule": cfg.schedule.name,
        "data": cfg.data.name,
    }
    for group in ("model", "optimizer", "data", "trainer", "checkpoint"):
        for key, value in OmegaConf.to_container(cfg[group], resolve=True).items():
            if isinstance(value, (bool, int, float, str)) and key not in ("name", "_target_"):
                flat[f"{group}.{key}"] = value
    return flat


def fit(cfg: DictConfig, run_dir: str) -> RunResult:
    """Train per `cfg` in `run_dir` (resuming if it holds checkpoints); return what happened.

    Under multi-worker training only the chief writes into `run_dir`; the other workers
    write into `place.write_dir`, a temporary directory (trainer/distribute/placement.py).
    """
    validate(cfg)
    tc = cfg.trainer
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if tc.resume == "never" and list_checkpoints(ckpt_dir):
        raise UserError(
            f"trainer.resume: received 'never' but {ckpt_dir} already holds checkpoints; "
            "use another hydra.run.dir or trainer.resume=auto"
        )
    build.setup_runtime(cfg)
    place = distribute.setup(cfg, run_dir)  # strategy, replicas, chief or not
    strategy, write_dir = place.strategy, place.write_dir
    data = data_lib.load_data(cfg.data)
    batch = int(cfg.data.batch_size)
    spe = data.steps_per_epoch(batch)
    loss_fn = build.per_example_loss(data.task)
    metric_name, metric_fn = build.per_example_metric(data.task)
    # Verify the checkpoints, refuse an incompatible config, move bad ones aside: all before
    # the CheckpointManager below reads its state file.
    latest = integrity.recover(
        ckpt_dir,
        tidy=place.is_chief,
        check=lambda prefix: (
            check_compatible(cfg, prefix),
            integrity.check_data_fits(prefix, data, cfg.data.get("path")),
        ),
    )
    # A rerun of a completed run changes nothing; it only writes an export that is missing
    # (a run killed during export), from the restored final checkpoint.
    complete = latest is not None and latest.step >= int(tc.max_steps)
    missing_exports = export.missing(write_dir) if complete else None
    if complete and not missing_exports:
        return already_complete(latest.step, run_dir)

    with strategy.scope():
        model = build.build_model(cfg.model, data)
        optimizer = build_optimizer(cfg.optimizer, cfg.schedule, int(tc.max_steps))
        optimizer = precision.wrap_optimizer(optimizer, tc.get("precision", "float32"))
        model.compile(optimizer=optimizer, loss=build.keras_loss(data.task))
        optimizer.build(model.trainable_variables)
        state = TrainState(model, optimizer, include_rng=bool(cfg.checkpoint.restore_rng))
    checked = model.variables + optimizer.variables  # never checkpointed with NaN or Inf
    store = place.checkpoint_store(
        ckpt_dir,
        state.checkpoint,
        max_to_keep=int(cfg.checkpoint.max_to_keep),
        keep_every_n_hours=cfg.checkpoint.keep_every_n_hours,
        manifest_extra={
            **manifest_extra(cfg),
            "data_shape": integrity.data_signature(data),
            "state_layout": STATE_LAYOUT,
        },
        async_write=bool(cfg.checkpoint["async"]),
    )
    step, resumed_from = _restore_or_initialize(cfg, store, state, write_dir, latest, complete)
    if complete:
        exports = export.export_all(model, write_dir, data.feature_shape, only=missing_exports)
        place.cleanup()
        return already_complete(step, run_dir, exports)

    writers = summaries.Writers(write_dir)
    metrics = summaries.MetricsLog(write_dir)
    if resumed_from is None:
        writers.hparams(hparams_of(cfg))
    dataset = data_lib.train_dataset(data, batch, int(tc.seed), step)
    chunk_for = make_chunk_fn(strategy, model, optimizer, loss_fn, metric_fn, batch)
    chunk = chunk_for(iter(place.distribute_dataset(dataset, batch)))
    evaluate = make_eval_fn(model, loss_fn, metric_fn)
    eval_ds = data_lib.eval_dataset(data, batch)
    loop = state.loop
    result = RunResult("completed", step, resumed_from, run_dir)

    def sync_logs() -> None:  # logs up to a checkpoint's step reach the disk before it counts
        writers.flush()  # async: on the writer's thread (Writers traces nothing there)
        metrics.fsync()

    def save(at: int) -> None:
        nonlocal complete_checked
        if not complete_checked:  # at the first save of a process: nothing may be left out
            check_complete(state, at)
            complete_checked = True
        integrity.save(
            store,
            at,
            before_write=sync_logs,  # async: on the writer's thread
            assign=state.assignments(at, at // spe),
            check=checked,
            on_nonfinite=lambda bad: nonfinite.refuse(bad, at, last_saved),
            # async: queued before the write starts, so the write's sync_logs drains it with
            # the rows before it (queued after, it split the next drain's rows in two calls)
            blocked=lambda s: writers.scalars(writers.train, at, {"checkpoint_save_seconds": s}),
        )

    def run_eval(at: int) -> None:
        eval_loss, eval_metric = evaluate(eval_ds)
        loop.best_eval_loss = min(loop.best_eval_loss, eval_loss)
        values = {"loss": eval_loss, metric_name: eval_metric}
        writers.scalars(writers.eval, at, values)
        metrics.write({"step": at, "split": "eval", **{f"eval_{k}": v for k, v in values.items()}})
        result.eval = values
        loop.last_eval_step = at
        tqdm.write(f"step {at}: " + "  ".join(f"eval_{k} {v:.5g}" for k, v in values.items()))

    end = int(tc.stop_at or tc.max_steps)
    K = int(tc.steps_per_execution)
    # Plain ints for the hot loop: each OmegaConf attribute read costs ~20-30 us (profiled).
    log_every, eval_every, every = int(tc.log_every), int(tc.eval_every), int(cfg.checkpoint.every)
    max_steps, pause_at = int(tc.max_steps), int(tc.pause_at or 0)
    bar = tqdm(
        total=int(tc.max_steps),
        initial=step,
        desc="train",
        unit="step",
        disable=None,
        mininterval=0.5,
        dynamic_ncols=True,
    )
    window_t0, window_steps = time.perf_counter(), 0
    last_saved = step if resumed_from is not None else None
    complete_checked = False
    rollbacks = 0
    k_tensors: dict[int, tf.Tensor] = {}  # chunk lengths as tensors: one eager op less per call
    with StopRequest() as stop, store.pending_writes():  # waits for an async write
        place.watch_preemption()  # multi-worker: SIGTERM anywhere -> all save, then stop
        while step < end and stop.signal_name is None:
            # A chunk also ends at the next checkpoint / eval step: K never moves them.
            k = min(K, end - step, every - step % every, eval_every - step % eval_every)
            if pause_at and step < pause_at:
                k = min(k, pause_at - step)
            if k not in k_tensors:
                k_tensors[k] = tf.constant(k)
            losses, norms, metric_values, rates = chunk(k_tensors[k]).numpy()
            bad = nonfinite.first_bad_step(step, losses, norms)
            if bad is not None and tc.on_nonfinite == "rollback" and rollbacks < tc.max_rollbacks:
                rollbacks += 1
                restored = nonfinite.rollback(store, state, bad)
                metrics.write({"step": bad, "event": "rollback", "restored_step": restored})
                bar.update(bad - step)
                prev, step = step, bad  # then the eval / save / pause due at `bad`, as usual
                dataset = data_lib.train_dataset(data, batch, int(tc.seed), step)
                chunk = chunk_for(iter(place.distribute_dataset(dataset, batch)))
            elif bad is not None:
                writers.flush()  # the logs up to the failure stay readable
                metrics.sync()
                raise NonFiniteLoss(
                    f"non-finite loss or gradient at step {bad} (loss={losses.tolist()}); nothing was "
                    f"saved after step {last_saved or 0}. Lower optimizer.learning_rate or check the data."
                )
            else:
                for i in range(k):
                    s = step + i + 1
                    loop.window_loss_sum += float(losses[i])
                    loop.window_metric_sum += float(metric_values[i])
                    loop.window_count += 1
                    if s % log_every == 0:
                        now = time.perf_counter()
                        rate = (window_steps + i + 1) / max(now - window_t0, 1e-9)
                        record = {
                            "step": s,
                            "loss": float(losses[i]),
                            "loss_avg": loop.window_loss_sum / loop.window_count,
                            metric_name: loop.window_metric_sum / loop.window_count,
                            "learning_rate": float(rates[i]),
                            "grad_norm": float(norms[i]),
                        }
                        metrics.write(record)
                        tb = {k2: v for k2, v in record.items() if k2 != "step"}
                        writers.scalars(writers.train, s, {**tb, "steps_per_sec": rate})
                        loop.reset_window()
                        window_t0, window_steps = now, -(i + 1)
                        bar.set_postfix(
                            loss=f"{losses[i]:.4g}", steps_per_s=f"{rate:.1f}", refresh=False
                        )
                window_steps += k
                prev, step = step, step + k
                precision.sync_iterations(optimizer, step)
                result.final_loss = float(losses[-1])
                bar.update(k)
            if step // eval_every > prev // eval_every and step < max_steps:
                run_eval(step)
            # (the final step is saved after the final eval, so its checkpoint includes it)
            if step // every > prev // every and step != max_steps:
                save(step)
                last_saved = step
            if place.preempted(save if last_saved != step else (lambda at: None), step):
                stop.signal_name, last_saved = "SIGTERM (preemption)", step
            if pause_at and step == pause_at:
                store.wait()  # an async save of this step is complete before PAUSED appears
                _pause(write_dir, step, stop, writers, metrics)
        bar.close()
        result.step = step
        if stop.signal_name is not None:
            result.status, result.signal_name = "interrupted", stop.signal_name
        elif step < int(tc.max_steps):
            result.status = "stopped"
        if step == max_steps and loop.last_eval_step != step:  # once, also if interrupted
            run_eval(step)
        if last_saved != step:
            save(step)
    if result.status == "completed":
        result.exports = export.export_all(model, write_dir, data.feature_shape)
    writers.close()
    metrics.close()
    place.cleanup()
    return result


def _pause(run_dir, step, stop, writers, metrics) -> None:
    """Testing hook (`trainer.pause_at`): flush, announce `<run>/PAUSED`, wait for a signal."""
    writers.flush()
    metrics.sync()
    marker = os.path.join(run_dir, "PAUSED")
    with open(marker, "w") as f:
        json.dump({"step": step, "pid": os.getpid()}, f)
    while stop.signal_name is None:
        time.sleep(0.01)
    os.remove(marker)


def _restore_or_initialize(
    cfg, store: CheckpointStore, state: TrainState, run_dir: str, latest, complete: bool = False
):
    """Returns (step, resumed_from). See the module docstring for the order; `latest` is
    the newest good checkpoint, already verified and checked by integrity.recover.
    `complete`: the run had finished; restore only (its logs stay as they are)."""
    if latest is not None:
        problems = state.restore_problems(latest.prefix)
        if problems:  # refused before anything of this run is touched
            raise UserError(_restore_mismatch(cfg, latest.prefix, problems))
        try:
            store.restore(latest.prefix)
        except AssertionError as e:  # objects of this run that the checkpoint has no values for
            raise UserError(_restore_mismatch(cfg, latest.prefix, [str(e)])) from None
        step = state.after_restore()
        iterations = int(state.optimizer.iterations.numpy())
        if iterations != step:
            raise RuntimeError(f"restored step {step} but optimizer.iterations={iterations}")
        if complete:
            return step, None
        dropped = summaries.truncate_metrics(run_dir, step)
        dropped += summaries.truncate_events(os.path.join(run_dir, "tensorboard"), step)
        note = f" (dropped {dropped} log records past it)" if dropped else ""
        print(f"Resuming from step {step}: {latest.prefix}{note}", file=sys.stderr)
        return step, step
    summaries.truncate_metrics(run_dir, 0)
    summaries.truncate_events(os.path.join(run_dir, "tensorboard"), 0)
    if cfg.trainer.init_from:
        warm_start(cfg.trainer.init_from, state)  # prints what it copied
    return 0, None


def _restore_mismatch(cfg: DictConfig, prefix: str, problems: list[str]) -> str:
    """One line for a checkpoint that does not match this run's variables one to one
    (nothing is written yet)."""
    then = read_manifest(prefix).get("config", {}).get("checkpoint", {})
    if cfg.checkpoint.restore_rng and then.get("restore_rng", True) is False:
        why = (
            "checkpoint.restore_rng: received true, but it was written with "
            "checkpoint.restore_rng=false and holds no RNG state. Allowed: "
            "checkpoint.restore_rng=false, or another hydra.run.dir"
        )
    else:
        shown = "; ".join(p.splitlines()[0][:200] for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        why = f"It holds {shown}{more}. Use another hydra.run.dir"
    return f"resume refused: {prefix} does not match this run's variables one to one. {why}."


def check_complete(state: TrainState, step: int) -> None:
    """Before the first save: refuse (exit 2) a checkpoint that would leave a variable out."""
    missing = state.missing_from_checkpoint()
    if missing:
        names = ", ".join(missing[:5]) + (
            f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        )
        raise UserError(
            f"checkpoint: the checkpoint of step {step} would leave out {len(missing)} "
            f"variable(s) created after the model was built: {names}. Create every variable "
            "when the model is built (in __init__ or build()), not during training."
        )


def already_complete(step: int, run_dir: str, exports: dict | None = None) -> RunResult:
    """The result of rerunning a run that had reached trainer.max_steps."""
    last = summaries.last_records(run_dir)
    return RunResult(
        "already_complete",
        step,
        None,
        run_dir,
        final_loss=last.get("loss"),
        eval=last.get("eval", {}),
        exports=exports or {},
    )


def check_compatible(cfg: DictConfig, prefix: str) -> None:
    """Refuse to resume with a config that changes the architecture or the data, or from a
    checkpoint of the earlier layout (README, "How resume works")."""
    from trainer.checkpoint.fingerprint import structural_diff

    if read_manifest(prefix).get("state_layout") != STATE_LAYOUT:
        raise UserError(
            f"resume refused: {prefix} was written by an earlier version of resumable-trainer, "
            "whose checkpoints can miss variables of layers kept in lists or dicts (BatchNorm "
            "statistics); it cannot be resumed exactly. Use another hydra.run.dir (warm start "
            "with trainer.init_from=<its run>/export/model.keras)."
        )

    diff = structural_diff(cfg, prefix)
    if diff:
        lines = "; ".join(
            f"{k}: checkpoint {a!r} -> now {b!r}" for k, (a, b) in sorted(diff.items())
        )
        raise UserError(
            f"resume refused: {os.path.dirname(prefix)} was written with a different model/data config "
            f"({lines}). Use another hydra.run.dir, or restore those values."
        )
