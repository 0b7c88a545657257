#!/usr/bin/env python
"""The gap study on the toy world: fit every registered aligner on unpaired embeddings and score them.

Thin entry point: ``python pipelines/gap_study.py ARGS`` is ``anisogen-gap-study ARGS``. The usage, flags and
behaviour are in :mod:`anisogen.commands.gap_study` (``--help`` prints them).
"""

import sys

from anisogen.cli import run_cli
from anisogen.commands.gap_study import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
