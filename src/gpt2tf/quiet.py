"""Import TensorFlow without its C++ start-up chatter (oneDNN notices, CUDA probing, cuInit).

Those lines are written to fd 2 by C++ before any Python-level setting can apply, and one of
them (`E0000 ... failed call to cuInit`) alarms users on a machine without a GPU. The CLI edge
and the Python API call `import_tensorflow()` before anything imports TensorFlow; set
GPT2TF_TF_LOGS=1 to see the lines.
"""

import contextlib
import os
import sys

LOGS_ENV = "GPT2TF_TF_LOGS"


def import_tensorflow() -> None:
    """Import TensorFlow once, with its native log lines hidden."""
    if "tensorflow" in sys.modules or os.environ.get(LOGS_ENV):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with native_stderr_hidden():
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")


@contextlib.contextmanager
def native_stderr_hidden():
    """Point fd 2 at /dev/null meanwhile (C++ writes there directly: TF's start-up lines,
    TFLite's "Created TensorFlow Lite XNNPACK delegate for CPU."), unless GPT2TF_TF_LOGS is set."""
    if os.environ.get(LOGS_ENV):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
