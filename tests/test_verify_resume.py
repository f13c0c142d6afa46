"""scripts/verify_resume.py: interrupted + resumed == uninterrupted, for every model and interruption.

Every resume is a real `python -m trainer` process, and every run that gets a signal (SIGTERM,
SIGKILL, chaos) is one too. The CLI test runs the script as users run it (its three runs are
all processes); elsewhere verify runs in the test's process and trains its uninterrupted
reference, and a run interrupted by `trainer.stop_at` (no signal), in this process too
(`in_process_phases`): one TensorFlow import per test instead of one per run. Runs are short;
synthetic_regression has 1638 training rows, so 51 steps per epoch at batch 32
(synthetic_sequence: 25, digits: 44).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
from conftest import env, get_json, run_cli, tensorboard_server, train_in_process

from trainer.summaries import read_metrics
from trainer.verify import compare
from trainer.verify import resume as verify_resume
from trainer.verify.resume import check, verify

SHORT = ["checkpoint.every=25", "trainer.eval_every=20"]


class _InProcess:
    """A run trained in this process (conftest.train_in_process), shaped like the
    subprocess.Popen verify waits on. It trains when `run` is called or it is first waited
    for, its output going to its phase's log."""

    def __init__(self, overrides: list[str], run_dir: str, log: str):
        self.args, self.log = (run_dir, *overrides), log
        self.pid, self.returncode = os.getpid(), None

    def run(self) -> None:
        if self.returncode is None:
            r = train_in_process(*self.args)
            with open(self.log, "a") as f:
                f.write(r.stdout + r.stderr)
            self.returncode = r.returncode

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        self.run()
        return self.returncode

    def kill(self):  # not trained yet: verify gave up before it
        if self.returncode is None:
            self.returncode = -signal.SIGKILL

    def send_signal(self, sig):
        raise AssertionError("a run that gets a signal must be a real process")


@pytest.fixture
def in_process_phases(monkeypatch):
    """verify's reference run, and an interrupted run that `trainer.stop_at` ends (no signal),
    train in this process; every run that gets a signal (pause_at + SIGTERM/SIGKILL, chaos)
    and every resume stays a fresh `python -m trainer` process (verify's own `start`)."""
    real_start = verify_resume.start
    pending: list[_InProcess] = []

    def train_pending():
        while pending:
            pending.pop().run()

    def start(name, overrides, run_dir, out):
        paused = any(o.startswith("trainer.pause_at=") for o in overrides)
        if name == "reference" or (name == "interrupted" and not paused):
            os.makedirs(os.path.join(out, "logs"), exist_ok=True)
            log = os.path.join(out, "logs", f"{name}.log")
            with open(log, "w") as f:
                f.write(f"in this process: trainer {' '.join(overrides)} (run dir {run_dir})\n\n")
            proc = _InProcess(overrides, run_dir, log)
            if name == "reference":
                pending.append(proc)  # trains once the next phase has started, or when waited for
            else:
                train_pending()
                proc.run()
            return verify_resume.Phase(name, log, proc, time.perf_counter())
        if name.startswith("chaos"):  # it is killed at moments it reaches: nothing else trains
            train_pending()
        phase = real_start(name, overrides, run_dir, out)
        train_pending()  # while that process imports TensorFlow (then waits at pause_at)
        return phase

    monkeypatch.setattr(verify_resume, "start", start)
    # the processes verify starts find user models (tests/user_models.py) as the CLI's do
    monkeypatch.setenv("PYTHONPATH", env()["PYTHONPATH"])
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")


def verify_in_process(out, args: list[str], capsys) -> tuple[int, str, str]:
    """What `python scripts/verify_resume.py <args> verify.out=<out>` does, in this process
    (trainer.verify.resume.run, which the script's main runs, on the config Hydra composes):
    (exit code, stdout, stderr)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer.config import CONF_DIR, register_schemas

    register_schemas()
    task = [*args, f"verify.out={out}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="verify_resume", overrides=task)
    GlobalHydra.instance().clear()
    capsys.readouterr()
    code = verify_resume.run(cfg, str(out), task)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def verified(compose, tmp_path, overrides: list[str]) -> dict:
    """Run trainer.verify.resume.verify in-process (resumes and signalled runs are processes)."""
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
def test_resume_is_exact(
    compose, tmp_path, in_process_phases, overrides, mode, at, max_steps, resumed_from
):
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
def test_broken_restore_is_caught(tmp_path, in_process_phases, capsys):
    """checkpoint.restore_rng=false leaves Dropout's SeedGenerator state out of the checkpoint:
    the resumed run (a new process) draws other dropout masks from the first step after the
    resume."""
    out = tmp_path / "verify"
    code, stdout, stderr = verify_in_process(
        out,
        [
            "model=dropout_mlp",
            "trainer.max_steps=50",
            "checkpoint.restore_rng=false",
            *SHORT,
            "verify.interrupt=stop",
            "verify.interrupt_at=30",
        ],
        capsys,
    )
    assert code == 1, stdout + stderr
    assert "first divergent step: 31" in stdout
    assert "RESULT: DIFFERENT" in stdout
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
        (["verify.interrupt=chaos", "verify.wipe=true"], "verify.wipe: received true without"),
        (["verify.wipe=true"], "verify.wipe: received true; allowed: with verify.interrupt=chaos"),
        (
            [
                "verify.interrupt=chaos",
                "verify.wipe=true",
                "verify.kills=1",
                "checkpoint.remote=file:///tmp/store",
            ],
            "verify.wipe: received true with verify.kills=1",
        ),
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
def test_chaos_kills_at_random_moments_resume_exactly(
    tmp_path, in_process_phases, capsys, async_save
):
    """Three SIGKILLs (mid-chunk, during a checkpoint write, right after a log write) on a user
    model with BatchNorm and Dropout in a list of tuples, each followed by a resume: the
    curves (train and eval), every final variable and both exports equal the reference.
    (Every killed run and the final resume are processes; the reference trains in this one.)"""
    out = tmp_path / "chaos"
    code, stdout, stderr = verify_in_process(
        out,
        [
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
        ],
        capsys,
    )
    assert code == 0, stdout + stderr
    report = json.loads((out / "report.json").read_text())
    kills = report["verify"]["kills"]
    assert sorted(k["kind"] for k in kills) == ["checkpoint-write", "log-flush", "mid-chunk"]
    (mid_write,) = [k for k in kills if k["kind"] == "checkpoint-write"]
    assert mid_write["landed"].startswith("half-written checkpoint left"), mid_write
    assert report["verify"]["seed"] == 3 and "verify.seed=3" in stdout
    # each kill after the first resumed from the newest checkpoint the previous one left
    assert [k["resumed_from"] for k in kills[1:]] == [k["newest_checkpoint"] for k in kills[:-1]]
    assert report["curve"]["steps_compared"] == 1200 and report["curve"]["max_abs_diff"] == 0
    assert report["other_tags"]["eval/loss"]["ok"]
    assert report["final_state"]["equal"] and report["final_state"]["not_saved"] == {
        "a": [],
        "b": [],
    }
    assert report["exports"]["ok"] and report["exports"]["keras"]["equal"]
    assert "RESULT: MATCH (bit for bit)" in stdout
