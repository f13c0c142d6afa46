"""checkpoint.remote against real servers on 127.0.0.1 (tests/stores.py): moto's S3 server and
the GCS emulator. Every run is the CLI as users run it, reaching the store through the
standard variables; the local run directory is deleted where a machine would be lost."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, REPO, env, spawn, train, train_in_process
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


def test_a_resumed_run_uploads_the_checkpoint_it_resumed_from(servers, reach, tmp_path):
    """A run saved locally only (no remote then, or killed before its upload) resumes with a
    remote: its checkpoint goes up at once, not at the next save, so a kill before that save
    leaves it on the store."""
    server = reach(servers["s3"])
    run, url = tmp_path / "run", server.url("resumed")
    assert train_in_process(run, *FAST, "trainer.stop_at=20").returncode == 0
    proc = spawn(run, *FAST, "trainer.pause_at=25", f"checkpoint.remote={url}")
    try:  # paused at 25: trained on, and saved nothing since it resumed
        _wait_for("the pause at step 25", lambda: (run / "PAUSED").exists(), 120, proc)
        _wait_for("ckpt-20 on the store", lambda: server.committed("resumed"), 60, proc)
    finally:
        proc.kill()
        proc.communicate()
    assert server.committed("resumed") == [20]


def test_the_verifiers_chaos_mode_with_wiped_machines_matches_bit_for_bit(servers, reach, tmp_path):
    """scripts/verify_resume.py as users run it: 4 SIGKILLs at random moments of an async
    run uploading every checkpoint, its run directory wiped before the 1st and 3rd resumes
    (each of those brings the run back from the store's newest commit, older than the local
    one when the upload lagged); the end equals the uninterrupted run, bit for bit."""
    from conftest import run_cli

    server = reach(servers["s3"])
    url, out = server.url("verify"), tmp_path / "verify"
    args = ["trainer.max_steps=3000", "trainer.eval_every=1000", "checkpoint.every=50"]
    args += ["checkpoint.async=true", "checkpoint.remote_every_seconds=0"]
    args += [f"checkpoint.remote={url}", "verify.interrupt=chaos", "verify.kills=4"]
    args += ["verify.wipe=true", "verify.seed=5", "verify.window=0.3", f"verify.out={out}"]
    r = run_cli("scripts/verify_resume.py", *args, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "RESULT: MATCH (bit for bit)" in r.stdout
    wiped = [ln for ln in r.stdout.splitlines() if "(a fresh machine): the store holds ckpt-" in ln]
    assert len(wiped) == 2, r.stdout[-3000:]
    kills = json.loads((out / "report.json").read_text())["verify"]["kills"]
    for k in (kills[1], kills[3]):  # brought back: resumed from what the store held
        assert k["resumed_from"] and f"holds ckpt-{k['resumed_from']}" in r.stdout
    assert server.committed("verify/resumed")[-1] == 3000
    assert server.committed("verify/reference")[-1] == 3000


def test_a_sweep_reruns_on_an_empty_machine_from_the_remote(servers, reach, tmp_path):
    """A sweep killed in its second job, its machine then lost: the same command brings each
    job back from the store; the complete one is skipped, the other resumes from its newest
    upload, and both equal their runs alone."""
    server = reach(servers["s3"])
    sweep, url = tmp_path / "sweep", server.url("sweep")
    # 4000 steps: the second job trains ~2 s past its first upload, time for this test's
    # polling to see it on a busy machine (at 2000 it once finished first)
    long = ["trainer.max_steps=4000", "trainer.log_every=1", "trainer.eval_every=1000"]
    long += ["checkpoint.every=100", "checkpoint.remote_every_seconds=0"]
    args = ["-m", "trainer.seed=0,1", *long, f"checkpoint.remote={url}"]
    cmd = [sys.executable, "-m", "trainer", *args, f"hydra.sweep.dir={sweep}"]
    first = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, text=True)
    job = {}  # seed -> the job's directory name (its overrides, sorted)

    def second_job_trains():
        job.update({s: d.name for s in (0, 1) for d in sweep.glob(f"*trainer.seed={s}*")})
        return (  # the cheap check first: the store is listed only once the job trains
            1 in job and _logged_step(sweep / job[1]) > 450 and server.committed(f"sweep/{job[1]}")
        )

    try:  # the second job has a checkpoint on the store and trains on: a real SIGKILL now
        _wait_for("the second job's upload", second_job_trains, timeout=240, proc=first)
    finally:
        first.kill()
        first.wait()
    held = server.committed(f"sweep/{job[1]}")
    assert server.committed(f"sweep/{job[0]}")[-1] == 4000 and held[-1] < 4000
    shutil.rmtree(sweep)  # the machine is gone

    from conftest import run_cli

    again = run_cli("trainer", *args, f"hydra.sweep.dir={sweep}", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "remote: brought back ckpt-4000" in again.stderr, again.stderr[-3000:]
    assert f"remote: brought back ckpt-{held[-1]}" in again.stderr, again.stderr[-3000:]
    assert _resumed_from(again.stderr) == held[-1]  # the first job was not trained again
    assert again.stdout.count("already complete (skipped)") == 1, again.stdout
    for seed in (0, 1):
        alone = tmp_path / f"alone{seed}"
        assert train_in_process(alone, *long, f"trainer.seed={seed}").returncode == 0
        assert metrics_rows(sweep / job[seed]) == metrics_rows(alone), seed


def _workers(run: Path, tmp: Path, *overrides: str) -> subprocess.Popen:
    """Two local MultiWorkerMirrored workers (scripts/launch_local_workers.py) on `run`."""
    tmp.mkdir(exist_ok=True)
    cmd = [sys.executable, str(REPO / "scripts" / "launch_local_workers.py"), "2"]
    cmd += ["--timeout", "200", "--grace", "20", "--", *overrides, f"hydra.run.dir={run}"]
    e = {**env(), "TMPDIR": str(tmp)}
    return subprocess.Popen(
        cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_multi_worker_resumes_on_a_fresh_machine_from_the_chiefs_uploads(servers, reach, tmp_path):
    """The chief uploads; on a fresh machine it brings the run back while the other worker
    waits, and both restore the same checkpoint: the run ends equal to one never moved."""
    server = reach(servers["s3"])
    ref, run, url = tmp_path / "ref", tmp_path / "run", server.url("workers")
    ref_proc = _workers(ref, tmp_path / "tmp-ref", *FAST)  # uninterrupted, side by side
    first = _workers(run, tmp_path / "tmp", *FAST, "trainer.stop_at=20", f"checkpoint.remote={url}")
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, out[-3000:]
    assert out.count(f"remote: {url} holds ckpt-20") == 1  # the chief's upload alone
    assert server.committed("workers") == [20]
    shutil.rmtree(run)  # the machines are gone

    again = _workers(run, tmp_path / "tmp", *FAST, f"checkpoint.remote={url}")
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out[-3000:]
    assert out.count(f"remote: brought back ckpt-20 from {url}") == 1, out[-3000:]
    assert out.count("Resuming from step 20") == 2, out[-3000:]  # both workers restored it
    assert ref_proc.wait(timeout=300) == 0
    assert metrics_rows(run) == metrics_rows(ref)
    assert compare_runs(str(run), str(ref))["ok"]
    assert server.committed("workers") == [20, 40]
    assert list((tmp_path / "tmp").iterdir()) == []  # the other worker's temp dir is gone


def test_a_chief_that_cannot_bring_the_run_back_stops_every_worker_in_one_line(
    servers, reach, tmp_path
):
    """trainer.resume=never against a store holding checkpoints: the chief refuses, and the
    other worker, waiting for the chief's bring-back, stops with the chief's line."""
    server = reach(servers["s3"])
    url = server.url("workers-never")
    assert train(tmp_path / "one", *FAST, f"checkpoint.remote={url}").returncode == 0
    proc = _workers(
        tmp_path / "run",
        tmp_path / "tmp",
        *FAST,
        "trainer.resume=never",
        f"checkpoint.remote={url}",
    )
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, out[-3000:]
    errors = [ln for ln in out.splitlines() if "error: trainer.resume: received 'never'" in ln]
    assert len(errors) == 2 and sum("(on the chief)" in ln for ln in errors) == 1, out[-3000:]
    assert "Traceback" not in out
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_tools_read_a_remote_run(servers, reach, tmp_path, monkeypatch):
    server = reach(servers["gs"])
    url = server.url("tools")
    r = train(tmp_path / "run", *FAST, f"checkpoint.remote={url}")
    assert r.returncode == 0, r.stderr[-2000:]
    from conftest import run_cli

    scratch = tmp_path / "scratch"  # where the tools copy the remote run: emptied at their exit
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))

    same = run_cli("scripts/compare_runs.py", url, str(tmp_path / "run"))
    assert same.returncode == 0 and "MATCH" in same.stdout, same.stdout + same.stderr
    table = run_cli("scripts/inspect_checkpoints.py", url)
    rows = [ln.split() for ln in table.stdout.splitlines()[1:]]
    assert table.returncode == 0, table.stdout + table.stderr
    assert [(r[0], r[4]) for r in rows] == [("20", "yes"), ("40", "yes")], table.stdout
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_files_ending_in_any_byte_upload_whole(servers, reach, kind, tmp_path):
    """An object's last bytes do not change what is stored: a TensorBoard event file ends in
    a CRC, which ends in a CR one time in 256 (a GCS emulator run once stored such a file one
    byte short, and the uploader retried it until checkpoint.remote_wait ran out)."""
    from trainer.remote.objects import Store

    reach(servers[kind])
    store = Store(servers[kind].url(f"tails-{kind}"))
    for i, tail in enumerate([b"\r", b"\n", b"\r\n", b"\n\r", b"x", b""]):
        data = bytes(range(256)) + tail
        store.put_bytes(f"b{i}", data)
        (tmp_path / f"f{i}").write_bytes(data)
        store.put_file(str(tmp_path / f"f{i}"), f"f{i}")
        assert store.read_bytes(f"b{i}") == data and store.read_bytes(f"f{i}") == data, tail


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
