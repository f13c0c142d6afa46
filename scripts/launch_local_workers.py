"""Start N local multi-worker trainer processes (TF_CONFIG on 127.0.0.1 ports) and wait.

    python scripts/launch_local_workers.py 2 -- model=custom_dense trainer.max_steps=200 \
        hydra.run.dir=outputs/mw
    python scripts/launch_local_workers.py 2 --timeout 600 -- <trainer overrides>

Exits 0 when every worker succeeded, else the first failing worker's exit code (3: stopped
by a signal after saving a checkpoint; rerun the same line to resume).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.distribute.launch import launch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "workers", type=int, help="number of worker processes (worker 0 is the chief)"
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="stop everything after this many seconds"
    )
    parser.add_argument(
        "--grace", type=float, default=60.0, help="seconds the others get once one worker fails"
    )
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    return launch(args.workers, argv[cut + 1 :], timeout=args.timeout, grace=args.grace)


if __name__ == "__main__":
    sys.exit(main())
