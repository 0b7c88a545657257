#!/usr/bin/env python
"""Analyses behind APP, Gap-Init and MoReS (see docs/METHODS.md).

Thin entry point: ``python pipelines/analyze.py ARGS`` is ``anisogen-analyze ARGS``. The usage, flags and
behaviour are in :mod:`anisogen.commands.analyze` (``--help`` prints them).
"""

import sys

from anisogen.cli import run_cli
from anisogen.commands.analyze import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
