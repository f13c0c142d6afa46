"""Start N local `python -m trainer` workers with TF_CONFIG, for trying multi-worker on one host.

`scripts/launch_local_workers.py N -- <overrides>` is the command line over `launch()`.
Every worker gets the same overrides, `distribute=multi_worker` and the same run directory;
worker 0 is the chief. Non-chief workers do not write Hydra's `.hydra/` files or log file
into the run directory (the trainer itself keeps their other writes in a temp dir).

Signals: workers run in their own session (a Ctrl-C in the terminal reaches only the
launcher), and the launcher turns a first SIGINT/SIGTERM into SIGTERM for every worker: that
is the preemption notice the workers agree on, so all save the same step and exit 3. A
second signal kills the workers at once (the last checkpoint stays). The launcher is bounded: once a worker fails,
the others (likely stuck in a collective) get `grace` seconds before they are terminated,
and the whole job is stopped after `timeout` seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime

EXIT_BAD_INPUT = 2


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tf_config(ports: list[int], index: int) -> str:
    """TF_CONFIG for worker `index` of a cluster of local workers on `ports`."""
    workers = [f"127.0.0.1:{p}" for p in ports]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def worker_overrides(overrides: list[str], index: int) -> list[str]:
    """The overrides worker `index` runs with (run dir and strategy filled in)."""
    out = list(overrides)
    if not any(o.startswith("distribute=") for o in out):
        out.append("distribute=multi_worker")
    if not any(o.startswith("hydra.run.dir=") for o in out):
        raise ValueError("hydra.run.dir must be set (launch() fills it in)")
    if index > 0:  # only the chief writes Hydra's files into the shared run directory
        out += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return out


def _pump(stream, prefix: str, sink) -> None:
    for line in iter(stream.readline, ""):
        sink.write(prefix + line)
        sink.flush()
    stream.close()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N -> 128+N


def launch(
    n: int,
    overrides: list[str],
    *,
    timeout: float = 3600.0,
    grace: float = 60.0,
    python: str = sys.executable,
) -> int:
    """Run `n` workers to completion; return 0 if all succeeded, else the first failure's code."""
    if n < 1:
        print(f"error: number of workers: received {n}; allowed: an integer >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    bad = [o for o in overrides if o.startswith("distribute=") and o != "distribute=multi_worker"]
    if bad:
        print(f"error: {bad[0]}: the launcher runs distribute=multi_worker", file=sys.stderr)
        return EXIT_BAD_INPUT
    overrides = list(overrides)
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        overrides.append(f"hydra.run.dir=outputs/{datetime.now():%Y-%m-%d/%H-%M-%S}")
    ports = free_ports(n)
    procs, pumps = [], []
    for i in range(n):
        env = {**os.environ, "TF_CONFIG": tf_config(ports, i)}
        cmd = [python, "-m", "trainer", *worker_overrides(overrides, i)]
        p = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        procs.append(p)
        print(f"launch: worker {i} pid {p.pid} on 127.0.0.1:{ports[i]}", file=sys.stderr)
        for stream, sink in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(stream, f"[worker {i}] ", sink), daemon=True)
            t.start()
            pumps.append(t)

    signals_seen = []

    def forward(signum, frame):
        signals_seen.append(signum)
        first = len(signals_seen) == 1
        name = signal.Signals(signum).name
        what = "SIGTERM to every worker" if first else "killing the workers"
        print(f"launch: {name} received, {what}", file=sys.stderr)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if first else signal.SIGKILL)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        first_failure, deadline = None, time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                print(f"launch: timeout after {timeout:.0f} s, stopping workers", file=sys.stderr)
                first_failure = first_failure or 1
                break
            for i, p in enumerate(procs):
                if first_failure is None and p.poll() not in (None, 0):
                    first_failure = _exit_code(p.returncode)
                    print(f"launch: worker {i} exited {p.returncode}", file=sys.stderr)
                    deadline = min(deadline, time.monotonic() + grace)
            time.sleep(0.1)
        _stop(procs)
        for t in pumps:
            t.join(timeout=5)
        codes = [p.returncode for p in procs]
        print(f"launch: worker exit codes {codes}", file=sys.stderr)
        if first_failure is None:
            first_failure = next((_exit_code(c) for c in codes if c), 0)
        return first_failure
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _stop(procs: list[subprocess.Popen], wait: float = 10.0) -> None:
    """SIGTERM the workers still running, then SIGKILL those that do not exit in `wait` s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + wait
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
