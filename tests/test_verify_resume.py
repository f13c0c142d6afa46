"""scripts/verify_resume.py: interrupted + resumed == uninterrupted, for every model and interruption.

Each verification starts three real `python -m trainer` processes (reference, interrupted,
resumed) and interrupts with real signals. Runs are short; synthetic_regression has 1638
training rows, so 51 steps per epoch at batch 32 (synthetic_sequence: 25, digits: 44).
"""

from __future__ import annotations

import json
import re
import signal
import time

import pytest
from conftest import get_json, run_cli, tensorboard_server

from trainer.summaries import read_metrics
from trainer.verify import compare
from trainer.verify.resume import check, verify

SHORT = ["checkpoint.every=25", "trainer.eval_every=20"]


def verified(compose, tmp_path, overrides: list[str]) -> dict:
    """Run trainer.verify.resume.verify in-process (its three runs are subprocesses)."""
    cfg = compose([*SHORT, *overrides], config_name="verify_resume")
    out = str(tmp_path / "verify")
    check(cfg, out)
    return verify(cfg, [*SHORT, *overrides], out)


def assert_exact(report: dict, max_steps: int, resumed_from: int, log_every: int = 1) -> None:
    assert report["ok"], report
    c = report["curve"]
    assert c["steps_compared"] == max_steps // log_every
    assert c["first_divergent_step"] is None and c["max_abs_diff"] == 0.0
    assert not c["duplicates_b"] and not c["missing_in_b"]
    assert report["verify"]["resumed_from"] == resumed_from
    assert all(d["ok"] for d in report["other_tags"].values())
    state = report["final_state"]
    assert state["equal"] and state["step_a"] == state["step_b"] == max_steps
    assert state["tensors_compared"] > 0 and not state["differing"] and not state["missing"]


# (model overrides, mode, interrupt_at, max_steps, where the resume starts, what it covers)
CASES = [
    pytest.param(["model=custom_dense"], "stop", 30, 60, 30, id="custom_dense-stop-mid_epoch"),
    pytest.param(
        ["model=custom_variable"], "sigterm", 51, 70, 51, id="custom_variable-sigterm-epoch_end"
    ),
    pytest.param(
        ["model=gru", "data=synthetic_sequence"], "stop", 35, 50, 35, id="gru-stop-2nd_epoch"
    ),
    pytest.param(
        ["model=convnet", "data=digits"], "sigterm", 30, 50, 30, id="convnet-sigterm-across_epoch"
    ),
    # log_every=3: the checkpoint at 25 holds a half-full metric window (steps 25..)
    pytest.param(
        ["model=dropout_mlp", "trainer.log_every=3"], "sigkill", 40, 60, 25, id="dropout-sigkill"
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides, mode, at, max_steps, resumed_from", CASES)
def test_resume_is_exact(compose, tmp_path, overrides, mode, at, max_steps, resumed_from):
    log_every = 3 if "trainer.log_every=3" in overrides else 1
    report = verified(
        compose,
        tmp_path,
        [
            *overrides,
            f"trainer.max_steps={max_steps}",
            f"verify.interrupt={mode}",
            f"verify.interrupt_at={at}",
        ],
    )
    assert_exact(report, max_steps, resumed_from, log_every)
    expected_exit = {"stop": 0, "sigterm": 3, "sigkill": -signal.SIGKILL}[mode]
    assert report["verify"]["phases"]["interrupted"]["exit_code"] == expected_exit


# ---------------------------------------------------------------- the CLI, SIGKILL across an epoch
@pytest.fixture(scope="module")
def bn_sigkill(tmp_path_factory):
    """verify_resume.py (CLI): custom_bn killed at 60; the resume starts at 50 and redoes 51..60,
    across the epoch boundary (51 steps per epoch)."""
    out = tmp_path_factory.mktemp("bn") / "verify"
    args = ["model=custom_bn", "trainer.max_steps=80", *SHORT]
    args += ["verify.interrupt=sigkill", "verify.interrupt_at=60", f"verify.out={out}"]
    proc = run_cli("scripts/verify_resume.py", *args)
    return proc, out


@pytest.mark.slow
def test_cli_sigkill_across_epoch_boundary(bn_sigkill):
    proc, out = bn_sigkill
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for phase in ("[1/3] reference", "[2/3] interrupted", "[3/3] resumed"):
        assert phase in proc.stdout
    assert "80 steps compared, first divergent step: none" in proc.stdout
    assert "RESULT: MATCH (bit for bit)" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert_exact(report, 80, 50)
    assert report["verify"]["steps_redone"] == [51, 60]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "reference" / "export" / "model.keras").exists()


@pytest.mark.slow
def test_one_clean_curve_after_sigkill(bn_sigkill):
    """The killed process logged 51..60, the resume logged them again: a plain reader of all
    event files (and metrics.jsonl) sees every step once, with the resumed values."""
    _, out = bn_sigkill
    train = out / "resumed" / "tensorboard" / "train"
    assert len(list(train.glob("*tfevents*"))) >= 2  # the killed process's file and the resume's
    points = compare.read_curve(str(out / "resumed")).points
    assert [s for s, _ in points] == list(range(1, 81))
    assert dict(points) == compare.read_curve(str(out / "reference")).by_step()
    steps = [r["step"] for r in read_metrics(str(out / "resumed")) if "loss" in r]
    assert steps == list(range(1, 81))


# ---------------------------------------------------------------- the real TensorBoard server
@pytest.mark.slow
def test_tensorboard_serves_one_clean_curve_per_run(bn_sigkill, tmp_path):
    _, out = bn_sigkill
    runs = {"reference/tensorboard/train", "resumed/tensorboard/train"}
    with tensorboard_server(out, tmp_path / "tensorboard.log") as (base, server):
        deadline = time.monotonic() + 60
        curves = {}
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "tensorboard.log").read_text()
            try:
                if runs <= set(get_json(base, "/data/runs")):
                    curves = {
                        r: get_json(base, "/data/plugin/scalars/scalars", run=r, tag="loss")
                        for r in runs
                    }
                    if all(len(c) >= 80 for c in curves.values()):
                        break
            except OSError:
                pass  # not listening yet / still loading
            time.sleep(0.5)
        assert curves, "TensorBoard did not serve both runs within 60 s"
        ref = curves["reference/tensorboard/train"]
        res = curves["resumed/tensorboard/train"]
        # [wall_time, step, value] rows: every step once, in order, the same values
        assert [row[1] for row in ref] == list(range(1, 81))
        assert [row[1] for row in res] == list(range(1, 81))  # 51..60 were logged twice on disk
        assert [row[2] for row in res] == [row[2] for row in ref]


# ---------------------------------------------------------------- a broken restore is caught
@pytest.mark.slow
def test_broken_restore_is_caught(tmp_path):
    """checkpoint.restore_rng=false leaves Dropout's SeedGenerator state out of the checkpoint:
    the resumed run draws other dropout masks from the first step after the resume."""
    out = tmp_path / "verify"
    proc = run_cli(
        "scripts/verify_resume.py",
        "model=dropout_mlp",
        "trainer.max_steps=50",
        "checkpoint.restore_rng=false",
        *SHORT,
        "verify.interrupt=stop",
        "verify.interrupt_at=30",
        f"verify.out={out}",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "first divergent step: 31" in proc.stdout
    assert "RESULT: DIFFERENT" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert not report["ok"]
    assert report["curve"]["first_divergent_step"] == 31
    assert report["curve"]["max_abs_diff"] > 0
    assert not report["final_state"]["equal"]
    assert any(n.startswith("model/") for n in report["final_state"]["differing"])
    assert (out / "curves.png").exists()


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["verify.interrupt=sighup"],
            "verify.interrupt: received 'sighup'; allowed: stop | sigterm",
        ),
        (
            ["verify.interrupt_at=40"],
            "verify.interrupt_at: received 40; allowed: a step in 1..trainer.max_steps-1 (39)",
        ),
        (
            ["verify.interrupt=sigkill", "verify.interrupt_at=10"],
            "must be >= checkpoint.every (25)",
        ),
        (["verify.atol=-1"], "verify.atol: received -1.0"),
        (["trainer.stop_at=5"], "trainer.stop_at: received 5; verify_resume sets it"),
        (["trainer.resume=never"], "trainer.resume: received 'never'"),
    ],
)
def test_bad_verify_config_is_refused(compose, tmp_path, overrides, message):
    from trainer.config import UserError

    cfg = compose(
        ["trainer.max_steps=40", "verify.interrupt_at=20", *SHORT, *overrides],
        config_name="verify_resume",
    )
    with pytest.raises(UserError, match=re.escape(message)):
        check(cfg, str(tmp_path / "verify"))


def test_existing_verification_is_not_overwritten(compose, tmp_path):
    from trainer.config import UserError

    (tmp_path / "verify" / "reference").mkdir(parents=True)
    cfg = compose(["trainer.max_steps=40", "verify.interrupt_at=20"], config_name="verify_resume")
    with pytest.raises(UserError, match="already holds a verification"):
        check(cfg, str(tmp_path / "verify"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["verify.interrupt=later"], "verify.interrupt: received 'later'"),
        (["verify.nope=1"], "verify.nope"),  # Hydra refuses the key: still exit 2
        (["model=no_such_model"], "no_such_model"),
    ],
)
def test_cli_bad_input_exits_2_without_traceback(tmp_path, args, message):
    proc = run_cli("scripts/verify_resume.py", *args, f"verify.out={tmp_path / 'v'}", timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "v" / "reference").exists()


def test_verify_group_is_not_passed_to_the_trainer():
    from trainer.verify.resume import trainer_overrides

    got = trainer_overrides(
        ["model=gru", "verify.interrupt=stop", "+verify.x=1", "data.batch_size=8"]
    )
    assert got == ["model=gru", "data.batch_size=8", "trainer.log_every=1"]
    assert trainer_overrides(["trainer.log_every=5"]) == ["trainer.log_every=5"]


# ---------------------------------------------------------------- chaos: kills at random moments
@pytest.mark.slow
@pytest.mark.parametrize("async_save", ["false", "true"])
def test_chaos_kills_at_random_moments_resume_exactly(tmp_path, async_save):
    """Three SIGKILLs (mid-chunk, during a checkpoint write, right after a log write) on a user
    model with BatchNorm and Dropout in a list of tuples, each followed by a resume: the
    curves (train and eval), every final variable and both exports equal the reference."""
    out = tmp_path / "chaos"
    proc = run_cli(
        "scripts/verify_resume.py",
        "model=custom",
        "model._target_=user_models.TupleBlocks",
        "trainer.max_steps=1200",
        "trainer.eval_every=200",
        "checkpoint.every=50",
        f"checkpoint.async={async_save}",
        "verify.interrupt=chaos",
        "verify.kills=3",
        "verify.seed=3",
        "verify.window=0.3",
        f"verify.out={out}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    kills = report["verify"]["kills"]
    assert sorted(k["kind"] for k in kills) == ["checkpoint-write", "log-flush", "mid-chunk"]
    (mid_write,) = [k for k in kills if k["kind"] == "checkpoint-write"]
    assert mid_write["landed"].startswith("half-written checkpoint left"), mid_write
    assert report["verify"]["seed"] == 3 and "verify.seed=3" in proc.stdout
    # each kill after the first resumed from the newest checkpoint the previous one left
    assert [k["resumed_from"] for k in kills[1:]] == [k["newest_checkpoint"] for k in kills[:-1]]
    assert report["curve"]["steps_compared"] == 1200 and report["curve"]["max_abs_diff"] == 0
    assert report["other_tags"]["eval/loss"]["ok"]
    assert report["final_state"]["equal"] and report["final_state"]["not_saved"] == {
        "a": [],
        "b": [],
    }
    assert report["exports"]["ok"] and report["exports"]["keras"]["equal"]
    assert "RESULT: MATCH (bit for bit)" in proc.stdout
