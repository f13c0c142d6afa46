"""python scripts/verify_export.py RUN [--out report.json]: reload the run's exports and prove nothing is lost.

Exit codes: 0 nothing lost, 1 something differs, 2 bad input. The work is in trainer/verify/exports.py.
"""

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.startup import script_start  # noqa: E402

script_start(sys.argv[1:])  # TensorFlow's start-up lines held back
for _name in ("absl", "tensorflow"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from trainer.verify.exports import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
