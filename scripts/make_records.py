"""python scripts/make_records.py data=<source> [data.key=value ...] --out DIR [--shards N] [--val-shards N]

Convert any data source (csv, npz, digits, the synthetic sets) into TFRecord shards and their
description.json, for `python -m trainer data=records data.files='DIR/train-*.tfrecord'`.
Exit codes: 0 written, 2 bad input. The work is in trainer/data/make_records.py.
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

from trainer.data.make_records import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
