"""Shared helpers: compose configs in-process, run the real CLI in subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Small, fast settings for CLI runs in tests.
FAST = [
    "trainer.max_steps=40",
    "trainer.log_every=1",
    "trainer.eval_every=20",
    "checkpoint.every=20",
]


def env() -> dict:
    e = dict(os.environ)
    e["TF_CPP_MIN_LOG_LEVEL"] = "2"
    # tests/ too: user models written the way users write them (tests/user_models.py)
    paths = [str(REPO), str(REPO / "tests"), e.get("PYTHONPATH", "")]
    e["PYTHONPATH"] = os.pathsep.join(paths).rstrip(os.pathsep)
    return e


def run_cli(
    module_or_script: str, *args: str, timeout: float = 300, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run `python -m trainer ...` (module_or_script='trainer') or a scripts/*.py file."""
    if module_or_script.endswith(".py"):
        cmd = [sys.executable, str(REPO / module_or_script), *args]
    else:
        cmd = [sys.executable, "-m", module_or_script, *args]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def train(run_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m trainer <overrides> hydra.run.dir=<run_dir>`."""
    return run_cli("trainer", *overrides, f"hydra.run.dir={run_dir}", timeout=timeout)


def train_in_process(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """What `train(run_dir, *overrides)` does, in this process (TensorFlow is imported once per
    test worker instead of once per run): the config composed as `python -m trainer` composes
    it, then trainer.app.run, with what it prints captured. For runs where a fresh process
    adds nothing; a test about signals, kills, exit codes of the CLI itself, Hydra's run
    directory or the first screen keeps `train`."""
    import io

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer import app
    from trainer.config import CONF_DIR, register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = app.run(cfg, str(run_dir))
    return subprocess.CompletedProcess(
        ["trainer", *overrides], code, out.getvalue(), err.getvalue()
    )


def spawn(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """Start `python -m trainer <overrides> hydra.run.dir=<run_dir>` (text pipes), not waiting."""
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_paused(
    run_dir: Path, *overrides: str, timeout: float = 120
) -> tuple[subprocess.Popen, dict]:
    """Start `python -m trainer <overrides>` (which must set trainer.pause_at) and return once
    it has announced `<run>/PAUSED`: (the process, the marker's {"step", "pid"})."""
    proc = spawn(run_dir, *overrides)
    marker, deadline = Path(run_dir) / "PAUSED", time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"trainer exited ({proc.returncode}) before pausing:\n{err}")
        try:
            return proc, json.loads(marker.read_text())
        except (OSError, ValueError):  # not there yet, or half-written
            time.sleep(0.01)
    proc.kill()
    proc.communicate()
    raise AssertionError(f"trainer did not pause within {timeout} s")


def losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} from <run>/metrics.jsonl (train records only)."""
    out = {}
    with open(Path(run_dir) / "metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                out[r["step"]] = r["loss"]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(base: str, path: str, **query):
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def tensorboard_cmd() -> list[str]:
    """The `tensorboard` beside this Python, else on PATH, else `python -m tensorboard.main`."""
    exe = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    exe = exe if os.path.exists(exe) else shutil.which("tensorboard")
    return [exe] if exe else [sys.executable, "-m", "tensorboard.main"]


@contextlib.contextmanager
def tensorboard_server(logdir: Path, log_path: Path):
    """A real `tensorboard --logdir logdir` on a free local port; yields (its base URL, the
    process). Its output goes to `log_path`; it is stopped on exit."""
    port = free_port()
    log = open(log_path, "w")
    cmd = [*tensorboard_cmd(), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--load_fast", "false", "--reload_interval", "1"]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env())
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture
def compose():
    """compose(overrides) -> the DictConfig `python -m trainer <overrides>` would get."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer.config import CONF_DIR, register_schemas

    register_schemas()

    def _compose(overrides: list[str] | None = None, config_name: str = "config"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))

    yield _compose
    GlobalHydra.instance().clear()
