"""Each sweep job's record on disk (`<sweep>/.sweep/jobs/`): written atomically as the job
ends, read back by the report (an unreadable one is a failed row, never dropped), and the
sweep's invocation and stop files. Without TensorFlow."""

from __future__ import annotations

import glob
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field

from trainer.checkpoint.files import write_text_atomic

JOBS_DIR = os.path.join(".sweep", "jobs")


INVOCATION_FILE = os.path.join(".sweep", "invocation")


# Written at the sweep's first SIGTERM / SIGINT (signals.SweepSignals); a job that finds it
# does not start. Removed when an invocation starts.
STOP_FILE = os.path.join(".sweep", "stop")


_STATUSES = (
    "completed",
    "resumed",
    "already_complete",
    "stopped",
    "interrupted",
    "failed",
    "not_started",
)


@dataclass
class Record:
    """One job: who it is, how it ended (`status`) and its final metrics."""

    num: int
    overrides: list[str]
    dir: str  # relative to the sweep directory
    max_steps: int
    status: str = "not_started"  # one of _STATUSES
    exit_code: int | None = 0  # None: not known (its record could not be read)
    step: int | None = None
    resumed_from: int | None = None
    train_loss: float | None = None
    eval: dict = field(default_factory=dict)
    error: str | None = None
    signal: str | None = None
    seconds: float = 0.0
    hparams: dict = field(default_factory=dict)
    invocation: str = ""  # which run of the sweep command wrote this record

    def describe(self, current: str | None = None) -> str:
        """The status column: what happened to this job (in an earlier invocation if its
        record is not `current`'s)."""
        text = {
            "completed": "completed",
            "resumed": f"resumed from step {self.resumed_from}, completed",
            "already_complete": "already complete (skipped)",
            "stopped": f"stopped at step {self.step} (trainer.stop_at)",
            "interrupted": f"interrupted by {self.signal} at step {self.step}, checkpoint saved",
            "failed": f"failed (exit {self.exit_code}): {self.error}"
            if self.exit_code is not None
            else f"failed: {self.error}",
            "not_started": "not started (the sweep was stopped)",
        }[self.status]
        return text if current is None or self.invocation == current else f"earlier: {text}"


def start(sweep_dir: str) -> list[Record]:
    """Begin an invocation of the sweep; return the records of the earlier ones."""
    os.makedirs(os.path.join(sweep_dir, JOBS_DIR), exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}"
    write_text_atomic(os.path.join(sweep_dir, INVOCATION_FILE), stamp)
    try:
        os.remove(os.path.join(sweep_dir, STOP_FILE))  # the previous invocation's stop
    except FileNotFoundError:
        pass
    return read_records(sweep_dir)


def stop_requested(sweep_dir: str) -> str | None:
    """The signal that stopped this invocation of the sweep, if one did (its stop file)."""
    try:
        with open(os.path.join(sweep_dir, STOP_FILE)) as f:
            return f.read().strip() or "SIGTERM"
    except OSError:
        return None


def invocation(sweep_dir: str) -> str:
    try:
        with open(os.path.join(sweep_dir, INVOCATION_FILE)) as f:
            return f.read().strip()
    except OSError:
        return ""


def save_record(sweep_dir: str, record: Record) -> None:
    """Write a job's record (any process; one file per job directory, the latest wins)."""
    record.invocation = invocation(sweep_dir)
    name = record.dir.replace("%", "%25").replace(os.sep, "%2F")
    path = os.path.join(sweep_dir, JOBS_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text_atomic(path, json.dumps(asdict(record)))


def read_records(sweep_dir: str) -> list[Record]:
    """Every job's record. One that cannot be read is a failed job of this invocation, named
    by its file and the error: it is in the table and the exit code, never left out."""
    out = []
    for path in glob.glob(os.path.join(glob.escape(sweep_dir), JOBS_DIR, "*.json")):
        try:
            with open(path) as f:
                out.append(_checked(Record(**json.load(f))))
        except (OSError, ValueError, TypeError) as e:
            out.append(_unreadable(sweep_dir, path, e))
    return sorted(out, key=lambda r: (r.invocation, r.num))


def _checked(record: Record) -> Record:
    """`record` if the table can show it; ValueError for a field of the wrong kind."""
    if record.status not in _STATUSES:
        raise ValueError(f"status {record.status!r}")
    if not isinstance(record.num, int) or not isinstance(record.invocation, str):
        raise ValueError(f"num {record.num!r}, invocation {record.invocation!r}")
    return record


def _unreadable(sweep_dir: str, path: str, error: Exception) -> Record:
    """The row of a job whose record cannot be read (its directory from the file's name)."""
    name = os.path.basename(path).removesuffix(".json")  # save_record's name, decoded
    job = re.sub("%2F|%25", lambda m: os.sep if m.group() == "%2F" else "%", name)
    reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return Record(
        num=-1,
        overrides=[],
        dir=job,
        max_steps=0,
        status="failed",
        exit_code=None,
        error=f"its record {path} cannot be read ({reason}); rerun the job, or remove the file",
        invocation=invocation(sweep_dir),
    )
