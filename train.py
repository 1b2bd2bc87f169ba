#!/usr/bin/env python3
"""Thin CLI over gpt2tf.cli.train_main; run with --help for the flags."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
from gpt2tf.cli import train_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(train_main())
