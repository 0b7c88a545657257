"""Test-wide settings: offline hub, modest threading on the 2-core CI machine."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def unit_rows(rng, n, d, shift=None):
    """(n, d) float64 unit rows; ``shift`` (d,) is added before normalising."""
    x = rng.standard_normal((n, d))
    if shift is not None:
        x = x + shift
    return x / np.linalg.norm(x, axis=1, keepdims=True)
