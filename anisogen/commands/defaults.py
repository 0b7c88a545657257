"""Names the command-line parsers show in ``--help``, free of torch and FAISS so that ``--help`` is instant.

The registries themselves live in torch-importing packages; ``tests/test_console_scripts.py`` checks that
these copies equal them. A command validates its parsed value against the live registry after parsing.
"""

#: The built-in aligners in registration order (``list(anisogen.align.ALIGNERS)``).
ALIGNER_NAMES = ("identity", "centroid", "unicorn", "c3", "realign", "anisoalign", "anisoalign-paper",
                 "anisoalign-init", "anisoalign-refine", "anisoalign-prior", "anisoalign-phase")
