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


def _writer_run(tmp_path, variables: dict, saves: int = 3) -> tuple[list[str], list[str], dict]:
    """`saves` async saves of `variables` (changed between saves), each compared with a sync
    save of the same values: (who wrote each, the async files' directory listing, the
    writer's bundle_save plans or the reasons it has none)."""
    ckpt = tf.train.Checkpoint(**variables)
    sync, fast = (
        CheckpointStore(
            str(tmp_path / name),
            ckpt,
            max_to_keep=5,
            keep_every_n_hours=None,
            manifest_extra={},
            async_write=name == "async",
        )
        for name in ("sync", "async")
    )
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
        writers.append(fast.async_writer.last_writer)
        assert verify(str(tmp_path / "async" / f"ckpt-{at}")).ok
        for name in (f"ckpt-{at}.index", f"ckpt-{at}.data-00000-of-00001"):
            assert (tmp_path / "sync" / name).read_bytes() == (
                tmp_path / "async" / name
            ).read_bytes()
    names = sorted(p.name for p in (tmp_path / "async").iterdir())
    return writers, names, fast.async_writer._bundles


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
    store = CheckpointStore(
        str(tmp_path),
        ckpt,
        max_to_keep=5,
        keep_every_n_hours=None,
        manifest_extra={},
        async_write=True,
    )
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
