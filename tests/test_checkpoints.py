"""CheckpointStore on its own: what the manifest pins, what verify() catches, and retention."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, env

from trainer.checkpoint import integrity
from trainer.checkpoint.manifest import MANIFEST_SUFFIX, checkpoint_files, list_checkpoints, verify
from trainer.checkpoint.store import TRASH_DIR, CheckpointStore, sha256_file


def _store(directory, *, max_to_keep=5, keep_every_n_hours=None, async_write=False):
    weights = tf.Variable(np.arange(50_000, dtype=np.float32))
    store = CheckpointStore(
        str(directory),
        tf.train.Checkpoint(weights=weights),
        max_to_keep=max_to_keep,
        keep_every_n_hours=keep_every_n_hours,
        manifest_extra={},
        async_write=async_write,
    )
    return store, weights


def _flip(path: str, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x04]))


def test_manifest_pins_the_index_and_the_sizes(tmp_path):
    store, _ = _store(tmp_path)
    store.save(1)
    prefix = str(tmp_path / "ckpt-1")
    manifest = json.loads(open(prefix + MANIFEST_SUFFIX).read())
    data, index = (os.path.basename(p) for p in checkpoint_files(prefix))  # sorted
    assert manifest["files"][index] == {
        "size": os.path.getsize(prefix + ".index"),
        "sha256": sha256_file(prefix + ".index"),
    }
    assert manifest["files"][data] == {"size": os.path.getsize(os.path.join(tmp_path, data))}
    assert verify(prefix).ok


@pytest.mark.parametrize("where", [0.01, 0.5, 0.99])
def test_a_flipped_bit_anywhere_in_the_data_fails_verification(tmp_path, where):
    """The data files carry no SHA-256 of their own: TensorFlow's per-tensor CRC32C catches it."""
    store, _ = _store(tmp_path)
    store.save(1)
    prefix = str(tmp_path / "ckpt-1")
    data = prefix + ".data-00000-of-00001"
    _flip(data, int(os.path.getsize(data) * where))
    assert verify(prefix, hashes=False).ok  # same size: only the checksums can tell
    verdict = verify(prefix)
    assert not verdict.ok and "checksum differs" in verdict.reason, verdict.reason


def test_manifests_with_a_sha256_per_file_are_still_checked(tmp_path):
    """A manifest written before the switch to CRC32C lists a SHA-256 for every file."""
    store, _ = _store(tmp_path)
    store.save(1)
    prefix = str(tmp_path / "ckpt-1")
    manifest = json.loads(open(prefix + MANIFEST_SUFFIX).read())
    for name in manifest["files"]:
        manifest["files"][name]["sha256"] = sha256_file(os.path.join(tmp_path, name))
    open(prefix + MANIFEST_SUFFIX, "w").write(json.dumps(manifest))
    assert verify(prefix).ok
    data = next(n for n in manifest["files"] if ".data-" in n)
    manifest["files"][data]["sha256"] = "0" * 64
    open(prefix + MANIFEST_SUFFIX, "w").write(json.dumps(manifest))
    verdict = verify(prefix)
    assert not verdict.ok and f"{data} checksum differs from the manifest" in verdict.reason


@pytest.fixture
def moves(monkeypatch):
    """Retention moves every retired checkpoint into checkpoints/.deleting/, whatever its
    size; records the moves (destinations)."""
    import trainer.checkpoint.store as ckpts

    made = []
    replace = os.replace

    def record(src, dst):
        if TRASH_DIR in str(dst):  # (manifests are written through os.replace too)
            made.append(dst)
        return replace(src, dst)

    monkeypatch.setattr(ckpts, "DEFER_BYTES", 0)
    monkeypatch.setattr(ckpts.os, "replace", record)
    return made


@pytest.mark.parametrize("async_write", [False, True])
def test_retention_deletes_old_checkpoints_in_the_background(tmp_path, async_write, moves):
    store, weights = _store(tmp_path, max_to_keep=2, async_write=async_write)
    with store.pending_writes():
        for step in range(1, 6):
            weights.assign_add(tf.ones_like(weights))
            store.save(step)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["ckpt-4", "ckpt-5"]
    assert all(verify(p).ok for p in list_checkpoints(str(tmp_path)))
    # ckpt-1..3 went through the trash: moved there, then emptied and removed
    assert sorted(os.path.basename(p) for p in moves) == sorted(
        f"ckpt-{s}{x}" for s in (1, 2, 3) for x in (".index", ".data-00000-of-00001")
    )
    assert not os.path.exists(tmp_path / TRASH_DIR)
    # the manager's state file (written once per save, after retention) lists what is left
    state = tf.train.get_checkpoint_state(str(tmp_path))
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == ["ckpt-4", "ckpt-5"]
    assert os.path.basename(state.model_checkpoint_path) == "ckpt-5"
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["checkpoint"]
        + [
            f"ckpt-{s}{x}"
            for s in (4, 5)
            for x in (".index", ".data-00000-of-00001", MANIFEST_SUFFIX)
        ]
    )


def test_checkpoints_kept_by_keep_every_n_hours_survive_the_background_delete(tmp_path, moves):
    """The checkpoints keep_every_n_hours preserves (here: every one, with a tiny value) are
    never moved into the trash, and stay whole."""
    store, weights = _store(tmp_path, max_to_keep=1, keep_every_n_hours=1e-9)
    for step in range(1, 5):
        weights.assign_add(tf.ones_like(weights))
        store.save(step)
    store.wait()
    assert moves == []
    prefixes = list_checkpoints(str(tmp_path))
    assert [os.path.basename(p) for p in prefixes] == [f"ckpt-{s}" for s in range(1, 5)]
    for step, prefix in enumerate(prefixes, start=1):
        assert verify(prefix).ok
        np.testing.assert_array_equal(
            tf.train.load_checkpoint(prefix).get_tensor("weights/.ATTRIBUTES/VARIABLE_VALUE"),
            np.arange(50_000, dtype=np.float32) + step,
        )


def test_keep_every_n_hours_preserves_one_checkpoint_per_period_and_retires_the_rest(
    tmp_path, monkeypatch
):
    """TensorFlow's retention decisions, which the store's manager carries over: with
    max_to_keep=1 and one hour, saves at 0, 0.5, 1.2, 1.5 and 2.5 h keep ckpt-3 (the first
    one more than an hour after the start) and the newest, ckpt-5; ckpt-1, 2 and 4 go."""
    import types

    from tensorflow.python.checkpoint import checkpoint_management

    clock = [1_000_000.0]
    monkeypatch.setattr(checkpoint_management, "time", types.SimpleNamespace(time=lambda: clock[0]))
    store, weights = _store(tmp_path, max_to_keep=1, keep_every_n_hours=1.0)
    for step, hours in enumerate([0, 0.5, 1.2, 1.5, 2.5], start=1):
        clock[0] = 1_000_000.0 + hours * 3600
        weights.assign_add(tf.ones_like(weights))
        store.save(step)
    store.wait()
    prefixes = list_checkpoints(str(tmp_path))
    assert [os.path.basename(p) for p in prefixes] == ["ckpt-3", "ckpt-5"]
    assert all(verify(p).ok for p in prefixes)
    assert not any(n.startswith(("ckpt-1.", "ckpt-2.", "ckpt-4.")) for n in os.listdir(tmp_path))


def test_retention_deletes_in_place_when_the_trash_cannot_be_made(tmp_path, moves):
    """A file named .deleting is in the way (as no room for the folder would be): the
    retired checkpoints are deleted in place and the saves go on."""
    store, weights = _store(tmp_path, max_to_keep=1)
    (tmp_path / TRASH_DIR).write_text("not a folder")
    for step in range(1, 4):
        weights.assign_add(tf.ones_like(weights))
        store.save(step)
    store.wait()
    assert moves == [] and (tmp_path / TRASH_DIR).read_text() == "not a folder"
    assert sorted(os.listdir(tmp_path)) == sorted(
        [
            TRASH_DIR,
            "checkpoint",
            "ckpt-3.index",
            "ckpt-3.data-00000-of-00001",
            "ckpt-3" + MANIFEST_SUFFIX,
        ]
    )
    assert verify(str(tmp_path / "ckpt-3")).ok


def test_a_non_chief_worker_retires_its_temp_checkpoints_in_place(tmp_path, moves):
    """A non-chief worker saves into its own temp dir, which no deleter thread empties:
    retention there deletes in place, and nothing is written into the chief's directory."""
    from trainer.distribute.placement import _NonChiefStore

    chief, temp = tmp_path / "chief", tmp_path / "worker-temp"
    os.makedirs(chief)
    weights = tf.Variable(np.arange(50_000, dtype=np.float32))
    store = _NonChiefStore(
        str(chief),
        str(temp),
        tf.train.Checkpoint(weights=weights),
        max_to_keep=3,
        keep_every_n_hours=None,
        manifest_extra={},
    )
    for step in range(1, 4):
        weights.assign_add(tf.ones_like(weights))
        store.save(step)
    store.wait()
    assert moves == [] and os.listdir(chief) == []
    assert sorted(os.listdir(temp)) == ["checkpoint", "ckpt-3.data-00000-of-00001", "ckpt-3.index"]


KILLED_IN_RETENTION = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    import tensorflow as tf
    from test_checkpoints import _store
    store, weights = _store({d!r}, max_to_keep=1)
    store.save(1)
    weights.assign_add(tf.ones_like(weights)); store.save(2)
    retire = store.manager._retire
    def die(prefix):
        retire(prefix)  # ckpt-2's files and manifest are gone...
        os._exit(9)  # ...and the state file still names ckpt-1 (written at the first save)
    store.manager._retire = die
    weights.assign_add(tf.ones_like(weights)); store.save(3)
    """
)


@pytest.mark.slow
def test_a_kill_between_retention_and_the_state_file_is_mended_on_resume(tmp_path):
    """The state file is written after retention, at most every STATE_EVERY seconds (here at
    the first save only): a kill leaves it naming a checkpoint retention has deleted. Resume
    goes by the manifests, takes ckpt-3, rewrites the state file, and retention goes on
    from there."""
    script = KILLED_IN_RETENTION.format(tests=str(REPO / "tests"), d=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env(), capture_output=True, timeout=120
    )
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    stale = tf.train.get_checkpoint_state(str(tmp_path))
    assert os.path.basename(stale.model_checkpoint_path) == "ckpt-1"
    assert not os.path.exists(tmp_path / "ckpt-1.index")

    chosen = integrity.recover(str(tmp_path), report=io.StringIO())
    assert chosen.step == 3 and chosen.ok
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-3")
    store, weights = _store(tmp_path, max_to_keep=1)
    store.restore(chosen.prefix)
    np.testing.assert_array_equal(weights.numpy(), np.arange(50_000, dtype=np.float32) + 2)
    store.save(4)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["ckpt-4"]


def test_files_a_killed_run_left_in_the_trash_are_removed_when_the_next_run_starts(tmp_path):
    os.makedirs(tmp_path / TRASH_DIR)
    (tmp_path / TRASH_DIR / "ckpt-3.data-00000-of-00001").write_bytes(b"x" * 1000)
    store, _ = _store(tmp_path)
    store.wait()  # no save yet: the space is freed before the first one needs it
    assert not os.path.exists(tmp_path / TRASH_DIR)
    store.save(1)
    assert verify(str(tmp_path / "ckpt-1")).ok


def test_a_checkpoint_the_state_file_never_listed_is_still_retired(tmp_path, compose):
    """A kill after ckpt-6's manifest but before TensorFlow updated the state file leaves a
    good ckpt-6 that the state file does not list. The resume adopts it, so retention
    deletes it in turn instead of keeping it forever."""
    from trainer import app

    run = tmp_path / "run"
    base = ["trainer.eval_every=1000", "checkpoint.every=2", "checkpoint.max_to_keep=2"]
    assert app.run(compose([*base, "trainer.max_steps=7", "trainer.stop_at=6"]), str(run)) == 0
    ck = run / "checkpoints"
    state = (ck / "checkpoint").read_text()
    assert '"ckpt-6"' in state
    # the state file as it was before ckpt-6: ckpt-4 newest, ckpt-6 unknown to it
    (ck / "checkpoint").write_text(
        "\n".join(
            line.replace('"ckpt-6"', '"ckpt-4"') if line.startswith("model_") else line
            for line in state.splitlines()
            if '"ckpt-6"' not in line or line.startswith("model_")
        )
    )
    assert tf.train.get_checkpoint_state(str(ck)).model_checkpoint_path.endswith("ckpt-4")
    assert app.run(compose([*base, "trainer.max_steps=12"]), str(run)) == 0
    assert [os.path.basename(p) for p in list_checkpoints(str(ck))] == ["ckpt-10", "ckpt-12"]


def test_checkpoints_without_a_state_file_are_retired_too(tmp_path, compose):
    """A kill during the first save can leave good checkpoints and no state file yet."""
    from trainer import app

    run = tmp_path / "run"
    base = ["trainer.eval_every=1000", "checkpoint.every=2", "checkpoint.max_to_keep=1"]
    assert app.run(compose([*base, "trainer.max_steps=5", "trainer.stop_at=2"]), str(run)) == 0
    (run / "checkpoints" / "checkpoint").unlink()
    assert app.run(compose([*base, "trainer.max_steps=8"]), str(run)) == 0
    assert [os.path.basename(p) for p in list_checkpoints(str(run / "checkpoints"))] == ["ckpt-8"]


def test_the_state_file_is_written_at_the_end_and_when_a_checkpoint_is_kept_for_hours(
    tmp_path, monkeypatch
):
    """TensorFlow's state file is not rewritten at every save (at most every STATE_EVERY s),
    but TensorFlow's own tools find the newest checkpoint once the run's writes are waited
    for; a checkpoint keep_every_n_hours keeps out of retention's list is written at once
    (a recover() after a kill would take an unlisted newer checkpoint for a retained one)."""
    from trainer.checkpoint import manager

    clock = [1000.0]
    monkeypatch.setattr(manager, "_clock", lambda: clock[0])
    store, weights = _store(tmp_path, max_to_keep=2)
    store.save(1)  # the first save writes it
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-1")
    clock[0] += 1
    store.save(2)
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-1")  # not yet
    clock[0] += manager.STATE_EVERY
    store.save(3)
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-3")
    store.save(4)
    store.wait()  # the end of a run
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-4")

    hours = tmp_path / "hours"
    store = CheckpointStore(
        str(hours),
        tf.train.Checkpoint(w=tf.Variable(1.0)),
        max_to_keep=1,
        keep_every_n_hours=1e-9,  # every checkpoint retention sweeps is kept instead
        manifest_extra={},
    )
    store.save(1)
    clock[0] += 1
    store.save(2)  # ckpt-1 kept out of the list: written now, though within STATE_EVERY
    state = tf.train.get_checkpoint_state(str(hours))
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == ["ckpt-2"]
