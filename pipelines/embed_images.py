#!/usr/bin/env python
"""Embed unpaired images with a CLIP image tower (the image side aligners are fitted on).

Thin entry point: ``python pipelines/embed_images.py ARGS`` is ``anisogen-embed-images ARGS``. The usage, flags and
behaviour are in :mod:`anisogen.commands.embed_images` (``--help`` prints them).
"""

import sys

from anisogen.cli import run_cli
from anisogen.commands.embed_images import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
