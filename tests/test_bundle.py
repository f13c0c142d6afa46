"""TensorFlow's checkpoint files written by trainer/checkpoint/bundle.py (async saves of small
states, bundle_save.py): the same bytes as TensorFlow's own save, or TensorFlow's save."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.checkpoint import save_util

from trainer.checkpoint import bundle, bundle_save
from trainer.checkpoint.manifest import verify
from trainer.checkpoint.store import CheckpointStore, _files_on_disk

CASES = {
    "float32 and int64": lambda: {
        "w": tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "step": tf.Variable(3, dtype=tf.int64),
    },
    "every kind of element": lambda: {
        "f16": tf.Variable(np.ones(3, np.float16)),
        "bf16": tf.Variable(tf.ones((2, 2), tf.bfloat16)),
        "f64": tf.Variable(np.float64(-0.5)),
        "bool": tf.Variable([True, False, True]),
        "i8": tf.Variable(np.int8(-3)),
        "u32": tf.Variable(np.uint32(7)),
        "c64": tf.Variable(np.complex64(1 + 2j)),
        "strings": tf.Variable([b"ab", b"", b"xyz" * 100, bytes(range(256))]),
        "empty": tf.Variable(np.zeros((0, 4), np.float32)),
    },
    # an index larger than one 256 KiB block: several blocks, separators, restart points
    "9000 variables": lambda: {f"v{i:05d}": tf.Variable(np.float32(i)) for i in range(9000)},
}


@pytest.mark.parametrize("case", list(CASES))
def test_bundle_files_equal_tensorflows_own_bit_for_bit(tmp_path, case):
    ckpt = tf.train.Checkpoint(**CASES[case]())
    ckpt.write(str(tmp_path / "tf"))
    tensors, _, _, proto = save_util.serialize_graph_view(ckpt._saver._graph_view, None)
    keys, values, dtypes = [], [], []
    for by_key in tensors.values():
        for key, value in by_key.items():
            value = getattr(value, "tensor", value)  # (a variable's deferred read)
            value = value() if callable(value) else value
            keys.append(key)
            dtypes.append(value.dtype.as_datatype_enum)
            values.append(
                np.asarray(value.numpy(), dtype=object if value.dtype == tf.string else None)
            )
    keys.append("_CHECKPOINTABLE_OBJECT_GRAPH")
    dtypes.append(bundle.DT_STRING)
    values.append(np.array(proto.SerializeToString(), dtype=object))
    written = bundle.write(str(tmp_path / "own"), bundle.Layout(keys, dtypes), values)
    assert written.paths == [str(tmp_path / "own.data-00000-of-00001"), str(tmp_path / "own.index")]
    # what the manifest is told: the files' sizes and the index's SHA-256, as on the disk
    assert written.manifest_files() == _files_on_disk(written.paths)
    for suffix in (".index", ".data-00000-of-00001"):
        assert (tmp_path / f"own{suffix}").read_bytes() == (tmp_path / f"tf{suffix}").read_bytes()
    reader = tf.train.load_checkpoint(str(tmp_path / "own"))  # (TensorFlow checks the CRCs)
    for key, value in zip(keys[:-1], values[:-1], strict=True):
        np.testing.assert_array_equal(reader.get_tensor(key), value)


def _writer_run(
    tmp_path, variables: dict, saves: int = 3, inline: bool = False
) -> tuple[list[str], list[str], dict]:
    """`saves` async saves of `variables` (changed between saves), each compared with a sync
    save of the same values by TensorFlow's eager save: (who wrote each, the async files'
    directory listing, the writer's bundle_save plans or the reasons it has none). `inline`:
    synchronous saves by the snapshot and writer (snapshot_sync) in place of the async ones."""
    ckpt = tf.train.Checkpoint(**variables)
    sync, fast = (
        _store(
            tmp_path / name,
            ckpt,
            async_write=name == "async" and not inline,
            snapshot_sync=name == "async" and inline,
        )
        for name in ("sync", "async")
    )
    assert sync._inline is None and (fast._inline is not None) == inline
    writers = []
    for at in range(1, saves + 1):
        for v in variables.values():
            if v.dtype == tf.string:  # longer at every save: other offsets, sizes, lengths
                v.assign(tf.strings.join([v, "x" * at]))
            else:
                v.assign_add(tf.ones_like(v))
        sync.save(at)
        ckpt.save_counter.assign_sub(1)  # the async save numbers itself as the sync one did
        fast.save(at)
        fast.wait()
        writers.append((fast._inline or fast.async_writer).last_writer)
        assert verify(str(tmp_path / "async" / f"ckpt-{at}")).ok
        for name in (f"ckpt-{at}.index", f"ckpt-{at}.data-00000-of-00001"):
            assert (tmp_path / "sync" / name).read_bytes() == (
                tmp_path / "async" / name
            ).read_bytes()
    names = sorted(p.name for p in (tmp_path / "async").iterdir())
    return writers, names, (fast._inline or fast.async_writer)._bundles


def test_sync_saves_of_small_states_are_written_by_the_bundle_writer_too(tmp_path):
    """snapshot_sync (what a run on one device uses): TensorFlow's eager save writes the
    first save, the project's writer the later ones, the same bytes as TensorFlow's."""
    variables = {"w": tf.Variable(tf.zeros((64, 64))), "s": tf.Variable([b"a", b"bc"])}
    writers, names, plans = _writer_run(tmp_path, variables, saves=4, inline=True)
    assert writers == ["tensorflow", "bundle", "bundle", "bundle"]
    assert [type(p) for p in plans.values()] == [bundle_save.BundleSaver]
    assert not [n for n in names if "temp" in n]


def _store(directory, ckpt, **kw) -> CheckpointStore:
    return CheckpointStore(
        str(directory), ckpt, max_to_keep=5, keep_every_n_hours=None, manifest_extra={}, **kw
    )


def _sync_store(tmp_path, ckpt) -> CheckpointStore:
    return _store(tmp_path, ckpt, snapshot_sync=True)


def test_a_sync_save_writes_objects_created_after_the_last_one(tmp_path):
    """A synchronous save is never refused for a changed object graph (an async one is): it
    plans again and writes the new objects."""
    ckpt = tf.train.Checkpoint(w=tf.Variable(tf.zeros((4,))))
    store = _sync_store(tmp_path, ckpt)
    store.save(1)
    store.save(2)
    assert store._inline.last_writer == "bundle"
    ckpt.late = tf.Variable(tf.fill((3,), 7.0))  # created during training
    store.save(3)
    assert store._inline.last_writer == "tensorflow"  # (a new graph: its first save)
    store.save(4)
    assert store._inline.last_writer == "bundle"
    reader = tf.train.load_checkpoint(str(tmp_path / "ckpt-4"))
    np.testing.assert_array_equal(reader.get_tensor("late/.ATTRIBUTES/VARIABLE_VALUE"), [7.0] * 3)
    assert verify(str(tmp_path / "ckpt-4")).ok


def test_a_sync_save_of_state_the_snapshot_cannot_read_uses_tensorflows_save(tmp_path):
    """Python state (here a NumPy array tracked by tf.train.Checkpoint) cannot be snapshotted:
    the store saves with TensorFlow's eager save from then on, and the state is in it."""
    from tensorflow.python.trackable import python_state

    class Numbers(python_state.PythonState):
        def __init__(self):
            self.values = np.arange(3)

        def serialize(self):
            return self.values.tobytes()

        def deserialize(self, string_value):
            self.values = np.frombuffer(string_value, dtype=self.values.dtype).copy()

    numbers = Numbers()
    ckpt = tf.train.Checkpoint(w=tf.Variable(tf.zeros((2,))), numbers=numbers)
    store = _sync_store(tmp_path, ckpt)
    store.save(1)
    assert store._inline is None
    numbers.values = np.array([5, 6, 7])
    store.save(2)
    numbers.values = np.zeros(3, dtype=int)
    ckpt.restore(str(tmp_path / "ckpt-2"))
    np.testing.assert_array_equal(numbers.values, [5, 6, 7])
    assert verify(str(tmp_path / "ckpt-2")).ok


def test_small_states_are_written_by_the_bundle_writer_after_the_first_save(tmp_path):
    writers, names, plans = _writer_run(tmp_path, {"w": tf.Variable(tf.zeros((64, 64)))})
    assert writers == ["tensorflow", "bundle", "bundle"]
    assert [type(p) for p in plans.values()] == [bundle_save.BundleSaver]
    assert not [n for n in names if "temp" in n]  # no leftovers of either writer


def test_strings_that_grow_between_saves_are_written_as_tensorflow_writes_them(tmp_path):
    variables = {"s": tf.Variable([b"a", b"bc"]), "w": tf.Variable(tf.zeros((3,)))}
    writers, _, _ = _writer_run(tmp_path, variables, saves=4)
    assert writers == ["tensorflow", "bundle", "bundle", "bundle"]


def test_a_state_above_the_limit_keeps_tensorflows_save(tmp_path, capfd):
    floats = bundle_save.OWN_MAX_BYTES // 4 + 1
    writers, _, plans = _writer_run(tmp_path, {"w": tf.Variable(tf.zeros((floats,)))})
    assert writers == ["tensorflow"] * 3
    assert list(plans.values()) == [f"{4 * floats + 8} bytes"]  # (the save counter's 8)
    assert "checkpoint.async" not in capfd.readouterr().err  # (the plan for large states)


def test_bytes_that_differ_from_tensorflows_keep_tensorflows_save(tmp_path, monkeypatch, capfd):
    """As if TensorFlow's format had moved on (another producer version in the header): the
    first save's comparison sees other bytes, every save stays TensorFlow's, and the user is
    told once why."""
    monkeypatch.setattr(bundle, "_HEADER", bytes.fromhex("08011a020802"))
    writers, _, plans = _writer_run(tmp_path, {"w": tf.Variable(tf.zeros((8,)))})
    assert writers == ["tensorflow"] * 3
    assert list(plans.values()) == ["its bytes differ from TensorFlow's files"]
    notes = [line for line in capfd.readouterr().err.splitlines() if "checkpoint.async" in line]
    assert len(notes) == 1 and "its bytes differ from TensorFlow's files" in notes[0], notes


def test_a_failed_bundle_write_surfaces_as_a_disk_error_naming_the_file(tmp_path):
    ckpt = tf.train.Checkpoint(w=tf.Variable(tf.zeros((8,))))
    store = _store(tmp_path, ckpt, async_write=True)
    store.save(1)
    store.wait()
    (tmp_path / "ckpt-2.index").mkdir()  # the index cannot be opened for writing
    store.save(2)
    with pytest.raises(OSError) as err:
        store.wait()
    assert store.async_writer.last_writer == "bundle"
    assert err.value.filename == str(tmp_path / "ckpt-2.index")
    assert err.value.checkpoint_step == 2
    assert not verify(str(tmp_path / "ckpt-2")).ok and verify(str(tmp_path / "ckpt-1")).ok


def test_chaos_sees_a_write_in_progress_without_tensorflows_temp_directory(tmp_path):
    """verify.interrupt=chaos's checkpoint-write kill: the writer of small states leaves no
    `ckpt-N_temp/`, so its data file (written first) or index without a manifest is the sign."""
    from trainer.verify.chaos import writing_checkpoint

    (tmp_path / "ckpt-5.manifest.json.tmp-7").write_text("{")
    (tmp_path / "bad").mkdir()
    assert writing_checkpoint(str(tmp_path)) is None
    (tmp_path / "ckpt-5.data-00000-of-00001").write_bytes(b"x")
    assert writing_checkpoint(str(tmp_path)) == "ckpt-5.data-00000-of-00001"
    (tmp_path / "ckpt-5.index").write_bytes(b"x")
    assert writing_checkpoint(str(tmp_path)) in ("ckpt-5.data-00000-of-00001", "ckpt-5.index")
    (tmp_path / "ckpt-5.manifest.json").write_text("{}")
    assert writing_checkpoint(str(tmp_path)) is None
