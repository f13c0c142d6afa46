"""`python -m trainer` end to end: what a run writes, resuming by rerunning, a user's own model."""

import json
import os
import shutil
import textwrap

import numpy as np
import pytest
from conftest import FAST, losses, run_cli, start_paused, train, train_in_process
from tensorboard.backend.event_processing import event_accumulator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_cli_run(tmp_path_factory):
    """`python -m trainer <FAST>` (the default model, custom_dense) through the real CLI, once:
    (its run directory, the CompletedProcess). What it wrote is checked by
    test_short_run_writes_everything[custom_dense], what it printed by the first-screen test;
    test_resume_never_refuses_and_keeps_the_run_dir reruns a copy of it."""
    run = tmp_path_factory.mktemp("default") / "run"
    return run, train(run, *FAST)


def tb_tags(logdir):
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("model", ["custom_dense", "custom_bn", "custom_variable"])
def test_short_run_writes_everything(tmp_path, request, model):
    if model == "custom_dense":  # the default model: the real CLI's run (Hydra's .hydra/ too)
        run, r = request.getfixturevalue("default_cli_run")
    else:  # the same run, in-process: what it writes does not depend on a fresh process
        run = tmp_path / "run"
        r = train_in_process(run, f"model={model}", *FAST)
    assert r.returncode == 0, r.stderr
    assert "completed at step 40" in r.stdout and "export (keras" in r.stdout
    ckpts = run / "checkpoints"
    for step in (20, 40):
        assert (ckpts / f"ckpt-{step}.index").exists()
        manifest = json.loads((ckpts / f"ckpt-{step}.manifest.json").read_text())
        assert manifest["step"] == step and manifest["config"]["model"]["_target_"].startswith(
            "models."
        )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == list(range(1, 41))
    assert [r["step"] for r in records if r.get("split") == "eval"] == [20, 40]
    train_tb = tb_tags(run / "tensorboard" / "train")
    tags = set(train_tb.Tags()["tensors"])
    assert {
        "loss",
        "mae",
        "learning_rate",
        "grad_norm",
        "steps_per_sec",
        "checkpoint_save_seconds",
    } <= tags
    loss_events = train_tb.Tensors("loss")
    assert [e.step for e in loss_events] == train_steps
    assert not any(t.startswith("_hparams_") for t in tags)
    # the run's hyperparameters, once, in the HPARAMS session <run>/tensorboard, whose train/
    # and eval/ runs hold the metrics its experiment declares (the tab's metric columns)
    session = tb_tags(run / "tensorboard").PluginTagToContent("hparams")
    assert set(session) == {"_hparams_/experiment", "_hparams_/session_start_info"}, session
    from tensorboard.plugins.hparams import metadata

    experiment = metadata.parse_experiment_plugin_data(session["_hparams_/experiment"])
    declared = {(m.name.group, m.name.tag) for m in experiment.metric_infos}
    assert declared == {("train", "loss"), ("eval", "loss"), ("eval", "mae")}
    assert "optimizer.learning_rate" in {h.name for h in experiment.hparam_infos}
    assert {"loss", "mae"} <= set(tb_tags(run / "tensorboard" / "eval").Tags()["tensors"])
    assert (run / "export" / "model.keras").stat().st_size > 0
    assert (run / "export" / "saved_model" / "saved_model.pb").exists()
    if model == "custom_dense":  # Hydra writes it before the run, whatever the model
        assert (run / ".hydra" / "config.yaml").exists()


def test_rerun_resumes_from_checkpoint_without_redoing_steps(tmp_path):
    run = tmp_path / "run"
    first = train_in_process(run, "model=custom_bn", *FAST, "trainer.stop_at=20")
    assert first.returncode == 0, first.stderr
    assert "stopped early" in first.stdout and not (run / "export").exists()
    second = train(run, "model=custom_bn", *FAST)
    assert second.returncode == 0, second.stderr
    assert "Resuming from step 20" in second.stderr
    assert "resumed from step 20" in second.stdout
    assert sorted(losses(run)) == list(range(1, 41))  # every step logged exactly once
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    third = train(run, "model=custom_bn", *FAST)  # already complete: nothing is trained again
    assert third.returncode == 0, third.stderr
    assert "Run is complete at step 40; wrote nothing" in third.stdout
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert sorted(losses(run)) == list(range(1, 41))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("split") == "eval"] == [20, 40]


def test_resume_never_refuses_and_keeps_the_run_dir(tmp_path, default_cli_run):
    run = tmp_path / "run"  # a copy of a run the CLI wrote (checkpoints, .hydra/...), to resume
    shutil.copytree(default_cli_run[0], run, symlinks=True)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = train(run, *FAST, "trainer.max_steps=80", "trainer.resume=never")
    assert r.returncode == 2
    assert "trainer.resume" in r.stderr and "Traceback" not in r.stderr
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_users_own_model_from_pythonpath(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent("""
        import keras

        @keras.saving.register_keras_serializable(package="mypkg")
        class MyModel(keras.Model):
            def __init__(self, width=4, **kwargs):
                super().__init__(**kwargs)
                self.width = width
                self.hidden = keras.layers.Dense(width, activation="relu")
                self.out = keras.layers.Dense(1)

            def call(self, x):
                return self.out(self.hidden(x))

            def get_config(self):
                return {**super().get_config(), "width": self.width}
    """)
    )
    os.environ["PYTHONPATH"] = str(tmp_path)
    try:
        run = tmp_path / "run"
        r = run_cli(
            "trainer",
            "model=custom",
            "model._target_=mypkg.MyModel",
            "+model.width=16",
            *FAST,
            f"hydra.run.dir={run}",
        )
    finally:
        del os.environ["PYTHONPATH"]
    assert r.returncode == 0, r.stderr
    manifest = json.loads((run / "checkpoints" / "ckpt-40.manifest.json").read_text())
    assert manifest["config"]["model"] == {"_target_": "mypkg.MyModel", "width": 16}
    assert (run / "export" / "model.keras").exists()
    bad = run_cli(
        "trainer", "model=custom", "model._target_=mypkg.Nope", f"hydra.run.dir={tmp_path / 'r2'}"
    )
    assert bad.returncode == 2 and "model._target_" in bad.stderr and "Traceback" not in bad.stderr


def test_sigterm_in_the_last_chunk_still_evaluates_the_final_step_once(tmp_path):
    """A stop that lands on max_steps saves after the final eval; the rerun only exports."""
    import signal

    run = tmp_path / "run"
    args = [
        "model=custom_dense",
        "trainer.max_steps=40",
        "trainer.eval_every=30",
        "checkpoint.every=100",
        "trainer.pause_at=40",
    ]
    proc, _ = start_paused(run, *args)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert not (run / "export").exists()  # interrupted: no export yet
    # complete at 40: only the missing exports are written (in-process: no signal here)
    second = train_in_process(run, *args[:-1])
    assert second.returncode == 0, second.stderr
    assert "Run is complete at step 40; wrote keras, saved_model" in second.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("split") == "eval"] == [30, 40]
    assert (run / "export" / "model.keras").exists()


@pytest.mark.parametrize("schedule", ["cosine", "exponential", "constant"])
def test_logged_learning_rate_is_the_schedule_at_each_step(tmp_path, compose, schedule):
    """Each logged step's learning rate is the one its update used: the schedule at iteration
    step-1, also inside chunks of 7 steps (computed in the train chunk since issue 6)."""
    from trainer import app
    from trainer.optim import build_schedule

    overrides = [
        "trainer.max_steps=30",
        "trainer.log_every=1",
        "trainer.eval_every=100",
        "trainer.steps_per_execution=7",
        f"schedule={schedule}",
        *(["schedule.warmup_steps=5"] if schedule == "cosine" else []),
        *(["schedule.decay_steps=4"] if schedule == "exponential" else []),
    ]
    cfg = compose(overrides)
    assert app.run(cfg, str(tmp_path / "run")) == 0
    sched = build_schedule(cfg.optimizer, cfg.schedule, 30)
    logged = {
        r["step"]: r["learning_rate"]
        for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if "learning_rate" in r
    }
    assert sorted(logged) == list(range(1, 31))
    expected = {s: float(np.float32(sched(s - 1) if callable(sched) else sched)) for s in logged}
    assert logged == expected
    assert len(set(logged.values())) == (1 if schedule == "constant" else 30)


NATIVE_NOISE = ("absl::InitializeLog", "oneDNN custom operations", "cuInit", "cuda drivers")


def test_first_screen_shows_the_runs_own_lines_only(tmp_path, default_cli_run):
    """TensorFlow's C++ start-up lines are held back; trainer.debug=true shows them (the
    negative control: they are there to hold back on this machine)."""
    _, r = default_cli_run  # `python -m trainer <FAST>`
    assert r.returncode == 0, r.stderr
    assert not [n for n in NATIVE_NOISE if n in r.stderr], r.stderr
    shown = train(tmp_path / "debug", *FAST, "trainer.debug=true")
    assert shown.returncode == 0 and any(n in shown.stderr for n in NATIVE_NOISE), shown.stderr


def test_holding_back_keeps_every_other_line(capfd):
    from trainer import startup

    with startup.quiet_native_start_up():
        os.write(2, b"I0000 00:00:1796416767.035768    2249 port.cc:153] oneDNN custom ops.\n")
        os.write(2, b"E0000 00:00:1796416770.648446    2249 cuda_platform.cc:52] failed cuInit\n")
        os.write(2, b"UserWarning: a line of the user's own\n")
    err = capfd.readouterr().err
    assert "oneDNN" not in err and "cuInit" not in err
    assert "UserWarning: a line of the user's own" in err


@pytest.mark.slow
def test_both_executors_resume_exactly_and_the_setting_takes_effect(tmp_path):
    """trainer.executor: the default model's `auto` (the single-threaded executor) and
    TensorFlow's default one, each in fresh processes as users run them: stopped at step 20
    and resumed, every row of metrics.jsonl equals the uninterrupted run's; and the two
    executors' runs differ in last bits (TensorFlow optimizes the step's graph differently
    for each), so the setting reached the step."""
    from trainer.verify.compare import metrics_rows

    rows = {}
    for name in ("auto", "default"):
        full, part = tmp_path / f"{name}-full", tmp_path / f"{name}-part"
        extra = [*FAST, "trainer.max_steps=60", f"trainer.executor={name}"]
        assert train(full, *extra).returncode == 0
        assert train(part, *extra, "trainer.stop_at=20").returncode == 0
        again = train(part, *extra)
        assert again.returncode == 0 and "Resuming from step 20" in again.stderr, again.stderr
        assert metrics_rows(part) == metrics_rows(full), name
        rows[name] = metrics_rows(full)
    assert rows["auto"] != rows["default"]


def test_a_step_with_control_flow_runs_on_the_default_executor_even_when_forced(tmp_path):
    """mixed_float16's loss scaling puts a tf.cond in the step; on TensorFlow's single-threaded
    executor that step hung, deaf to signals. Forced there, it runs on the default executor
    instead, completes, and the run says why."""
    run = tmp_path / "run"
    r = train(run, *FAST, "trainer.precision=mixed_float16", "trainer.executor=single_threaded")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "the train step holds control flow (If" in r.stderr
    assert "runs on the default executor" in r.stderr


def test_an_xla_compiled_step_and_one_thread_pool_resume_exactly(tmp_path):
    """trainer.jit_compile=true (the GRU's step takes about half the time under XLA here,
    BENCHMARKS.md) and trainer.inter_op_threads=1, each in fresh processes as users run them:
    stopped at step 20 and resumed, every row of metrics.jsonl equals the uninterrupted run's,
    and XLA really compiled the step (its losses differ from the plain step's)."""
    from trainer.verify.compare import metrics_rows

    gru = ["model=gru", "data=synthetic_sequence", *FAST]
    rows = {}
    for name, extra in {
        "plain": [],
        "xla": ["trainer.jit_compile=true"],
        "one_pool": ["trainer.inter_op_threads=1"],
    }.items():
        full, part = tmp_path / f"{name}-full", tmp_path / f"{name}-part"
        assert train(full, *gru, *extra).returncode == 0
        assert train(part, *gru, *extra, "trainer.stop_at=20").returncode == 0
        again = train(part, *gru, *extra)
        assert again.returncode == 0 and "Resuming from step 20" in again.stderr, again.stderr
        assert metrics_rows(part) == metrics_rows(full), name
        rows[name] = metrics_rows(full)
    assert rows["one_pool"] == rows["plain"]  # the inter-op pool only schedules ops
    assert [r.get("loss") for r in rows["xla"]] != [r.get("loss") for r in rows["plain"]]
