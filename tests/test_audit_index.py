"""Neighbour search of the audit: FAISS flat/IVF and the torch path against brute-force torch kNN."""

import numpy as np
import pytest
import torch

from anisogen.audit.index import (
    FLAT_MAX_PAIRS, TorchFlatIP, build_flat, choose_kind, default_nlist, knn_graph, recall_at_k, resolve_device,
)
from anisogen.geometry import drop_self, knn_search
from anisogen.synthetic import make_paired_embeddings
from conftest import unit_rows


def brute_force(base, queries=None, k=5):
    """Independent torch kNN: full cosine matrix in float64, self masked to -inf, top-k; also the scores."""
    b = torch.as_tensor(base, dtype=torch.float64)
    q = b if queries is None else torch.as_tensor(queries, dtype=torch.float64)
    sims = q @ b.T
    if queries is None:
        sims.fill_diagonal_(-float("inf"))
    top = torch.topk(sims, k, dim=1)
    return top.indices.numpy(), sims.numpy()


def assert_same_up_to_ties(got, ref, sims, tol=1e-5):
    """Row sets equal, except where a differing neighbour ties (within tol) with the k-th reference score."""
    for i, (g, r) in enumerate(zip(got, ref)):
        if set(g) == set(r):
            continue
        kth = sims[i, r].min()
        for j in set(g) ^ set(r):
            assert abs(sims[i, j] - kth) < tol, f"row {i}: neighbour {j} is not a tie"


@pytest.fixture(scope="module")
def clustered():
    pairs = make_paired_embeddings(12000, 32, gap=0.4, residual_rank=3, seed=11)
    return np.vstack([pairs.image, pairs.text]).astype(np.float32)


def test_flat_cpu_backends_equal_brute_force(rng):
    x = unit_rows(rng, 700, 16)
    ref, sims = brute_force(x, k=7)
    for backend in ("faiss", "torch"):
        index, name = build_flat(x.astype(np.float32), "cpu", backend)
        assert name == f"{backend}-cpu"
        assert_same_up_to_ties(drop_self(index.search(x.astype(np.float32), 8)[1], np.arange(700), 7), ref, sims)
    got = knn_graph(x, k=7, kind="flat", device="cpu")
    assert got.info["kind"] == "flat" and got.info["backend"] == "torch-cpu" and got.info["recall"] == 1.0
    assert_same_up_to_ties(got.neighbours, ref, sims)
    assert not (got.neighbours == np.arange(700)[:, None]).any()  # self excluded


def test_flat_with_ties_and_duplicates(rng):
    x = unit_rows(rng, 60, 8)
    x = np.vstack([x, x[:10]])  # exact duplicates tie perfectly
    got = knn_graph(x, k=4, kind="flat", device="cpu").neighbours
    ref, sims = brute_force(x, k=4)
    assert_same_up_to_ties(got, ref, sims)
    assert not (got == np.arange(70)[:, None]).any()
    assert set(got[:10, 0]) == set(range(60, 70)) or np.allclose(sims[np.arange(10), got[:10, 0]], 1.0, atol=1e-6)


def test_queries_against_base(rng):
    base, queries = unit_rows(rng, 500, 12), unit_rows(rng, 90, 12)
    got = knn_graph(base, queries, k=5, kind="flat", device="cpu").neighbours
    ref, sims = brute_force(base, queries, k=5)
    assert_same_up_to_ties(got, ref, sims)


def test_torch_path_equals_brute_force_on_cpu(rng):
    x = unit_rows(rng, 400, 10)
    index = TorchFlatIP(x, device="cpu", block_elements=400 * 37)  # several query blocks
    got = knn_search(x, k=6, index=index)
    ref, sims = brute_force(x, k=6)
    assert_same_up_to_ties(got, ref, sims)
    scores, ids = index.search(x[:5].astype(np.float32), 3)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", x[:5], x[ids]), atol=1e-5)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)  # each row finds itself first when not excluded


def test_ivf_recall_reported_and_above_target_at_defaults(clustered):
    res = knn_graph(clustered, k=20, kind="ivf", device="cpu", seed=0)
    info = res.info
    assert info["kind"] == "ivf" and info["nlist"] == default_nlist(len(clustered))
    assert info["recall"] >= 0.95 and info["recall_sample"] == 1000
    assert info["nprobe_trials"][-1]["nprobe"] == info["nprobe"]
    exact = knn_search(clustered, k=20)
    assert recall_at_k(res.neighbours, exact) >= 0.95  # holds on all rows, not just the sample
    assert abs(recall_at_k(res.neighbours, exact) - info["recall"]) < 0.02  # the sample estimate is honest
    assert (res.neighbours >= 0).all() and not (res.neighbours == np.arange(len(clustered))[:, None]).any()


def test_ivf_fixed_nprobe_is_not_calibrated_and_full_probe_is_exact(clustered):
    sub = clustered[:3000]
    low = knn_graph(sub, k=10, kind="ivf", nlist=50, nprobe=1, device="cpu")
    assert low.info["nprobe"] == 1 and len(low.info["nprobe_trials"]) == 1 and low.info["recall"] < 0.95
    full = knn_graph(sub, k=10, kind="ivf", nlist=50, nprobe=50, device="cpu")
    assert full.info["recall"] == 1.0
    assert recall_at_k(full.neighbours, knn_search(sub, k=10)) == pytest.approx(1.0, abs=1e-3)


def test_ivf_rows_with_too_few_hits_fall_back_to_exact(rng):
    x = unit_rows(rng, 400, 8)
    # 40 lists of ~10 rows and one probe: most queries see fewer than k + 1 = 16 candidates (FAISS pads with -1)
    res = knn_graph(x, k=15, kind="ivf", nlist=40, nprobe=1, device="cpu")
    exact = knn_search(x, k=15)
    assert res.info["exact_fallback_rows"] > 200
    assert (res.neighbours >= 0).all()
    redone = [i for i in range(400) if set(res.neighbours[i]) == set(exact[i])]
    assert len(redone) >= res.info["exact_fallback_rows"]


def test_auto_kind_and_device_resolution():
    assert choose_kind(50_000, "auto", "cpu") == "flat" and FLAT_MAX_PAIRS == 50_000**2
    assert choose_kind(50_001, "auto", "cpu") == "ivf"
    assert choose_kind(200_000, "auto", "cpu", n_queries=12_500) == "flat"  # few sampled queries: exact is cheap
    assert choose_kind(200_000, "auto", "cpu", n_queries=40_000) == "ivf"
    assert choose_kind(10**7, "auto", "cuda") == "flat"
    assert choose_kind(10, "ivf", "cpu") == "ivf"
    with pytest.raises(ValueError, match="index kind"):
        choose_kind(10, "hnsw")
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_drop_self_removes_own_index_anywhere():
    idx = np.array([[5, 0, 7], [1, 2, 3], [9, 8, 2]])
    np.testing.assert_array_equal(drop_self(idx, np.array([0, 1, 2]), 2), [[5, 7], [2, 3], [9, 8]])


def test_query_rows_restrict_a_self_query(rng, clustered):
    x = unit_rows(rng, 600, 12)
    rows = np.sort(rng.choice(600, 90, replace=False))
    got = knn_graph(x, k=6, kind="flat", device="cpu", query_rows=rows)
    ref, sims = brute_force(x, k=6)
    assert got.neighbours.shape == (90, 6) and got.info["n_queries"] == 90
    assert_same_up_to_ties(got.neighbours, ref[rows], sims[rows])
    big_rows = np.sort(np.random.default_rng(0).choice(len(clustered), 3000, replace=False))
    ivf = knn_graph(clustered, k=10, kind="ivf", device="cpu", query_rows=big_rows)
    exact = knn_search(clustered, k=10, query_rows=big_rows)
    assert ivf.info["recall"] >= 0.95 and recall_at_k(ivf.neighbours, exact) >= 0.95
    assert not (ivf.neighbours == big_rows[:, None]).any()
    with pytest.raises(ValueError, match="cannot be combined"):
        knn_graph(x, x[:5], k=3, query_rows=rows)
