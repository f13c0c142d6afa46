"""data=records: the converter, the stream's order and exact resume, bad shards, batch ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import FAST, run_cli, train, train_in_process

from trainer.data.make_records import encode_examples


# ---------------------------------------------------------------- helpers
def make_records(out: Path, *overrides: str, shards: int = 8, in_process: bool = True) -> dict:
    """The description written by scripts/make_records.py: its main() in this process, or
    (in_process=False) the script as users run it."""
    args = [*overrides, "--out", str(out), "--shards", str(shards), "--quiet"]
    if in_process:
        import contextlib
        import io

        from trainer.data.make_records import main

        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(args)
        assert code == 0, err.getvalue()
    else:
        proc = run_cli("scripts/make_records.py", *args)
        assert proc.returncode == 0, proc.stderr
    return json.loads((out / "description.json").read_text())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The default synthetic set (2048 rows, 10 features) in 8 training shards."""
    out = tmp_path_factory.mktemp("records") / "synth"
    make_records(out, "data=synthetic_regression")
    return out


def records_args(dataset: Path) -> list[str]:
    return ["data=records", f"data.files={dataset}/train-*.tfrecord", *FAST, "trainer.max_steps=60"]


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """One uninterrupted 60-step run on the records, on one device."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = train_in_process(run, *records_args(dataset))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def open_data(compose, path: Path, *overrides: str):
    from trainer.data.memory import load_data

    return load_data(
        compose(["data=records", f"data.files={path}/train-*.tfrecord", *overrides]).data
    )


def rows_of(data, start: int, steps: int, part=(0, 1), batch: int = 32) -> list:
    """(x, id terms) of `steps` batches of the training stream from step `start`."""
    ds = data.train_dataset(batch, 0, start, part=part)
    return [(x.numpy(), terms.numpy()) for x, _, terms in ds.take(steps)]


def shard_ids(path: Path) -> dict[str, set[int]]:
    spec = {"id": tf.io.FixedLenFeature([], tf.int64)}
    out = {}
    for f in sorted(path.glob("train-*.tfrecord")):
        ds = (
            tf.data.TFRecordDataset(str(f))
            .batch(4096)
            .map(lambda s: tf.io.parse_example(s, spec)["id"])
        )
        out[f.name] = {int(i) for b in ds for i in b.numpy()}
    return out


# ---------------------------------------------------------------- the converter
def test_encoded_examples_parse_as_tf_train_example():
    """The hand-encoded bytes are exactly tf.train.Example's: float and integer labels,
    ids of every varint length, multi-dimensional features."""
    rng = np.random.default_rng(0)
    ids = np.array([0, 127, 128, 2**21, 2**40 + 5], np.int64)
    x = rng.normal(size=(5, 3, 2)).astype(np.float32)
    for y in (rng.normal(size=(5, 2)).astype(np.float32), np.array([0, 9, 300, 1, 2])):
        for i, record in enumerate(encode_examples(ids, x, y)):
            ex = tf.train.Example.FromString(record)
            f = ex.features.feature
            assert list(f["id"].int64_list.value) == [ids[i]]
            assert np.array_equal(np.array(f["x"].float_list.value, np.float32), x[i].ravel())
            got = f["y"].int64_list.value if y.dtype.kind == "i" else f["y"].float_list.value
            assert np.array_equal(np.array(got), np.ravel(y[i]))


def test_converter_writes_every_row_once_with_its_split(tmp_path, compose):
    """A CSV file (the issue's example) becomes shards whose ids are exactly the source's rows,
    split as in-memory training splits them; the description counts and checksums them."""
    from trainer.data.memory import load_data

    csv = tmp_path / "houses.csv"
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(300, 4)).round(3)
    csv.write_text("a,b,c,price\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    desc = make_records(  # the script as users run it
        tmp_path / "houses",
        "data=csv",
        f"data.path={csv}",
        "data.target=price",
        shards=4,
        in_process=False,
    )
    assert desc["feature_shape"] == [3] and desc["task"] == "regression"
    train = [s for s in desc["shards"] if s["split"] == "train"]
    assert len(train) == 4 and sum(s["examples"] for s in train) == desc["examples"]["train"]
    mem = load_data(compose(["data=csv", f"data.path={csv}", "data.target=price"]).data)
    got = set().union(*shard_ids(tmp_path / "houses").values())
    assert got == set(mem.train_ids.tolist())  # the same training rows as in memory
    # a second conversion into the same directory is refused, and changes nothing
    before = {p.name: p.read_bytes() for p in (tmp_path / "houses").iterdir()}
    proc = run_cli(
        "scripts/make_records.py",
        "data=csv",
        f"data.path={csv}",
        "data.target=price",
        "--out",
        str(tmp_path / "houses"),
    )
    assert proc.returncode == 2 and "--out" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "houses").iterdir()} == before


def test_synthetic_rows_do_not_depend_on_the_dataset_size(compose):
    """Synthetic rows are drawn in seeded blocks: the first N rows of a bigger set are the
    smaller set (so a 5 GB set is converted block by block, in little memory)."""
    from trainer.data.memory import read_source

    small = read_source(compose(["data.num_samples=100"]).data)
    big = read_source(compose(["data.num_samples=70000"]).data)
    assert np.array_equal(small[0], big[0][:100]) and np.array_equal(small[1], big[1][:100])


# ---------------------------------------------------------------- the stream
@pytest.mark.parametrize(
    "layout",
    [
        ["data.shuffle_buffer=64", "data.cycle_shards=2"],  # shards interleaved, many windows
        [],  # the defaults here: each block read in order and permuted as one window
    ],
)
def test_resume_at_any_step_gives_the_same_batches(dataset, compose, layout):
    """Starting the stream at step s (mid-window, mid-block, at and across epoch ends) gives
    exactly the tail of the stream from step 0: the position is the step alone."""
    data = open_data(compose, dataset, *layout)
    spe = data.steps_per_epoch(32)
    full = rows_of(data, 0, 2 * spe + 3)
    for s in (1, 5, spe // 2 + 1, spe - 1, spe, spe + 7, 2 * spe):
        tail = rows_of(data, s, 2 * spe + 3 - s)
        for (xa, ta), (xb, tb) in zip(full[s:], tail, strict=True):
            assert np.array_equal(xa, xb) and np.array_equal(ta, tb), s


def test_the_stream_does_not_depend_on_how_the_files_are_listed(dataset, compose):
    """A glob or the same shards listed in another order: the same stream and signature."""
    names = sorted(p.name for p in dataset.glob("train-*.tfrecord"))
    listed = "[" + ",".join(str(dataset / n) for n in reversed(names)) + "]"
    a = open_data(compose, dataset)
    from trainer.data.memory import load_data

    b = load_data(compose(["data=records", f"data.files={listed}"]).data)
    assert a.signature() == b.signature()
    for (xa, ta), (xb, tb) in zip(rows_of(a, 0, 5), rows_of(b, 0, 5), strict=True):
        assert np.array_equal(xa, xb) and np.array_equal(ta, tb)


def test_epochs_are_seeded_permutations_mixing_shards(dataset, compose):
    """Each epoch draws distinct examples; epochs and seeds differ; a batch mixes shards."""
    data = open_data(compose, dataset)
    spe = data.steps_per_epoch(32)

    def epoch_rows(seed, epoch):
        ds = data.train_dataset(32, seed, epoch * spe)
        return np.concatenate([x.numpy() for x, _, _ in ds.take(spe)])

    e0, e1, other = epoch_rows(0, 0), epoch_rows(0, 1), epoch_rows(1, 0)
    assert len({r.tobytes() for r in e0}) == len(e0) == spe * 32  # rows are unique here
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, other)
    owner = _row_owner(dataset)
    for batch in (e0[:32], e1[:32], e0[-32:]):
        assert len({owner[r.tobytes()] for r in batch}) >= 4  # one shard per lane at least


def _row_owner(path: Path) -> dict[bytes, str]:
    spec = {"x": tf.io.FixedLenFeature([10], tf.float32)}
    out = {}
    for f in sorted(path.glob("train-*.tfrecord")):
        for b in (
            tf.data.TFRecordDataset(str(f))
            .batch(4096)
            .map(lambda s: tf.io.parse_example(s, spec)["x"])
        ):
            for r in b.numpy():
                out[r.tobytes()] = f.name
    return out


def test_workers_read_their_own_lanes_and_together_make_the_global_batch(dataset, compose):
    """Pipeline i of n (one per worker) yields rows [i*B/n, (i+1)*B/n) of each global batch,
    read from its own lanes' shards only."""
    data = open_data(compose, dataset)
    owner = _row_owner(dataset)
    whole = rows_of(data, 3, 20)
    parts = [rows_of(data, 3, 20, part=(i, 2)) for i in range(2)]
    for step, (x, terms) in enumerate(whole):
        assert np.array_equal(x, np.concatenate([parts[0][step][0], parts[1][step][0]]))
        assert np.isclose(
            terms.sum(), parts[0][step][1].sum() + parts[1][step][1].sum(), rtol=0, atol=0
        )
    per_epoch = [{owner[r.tobytes()] for x, _ in p for r in x} for p in parts]
    assert not per_epoch[0] & per_epoch[1]  # no shard read by both workers in this epoch


# ---------------------------------------------------------------- training on records
def test_training_resumes_exactly_and_records_batch_ids(dataset, reference, tmp_path):
    """Stopped mid-epoch and resumed: the same losses and batch ids at every step as the
    uninterrupted run; a metrics row edited to name other examples is a difference."""
    from trainer.verify.compare import compare_runs

    common = records_args(dataset)
    a = str(reference)  # compare_runs only reads it
    assert train_in_process(tmp_path / "b", *common, "trainer.stop_at=27").returncode == 0
    assert train_in_process(tmp_path / "b", *common).returncode == 0
    report = compare_runs(a, str(tmp_path / "b"))
    assert report["ok"], report
    assert report["other_tags"]["train/batch_ids_hash"]["steps_compared"] == 60
    # the same losses, other examples: edit one row's hash in a copy of b
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    rows = (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()
    edited = []
    for line in rows:
        row = json.loads(line)
        if row.get("step") == 41 and "batch_ids_hash" in row:
            row["batch_ids_hash"] += 1
        edited.append(json.dumps(row))
    (tmp_path / "c" / "metrics.jsonl").write_text("\n".join(edited) + "\n")
    report = compare_runs(a, str(tmp_path / "c"))
    assert not report["ok"]
    assert report["other_tags"]["train/batch_ids_hash"]["first_divergent_step"] == 41
    assert report["curve"]["first_divergent_step"] is None  # the losses alone would pass


def test_a_run_across_epochs_prints_no_tensorflow_error_lines(dataset, tmp_path):
    """The real CLI (TensorFlow's C++ log goes to the process's stderr) over three epoch ends,
    where each lane's last window is cut: not one of TensorFlow's log lines (`E0000 ...`),
    such as "Tensor RefCount not reliable if buf_ points to a SubBuffer", which a cut made
    as a slice printed a few times an epoch."""
    import re

    r = train(tmp_path / "run", *records_args(dataset), "trainer.max_steps=160")
    assert r.returncode == 0, r.stderr[-2000:]
    logged = [line for line in r.stderr.splitlines() if re.match(r"[EWF]\d{4} ", line)]
    assert not logged, logged[:5]


# ---------------------------------------------------------------- bad input
def _copy(dataset: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(dataset, dst)
    return dst


def _refused(tmp_path: Path, files: str, *overrides: str) -> str:
    run = tmp_path / "run"
    proc = train(run, "data=records", f"data.files={files}", *FAST, *overrides)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    return proc.stderr


def _problem(compose, files: str, *overrides: str) -> str:
    """The one-line UserError opening the records gives (what the CLI prints, exit 2)."""
    from trainer.config import UserError
    from trainer.data.memory import load_data

    with pytest.raises(UserError) as e:
        load_data(compose(["data=records", f"data.files={files}", *overrides]).data)
    return str(e.value)


def test_bad_shards_and_descriptions_are_named(dataset, tmp_path, compose):
    d = _copy(dataset, tmp_path)
    assert "no file matches" in _problem(compose, f"{d}/nothing-*.tfrecord")
    (d / "train-00003-of-00008.tfrecord").rename(tmp_path / "aside")
    err = _problem(compose, f"{d}/train-*.tfrecord")
    assert "train-00003-of-00008.tfrecord" in err and "missing" in err
    (tmp_path / "aside").rename(d / "train-00003-of-00008.tfrecord")
    assert "empty list" in _problem(compose, "[]")
    assert "a val shard" in _problem(compose, f"{d}/*.tfrecord")  # the glob takes val-* too
    # another dataset's description beside these shards
    other = tmp_path / "other"
    make_records(other, "data=synthetic_regression", "data.num_samples=1500")
    shutil.copy(other / "description.json", d / "description.json")
    assert "another dataset" in _problem(compose, f"{d}/train-*.tfrecord")
    # a description whose features are not the records': the shard and record are named
    desc = json.loads((dataset / "description.json").read_text())
    desc["feature_shape"] = [11]
    (d / "description.json").write_text(json.dumps(desc))
    err = _problem(compose, f"{d}/train-*.tfrecord")
    assert "train-00000-of-00008.tfrecord record 0" in err and "do not match" in err


def test_a_damaged_shard_is_refused_or_stops_training(dataset, tmp_path):
    """One flipped byte in a shard: refused at start (its checksum), exit 2, nothing written;
    with data.verify=sizes, the record CRC stops training at that record, exit 2, and the
    checkpoints written before it stay intact."""
    from trainer.checkpoint.manifest import list_checkpoints, verify

    d = _copy(dataset, tmp_path)
    shard = d / "train-00005-of-00008.tfrecord"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    run = tmp_path / "run"
    common = ["data=records", f"data.files={d}/train-*.tfrecord", *FAST, "trainer.max_steps=200"]
    proc = train_in_process(run, *common)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train-00005-of-00008.tfrecord" in proc.stderr and "checksum" in proc.stderr
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    proc = train_in_process(
        run, *common, "data.verify=sizes", "checkpoint.every=5", "data.shuffle_buffer=16"
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "train-00005-of-00008.tfrecord record" in proc.stderr, proc.stderr
    assert "corrupted record" in proc.stderr
    saved = list_checkpoints(str(run / "checkpoints"))
    assert saved and all(verify(p).ok for p in saved)  # the saves before the bad record: intact
    # a damaged validation shard stops the run at the eval that reads it, named the same way
    shutil.copy(dataset / shard.name, shard)
    val = d / "val-00001-of-00002.tfrecord"
    raw = bytearray(val.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    val.write_bytes(bytes(raw))
    proc = train_in_process(
        tmp_path / "eval", *common, "data.verify=sizes", "trainer.eval_every=10"
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "val-00001-of-00002.tfrecord record" in proc.stderr


def test_every_topology_trains_on_the_same_examples(dataset, reference, tmp_path):
    """One device, two mirrored replicas and two worker processes (each reading only its
    own lanes' shards): the same examples in the same order at every step."""
    from trainer.sweep.runinfo import read_metrics

    common = [*records_args(dataset), "trainer.max_steps=24"]
    mirrored = ["distribute=mirrored", "distribute.logical_cpus=2"]
    proc = train(tmp_path / "mirrored", *common, *mirrored)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli(
        "scripts/launch_local_workers.py",
        "2",
        "--timeout",
        "150",
        "--",
        *common,
        "distribute=multi_worker",
        f"hydra.run.dir={tmp_path / 'workers'}",
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    def hashes(run):
        return {
            r["step"]: r["batch_ids_hash"] for r in read_metrics(str(run)) if "batch_ids_hash" in r
        }

    ref = {step: h for step, h in hashes(reference).items() if step <= 24}
    assert sorted(ref) == list(range(1, 25))
    for name in ("mirrored", "workers"):
        assert hashes(tmp_path / name) == ref, name


def test_classification_records_keep_their_labels(tmp_path, compose):
    """digits (10 classes, integer labels) through the converter: the same task, classes and
    label of every training row as in memory."""
    from trainer.data.memory import load_data

    make_records(tmp_path / "digits", "data=digits", shards=4)
    rec = open_data(compose, tmp_path / "digits", "data.lanes=2")
    mem = load_data(compose(["data=digits"]).data)
    assert (rec.task, rec.output_units, rec.feature_shape) == ("classification", 10, (64,))
    label = {int(i): int(y) for i, y in zip(mem.train_ids, mem.y_train, strict=True)}
    spec = {"id": tf.io.FixedLenFeature([], tf.int64)}
    x, y, _ = next(iter(rec.train_dataset(32, 0, 0)))
    assert y.dtype == tf.int32
    ids = []
    for s in rec.train:  # which ids are these rows? match them by features
        for b in tf.data.TFRecordDataset(s.path).batch(4096):
            ids += tf.io.parse_example(b, spec)["id"].numpy().tolist()
    assert set(ids) == set(label)
    by_row = {r.tobytes(): int(i) for r, i in zip(mem.x_train, mem.train_ids, strict=True)}
    assert [label[by_row[r.tobytes()]] for r in x.numpy()] == y.numpy().tolist()


@pytest.mark.slow
def test_sigkills_at_random_moments_across_epochs_resume_exactly(dataset, tmp_path):
    """A data=records run of four 25-step epochs (batch 64) killed by SIGKILL three times, at
    a random step of each of its first three epochs (or just past its end), then at the next
    moment of a random kind: mid-chunk, mid-checkpoint-write or at a log flush
    (trainer/verify/chaos.py). Each time the same command resumes it; the final metrics.jsonl
    (every row and field) and every tensor of the final checkpoint equal those of the same
    command run uninterrupted, bit for bit."""
    import random
    import time

    from trainer.checkpoint.manifest import step_of
    from trainer.verify import chaos
    from trainer.verify.compare import compare_checkpoints, metrics_rows, newest_checkpoint
    from trainer.verify.resume import start

    args = [*records_args(dataset), "data.batch_size=64", "trainer.max_steps=100"]
    args += ["trainer.eval_every=25", "checkpoint.every=5"]
    spe, out, run = 25, str(tmp_path), str(tmp_path / "run")
    # the uninterrupted run: no kill in it, so in this process
    reference = train_in_process(tmp_path / "reference", *args)
    assert reference.returncode == 0, reference.stderr[-3000:]

    def newest(run_dir: str) -> int | None:
        prefix = newest_checkpoint(run_dir)
        return step_of(prefix) if prefix else None

    rng, kills = random.Random(27), []
    for i, kind in enumerate(chaos.plan(3, seed=27)):
        before = newest(run)
        at = rng.randint(i * spe + 3, (i + 1) * spe + 8)  # a step of epoch i, or just past it
        phase = start(f"killed-{i + 1}", args, run, out)
        try:  # not before this process said it dropped the earlier one's logs, and logged `at`
            kill = chaos.kill_at_random(
                phase.proc,
                run,
                kind,
                rng,
                0.05,
                time.monotonic() + 300,
                newest,
                log=phase.log,
                not_before=at - 1,
            )
        finally:
            if phase.proc.poll() is None:
                phase.proc.kill()
            phase.proc.wait()
        text = Path(phase.log).read_text()
        assert kill is not None, f"run {i + 1} ended before its kill:\n{text}"
        assert before is None or f"Resuming from step {before}:" in text, text
        assert kill.last_logged_step >= at, (kill, at)
        kills.append((kind, kill.last_logged_step, kill.newest_checkpoint))
    assert len({step // spe for _, step, _ in kills}) >= 2, kills  # killed in several epochs

    last = newest(run)
    final = start("final", args, run, out)
    assert final.proc.wait(timeout=300) == 0, Path(final.log).read_text()[-3000:]
    assert f"Resuming from step {last}:" in Path(final.log).read_text()
    ref = str(tmp_path / "reference")
    rows = metrics_rows(run)
    assert rows == metrics_rows(ref), kills
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 101))
    state = compare_checkpoints(newest_checkpoint(ref), newest_checkpoint(run))
    assert state.equal and state.step_a == state.step_b == 100, (state, kills)
