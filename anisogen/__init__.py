"""anisogen: plain text -> substitute image embeddings -> WebDataset shards -> LLaVA-style training.

Importing the package registers the bundled open_clip model configs (e.g. ``toy``) so that
``open_clip.create_model("toy")`` works.
"""

__version__ = "0.1.0"


def _register_model_configs() -> None:
    """Add ``anisogen/model_configs`` to open_clip's config search path (idempotent, cheap)."""
    from pathlib import Path

    config_dir = Path(__file__).parent / "model_configs"
    if not config_dir.is_dir():
        return
    try:
        import open_clip
    except ImportError:  # open_clip is a hard dependency, but keep `import anisogen` light and robust
        return
    open_clip.add_model_config(config_dir)


_register_model_configs()
