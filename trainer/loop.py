"""The fit loop: what happens at each step, eval, save and signal, on one page.

The policy (when to evaluate, save, pause or stop) is `Cadence`; the mechanics (how a chunk
is trained, logged, saved...) are `Session`'s methods (trainer/session.py); the traced train
and eval steps are trainer/steps.py; restore-or-initialize is trainer/restore.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from trainer import nonfinite
from trainer.config import validate
from trainer.nonfinite import NonFiniteLoss
from trainer.session import RunResult, Session
from trainer.signals import StopRequest

__all__ = ["NonFiniteLoss", "RunResult", "fit"]


@dataclass(frozen=True)
class Cadence:
    """When things happen, in steps. Plain ints: an OmegaConf read costs ~25 us (profiled)."""

    max_steps: int  # the run is complete here: final eval, final save, export
    end: int  # where this process stops training (trainer.stop_at, else max_steps)
    per_call: int  # trainer.steps_per_execution: steps per traced call
    eval_every: int
    save_every: int
    pause_at: int  # 0: never (a testing hook)

    @classmethod
    def of(cls, cfg: DictConfig) -> Cadence:
        tc = cfg.trainer
        return cls(
            max_steps=int(tc.max_steps),
            end=int(tc.stop_at or tc.max_steps),
            per_call=int(tc.steps_per_execution),
            eval_every=int(tc.eval_every),
            save_every=int(cfg.checkpoint.every),
            pause_at=int(tc.pause_at or 0),
        )

    def chunk(self, step: int) -> int:
        """Steps in the next call: up to per_call, ending at the next save, eval, pause or the
        end, so that steps_per_execution never moves them."""
        k = min(
            self.per_call,
            self.end - step,
            self.save_every - step % self.save_every,
            self.eval_every - step % self.eval_every,
        )
        return min(k, self.pause_at - step) if self.pause_at and step < self.pause_at else k

    def eval_due(self, prev: int, step: int) -> bool:
        """An eval every eval_every steps; the final step's eval comes at the end."""
        return step // self.eval_every > prev // self.eval_every and step < self.max_steps

    def save_due(self, prev: int, step: int) -> bool:
        """A checkpoint every save_every steps; the final step's after its final eval."""
        return step // self.save_every > prev // self.save_every and step != self.max_steps

    def pause_due(self, step: int) -> bool:
        return bool(self.pause_at) and step == self.pause_at


def fit(cfg: DictConfig, run_dir: str) -> RunResult:
    """Train per `cfg` in `run_dir` (resuming if it holds checkpoints); return what happened."""
    validate(cfg)
    run = Session.open(cfg, run_dir)  # restore-or-initialize: trainer/restore.py
    if isinstance(run, RunResult):  # a rerun of a completed run: nothing to train
        return run
    cadence = Cadence.of(cfg)
    with StopRequest() as stop, run.store.pending_writes():  # exit waits for an async write
        run.place.watch_preemption()  # multi-worker: SIGTERM anywhere -> all save, then stop
        while run.step < cadence.end and stop.signal_name is None:
            prev = run.step
            out = run.train(cadence.chunk(prev))
            bad = nonfinite.first_bad_step(prev, out.losses, out.norms)
            if bad is None:
                run.record(out)  # log each step, advance the counters
            else:
                run.rollback_or_raise(bad, out)  # back to the last checkpoint, or stop
            if cadence.eval_due(prev, run.step):
                run.evaluate()
            if cadence.save_due(prev, run.step):
                run.save()
            if run.preempted():
                stop.signal_name = "SIGTERM (preemption)"
            if cadence.pause_due(run.step):
                run.pause(stop)
        run.bar.close()
        result = run.result
        result.step = run.step
        if stop.signal_name is not None:
            result.status, result.signal_name = "interrupted", stop.signal_name
        elif run.step < cadence.max_steps:
            result.status = "stopped"
        if run.step == cadence.max_steps and run.loop.last_eval_step != run.step:
            run.evaluate()  # once, also if interrupted in the last chunk
        if run.last_saved != run.step:
            run.save()  # after the final eval, so the checkpoint includes it
    if result.status == "completed":
        run.export()
    run.close()
    return result
