"""checkpoint.remote against real servers on 127.0.0.1 (tests/stores.py): moto's S3 server and
the GCS emulator. Every run is the CLI as users run it, reaching the store through the
standard variables; the local run directory is deleted where a machine would be lost."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
from conftest import FAST, spawn, train, train_in_process
from stores import GCS, S3, SECRET

from trainer.checkpoint.manifest import list_checkpoints, verify
from trainer.remote.download import local_copy
from trainer.verify.compare import compare_runs, metrics_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    s3 = S3(tmp_path_factory.mktemp("s3")).start()
    gcs = GCS(tmp_path_factory.mktemp("gcs")).start()
    yield {"s3": s3, "gs": gcs}
    s3.stop()
    gcs.stop()


@pytest.fixture
def reach(monkeypatch):
    """reach(server): the runs this test starts find `server` (its variables set)."""

    def _reach(server):
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)
        return server

    return _reach


def _every_file_text(*roots: Path) -> str:
    out = []
    for root in roots:
        for p in Path(root).rglob("*"):
            if p.is_file():
                out.append(p.read_bytes().decode("latin-1"))
    return "\n".join(out)


def _resumed_from(stderr: str) -> int | None:
    for line in stderr.splitlines():
        if line.startswith("Resuming from step "):
            return int(line.split()[3].rstrip(":"))
    return None


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_a_run_whose_machine_is_lost_resumes_from_the_remote_exactly(
    kind, servers, reach, tmp_path
):
    server = reach(servers[kind])
    ref, run = tmp_path / "ref", tmp_path / "run"
    long = [*FAST[1:], "trainer.max_steps=80"]
    assert train_in_process(ref, *long).returncode == 0
    url = server.url(f"lost-{kind}")
    first = train(run, *long, "trainer.stop_at=40", f"checkpoint.remote={url}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "waited" in first.stderr and f"remote: {url} holds ckpt-40" in first.stderr
    assert server.committed(f"lost-{kind}") == [20, 40]  # max_to_keep=3: both kept
    shutil.rmtree(run)  # the machine is gone

    again = train(run, *long, f"checkpoint.remote={url}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"remote: brought back ckpt-40 from {url}" in again.stderr
    assert _resumed_from(again.stderr) == 40
    assert metrics_rows(run) == metrics_rows(ref)  # every row: losses, batch ids, evals
    report = compare_runs(str(run), str(ref))  # curves, batch ids, every final variable
    assert report["ok"], report["final_state"]
    # a completed run can be found and loaded from the remote alone
    objects = server.objects(f"lost-{kind}")
    for name in ("export/model.keras", ".hydra/config.yaml", "metrics.jsonl", "train.log"):
        assert name in objects, objects
    assert server.committed(f"lost-{kind}") == [40, 60, 80]
    assert not [o for o in objects if ".probe-" in o]
    # a URL with no credentials in it, and the secret in no file, local or uploaded
    copy = tmp_path / "copy"
    server.fs().get(f"runs/lost-{kind}", str(copy), recursive=True)
    assert SECRET not in _every_file_text(run, copy)


def test_wrong_bucket_bad_credentials_and_bad_urls_are_one_line_and_exit_2(
    servers, reach, tmp_path
):
    strict = S3(tmp_path / "strict", INITIAL_NO_AUTH_ACTION_COUNT="0").start()
    try:
        cases = [
            (servers["s3"], "s3://no-such-bucket/x", "bucket does not exist"),
            (servers["gs"], "gs://no-such-bucket/x", "no-such-bucket"),
            (strict, "s3://runs/x", "Access Key Id you provided does not exist"),
            (servers["s3"], "s3://key:secret@runs/x", "credentials"),
            (servers["s3"], "runs/x", "expected a URL"),
        ]
        for i, (server, url, words) in enumerate(cases):
            reach(server)
            run = tmp_path / f"run{i}"
            r = train(run, *FAST, f"checkpoint.remote={url}")
            assert r.returncode == 2, (url, r.stderr[-2000:])
            errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
            assert len(errors) == 1 and "checkpoint.remote" in errors[0], r.stderr[-2000:]
            assert words.lower() in errors[0].lower(), errors
            assert "Traceback" not in r.stderr
            assert not run.exists()  # nothing trained, nothing written
    finally:
        strict.stop()


def _wait_for(what, predicate, timeout=120.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _logged_step(run: Path) -> int:
    try:
        rows = (run / "metrics.jsonl").read_bytes().split(b"\n")[:-1]
    except FileNotFoundError:
        return 0
    return max((json.loads(r).get("step", 0) for r in rows), default=0)


LONG = ["trainer.max_steps=6000", "trainer.log_every=50", "trainer.eval_every=100000"]


def test_a_store_restarted_mid_run_catches_up_and_training_never_stops(reach, tmp_path):
    s3 = S3(tmp_path / "s3").start()
    try:
        reach(s3)
        run = tmp_path / "run"
        args = [*LONG, "trainer.max_steps=20000", "checkpoint.every=200"]
        args += ["checkpoint.remote_every_seconds=0"]  # every checkpoint: the outage shows
        proc = spawn(run, *args, f"checkpoint.remote={s3.url('r')}")
        _wait_for("a remote checkpoint", lambda: s3.committed("r"), proc=proc)
        s3.stop()  # connection refused from now on
        down_at, t0 = _logged_step(run), time.time()
        _wait_for(
            "steps while the store is down",
            lambda: _logged_step(run) > down_at + 1000 and time.time() - t0 > 3,
            proc=proc,
        )
        s3.start()  # moto keeps objects in memory: it is back empty, its bucket re-created
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert "warning: remote: could not upload ckpt-" in err, err[-3000:]
        assert "is reachable again" in err
        held = s3.committed("r")  # caught up (the newest at least), retention as usual
        assert held[-1] == 20000 and len(held) <= 3, held
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        lags = [r["remote_lag_steps"] for r in rows if "remote_lag_steps" in r]
        assert max(lags) > 1000  # the outage shows in the logged lag
    finally:
        s3.stop()


def test_a_store_down_for_good_ends_the_run_locally_with_exit_5(reach, tmp_path):
    gcs = GCS(tmp_path / "gcs").start()
    try:
        reach(gcs)
        run = tmp_path / "run"
        url = gcs.url("down")
        args = [*LONG, "checkpoint.every=200", f"checkpoint.remote={url}"]
        proc = spawn(run, *args, "checkpoint.remote_wait=5")
        _wait_for("a remote checkpoint", lambda: gcs.committed("down"), proc=proc)
        gcs.stop()
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 5, err[-3000:]
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and f"{url} is behind: ckpt-6000" in errors[0], err[-3000:]
        assert "completed at step 6000" in out  # trained to the end, all of it kept locally
        from trainer.checkpoint.manifest import list_checkpoints, verify

        assert verify(list_checkpoints(str(run / "checkpoints"))[-1]).ok
        gcs.start()  # the store is back: the same command uploads what it missed
        r = train(run, *args)
        assert r.returncode == 0, r.stderr[-3000:]
        assert gcs.committed("down")[-1] == 6000
        assert "export/model.keras" in gcs.objects("down")
    finally:
        gcs.stop()


def test_sigkills_during_uploads_and_wiped_machines_resume_exactly(servers, reach, tmp_path):
    server = reach(servers["s3"])
    rng = random.Random(os.getpid() ^ int(time.time()))
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = ["trainer.max_steps=3000", "trainer.log_every=1", "trainer.eval_every=1000"]
    args += ["checkpoint.every=10", "checkpoint.async=true", "checkpoint.remote_every_seconds=0"]
    assert train_in_process(ref, *args).returncode == 0
    url = server.url("chaos")
    kills, held = 0, []
    for attempt in range(5):  # 4 runs killed at random steps, then a fresh machine
        proc = spawn(run, *args, f"checkpoint.remote={url}")
        if attempt < 4:
            target = rng.randint(min(_logged_step(run) + 20, 2980), 2980)
            deadline = time.time() + 120
            while proc.poll() is None and _logged_step(run) < target and time.time() < deadline:
                time.sleep(0.005)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
        out, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err[-3000:]
        # every checkpoint the store holds a manifest for restores (downloaded, CRC-checked)
        copy = local_copy(url, str(tmp_path / f"copy{attempt}"))
        held = server.committed("chaos")
        assert [verify(p).ok for p in list_checkpoints(f"{copy}/checkpoints")] == [True] * len(held)
        if attempt == 3:
            shutil.rmtree(run)  # the machine is lost: the next run has the store alone
    assert held, "the store held no checkpoint after the kills"
    # the fresh machine resumed from the store's newest committed checkpoint
    assert f"remote: brought back ckpt-{held[-1]} from {url}" in err, err[-2000:]
    assert _resumed_from(err) == held[-1], err[-2000:]
    assert proc.returncode == 0 and kills >= 3, (kills, err[-2000:])
    assert metrics_rows(run) == metrics_rows(ref)
    assert compare_runs(str(run), str(ref))["ok"]
    names = [o.split("/", 1)[1] for o in server.objects("chaos") if o.startswith("checkpoints/")]
    steps = server.committed("chaos")
    assert steps[-1] == 3000 and len(steps) <= 3  # retention kept max_to_keep
    leftovers = {n.split(".")[0] for n in names} - {f"ckpt-{s}" for s in steps}
    assert not leftovers  # no files of an interrupted upload left behind


def test_a_sweep_reruns_on_an_empty_machine_from_the_remote(servers, reach, tmp_path):
    server = reach(servers["s3"])
    sweep = tmp_path / "sweep"
    url = server.url("sweep")
    args = ["-m", "trainer.seed=0,1", *FAST, f"checkpoint.remote={url}", f"hydra.sweep.dir={sweep}"]
    from conftest import run_cli

    first = run_cli("trainer", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "checkpoints").is_dir())
    assert len(jobs) == 2
    assert {o.split("/")[0] for o in server.objects("sweep")} >= set(jobs)
    rows = {j: metrics_rows(sweep / j) for j in jobs}
    shutil.rmtree(sweep)
    again = run_cli("trainer", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("remote: brought back ckpt-40") == 2, again.stderr[-3000:]
    assert "Resuming" not in again.stderr  # complete on the remote: nothing trained again
    for j in jobs:
        assert metrics_rows(sweep / j) == rows[j]


def test_the_tools_read_a_remote_run(servers, reach, tmp_path):
    server = reach(servers["gs"])
    url = server.url("tools")
    r = train(tmp_path / "run", *FAST, f"checkpoint.remote={url}")
    assert r.returncode == 0, r.stderr[-2000:]
    from conftest import run_cli

    same = run_cli("scripts/compare_runs.py", url, str(tmp_path / "run"))
    assert same.returncode == 0 and "MATCH" in same.stdout, same.stdout + same.stderr
    table = run_cli("scripts/inspect_checkpoints.py", url)
    rows = [ln.split() for ln in table.stdout.splitlines()[1:]]
    assert table.returncode == 0, table.stdout + table.stderr
    assert [(r[0], r[4]) for r in rows] == [("20", "yes"), ("40", "yes")], table.stdout


def test_a_file_url_is_a_store_too(tmp_path):
    """file:// (a mounted network disk): the same commit order and bring-back, no server."""
    store, run, ref = tmp_path / "store", tmp_path / "run", tmp_path / "ref"
    long = [*FAST[1:], "trainer.max_steps=60"]
    url = f"file://{store}"
    assert train_in_process(ref, *long).returncode == 0
    assert (
        train_in_process(run, *long, "trainer.stop_at=40", f"checkpoint.remote={url}").returncode
        == 0
    )
    assert sorted(p.name for p in (store / "checkpoints").glob("*.manifest.json")) == [
        "ckpt-20.manifest.json",
        "ckpt-40.manifest.json",
    ]
    shutil.rmtree(run)
    r = train_in_process(run, *long, f"checkpoint.remote={url}")
    assert r.returncode == 0 and "remote: brought back ckpt-40" in r.stderr, r.stderr[-2000:]
    assert metrics_rows(run) == metrics_rows(ref) and compare_runs(str(run), str(ref))["ok"]
    # trainer.resume=never on a store that holds checkpoints: refused, nothing trained
    never = train_in_process(
        tmp_path / "new", *long, "trainer.resume=never", f"checkpoint.remote={url}"
    )
    assert never.returncode == 2 and "trainer.resume: received 'never'" in never.stderr
    assert not (tmp_path / "new" / "checkpoints").exists()
