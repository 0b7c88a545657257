"""Aligners: text embeddings -> substitute image embeddings, behind one interface.

``ALIGNERS`` maps a name to its class; ``fit_aligner`` fits one on unpaired text and image embeddings;
``load_aligner`` reads a saved artifact. Importing this package registers every built-in method.
"""

from .base import ALIGNERS, Aligner, FitContext, fit_aligner, get_aligner_class, load_aligner, register_aligner
from . import identity, centroid, unicorn, c3, realign  # noqa: F401  (registration side effects)
from .c3 import C3_ORIGINAL_SIGMA

import importlib.util as _ilu

if _ilu.find_spec(f"{__name__}.aniso") is not None:  # AnisoAlign (issue 3) registers itself when present
    from . import aniso  # noqa: F401

__all__ = [
    "ALIGNERS", "Aligner", "FitContext", "fit_aligner", "get_aligner_class", "load_aligner",
    "register_aligner", "C3_ORIGINAL_SIGMA",
]
