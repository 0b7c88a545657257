#!/usr/bin/env python
"""APP: merge a fine-tuned projector into its pre-trained anchor by spectral filtering of the task vector.

Thin entry point: ``python pipelines/merge.py ARGS`` is ``anisogen-merge ARGS``. The usage, flags and
behaviour are in :mod:`anisogen.commands.merge` (``--help`` prints them).
"""

import sys

from anisogen.cli import run_cli
from anisogen.commands.merge import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
