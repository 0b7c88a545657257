"""The command lines, as importable modules: ``anisogen.commands.<name>`` holds the argument parsing and
``main(argv=None) -> int`` of ``pipelines/<name>.py`` and of the console script ``anisogen-<name>``
(``[project.scripts]`` in pyproject.toml; ``_`` in a module name is ``-`` in the script name).

==============================  ===================================================================
``anisogen-generate``           text corpus -> shards of substitute image embeddings (docs/GENERATE.md)
``anisogen-audit``              audit shards against real image embeddings (docs/AUDIT.md)
``anisogen-fit``                fit one aligner on text / image embeddings and save it
``anisogen-compare-aligners``   fit every aligner on one dataset, print the gap and method tables
``anisogen-embed-images``       embed images (or validate ``.npy`` embeddings) with a CLIP image tower
``anisogen-embed-texts``        embed a text corpus with a CLIP text tower
``anisogen-train``              train the LLaVA-style LM on (substitute) embeddings (docs/TRAINING.md)
``anisogen-evaluate``           zero-shot evaluation of a trained export on real paired embeddings
``anisogen-merge``              APP: merge a fine-tuned projector into its anchor
``anisogen-analyze``            spectrum / LMAR / Gap-Init analyses of exports (docs/METHODS.md)
``anisogen-experiment``         the text-only training study on the toy world (docs/EXPERIMENTS.md)
``anisogen-gap-study``          the toy-world gap study (docs/GAP_STUDY.md)
``anisogen-train-toyclip``      train the bundled toy CLIP (docs/TOYCLIP.md)
``anisogen-make-toy-corpora``   write the toy-world corpora
``anisogen-demo``               ``make demo``: the whole product on the toy world
==============================  ===================================================================

Each module ends with ``entry = console_script(main)`` (:func:`anisogen.cli.console_script`): the script
target, which exits like ``sys.exit(run_cli(main))`` (one ``error:`` line and exit 2 for a user error).
A module imports nothing heavy (torch, open_clip, FAISS) before its arguments are parsed, so ``--help``
answers at once; names the parsers show come from light modules (:mod:`anisogen.commands.defaults`,
:mod:`anisogen.train.config`, :mod:`anisogen.audit.defaults`). See docs/CLI.md.
"""
