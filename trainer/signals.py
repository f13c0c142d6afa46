"""Graceful stops: SIGTERM / SIGINT ask the loop to finish its step, save and exit (code 3).

A second SIGINT aborts at once (exit 130) without saving: the last checkpoint stays.
"""

from __future__ import annotations

import os
import signal
import sys


class StopRequest:
    """Installs the handlers while active; `.signal_name` is set once a stop was asked for."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name == "SIGINT" and name == "SIGINT":
            sys.stderr.write("\nSecond SIGINT: aborting now without saving.\n")
            sys.stderr.flush()
            os._exit(130)
        self.signal_name = name
        sys.stderr.write(f"\n{name} received: finishing this step, then saving a checkpoint.\n")
        sys.stderr.flush()

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
