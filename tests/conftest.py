"""Shared helpers: compose configs in-process, run the real CLI in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
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


def losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} from <run>/metrics.jsonl (train records only)."""
    out = {}
    with open(Path(run_dir) / "metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                out[r["step"]] = r["loss"]
    return out


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
