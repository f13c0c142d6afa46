"""checkpoint.remote measured: what the background upload costs each save of the loop as users
run it (`remote_cost_ratio`), and the upload's throughput against a plain put of the same
bytes with the same library (`upload_vs_put`). Against moto's S3 server on 127.0.0.1 (a dev
dependency), started here; the runs reach it through AWS_ENDPOINT_URL as users' runs do."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from trainer.bench.common import trainer_command
from trainer.bench.loop_rates import loop_windows, median, rotated
from trainer.bench.saves import AFTER_SAVE, BASELINE_FROM, CKPT_EVERY, cost_per_save


@contextlib.contextmanager
def s3_server(bucket: str = "bench"):
    """moto's S3 server on a free port, its variables set in os.environ (runs inherit them)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server") or os.path.join(
        os.path.dirname(sys.executable), "moto_server"
    )
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        import fsspec

        region = {"region_name": env["AWS_DEFAULT_REGION"]}  # the bucket's location
        fsspec.filesystem("s3", skip_instance_cache=True, client_kwargs=region).mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def remote_cost(m: dict, workdir: str, log) -> dict:
    """An async save every 500 steps of the default model: checkpoint.remote off, on (its
    default remote_every_seconds), and on with every checkpoint uploaded (remote_every_seconds
    =0, information); each run a fresh `python -m trainer`, interleaved in rotating order;
    each run's cost per save seen within the run (saves.cost_per_save). remote_cost_ratio:
    the median cost with the remote over the median without; spread: the per-round ratios."""
    steps, warmup = m["ckpt_steps"], min(CKPT_EVERY + 100, m["ckpt_steps"] // 3)
    every = min(CKPT_EVERY, max(10, steps // 4))
    base = [f"checkpoint.every={every}", "checkpoint.async=true"]
    costs = {"local": [], "remote": [], "remote_each": []}
    if steps < warmup + (AFTER_SAVE + BASELINE_FROM) * 10:  # smoke: no save's cost is seen
        log("  skipped: runs this short show no save's cost (cost_per_save)")
        return {"remote_cost_ratio": None, "remote_each_cost_ratio": None,
                "remote_cost_ratio_rounds": {"remote": [], "remote_each": []},
                "cost_per_save_ms": costs, "checkpoint_every": every}  # fmt: skip
    rounds = {"remote": [], "remote_each": []}
    with s3_server() as url:
        for r in range(m["ckpt_rounds"]):
            seen = {}
            for name in rotated(list(costs), r):
                extra = [f"checkpoint.remote={url}/cost-{r}-{name}"] if name != "local" else []
                extra += ["checkpoint.remote_every_seconds=0"] if name == "remote_each" else []
                windows = loop_windows([*base, *extra], steps, workdir, fresh=True)
                seen[name] = cost_per_save(windows, warmup, every)
                if seen[name] is not None:
                    costs[name].append(seen[name])
            for name in rounds:
                if seen[name] is not None and seen["local"]:
                    rounds[name].append(seen[name] / seen["local"])
            log(
                f"  round {r + 1}: per save "
                + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in seen.items() if v is not None)
            )

    def ratio(name: str) -> float | None:
        ok = costs["local"] and costs[name] and median(costs["local"]) > 0
        return median(costs[name]) / median(costs["local"]) if ok else None

    return {
        "remote_cost_ratio": ratio("remote"),
        "remote_each_cost_ratio": ratio("remote_each"),
        "remote_cost_ratio_rounds": rounds,
        "cost_per_save_ms": {k: [1000 * c for c in v] for k, v in costs.items()},
        "checkpoint_every": every,
    }


def upload_vs_put(m: dict, workdir: str, log) -> dict:
    """One checkpoint of a state of `model.num_units=units/5` (a real run's), uploaded by the
    run's Uploader (read, checked against its manifest, put, checked on the store, logs,
    manifest, retention) against a plain `put_file` of the same files with the same fsspec
    file system; rounds alternate. upload_vs_put: the upload's throughput over the put's."""
    from trainer.remote.objects import Store
    from trainer.remote.uploader import Uploader

    run_dir = tempfile.mkdtemp(prefix="upload-", dir=workdir)
    args = [f"model.num_units={max(16, m['units'] // 5)}", f"data.num_features={m['features']}"]
    args += ["trainer.max_steps=3", "trainer.stop_at=2", "checkpoint.every=2"]
    cmd, env = trainer_command(args, run_dir)
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    prefix = os.path.join(run_dir, "checkpoints", "ckpt-2")
    files = [
        os.path.join(run_dir, "checkpoints", n)
        for n in os.listdir(os.path.join(run_dir, "checkpoints"))
        if n.startswith("ckpt-2.") and not n.endswith(".manifest.json")
    ]
    size = sum(os.path.getsize(f) for f in files)
    times = {"upload": [], "put": []}
    with s3_server() as url:
        for r in range(max(2, m["rounds"])):
            store = Store(f"{url}/up-{r}")
            uploader = Uploader(store, run_dir, 3)
            t0 = time.perf_counter()
            uploader.committed(prefix, 2)
            while uploader.uploaded < 1:
                time.sleep(0.0005)
            times["upload"].append(time.perf_counter() - t0)
            uploader.close()
            t0 = time.perf_counter()
            for f in files:
                store.fs.put_file(f, store.path(f"plain/{os.path.basename(f)}"))
            times["put"].append(time.perf_counter() - t0)
            log(
                f"  round {r + 1}: {size / 1e6:.1f} MB upload {times['upload'][-1]:.3f} s, put {times['put'][-1]:.3f} s"
            )
    shutil.rmtree(run_dir, ignore_errors=True)
    per_round = [p / u for u, p in zip(times["upload"], times["put"], strict=True)]
    return {
        "upload_vs_put": median(times["put"]) / median(times["upload"]),
        "upload_vs_put_rounds": per_round,
        "checkpoint_mb": size / 1e6,
        "seconds": times,
    }
