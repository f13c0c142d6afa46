"""One run's working parts, and how each event of the fit loop happens (the mechanics).

`Session.open` builds everything a run needs, in the order of a run's data flow (README,
"What lives where"): strategy, data, checkpoints verified, model and optimizer, restore or
initialize, logs, the train and eval steps. Its methods are the loop's events: train a chunk,
record it, evaluate, save, roll back, pause, finish. When they happen is trainer/loop.py's
business.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
from omegaconf import DictConfig
from tqdm import tqdm

from trainer import build, nonfinite, runinfo, summaries
from trainer import data as data_lib
from trainer.checkpoint import export, integrity
from trainer.checkpoint.fingerprint import manifest_extra
from trainer.checkpoint.store import list_checkpoints
from trainer.config import UserError
from trainer.distribute import placement as distribute
from trainer.distribute import precision
from trainer.nonfinite import NonFiniteLoss
from trainer.restore import (
    check_compatible,
    check_complete,
    check_step_reads,
    restore_or_initialize,
)
from trainer.state import STATE_LAYOUT
from trainer.steps import make_chunk_fn, make_eval_fn

_NOT_SCALARS = ("step", "batch_ids_hash")  # metrics.jsonl only (a float32 scalar would round it)


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
    eval_step: int | None = None  # the step `eval` was measured at
    exports: dict = field(default_factory=dict)
    signal_name: str | None = None


@dataclass
class Chunk:
    """What one call of the train chunk returned: per step loss, grad norm, metric, rate
    and the fingerprint of the batch's example ids."""

    losses: np.ndarray
    norms: np.ndarray
    metric: np.ndarray
    rates: np.ndarray
    ids_hash: np.ndarray
    extra: np.ndarray  # [len(metrics), k]: the `metrics=[...]` results (trainer/losses.py)


def already_complete(step: int, run_dir: str, exports: dict | None = None) -> RunResult:
    """The result of rerunning a run that had reached trainer.max_steps."""
    last = runinfo.last_records(run_dir)
    return RunResult(
        "already_complete",
        step,
        None,
        run_dir,
        final_loss=last.get("loss"),
        eval=last.get("eval", {}),
        eval_step=last.get("eval_step"),
        exports=exports or {},
    )


class Session:
    """Everything one run holds between steps, and the mechanics of each loop event."""

    @classmethod
    def open(cls, cfg: DictConfig, run_dir: str, experiment: bool = True) -> Session | RunResult:
        """Set a run up (resuming if `run_dir` holds checkpoints). A RunResult instead when
        the run had already completed: then nothing is written but a missing export.
        `experiment`: a fresh run declares its own HPARAMS experiment (False in a sweep,
        which declares one for all its jobs: Writers.hparams).

        Under multi-worker training only the chief writes into `run_dir`; the other workers
        write into `place.write_dir`, a temporary directory (trainer/distribute/placement.py).
        """
        tc = cfg.trainer
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        if tc.resume == "never" and list_checkpoints(ckpt_dir):
            raise UserError(
                f"trainer.resume: received 'never' but {ckpt_dir} already holds checkpoints; "
                "use another hydra.run.dir or trainer.resume=auto"
            )
        build.setup_runtime(cfg)
        place = distribute.setup(cfg, run_dir)  # strategy, replicas, chief or not
        data = data_lib.load_data(cfg.data)
        print(f"task: {data.task} ({data.task_reason})", file=sys.stderr)
        # Verify the checkpoints, refuse an incompatible config, move bad ones aside: all
        # before the CheckpointManager reads its state file.
        latest = integrity.recover(
            ckpt_dir,
            tidy=place.is_chief,
            check=lambda prefix: (
                check_compatible(cfg, prefix),
                integrity.check_data_fits(prefix, data, cfg.data.get("path")),
            ),
        )
        # A rerun of a completed run changes nothing; it only writes an export that is
        # missing (a run killed during export), from the restored final checkpoint.
        complete = latest is not None and latest.step >= int(tc.max_steps)
        # (the chief's run_dir on every worker: all take the same branch)
        missing_exports = export.missing(run_dir, latest.step) if complete else None
        if complete and not missing_exports:
            return already_complete(latest.step, run_dir)
        with place.strategy.scope():
            state = build.build_state(cfg, data)
        store = place.checkpoint_store(
            ckpt_dir,
            state.checkpoint,
            max_to_keep=int(cfg.checkpoint.max_to_keep),
            keep_every_n_hours=cfg.checkpoint.keep_every_n_hours,
            manifest_extra={
                **manifest_extra(cfg),
                "data_shape": data.signature(),
                "state_layout": STATE_LAYOUT,
            },
            async_write=bool(cfg.checkpoint["async"]),
            durable=bool(cfg.checkpoint.get("durable", True)),
        )
        step, resumed_from = restore_or_initialize(
            cfg, store, state, place.write_dir, latest, complete
        )
        if complete:
            exports = export.export_all(
                state.model, place.write_dir, data.feature_shape, only=missing_exports, step=step
            )
            place.cleanup()
            return already_complete(step, run_dir, exports)
        return cls(cfg, run_dir, place, data, state, store, step, resumed_from, experiment)

    def __init__(
        self, cfg, run_dir, place, data, state, store, step: int, resumed_from, experiment=True
    ):
        self.cfg, self.place, self.data, self.state, self.store = cfg, place, data, state, store
        self.step, self.loop = step, state.loop
        self.write_dir = place.write_dir
        self.batch = int(cfg.data.batch_size)
        self.steps_per_epoch = data.steps_per_epoch(self.batch)
        self.log_every = int(cfg.trainer.log_every)  # plain ints: an OmegaConf read is ~25 us
        objective, model, optimizer = state.objective, state.model, state.optimizer
        self.metric_name = objective.metric_name
        self.extra_names = [m.name for m in objective.train_metrics]
        self._chunk_for = make_chunk_fn(
            place.strategy,
            model,
            optimizer,
            objective.loss_fn,
            objective.metric_fn,
            self.batch,
            metrics=objective.train_metrics,
            log_every=self.log_every,
        )
        try:  # traced here, before the first step: the parts meet for the first time
            self._chunk = self._new_chunk()
        except (TypeError, ValueError) as e:
            raise UserError(
                "the train step cannot be built from this model, optimizer, loss and metrics "
                f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]}). Check the "
                "arguments given to each; trainer.debug=true shows where it failed"
            ) from e
        check_step_reads(state, self._chunk.variables)  # before anything of the run is written
        self._evaluate = make_eval_fn(
            model, objective.loss_fn, objective.metric_fn, objective.eval_metrics
        )
        self._eval_ds = data.eval_dataset(self.batch)
        self.writers = summaries.Writers(self.write_dir)
        self.metrics = summaries.MetricsLog(self.write_dir)
        if resumed_from is None:  # once per run: a resume or a rerun adds no second session
            metrics = [("train", "loss"), ("eval", "loss"), ("eval", self.metric_name)]
            self.writers.hparams(runinfo.hparams_of(cfg), metrics if experiment else None)
        self._k_tensors: dict[int, tf.Tensor] = {}  # chunk lengths as tensors: one eager op less
        self.checked = model.variables + optimizer.variables  # never checkpointed with NaN/Inf
        self.result = RunResult("completed", step, resumed_from, run_dir)
        self.last_saved = step if resumed_from is not None else None
        self.rollbacks = 0
        self._complete_checked = False
        self.bar = tqdm(
            total=int(cfg.trainer.max_steps),
            initial=step,
            desc="train",
            unit="step",
            disable=None,
            mininterval=0.5,
            dynamic_ncols=True,
        )
        self._window_t0, self._window_steps = time.perf_counter(), 0

    def _new_chunk(self):
        """The train chunk over the data stream from this step (a new one after a rollback)."""
        seed, step = int(self.cfg.trainer.seed), self.step

        def make(i: int, parts: int):  # input pipeline i of `parts` (one per worker)
            self.data.check_parts(parts)
            return self.data.train_dataset(self.batch, seed, step, part=(i, parts))

        return self._chunk_for(iter(self.place.distribute_dataset(make, self.batch)))

    # ------------------------------------------------------------ the loop's events
    def train(self, k: int) -> Chunk:
        """Run the next `k` train steps in one traced call."""
        if k not in self._k_tensors:
            self._k_tensors[k] = tf.constant(k)
        try:
            stats, hashes = self._chunk(self._k_tensors[k])
            rows = stats.numpy()
            return Chunk(rows[0], rows[1], rows[2], rows[3], hashes.numpy(), rows[4:])
        except tf.errors.OpError as e:
            self._data_error(e)
            raise

    def _data_error(self, e: tf.errors.OpError) -> None:
        """A read error names its shard and record (records), or the row and the user's own
        message (a source of data=custom): UserError, exit 2."""
        problem = self.data.diagnose(e) if hasattr(self.data, "diagnose") else None
        if problem is not None:
            raise problem from None

    def record(self, out: Chunk) -> None:
        """Log each step of a good chunk (every log_every-th to metrics.jsonl and TensorBoard,
        with the running window behind the averages) and advance the counters."""
        loop, k, step = self.loop, len(out.losses), self.step
        for i in range(k):
            s = step + i + 1
            loop.window_loss_sum += float(out.losses[i])
            loop.window_metric_sum += float(out.metric[i])
            loop.window_count += 1
            if s % self.log_every == 0:
                now = time.perf_counter()
                rate = (self._window_steps + i + 1) / max(now - self._window_t0, 1e-9)
                record = {
                    "step": s,
                    "loss": float(out.losses[i]),
                    "loss_avg": loop.window_loss_sum / loop.window_count,
                    self.metric_name: loop.window_metric_sum / loop.window_count,
                    "learning_rate": float(out.rates[i]),
                    "grad_norm": float(out.norms[i]),
                    "batch_ids_hash": int(out.ids_hash[i]),
                }
                for j, name in enumerate(self.extra_names):
                    record[name] = float(out.extra[j][i])
                self.metrics.write(record)
                tb = {key: v for key, v in record.items() if key not in _NOT_SCALARS}
                self.writers.scalars(self.writers.train, s, {**tb, "steps_per_sec": rate})
                loop.reset_window()
                self._window_t0, self._window_steps = now, -(i + 1)
                self.bar.set_postfix(
                    loss=f"{out.losses[i]:.4g}", steps_per_s=f"{rate:.1f}", refresh=False
                )
        self._window_steps += k
        self.step = step + k
        precision.sync_iterations(self.state.optimizer, self.step)
        self.result.final_loss = float(out.losses[-1])
        self.bar.update(k)

    def rollback_or_raise(self, bad: int, out: Chunk) -> None:
        """A non-finite loss or gradient at step `bad`: restore the newest good checkpoint and
        continue from `bad` (trainer.on_nonfinite=rollback, at most max_rollbacks times), or
        stop with NonFiniteLoss."""
        tc = self.cfg.trainer
        if tc.on_nonfinite == "rollback" and self.rollbacks < tc.max_rollbacks:
            self.rollbacks += 1
            restored = nonfinite.rollback(self.store, self.state, bad)
            self.metrics.write({"step": bad, "event": "rollback", "restored_step": restored})
            self.bar.update(bad - self.step)
            self.step = bad  # then the eval / save / pause due at `bad`, as usual
            self._chunk = self._new_chunk()
            return
        self.writers.flush()  # the logs up to the failure stay readable
        self.metrics.sync()
        raise NonFiniteLoss(
            f"non-finite loss or gradient at step {bad} (loss={out.losses.tolist()}); nothing "
            f"was saved after step {self.last_saved or 0}. Lower optimizer.learning_rate or "
            "check the data."
        )

    def evaluate(self) -> None:
        """The eval pass at this step: logged, kept as the result's eval, best loss tracked."""
        at, loop = self.step, self.loop
        try:
            eval_loss, eval_metric, extra = self._evaluate(self._eval_ds)
        except tf.errors.OpError as e:
            self._data_error(e)
            raise
        loop.best_eval_loss = min(loop.best_eval_loss, eval_loss)
        values = {"loss": eval_loss, self.metric_name: eval_metric, **extra}
        self.writers.scalars(self.writers.eval, at, values)
        self.metrics.write(
            {"step": at, "split": "eval", **{f"eval_{k}": v for k, v in values.items()}}
        )
        self.result.eval, self.result.eval_step = values, at
        loop.last_eval_step = at
        tqdm.write(f"step {at}: " + "  ".join(f"eval_{k} {v:.5g}" for k, v in values.items()))

    def save(self, at: int | None = None) -> float:
        """A checkpoint of this step: counters and loop state in it, logs synced first,
        refused on NaN/Inf, and (first save of a process) on a variable left out."""
        at = self.step if at is None else at
        if not self._complete_checked:
            check_complete(self.state, at)
            self._complete_checked = True
        writers, last_saved = self.writers, self.last_saved
        blocked = integrity.save(
            self.store,
            at,
            before_write=self._sync_logs,  # async: on the writer's thread
            assign=self.state.assignments(at, at // self.steps_per_epoch),
            check=self.checked,
            on_nonfinite=lambda bad: nonfinite.refuse(bad, at, last_saved),
            # async: queued before the write starts, so the write's sync_logs writes it with
            # the rows before it (sync: after the write, handed to the OS below)
            blocked=lambda s: writers.scalars(writers.train, at, {"checkpoint_save_seconds": s}),
        )
        if self.store.async_writer is None:
            # The row of a checkpoint that now counts must survive a kill, like those before
            # it (resume keeps it and nothing logs it again): to the OS now, not at the next
            # drain (one row: ~5 us measured, against a ~20 ms sync save of the default model).
            writers.drain()
        self.last_saved = at
        return blocked

    def log_save_costs(self, budget) -> None:
        """The measured cost to the loop of every earlier save, and the running overhead, to
        TensorBoard. Called before a save, so that these rows are written with that
        checkpoint: a kill after it cannot lose them. A cost still being measured (its
        write or deletes still running) is final here too: from the next save on, the
        budget charges the slower chunks to that save."""
        done, budget.costs = budget.costs, []
        for step, cost in done:
            self.writers.scalars(
                self.writers.train,
                step,
                {"checkpoint_cost_seconds": cost, "checkpoint_overhead": budget.overhead()},
            )

    def _sync_logs(self) -> None:
        """Logs up to a checkpoint's step are written before it counts: metrics.jsonl fsynced
        to the disk, the TensorBoard rows handed to the OS (not fsynced, like tf.summary's
        writer; a killed process loses none of them). Async: on the writer's thread."""
        self.writers.flush()
        self.metrics.fsync()

    def preempted(self) -> bool:
        """Multi-worker: a SIGTERM to any worker makes all save this step, then stop."""
        save = self.save if self.last_saved != self.step else (lambda at: None)
        if self.place.preempted(save, self.step):
            self.last_saved = self.step
            return True
        return False

    def pause(self, stop) -> None:
        """Testing hook (`trainer.pause_at`): flush, announce `<run>/PAUSED`, wait for a signal."""
        self.store.wait()  # an async save of this step is complete before PAUSED appears
        self.writers.flush()
        self.metrics.sync()
        marker = os.path.join(self.write_dir, "PAUSED")
        with open(marker, "w") as f:
            json.dump({"step": self.step, "pid": os.getpid()}, f)
        while stop.signal_name is None:
            time.sleep(0.01)
        os.remove(marker)

    def export(self) -> None:
        """Both artifacts of a completed run."""
        self.result.exports = export.export_all(
            self.state.model, self.write_dir, self.data.feature_shape, step=self.step
        )

    def close(self) -> None:
        self.writers.close()
        self.metrics.close()
        self.place.cleanup()
