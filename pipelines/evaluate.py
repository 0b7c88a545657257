#!/usr/bin/env python
"""Zero-shot evaluation of a trained export on paired held-out image embeddings.

Thin entry point: ``python pipelines/evaluate.py ARGS`` is ``anisogen-evaluate ARGS``. The usage, flags and
behaviour are in :mod:`anisogen.commands.evaluate` (``--help`` prints them).
"""

import sys

from anisogen.cli import run_cli
from anisogen.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
