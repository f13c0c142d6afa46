"""What every bench measurement shares: the repository, a trainer subprocess's command and
peak memory, the composed config, no evaluation. Imports nothing else of trainer.bench."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NO_EVAL = 10**9


def compose(overrides: list[str]):
    """The config `python -m trainer <overrides>` would get."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer.config import CONF_DIR, register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def trainer_command(args: list[str], run_dir: str) -> tuple[list[str], dict]:
    """`python -m trainer <args>` in `run_dir`, with this repository's code: (argv, env)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
    return [sys.executable, "-m", "trainer", *args, f"hydra.run.dir={run_dir}"], env


def _rss(args: list[str], run_dir: str) -> float:
    """Peak RSS (MB) of one `python -m trainer` run in a subprocess (this repository's code):
    its VmHWM, read every 20 ms while it runs. Not wait4's ru_maxrss: Linux carries the
    parent's high-water mark at fork over the exec, so a child of a large process (this
    benchmark, after the 300 MB state) would report the parent's size."""
    cmd, env = trainer_command(args, run_dir)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        peak_kb = 0
        while proc.poll() is None:
            peak_kb = max(peak_kb, _vm_hwm_kb(proc.pid))
            time.sleep(0.02)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return peak_kb / 1024


def _vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:  # exited between poll() and open()
        pass
    return 0
