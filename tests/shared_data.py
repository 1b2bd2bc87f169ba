"""Locate ../shared/data (GPT-2's vocabulary, tinyshakespeare) for tests that need it.

Without it such tests skip, unless GPT2TF_REQUIRE_SHARED is set (CI sets it): then they fail,
so a broken checkout cannot pass by skipping.
"""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REQUIRE_ENV = "GPT2TF_REQUIRE_SHARED"


def shared_data_dir(*names: str) -> Path:
    """The shared data folder, checked to hold `names` (default: the GPT-2 vocabulary files)."""
    names = names or ("encoder.json", "vocab.bpe")
    missing = [n for n in names if not (SHARED_DATA / n).is_file()]
    if missing:
        why = f"{SHARED_DATA} lacks {', '.join(missing)}"
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            pytest.fail(f"{why}, and {REQUIRE_ENV} is set", pytrace=False)
        pytest.skip(f"{why} (GPT-2 vocabulary / tinyshakespeare not available)")
    return SHARED_DATA


REFERENCE_ENV = "GPT2TF_REQUIRE_REFERENCE"


def reference(module: str):
    """Import a reference package the tests compare against (torch, transformers, gpt_2_simple,
    openai). Missing, the test (or, at module level, the whole module) skips, unless
    GPT2TF_REQUIRE_REFERENCE is set (CI sets it): then it fails."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get(REFERENCE_ENV, "") not in ("", "0"):
            pytest.fail(f"{module} is not installed, and {REFERENCE_ENV} is set", pytrace=False)
        pytest.skip(f"{module} is not installed", allow_module_level=True)
