#!/usr/bin/env python
"""Train an LM on (substitute) CLIP embeddings: stage 1 from shards, stage 2 from JSONL conversations.

Thin entry point: ``python pipelines/train.py ARGS`` is ``anisogen-train ARGS``. The usage, flags and
behaviour are in :mod:`anisogen.commands.train` (``--help`` prints them).
"""

import sys

from anisogen.cli import run_cli
from anisogen.commands.train import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
