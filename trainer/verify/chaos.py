"""`verify.interrupt=chaos`: SIGKILLs at random moments of a real run, each followed by a resume.

Not at a pause point of ours: each kill waits until the run trains, waits a random time
(`verify.seed` draws it), then fires at the next moment of its kind, observed from the outside
in the run directory:
- mid-chunk: right away (the loop is almost always inside a chunk of train steps);
- checkpoint-write: as soon as a checkpoint is being written (TensorFlow's `ckpt-N_temp/`
  directory exists, or `ckpt-N`'s data or index file has no manifest yet), sync or async;
- log-flush: as soon as `metrics.jsonl` grows (a log write has just reached the file).
After each kill the report records what the run directory showed: a half-written checkpoint
left behind proves the kill landed mid-write. The same command then resumes the run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass

from trainer.config import UserError

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


def check(cfg) -> None:
    """The chaos keys of the verify group; UserError if one is out of range."""
    v = cfg.verify
    if not v.kills >= 1:
        raise UserError(f"verify.kills: received {v.kills}; allowed: an integer >= 1")
    if not v.window >= 0:
        raise UserError(f"verify.window: received {v.window}; allowed: seconds >= 0")
    if v.get("wipe") and not cfg.checkpoint.get("remote"):
        raise UserError(
            "verify.wipe: received true without checkpoint.remote; allowed: true with a "
            "store (a wiped run directory comes back from it), else false"
        )
    if v.get("wipe") and v.kills < 2:
        raise UserError(
            f"verify.wipe: received true with verify.kills={v.kills}; allowed: with 2 or more "
            "kills (the first resume is the first one on a wiped machine)"
        )


def with_remote(overrides: list[str], cfg) -> list[str]:
    """The runs' overrides with checkpoint.remote as one plain `checkpoint.remote=URL` (it may
    come from a config file or a `+`/`++` override): each run gets its own prefix from it."""
    url = cfg.checkpoint.get("remote")
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != "checkpoint.remote"]
    return [*kept, f"checkpoint.remote={url}"] if url else kept


def remote_override(override: str, run_dir: str) -> str:
    """checkpoint.remote=URL as one of verify_resume's runs gets it: URL/<its directory name>
    (URL/reference, URL/resumed), so that the two runs keep apart as a sweep's jobs do."""
    if not (override.startswith("checkpoint.remote=") and "://" in override):
        return override
    from trainer.remote.download import run_url

    return run_url(override, run_dir)


def _store_of(run_dir: str, overrides: list[str]):
    from trainer.remote.objects import Store

    urls = [remote_override(o, run_dir) for o in overrides if o.startswith("checkpoint.remote=")]
    return Store(urls[-1].split("=", 1)[1])


def store_holds_one(run_dir: str, overrides: list[str], every: float = 0.2):
    """A check for kill_at_random's `ready`: the run's store holds a committed checkpoint (so
    that the wipe after this kill tests a bring-back, not a start from scratch); asked of the
    store at most every `every` seconds."""
    from trainer.remote.uploader import committed_steps

    store, last = _store_of(run_dir, overrides), [0.0]

    def ready() -> bool:
        if time.monotonic() - last[0] < every:
            return False
        last[0] = time.monotonic()
        try:
            return bool(committed_steps(store))
        except Exception:  # the store failing: not yet
            return False

    return ready


def wipe(run_dir: str, overrides: list[str], say) -> int | None:
    """verify.wipe: the machine is lost before this resume. `run_dir` is deleted; the step of
    the store's newest committed checkpoint (the one the next run must bring back), or None."""
    from trainer.remote.uploader import committed_steps

    shutil.rmtree(run_dir)
    store = _store_of(run_dir, overrides)
    try:
        steps = committed_steps(store)
    except Exception as e:  # the store failing: the verification cannot go on
        from trainer.remote.objects import describe

        raise UserError(f"verify.wipe: cannot list {store.url} ({describe(e)})") from None
    say(
        f"[2/3] wiped {run_dir} (a fresh machine): the store holds "
        f"{f'ckpt-{steps[-1]}' if steps else 'no committed checkpoint'}"
    )
    return steps[-1] if steps else None


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
    for name in names:  # (the async writer of small states writes no _temp/: data, then index)
        stem = name.split(".", 1)[0]
        own = name.endswith(".index") or ".data-" in name
        if own and stem.startswith("ckpt-") and stem + ".manifest.json" not in names:
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
    ready=None,
    brought_back: bool = False,
) -> Kill | None:
    """Wait for `proc` to train, then a random time in [0, window), then the moment `kind`;
    SIGKILL it. None if the process ended first (nothing left to kill). `need_checkpoint`:
    first wait until the run has a good checkpoint (the last kill: so that the final run
    resumes from one, rather than start over). `log`: the file the process's output goes to
    (where it says it has dropped an earlier process's logs). `not_before`: nor before the
    process has logged a step past this one (a kill in a chosen part of the run). `ready`:
    nor before it returns True (verify.wipe: the store holds a committed checkpoint).
    `brought_back`: the run directory was wiped and the process brings a checkpoint back
    from the store: its logs count only after it says it resumed."""
    resumed_at = newest_step(run_dir) or 0
    metrics = os.path.join(run_dir, "metrics.jsonl")
    # Logs an earlier process left past `resumed_at` are dropped by this one as it starts,
    # and it says so on its output ("Resuming from step N" / "Starting from step 0") once
    # they are gone: only after that line is a logged step past `resumed_at` this process's
    # own. (Two looks at the file, its last step and its mtime, are not one moment: on a
    # loaded machine the truncation fell between them and a kill landed before the resume.)
    # (`brought_back`: a run directory just wiped, brought back from the store as it starts)
    stale = resumed_at > 0 or brought_back or (last_logged_step(run_dir) or 0) > 0
    while True:  # this process trains: it logged a step past its checkpoint (after truncating)
        if proc.poll() is not None or time.monotonic() > deadline:
            return None
        if stale and log is not None:
            stale = not _said(log, ("Resuming from step", "Starting from step 0"))
        step = last_logged_step(run_dir)
        if not stale and step is not None and step > max(resumed_at, not_before):
            if (not need_checkpoint or _has_checkpoint(run_dir)) and (ready is None or ready()):
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
