"""Statistics of the diagnostics against direct, all-in-memory NumPy computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _diag_helpers import direct_pca, direct_sep, numpy_rank

from timm_widelast.diagnostics import DatasetPCA, channel_spectrum, sample_svd_ranks, sep_bandwidths
from timm_widelast.errors import UserError

THRESHOLDS = (0.8, 0.9, 0.95, 0.99)


def known_rank(rng, n, d, r):
    u = np.linalg.qr(rng.standard_normal((n, r)))[0]
    v = np.linalg.qr(rng.standard_normal((d, r)))[0]
    s = np.sort(rng.uniform(0.1, 10.0, r))[::-1]
    return (u * s) @ v.T


@pytest.mark.parametrize("n,d", [(16, 48), (40, 24)])  # Gram on the token side and on the channel side
def test_svd_ranks_match_numpy_svd(n, d):
    rng = np.random.default_rng(0)
    true_ranks = [1, 3, 7, 12, min(n, d)]
    mats = np.stack([known_rank(rng, n, d, r) for r in true_ranks])
    got = sample_svd_ranks(torch.from_numpy(mats), THRESHOLDS)
    want = np.array([[numpy_rank(m, t) for t in THRESHOLDS] for m in mats])
    np.testing.assert_array_equal(got, want)
    assert (got <= np.array(true_ranks)[:, None]).all()
    assert (got[0] == 1).all()  # a rank-1 image needs one direction at any threshold


def test_svd_thresholds_outside_unit_interval():
    for bad in ([0.5, 1.0], [0.0], [95], []):
        with pytest.raises(UserError, match="fix:"):
            sample_svd_ranks(torch.randn(2, 4, 8), bad)


@pytest.mark.parametrize("centre", [False, True])
def test_pca_matches_direct_computation_for_any_batch_split(centre):
    rng = np.random.default_rng(1)
    d = 24
    scales = np.geomspace(5.0, 0.05, d)  # distinct eigenvalues so the basis is well defined
    images = rng.standard_normal((13, 10, d)) * scales + rng.standard_normal(d)
    want_curves, want_dims = direct_pca(images, centre, THRESHOLDS)
    for split in (1, 4, 13):
        pca = DatasetPCA(d, centre=centre, thresholds=THRESHOLDS)
        chunks = [torch.from_numpy(images[i: i + split]) for i in range(0, len(images), split)]
        for c in chunks:
            pca.update(c)
        pca.finalize()
        curves = torch.cat([pca.energy_curves(c) for c in chunks])
        np.testing.assert_allclose(curves.numpy(), want_curves, atol=1e-10)
        np.testing.assert_array_equal(pca.required_dims(curves).numpy(), want_dims)
        assert np.all(np.diff(pca.eigenvalues.numpy()) <= 0)


def test_sep_gaussian_tokens_give_diagonal():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(64, 196, 192, generator=gen)
    res = sep_bandwidths(tokens, batch_size=16)
    np.testing.assert_allclose(res["b"], [0.5, 0.6, 0.7, 0.8, 0.9], atol=0.01)
    np.testing.assert_allclose(res["mean_curve"], direct_sep(tokens.numpy()), atol=1e-9)
    # d_a is the first 1-based bin of the mean curve reaching a%
    curve = np.array(res["mean_curve"])
    for a, d in zip(res["levels"], res["d"]):
        assert curve[d - 1] >= a and (d == 1 or curve[d - 2] < a)


@pytest.mark.parametrize("dim,f", [(48, 5), (49, 7)])
def test_sep_single_cosine_puts_energy_in_bins_f_and_d_minus_f(dim, f):
    c = np.arange(dim)
    token = torch.from_numpy(np.cos(2 * np.pi * f * c / dim))[None, None]
    energy = channel_spectrum(token)[0, 0].numpy()
    assert set(np.flatnonzero(energy > 1e-9 * energy.max())) == {f, dim - f}
    res = sep_bandwidths(token)
    curve = np.array(res["mean_curve"])
    np.testing.assert_allclose(curve[:f], 0, atol=1e-9)
    np.testing.assert_allclose(curve[f: dim - f], 50, atol=1e-9)
    np.testing.assert_allclose(curve[dim - f:], 100, atol=1e-9)
    assert res["d"][0] == f + 1 and res["d"][1] == dim - f + 1  # 50% at bin f (1-based f+1), 60% at D-f
    folded = channel_spectrum(token, "folded")[0, 0].numpy()
    assert len(folded) == dim // 2 + 1 and set(np.flatnonzero(folded > 1e-9 * folded.max())) == {f}
    assert np.isclose(folded.sum(), energy.sum())


def test_sep_batch_size_invariance_and_permutations():
    tokens = torch.randn(9, 12, 40, dtype=torch.float64) * torch.linspace(3, 0.1, 40)
    results = [sep_bandwidths(tokens, permutations=2, batch_size=bs) for bs in (1, 4, 9)]
    for r in results[1:]:
        np.testing.assert_allclose(r["mean_curve"], results[0]["mean_curve"], atol=1e-10)
        assert r["d"] == results[0]["d"]
        assert r["permutations"]["b"] == results[0]["permutations"]["b"]
    perm = results[0]["permutations"]
    assert perm["count"] == 2 and all(lo <= hi for lo, hi in zip(perm["b_min"], perm["b_max"]))


def test_sep_rejects_bad_levels_and_mode():
    with pytest.raises(UserError, match="fix:"):
        sep_bandwidths(torch.randn(1, 4, 8), levels=[50, 100])
    with pytest.raises(UserError, match="fix:"):
        sep_bandwidths(torch.randn(1, 4, 8), mode="half")
