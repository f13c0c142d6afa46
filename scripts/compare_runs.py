"""Compare two runs from their TensorBoard event files (and newest checkpoints).

    python scripts/compare_runs.py RUN_A RUN_B [--tag loss] [--atol 0] [--out DIR]

RUN_A / RUN_B: run directories (or TensorBoard log directories), or a run's checkpoint.remote URL
(s3://..., gs://...: copied into a temporary directory first). Prints the report of
scripts/verify_resume.py and writes report.json and curves.png into --out
(default outputs/compare/<date>/<time>). Exit 0: they match; 1: they differ; 2: bad input.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Use the trainer/ package of the checkout this script lives in, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.startup import script_start  # noqa: E402

script_start(sys.argv[1:])  # TensorFlow's start-up lines held back

from trainer.verify.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
