"""Shared fixtures: tiny GPT-2 model directories made by the project's own `init`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from tiny import TINY  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """models/tiny/: a random 2-layer model with the byte-level vocabulary (no ../shared needed)."""
    from gpt2tf import checkpoints

    models = tmp_path_factory.mktemp("models")
    checkpoints.init_model_dir(models / "tiny", TINY, seed=1)
    return models / "tiny"


@pytest.fixture(scope="session")
def tiny_generator(tiny_model_dir):
    from gpt2tf.decode.generator import Generator

    gen = Generator(tiny_model_dir)
    yield gen
    gen.close()
