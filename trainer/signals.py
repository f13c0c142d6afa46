"""Graceful stops: SIGTERM / SIGINT ask the loop to finish its step, save and exit (code 3).

A second SIGINT aborts at once (exit 130) without saving: the last checkpoint stays.

In a sweep (trainer/sweep.py), `SweepSignals` covers the time between jobs in every process
that runs them: a stop asked for there is kept as pending, so no further job starts and a
job still setting up stops (and saves) as soon as its loop begins; the process that started
the sweep forwards it to its children (the joblib launcher's workers) as SIGTERM.
"""

from __future__ import annotations

import glob
import os
import signal
import sys

_pending: list[str] = []  # signals that asked a sweep to stop while no StopRequest was active


class StopRequest:
    """Installs the handlers while active; `.signal_name` is set once a stop was asked for."""

    def __init__(self):
        self.signal_name: str | None = None  # the first signal (a sweep forwards SIGTERM)
        self._sigint = False
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self._sigint and name == "SIGINT":
            sys.stderr.write("\nSecond SIGINT: aborting now without saving.\n")
            sys.stderr.flush()
            os._exit(130)
        self._sigint = self._sigint or name == "SIGINT"
        self.signal_name = self.signal_name or name
        sys.stderr.write(f"\n{name} received: finishing this step, then saving a checkpoint.\n")
        sys.stderr.flush()

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        if _pending:  # asked for before this run's loop began (a sweep's job setting up)
            self.signal_name = _pending[0]
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


def _children() -> list[int]:
    """This process's child processes (Linux /proc; none elsewhere)."""
    pids: list[int] = []
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            with open(path) as f:
                pids += [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            continue
    return pids


class SweepSignals:
    """SIGTERM / SIGINT handlers for the whole of a sweep, installed once per process."""

    _installed_in: int | None = None

    @classmethod
    def install(cls) -> None:
        if cls._installed_in == os.getpid():
            return
        cls._installed_in = os.getpid()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, cls._handle)

    @staticmethod
    def _handle(signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and "SIGINT" in _pending:
            sys.stderr.write("\nSecond SIGINT: aborting the sweep now without saving.\n")
            sys.stderr.flush()
            os._exit(130)
        first = not _pending
        mark_pending(name)
        if first:
            sys.stderr.write(
                f"\n{name} received: running jobs save a checkpoint; no further job starts.\n"
            )
            sys.stderr.flush()
        for pid in _children():  # joblib's workers (its resource tracker ignores SIGTERM)
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                continue
