"""Fit several aligners on the same unpaired data and score them on the same held-out pairs."""

from __future__ import annotations

import time
from typing import Iterable

import numpy as np

from ..geometry import method_report
from .base import ALIGNERS, fit_aligner

#: Columns of the paper's §5 method table, in its order.
METHOD_COLUMNS = ["Phi", "Psi", "Omega_k", "delta_mu", "M_k_Z", "M_k_X", "A_r_T"]


def compare_aligners(
    *,
    fit_text,
    fit_image,
    heldout_image: np.ndarray,
    heldout_text: np.ndarray,
    names: Iterable[str] | None = None,
    params: dict[str, dict] | None = None,
    seed: int = 0,
    k: int = 20,
    model_fingerprint: str | None = None,
    progress: bool = False,
) -> list[dict]:
    """Fit each aligner in ``names`` (default: all registered) and return one row per aligner.

    Every aligner is fitted on the unpaired ``fit_text`` / ``fit_image`` sources and applied to the
    paired held-out texts; the row holds ``name``, the :func:`method_report` scalars, ``fit_seconds``
    and ``transform_seconds``. The image side of the metrics is ``aligner.transform_image(heldout_image)``,
    i.e. raw images except for baselines that move images (Unicorn).
    """
    rows = []
    for name in names or list(ALIGNERS):
        start = time.perf_counter()
        aligner = fit_aligner(name, text=fit_text, image=fit_image, seed=seed, model_fingerprint=model_fingerprint,
                              progress=progress, **(params or {}).get(name, {}))
        fitted = time.perf_counter()
        substitute = aligner.transform(heldout_text)
        transformed = time.perf_counter()
        report = method_report(image=aligner.transform_image(heldout_image), text=heldout_text,
                               substitute=substitute, k=k, seed=seed)
        rows.append({
            "name": name,
            **{key: value for key, value in report.items() if np.isscalar(value)},
            "fit_seconds": fitted - start,
            "transform_seconds": transformed - fitted,
        })
    return rows
