#!/usr/bin/env python
"""Generate substitute-image-embedding shards from a text corpus.

Thin entry point: ``python pipelines/generate.py ARGS`` is ``anisogen-generate ARGS``. The usage, flags and
behaviour are in :mod:`anisogen.commands.generate` (``--help`` prints them).
"""

import sys

from anisogen.cli import run_cli
from anisogen.commands.generate import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
