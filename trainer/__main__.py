"""`python -m trainer [overrides]`: the Hydra entry point and nothing else (work is in app.py)."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402

from trainer.config import CONF_DIR, register_schemas  # noqa: E402

register_schemas()
_task_started = False


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _entry(cfg) -> None:
    global _task_started
    _task_started = True
    from trainer import app

    code = app.run(cfg, HydraConfig.get().runtime.output_dir)
    if code:
        sys.exit(code)


def main() -> None:
    from trainer.preflight import check

    problem = check(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        _entry()
    except SystemExit as e:
        # Hydra exits 1 when composing the config fails (unknown option or key, wrong type):
        # that is bad input, exit code 2 by our contract.
        if not _task_started and e.code not in (0, None):
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
