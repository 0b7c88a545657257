"""anisogen: plain text -> substitute image embeddings -> WebDataset shards -> LLaVA-style training.

Importing the package registers the bundled open_clip model configs (e.g. ``toy``) so that
``open_clip.create_model("toy")`` works. The registration happens when open_clip is imported (at once if
it already is), so ``import anisogen`` stays cheap: command-line ``--help`` does not pay for torch.
"""

import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"


def _register_model_configs(open_clip) -> None:
    """Add ``anisogen/model_configs`` to open_clip's config search path (idempotent, cheap)."""
    from pathlib import Path

    config_dir = Path(__file__).parent / "model_configs"
    if config_dir.is_dir():
        open_clip.add_model_config(config_dir)


class _AfterOpenClipImport(importlib.abc.MetaPathFinder):
    """Registers the model configs right after ``open_clip`` is first imported (then removes itself)."""

    def find_spec(self, name, path=None, target=None):
        if name != "open_clip":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register_model_configs(module)

        spec.loader.exec_module = exec_and_register
        return spec


if "open_clip" in sys.modules:
    _register_model_configs(sys.modules["open_clip"])
else:
    sys.meta_path.insert(0, _AfterOpenClipImport())
