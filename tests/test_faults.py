"""Faults a disk really has (README, "Faults"): I/O errors from a real file system, a run
directory that is read-only or full at start, and the failures that must never pass in silence.

The I/O errors come from tests/faultfs.py, a FUSE passthrough over a real directory that fails
a seeded fraction of write, fsync and rename calls once training is going: TensorFlow's C++
checkpoint writer, our manifests, metrics.jsonl, the event files and train.log all meet them.
Where FUSE cannot be mounted the test fails with the reason; it does not skip."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, env, train, train_in_process

ARGS = [
    "trainer.max_steps=120",
    "trainer.log_every=1",
    "trainer.eval_every=40",
    "checkpoint.every=10",
    "checkpoint.max_to_keep=2",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """In this process (a fresh one adds nothing): its files are what is compared."""
    run = tmp_path_factory.mktemp("ref") / "run"
    r = train_in_process(run, *ARGS)
    assert r.returncode == 0, r.stderr
    return run


@contextlib.contextmanager
def faultfs(base: Path, *options: str):
    """Mount tests/faultfs.py over `base/src` at `base/mnt`; yields (mount, arm file, fault log).
    The file system arms itself the moment the first checkpoint's manifest is renamed into
    place (the step-10 checkpoint has committed; its directory's fsync after the rename is the
    first armed call of its kind)."""
    src, mnt, arm, log = base / "src", base / "mnt", base / "arm", base / "faults.log"
    src.mkdir(parents=True)
    mnt.mkdir()
    errors = open(base / "faultfs.err", "w")
    cmd = [sys.executable, str(REPO / "tests" / "faultfs.py"), str(src), str(mnt)]
    armed = ["--arm", str(arm), "--arm-after", "ckpt-10.manifest.json"]
    fs = subprocess.Popen([*cmd, *armed, "--log", str(log), *options], stderr=errors)
    deadline = time.time() + 30
    while not os.path.ismount(mnt):
        if fs.poll() is not None or time.time() > deadline:
            fs.kill()
            errors.close()
            pytest.fail(
                f"cannot mount the FUSE test file system: {(base / 'faultfs.err').read_text()}"
            )
        time.sleep(0.05)
    try:
        yield mnt, arm, log
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        try:
            fs.wait(timeout=30)
        except subprocess.TimeoutExpired:
            fs.kill()
        errors.close()


def run_armed(run: Path, arm: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The run on the mount, armed by the file system once its first checkpoint committed."""
    cmd = [sys.executable, "-m", "trainer", *ARGS, *overrides, f"hydra.run.dir={run}"]
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert arm.exists(), f"the step-10 checkpoint never committed:\n{r.stderr}"
    return r


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensors(prefix: Path) -> dict:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {
        k: reader.get_tensor(k)
        for k in reader.get_variable_to_dtype_map()
        if "save_counter" not in k
    }


def assert_resumes_exactly(
    run: Path, reference: Path, *overrides: str, args=ARGS, last: int = 120
) -> str:
    """Rerun the same command with the faults gone: exit 0, and the whole metrics.jsonl and
    the final weights (of step `last`) equal the uninterrupted run's. Returns the rerun's
    stderr. (In this process: the faults are gone, the faulting run was the real process.)"""
    r = train_in_process(run, *args, *overrides)
    assert r.returncode == 0, r.stderr
    assert records(run) == records(reference)
    final, ref = (
        tensors(run / "checkpoints" / f"ckpt-{last}"),
        tensors(reference / "checkpoints" / f"ckpt-{last}"),
    )
    assert final.keys() == ref.keys()
    for key, value in ref.items():
        assert np.array_equal(final[key], value), key
    return r.stderr


def assert_committed_checkpoints_verify(ckpt_dir: Path) -> list[int]:
    """Every checkpoint with a manifest verifies, every tensor read back; their steps."""
    from trainer.checkpoint.manifest import list_checkpoints, step_of, verify

    steps = []
    for prefix in list_checkpoints(str(ckpt_dir)):
        if os.path.exists(prefix + ".manifest.json"):
            verdict = verify(prefix)
            assert verdict.ok, verdict.reason
            steps.append(step_of(prefix))
    return steps


def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr  # one line (warnings beside it name what else failed)
    return errors[0]


WORDS = {
    "EIO": "Input/output error",
    "ENOSPC": "No space left on device",
    "EROFS": "Read-only file system",
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,code", [("sync", "EIO"), ("async", "EIO"), ("sync", "ENOSPC"), ("async", "EROFS")]
)
def test_io_errors_stop_the_run_with_one_line_and_it_resumes_exactly(
    tmp_path, reference, mode, code
):
    """A seeded random 10% of write, fsync and rename calls fail once the first checkpoint has
    committed: the run stops with exit 2 and one line naming a path that failed and the
    error; every committed checkpoint verifies; the same command resumes exactly."""
    seed = random.randrange(10**6)
    why = f"(seed {seed}, {mode}, {code})"
    async_ = f"checkpoint.async={'true' if mode == 'async' else 'false'}"
    options = ["--seed", str(seed), "--fraction", "0.1", "--errno", code]
    with faultfs(tmp_path, *options) as (mnt, arm, log):
        run, src_run = mnt / "run", tmp_path / "src" / "run"
        r = run_armed(run, arm, async_)
        assert r.returncode == 2, f"{why}\n{r.stderr}"
        line = error_line(r.stderr)
        faults = log.read_text().split("\n")
        named = re.search(rf"(\S+?)[:;]? ?\(?{re.escape(WORDS[code])}", line)
        assert named, f"{why} no path and error in: {line}"
        failed = {str(mnt) + f.split(" ")[1] for f in faults if f}
        assert any(
            named.group(1).rstrip(":(").endswith(p) or p in named.group(1) for p in failed
        ), f"{why} {line} names none of the failed calls {sorted(failed)}"
        assert_committed_checkpoints_verify(src_run / "checkpoints")
        arm.unlink()
        err = assert_resumes_exactly(run, reference, async_)
        assert "Resuming from step" in err or "Starting from step 0" in err, err
    print(f"\n{why}: {line}")


@pytest.mark.slow
@pytest.mark.parametrize(
    # fsyncdir: step 10's after its rename, step 20's before its manifest, let through
    "op,skip,mode",
    [("fsync", 0, "false"), ("fsync", 0, "true"), ("fsyncdir", 2, "false")],
)
def test_a_checkpoint_whose_fsync_failed_never_counts(tmp_path, reference, op, skip, mode):
    """The first fsync of the second checkpoint's files (or the directory's fsync after its
    manifest was renamed into place) fails: that checkpoint never counts, is not retried into
    success, and the rerun resumes from the checkpoint before it, exactly. The second save is
    the project's writer's (sync or async), which fsyncs its files as it writes them."""
    options = ["--fraction", "1", "--ops", op, "--paths", "checkpoints", "--skip", str(skip)]
    with faultfs(tmp_path, *options) as (mnt, arm, log):
        run, src_run = mnt / "run", tmp_path / "src" / "run"
        r = run_armed(run, arm, f"checkpoint.async={mode}")
        assert r.returncode == 2, r.stderr
        line = error_line(r.stderr)
        assert "could not write ckpt-20" in line and "Input/output error" in line, line
        assert "ckpt-10 is intact (verified)" in line, line
        assert log.read_text().startswith(op), log.read_text()
        assert assert_committed_checkpoints_verify(src_run / "checkpoints") == [10]
        arm.unlink()
        err = assert_resumes_exactly(run, reference, f"checkpoint.async={mode}")
        assert "Resuming from step 10" in err, err


@pytest.mark.slow
def test_a_write_failing_after_a_checkpoint_committed_says_that_checkpoint_is_saved(
    tmp_path, reference
):
    """TensorFlow's state file (`checkpoints/checkpoint`, written right after the first
    save's manifest) fails to write: the line says ckpt-10 was saved and names the file that
    failed, never "could not write ckpt-10" beside "ckpt-10 is intact"; the rerun resumes
    from it exactly."""
    options = ["--fraction", "1", "--ops", "write", "--paths", "checkpoints/checkpoint"]
    with faultfs(tmp_path, *options) as (mnt, arm, log):
        run, src_run = mnt / "run", tmp_path / "src" / "run"
        r = run_armed(run, arm)
        assert r.returncode == 2, r.stderr
        line = error_line(r.stderr)
        assert "ckpt-10 was saved, then a write after it failed" in line, line
        assert "checkpoints/checkpoint" in line and "Input/output error" in line, line
        assert "could not write ckpt-10" not in line, line
        assert log.read_text().startswith("write"), log.read_text()
        assert assert_committed_checkpoints_verify(src_run / "checkpoints") == [10]
        arm.unlink()
        err = assert_resumes_exactly(run, reference)
        assert "Resuming from step 10" in err, err


# ---------------------------------------------------------------- at start
@contextlib.contextmanager
def read_only_view(path: Path, view: Path):
    """`view`: a read-only bind mount of `path` (root ignores file modes; a mount does not)."""
    view.mkdir()
    for cmd in (
        ["mount", "--bind", str(path), str(view)],
        ["mount", "-o", "remount,bind,ro", str(view)],
    ):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            subprocess.run(["umount", str(view)], capture_output=True)
            pytest.fail(f"cannot make a read-only mount ({' '.join(cmd)}): {r.stderr}")
    try:
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)


@pytest.mark.parametrize("existing", [True, False])
def test_a_read_only_run_directory_is_refused_before_training(tmp_path, existing):
    """A run directory on a read-only file system, existing (a resume) or to be made: one line
    naming the key and the error, exit 2, nothing changed."""
    base = tmp_path / "base"
    if existing:
        assert train_in_process(base / "run", *ARGS, "trainer.stop_at=10").returncode == 0
    else:
        base.mkdir()
    before = {p: p.stat().st_mtime_ns for p in base.rglob("*")}
    with read_only_view(base, tmp_path / "ro") as ro:
        r = train(ro / "run", *ARGS)
    assert r.returncode == 2, r.stderr
    line = error_line(r.stderr)
    assert "hydra.run.dir" in line and "Read-only file system" in line, line
    assert "step" not in r.stderr.lower(), "refused before training"
    assert {p: p.stat().st_mtime_ns for p in base.rglob("*")} == before


@contextlib.contextmanager
def small_tmpfs(mnt: Path, size: str):
    """A real tmpfs of `size` mounted at `mnt` (made), unmounted after."""
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        pytest.fail(f"cannot mount a tmpfs: {r.stderr}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(filler: Path) -> None:
    """Write zeros to `filler` until the file system says it is full (ENOSPC)."""
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)


@pytest.mark.slow
@pytest.mark.parametrize("async_", ["false", "true"])
def test_a_disk_that_fills_during_training_stops_the_run_and_it_resumes_exactly(tmp_path, async_):
    """A real tmpfs that another program fills once the first checkpoint has committed: the
    kernel's ENOSPC meets whatever the run writes next (a checkpoint by the project's writer,
    metrics.jsonl, an event file). One line naming it, exit 2, every committed checkpoint
    verifies; once room is made, the same command resumes exactly."""
    args = [*ARGS, "trainer.max_steps=5000", f"checkpoint.async={async_}"]  # still going
    reference = tmp_path / "reference"
    assert train_in_process(reference, *args).returncode == 0
    with small_tmpfs(tmp_path / "small", "32m") as mnt:
        run = mnt / "run"
        cmd = [sys.executable, "-m", "trainer", *args, f"hydra.run.dir={run}"]
        p = subprocess.Popen(
            cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        first, deadline = run / "checkpoints" / "ckpt-10.manifest.json", time.time() + 240
        while not first.exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        fill(mnt / "filler")
        out, err = p.communicate(timeout=300)
        assert p.returncode == 2, (p.returncode, out[-1000:], err)
        line = error_line(err)
        assert "No space left on device" in line and "Free space" in line, line
        assert "Traceback" not in err
        steps = assert_committed_checkpoints_verify(run / "checkpoints")
        assert steps and max(steps) < 5000, steps
        assert f"ckpt-{max(steps)} is intact" in line, line
        named = re.search(r"could not write ckpt-(\d+)", line)  # never a saved one
        assert named is None or int(named.group(1)) not in steps, line
        (mnt / "filler").unlink()
        rerun = assert_resumes_exactly(run, reference, args=args, last=5000)
        assert f"Resuming from step {max(steps)}" in rerun, rerun
    print(f"\n(async {async_}): {line}")


def test_a_full_disk_at_start_is_refused_before_training(tmp_path):
    """A run directory on a real tmpfs filled to its last pages: one line, exit 2, before
    TensorFlow loads; after room is made, the same command trains."""
    with small_tmpfs(tmp_path / "small", "3m") as mnt:
        filler = mnt / "filler"
        fill(filler)
        os.truncate(filler, filler.stat().st_size - 16 * 4096)  # 64 KiB left
        r = train(mnt / "run", *ARGS, "trainer.max_steps=20")
        assert r.returncode == 2, r.stderr
        line = error_line(r.stderr)
        assert "hydra.run.dir" in line and "No space left on device" in line, line
        assert not (mnt / "run").exists()
        filler.unlink()
        # the same command, in this process: the CLI's start-up check passes now, and it trains
        from trainer.preflight import check

        assert check([*ARGS, "trainer.max_steps=20", f"hydra.run.dir={mnt / 'run'}"]) is None
        r = train_in_process(mnt / "run", *ARGS, "trainer.max_steps=20")
        assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- nothing swallowed
def test_unparsable_metrics_lines_are_moved_aside_never_deleted(tmp_path, capsys):
    """A damaged line in the middle of metrics.jsonl and a torn last one: a resume's cut keeps
    every record up to its step, moves both lines to metrics.jsonl.unparsed and names them."""
    from trainer.rewind import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": s / 10}) for s in range(1, 7)]
    lines[2] = '{"step": 3, "loss": 0.3\x00\x00garbage'
    path.write_text("\n".join(lines) + '\n{"step": 7, "lo')
    dropped = truncate_metrics(str(tmp_path), 5)
    assert dropped == 1  # step 6; the unparsable lines are not counted as dropped records
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 4, 5]
    aside = (tmp_path / "metrics.jsonl.unparsed").read_text().splitlines()
    assert aside == [lines[2], '{"step": 7, "lo']
    err = capsys.readouterr().err
    assert "2 line(s)" in err and "line 3, 7" in err and "metrics.jsonl.unparsed" in err, err


def test_a_damaged_event_record_drops_that_record_only(tmp_path, capsys):
    """A bit flipped in the data of one event in the middle of an event file, and the length of
    another: the resume's cut keeps every other event (it used to drop all after the first)."""
    import tensorflow as tf

    from trainer.rewind import read_scalars, truncate_events

    logdir = tmp_path / "tb"
    writer = tf.summary.create_file_writer(str(logdir / "train"))
    with writer.as_default():
        for step in range(1, 11):
            tf.summary.scalar("loss", float(step), step=step)
    writer.close()
    (path,) = (logdir / "train").glob("*tfevents*")
    blob = bytearray(path.read_bytes())
    offsets, pos = [], 0
    while pos < len(blob):  # the records' offsets: length (8), its CRC (4), data, its CRC (4)
        offsets.append(pos)
        pos += 16 + int.from_bytes(blob[pos : pos + 8], "little")
    # records: [0] file_version, [1] graph/metadata?, then one per step; find steps 4 and 7
    from tensorboard.compat.proto import event_pb2

    def step_of(i):
        start = offsets[i]
        n = int.from_bytes(blob[start : start + 8], "little")
        return event_pb2.Event.FromString(bytes(blob[start + 12 : start + 12 + n])).step

    at = {step_of(i): offsets[i] for i in range(1, len(offsets))}
    blob[at[4] + 14] ^= 0x40  # in step 4's data
    blob[at[7] + 1] ^= 0x01  # in step 7's length
    path.write_bytes(bytes(blob))
    truncate_events(str(logdir), 100)
    assert [s for s, _ in read_scalars(str(logdir / "train"), "loss")] == [1, 2, 3, 5, 6, 8, 9, 10]
    assert "2 damaged or torn record(s) dropped" in capsys.readouterr().err


def test_a_failed_background_write_behind_another_error_is_named(tmp_path, capsys):
    """An async checkpoint write that fails while another exception is on its way out is not
    raised (it would hide the first), but it is named in a warning, never dropped."""
    import tensorflow as tf

    from trainer.checkpoint.async_save import AsyncCheckpointWriter

    ckpt = tf.train.Checkpoint(v=tf.Variable([1.0, 2.0]))
    writer = AsyncCheckpointWriter(ckpt)

    def failing_write(step):
        raise OSError(5, "Input/output error", str(tmp_path / f"ckpt-{step}.index"))

    with pytest.raises(KeyError, match="the first error"):
        with writer.pending():
            writer.submit(7, failing_write, (), (), None)
            raise KeyError("the first error")
    err = capsys.readouterr().err
    assert "ckpt-7 failed too" in err and "Input/output error" in err, err
