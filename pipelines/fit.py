#!/usr/bin/env python
"""Fit any registered aligner on unpaired text and image embeddings and write the artifact.

Thin entry point: ``python pipelines/fit.py ARGS`` is ``anisogen-fit ARGS``. The usage, flags and
behaviour are in :mod:`anisogen.commands.fit` (``--help`` prints them).
"""

import sys

from anisogen.cli import run_cli
from anisogen.commands.fit import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
