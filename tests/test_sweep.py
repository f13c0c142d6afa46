"""Hydra multirun sweeps that resume (README, "Sweeps"): through the real CLI, interrupted by
real signals, compared with the same jobs run alone and read back through a real TensorBoard.

Jobs run in one process with Hydra's basic launcher unless a test names the joblib launcher.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, env, get_json, run_cli, tensorboard_server, train_in_process

from trainer.sweep.jobs import job_dirname
from trainer.verify.compare import metrics_rows

SMALL = [
    "trainer.max_steps=40",
    "trainer.log_every=1",
    "trainer.eval_every=20",
    "checkpoint.every=10",
]
GRID = ["model=custom_bn,custom_dense", "optimizer.learning_rate=0.01,0.1"]
# Hydra's basic sweeper runs the combinations in this order
JOBS = [(m, lr) for m in ("custom_bn", "custom_dense") for lr in ("0.01", "0.1")]


def job_overrides(model: str, lr: str) -> list[str]:
    return [f"model={model}", f"optimizer.learning_rate={lr}", *SMALL]


def job_dir(sweep: Path, overrides: list[str]) -> Path:
    """Where a job lives: named by its overrides, sorted (not by its number in the sweep)."""
    return sweep / ",".join(sorted(overrides))


def start_sweep(sweep: Path, *args: str, new_session: bool = False) -> subprocess.Popen:
    """Start the sweep, not waiting. `new_session`: in a process group of its own, as a
    terminal's foreground command is (Ctrl-C: os.killpg(proc.pid, SIGINT))."""
    cmd = [sys.executable, "-m", "trainer", "-m", *args, f"hydra.sweep.dir={sweep}"]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def run_sweep(sweep: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli("trainer", "-m", *args, f"hydra.sweep.dir={sweep}", timeout=timeout)


def alone(run_dir: Path, *overrides: str) -> None:
    """A job's run alone, for comparison with the sweep's: what `python -m trainer <overrides>`
    runs, in this process (the sweep is the real CLI; its reference needs no process of its
    own)."""
    r = train_in_process(run_dir, *overrides)
    assert r.returncode == 0, r.stderr


def manifests(run: Path) -> list[int]:
    """Steps of the checkpoints in `run` that have a manifest (so they count on resume)."""
    return sorted(
        int(p.name.split("-")[1].split(".")[0]) for p in run.glob("checkpoints/*.manifest.json")
    )


def wait_for_checkpoints(proc: subprocess.Popen, runs: list[Path], timeout: float = 120) -> None:
    """Return as soon as each of `runs` holds a checkpoint with its manifest."""
    deadline = time.monotonic() + timeout
    while not all(manifests(r) for r in runs):
        if proc.poll() is not None:
            raise AssertionError(
                f"the sweep ended first ({proc.returncode}):\n{proc.stderr.read()}"
            )
        assert time.monotonic() < deadline, "no checkpoint appeared in time"
        time.sleep(0.002)


def loky_workers(pid: int) -> list[int]:
    """The joblib launcher's worker processes among the children of `pid` (from /proc)."""
    children = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(c) for c in path.read_text().split()]
        except OSError:
            continue
    out = []
    for child in children:
        try:
            if b"popen_loky_posix" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(child)
        except OSError:
            continue
    return out


def jobs_of(sweep: Path) -> dict[str, dict]:
    """sweep.json's jobs by directory name."""
    return {j["dir"]: j for j in json.loads((sweep / "sweep.json").read_text())["jobs"]}


def files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def hparams_events(logdir: Path) -> list[str]:
    """Tags of the hparams summaries in the event files directly in `logdir` (TFRecords read
    by hand: length, its CRC, the Event, its CRC)."""
    from tensorboard.compat.proto import event_pb2

    tags = []
    for path in sorted(logdir.glob("*tfevents*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            tags += [v.tag for v in event.summary.value if v.tag.startswith("_hparams_")]
            i += 12 + n + 4
    return tags


# ---------------------------------------------------------------- the 2x2 sweep, killed, rerun
def test_job_directories_are_named_by_overrides_one_component_each():
    assert (
        job_dirname("model=a,optimizer.learning_rate=0.1") == "model=a,optimizer.learning_rate=0.1"
    )
    assert job_dirname("") == "defaults"
    assert "/" not in job_dirname("data.path=data/x.csv")
    assert job_dirname("data.path=a/b") != job_dirname("data.path=a%2Fb")  # injective
    long = job_dirname("model._target_=" + "x" * 400)
    assert len(long.encode()) <= 200 and long != job_dirname("model._target_=" + "x" * 401)


@pytest.mark.slow
def test_killed_sweep_reruns_skips_resumes_starts_and_compares_in_tensorboard(tmp_path):
    sweep = tmp_path / "sweep"
    dirs = [job_dir(sweep, job_overrides(*job)) for job in JOBS]
    proc = start_sweep(sweep, *GRID, *SMALL)
    try:
        wait_for_checkpoints(proc, [dirs[2]])  # the third job has saved: a real SIGKILL now
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    killed_at = max(manifests(dirs[2]))
    assert killed_at < 40 and not dirs[3].exists(), "the kill came after the third job ended"
    before = {d: files(d) for d in dirs[:2]}

    # The same command again
    rerun = run_sweep(sweep, *GRID, *SMALL)
    assert rerun.returncode == 0, rerun.stderr
    for i, job in enumerate(JOBS):  # every job also runs alone, for comparison
        alone(tmp_path / f"alone{i}", *job_overrides(*job))

    jobs = jobs_of(sweep)
    status = {d.name: (jobs[d.name]["status"], jobs[d.name]["resumed_from"]) for d in dirs}
    assert status == {
        dirs[0].name: ("already_complete", None),
        dirs[1].name: ("already_complete", None),
        dirs[2].name: ("resumed", killed_at),
        dirs[3].name: ("completed", None),
    }
    assert f"Resuming from step {killed_at}" in rerun.stderr
    assert all(jobs[d.name]["seconds"] < 0.5 for d in dirs[:2]), jobs  # skipped, not retrained
    assert {d: files(d) for d in dirs[:2]} == before  # every file byte for byte, .hydra/ too
    # every job (the two trained one after the other in the first process, the resumed one
    # and the one trained after it) equals its run alone: every row of metrics.jsonl
    for i, d in enumerate(dirs):
        rows = metrics_rows(str(d))
        assert rows == metrics_rows(str(tmp_path / f"alone{i}")), d.name
        assert [r["step"] for r in rows if "loss" in r] == list(range(1, 41))
    # the table: printed, and as sweep.csv / sweep.json
    assert f"resumed from step {killed_at}, completed" in rerun.stdout
    assert rerun.stdout.count("already complete (skipped)") == 2
    csv_lines = (sweep / "sweep.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("overrides,status,")
    # one HPARAMS session per job (the resumed one wrote no second), no experiment of its own
    for d in dirs:
        assert hparams_events(d / "tensorboard") == ["_hparams_/session_start_info"]
    assert_tensorboard_compares(sweep, dirs, jobs, tmp_path)


def assert_tensorboard_compares(sweep: Path, dirs: list[Path], jobs: dict, tmp_path: Path):
    """A real `tensorboard --logdir <sweep>`: every job a run, and its HPARAMS tab lists the
    four jobs with their hyperparameters and final metrics, sorted by eval loss."""
    request = {
        "experimentName": "",
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [{"metric": {"group": "eval", "tag": "loss"}, "order": "ORDER_ASC"}],
        "startIndex": 0,
        "sliceSize": 100,
    }
    with tensorboard_server(sweep, tmp_path / "tensorboard.log") as (base, server):
        deadline, groups = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "tensorboard.log").read_text()
            try:
                groups = get_json(
                    base, "/data/plugin/hparams/session_groups", request=json.dumps(request)
                ).get("sessionGroups", [])
                if len(groups) == 4 and all(len(g["metricValues"]) == 3 for g in groups):
                    break
            except OSError:
                pass  # not listening yet / still loading
            time.sleep(0.5)
        runs = set(get_json(base, "/data/runs"))
        experiment = get_json(
            base, "/data/plugin/hparams/experiment", request=json.dumps({"experimentName": ""})
        )
    assert {f"{d.name}/tensorboard/{split}" for d in dirs for split in ("train", "eval")} <= runs
    metrics = {(m["name"]["group"], m["name"]["tag"]) for m in experiment["metricInfos"]}
    assert metrics == {("train", "loss"), ("eval", "loss"), ("eval", "mae")}
    assert {"model", "optimizer.learning_rate"} <= {h["name"] for h in experiment["hparamInfos"]}
    assert len(groups) == 4, groups
    sessions = [g["sessions"] for g in groups]
    assert all(len(s) == 1 for s in sessions)
    names = [s[0]["name"].removesuffix("/tensorboard") for s in sessions]
    assert sorted(names) == sorted(d.name for d in dirs)
    eval_loss = [
        next(m["value"] for m in g["metricValues"] if m["name"] == {"group": "eval", "tag": "loss"})
        for g in groups
    ]
    assert eval_loss == sorted(eval_loss)  # the table sorts jobs by eval loss
    assert eval_loss == [pytest.approx(jobs[n]["eval"]["loss"], rel=1e-6) for n in names]
    lrs = {n: g["hparams"]["optimizer.learning_rate"] for n, g in zip(names, groups, strict=True)}
    assert lrs == {n: jobs[n]["hparams"]["optimizer.learning_rate"] for n in names}


# ---------------------------------------------------------------- mistakes, failures
@pytest.mark.parametrize(
    "args, expected",
    [
        (  # model.units exists for custom_bn only
            ["model=custom_bn,custom_dense", "model.units=8"],
            ["model.units: unknown key", "num_units", "in the sweep's job model=custom_dense"],
        ),
        (["optimizer.learning_rate=range(1,1)"], ["an empty list of values", "one value or more"]),
        (["model=custom_bn,nope"], ["model: received 'nope'", "custom_dense"]),
        (["optimizer.learning_rate=0.1,0"], ["optimizer.learning_rate: received 0;", "> 0"]),
    ],
)
def test_bad_sweep_input_is_one_line_and_exit_2_before_any_job(tmp_path, args, expected):
    r = run_sweep(tmp_path / "sweep", *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    for text in expected:
        assert text in r.stderr
    assert not (tmp_path / "sweep").exists()  # no job (nor its directory) started


def make_records(out: Path, *overrides: str) -> str:
    """What scripts/make_records.py runs (4 training shards), in this process (the data a
    sweep reads; the script's own process adds nothing here); the dataset's id."""
    from trainer.data.make_records import main

    assert main([*overrides, "--out", str(out), "--shards", "4"]) == 0
    return json.loads((out / "description.json").read_text())["dataset_id"]


@pytest.mark.slow
def test_complete_jobs_whose_records_were_replaced_are_refused_not_skipped(tmp_path):
    """Issue 27's measured case: a two-job sweep over data=records completes; its shards are
    replaced by another dataset (3000 rows instead of 2000), and the sweep rerun. Each job is
    refused as the same job run alone refuses it (its dataset id changed: exit 2), a failed
    row naming the change, the sweep exits 1; nothing of the jobs is touched. (Rerun on the
    same records, the complete jobs are skipped.)"""
    data, sweep = tmp_path / "data", tmp_path / "sweep"
    synthetic = ["data=synthetic_regression"]
    old = make_records(data, *synthetic, "data.num_samples=2000")
    args = ["data=records", f"data.files={data}/train-*.tfrecord", "trainer.seed=1,2"]
    args += ["trainer.max_steps=10", "trainer.eval_every=10", "checkpoint.every=10"]
    first = run_sweep(sweep, *args)
    assert first.returncode == 0, first.stderr
    dirs = [sweep / d for d in jobs_of(sweep)]
    assert len(dirs) == 2 and all(manifests(d) == [10] for d in dirs)
    before = {d: files(d) for d in dirs}
    same = run_sweep(sweep, *args)  # the same records: skipped, before TensorFlow loads
    assert same.returncode == 0 and same.stdout.count("already complete (skipped)") == 2, same
    shutil.rmtree(data)
    new = make_records(data, *synthetic, "data.num_samples=3000")
    assert new != old

    rerun = run_sweep(sweep, *args)
    assert rerun.returncode == 1, rerun.stdout + rerun.stderr  # a job failed: not skipped
    assert "already complete" not in rerun.stdout
    jobs = jobs_of(sweep)
    for d in dirs:
        job = jobs[d.name]
        assert (job["status"], job["exit_code"]) == ("failed", 2), job
        assert f"dataset_id {old} -> {new}" in job["error"], job
    assert rerun.stdout.count("failed (exit 2): data; it does not fit the model") == 2
    assert "Traceback" not in rerun.stderr
    assert {d: files(d) for d in dirs} == before  # checkpoints, logs, .hydra/: as they were


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],  # torn JSON
        lambda raw: b"\xff\xfe" + raw[2:],  # not UTF-8
        lambda raw: raw.replace(b'"status": "completed"', b'"status": "done?"'),  # unknown status
    ],
    ids=["torn", "binary", "unknown-status"],
)
def test_an_unreadable_job_record_is_a_failed_row_and_fails_the_sweep(tmp_path, capsys, damage):
    """A job's record file damaged on disk: the sweep's report (what it prints, sweep.csv,
    sweep.json) has a failed row naming the file and the error, and exits 1; the job is not
    dropped from the table and the exit code."""
    from trainer.sweep import record_store
    from trainer.sweep import report as sweep_report
    from trainer.sweep.record_store import Record

    sweep = tmp_path / "sweep"
    record_store.start(str(sweep))
    names = ["model=custom_bn", "data.path=%2Fdata%2Fx.csv"]  # a job_dirname with '/' encoded
    for num, name in enumerate(names):
        record_store.save_record(
            str(sweep), Record(num, [name], name, 10, status="completed", step=10)
        )
    path = sweep / ".sweep" / "jobs" / "data.path=%252Fdata%252Fx.csv.json"
    path.write_bytes(damage(path.read_bytes()))
    assert not list((sweep / ".sweep" / "jobs").glob("*.tmp-*"))  # written atomically

    code = sweep_report.finish(str(sweep))
    out = capsys.readouterr().out
    assert code == 1  # README, "Exit codes": a job failed
    assert "2 job(s) (1 failed, 1 completed); exit code 1" in out
    (row,) = [ln for ln in out.splitlines() if ln.startswith(names[1])]
    assert f"failed: its record {path} cannot be read (" in row
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert sorted((j["dir"], j["status"]) for j in jobs) == sorted(
        zip(names, ["completed", "failed"], strict=True)
    )
    (bad,) = [j for j in jobs if j["status"] == "failed"]
    assert str(path) in bad["error"] and bad["exit_code"] is None
    with open(sweep / "sweep.csv", newline="") as f:
        rows = {r["dir"]: (r["status"], r["detail"]) for r in csv.DictReader(f)}
    assert rows[names[1]] == ("failed", bad["detail"]) and rows[names[0]][0] == "completed"


@pytest.mark.slow
def test_a_failing_job_is_reported_and_the_others_still_run(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_sweep(sweep, "optimizer.learning_rate=1e30,0.01", "trainer.max_steps=20")
    assert r.returncode == 1, r.stderr  # README, "Exit codes": a job failed
    jobs = list(json.loads((sweep / "sweep.json").read_text())["jobs"])
    assert [(j["status"], j["exit_code"]) for j in jobs] == [("failed", 1), ("completed", 0)]
    assert "non-finite loss" in jobs[0]["error"]
    assert "failed (exit 1): non-finite loss" in r.stdout
    assert (sweep / jobs[1]["dir"] / "export" / "model.keras").exists()


# ---------------------------------------------------------------- parallel jobs, signals
@pytest.mark.slow
def test_parallel_jobs_all_save_on_sigterm_and_resume_exactly(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["model=custom_bn,custom_dense", "trainer.max_steps=300", "checkpoint.every=10"]
    args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    models = ("custom_bn", "custom_dense")
    dirs = [job_dir(sweep, [f"model={m}", *args[1:3]]) for m in models]
    # both jobs train at once, in two worker processes, and wait at step 20 (pause_at, which
    # names no directory): on a loaded machine one job could otherwise finish before the
    # other has started
    proc = start_sweep(sweep, *args, "trainer.pause_at=20")
    deadline = time.monotonic() + 240
    while not all((d / "PAUSED").exists() for d in dirs):
        assert proc.poll() is None, f"the sweep ended first ({proc.returncode})"
        assert time.monotonic() < deadline, "the jobs did not both reach step 20"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # to the sweep's own process only: it tells the workers
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    jobs = jobs_of(sweep)
    saved = {d.name: max(manifests(d)) for d in dirs}
    assert {n: (j["status"], j["step"]) for n, j in jobs.items()} == {
        n: ("interrupted", step) for n, step in saved.items()
    }
    assert all(step < 300 for step in saved.values())
    rerun = run_sweep(sweep, *args)
    assert rerun.returncode == 0, rerun.stderr
    for i, m in enumerate(models):  # each job also runs alone, for comparison
        alone(tmp_path / f"alone{i}", f"model={m}", *args[1:3])
    jobs = jobs_of(sweep)
    assert {n: (j["status"], j["resumed_from"]) for n, j in jobs.items()} == {
        n: ("resumed", step) for n, step in saved.items()
    }
    for i, d in enumerate(dirs):  # each job equals its run alone: every row of metrics.jsonl
        assert metrics_rows(str(d)) == metrics_rows(str(tmp_path / f"alone{i}")), d.name


@pytest.mark.slow
def test_a_signal_between_jobs_lets_the_job_finish_and_starts_no_further_one(tmp_path):
    """Basic launcher: a SIGTERM once the first job's last checkpoint is written (its loop is
    over: it exports and returns) ends the sweep before the second job starts."""
    sweep = tmp_path / "sweep"
    small = ["trainer.max_steps=20", "checkpoint.every=10"]
    dirs = [job_dir(sweep, ["model=custom_dense", f"trainer.seed={s}", *small]) for s in (1, 2)]
    proc = start_sweep(sweep, "model=custom_dense", "trainer.seed=1,2", *small)
    deadline = time.monotonic() + 120
    while 20 not in manifests(dirs[0]):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "Traceback" not in err, err
    jobs = jobs_of(sweep)
    assert [jobs[d.name]["status"] for d in dirs] == ["completed", "not_started"], jobs
    assert (dirs[0] / "export" / "model.keras").exists()
    assert not (dirs[1] / "checkpoints").exists()  # the second job did not start
    assert "not started (the sweep was stopped)" in out


def test_ctrl_c_twice_while_the_sweep_reports_exits_with_the_tables_code(tmp_path):
    """Two SIGINTs once the table's head is printed (every job has returned): the process
    exits with the exit code its table printed, not 130 after a table saying 0."""
    sweep = tmp_path / "sweep"
    proc = start_sweep(sweep, "model=custom_dense", "trainer.seed=1", *SMALL)
    head = ""
    for line in proc.stdout:
        if line.startswith(f"Sweep {sweep}"):
            head = line
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)  # (two at once may arrive as one)
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert head.rstrip().endswith("exit code 0"), (head, out, err)
    assert proc.returncode == 0, (proc.returncode, err)
    assert "Second SIGINT" not in err and "Traceback" not in err, err
    assert json.loads((sweep / "sweep.json").read_text())["exit_code"] == 0


@pytest.mark.slow
def test_a_sigterm_before_the_joblib_workers_start_their_jobs_starts_none(tmp_path):
    """The sweep's process gets a SIGTERM while its joblib workers are still starting (they
    have no handler yet): none dies of it (joblib would end the sweep with
    TerminatedWorkerError), and no job starts: each reads the sweep's stop file first."""
    sweep = tmp_path / "sweep"
    args = ["model=custom_bn,custom_dense", "trainer.max_steps=20"]
    args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    proc = start_sweep(sweep, *args)
    deadline = time.monotonic() + 60
    while len(loky_workers(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "Traceback" not in err and "TerminatedWorkerError" not in err, err
    jobs = jobs_of(sweep)
    assert sorted(j["status"] for j in jobs.values()) == ["not_started"] * 2, jobs
    assert not list(sweep.glob("*/checkpoints"))


# ---------------------------------------------------------------- the Optuna sweeper
@pytest.mark.slow
def test_an_interrupted_optuna_study_continues_with_its_trials(tmp_path):
    import optuna

    sweep = tmp_path / "study"
    args = ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1"]
    args += ["hydra.sweeper.sampler.seed=0", "optimizer.learning_rate=tag(log,interval(0.001,0.1))"]
    args += ["trainer.max_steps=300", "checkpoint.every=10"]
    proc = start_sweep(sweep, *args)
    deadline = time.monotonic() + 120
    while len([d for d in sweep.glob("*=*") if manifests(d)]) < 2:  # the second trial trains
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 3
    first = jobs_of(sweep)
    (stopped,) = [j for j in first.values() if j["status"] == "interrupted"]

    rerun = run_sweep(sweep, *args)
    assert rerun.returncode == 0, rerun.stderr
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{sweep / 'optuna.db'}")
    done = [t for t in study.trials if t.number not in study.user_attrs["sweep_interrupted"]]
    assert [t.state.name for t in done] == ["COMPLETE"] * 3  # three trials in all, not 3 + 3
    jobs = jobs_of(sweep)
    assert len(jobs) == 3
    assert jobs[stopped["dir"]]["status"] == "resumed"  # the same trial, from its checkpoint
    assert jobs[stopped["dir"]]["resumed_from"] == stopped["step"]
    assert sorted(j["status"] for j in jobs.values()) == ["completed", "completed", "resumed"]


@pytest.mark.parametrize(
    "value, message",
    [
        ("trainer.seed=1,1", "trainer.seed: received '1' twice in one sweep"),
        ("optimizer.learning_rate=interval(0.001,0.1)", "intervals need hydra/sweeper=optuna"),
    ],
)
def test_duplicate_values_and_intervals_without_optuna_are_refused(tmp_path, value, message):
    sweep_dir = tmp_path / "sweep"
    r = run_cli("trainer", "-m", value, f"hydra.sweep.dir={sweep_dir}")
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr and not sweep_dir.exists()


@pytest.mark.slow
def test_ctrl_c_before_any_optuna_trial_completes_on_joblib_exits_3_and_resumes(tmp_path):
    """Ctrl-C (SIGINT to the whole process group) to an Optuna study on the joblib launcher,
    while its two trials train and a third worker has no job (n_jobs=3): every running trial
    saves, no worker dies, the sweep exits 3 without a traceback (the plugin asks for the best
    trial only when one completed); the rerun resumes both trials and completes the study."""
    import optuna

    sweep = tmp_path / "study"
    args = ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2"]
    args += ["hydra.sweeper.sampler.seed=0", "optimizer.learning_rate=tag(log,interval(0.001,0.1))"]
    args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=3"]
    args += ["trainer.max_steps=30", "checkpoint.every=10", "trainer.pause_at=10"]
    proc = start_sweep(sweep, *args, new_session=True)
    deadline = time.monotonic() + 120
    while len(list(sweep.glob("*=*/PAUSED"))) < 2:  # both trials wait at step 10
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    assert len(loky_workers(proc.pid)) == 3  # the third one never gets a job
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "Traceback" not in err and "TerminatedWorkerError" not in err, err
    first = jobs_of(sweep)
    assert sorted((j["status"], j["step"]) for j in first.values()) == [("interrupted", 10)] * 2

    rerun = run_sweep(sweep, *args)
    assert rerun.returncode == 0, rerun.stderr
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{sweep / 'optuna.db'}")
    done = [t for t in study.trials if t.number not in study.user_attrs["sweep_interrupted"]]
    assert [t.state.name for t in done] == ["COMPLETE"] * 2
    jobs = jobs_of(sweep)
    assert {n: (j["status"], j["resumed_from"]) for n, j in jobs.items()} == {
        n: ("resumed", 10) for n in first
    }
