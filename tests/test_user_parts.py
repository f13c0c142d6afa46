"""The user's own optimizer, schedule, loss, metrics and data, plugged in by `_target_`
(tests/user_parts.py): each trains, stops, resumes and matches the uninterrupted run on the
training loss, every other logged curve (eval loss, the metrics), the batch ids and every
final variable; and each mistake a user makes with them is one line, exit 2."""

from __future__ import annotations

import json

import pytest
from conftest import FAST, run_cli, train_in_process

from trainer.config import UserError
from trainer.loop import fit
from trainer.verify.compare import compare_runs
from trainer.verify.report import format_report

STEPS = ["trainer.max_steps=40", "trainer.log_every=5", "trainer.eval_every=10"]
SOURCE = ["data=custom", "data._target_=user_parts.make_source"]
CASES = {
    # stop at 18: 2 of 4 gradients accumulated, the EMA and clipping in flight
    "adam clipnorm ema accumulation": [
        "optimizer=adam",
        "optimizer.clipnorm=1.0",
        "optimizer.use_ema=true",
        "optimizer.gradient_accumulation_steps=4",
    ],
    "adamw global_clipnorm": ["optimizer=adamw", "optimizer.global_clipnorm=0.5"],
    "lion": ["optimizer=lion", "optimizer.learning_rate=0.0003"],
    "user optimizer": [
        "optimizer=custom",
        "optimizer._target_=user_parts.ScaledSGD",
        "+optimizer.scale=0.5",
        "+optimizer.momentum=0.9",
    ],
    "user schedule": [
        "schedule=custom",
        "schedule._target_=user_parts.StepDecay",
        "+schedule.every=7",
    ],
    "huber": ["loss=custom", "loss._target_=keras.losses.Huber", "+loss.delta=0.5"],
    # stop at 18 with log_every=5: the metrics' totals are mid-window in the checkpoint
    "user loss and metrics": [
        "loss=custom",
        "loss._target_=user_parts.log_cosh",
        "+loss.scale=2.0",
        "metrics=[user_parts.MaxError,keras.metrics.RootMeanSquaredError]",
    ],
    "arrays from a function": ["data=custom", "data._target_=user_parts.make_arrays"],
    "random-access source": [*SOURCE, "+data.n=600"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_part_resumes_exactly(tmp_path, compose, case):
    over = [*CASES[case], *STEPS, "checkpoint.every=10"]
    ref, res = tmp_path / "reference", tmp_path / "resumed"
    assert fit(compose(over), str(ref)).status == "completed"
    assert fit(compose([*over, "trainer.stop_at=18"]), str(res)).status == "stopped"
    resumed = fit(compose(over), str(res))
    assert resumed.status == "completed" and resumed.resumed_from == 18

    report = compare_runs(str(ref), str(res))
    assert report["ok"], format_report(report)
    assert report["curve"]["steps_compared"] == 8  # steps 5..40, 20..40 after the resume
    assert report["other_tags"]["eval/loss"]["steps_compared"] == 4
    assert report["other_tags"]["train/batch_ids_hash"]["steps_compared"] == 8
    state = report["final_state"]
    assert state["equal"] and state["tensors_compared"] > 0 and not state["differing"]
    assert state["not_saved"] == {"a": [], "b": []}


def test_user_metrics_are_logged_by_name_and_their_totals_checkpointed(tmp_path, compose):
    over = [*CASES["user loss and metrics"], *STEPS, "trainer.max_steps=18"]
    assert fit(compose(over), str(tmp_path / "run")).status == "completed"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if r.get("split") == "eval"]
    assert all("max_error" in r and "root_mean_squared_error" in r for r in train_rows)
    assert all("eval_max_error" in r and "eval_root_mean_squared_error" in r for r in evals)
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "ckpt-18"))
    names = [
        n for n, _ in tf.train.list_variables(str(tmp_path / "run" / "checkpoints" / "ckpt-18"))
    ]
    worst = [n for n in names if n.startswith("metrics/") and "worst" in n]
    assert len(worst) == 1, names
    assert reader.get_tensor(worst[0]) > 0  # steps 16..18 since the last reset at 15
    # reset at each log line: a running max never reset could only grow from line to line
    logged = [r["max_error"] for r in train_rows]
    assert any(b < a for a, b in zip(logged, logged[1:], strict=False)), logged


def test_custom_optimizer_keys_are_its_constructor_arguments(compose):
    """The shipped options list the common arguments (no `+` needed); a custom one takes any
    argument of its class, its base's included."""
    from trainer.optim import build_optimizer

    cfg = compose(CASES["adam clipnorm ema accumulation"])
    opt = build_optimizer(cfg.optimizer, cfg.schedule, 40)
    assert (opt.clipnorm, opt.use_ema, opt.gradient_accumulation_steps) == (1.0, True, 4)
    cfg = compose([*CASES["user optimizer"], "+optimizer.nesterov=true"])
    opt = build_optimizer(cfg.optimizer, cfg.schedule, 40)
    assert type(opt).__name__ == "ScaledSGD" and opt.scale == 0.5 and opt.nesterov


def test_arrays_and_a_source_of_the_same_rows_train_alike(tmp_path, compose):
    """A source is read in the order arrays are batched: the same rows give the same run."""
    arrays = [*CASES["arrays from a function"], "data.standardize=false"]  # a source's default
    a = fit(compose([*arrays, *STEPS]), str(tmp_path / "a"))
    b = fit(compose([*SOURCE, *STEPS]), str(tmp_path / "b"))
    assert a.final_loss == b.final_loss and a.eval == b.eval


def test_untracked_layer_stops_the_run_naming_it(tmp_path, compose):
    """A BatchNormalization in a SimpleNamespace trains but would be in no checkpoint: the
    traced step's variables are checked, and the run stops before its first step."""
    over = ["model=custom", "model._target_=user_models.HiddenInNamespace", *STEPS]
    with pytest.raises(UserError) as e:
        fit(compose(over), str(tmp_path / "run"))
    msg = str(e.value)
    assert "HiddenInNamespace.parts.norm" in msg and "BatchNormalization" in msg
    assert "moving_mean" in msg and "lists or dicts" in msg
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


BAD = {
    "unknown optimizer argument": (
        ["+optimizer.bogus=1"],
        "optimizer.bogus: not an argument of Adam",
    ),
    "optimizer not importable": (
        ["optimizer=custom", "optimizer._target_=nowhere.Opt"],
        "optimizer._target_: received 'nowhere.Opt'; cannot import module 'nowhere'",
    ),
    "optimizer of the wrong kind": (
        ["optimizer=custom", "optimizer._target_=user_parts.StepDecay"],
        "allowed: a keras.optimizers.Optimizer subclass",
    ),
    "schedule of the wrong kind": (
        ["schedule=custom", "schedule._target_=keras.optimizers.Adam"],
        "schedule._target_: received 'keras.optimizers.Adam', a class (Adam); allowed: a "
        "keras.optimizers.schedules.LearningRateSchedule subclass",
    ),
    "loss not callable": (
        ["loss=custom", "loss._target_=user_parts._PKG"],
        "loss._target_: received 'user_parts._PKG', a str; allowed",
    ),
    "unknown loss argument": (
        ["loss=custom", "loss._target_=keras.losses.Huber", "+loss.delt=1"],
        "loss.delt: not an argument of Huber",
    ),
    "metric not found": (
        ["metrics=[keras.metrics.NoSuchMetric]"],
        "metrics[0]._target_: received 'keras.metrics.NoSuchMetric'; module 'keras.metrics' has no",
    ),
    "source without __len__": (
        ["data=custom", "data._target_=user_parts.no_len"],
        "data._target_: user_parts.no_len returned a Stream, which has no __len__",
    ),
    "unknown data argument": (
        [*SOURCE, "+data.rows=5"],
        "data.rows: not an argument of make_source",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_part_is_one_line_before_training(tmp_path, compose, case):
    over, expected = BAD[case]
    with pytest.raises(UserError) as e:
        fit(compose([*over, *STEPS]), str(tmp_path / "run"))
    assert expected in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def _row_first_used_after(step: int, n: int = 512) -> tuple[int, int]:
    """(row, the first train step that uses it) of the default source's first row used
    after `step` (seed 0, batch 32): its batch order, as training draws it."""
    from trainer.data.batch_ids import batch_positions, split_ids

    _, train = split_ids(n, 0.2)
    first: dict[int, int] = {}
    for s, pos in enumerate(batch_positions(len(train), 32, 0, 0).take(3 * step)):
        for r in train[pos.numpy()].tolist():
            first.setdefault(int(r), s + 1)
    return min(((r, s) for r, s in first.items() if s > step), key=lambda rs: rs[1])


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,expected",
    [
        (
            "fail_at",
            "reading row {row} of user_parts.make_source failed: OSError: cannot read blob {row}",
        ),
        ("ragged_at", "row {row} of user_parts.make_source has x of shape (5,)"),
    ],
)
def test_a_row_that_fails_during_training_stops_the_run_naming_it(tmp_path, case, expected):
    """The row is first read after the checkpoint of step 20 was written (rows are read up to
    8 batches ahead, plus what the stream prefetches): one line with the row and the user's
    message, exit 2, that checkpoint intact; once the fault is gone the same command resumes."""
    row, used_at = _row_first_used_after(60, n=5000)  # epochs of 125 steps
    run = tmp_path / "run"
    over = [
        *SOURCE,
        "+data.n=5000",
        "trainer.max_steps=200",
        "trainer.eval_every=1000",
        "checkpoint.every=20",
    ]
    fault = tmp_path / "store-is-down"
    fault.touch()
    over += [f"+data.{case}={row}", f"+data.fault={fault}"]
    r = train_in_process(run, *over)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected.format(row=row) in errors[0], (used_at, r.stderr)
    assert "Traceback" not in r.stderr
    assert (run / "checkpoints" / "ckpt-20.manifest.json").exists()
    fault.unlink()  # the store is back: the same command resumes
    again = train_in_process(run, *over)
    assert again.returncode == 0 and "Resuming from step" in again.stderr, again.stderr


@pytest.mark.slow
def test_a_source_survives_sigkills_at_random_moments(tmp_path):
    """The verifier's chaos mode over a source whose rows wait on I/O (real SIGKILLs)."""
    out = tmp_path / "verify"
    r = run_cli(
        "scripts/verify_resume.py",
        *SOURCE,
        "+data.delay=0.0001",
        "trainer.max_steps=300",
        "checkpoint.every=25",
        "verify.interrupt=chaos",
        "verify.kills=3",
        "verify.seed=3",
        f"verify.out={out}",
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RESULT: MATCH (bit for bit)" in r.stdout, r.stdout
    assert r.stdout.count("SIGKILLs at random moments") >= 1 and "3. " in r.stdout, r.stdout


@pytest.mark.slow
def test_a_source_streamed_into_records_resumes_exactly(tmp_path):
    """`make_records.py data=custom` reads the source row by row into shards; training on
    them stops, resumes and matches the uninterrupted run."""
    shards = tmp_path / "shards"
    r = run_cli(
        "scripts/make_records.py", *SOURCE, "+data.n=700", "--out", str(shards), "--shards", "4"
    )
    assert r.returncode == 0, r.stderr
    desc = json.loads((shards / "description.json").read_text())
    assert desc["examples"] == {"train": 560, "val": 140}
    over = ["data=records", f"data.files={shards}/train-*.tfrecord", "data.lanes=2", *FAST]
    assert train_in_process(tmp_path / "ref", *over).returncode == 0
    assert train_in_process(tmp_path / "res", *over, "trainer.stop_at=20").returncode == 0
    assert train_in_process(tmp_path / "res", *over).returncode == 0
    report = compare_runs(str(tmp_path / "ref"), str(tmp_path / "res"))
    assert report["ok"], format_report(report)


def test_a_source_reads_rows_in_parallel(compose):
    """A source whose rows wait on I/O is read `data.workers` rows at once."""
    from trainer.data.memory import load_data

    cfg = compose([*SOURCE, "+data.delay=0.002", "data.workers=8"])
    data = load_data(cfg.data)
    it = iter(data.train_dataset(32, 0, 0))
    for _ in range(4):
        x, y, _ = next(it)
    assert x.shape == (32, 6) and y.shape == (32, 1)
    assert 4 <= data.source.most_at_once <= 8, data.source.most_at_once


@pytest.mark.slow
def test_exports_carry_the_users_optimizer_schedule_and_loss(tmp_path):
    """model.keras holds the user's (registered) optimizer, schedule and loss;
    scripts/verify_export.py imports them from the run's config and finds each the run's."""
    run = tmp_path / "run"
    over = [*CASES["user optimizer"], *CASES["user schedule"], *CASES["user loss and metrics"]]
    assert train_in_process(run, *over, *FAST).returncode == 0
    r = run_cli("scripts/verify_export.py", str(run))  # a fresh process imports the parts
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ScaledSGD, iterations 40" in r.stdout
    assert "schedule StepDecay, loss LossFunctionWrapper" in r.stdout, r.stdout
    assert "RESULT: nothing lost" in r.stdout


def test_of_two_failing_rows_the_one_trained_first_is_named(compose):
    """Reads run in parallel: the row of the later step fails at once, the earlier step's
    row a second later. The run stops on the earlier step, and names its row."""
    import tensorflow as tf

    from trainer.data.memory import load_data

    early, used_early = _row_first_used_after(1, n=5000)
    late, used_late = _row_first_used_after(12, n=5000)
    assert used_early < 9 <= used_late  # in the first and the second group of 8 batches
    over = [*SOURCE, "+data.n=5000", f"+data.fail_at=[{early},{late}]", f"+data.slow_fail={early}"]
    data = load_data(compose(over).data)
    it = iter(data.train_dataset(32, 0, 0))
    with pytest.raises(tf.errors.OpError) as e:
        for _ in range(40):
            next(it)
    problem = data.diagnose(e.value)
    assert problem is not None and f"reading row {early} of" in str(problem), e.value.message


def test_a_read_started_after_a_row_failed_names_that_row(compose):
    """Reads of 8-batch groups run 4 at once and tf.data reports the earliest group's error:
    a read of an earlier group that only starts once a later group's row failed names that
    row, or its own bad row if it has one (it used to say "source is closed", and the run
    ended in a traceback)."""
    from trainer.data.memory import load_data

    data = load_data(compose([*SOURCE, "+data.fail_at=[7,9]"]).data)
    with pytest.raises(UserError, match="reading row 7 of user_parts.make_source failed"):
        data.read([5, 6, 7])
    with pytest.raises(UserError, match="reading row 7 of user_parts.make_source failed"):
        data.read([1, 2])
    # a read whose own rows fail names its own row (its group may be the earlier one)
    with pytest.raises(UserError, match="reading row 9 of user_parts.make_source failed"):
        data.read([8, 9])


def test_accumulation_logs_the_rate_each_step_trains_with(tmp_path, compose):
    """With gradient_accumulation_steps and a decaying schedule, the logged learning rate of
    each step is the one Keras applies: the schedule at the step counter."""
    import json as _json

    over = [
        "optimizer.gradient_accumulation_steps=4",
        "schedule=exponential",
        "schedule.decay_steps=1",
        "schedule.decay_rate=0.5",
        "optimizer.learning_rate=1.0",
        "trainer.max_steps=8",
        "trainer.log_every=1",
    ]
    assert fit(compose(over), str(tmp_path / "run")).status == "completed"
    rows = [_json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    rates = {r["step"]: r["learning_rate"] for r in rows if "learning_rate" in r}
    assert rates == {s: 0.5 ** (s - 1) for s in range(1, 9)}, rates


def test_accumulation_with_mixed_float16_keeps_the_step_count(tmp_path, compose):
    over = [
        "optimizer.gradient_accumulation_steps=2",
        "trainer.precision=mixed_float16",
        *STEPS,
        "checkpoint.every=10",
    ]
    assert fit(compose([*over, "trainer.stop_at=18"]), str(tmp_path / "run")).status == "stopped"
    assert fit(compose(over), str(tmp_path / "run")).resumed_from == 18


def test_accumulation_under_a_strategy_is_refused_in_one_line(tmp_path, compose):
    over = ["optimizer.gradient_accumulation_steps=2", "distribute=mirrored", *STEPS]
    with pytest.raises(UserError, match="gradient_accumulation_steps: received 2; allowed with"):
        fit(compose(over), str(tmp_path / "run"))


def test_a_function_with_kwargs_takes_any_key(tmp_path, compose):
    over = ["data=custom", "data._target_=user_parts.make_arrays_kw", "+data.rows=300", *STEPS]
    assert fit(compose(over), str(tmp_path / "run")).status == "completed"


def test_a_part_that_calls_sys_exit_with_a_message_prints_it(tmp_path):
    """User code that gives up with sys.exit("message") (the CLI's single run ends through
    os._exit, which skips the interpreter's printing of it): the message, exit 1."""
    from conftest import train

    r = train(tmp_path / "run", "data=custom", "data._target_=user_parts.not_ready")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "/data/today is not ready yet; try again later"
    assert "Traceback" not in r.stderr
