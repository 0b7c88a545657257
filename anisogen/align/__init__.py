"""Aligners: text embeddings -> substitute image embeddings, behind one interface.

``ALIGNERS`` maps a name to its class; ``fit_aligner`` fits one on unpaired text and image embeddings;
``load_aligner`` reads a saved artifact. Importing this package registers every built-in method.
"""

from .base import ALIGNERS, Aligner, FitContext, fit_aligner, get_aligner_class, load_aligner, register_aligner
from . import identity, centroid, unicorn, c3, realign, aniso  # noqa: F401  (registration side effects)
from .c3 import C3_ORIGINAL_SIGMA

__all__ = [
    "ALIGNERS", "Aligner", "FitContext", "fit_aligner", "get_aligner_class", "load_aligner",
    "register_aligner", "C3_ORIGINAL_SIGMA",
]
