"""tf.distribute on CPU: mirrored over 2 logical CPUs, 2 local workers, topology changes, bf16.

Every run with 2 replicas is a real `python -m trainer` process (logical CPU devices must be
configured before TensorFlow starts, which only a fresh process guarantees), as are the
workers. Runs with the default strategy (one replica) go in this process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, env, losses, spawn, train, train_in_process

from trainer.checkpoint.manifest import list_checkpoints, step_of, verify
from trainer.config import UserError
from trainer.summaries import read_metrics

BASE = [
    "trainer.max_steps=30",
    "trainer.log_every=1",
    "trainer.eval_every=15",
    "checkpoint.every=15",
    "checkpoint.max_to_keep=5",
]
TOPOLOGIES = {"mirrored": ["distribute=mirrored", "distribute.logical_cpus=2"], "default": []}
REPLICAS = {"mirrored": 2, "default": 1}


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Uninterrupted 30-step runs with 2 replicas (mirrored) and 1 (default): (run dir, stderr)."""
    root = tmp_path_factory.mktemp("refs")
    mirrored = spawn(root / "mirrored", *BASE, *TOPOLOGIES["mirrored"])
    try:  # the default strategy's run in this process, meanwhile
        default = ok(train_in_process(root / "default", *BASE, *TOPOLOGIES["default"]))
        out, err = mirrored.communicate(timeout=300)
    finally:
        if mirrored.poll() is None:
            mirrored.kill()
            mirrored.communicate()
    ok(subprocess.CompletedProcess(mirrored.args, mirrored.returncode, out, err))
    return {"mirrored": (root / "mirrored", err), "default": (root / "default", default.stderr)}


def train_topology(run: Path, topology: str, *overrides: str) -> subprocess.CompletedProcess:
    """2 replicas: a fresh process (logical CPUs); the default strategy: in this process."""
    if topology == "default":
        return train_in_process(run, *BASE, *TOPOLOGIES[topology], *overrides)
    return train(run, *BASE, *TOPOLOGIES[topology], *overrides)


def read_checkpoint(prefix: str) -> dict[str, np.ndarray]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    return {
        k: reader.get_tensor(k)
        for k in reader.get_variable_to_shape_map()
        if k not in ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/.ATTRIBUTES/VARIABLE_VALUE")
    }


# ---------------------------------------------------------------- in-process checks (fast)
def test_logical_cpus_only_with_mirrored(compose):
    from trainer.distribute.placement import make_strategy

    cfg = compose(["distribute.logical_cpus=2"])
    with pytest.raises(
        UserError, match=r"distribute.logical_cpus: received 2 with distribute=default"
    ):
        make_strategy(cfg.distribute)


def test_multi_worker_needs_tf_config(compose, monkeypatch):
    from trainer.distribute.placement import make_strategy

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UserError, match="TF_CONFIG"):
        make_strategy(compose(["distribute=multi_worker"]).distribute)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(UserError, match=r"TF_CONFIG: received '\{not json'"):
        make_strategy(compose(["distribute=multi_worker"]).distribute)


def test_batch_size_must_divide_replicas():
    from trainer.distribute.placement import check_global_batch

    check_global_batch(32, 2, "mirrored")
    with pytest.raises(UserError, match=r"data.batch_size: received 31.*by the 2 replicas"):
        check_global_batch(31, 2, "mirrored")


def _fake_checkpoint(run: Path, config: dict) -> None:
    import json

    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "ckpt-10.index").write_bytes(b"")
    (run / "checkpoints" / "ckpt-10.manifest.json").write_text(json.dumps({"config": config}))


def test_resume_refuses_switching_loss_scaling(compose, tmp_path):
    from trainer.distribute.placement import check_resume

    _fake_checkpoint(tmp_path, {"trainer": {"precision": "float32"}, "distribute": {}})
    with pytest.raises(UserError, match=r"trainer.precision: received 'mixed_float16'.*'float32'"):
        check_resume(compose(["trainer.precision=mixed_float16"]), str(tmp_path))
    check_resume(compose(["trainer.precision=mixed_bfloat16"]), str(tmp_path))  # allowed


def test_resume_notes_a_topology_change(compose, tmp_path, capsys):
    from trainer.distribute.placement import check_resume

    _fake_checkpoint(tmp_path, {"distribute": {"name": "mirrored", "logical_cpus": 2}})
    check_resume(compose(["distribute=mirrored", "distribute.logical_cpus=2"]), str(tmp_path))
    assert "bit-exact only on the same topology" not in capsys.readouterr().err
    check_resume(compose([]), str(tmp_path))
    assert "bit-exact only on the same topology" in capsys.readouterr().err


def test_mirrored_devices_must_exist(compose):
    from trainer.distribute.placement import make_strategy

    cfg = compose(["distribute=mirrored", "distribute.devices=[/cpu:0,/cpu:7]"])
    with pytest.raises(UserError, match=r"distribute.devices: received '/cpu:7'"):
        make_strategy(cfg.distribute)


def test_launcher_exits_with_a_failing_workers_code(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "launch_local_workers.py"), "2", "--"]
    cmd += ["trainer.max_stepz=5", f"hydra.run.dir={tmp_path / 'run'}"]  # a typo: exit 2
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "launch: worker exit codes [2, 2]" in r.stderr


def test_launcher_stops_the_others_once_one_worker_fails(tmp_path, capsys):
    """Bounded: a worker left waiting in a collective is stopped `grace` seconds after a failure."""
    from trainer.distribute.launch import launch

    fake = tmp_path / "fake_python"  # worker 0 fails at once, worker 1 would hang
    fake.write_text(
        '#!/bin/sh\ncase "$TF_CONFIG" in *\'"index": 0\'*) exit 1;; esac\nexec sleep 600\n'
    )
    fake.chmod(0o755)
    t0 = time.monotonic()
    code = launch(2, [f"hydra.run.dir={tmp_path}"], grace=1.0, timeout=60, python=str(fake))
    assert code == 1 and time.monotonic() - t0 < 20
    assert "worker exit codes [1, -15]" in capsys.readouterr().err


def test_tf_config_for_local_workers():
    import json

    from trainer.distribute.launch import free_ports, tf_config, worker_overrides

    ports = free_ports(3)
    assert len(set(ports)) == 3
    spec = json.loads(tf_config(ports, 2))
    assert spec["cluster"]["worker"] == [f"127.0.0.1:{p}" for p in ports]
    assert spec["task"] == {"type": "worker", "index": 2}
    chief = worker_overrides(["hydra.run.dir=x"], 0)
    other = worker_overrides(["hydra.run.dir=x"], 1)
    assert "distribute=multi_worker" in chief and "hydra.output_subdir=null" not in chief
    assert "hydra.output_subdir=null" in other  # non-chief: no .hydra/ files in the run dir


# ---------------------------------------------------------------- mirrored (2 logical CPUs)
@pytest.mark.slow
def test_mirrored_logs_replicas_and_resumes_exactly(refs, tmp_path):
    ref_dir, ref_err = refs["mirrored"]
    assert "MirroredStrategy, 2 replica(s) in sync" in ref_err
    assert "16 per replica" in ref_err
    run = tmp_path / "run"
    ok(train(run, *BASE, *TOPOLOGIES["mirrored"], "trainer.stop_at=15"))
    assert sorted(losses(run)) == list(range(1, 16))
    r = ok(train(run, *BASE, *TOPOLOGIES["mirrored"]))
    assert "Resuming from step 15" in r.stderr
    assert losses(run) == losses(ref_dir)  # bit for bit, every step


@pytest.mark.slow
@pytest.mark.parametrize("src,dst", [("mirrored", "default"), ("default", "mirrored")])
def test_topology_change_resumes_weights_optimizer_and_counters(refs, tmp_path, src, dst):
    """A checkpoint written with 2 replicas resumes with 1, and the reverse."""
    src_dir, _ = refs[src]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for f in (src_dir / "checkpoints").glob("ckpt-15.*"):
        shutil.copy(f, run / "checkpoints" / f.name)
    r = ok(train_topology(run, dst))
    assert "Resuming from step 15" in r.stderr
    assert f"{REPLICAS[dst]} replica(s) in sync" in r.stderr
    got, want = losses(run), losses(src_dir)
    assert sorted(got) == list(range(16, 31))
    # Same global batch, other summation order: equal up to float rounding. A lost optimizer
    # state or step counter moves these losses by far more than this tolerance.
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5)
    final, ref_final = (read_checkpoint(str(d / "checkpoints" / "ckpt-30")) for d in (run, src_dir))
    assert final.keys() == ref_final.keys()
    assert final["step/.ATTRIBUTES/VARIABLE_VALUE"] == 30
    from trainer.state import checkpoint_key

    assert final[checkpoint_key("optimizer", "adam/iteration")] == 30
    for k, v in ref_final.items():
        np.testing.assert_allclose(final[k], v, rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.fixture
def keeps_dtype_policy():
    """Runs in this process set Keras' global dtype policy: put back the one before."""
    import keras

    before = keras.mixed_precision.global_policy().name
    yield
    keras.mixed_precision.set_global_policy(before)
    assert keras.mixed_precision.global_policy().name == before


@pytest.mark.slow
def test_bfloat16_trains_and_resumes_exactly(refs, tmp_path, keeps_dtype_policy):
    """In this process (default strategy): the uninterrupted run goes between the two halves,
    so nothing the first half left in memory carries over into the resume."""
    bf16 = [*BASE, "trainer.precision=mixed_bfloat16"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    ok(train_in_process(resumed, *bf16, "trainer.stop_at=15"))
    ok(train_in_process(full, *bf16))
    r = ok(train_in_process(resumed, *bf16))
    assert "Resuming from step 15" in r.stderr
    assert losses(resumed) == losses(full)
    f32 = losses(refs["default"][0])
    assert losses(full) != f32  # bfloat16 compute really ran...
    np.testing.assert_allclose(losses(full)[1], f32[1], rtol=1e-2)  # ...on the same problem


# ---------------------------------------------------------------- two local worker processes
def _launch(run: Path, tmpdir: Path, log: Path, *overrides: str) -> subprocess.Popen:
    e = {**env(), "TMPDIR": str(tmpdir)}
    cmd = [sys.executable, str(REPO / "scripts" / "launch_local_workers.py"), "2"]
    cmd += ["--timeout", "150", "--grace", "20", "--", *overrides, f"hydra.run.dir={run}"]
    return subprocess.Popen(cmd, cwd=REPO, env=e, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_multi_worker_sigterm_saves_on_all_and_resumes(refs, tmp_path):
    run, tmpdir, log = tmp_path / "run", tmp_path / "tmp", tmp_path / "launch.log"
    tmpdir.mkdir()
    long = ["trainer.log_every=1", "trainer.eval_every=100000", "checkpoint.every=100000"]
    proc = _launch(run, tmpdir, log, "trainer.max_steps=100000", *long)
    try:
        _wait_for(  # read_metrics skips a line the chief is still writing
            lambda: len([r for r in read_metrics(str(run)) if "loss" in r]) >= 10,
            120,
            "10 steps from the chief",
        )
        pid = int(
            next(ln.split()[4] for ln in log.read_text().splitlines() if "worker 1 pid" in ln)
        )
        os.kill(pid, signal.SIGTERM)  # preempt the non-chief worker only
        assert proc.wait(timeout=90) == 3, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    (prefix,) = list_checkpoints(str(run / "checkpoints"))  # saved once, by the chief
    saved = step_of(prefix)
    assert verify(prefix).ok and saved >= 10
    assert text.count(f"Preemption: every worker saves step {saved}") == 2
    assert max(losses(run)) == saved

    log2 = tmp_path / "relaunch.log"
    proc = _launch(run, tmpdir, log2, f"trainer.max_steps={saved + 10}", *long)
    assert proc.wait(timeout=150) == 0, log2.read_text()[-3000:]
    text = log2.read_text()
    assert text.count(f"Resuming from step {saved}") == 2  # both workers restored
    exports = [line for line in text.splitlines() if "export (" in line]
    assert len(exports) == 4, text[-3000:]  # each worker names the run's exports, the chief's
    assert all(str(run / "export") in line for line in exports), exports
    assert sorted(losses(run)) == list(range(1, saved + 11))
    # MultiWorkerMirrored with 2 workers splits each global batch like mirrored with 2 devices.
    ref = losses(refs["mirrored"][0])
    common = [s for s in ref if s <= saved]
    np.testing.assert_allclose(
        [losses(run)[s] for s in common], [ref[s] for s in common], rtol=1e-6
    )
    # Only the chief wrote into the run dir; the other worker's temp dirs are gone.
    allowed = {".hydra", "checkpoints", "export", "metrics.jsonl", "tensorboard", "train.log"}
    assert {p.name for p in run.iterdir()} <= allowed
    assert (run / "export" / "model.keras").exists()
    assert list(tmpdir.iterdir()) == []


def test_resume_keeps_the_executor_its_checkpoints_were_written_with(compose, tmp_path, capsys):
    """A resumed run keeps its checkpoints' trainer.executor unless another is named: a run
    begun before the key existed ("default"), resumed twice, stays on the default executor
    (its second resume reads the key the first one's checkpoints recorded). A named other
    setting is let through with a note."""
    import json

    from trainer.distribute.placement import check_resume

    manifest = tmp_path / "checkpoints" / "ckpt-10.manifest.json"
    _fake_checkpoint(tmp_path, {"trainer": {"precision": "float32"}, "distribute": {}})
    for _ in range(2):  # before the key existed; then as the first resume recorded it
        cfg = compose([])
        check_resume(cfg, str(tmp_path))
        assert cfg.trainer.executor == "default"
        written = {"trainer": {"executor": cfg.trainer.executor}, "distribute": {}}
        manifest.write_text(json.dumps({"config": written}))
    assert "executor" not in capsys.readouterr().err
    cfg = compose(["trainer.executor=single_threaded"])
    check_resume(cfg, str(tmp_path))
    assert cfg.trainer.executor == "single_threaded"
    assert "written with trainer.executor=default under single_threaded" in capsys.readouterr().err
    manifest.write_text(json.dumps({"config": {"trainer": {"executor": "auto"}, "distribute": {}}}))
    cfg = compose([])
    check_resume(cfg, str(tmp_path))
    assert cfg.trainer.executor == "auto" and "executor" not in capsys.readouterr().err


def test_auto_runs_small_steps_on_the_single_threaded_executor_and_large_ones_not():
    """trainer.executor=auto: by the forward pass's flops on one batch (the counts of
    BENCHMARKS.md's table: 24 thousand for the default model, 68 million for a 1024-unit
    MLP), on one device only; the explicit settings are taken as they are."""
    import numpy as np
    import tensorflow as tf

    from models import DropoutMLP, MySubclassedModel
    from trainer.executor import AUTO_MAX_FLOPS, SINGLE_THREADED, choose, forward_flops

    small = MySubclassedModel(num_units=32, activation="relu", output_units=1)
    large = DropoutMLP(units=1024, depth=2, rate=0.2, activation="relu", output_units=1)
    spec = tf.TensorSpec([None, 10], tf.float32)  # the batch dimension as tf.data leaves it
    one = tf.distribute.get_strategy()
    for model in (small, large):
        model(np.zeros((32, 10), np.float32))
    flops = {m: forward_flops(m, tf.TensorSpec([32, 10], tf.float32)) for m in (small, large)}
    assert flops[small] < AUTO_MAX_FLOPS < flops[large], flops
    assert choose("auto", one, small, spec, 32) == SINGLE_THREADED
    assert choose("auto", one, large, spec, 32) == ""
    assert choose("single_threaded", one, large, spec, 32) == SINGLE_THREADED
    assert choose("default", one, small, spec, 32) == ""
    # a feature dimension that varies from batch to batch is not counted: the default one
    assert choose("auto", one, small, tf.TensorSpec([32, None], tf.float32), 32) == ""

    # a model of two named inputs (a dict batch) is counted too; a ragged one is not
    class TwoInputs(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.b = tf.keras.layers.Dense(4), tf.keras.layers.Dense(4)

        def call(self, x, training=False):
            return self.a(x["num"]) + self.b(x["cat"])

    two = TwoInputs()
    two({"num": np.zeros((32, 3), np.float32), "cat": np.zeros((32, 5), np.float32)})
    specs = {"num": tf.TensorSpec([None, 3]), "cat": tf.TensorSpec([None, 5])}
    assert choose("auto", one, two, specs, 32) == SINGLE_THREADED
    ragged = tf.RaggedTensorSpec([None, None], tf.float32)
    assert choose("auto", one, small, ragged, 32) == ""
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        mirrored = tf.distribute.get_strategy()
    assert choose("single_threaded", mirrored, small, spec, 32) == ""  # all-reduces need it
