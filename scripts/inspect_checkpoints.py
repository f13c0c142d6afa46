"""List a run's checkpoints and whether they verify; show one's variables; diff configs.

    python scripts/inspect_checkpoints.py RUN
    python scripts/inspect_checkpoints.py RUN --variables 200
    python scripts/inspect_checkpoints.py RUN --diff-config model.num_units=64 trainer.max_steps=500

Exit codes: 0 every checkpoint in RUN/checkpoints/ verifies (or the asked listing was
printed); 1 at least one does not; 2 bad input (no such run or step).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.startup import script_start  # noqa: E402

script_start(sys.argv[1:])  # TensorFlow's start-up lines held back

from trainer.config import UserError  # noqa: E402
from trainer.verify import inspection  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run", metavar="RUN", help="a run directory (hydra.run.dir) or its checkpoint.remote URL"
    )
    parser.add_argument(
        "--variables", type=int, metavar="STEP", help="list this checkpoint's variables"
    )
    parser.add_argument(
        "--diff-config",
        nargs="*",
        metavar="OVERRIDE",
        help="compare the config these overrides give with the newest good checkpoint's",
    )
    parser.add_argument("--step", type=int, help="with --diff-config: compare with this checkpoint")
    args = parser.parse_args(argv)
    try:
        from trainer.remote.download import resolve_run  # a run's URL: copied here first

        args.run = resolve_run(args.run)
        if args.variables is not None:
            for name, shape, dtype in inspection.variable_table(args.run, args.variables):
                print(f"{name:<70} {str(shape):<14} {dtype}")
            return 0
        if args.diff_config is not None:
            diff = inspection.config_diff(args.run, args.diff_config, args.step)
            if not diff:
                print("no differences")
            for key, then, now, structural in diff:
                note = "   (structural: a resume would be refused)" if structural else ""
                print(f"{key}: checkpoint {then!r} -> now {now!r}{note}")
            return 0
        rows = inspection.checkpoint_table(args.run)
        print(inspection.format_checkpoint_table(rows))
        return 0 if all(r.ok for r in rows if r.where == "checkpoints/") else 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
