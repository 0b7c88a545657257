#!/usr/bin/env python
"""Train the bundled toy CLIP on toy-world scenes (CPU) and write its weights as float16 safetensors.

Thin entry point: ``python pipelines/train_toyclip.py ARGS`` is ``anisogen-train-toyclip ARGS``. The usage, flags and
behaviour are in :mod:`anisogen.commands.train_toyclip` (``--help`` prints them).
"""

import sys

from anisogen.cli import run_cli
from anisogen.commands.train_toyclip import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
