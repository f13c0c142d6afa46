"""Graceful stops: SIGTERM / SIGINT ask the loop to finish its step, save and exit (code 3).

A second SIGINT aborts at once (exit 130) without saving: the last checkpoint stays.

In a sweep (trainer/sweep/jobs.py), `SweepSignals` covers the time between jobs in every process
that runs them: a stop asked for there is kept as pending, so no further job starts and a
job still setting up stops (and saves) as soon as its loop begins; a stop that comes while
a job's loop runs is kept as pending too (the job may be finishing anyway). The process
that started the sweep writes the sweep's stop file (a job checks it before it starts: one
whose process never saw the signal does not start either) and forwards the signal as
SIGTERM to its children that catch SIGTERM (the joblib launcher's workers running a job,
or between jobs). A worker that has not started its first job yet holds both signals
blocked (trainer/sweep/joblib_workers.py) until `SweepSignals.install` unblocks them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import sys

_pending: list[str] = []  # signals that asked a sweep to stop while no StopRequest was active
_STOPS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A SIGTERM outside the training loop (start-up, export), raised as Ctrl-C's
    KeyboardInterrupt is, so that both end a run the same way (trainer/app.py)."""

    def __init__(self, name: str = "SIGTERM"):
        super().__init__(name)
        self.signal_name = name


def interrupt_outside_the_loop() -> None:
    """A single run: SIGTERM and SIGINT raise `Interrupted` (a KeyboardInterrupt) until the
    loop's StopRequest takes over (and again after it). The signal is also kept as pending:
    raised inside code that swallows it (TensorFlow turning it into a SystemError that a
    caller's `except Exception` catches, seen in a trace during start-up; a user's bare
    `except:`), the run would otherwise train on as if it had never come. The loop's
    StopRequest finds it pending and stops at once, with a checkpoint."""

    def handle(signum, frame):
        name = signal.Signals(signum).name
        mark_pending(name)
        raise Interrupted(name)

    for sig in _STOPS:
        signal.signal(sig, handle)


def ignore_stops() -> None:
    """SIGINT and SIGTERM ignored from now on: a single run's outcome is decided (trainer/app.py,
    `last_in_process`) and the process is about to exit with it (trainer/__main__.py)."""
    for sig in _STOPS:
        signal.signal(sig, signal.SIG_IGN)


def interrupted_by(e: KeyboardInterrupt) -> str:
    return getattr(e, "signal_name", "SIGINT")


class StopRequest:
    """Installs the handlers while active; `.signal_name` is set once a stop was asked for."""

    def __init__(self, newest=None):
        """`newest()`: the step of the run's newest committed checkpoint, or None (what the
        second SIGINT's message says)."""
        self.signal_name: str | None = None  # the first signal (a sweep forwards SIGTERM)
        self._sigint = False
        self._previous = {}
        self._newest = newest or (lambda: None)
        self.saving_step: int | None = None  # the stop's checkpoint, once the loop has ended

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self._sigint and name == "SIGINT":
            sys.stderr.write(self._abort_message())
            sys.stderr.flush()
            SweepSignals.abort_children()
            os._exit(130)
        self._sigint = self._sigint or name == "SIGINT"
        self.signal_name = self.signal_name or name
        SweepSignals.note(name)  # in a sweep: no further job starts, whatever this job does
        sys.stderr.write(f"\n{name} received: finishing this step, then saving a checkpoint.\n")
        sys.stderr.flush()

    def _abort_message(self) -> str:
        """True whenever it comes: the stop's own checkpoint may have committed already."""
        newest = self._newest()
        if newest is not None and newest == self.saving_step:
            return (
                f"\nSecond SIGINT: exiting now; the stop's checkpoint (step {newest}) is saved.\n"
            )
        where = f"step {newest}" if newest is not None else "none yet"
        return f"\nSecond SIGINT: aborting now without saving (the newest checkpoint: {where}).\n"

    def __enter__(self) -> StopRequest:
        for sig in _STOPS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if _pending:  # asked for before this run's loop began (a sweep's job setting up, or
            self.signal_name = _pending[0]  # a single run's start-up that swallowed it)
            self._sigint = self.signal_name == "SIGINT"  # (a second one aborts)
            if SweepSignals._installed_in != os.getpid():
                sys.stderr.write(
                    f"\n{self.signal_name} received while starting: saving a checkpoint, then "
                    "stopping.\n"
                )
                sys.stderr.flush()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def pending() -> str | None:
    """The signal that asked the sweep to stop, if one did (SweepSignals, StopRequest)."""
    return _pending[0] if _pending else None


def mark_pending(name: str) -> None:
    """Remember that the sweep was asked to stop (a job returned interrupted)."""
    if name not in _pending:
        _pending.append(name)


@contextlib.contextmanager
def blocked():
    """SIGINT and SIGTERM blocked in the calling thread (and in what it spawns) meanwhile: a
    signal that arrives is held, not lost, and delivered when they are unblocked."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _children(mask_field: str, sig: signal.Signals) -> list[int]:
    """This process's child processes whose `mask_field` in /proc/<pid>/status (SigCgt: the
    signals it catches, SigBlk: those it blocks) holds `sig` (Linux /proc; none elsewhere)."""
    pids: list[int] = []
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            with open(path) as f:
                pids += [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            continue
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields[mask_field].strip(), 16) >> (int(sig) - 1) & 1:
                out.append(pid)
        except (OSError, ValueError, KeyError):
            continue  # gone meanwhile
    return out


class SweepInterrupted(BaseException):
    """Ends a sweep that a signal stopped, in the process that started it: once a job of its
    own was stopped (the basic launcher), or after a batch of the joblib launcher's jobs
    (trainer/sweep/joblib_workers.py). Past Hydra's per-job `except Exception` and the sweeper, so
    that no further job starts nor is asked for (`main` reports the sweep and exits 3)."""


class SweepSignals:
    """SIGTERM / SIGINT handlers for the whole of a sweep, installed once per process."""

    _installed_in: int | None = None
    _stop_file: str | None = None  # in the process that started the sweep

    @classmethod
    def install(cls, stop_file: str | None = None) -> None:
        """Install the handlers in this process, then unblock both signals (a joblib worker
        starts with them blocked: one that arrived before is handled now). `stop_file`: the
        sweep's stop file, written at the first signal (the sweep's own process)."""
        if stop_file is not None:
            cls._stop_file = stop_file
        if cls._installed_in == os.getpid():
            return
        cls._installed_in = os.getpid()
        for sig in _STOPS:
            signal.signal(sig, cls._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)

    @classmethod
    def note(cls, name: str) -> bool:
        """In a sweep's process: remember the stop (and write the stop file, once). Returns
        whether it is the sweep's first."""
        if cls._installed_in != os.getpid():
            return False  # a single run
        first = not _pending
        mark_pending(name)
        if first and cls._stop_file is not None:
            try:
                with open(cls._stop_file, "w") as f:
                    f.write(name + "\n")
            except OSError as e:  # the forwarded signal still reaches the running jobs
                sys.stderr.write(
                    f"warning: could not write the stop file {cls._stop_file} ({e.strerror}): "
                    "a joblib worker that has not started its job yet does not see the stop\n"
                )
        return first

    @classmethod
    def abort_children(cls) -> None:
        """A second SIGINT: the children that hold SIGINT blocked (a joblib worker before its
        first job) would not see it; end them with the sweep."""
        if cls._installed_in == os.getpid():
            for pid in _children("SigBlk", signal.SIGINT):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    @staticmethod
    def _handle(signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and "SIGINT" in _pending:
            sys.stderr.write("\nSecond SIGINT: aborting the sweep now without saving.\n")
            sys.stderr.flush()
            SweepSignals.abort_children()
            os._exit(130)
        if SweepSignals.note(name):
            sys.stderr.write(
                f"\n{name} received: running jobs save a checkpoint; no further job starts.\n"
            )
            sys.stderr.flush()
        # joblib's workers that catch SIGTERM (those running a job, or between jobs); not its
        # resource trackers (they ignore it) nor a worker before its first job (it blocks it:
        # it reads the stop file when its job starts)
        for pid in _children("SigCgt", signal.SIGTERM):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
