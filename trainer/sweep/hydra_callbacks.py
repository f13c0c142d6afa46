"""Keeps a refused run, or a sweep's finished job, from overwriting its `.hydra/` files.

Hydra writes `<run>/.hydra/{config,hydra,overrides}.yaml` before the task starts. When the
task then refuses the run (bad input, resume refused), or finds a sweep's job already
complete, `restore()` puts the previous files back, so the run directory still describes the
run that wrote its checkpoints. A single run's files are read in `on_run_start`; a sweep's,
for every job directory already in the sweep directory, in `on_multirun_start` (Hydra
rewrites a job's files before any hook of that job runs), and handed to each job in
`on_job_start` (the callback travels with the job to a launcher's worker process).
"""

from __future__ import annotations

import glob
import os
import sys

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

_NAMES = ("config.yaml", "hydra.yaml", "overrides.yaml")
_saved: dict[str, bytes | None] = {}
_made: list[str] = []  # a single run's directory that did not exist before this run
_LEFT_BY_HYDRA = {"train.log"}  # what Hydra writes beside .hydra/ before the task starts


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class PreserveRunFiles(Callback):
    def __init__(self) -> None:
        self._jobs: dict[str, bytes | None] = {}  # a sweep's job files, by absolute path

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _saved.clear()
        _made.clear()
        run_dir = os.path.abspath(str(config.hydra.run.dir))
        if not os.path.exists(run_dir):
            _made.append(run_dir)
        subdir = config.hydra.output_subdir
        if subdir is None:
            return
        hydra_dir = os.path.join(str(config.hydra.run.dir), str(subdir))
        for name in _NAMES:
            path = os.path.join(hydra_dir, name)
            _saved[path] = _read(path)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        subdir = config.hydra.output_subdir
        if subdir is None:
            return
        root = glob.escape(os.path.abspath(str(config.hydra.sweep.dir)))
        for name in _NAMES:  # job directories at any depth (hydra.sweep.subdir may nest)
            pattern = os.path.join(root, "**", glob.escape(str(subdir)), name)
            for path in glob.glob(pattern, recursive=True):
                self._jobs[path] = _read(path)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or config.hydra.output_subdir is None:
            return
        _saved.clear()
        out = os.path.abspath(str(config.hydra.runtime.output_dir))
        for name in _NAMES:
            path = os.path.join(out, str(config.hydra.output_subdir), name)
            _saved[path] = self._jobs.get(path)  # None: this job created it


def restore() -> None:
    """Put back the `.hydra/` files as they were before this run (remove ones it created),
    and remove the run directory Hydra made for this run if nothing else is in it."""
    _put_back()
    for run_dir in _made:
        _remove_if_empty(run_dir)


def _remove_if_empty(run_dir: str) -> None:
    hydra_dir = os.path.join(run_dir, ".hydra")
    if os.path.isdir(hydra_dir) and not os.listdir(hydra_dir):
        os.rmdir(hydra_dir)
    try:
        left = set(os.listdir(run_dir))
    except OSError:
        return
    if left <= _LEFT_BY_HYDRA:
        for name in left:
            os.remove(os.path.join(run_dir, name))
        os.rmdir(run_dir)


def _put_back() -> None:
    for path, content in _saved.items():
        try:
            if content is None:
                if os.path.exists(path):
                    os.remove(path)
            else:
                with open(path, "wb") as f:
                    f.write(content)
        except OSError as e:
            print(
                f"warning: could not put back {path} as it was before this run ({e.strerror})",
                file=sys.stderr,
            )


def recorded_command(run_dir: str) -> str | None:
    """The command that ran `run_dir` before (its `.hydra/overrides.yaml` as it was before
    this run rewrote it), with the same run directory: what resumes it; None if unknown."""
    import shlex

    import yaml

    path = os.path.join(os.path.abspath(run_dir), ".hydra", "overrides.yaml")
    content = _saved.get(path)
    if not content:
        return None
    try:
        overrides = [str(o) for o in yaml.safe_load(content) or []]
    except yaml.YAMLError:
        return None
    once = ("hydra.run.dir=", "trainer.stop_at=", "trainer.pause_at=")  # not for a resume
    kept = [o for o in overrides if not o.lstrip("+").startswith(once)]
    return shlex.join(["python", "-m", "trainer", *kept, f"hydra.run.dir={run_dir}"])
