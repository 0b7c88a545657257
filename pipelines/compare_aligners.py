#!/usr/bin/env python
"""Compare aligners on one dataset: fit each on unpaired text/image, score on held-out pairs.

Thin entry point: ``python pipelines/compare_aligners.py ARGS`` is ``anisogen-compare-aligners ARGS``.
The usage, flags and behaviour are in :mod:`anisogen.commands.compare_aligners` (``--help`` prints them).
"""

import sys

from anisogen.cli import run_cli
from anisogen.commands.compare_aligners import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
