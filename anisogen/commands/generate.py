"""``anisogen-generate`` / ``pipelines/generate.py``: the generator's command line, which lives in
:mod:`anisogen.generate.cli` (next to the config it builds). See docs/GENERATE.md."""

from anisogen.cli import console_script
from anisogen.generate.cli import build_parser, config_from_args, main

__all__ = ["build_parser", "config_from_args", "entry", "main"]

entry = console_script(main)
