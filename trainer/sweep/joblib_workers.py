"""The joblib launcher (`hydra/launcher=joblib`, hydra-joblib-launcher) made to stop cleanly.

The launcher runs a batch of jobs in joblib's loky worker processes (it names the backend,
`loky`). A worker that dies of a signal breaks the whole pool: joblib then kills every
worker, running jobs included, before they save, and raises TerminatedWorkerError. A worker
that has not started its first job yet (or never gets one: `n_jobs` above the number of
jobs) has no handler of ours: Ctrl-C, which a terminal sends to every process of the sweep,
would end it. In the process that started the sweep, `install` registers under the name
`loky` a loky backend that:
- starts every worker with SIGINT and SIGTERM blocked (`signals.blocked` while it submits:
  the workers, and the thread that replaces a lost one, inherit the mask). A signal stays
  pending in the worker until its first job installs the sweep's handlers and unblocks them
  (`signals.SweepSignals.install`): then it is handled, and that job does not start;
- ends the sweep (`signals.SweepInterrupted`) after a batch in which the sweep was asked to stop,
  and before a new batch. The Optuna sweeper then asks for no further trial and not for the
  study's best trial (which raises when none completed); the trials of that batch stay
  RUNNING in the study and the rerun asks them again (trainer/sweep/optuna_study.py).
"""

from __future__ import annotations

import contextlib
from multiprocessing import resource_tracker

from joblib import register_parallel_backend
from joblib.parallel import LokyBackend

from trainer import signals
from trainer.signals import SweepInterrupted


def _stop_if_asked() -> None:

    stop = signals.pending()
    if stop is not None:
        raise SweepInterrupted(stop)


class SweepLokyBackend(LokyBackend):
    """joblib's loky backend for a sweep's jobs (module docstring)."""

    def configure(self, *args, **kwargs):
        _stop_if_asked()  # a new batch (the Optuna sweeper's next trials)
        return super().configure(*args, **kwargs)

    def submit(self, func, callback=None):
        # Python's own resource tracker, which every worker's start makes sure of, unblocks
        # both signals after starting (3.11): started first, it leaves the mask alone.
        resource_tracker.ensure_running()
        with signals.blocked():  # the first submit starts the workers
            return super().submit(func, callback=callback)

    @contextlib.contextmanager
    def retrieval_context(self):
        with super().retrieval_context():
            yield
        self._batch_done = True
        _stop_if_asked()  # every job of the batch has returned

    def abort_everything(self, ensure_ready=True):
        """joblib's answer to the exception above would kill the workers (SIGKILL): they are
        idle, every job has returned. Leave them to shut down with the process, as usual."""
        if not getattr(self, "_batch_done", False):
            super().abort_everything(ensure_ready=ensure_ready)


def install() -> None:
    """Use SweepLokyBackend for the launcher's `loky` in this process."""
    register_parallel_backend("loky", SweepLokyBackend)
