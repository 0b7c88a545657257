import numpy as np
import pytest

from anisogen.embeddings import check_embeddings, check_paired, check_same_dim, iter_chunks, l2_normalize
from conftest import unit_rows


def test_valid_input_is_returned_as_float64(rng):
    x = unit_rows(rng, 10, 8).astype(np.float32)
    out = check_embeddings(x, name="image")
    assert out.dtype == np.float64 and out.shape == (10, 8)
    np.testing.assert_array_equal(out, x.astype(np.float64))


def test_wrong_shape_names_the_array():
    with pytest.raises(ValueError, match=r"text: expected a 2-D array of shape \(N, d\), got shape \(5,\)"):
        check_embeddings(np.ones(5), name="text")


def test_nan_and_inf_report_the_row(rng):
    x = unit_rows(rng, 6, 4)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="image: row 3 contains NaN or Inf"):
        check_embeddings(x, name="image")
    x[3, 1] = 0.0
    x[5, 0] = np.inf
    with pytest.raises(ValueError, match="row 15 contains NaN or Inf"):
        check_embeddings(x, name="image", row_offset=10, normalize=True)


def test_non_unit_rows_are_refused_or_normalised(rng):
    x = unit_rows(rng, 6, 4)
    x[2] *= 1.5
    with pytest.raises(ValueError, match=r"text: row 2 has L2 norm 1\.500000, not unit norm .*normalize=True"):
        check_embeddings(x, name="text")
    fixed = check_embeddings(x, name="text", normalize=True)
    np.testing.assert_allclose(np.linalg.norm(fixed, axis=1), 1.0, atol=1e-12)


def test_tolerance_accepts_fp16_storage(rng):
    x = unit_rows(rng, 100, 512).astype(np.float16)
    check_embeddings(x, name="fp16")  # must not raise


def test_dimension_and_row_count_checks(rng):
    x = unit_rows(rng, 3, 4)
    with pytest.raises(ValueError, match="dimension mismatch, expected d=5, got d=4"):
        check_embeddings(x, dim=5)
    with pytest.raises(ValueError, match="needs at least 21 rows, got 3"):
        check_embeddings(x, min_rows=21)
    with pytest.raises(ValueError, match="dimension mismatch between inputs: image d=4, text d=3"):
        check_same_dim(image=x, text=x[:, :3])
    with pytest.raises(ValueError, match="same number of rows: image N=3, text N=2"):
        check_paired(image=x, text=x[:2])


def test_zero_row_cannot_be_normalised():
    with pytest.raises(ValueError, match="row 1 has zero norm"):
        l2_normalize(np.array([[1.0, 0.0], [0.0, 0.0]]))


def test_iter_chunks_accepts_arrays_iterables_and_callables(rng):
    x = unit_rows(rng, 10, 3)
    assert [c.shape[0] for c in iter_chunks(x, 4)] == [4, 4, 2]
    chunks = [x[:7], x[7:]]
    np.testing.assert_array_equal(np.concatenate(list(iter_chunks(chunks))), x)
    np.testing.assert_array_equal(np.concatenate(list(iter_chunks(lambda: iter(chunks)))), x)
