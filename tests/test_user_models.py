"""User models written the way people write them (tests/user_models.py): each trains, stops,
resumes and matches the uninterrupted run on training loss, eval loss and every final
variable; restoring its checkpoint sets every variable the traced train step reads or writes
(not only those Keras tracks: `model.variables` is what the checkpoint is built from)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from conftest import FAST, train, train_in_process
from user_models import PATTERNS

from trainer import build
from trainer.config import UserError
from trainer.data.memory import load_data
from trainer.loop import fit
from trainer.state import checkpoint_key, checkpoint_keys, readable, seed_generator_states
from trainer.steps import make_chunk_fn
from trainer.verify.compare import compare_runs
from trainer.verify.report import format_report

STEPS = [
    "trainer.max_steps=40",
    "trainer.log_every=1",
    "trainer.eval_every=10",
    "checkpoint.every=10",
]


def _overrides(pattern: str) -> list[str]:
    return ["model=custom", f"model._target_=user_models.{pattern}", *STEPS]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_user_model_resumes_exactly_with_every_variable_saved(tmp_path, compose, pattern):
    over = _overrides(pattern)
    ref, res = tmp_path / "reference", tmp_path / "resumed"
    assert fit(compose(over), str(ref)).status == "completed"
    assert fit(compose([*over, "trainer.stop_at=20"]), str(res)).status == "stopped"
    resumed = fit(compose(over), str(res))
    assert resumed.status == "completed" and resumed.resumed_from == 20

    report = compare_runs(str(ref), str(res))
    assert report["ok"], format_report(report)
    assert report["curve"]["steps_compared"] == 40
    assert report["other_tags"]["eval/loss"]["steps_compared"] == 4  # steps 10..40, 30/40 resumed
    assert report["final_state"]["not_saved"] == {"a": [], "b": []}

    # Complete against what training uses, not against model.variables (which the checkpoint
    # is built from, so it cannot show a layer Keras does not track): restored as a resume
    # restores it, the checkpoint sets every variable the traced train step reads or writes.
    prefix = str(res / "checkpoints" / "ckpt-40")
    assert not_restored(compose(over), prefix) == []
    # The layout: the model's variables under their Keras paths (warm starts and the
    # comparison read them by path); trained statistics were saved, not initial values.
    assert paths_not_in_checkpoint(compose(over), prefix) == []
    reader = tf.train.load_checkpoint(prefix)
    for key in checkpoint_keys(prefix):  # (all but CountingModel have BatchNorms)
        if key.startswith("model/") and "moving_mean" in key:
            assert np.any(reader.get_tensor(key) != 0), readable(key)


def paths_not_in_checkpoint(cfg, prefix: str) -> list[str]:
    """The paths of `model.variables` (of the model rebuilt as fit builds it) that checkpoint
    `prefix` has no key for, under model/ or rng/ (independently of TrainState's grouping)."""
    build.setup_runtime(cfg)
    model = build.build_state(cfg, load_data(cfg.data)).model
    rng = {id(v) for v in seed_generator_states(model)}
    keys = checkpoint_keys(prefix)
    return [
        v.path
        for v in model.variables
        if checkpoint_key("rng" if id(v) in rng else "model", v.path) not in keys
    ]


def not_restored(cfg, prefix: str) -> list[str]:
    """The variables that the traced train step of a run of `cfg` reads or writes (its
    concrete function's captured variables: what the step really uses, tracked by Keras or
    not) and that restoring checkpoint `prefix` the way a resume does leaves unset: each is
    filled with a value no checkpoint holds (NaN; an integer's largest value) first."""
    build.setup_runtime(cfg)
    data = load_data(cfg.data)
    state = build.build_state(cfg, data)
    objective, batch = state.objective, int(cfg.data.batch_size)
    chunk_for = make_chunk_fn(
        tf.distribute.get_strategy(),
        state.model,
        state.optimizer,
        objective.loss_fn,
        objective.metric_fn,
        batch,
        metrics=objective.train_metrics,
    )
    used = chunk_for(iter(data.train_dataset(batch, int(cfg.trainer.seed), 0))).variables
    assert used, "the traced step captured no variables"

    def sentinel(v) -> np.ndarray:
        dtype = v.dtype.as_numpy_dtype
        fill = np.nan if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).max
        return np.full(v.shape, fill, dtype)

    for v in used:
        v.assign(sentinel(v))
    state.checkpoint.restore(prefix).assert_existing_objects_matched()  # CheckpointStore.restore
    unset = [v for v in used if np.array_equal(v.numpy(), sentinel(v), equal_nan=True)]
    return [f"{v.name} {v.shape}" for v in unset]


def test_the_completeness_check_catches_a_layer_keras_does_not_track(
    tmp_path, compose, monkeypatch
):
    """The negative control: HiddenInNamespace keeps a BatchNormalization in a SimpleNamespace.
    With the run's own guard (check_step_reads) switched off, it trains and saves; a check
    against model.variables passes its checkpoint, the one against the train step does not."""
    import trainer.session

    monkeypatch.setattr(trainer.session, "check_step_reads", lambda state, used: None)
    over = _overrides("HiddenInNamespace")
    assert fit(compose(over), str(tmp_path / "run")).status == "completed"
    prefix = str(tmp_path / "run" / "checkpoints" / "ckpt-40")
    assert paths_not_in_checkpoint(compose(over), prefix) == []  # blind to it
    missing = not_restored(compose(over), prefix)
    assert sorted(m.split()[0] for m in missing) == [
        f"hidden_in_namespace/{name}:0"
        for name in ("beta", "gamma", "moving_mean", "moving_variance")
    ], missing


def test_tensorflow_object_graph_misses_layers_in_containers(compose):
    """The trap this layout exists for (README, "How resume works"): on Keras 3,
    tf.train.Checkpoint(model=...) does not reach layers kept in a list of tuples."""
    cfg = compose(_overrides("TupleBlocks"))
    build.setup_runtime(cfg)
    state = build.build_state(cfg, load_data(cfg.data))
    graph = tf.train.Checkpoint(model=state.model)
    reached = set()
    queue = [graph]
    while queue:
        obj = queue.pop()
        if id(obj) not in reached:
            reached.add(id(obj))
            queue.extend(obj._trackable_children(save_type="checkpoint").values())
    missed = [v.path for v in state.model.variables if id(v) not in reached]
    assert any(p.endswith("moving_variance") for p in missed)
    assert state.missing_from_checkpoint() == []  # ours holds them


def test_a_variable_left_out_is_named_before_the_first_save(compose):
    from trainer.restore import check_complete

    cfg = compose(_overrides("TupleBlocks"))
    build.setup_runtime(cfg)
    state = build.build_state(cfg, load_data(cfg.data))
    path = next(p for p in state.groups["model"] if p.endswith("moving_mean"))
    del state.groups["model"][path]  # as if the construction had missed it
    state.checkpoint = tf.train.Checkpoint(**state.groups)
    assert state.missing_from_checkpoint() == [path]
    with pytest.raises(UserError, match=path):
        check_complete(state, 10)


@pytest.mark.slow
def test_a_variable_created_during_training_stops_the_run_at_its_first_save(tmp_path):
    """LateCounter creates a non-trainable variable at its first training call, after the
    checkpoint was laid out: the first save refuses it in one line, exit 2."""
    r = train_in_process(
        tmp_path / "run", "model=custom", "model._target_=user_models.LateCounter", *FAST
    )
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "would leave out 1 variable" in err[0] and "seen" in err[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_resume_refuses_a_changed_seed_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    over = ["model=custom", "model._target_=user_models.TupleBlocks", *FAST]
    assert train_in_process(run, *over, "trainer.stop_at=20").returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ".hydra" not in str(p)}
    r = train_in_process(run, *over, "trainer.seed=1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "trainer.seed: checkpoint 0 -> now 1" in err[0], r.stderr
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ".hydra" not in str(p)}
    assert after == before


@pytest.mark.slow
def test_rerun_of_a_completed_user_run_leaves_every_byte(tmp_path):
    run = tmp_path / "run"
    over = ["model=custom", "model._target_=user_models.LayerDict", *FAST]
    assert train_in_process(run, *over).returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # the rerun as users run it: Hydra's .hydra/ files it writes are taken back too
    again = train(run, *over)
    assert again.returncode == 0 and "Run is complete at step 40; wrote nothing" in again.stdout
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    shutil.rmtree(run / "export" / "saved_model")  # as a run killed during its export leaves it
    keras_bytes = (run / "export" / "model.keras").read_bytes()
    third = train_in_process(run, *over)
    assert third.returncode == 0 and "wrote saved_model" in third.stdout, third.stdout
    assert (run / "export" / "saved_model" / "saved_model.pb").exists()
    assert (run / "export" / "model.keras").read_bytes() == keras_bytes
    kept = {p: b for p, b in before.items() if "saved_model" not in str(p)}
    assert {p: p.read_bytes() for p in kept} == kept


def _drop(prefix: str, suffix: str) -> list[str]:
    """Rewrite checkpoint `prefix` without its values whose Keras path ends with `suffix` (as
    the earlier layout left BatchNorm statistics out), manifest included; the dropped paths."""
    from trainer.checkpoint.manifest import MANIFEST_SUFFIX, read_manifest
    from trainer.checkpoint.store import CheckpointStore
    from trainer.state import _VALUE, readable

    reader = tf.train.load_checkpoint(prefix)
    groups: dict = {}
    dropped = []
    for key in checkpoint_keys(prefix):
        name = readable(key)
        if name.endswith(suffix):
            dropped.append(name)
            continue
        group, _, rest = key[: -len(_VALUE)].partition("/")
        var = tf.Variable(reader.get_tensor(key))
        if rest:
            groups.setdefault(group, {})[name[len(group) + 1 :]] = var
        else:
            groups[group] = var
    manifest = read_manifest(prefix)
    for path in tf.io.gfile.glob(prefix + ".*"):
        tf.io.gfile.remove(path)
    tf.train.Checkpoint(**groups).write(prefix)
    own = ("step", "time", "files", "data_checksums")
    store = CheckpointStore(
        os.path.dirname(prefix),
        None,
        max_to_keep=1,
        keep_every_n_hours=None,
        manifest_extra={k: v for k, v in manifest.items() if k not in own},
        write=False,
    )
    store.write_manifest(prefix, manifest["step"])
    assert json.load(open(prefix + MANIFEST_SUFFIX))["state_layout"] == manifest["state_layout"]
    return sorted(dropped)


def test_comparison_catches_a_variable_missing_from_both_checkpoints(tmp_path, compose):
    over = _overrides("LayerList")
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        fit(compose(over), str(run))
    assert compare_runs(str(a), str(b))["ok"]
    for run in (a, b):  # the same values left out of both: the tensors they share still agree
        dropped = _drop(str(run / "checkpoints" / "ckpt-40"), "moving_mean")
    report = compare_runs(str(a), str(b))
    assert not report["ok"]
    assert report["final_state"]["differing"] == [] and report["final_state"]["missing"] == []
    assert report["final_state"]["not_saved"] == {"a": dropped, "b": dropped}
    assert "not in A's checkpoint: model/" in format_report(report)
    assert len(dropped) == 2


@pytest.mark.slow
def test_a_checkpoint_of_the_earlier_layout_is_refused_in_one_line(tmp_path):
    """A manifest without state_layout is what the earlier layout (through TensorFlow's object
    graph) wrote: resuming from it, or warm starting from it, is refused; nothing changes."""
    from trainer.checkpoint.manifest import read_manifest

    run = tmp_path / "run"
    assert train_in_process(run, *FAST, "trainer.stop_at=20").returncode == 0
    prefix = run / "checkpoints" / "ckpt-20"
    manifest = read_manifest(str(prefix))
    del manifest["state_layout"]
    (run / "checkpoints" / "ckpt-20.manifest.json").write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ".hydra" not in str(p)}
    for r, key in (
        (train_in_process(run, *FAST), "resume refused"),
        (
            train_in_process(tmp_path / "warm", *FAST, f"trainer.init_from={prefix}"),
            "trainer.init_from",
        ),
    ):
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and key in err[0] and "earlier version" in err[0], r.stderr
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ".hydra" not in str(p)}
    assert after == before


def test_repeated_keras_paths_are_numbered_in_order():
    """Two layers given the same name have the same variable paths: both are kept (#1)."""
    import keras

    from trainer.state import keyed

    keras.utils.clear_session(free_memory=False)
    inputs = keras.Input((3,))
    a, b = keras.layers.Dense(2, name="twin"), keras.layers.Dense(2, name="twin")
    a(inputs), b(inputs)
    keys = keyed(a.weights + b.weights)
    assert list(keys) == ["twin/kernel", "twin/bias", "twin/kernel#1", "twin/bias#1"]
    assert keys["twin/kernel#1"] is b.weights[0]
