"""The fit loop: what happens at each step, eval, save and signal, on one page.

The policy (when to evaluate, save, pause or stop) is `Cadence`; the mechanics (how a chunk
is trained, logged, saved...) are `Session`'s methods (trainer/session.py); the traced train
and eval steps are trainer/steps.py; restore-or-initialize is trainer/restore.py.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field

from omegaconf import DictConfig

from trainer import nonfinite
from trainer.config import validate
from trainer.nonfinite import NonFiniteLoss
from trainer.session import RunResult, Session, finish_remote
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
    cut_at_saves: bool = True  # False under checkpoint.max_overhead: saves land on chunk ends

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
            cut_at_saves=cfg.checkpoint.get("max_overhead") is None,
        )

    def chunk(self, step: int) -> int:
        """Steps in the next call: up to per_call, ending at the next save, eval, pause or the
        end, so that steps_per_execution never moves them."""
        k = min(self.per_call, self.end - step, self.eval_every - step % self.eval_every)
        if self.cut_at_saves:
            k = min(k, self.save_every - step % self.save_every)
        return min(k, self.pause_at - step) if self.pause_at and step < self.pause_at else k

    def eval_due(self, prev: int, step: int) -> bool:
        """An eval every eval_every steps; the final step's eval comes at the end."""
        return step // self.eval_every > prev // self.eval_every and step < self.max_steps

    def save_due(self, prev: int, step: int) -> bool:
        """A checkpoint every save_every steps; the final step's after its final eval."""
        return step // self.save_every > prev // self.save_every and step != self.max_steps

    def pause_due(self, step: int) -> bool:
        return bool(self.pause_at) and step == self.pause_at


RECENT_COSTS = 4  # the budget spaces saves by the largest of this many last measured costs


@dataclass
class SaveBudget:
    """Saves by time and within a budget, beyond the step cadence (CheckFreq, FAST'21):
    `checkpoint.every_seconds` makes a save due once that much training time has passed since
    the last one; `checkpoint.max_overhead` then holds a due save back until the time since
    the last one is at least cost / max_overhead, so saves cost the loop at most that fraction
    of its time.

    The cost of a save is what the loop lost to it: the time the save call blocked, plus how
    much longer than usual every chunk took while the save's background work (an async write,
    retention's deletes) was still running, and the chunk after it (the writer competing for
    the CPU and memory, copy-on-write of updated variables). A save's cost is known once that
    work is done; until then no other save is due under a budget. Saves are spaced by the
    largest of the last RECENT_COSTS costs, not the last one alone: costs vary from save to
    save (0.015-0.029 s for the default model's sync saves, measured), and spacing by a low one
    would overspend. The first save of a process also pays one-time work (tracing the save,
    checking that the checkpoint is complete: 0.26 s against 0.02 s for the next ones, default
    model): it counts in the overhead but does not space the next save."""

    every_seconds: float | None
    max_overhead: float | None
    clock: object = time.perf_counter
    busy: object = bool  # busy(): is a save's background work still running? (the store's)
    start: float = 0.0
    last: float = 0.0  # when the last save ended
    cost: float = 0.0  # what spaces the next save: the largest recent cost, seconds
    total: float = 0.0  # every save's cost, seconds
    step_seconds: float | None = None  # a chunk's usual time per step (running estimate)
    pending: bool = False  # the last save's cost is still being measured
    blocked: float = 0.0  # the last save's blocking time
    excess: float = 0.0  # the last save's chunk excess so far
    owed: bool = False  # a step-based save the budget held back: due until it happens
    saves: int = 0
    chunks: int = 0
    recent: list = field(default_factory=list)  # the last RECENT_COSTS costs (not the first's)
    costs: list = field(default_factory=list)  # (step, cost) measured, not yet logged

    @classmethod
    def of(cls, cfg: DictConfig, busy=bool) -> SaveBudget:
        if cfg.distribute.name == "multi_worker":  # collective saves: every worker must agree
            budget = cls(None, None)  # so steps alone decide (README, Limits)
        else:
            budget = cls(
                cfg.checkpoint.get("every_seconds"), cfg.checkpoint.get("max_overhead"), busy=busy
            )
        budget.start = budget.last = budget.clock()
        return budget

    def due(self, by_steps: bool) -> bool:
        since = self.clock() - self.last
        self.owed = self.owed or by_steps
        want = self.owed or (self.every_seconds is not None and since >= self.every_seconds)
        if want and self.max_overhead is not None:
            want = not self.pending and since * self.max_overhead >= self.cost
        return want

    def saved(self, step: int, blocked: float) -> None:
        self.saves += 1
        self.owed = False
        self.blocked, self.excess = blocked, 0.0
        self.last, self.pending = self.clock(), True
        self.total += blocked
        self.costs.append([step, blocked])

    def chunk_took(self, seconds: float, steps: int) -> None:
        """Learn a chunk's usual time per step; charge the excess of the chunks that ran while
        a save's background work did, and of the one after, to that save."""
        if self.pending:
            if self.step_seconds is not None:
                excess = max(0.0, seconds - steps * self.step_seconds)
                self.excess += excess
                self.total += excess
                self.costs[-1][1] += excess
            if not self.busy():  # its work ended during this chunk: the cost is known
                self._settle()
        elif self.chunks > 0:  # (the first chunk traces: not usual)
            per_step = seconds / steps
            self.step_seconds = (
                per_step if self.step_seconds is None else 0.9 * self.step_seconds + 0.1 * per_step
            )
        self.chunks += 1

    def _settle(self) -> None:
        self.pending = False
        if self.saves > 1:  # (the first: one-time work, see above)
            self.recent = [*self.recent, self.blocked + self.excess][-RECENT_COSTS:]
        self.cost = max(self.recent, default=0.0)

    def overhead(self) -> float:
        """The fraction of the loop's time so far that went to saves."""
        return self.total / max(self.clock() - self.start, 1e-9)


@contextlib.contextmanager
def _startup_objects_frozen():
    """The objects alive when the loop starts (TensorFlow's, Keras', the run's: several
    hundred thousand) kept out of Python's garbage collector while it runs (gc.freeze). A
    full collection, which the garbage of sync saves triggers now and then, scanned them
    all: 150-190 ms each, a stall of the loop (measured under checkpoint.max_overhead,
    BENCHMARKS.md, session 13). Unfrozen when the loop ends, so that a process that goes on
    (a sweep's next job) collects them again."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _newest_checkpoint(run: Session) -> int | None:
    """The step of the run's newest committed checkpoint (this run's, or the one it resumed)."""
    step = run.store.committed_step
    return step if step is not None else run.result.resumed_from


def fit(cfg: DictConfig, run_dir: str, experiment: bool = True) -> RunResult:
    """Train per `cfg` in `run_dir` (resuming if it holds checkpoints); return what happened.
    `experiment`: a fresh run declares its HPARAMS experiment (False: a sweep's job)."""
    validate(cfg)
    run = Session.open(cfg, run_dir, experiment)  # restore-or-initialize: trainer/restore.py
    if isinstance(run, RunResult):  # a rerun of a completed run: nothing to train
        return run
    cadence, budget = Cadence.of(cfg), SaveBudget.of(cfg, busy=run.store.busy)
    try:
        # (the exit waits for an async write)
        with (
            StopRequest(lambda: _newest_checkpoint(run)) as stop,
            run.store.pending_writes(),
            _startup_objects_frozen(),
        ):
            run.place.watch_preemption()  # multi-worker: SIGTERM anywhere -> all save, then stop
            while run.step < cadence.end and stop.signal_name is None:
                prev = run.step
                t0 = budget.clock()
                out = run.train(cadence.chunk(prev))
                budget.chunk_took(budget.clock() - t0, len(out.losses))
                bad = nonfinite.first_bad_step(prev, out.losses, out.norms)
                if bad is None:
                    run.record(out)  # log each step, advance the counters
                else:
                    run.rollback_or_raise(bad, out)  # back to the last checkpoint, or stop
                if cadence.eval_due(prev, run.step):
                    run.evaluate()
                # (never at max_steps: the final save follows the final eval, below)
                if run.step != cadence.max_steps and budget.due(cadence.save_due(prev, run.step)):
                    run.log_save_costs(budget)  # the earlier saves': written with this one
                    budget.saved(run.step, run.save())
                if run.preempted():
                    stop.signal_name = "SIGTERM (preemption)"
                if cadence.pause_due(run.step):
                    run.pause(stop)
            stop.saving_step = run.step  # (what a second SIGINT's line says is saved, or not)
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
                run.log_save_costs(budget)
                run.save()  # after the final eval, so the checkpoint includes it
        if result.status == "completed":
            run.export()
    except BaseException:  # a failed run (a sweep's job) still closes its writers, log file
        if run.uploader is not None:  # stopped first: the next run uploads what is missing
            run.uploader.close()
        with contextlib.suppress(Exception):  # and temp dirs; the original error is raised
            run.close()
        raise
    run.close()
    if run.uploader is not None:  # checkpoint.remote: the end of the run waits for the upload
        finish_remote(run.uploader, cfg, result)
    return result
