"""A newcomer's first hour: Ctrl-C at any moment, mistakes refused fast and cleanly, and a
log on disk (the real CLI, real signals)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest
from conftest import FAST, REPO, env, run_cli, spawn, start_paused, train, train_in_process


def _interrupt_after(run_dir, seconds: float, sig, *overrides):
    proc = spawn(run_dir, *overrides)
    time.sleep(seconds)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_at_a_random_moment_is_one_true_line(tmp_path, sig):
    """At random moments of the first seconds (Python, Hydra, TensorFlow loading, the model
    built, training): never a traceback; exit 4 and 'nothing to resume' before the first
    checkpoint, exit 3 and the resume command after it."""
    import signal

    rng = random.Random(sig)
    # a run that is still training at 9 s on any machine (20000 steps were seen done by 8.8 s)
    over = ["trainer.max_steps=10000000", "checkpoint.every=200", "trainer.eval_every=1000"]
    codes = []
    for i, seconds in enumerate(sorted(rng.uniform(0.05, 9.0) for _ in range(5))):
        run = tmp_path / f"run{i}"
        code, out, err = _interrupt_after(run, seconds, getattr(signal, sig), *over)
        assert "Traceback" not in err, (seconds, err)
        assert f"({sig})" in err or f"{sig} received" in err, (seconds, err)  # which signal
        codes.append(code)
        if code == 4:
            assert "nothing" in err.strip().splitlines()[-1] and "rerun" in err, (seconds, err)
            assert not list(run.glob("checkpoints/*.manifest.json")), seconds
        else:
            assert code == 3, (seconds, code, err)
            assert list(run.glob("checkpoints/*.manifest.json")), seconds
            assert "Resume with" in out + err or "resume" in err, (seconds, out, err)
    assert 4 in codes, codes  # at least one landed in start-up


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_after_the_summary_changes_nothing(tmp_path, sig):
    """The run completed and printed its summary; a signal while the process is exiting (~1 s
    of TensorFlow's teardown) neither misreports it as interrupted (exit 3, "rerun to resume"),
    nor prints a traceback, nor kills it (exit -2): exit 0, and the files are the run's."""
    import signal

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", *FAST, f"hydra.run.dir={run}"],
        cwd=REPO,
        env={**env(), "PYTHONUNBUFFERED": "1"},  # each summary line reaches us when printed
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.lstrip().startswith("export (saved_model)"):  # the summary's last line
            proc.send_signal(getattr(signal, sig))
            break
    out, err = proc.communicate(timeout=120)
    out = "".join(lines) + out
    assert lines and lines[-1].lstrip().startswith("export (saved_model)"), out
    assert proc.returncode == 0, (proc.returncode, err)
    assert "Traceback" not in err and "interrupted" not in err.lower(), err
    assert "completed at step" in out, out
    assert (run / "export" / "model.keras").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_swallowed_during_start_up_still_stops_the_run(tmp_path, sig):
    """A signal raised inside code that swallows it (a user model's constructor with a bare
    `except:`; TensorFlow turning it into a SystemError inside a trace was seen too) is not
    lost: the loop finds it pending, saves at once and exits 3, naming it."""
    import signal

    run = tmp_path / "run"
    model = ["model=custom", "model._target_=user_models.SwallowsEverything"]
    proc = spawn(run, *model, "trainer.max_steps=20000")
    assert proc.stdout.readline().strip() == "waiting for the weights server"
    time.sleep(1.0)  # inside its wait (of up to 60 s), past the print
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 3, (proc.returncode, err[-2000:])
    assert f"{sig} received while starting: saving a checkpoint, then stopping" in err, err
    assert "Traceback" not in err, err
    assert [p.name for p in (run / "checkpoints").glob("*.manifest.json")] == [
        "ckpt-0.manifest.json"
    ]


@pytest.mark.slow
def test_a_signal_during_start_up_of_a_resume_keeps_its_checkpoints(tmp_path):
    import signal

    run = tmp_path / "run"
    assert train_in_process(run, *FAST, "trainer.stop_at=20").returncode == 0  # the checkpoints
    code, out, err = _interrupt_after(run, 1.5, signal.SIGINT, *FAST)  # the real CLI, a signal
    assert "Traceback" not in err and code == 3, (code, err)
    assert "intact" in err and "resume" in err, err
    again = train_in_process(run, *FAST)  # what it left resumes (no fresh process needed)
    assert again.returncode == 0 and "Resuming from step 20" in again.stderr, again.stderr


@pytest.mark.slow
def test_the_readme_scripts_print_no_tensorflow_start_up_lines(tmp_path):
    """The scripts a newcomer runs from the README, as they run them: their own lines only,
    not TensorFlow's C++ start-up lines ('oneDNN custom operations are on', 'Could not find
    cuda drivers', the CPU-instruction notice), which they printed before."""
    from trainer.startup import NATIVE

    run = tmp_path / "run"
    assert train_in_process(run, *FAST).returncode == 0
    uses = [
        ("scripts/example_data.py",),
        ("scripts/make_records.py", "data=csv", f"data.path={tmp_path}/houses.csv"),
        ("scripts/inspect_checkpoints.py", str(run)),
        ("scripts/compare_runs.py", str(run), str(run), "--out", str(tmp_path / "compare")),
        ("scripts/verify_export.py", str(run)),
    ]
    for script, *args in uses:
        if script.endswith("make_records.py"):
            args += ["data.target=price", "--out", str(tmp_path / "houses")]
        r = run_cli(script, *args, cwd=tmp_path)
        assert r.returncode == 0, (script, r.stderr[-2000:])
        native = [line for line in r.stderr.splitlines() if NATIVE.match(line)]
        assert not native, (script, native)
        assert "Traceback" not in r.stderr, (script, r.stderr)


def test_mistakes_found_before_tensorflow_loads_leave_nothing_behind(tmp_path):
    csv = tmp_path / "houses.csv"
    csv.write_text("sqft,rooms,price\n1200,3,385760\n1500,4,410000\n")
    cases = {
        "missing file": (
            ["data=csv", f"data.path={tmp_path}/nope.csv", "data.target=price"],
            "no such file",
        ),
        "wrong target": (
            ["data=csv", f"data.path={csv}", "data.target=Price"],
            "did you mean 'price'",
        ),
        "model not on PYTHONPATH": (
            ["model=custom", "model._target_=mypkg.MyModel"],
            "no module 'mypkg'",
        ),
    }
    for name, (over, expected) in cases.items():
        run = tmp_path / "runs" / name.replace(" ", "_")
        t0 = time.perf_counter()
        r = train(run, *over)
        took = time.perf_counter() - t0
        assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "distribute:" not in r.stderr, (name, r.stderr)  # refused before the run began
        assert not run.exists(), (name, list(run.rglob("*")))
        assert took < 4.0, (name, took)  # TensorFlow alone takes ~3-5 s to load here
    probe = (
        "import sys; from trainer.preflight import check; "
        f"print(check(['data=csv', 'data.path={tmp_path}/nope.csv', 'data.target=price'])); "
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=env(), capture_output=True, text=True
    )
    assert out.stdout.splitlines()[-1] == "False" and "no such file" in out.stdout, out


def test_a_run_refused_after_tensorflow_loads_removes_the_directory_hydra_made(tmp_path):
    run = tmp_path / "run"
    r = train(run, "model=custom", "model._target_=user_models.HiddenInNamespace", *FAST)
    assert r.returncode == 2 and "does not track" in r.stderr, r.stderr
    assert not run.exists(), list(run.rglob("*"))


def test_train_log_holds_what_the_run_printed(tmp_path):
    import signal

    run = tmp_path / "run"
    proc, _ = start_paused(run, *FAST, "trainer.pause_at=20")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    log = (run / "train.log").read_text()
    for line in ("interrupted by SIGTERM", "Checkpoint saved at step 20", "Resume with:"):
        assert line in out + err and line in log, (line, log)
    assert train(run, *FAST).returncode == 0
    log = (run / "train.log").read_text()
    assert "Resuming from step 20" in log and "completed at step 40" in log, log
    assert "eval loss" in log and "export (keras" in log, log


@pytest.mark.slow
def test_the_readme_csv_example_is_a_regression_that_beats_the_mean(tmp_path):
    """Whole-number prices (600 distinct in 600 rows) are taken for a regression, said so on
    screen; scaled inside the model, the run beats predicting the mean, and the reloaded
    export predicts prices in dollars with no extra step."""
    import keras
    import numpy as np

    from trainer.data.examples import baseline

    r = run_cli("scripts/example_data.py", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    # the README's command, in-process (what it prints and writes is the point, not the process)
    r = train_in_process(run, "data=csv", f"data.path={tmp_path}/houses.csv", "data.target=price")
    assert r.returncode == 0, r.stderr
    assert "task: regression (whole-number targets, but 600 distinct values" in r.stderr
    table = np.loadtxt(tmp_path / "houses.csv", delimiter=",", skiprows=1)
    mean_mae = baseline(table[:, -1:])["mae"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").open()]
    final = [x for x in rows if x.get("split") == "eval"][-1]
    assert final["eval_mae"] < 0.4 * mean_mae, (final, mean_mae)
    import models  # noqa: F401  (registers the model class; trainer.data.standardize the wrapper)
    import trainer.data.standardize  # noqa: F401

    model = keras.saving.load_model(run / "export" / "model.keras")
    pred = np.asarray(model(table[:64, :-1].astype("float32"))).ravel()
    assert np.abs(pred - table[:64, -1]).mean() < 0.4 * mean_mae  # dollars, as in the CSV
    import tensorflow as tf

    served = tf.saved_model.load(str(run / "export" / "saved_model"))  # needs no class at all
    out = served.serve(tf.constant(table[:64, :-1], tf.float32)).numpy().ravel()
    assert np.allclose(out, pred, rtol=1e-5)


def test_standardize_off_keeps_the_data_as_it_is(tmp_path, compose):
    from trainer import build
    from trainer.data.examples import houses
    from trainer.data.memory import load_data
    from trainer.data.standardize import Standardized

    header, table = houses()
    path = tmp_path / "houses.csv"
    np_savetxt(path, header, table)
    for setting, wrapped in (("null", True), ("false", False)):
        cfg = compose(
            ["data=csv", f"data.path={path}", "data.target=price", f"data.standardize={setting}"]
        )
        build.setup_runtime(cfg)
        model = build.build_state(cfg, load_data(cfg.data)).model
        assert isinstance(model, Standardized) is wrapped, setting


def np_savetxt(path, header, table):
    import numpy as np

    np.savetxt(path, table, fmt="%.10g", delimiter=",", header=",".join(header), comments="")


def test_messages_say_what_to_type(tmp_path):
    """A refused resume prints the command that resumes the run as it was; a key a `_target_`
    option does not list says to add it with +."""
    run = tmp_path / "run"
    assert train(run, "model=custom_bn", *FAST, "trainer.stop_at=20").returncode == 0
    r = train(run, *FAST)  # model=custom_bn left out
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "To resume it as it was: python -m trainer model=custom_bn" in line, line
    assert line.endswith(f"hydra.run.dir={run}") and "stop_at" not in line, line
    again = train_in_process(run, "model=custom_bn", *FAST)  # what it said to type
    assert again.returncode == 0 and "Resuming from step 20" in again.stderr, again.stderr
    r = train(tmp_path / "other", "model=custom_dense", "model.width=16")
    assert r.returncode == 2 and "add it with +: +model.width=16" in r.stderr, r.stderr


@pytest.mark.slow
def test_the_readme_quickstart_sample_is_what_the_command_prints(tmp_path):
    """The Quickstart's sample output is the real output of its command, line for line (the
    run directory aside: the README's has a date and time), its decimals to 1% (TensorFlow's
    oneDNN kernels differ by processor: an Intel Xeon with AMX prints eval_loss 0.58728 at
    step 200 where the AMD EPYC the sample comes from prints 0.58763; README, Quickstart)."""
    import math
    import re

    readme = (REPO / "README.md").read_text()
    sample = re.search(r"```\n(distribute:.*?)```", readme, re.S).group(1).splitlines()
    shown_dir = re.search(r"Run directory: (\S+)", "\n".join(sample)).group(1)
    run = tmp_path / "run"
    r = train(run, "model=custom_bn")
    assert r.returncode == 0, r.stderr
    printed = (r.stderr + r.stdout).replace(str(run), "RUN").splitlines()
    expected = [line.replace(shown_dir, "RUN") for line in sample]
    decimal = re.compile(r"-?\d+\.\d+")
    assert [decimal.sub("#", line) for line in printed] == [
        decimal.sub("#", line) for line in expected
    ], "\n".join(printed)
    for got, shown in zip(printed, expected, strict=True):
        pairs = zip(decimal.findall(got), decimal.findall(shown), strict=True)
        assert all(math.isclose(float(a), float(b), rel_tol=0.01) for a, b in pairs), (got, shown)


def test_the_summary_says_when_its_eval_is_from_an_earlier_step():
    from trainer.app import summary
    from trainer.session import RunResult

    earlier = RunResult("stopped", 250, None, "run", 0.3, {"loss": 0.31}, eval_step=200)
    assert "eval loss (step 200) 0.31" in summary(earlier)
    same = RunResult("completed", 300, None, "run", 0.3, {"loss": 0.25}, eval_step=300)
    assert "eval loss           0.25" in summary(same)


def test_the_converter_writes_the_training_statistics_standardize_uses(tmp_path, compose):
    """Records scale with the statistics the converter computed block by block, equal to
    those of the same training rows in memory."""
    import numpy as np

    from trainer.data.make_records import convert
    from trainer.data.memory import load_data
    from trainer.data.records import open_records

    header, table = _houses()
    path = tmp_path / "houses.csv"
    np_savetxt(path, header, table)
    csv = compose(["data=csv", f"data.path={path}", "data.target=price"]).data
    convert(csv, str(tmp_path / "shards"), shards=4, val_shards=1, progress=False)
    records = compose(["data=records", f"data.files={tmp_path}/shards/train-*.tfrecord"]).data
    on_disk, in_memory = (
        open_records(records).standardize_stats(),
        load_data(csv).standardize_stats(),
    )
    assert set(on_disk) == {"x_mean", "x_std", "y_mean", "y_std"}
    for key, value in in_memory.items():
        assert np.allclose(on_disk[key], value, rtol=1e-6), key


def _houses():
    from trainer.data.examples import houses

    return houses()
