#!/usr/bin/env python
"""Write the toy-world corpora into a folder (caption corpus, images, held-out pairs).

Thin entry point: ``python pipelines/make_toy_corpora.py ARGS`` is ``anisogen-make-toy-corpora ARGS``.
The usage, flags and behaviour are in :mod:`anisogen.commands.make_toy_corpora` (``--help`` prints them).
"""

import sys

from anisogen.cli import run_cli
from anisogen.commands.make_toy_corpora import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
