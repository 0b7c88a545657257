#!/usr/bin/env python
"""Embed a text file with a CLIP text tower into one .npy (raw text embeddings, no aligner).

Thin entry point: ``python pipelines/embed_texts.py ARGS`` is ``anisogen-embed-texts ARGS``. The usage, flags and
behaviour are in :mod:`anisogen.commands.embed_texts` (``--help`` prints them).
"""

import sys

from anisogen.cli import run_cli
from anisogen.commands.embed_texts import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
