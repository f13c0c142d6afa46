"""`<run>/train.log` holds what the run printed: its summary, warnings, errors and the
command that resumes it (Hydra's own job log goes to the same file).

`TeeToLog` copies every complete line written to stdout and stderr during a run into the
log, except a terminal progress bar's redrawn lines (those holding a carriage return).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys


class _Tee:
    def __init__(self, stream, log):
        self._stream, self._log, self._pending = stream, log, ""
        self.on = True
        self.failed = False  # a write to the log failed (warned once)

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        if not self.on:
            return n
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        kept = [line for line in lines if "\r" not in line]
        if kept:
            try:  # unbuffered: a write the disk refused leaves nothing to write twice
                self._log.write(("\n".join(kept) + "\n").encode(errors="replace"))
            except OSError as e:  # the terminal still has the lines: say so there, go on
                if not self.failed:
                    self._stream.write(
                        f"warning: could not write {self._log.name} ({e.strerror}); lines are "
                        "missing from it, the next ones are tried again\n"
                    )
                self.failed = True
        return n

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding...: the terminal's
        return getattr(self._stream, name)


def is_writer() -> bool:
    """False on a multi-worker run's other workers (only the chief writes run files: the
    task 'chief', or worker 0 in a cluster without one)."""
    spec = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = spec.get("task") or {}
    if not task:
        return True
    if "chief" in (spec.get("cluster") or {}):
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


class RunLog:
    """The copy into train.log of one run; `undo()` takes back what it wrote (a run that
    changed nothing: refused, or already complete, leaves its directory byte for byte)."""

    def __init__(self, log=None, tees=()):
        self._log, self._tees = log, tees
        self._start = log.tell() if log is not None else 0
        self._watched: tuple[str, tuple | None] | None = None

    def watch(self, path: str) -> None:
        """`undo()` does nothing once `path` (metrics.jsonl) has changed: the run trained,
        and what it printed stays in the log (a bad row, a full disk...)."""
        self._watched = (path, _stamp(path))

    def undo(self) -> None:
        if self._watched is not None and _stamp(self._watched[0]) != self._watched[1]:
            return
        for tee in self._tees:
            tee.on = False
        if self._log is not None:
            self._log.truncate(self._start)


@contextlib.contextmanager
def tee_to_log(run_dir: str):
    """Copy stdout and stderr into `<run_dir>/train.log` meanwhile (if this process writes);
    yields the RunLog."""
    if not is_writer():
        yield RunLog()
        return
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "train.log"), "ab", buffering=0) as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield RunLog(log, (sys.stdout, sys.stderr))
        finally:
            sys.stdout, sys.stderr = out, err


def _stamp(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
