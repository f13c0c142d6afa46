"""Benchmark: our loop vs Keras Model.fit, checkpoint overhead, async saves (BENCHMARKS.md).

    python scripts/bench.py [--quick] [--out bench.json]

The work is in trainer/bench/ (suite.py runs the measurements of the modules beside it).
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Import this checkout's trainer/, not an installed copy from another directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.startup import script_start  # noqa: E402

script_start(sys.argv[1:])  # TensorFlow's start-up lines held back

from trainer.bench import suite as bench  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer, shorter trials (~10 min, 2 cores)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: seconds, tiny
    p.add_argument("--out", default="bench.json", help="where to write the results (JSON)")
    args = p.parse_args()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    bench.run(mode, args.out, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
