"""Prove that an interrupted, resumed run continues exactly as the uninterrupted one.

    python scripts/verify_resume.py model=custom_bn trainer.max_steps=200 verify.interrupt_at=100 verify.interrupt=sigkill

Takes every override `python -m trainer` takes plus the verify group (conf/verify/default.yaml).
Exit 0: the curves (and final state) match; 1: they differ; 2: bad input. See trainer/verify/resume.py.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Use the trainer/ package of the checkout this script lives in, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.startup import script_start  # noqa: E402

script_start(sys.argv[1:])  # TensorFlow's start-up lines held back

from trainer.verify.resume import main  # noqa: E402

if __name__ == "__main__":
    main()
