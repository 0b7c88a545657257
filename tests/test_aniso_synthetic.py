"""AnisoAlign against the baselines on planted-gap synthetic data (spec §3.2 method diagnostics).

The data: :func:`anisogen.synthetic.make_paired_embeddings` with a centroid gap and shared content, whose
image side gets an anisotropic *gain* on the top-K content directions
(:func:`anisogen.synthetic.plant_gain`): the paired residual is then dominated by K directions and
is predictable from the text, so an unpaired aligner can reduce it. (The generator's own ``residual_rank``
residual is image-only noise, independent of the text: no text -> image map can remove it.)

Fit on one part (unpaired: texts and images of different items), evaluate on held-out pairs.
"""

import numpy as np
import pytest
import torch

from anisogen.align import fit_aligner
from anisogen.synthetic import plant_gain
from anisogen.geometry import method_report
from anisogen.synthetic import make_paired_embeddings

FAST = dict(rank=4, score_hidden=64, refiner_hidden=32, stage1_steps=600, stage1_lr=3e-3, stage2_steps=150,
            stage2_lr=3e-3, batch_size=256, eval_every=200)


@pytest.fixture(scope="module")
def table():
    pairs = plant_gain(make_paired_embeddings(8000, 64, gap=0.4, residual_rank=0, seed=0), gain=1.5, k=2)
    fit_text, fit_image, held = pairs.split(4000, seed=0, keep_antithetic=True)
    configs = {"identity": {}, "realign": {}, "c3": {"calibrate_phi": 0.9}, "anisoalign": FAST,
               "anisoalign-paper": FAST}
    rows, outputs = {}, {}
    for name, params in configs.items():
        aligner = fit_aligner(name, text=fit_text, image=fit_image, seed=0, **params)
        z = aligner.transform(held.text)
        outputs[name] = z
        rows[name] = method_report(image=held.image, text=held.text, substitute=z, k=20, seed=0)
    return rows, outputs, held


def test_anisoalign_meets_the_semantic_targets_against_realign(table):
    """Issue 12's planted-data targets: Phi >= ReAlign - 0.005, Omega_k >= ReAlign - 0.01, delta_mu <= 0.02 and
    M_k^X >= ReAlign, with every choice made by the unpaired selection."""
    rows, _, _ = table
    ident, realign, aniso = rows["identity"], rows["realign"], rows["anisoalign"]
    assert ident["delta_mu"] > 0.39  # the planted gap
    assert aniso["delta_mu"] <= 0.02
    assert aniso["Phi"] >= realign["Phi"] - 0.005
    assert aniso["Omega_k"] >= realign["Omega_k"] - 0.01
    assert aniso["M_k_X"] >= realign["M_k_X"]


def test_paper_variant_trades_semantics_for_mixing_and_beats_c3(table):
    """The paper-exact settings mix into the images far better than ReAlign and C3 and suppress the dominant
    residual further, at a cost in Omega_k: the trade the automatic selection bounds."""
    rows, _, _ = table
    ident, realign, c3, paper = (rows[n] for n in ("identity", "realign", "c3", "anisoalign-paper"))
    for baseline in (realign, c3):  # each baseline beats identity
        assert baseline["delta_mu"] <= 0.02
        assert baseline["A_r_T"] < 0.2 * ident["A_r_T"]
    assert paper["delta_mu"] <= 0.02
    assert paper["A_r_T"] < realign["A_r_T"] - 0.5 and paper["A_r_T"] < c3["A_r_T"] - 0.5
    assert paper["M_k_X"] > realign["M_k_X"] + 0.05 and paper["M_k_X"] > c3["M_k_X"] + 0.05
    assert paper["M_k_Z"] > realign["M_k_Z"] and paper["M_k_Z"] > c3["M_k_Z"]
    assert paper["Phi"] > c3["Phi"] and paper["Psi"] > 0.95
    assert paper["Omega_k"] < realign["Omega_k"] - 0.05


def test_realign_phi_is_the_upper_bound_for_any_mean_matching_aligner(table):
    """Why "Phi >= ReAlign's" cannot be asked of AnisoAlign with delta_mu ~ 0 (reported to the lead).

    For any substitutes z with mean mu_z and any lambda: mean(y . z) = mean((y - lambda) . z) + lambda . mu_z
    <= mean ||y - lambda|| + lambda . mu_z. Minimising over lambda (a convex problem) gives a bound that
    Norm(y - lambda*) attains; ReAlign's outputs reach it, so any aligner that closes the gap as well has
    Phi <= Phi(ReAlign) up to lambda* . (mu_z - mu_x), i.e. the delta_mu slack.
    """
    rows, outputs, held = table
    y = torch.tensor(held.text)
    mu_x = torch.tensor(held.image.mean(0))

    def bound(mu, lam):
        return (y - lam).norm(dim=1).mean() + lam @ mu

    lam = (y.mean(0) - mu_x).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([lam], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = bound(mu_x, lam)
        value.backward()
        return value

    opt.step(closure)
    lam = lam.detach()
    best = float(bound(mu_x, lam))
    assert rows["realign"]["Phi"] == pytest.approx(best, abs=2e-4)  # ReAlign sits on the bound
    for name in ("anisoalign", "anisoalign-paper", "c3"):
        z = outputs[name].astype(np.float64)
        mu_z = torch.tensor(z.mean(0))
        assert rows[name]["Phi"] <= float(bound(mu_z, lam)) + 1e-6  # the bound holds for every aligner
        slack = float(lam @ (mu_z - mu_x))
        assert abs(slack) <= float(lam.norm()) * rows[name]["delta_mu"] + 1e-9


def test_plant_gain_keeps_norms_means_and_plants_a_rank_k_residual():
    base = make_paired_embeddings(4000, 32, gap=0.4, residual_rank=0, seed=1)
    pairs = plant_gain(base, gain=1.5, k=2)
    np.testing.assert_allclose(np.linalg.norm(pairs.image, axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(pairs.text, base.text)
    np.testing.assert_allclose(pairs.image.mean(0), base.image.mean(0), atol=1e-12)
    gb = pairs.truth["gain_basis"]
    ratio = np.std(pairs.image @ gb, axis=0) / np.std(base.image @ gb, axis=0)
    assert np.all(ratio > 1.1)  # gain 1.5, partly undone by the renormalisation
    rest = pairs.truth["content_basis"][:, 2:]
    assert np.all(np.std(pairs.image @ rest, axis=0) < np.std(base.image @ rest, axis=0))  # renormalised
