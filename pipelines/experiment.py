#!/usr/bin/env python
"""Text-only training on the toy world, end to end, and the report ``docs/EXPERIMENTS.md``.

Thin entry point: ``python pipelines/experiment.py ARGS`` is ``anisogen-experiment ARGS``. The usage, flags and
behaviour are in :mod:`anisogen.commands.experiment` (``--help`` prints them).
"""

import sys

from anisogen.cli import run_cli
from anisogen.commands.experiment import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
