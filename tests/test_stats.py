import numpy as np
import pytest

from anisogen.stats import MeanAccumulator, Moments
from conftest import unit_rows


def _reference(x):
    mu = x.mean(axis=0)
    cov = (x - mu).T @ (x - mu) / x.shape[0]
    return mu, cov


def test_one_shot_matches_numpy(rng):
    x = unit_rows(rng, 500, 16, shift=np.ones(16))
    m = Moments(16).update(x)
    mu, cov = _reference(x)
    np.testing.assert_allclose(m.mean, mu, rtol=0, atol=1e-15)
    np.testing.assert_allclose(m.covariance, cov, rtol=0, atol=1e-14)
    assert m.trace == pytest.approx(np.trace(cov), abs=1e-14)
    assert m.count == 500


def test_chunked_and_merged_equal_one_shot(rng):
    x = unit_rows(rng, 1000, 12)
    whole = Moments(12).update(x)
    chunked = Moments(12)
    for s in range(0, 1000, 97):
        chunked.update(x[s : s + 97])
    parts = [Moments(12).update(x[:300]), Moments(12).update(x[300:650]), Moments(12).update(x[650:])]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    for other in (chunked, merged):
        assert other.count == whole.count
        np.testing.assert_allclose(other.mean, whole.mean, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(other.covariance, whole.covariance, rtol=1e-12, atol=1e-15)


def test_vector_round_trip_and_reduce_like_all_reduce(rng):
    x = unit_rows(rng, 400, 6)
    ranks = [Moments(6).update(x[:150]), Moments(6).update(x[150:])]
    total = sum(r.to_vector() for r in ranks)  # what an all-reduce(SUM) computes
    reduced = ranks[0].reduce(lambda v: total)
    whole = Moments(6).update(x)
    assert reduced.count == 400
    np.testing.assert_allclose(reduced.covariance, whole.covariance, rtol=1e-12, atol=1e-15)
    back = Moments.from_vector(whole.to_vector(), 6)
    np.testing.assert_array_equal(back.outer, whole.outer)
    with pytest.raises(ValueError, match="length 43"):
        Moments.from_vector(np.zeros(5), 6)


def test_from_source_validates_with_absolute_rows(rng):
    x = unit_rows(rng, 50, 4)
    x[37] = np.nan
    with pytest.raises(ValueError, match="text: row 37 contains NaN or Inf"):
        Moments.from_source(x, name="text", chunk_size=10)


def test_mismatched_chunk_and_empty_moments():
    with pytest.raises(ValueError, match=r"cannot take a chunk of shape \(2, 3\)"):
        Moments(4).update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="seen no rows"):
        Moments(4).mean


def test_mean_accumulator_matches(rng):
    x = unit_rows(rng, 90, 5)
    acc = MeanAccumulator(5).update(x[:40]).update(x[40:])
    np.testing.assert_allclose(acc.mean, x.mean(axis=0), atol=1e-15)
