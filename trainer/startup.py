"""A run's first screen shows its own lines: TensorFlow's C++ start-up messages are held back.

TensorFlow 2.21 prints, from C++ and beneath Python's sys.stderr, a few lines while it loads
and looks for devices: 'oneDNN custom operations are on', 'Could not find cuda drivers',
`E0000 ... failed call to cuInit: ... CUDA error` on a machine without a GPU, a notice about
CPU instructions. No environment variable silences them all (TF_CPP_MIN_LOG_LEVEL does not
reach the ones logged before absl is initialized). `quiet_native_start_up()` points file
descriptor 2 at a temporary file while TensorFlow loads and finds its devices, then writes
back every line that is not one of TensorFlow's log lines (a Python warning, say).
`trainer.debug=true` shows them all.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

# absl/TensorFlow log lines ('I0000 00:00:1796416767.035768    2249 port.cc:153] ...') and the
# two notices TensorFlow prints around them; a fatal ('F...') line is never held back
NATIVE = re.compile(
    r"^([IWE]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\]"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions:"
    r"|rebuild TensorFlow with the appropriate compiler flags)"
)


def debug_asked(argv: list[str]) -> bool:
    return any(a.lower() in ("trainer.debug=true", "+trainer.debug=true") for a in argv)


@contextlib.contextmanager
def quiet_native_start_up():
    """Hold back TensorFlow's C++ log lines written to fd 2 inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not NATIVE.match(line)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def script_start(argv: list[str]) -> None:
    """The start of a script of scripts/ that uses TensorFlow: loaded now, its start-up lines
    held back as the trainer's are (not for --help, which needs no TensorFlow; all shown with
    trainer.debug=true)."""
    if not debug_asked(argv) and not {"-h", "--help"} & set(argv):
        load_tensorflow_quietly()


def load_tensorflow_quietly() -> None:
    """Import TensorFlow and let it find its devices, its start-up lines held back."""
    with quiet_native_start_up():
        import tensorflow as tf

        tf.config.list_physical_devices()
