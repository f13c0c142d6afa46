"""Keeps a refused run from overwriting what is already in its run directory.

Hydra writes `<run>/.hydra/{config,hydra,overrides}.yaml` before the task starts. When the
task then refuses the run (bad input, resume refused), `restore()` puts the previous
files back, so the run directory still describes the run that wrote its checkpoints.
"""

from __future__ import annotations

import os

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

_saved: dict[str, bytes | None] = {}


class PreserveRunFiles(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _saved.clear()
        subdir = config.hydra.output_subdir
        if subdir is None:
            return
        hydra_dir = os.path.join(str(config.hydra.run.dir), str(subdir))
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            path = os.path.join(hydra_dir, name)
            try:
                with open(path, "rb") as f:
                    _saved[path] = f.read()
            except OSError:
                _saved[path] = None


def restore() -> None:
    """Put back the `.hydra/` files as they were before this run (remove ones it created)."""
    for path, content in _saved.items():
        try:
            if content is None:
                if os.path.exists(path):
                    os.remove(path)
            else:
                with open(path, "wb") as f:
                    f.write(content)
        except OSError:
            pass
