#!/usr/bin/env python
"""`make demo`: the whole product on the embedded default (the toy world and its CLIP), on this machine.

Thin entry point: ``python pipelines/demo.py ARGS`` is ``anisogen-demo ARGS``. The usage, flags and
behaviour are in :mod:`anisogen.commands.demo` (``--help`` prints them).
"""

import sys

from anisogen.cli import run_cli
from anisogen.commands.demo import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
