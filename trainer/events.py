"""How each event of the fit loop happens on a run's parts (the mechanics): train a chunk,
record it, evaluate, save, roll back, pause, export, close. The parts are set up by
trainer/session.py (Session, which is a LoopEvents); when each event happens is
trainer/loop.py's business.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from trainer import nonfinite
from trainer.checkpoint import export, integrity
from trainer.distribute import precision
from trainer.nonfinite import NonFiniteLoss
from trainer.restore import (
    check_complete,
)

_NOT_SCALARS = ("step", "batch_ids_hash")  # metrics.jsonl only (a float32 scalar would round it)


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


class LoopEvents:
    """The loop's events, as methods of an opened Session (trainer/session.py)."""

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
        if self.uploader is not None:  # checkpoint.remote: how far the store is behind
            steps, seconds = self.uploader.lag(at)
            lag = {"remote_lag_steps": steps, "remote_lag_seconds": seconds}
            writers.scalars(writers.train, at, lag)
            self.metrics.write({"step": at, **lag})
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
        exports = export.export_all(
            self.state.model, self.write_dir, self.data.feature_shape, step=self.step
        )
        self.result.exports = self.place.in_run_dir(exports)

    def close(self) -> None:
        self.writers.close()
        self.metrics.close()
        self.place.cleanup()
