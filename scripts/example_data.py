"""Write the README's example data: houses.csv (600 houses, whole-number prices) and
arrays.npz (arrays x and y), both small and seeded, into the current directory.

    python scripts/example_data.py            # then: python -m trainer data=csv data.path=houses.csv data.target=price

Prints, for each, what always predicting the training split's mean scores on its
validation split: the baseline a trained model must beat.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.startup import script_start  # noqa: E402

script_start(sys.argv[1:])  # TensorFlow's start-up lines held back

from trainer.data.examples import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
