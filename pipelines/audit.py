#!/usr/bin/env python
"""Geometry audit of generated shards against image embeddings: report.json, report.html, gates for CI.

Thin entry point: ``python pipelines/audit.py ARGS`` is ``anisogen-audit ARGS``. The usage, flags and
behaviour are in :mod:`anisogen.commands.audit` (``--help`` prints them).
"""

import sys

from anisogen.cli import run_cli
from anisogen.commands.audit import main, parse_args  # noqa: F401  (parse_args: used by tests and docs)

if __name__ == "__main__":
    sys.exit(run_cli(main))
