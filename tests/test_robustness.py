"""Signals, crashes and corrupted checkpoints (issue 5): real processes, real signals, real files.

One uninterrupted reference run (module fixture) is the ground truth: every interrupted,
corrupted or killed run must end with exactly its final weights.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, env, losses, start_paused, train_in_process

# Small and frequent checkpoints: kills often land inside a write.
BASE = [
    "trainer.max_steps=40",
    "trainer.log_every=1",
    "trainer.eval_every=20",
    "checkpoint.every=2",
    "checkpoint.max_to_keep=2",
]


def tensors(prefix) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint except the save counter (it counts saves, not steps)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {
        k: reader.get_tensor(k)
        for k in reader.get_variable_to_shape_map()
        if k != "_CHECKPOINTABLE_OBJECT_GRAPH" and not k.startswith("save_counter")
    }


def assert_same_tensors(a, b) -> None:
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


def tree(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below `path`."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """In this process (a fresh one adds nothing): the files are what is compared."""
    run = tmp_path_factory.mktemp("ref") / "run"
    r = train_in_process(run, *BASE)
    assert r.returncode == 0, r.stderr
    assert (run / "checkpoints" / "ckpt-40.index").exists()
    return run


def run_in_process(compose, run_dir: Path, *overrides: str) -> int:
    from trainer import app

    return app.run(compose([*BASE, *overrides]), str(run_dir))


# ---------------------------------------------------------------- signals and crashes
def _steps_with(ck: Path, suffix: str) -> list[int]:
    out = []
    for p in glob.glob(str(ck / f"ckpt-*{suffix}")):
        stem = os.path.basename(p)[len("ckpt-") :].split(".")[0].split("_")[0]
        out.append(int(stem))
    return out


def _writing(ck: Path, after: int) -> bool:
    """A checkpoint newer than `after` is being written: TF's temp dir, or a data file or an
    index without a manifest yet (the project's writer writes the data file first)."""
    temp = [s for s in _steps_with(ck, "_temp") if s > after]
    done = set(_steps_with(ck, ".manifest.json"))
    files = _steps_with(ck, ".index") + _steps_with(ck, ".data-00000-of-00001")
    return bool(temp) or any(s > after and s not in done for s in files)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path, reference):
    """SIGKILL four times (twice at a random moment, twice the instant a checkpoint write is
    seen in progress) with max_to_keep=1; every resume succeeds; final weights and the
    logged loss curve equal the uninterrupted run's."""
    run = tmp_path / "run"
    ck = run / "checkpoints"
    args = [*BASE, "checkpoint.max_to_keep=1", f"hydra.run.dir={run}"]
    # pause_at=39: no killed run can finish before its kill lands, however late the polling
    # sees it (every resume starts at an even step, so each run would pause there at the latest)
    cmd = [sys.executable, "-m", "trainer", *args, "trainer.pause_at=39"]
    rng = random.Random(int(os.environ.get("FAULT_SEED", time.time_ns() % 10**6)))
    kills, mid_write = 0, 0
    for i in range(4):
        before = max(_steps_with(ck, ".manifest.json"), default=0)
        (run / "PAUSED").unlink(missing_ok=True)  # (an earlier run's: see the loop below)
        err = open(tmp_path / f"kill{i}.err", "w")
        p = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        while p.poll() is None and time.time() < deadline:
            if (run / "PAUSED").exists():
                break  # at step 39 (a run resumed from ckpt-38 saves nothing new before it)
            if i % 2 and _writing(ck, before):
                break
            newest = max(_steps_with(ck, ".manifest.json"), default=0)
            if i % 2 and newest >= min(before + 6, 34):
                break  # no write caught in progress this time: kill anyway

            if not i % 2 and max(_steps_with(ck, ".manifest.json"), default=0) > before:
                time.sleep(rng.uniform(0, 0.15))
                break
            time.sleep(0.0005)
        in_write = _writing(ck, before)
        p.send_signal(signal.SIGKILL)
        p.wait()
        err.close()
        assert p.returncode == -signal.SIGKILL, f"run {i} ended before the kill"
        kills += 1
        mid_write += in_write
        assert "Traceback" not in (tmp_path / f"kill{i}.err").read_text()
    assert mid_write >= 1, "no kill landed inside a checkpoint write"
    final = train_in_process(run, *args[:-1])  # the resume: no signal, no new process needed
    assert final.returncode == 0, final.stderr
    assert "Resuming from step" in final.stderr
    assert_same_tensors(ck / "ckpt-40", reference / "checkpoints" / "ckpt-40")
    assert losses(run) == losses(reference)  # each step logged once, with the same loss
    print(f"\nfault injection: {kills} SIGKILLs, {mid_write} inside a checkpoint write")


@pytest.mark.slow
def test_sigterm_saves_flushes_logs_and_exits_3(tmp_path, reference):
    from trainer.checkpoint.manifest import verify
    from trainer.rewind import read_scalars

    run = tmp_path / "run"
    p, paused = start_paused(run, *BASE, "trainer.pause_at=15")
    step = paused["step"]
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 3, err
    assert step == 15 and "SIGTERM received" in err and "Traceback" not in err
    assert verify(str(run / "checkpoints" / "ckpt-15")).ok
    assert sorted(losses(run)) == list(range(1, 16))  # metrics flushed up to the saved step
    tb = read_scalars(str(run / "tensorboard" / "train"), "loss")
    assert sorted(s for s, _ in tb) == list(range(1, 16))  # TensorBoard flushed too
    resume = out.split("Resume with:\n", 1)[1].strip().split()
    assert resume[:3] == ["python", "-m", "trainer"]
    # the printed command, run in this process: its overrides, into the run dir it names
    assert resume[-1] == f"hydra.run.dir={run}" and not any(
        a.startswith("hydra.run.dir=") for a in resume[3:-1]
    )
    r = train_in_process(run, *resume[3:-1])
    assert r.returncode == 0, r.stderr
    assert_same_tensors(run / "checkpoints" / "ckpt-40", reference / "checkpoints" / "ckpt-40")
    assert losses(run) == losses(reference)


def _start_script(script: Path) -> subprocess.Popen:
    """Run a Python file standing for the loop, with text pipes, not waiting."""
    return subprocess.Popen(
        [sys.executable, str(script)],
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_second_sigint_aborts_at_once(tmp_path):
    """First SIGINT: a graceful stop is scheduled; second SIGINT: exit 130 at once."""
    script = tmp_path / "busy.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from trainer.signals import StopRequest
            with StopRequest() as stop:
                print("ready", flush=True)
                while True:  # stands for a long checkpoint write after the first SIGINT
                    time.sleep(0.01)
            """
        )
    )
    p = _start_script(script)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGINT)
    assert "SIGINT received" in p.stderr.readline() + p.stderr.readline()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130
    assert "Second SIGINT" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("committed", [10, 9])
def test_a_second_sigint_after_the_stops_checkpoint_committed_says_so(tmp_path, committed):
    """The second SIGINT lands after the loop ended at step 10 and a checkpoint committed: if
    it is the stop's own (10), the line says it is saved; if it is an earlier one (9: an async
    save that was still writing when the stop came), "without saving", naming step 9. (The
    process stands for the loop; the signals are real.)"""
    script = tmp_path / "saves.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import time
            from trainer.signals import StopRequest
            newest = [8]
            with StopRequest(lambda: newest[0]) as stop:
                print("ready", flush=True)
                while stop.signal_name is None:
                    time.sleep(0.01)
                stop.saving_step = 10  # the loop ended at step 10
                newest[0] = {committed}  # a checkpoint committed
                print("saved", flush=True)
                while True:  # what follows (closing the writers, say)
                    time.sleep(0.01)
            """
        )
    )
    p = _start_script(script)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGINT)
    assert p.stdout.readline().strip() == "saved"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    if committed == 10:
        assert "Second SIGINT: exiting now; the stop's checkpoint (step 10) is saved" in err, err
        assert "without saving" not in err, err
    else:
        assert "aborting now without saving (the newest checkpoint: step 9)" in err, err


@pytest.mark.slow
def test_second_sigint_aborts_the_trainer_without_saving(tmp_path):
    """The real trainer: two SIGINTs 5 ms apart while paused at step 10 (last checkpoint at
    8). The first starts a graceful stop, the second aborts before the step-10 save commits.
    The state is 43 MB, so that the save takes far longer than the 5 ms (a small state's save
    now takes about that long: the second signal could land after its commit)."""
    from trainer.checkpoint.manifest import verify

    run = tmp_path / "run"
    big = "model.num_units=300000"  # (144 bytes a unit with Adam's slots)
    p, _ = start_paused(run, *BASE, big, "checkpoint.every=4", "trainer.pause_at=10")
    p.send_signal(signal.SIGINT)
    time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert "Second SIGINT: aborting now without saving (the newest checkpoint: step 8)" in err
    assert not (run / "checkpoints" / "ckpt-10.manifest.json").exists()
    assert verify(str(run / "checkpoints" / "ckpt-8")).ok


# ---------------------------------------------------------------- integrity
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bitflip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated": (
        lambda c: _truncate(c / "ckpt-40.data-00000-of-00001"),
        "ckpt-40.data-00000-of-00001 has",
    ),
    "bit-flipped": (
        lambda c: _bitflip(c / "ckpt-40.data-00000-of-00001"),
        "ckpt-40.data-00000-of-00001: tensor",  # named by TensorFlow's per-tensor CRC32C
    ),
    "index bit-flipped": (lambda c: _bitflip(c / "ckpt-40.index"), "ckpt-40.index checksum"),
    "index deleted": (lambda c: (c / "ckpt-40.index").unlink(), "ckpt-40.index is missing"),
    "half-written": (lambda c: (c / "ckpt-40.manifest.json").unlink(), "write never completed"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupted_latest_checkpoint_is_reported_and_previous_used(
    tmp_path, reference, compose, capsys, kind
):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    ck = run / "checkpoints"
    damage, expected = CORRUPTIONS[kind]
    damage(ck)
    assert run_in_process(compose, run) == 0
    err = capsys.readouterr().err
    assert "checkpoint ckpt-40 skipped" in err and expected in err, err
    assert "Resuming from step 38" in err
    # the bad one is kept aside, not deleted; the manager state lists only good ones
    (aside,) = (ck / "bad").iterdir()
    assert aside.name.startswith("ckpt-40-")
    assert expected in (aside / "REASON.txt").read_text()  # why it was set aside, kept with it
    assert '"ckpt-40"' in (ck / "checkpoint").read_text()  # the new, good ckpt-40
    assert_same_tensors(ck / "ckpt-40", reference / "checkpoints" / "ckpt-40")


def test_no_good_checkpoint_refuses_and_changes_nothing(tmp_path, reference, compose, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for name in ("ckpt-38.data-00000-of-00001", "ckpt-40.data-00000-of-00001"):
        _bitflip(run / "checkpoints" / name)
    before = tree(run)
    assert run_in_process(compose, run) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "ckpt-38" in err and "ckpt-40" in err
    assert "Nothing was moved or deleted" in err
    assert tree(run) == before


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_failed_save_keeps_the_last_good_checkpoint(tmp_path, compose, capsys, monkeypatch, mode):
    """ENOSPC injected into the manifest write of the second save, max_to_keep=1: the first
    checkpoint survives (retention runs only after a save succeeded), exit 2, and a rerun
    resumes from it. With async saves the failure surfaces at the next save, same outcome."""
    import errno

    from trainer.checkpoint.manifest import verify
    from trainer.checkpoint.store import CheckpointStore

    original = CheckpointStore.write_manifest
    calls = []

    def failing(self, prefix, step):
        calls.append(step)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), prefix + ".manifest.json")
        return original(self, prefix, step)

    monkeypatch.setattr(CheckpointStore, "write_manifest", failing)
    run = tmp_path / "run"
    extra = ["checkpoint.async=true"] if mode == "async" else []
    assert (
        run_in_process(compose, run, "checkpoint.max_to_keep=1", "checkpoint.every=10", *extra) == 2
    )
    err = capsys.readouterr().err
    assert "No space left on device" in err and "ckpt-10 is intact" in err, err
    ck = run / "checkpoints"
    assert verify(str(ck / "ckpt-10")).ok
    assert not list(ck.glob("ckpt-20*")), "the failed save's partial files are removed"
    monkeypatch.setattr(CheckpointStore, "write_manifest", original)
    assert run_in_process(compose, run, "checkpoint.max_to_keep=1", "checkpoint.every=10") == 0
    assert "Resuming from step 10" in capsys.readouterr().err


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return r.returncode == 0


@pytest.mark.slow
def test_full_disk_on_a_small_filesystem(tmp_path, compose, capsys):
    """A real filesystem (tmpfs) that fills while the run trains: the CLI exits 2 with one
    message, the checkpoints committed before verify, and after freeing space the run resumes
    and finishes. (A disk already full at start is refused before training: test_faults.py.)"""
    from trainer.checkpoint.manifest import list_checkpoints, verify

    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "8m"):
        pytest.fail("cannot mount a tmpfs here (mount -t tmpfs failed: not root?)")
    try:
        run = mnt / "run"
        args = ["checkpoint.max_to_keep=1", "checkpoint.every=10", "trainer.max_steps=400"]
        cmd = [sys.executable, "-m", "trainer", *BASE, *args, f"hydra.run.dir={run}"]
        p = subprocess.Popen(
            cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.time() + 120
        while not list(run.glob("checkpoints/*.manifest.json")) and time.time() < deadline:
            time.sleep(0.01)
        filler = mnt / "filler"
        with open(filler, "wb", buffering=0) as f:  # fill the filesystem up to the last byte
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        err = p.communicate(timeout=120)[1]
        assert p.returncode == 2, err
        assert "No space left on device" in err and "Traceback" not in err, err
        print("\nfull disk:", err.strip().splitlines()[-1])
        committed = [
            c
            for c in list_checkpoints(str(run / "checkpoints"))
            if os.path.exists(c + ".manifest.json")
        ]
        assert committed and all(verify(c).ok for c in committed)
        filler.unlink()
        capsys.readouterr()
        assert run_in_process(compose, run, *args) == 0
        assert "Resuming from step" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def _poisoned_npz(path: Path, n: int = 200) -> Path:
    """Regression data with one NaN feature in a training row."""
    from trainer.data.memory import _SYNTHETIC_SEED

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x.sum(axis=1, keepdims=True)).astype(np.float32)
    train_rows = np.random.default_rng(_SYNTHETIC_SEED).permutation(n)[int(round(0.2 * n)) :]
    x[train_rows[0], 2] = np.nan
    np.savez(path, x=x, y=y)
    return path


def weights_finite(prefix) -> bool:
    """Model and optimizer tensors (best_eval_loss may legitimately be +inf) are all finite."""
    return all(
        np.isfinite(v).all()
        for k, v in tensors(prefix).items()
        if k.startswith(("model/", "optimizer/")) and np.issubdtype(v.dtype, np.floating)
    )


NPZ = ["data=npz", "data.batch_size=16", "trainer.max_steps=20", "checkpoint.every=1"]


def test_nonfinite_loss_stops_without_saving_it(tmp_path, compose, capsys):
    data = _poisoned_npz(tmp_path / "d.npz")
    run = tmp_path / "run"
    assert run_in_process(compose, run, *NPZ, f"data.path={data}") == 1
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step" in err
    bad_step = int(err.split("at step ")[1].split()[0])
    saved = sorted(
        int(p.name.split("-")[1].split(".")[0]) for p in (run / "checkpoints").glob("*.index")
    )
    assert all(s < bad_step for s in saved)
    assert saved and max(saved) == bad_step - 1
    for s in saved:
        assert weights_finite(run / "checkpoints" / f"ckpt-{s}")


def test_nonfinite_rollback_skips_the_bad_batches(tmp_path, compose, capsys):
    data = _poisoned_npz(tmp_path / "d.npz")
    run = tmp_path / "run"
    code = run_in_process(
        compose,
        run,
        *NPZ,
        f"data.path={data}",
        "trainer.on_nonfinite=rollback",
        "checkpoint.max_to_keep=100",
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "rolled back to ckpt-" in err
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e.get("event") == "rollback"]  # the NaN row, each epoch
    assert rollbacks and weights_finite(run / "checkpoints" / "ckpt-20")
    # each failing step was a checkpoint step (every=1): it is saved after the rollback, with
    # the restored weights and the step counter past the skipped batches
    for e in rollbacks:
        bad = run / "checkpoints" / f"ckpt-{e['step']}"
        assert weights_finite(bad)
        assert tensors(bad)["step/.ATTRIBUTES/VARIABLE_VALUE"] == e["step"]


@pytest.mark.slow
@pytest.mark.parametrize("async_save", ["false", "true"])
def test_nonfinite_weights_are_never_checkpointed(tmp_path, compose, async_save):
    """The guard run before every save, in the real loop, sync and async: a BatchNorm moving
    variance holding Inf leaves the training loss finite (training normalizes with batch
    statistics) but stops the first save, naming the variable; no checkpoint is written."""
    from trainer import build
    from trainer.checkpoint.manifest import list_checkpoints, verify
    from trainer.data.memory import load_data

    cfg = compose(["model=custom_bn"])
    model = build.build_model(cfg.model, load_data(cfg.data))
    variance = model.bn.moving_variance
    variance.assign(np.full(variance.shape, np.inf, np.float32))
    model.save(tmp_path / "inf.keras")
    run = tmp_path / "run"
    proc = train_in_process(
        run,
        "model=custom_bn",
        f"trainer.init_from={tmp_path / 'inf.keras'}",
        "trainer.max_steps=30",
        "checkpoint.every=10",
        f"checkpoint.async={async_save}",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert re.search(
        r"non-finite values in \S*moving_variance\S* at step 10; the checkpoint was "
        r"not written \(last good: step 0\)",
        proc.stderr,
    ), proc.stderr[-3000:]
    assert not any(verify(p).ok for p in list_checkpoints(str(run / "checkpoints")))
    assert max(losses(run)) == 10 and all(np.isfinite(list(losses(run).values())))


# ---------------------------------------------------------------- scripts/inspect_checkpoints.py
def test_inspect_checkpoints(tmp_path, reference, capsys, monkeypatch):
    """The script's three views, in-process (it is a thin main() over trainer/verify/inspection.py)
    plus one run of the script as `__main__` (its `sys.exit(main())`) for the exit code."""
    import runpy

    sys.path.insert(0, str(REPO / "scripts"))
    from inspect_checkpoints import main

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    _truncate(run / "checkpoints" / "ckpt-40.data-00000-of-00001")
    script = str(REPO / "scripts" / "inspect_checkpoints.py")
    monkeypatch.setattr(sys, "argv", [script, str(run)])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(script, run_name="__main__")
    printed = capsys.readouterr()
    assert exited.value.code == 1, printed.err  # one checkpoint does not verify
    rows = {line.split()[0]: line for line in printed.out.splitlines()[1:]}
    assert set(rows) == {"38", "40"}
    assert " yes " in rows["38"] and "NO: ckpt-40.data-00000-of-00001 has" in rows["40"]
    size = sum(p.stat().st_size for p in (run / "checkpoints").glob("ckpt-38.[id]*"))
    assert f" {size} " in rows["38"]
    assert main([str(run), "--variables", "38"]) == 0
    out = capsys.readouterr().out
    shapes = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()}
    assert shapes["step"].startswith("[]")  # readable paths, not TensorFlow's escaped keys
    assert shapes["model/my_subclassed_model/dense_1/w"].startswith("[10, 32]")
    assert shapes["optimizer/adam/my_subclassed_model_dense_1_w_momentum"].startswith("[10, 32]")
    assert not [k for k in shapes if ".S" in k or "ATTRIBUTES" in k], shapes
    assert (
        main([str(run), "--diff-config", *BASE, "model.num_units=8", "trainer.max_steps=80"]) == 0
    )
    out = capsys.readouterr().out
    assert "model.num_units: checkpoint 32 -> now 8   (structural" in out
    assert "trainer.max_steps: checkpoint 40 -> now 80\n" in out
    assert main([str(run), "--variables", "7"]) == 2
    assert (
        "STEP: received 7; allowed: one of the checkpoint steps [38, 40]" in capsys.readouterr().err
    )


def test_unfinished_log_rewrite_never_replaces_the_original(tmp_path):
    """A kill (or a full disk) while a resume rewrites an event file leaves a partial
    `.truncating` copy beside the intact original: the next resume must drop the copy."""
    import tensorflow as tf

    from trainer.rewind import read_scalars, truncate_events

    logdir = tmp_path / "tb"
    writer = tf.summary.create_file_writer(str(logdir / "train"))
    with writer.as_default():
        for step in range(1, 11):
            tf.summary.scalar("loss", float(step), step=step)
    writer.close()
    (original,) = (logdir / "train").glob("*tfevents*")
    (original.parent / (original.name + ".truncating")).write_bytes(original.read_bytes()[:20])
    truncate_events(str(logdir), 6)
    assert [s for s, _ in read_scalars(str(logdir / "train"), "loss")] == [1, 2, 3, 4, 5, 6]
