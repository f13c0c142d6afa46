"""`verify.interrupt=chaos`: SIGKILLs at random moments of a real run, each followed by a resume.

Not at a pause point of ours: each kill waits until the run trains, waits a random time
(`verify.seed` draws it), then fires at the next moment of its kind, observed from the outside
in the run directory:
- mid-chunk: right away (the loop is almost always inside a chunk of train steps);
- checkpoint-write: as soon as a checkpoint is being written (TensorFlow's `ckpt-N_temp/`
  directory exists, or `ckpt-N.index` has no manifest yet), sync or async;
- log-flush: as soon as `metrics.jsonl` grows (a log write has just reached the file).
After each kill the report records what the run directory showed: a half-written checkpoint
left behind proves the kill landed mid-write. The same command then resumes the run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import asdict, dataclass

KINDS = ("mid-chunk", "checkpoint-write", "log-flush")
_POLL = 0.0005  # seconds between looks at the run directory while a moment is awaited


@dataclass
class Kill:
    kind: str
    delay: float  # seconds of training before the moment was awaited
    landed: str  # what the run directory showed right after the kill
    last_logged_step: int | None
    newest_checkpoint: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def plan(kills: int, seed: int) -> list[str]:
    """The kind of each kill: every kind once per round of three, shuffled by `seed`."""
    rng = random.Random(seed)
    kinds: list[str] = []
    while len(kinds) < kills:
        round_ = list(KINDS)
        rng.shuffle(round_)
        kinds += round_
    return kinds[:kills]


def last_logged_step(run_dir: str) -> int | None:
    """The step of the last complete train record in `<run>/metrics.jsonl`."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = f.read().split(b"\n")[:-1]  # the part after the last newline may be torn
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            return int(record["step"])
    return None


def writing_checkpoint(ckpt_dir: str) -> str | None:
    """A checkpoint being written in `ckpt_dir` (its name), or None."""
    try:
        names = os.listdir(ckpt_dir)
    except OSError:
        return None
    for name in names:
        if name.endswith("_temp"):
            return name
    for name in names:
        if name.endswith(".index") and name[: -len(".index")] + ".manifest.json" not in names:
            return name
    return None


def _has_checkpoint(run_dir: str) -> bool:
    """A checkpoint with a manifest whose files have their sizes: polled every 2 ms, so it
    does not read the tensors back (the report's newest checkpoint is verified in full)."""
    from trainer.checkpoint.manifest import list_checkpoints, verify

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    return any(verify(p, hashes=False).ok for p in reversed(list_checkpoints(ckpt_dir)))


def _said(log: str, lines: tuple[str, ...]) -> bool:
    try:
        with open(log, errors="replace") as f:
            text = f.read()
    except OSError:
        return False
    return any(line in text for line in lines)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def kill_at_random(
    proc,
    run_dir: str,
    kind: str,
    rng: random.Random,
    window: float,
    deadline: float,
    newest_step,
    need_checkpoint: bool = False,
    log: str | None = None,
    not_before: int = 0,
) -> Kill | None:
    """Wait for `proc` to train, then a random time in [0, window), then the moment `kind`;
    SIGKILL it. None if the process ended first (nothing left to kill). `need_checkpoint`:
    first wait until the run has a good checkpoint (the last kill: so that the final run
    resumes from one, rather than start over). `log`: the file the process's output goes to
    (where it says it has dropped an earlier process's logs). `not_before`: nor before the
    process has logged a step past this one (a kill in a chosen part of the run)."""
    resumed_at = newest_step(run_dir) or 0
    metrics = os.path.join(run_dir, "metrics.jsonl")
    # Logs an earlier process left past `resumed_at` are dropped by this one as it starts,
    # and it says so on its output ("Resuming from step N" / "Starting from step 0") once
    # they are gone: only after that line is a logged step past `resumed_at` this process's
    # own. (Two looks at the file, its last step and its mtime, are not one moment: on a
    # loaded machine the truncation fell between them and a kill landed before the resume.)
    stale = resumed_at > 0 or (last_logged_step(run_dir) or 0) > 0
    while True:  # this process trains: it logged a step past its checkpoint (after truncating)
        if proc.poll() is not None or time.monotonic() > deadline:
            return None
        if stale and log is not None:
            stale = not _said(log, ("Resuming from step", "Starting from step 0"))
        step = last_logged_step(run_dir)
        if not stale and step is not None and step > max(resumed_at, not_before):
            if not need_checkpoint or _has_checkpoint(run_dir):
                break
        time.sleep(0.002)
    delay = rng.uniform(0.0, window)
    time.sleep(delay)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    size = _size(metrics)
    while proc.poll() is None and time.monotonic() < deadline:
        if kind == "mid-chunk":
            break
        if kind == "checkpoint-write" and writing_checkpoint(ckpt_dir):
            break
        if kind == "log-flush" and _size(metrics) != size:
            break
        time.sleep(_POLL)
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    half = writing_checkpoint(ckpt_dir)
    landed = f"half-written checkpoint left: {half}" if half else "no half-written checkpoint"
    return Kill(kind, round(delay, 4), landed, last_logged_step(run_dir), newest_step(run_dir))
