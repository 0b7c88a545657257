#!/usr/bin/env python
"""Generate substitute-image-embedding shards from a text corpus.

    [accelerate launch ...] pipelines/generate.py --corpus PATH_OR_GLOB --text-field text --model NAME \
        [--pretrained TAG_OR_PATH] --out DIR --samples-per-shard N \
        (--aligner NAME --images PATH | --aligner-dir DIR) [flags]

Every flag is documented in ``--help``; the full contract, shard format, resume semantics and cluster
recipes are in docs/GENERATE.md. Library entry point: :func:`anisogen.generate.generate`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anisogen.generate.cli import main  # noqa: E402

if __name__ == "__main__":
    from anisogen.cli import run_cli

    sys.exit(run_cli(main))
