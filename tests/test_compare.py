"""trainer.verify.compare / scripts/compare_runs.py on hand-written event files: fast, in-process."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from trainer import rewind, summaries
from trainer.verify import compare
from trainer.verify.report import main as compare_main


def write_run(run_dir, values: dict[int, float], tag: str = "loss", split: str = "train") -> str:
    """A run dir whose <run>/tensorboard/<split> holds `values` as one TF2 event file."""
    import tensorflow as tf

    logdir = os.path.join(run_dir, "tensorboard", split)
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for step, v in values.items():
            tf.summary.scalar(tag, v, step=step)
    writer.close()
    return str(run_dir)


CURVE = {s: 1.0 / s for s in range(1, 31)}


def test_identical_curves_without_checkpoints_are_no_match(tmp_path):
    """Equal curves, but no final state to compare: that is not a match."""
    from trainer.verify.report import format_report

    a, b = write_run(tmp_path / "a", CURVE), write_run(tmp_path / "b", CURVE)
    report = compare.compare_runs(a, b)
    assert report["curve"]["steps_compared"] == 30
    assert report["curve"]["first_divergent_step"] is None
    assert report["curve"]["max_abs_diff"] == 0.0
    assert report["final_state"] is None and report["no_checkpoint"] == ["a", "b"]
    assert not report["ok"]
    assert "NOT COMPARED (A and B without a verified checkpoint)" in format_report(report)


def test_one_changed_step_is_the_first_divergent_step(tmp_path):
    changed = {**CURVE, 17: CURVE[17] + 1e-6, 25: 9.0}
    a, b = write_run(tmp_path / "a", CURVE), write_run(tmp_path / "b", changed)
    report = compare.compare_runs(a, b)
    assert not report["ok"]
    assert report["curve"]["first_divergent_step"] == 17
    assert report["curve"]["max_abs_diff"] == pytest.approx(9.0 - CURVE[25], rel=1e-6)
    # within a tolerance the tiny change passes, the big one does not
    assert compare.compare_runs(a, b, atol=1e-3)["curve"]["first_divergent_step"] == 25


def test_steps_written_twice_are_not_one_clean_curve(tmp_path):
    """The symptom of an un-truncated SIGKILL resume: steps 21..25 appear in two files."""
    a = write_run(tmp_path / "a", CURVE)
    b = write_run(tmp_path / "b", {s: CURVE[s] for s in range(1, 26)})
    write_run(tmp_path / "b", {s: CURVE[s] for s in range(21, 31)})  # the resumed process
    curve = compare.read_curve(b)
    assert [s for s, _ in curve.points].count(21) == 2
    report = compare.compare_runs(a, b)
    assert not report["ok"]
    assert report["curve"]["duplicates_b"] == [21, 22, 23, 24, 25]
    assert report["curve"]["first_divergent_step"] == 21


def test_truncate_events_makes_one_clean_curve(tmp_path):
    """rewind.truncate_events (run on resume) leaves each step once, a torn last record too."""
    run = tmp_path / "run"
    write_run(run, {s: CURVE[s] for s in range(1, 26)})
    (path,) = (tmp_path / "run" / "tensorboard" / "train").glob("*tfevents*")
    with open(path, "r+b") as f:  # a SIGKILL during a flush: half a record at the end
        f.truncate(os.path.getsize(path) - 5)
    dropped = rewind.truncate_events(str(run / "tensorboard"), 20)
    assert dropped == 5  # steps 21..24 and the torn step 25
    # the resumed process's file: a later second in its name, as a restarted run's has (in
    # the same second, TensorFlow's per-process file counter decides the order: "10" < "9")
    time.sleep(1.05 - time.time() % 1)
    write_run(run, {s: CURVE[s] for s in range(21, 31)})
    steps = [s for s, _ in compare.read_curve(str(run)).points]
    assert steps == list(range(1, 31))


def test_missing_steps_diverge(tmp_path):
    a = write_run(tmp_path / "a", CURVE)
    b = write_run(tmp_path / "b", {s: v for s, v in CURVE.items() if s != 12})
    report = compare.compare_runs(a, b)
    assert not report["ok"]
    assert report["curve"]["missing_in_b"] == [12]
    assert report["curve"]["first_divergent_step"] == 12


def test_compare_runs_cli_writes_report_and_plot(tmp_path, capsys):
    a, b = write_run(tmp_path / "a", CURVE), write_run(tmp_path / "b", {**CURVE, 5: 0.0})
    out = tmp_path / "cmp"
    assert compare_main([a, b, "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "first divergent step: 5" in text and "RESULT: DIFFERENT" in text
    saved = json.loads((out / "report.json").read_text())
    assert saved["curve"]["first_divergent_step"] == 5 and not saved["ok"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert compare_main([a, a, "--out", str(out)]) == 1  # equal curves, no checkpoints
    assert "NOT COMPARED" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["{a}", "{missing}"], "no such directory"),
        (["{a}", "{empty}"], "no TensorBoard event files"),
        (["{a}", "{a}", "--tag", "lss"], "--tag: received 'lss'"),
        (["{a}", "{a}", "--atol", "-1"], "--atol: received -1"),
    ],
)
def test_compare_runs_bad_input_exits_2(tmp_path, capsys, args, message):
    a = write_run(tmp_path / "a", CURVE)
    (tmp_path / "empty").mkdir()
    paths = {"a": a, "missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty")}
    argv = [x.format(**paths) for x in args] + ["--out", str(tmp_path / "cmp")]
    assert compare_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def save_checkpoint(directory, values: dict[str, list[float]], saves: int = 1) -> str:
    """A tf.train.Checkpoint of float variables, saved `saves` times (save_counter differs)."""
    import tensorflow as tf

    ckpt = tf.train.Checkpoint(**{k: tf.Variable(v, dtype=tf.float32) for k, v in values.items()})
    for _ in range(saves):
        prefix = ckpt.save(os.path.join(directory, "ckpt"))
    return prefix


def test_final_state_compares_every_tensor_but_save_counter(tmp_path):
    inf = float("inf")
    state = {"w": [1.0, 2.0], "best": [inf]}  # inf == inf is equal, not a NaN gap
    a = save_checkpoint(tmp_path / "a", state, saves=1)
    b = save_checkpoint(tmp_path / "b", state, saves=3)
    same = compare.compare_checkpoints(a, b)
    assert not same.differing and not same.missing and same.max_abs_diff == 0.0
    # no manifest: the variables a run must hold cannot be rebuilt, so the states are not equal
    assert same.not_saved is None and "manifest" in same.rebuild_error and not same.equal
    c = save_checkpoint(tmp_path / "c", {"w": [1.0, 2.5], "best": [inf]})
    diff = compare.compare_checkpoints(a, c)
    assert diff.differing == ["w"]
    assert diff.max_abs_diff == 0.5
    assert compare.compare_checkpoints(a, c, atol=0.5).differing == []
    d = save_checkpoint(tmp_path / "d", {"w": [1.0, 2.0]})
    assert compare.compare_checkpoints(a, d).missing == ["best"]


def test_writers_events_read_as_tf_summary_scalars(tmp_path):
    """summaries.Writers writes its own event files (one Event per row): TensorBoard's loader
    reads the same tags, steps and float32 values as from tf.summary.scalar's files, in step
    order, each row stamped with the time it was logged (not the time it was drained)."""

    from tensorboard.backend.event_processing import event_accumulator

    rows = {
        s: {"loss": 1.0 / s, "learning_rate": 0.1 + s, "grad_norm": 3.3e7 + s} for s in (1, 2, 3)
    }
    ours = summaries.Writers(str(tmp_path / "ours"))
    stamps = []
    for step, values in rows.items():
        stamps.append(time.time())
        ours.scalars(ours.train, step, values)
        time.sleep(0.05)
    ours.close()
    for tag in ("loss", "learning_rate", "grad_norm"):
        write_run(tmp_path / "tf", {s: v[tag] for s, v in rows.items()}, tag=tag)

    def read(run):
        acc = event_accumulator.EventAccumulator(
            str(run / "tensorboard" / "train"), size_guidance={"tensors": 0}
        )
        acc.Reload()
        return acc, {
            tag: [
                (
                    e.step,
                    float(e.tensor_proto.float_val[0])
                    if e.tensor_proto.float_val
                    else float(np.frombuffer(e.tensor_proto.tensor_content, np.float32)[0]),
                )
                for e in acc.Tensors(tag)
            ]
            for tag in acc.Tags()["tensors"]
        }

    acc, got = read(tmp_path / "ours")
    _, want = read(tmp_path / "tf")
    assert got == want and set(got) == {"loss", "learning_rate", "grad_norm"}
    assert acc.SummaryMetadata("loss").plugin_data.plugin_name == "scalars"
    walls = [e.wall_time for e in acc.Tensors("loss")]
    assert all(abs(w - t) < 0.04 for w, t in zip(walls, stamps, strict=True)), (walls, stamps)


def test_drained_rows_reach_the_file_before_close(tmp_path):
    """A drain hands the rows to the OS: TensorBoard, reading while the run goes on, sees an
    eval row logged long before the next checkpoint (nothing else flushes it until then)."""
    writers = summaries.Writers(str(tmp_path))
    writers.scalars(writers.eval, 20, {"loss": 0.5})
    writers.drain()
    assert rewind.read_scalars(str(tmp_path / "tensorboard" / "eval"), "loss") == [(20, 0.5)]
    writers.close()
