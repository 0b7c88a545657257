"""AnisoAlign (spec §2): frame, blockwise polar coordinates, Stage I phase prior, Stage II-a global
initialisation, Stage II-b bounded refinement, and the registered aligners (full method + ablations).

Importing this package registers ``anisoalign``, ``anisoalign-init``, ``anisoalign-refine``,
``anisoalign-prior``, ``anisoalign-phase`` and ``anisoalign-paper`` in :data:`anisogen.align.ALIGNERS`.
"""

from .aligner import (
    AnisoAlign, AnisoAlignInit, AnisoAlignPaper, AnisoAlignPhase, AnisoAlignPrior, AnisoAlignRefine, DEFAULT_PARAMS,
    PRESETS,
)

ANISO_VARIANTS = ("anisoalign-init", "anisoalign-refine", "anisoalign-prior", "anisoalign-phase", "anisoalign-paper",
                  "anisoalign")

__all__ = [
    "AnisoAlign", "AnisoAlignInit", "AnisoAlignRefine", "AnisoAlignPrior", "AnisoAlignPhase", "AnisoAlignPaper",
    "DEFAULT_PARAMS", "PRESETS",
    "ANISO_VARIANTS",
]
