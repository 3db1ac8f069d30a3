"""lorank.linalg: exactness, optimality and monotonicity of the factorization algorithms."""

from __future__ import annotations

import math

import pytest
import torch

from lorank import linalg


def _rank_r(m, n, r, gen, dtype=torch.float64):
    return (torch.randn(m, r, generator=gen, dtype=dtype)
            @ torch.randn(r, n, generator=gen, dtype=dtype))


def _rel(x, y):
    return float((x - y).norm() / x.norm())


def _correlated_inputs(n_samples, n, gen):
    """Inputs with strongly unequal, correlated channels (as activations of real layers)."""
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64)
    scales = torch.logspace(0, 2, n, dtype=torch.float64)
    return (torch.randn(n_samples, n, generator=gen, dtype=torch.float64) @ mix) * scales


@pytest.mark.parametrize("method", ["svd", "randomized", "fisher", "asvd", "whitened",
                                    "scaled", "sparse"])
def test_exact_rank_r_matrix_is_reconstructed(method, gen):
    m, n, r = 30, 20, 4
    x = _rank_r(m, n, r, gen)
    if method == "svd":
        a, b = linalg.truncated_svd(x, r)
    elif method == "randomized":
        a, b = linalg.randomized_svd(x, r, generator=gen)
    elif method == "fisher":
        a, b = linalg.fisher_weighted_svd(x, r, torch.rand(m, n, generator=gen,
                                                           dtype=torch.float64))
    elif method == "asvd":
        a, b = linalg.activation_aware_svd(x, r, torch.rand(n, generator=gen,
                                                            dtype=torch.float64))
    elif method == "whitened":
        xin = _correlated_inputs(100, n, gen)
        a, b = linalg.whitened_svd(x, r, xin.mT @ xin)
    elif method == "scaled":
        a, b = linalg.scaled_svd(x, r, row_scale=torch.rand(m, generator=gen) + 0.1,
                                 col_scale=torch.rand(n, generator=gen) + 0.1)
    else:
        a, b, s = linalg.sparse_plus_low_rank(x, r, nnz=15)
        assert int((s != 0).sum()) <= 15
        b = b  # S is ~0 for an exactly low-rank matrix
        assert _rel(x, a @ b + s) < 1e-10
    assert a.shape == (m, r) and b.shape == (r, n)
    assert _rel(x, a @ b) < 1e-10


def test_semi_nmf_exact_on_semi_nonnegative_rank_r(gen):
    m, n, r = 30, 20, 4
    x = torch.randn(m, r, generator=gen, dtype=torch.float64) @ \
        torch.rand(r, n, generator=gen, dtype=torch.float64)
    a, b = linalg.semi_nmf(x, r, n_iter=2000, tol=1e-14)
    assert (b >= 0).all()
    assert _rel(x, a @ b) < 1e-6


def test_semi_nmf_exact_on_any_rank_r_with_one_more_component(gen):
    """A rank-r row space is spanned by r+1 nonnegative vectors (shift by a multiple of 1)."""
    x = _rank_r(30, 20, 3, gen)
    a, b = linalg.semi_nmf(x, 4, n_iter=2000, tol=1e-14)
    assert (b >= 0).all()
    assert _rel(x, a @ b) < 1e-6


@pytest.mark.parametrize("method", ["hals", "mu"])
@pytest.mark.parametrize("init", ["svd", "random"])
def test_semi_nmf_nonnegative_and_monotone(method, init, gen):
    x = torch.randn(25, 18, generator=gen, dtype=torch.float64)
    a, b, hist = linalg.semi_nmf(x, 5, method=method, init=init, n_iter=150, tol=0.0,
                                 generator=gen, return_history=True)
    assert (b >= 0).all()
    assert len(hist) > 10
    for prev, cur in zip(hist, hist[1:], strict=False):
        assert cur <= prev * (1 + 1e-10) + 1e-12
    assert hist[-1] < hist[0]
    assert math.isclose(hist[-1], linalg.semi_nmf_objective(x, a, b), rel_tol=1e-9)
    # never better than the unconstrained optimum
    tail = float((torch.linalg.svdvals(x)[5:] ** 2).sum())
    assert hist[-1] >= tail * (1 - 1e-9)


@pytest.mark.parametrize("loss,solver", [("frobenius", "hals"), ("frobenius", "mu"),
                                         ("kl", "mu")])
def test_nmf_nonnegative_monotone_and_exact_on_nonnegative_rank(loss, solver, gen):
    m, n, r = 24, 18, 3
    # sparse nonnegative factors: the NMF is essentially unique, so the optimum is reachable
    w0 = torch.rand(m, r, generator=gen, dtype=torch.float64)
    w0[torch.rand(m, r, generator=gen) < 0.4] = 0
    h0 = torch.rand(r, n, generator=gen, dtype=torch.float64)
    h0[torch.rand(r, n, generator=gen) < 0.4] = 0
    x = w0 @ h0
    w, h, hist = linalg.nmf(x, r, loss=loss, solver=solver, n_iter=400, tol=0.0,
                            return_history=True)
    assert (w >= 0).all() and (h >= 0).all()
    for prev, cur in zip(hist, hist[1:], strict=False):
        assert cur <= prev * (1 + 1e-10) + 1e-12
    tol = 1e-6 if solver == "hals" else 5e-2
    assert _rel(x, w @ h) < tol


def test_nmf_rejects_negative_input(gen):
    with pytest.raises(ValueError, match="nonnegative"):
        linalg.nmf(torch.randn(5, 5, generator=gen), 2)


def test_svd_error_equals_tail_singular_values(gen):
    x = torch.randn(40, 25, generator=gen, dtype=torch.float64)
    s = torch.linalg.svdvals(x)
    for r in (1, 5, 12, 25):
        a, b = linalg.truncated_svd(x, r)
        err = float((x - a @ b).norm())
        assert math.isclose(err, float(s[r:].norm()), rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(err / float(x.norm()), linalg.tail_energy(s, r), rel_tol=1e-9,
                            abs_tol=1e-9)
        # spectral norm error is the first dropped singular value
        if r < 25:
            assert math.isclose(float(torch.linalg.matrix_norm(x - a @ b, 2)), float(s[r]),
                                rel_tol=1e-8)


def test_randomized_svd_close_to_optimal(gen):
    x = torch.randn(60, 40, generator=gen, dtype=torch.float64)
    x = x * torch.logspace(0, -3, 40, dtype=torch.float64)  # decaying spectrum
    s = torch.linalg.svdvals(x)
    a, b = linalg.randomized_svd(x, 8, generator=gen)
    assert float((x - a @ b).norm()) <= float(s[8:].norm()) * 1.01


def test_whitened_error_equals_tail_of_whitened_spectrum(gen):
    """SVD-LLM: the calibration output error is exactly the dropped singular values of W L."""
    m, n, r = 30, 20, 6
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    xin = _correlated_inputs(200, n, gen)
    gram = xin.mT @ xin
    a, b, s = linalg.whitened_svd(w, r, gram, damp=0.0, return_spectrum=True)
    out_err = float(((w - a @ b) @ xin.mT).norm())
    assert math.isclose(out_err, float(s[r:].norm()), rel_tol=1e-7)
    # and it is the best rank-r output error: plain SVD does worse
    a2, b2 = linalg.truncated_svd(w, r)
    assert out_err < float(((w - a2 @ b2) @ xin.mT).norm())


def test_activation_aware_beats_svd_on_correlated_inputs(gen):
    m, n, r = 40, 30, 6
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    xin = _correlated_inputs(500, n, gen)

    def out_err(a, b):
        return float(((w - a @ b) @ xin.mT).norm() / (w @ xin.mT).norm())

    svd = out_err(*linalg.truncated_svd(w, r))
    asvd = out_err(*linalg.activation_aware_svd(w, r, xin.abs().mean(0)))
    white = out_err(*linalg.whitened_svd(w, r, xin.mT @ xin))
    assert asvd < svd
    assert white <= asvd + 1e-12


def test_fisher_weighted_svd_minimizes_weighted_error(gen):
    m, n, r = 30, 20, 5
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    fisher = torch.rand(m, n, generator=gen, dtype=torch.float64) * \
        torch.logspace(-3, 1, m, dtype=torch.float64).unsqueeze(-1)
    rw = linalg.fisher_row_weights(fisher)

    def werr(a, b):
        return float((rw.unsqueeze(-1) * (w - a @ b)).norm())

    assert werr(*linalg.fisher_weighted_svd(w, r, fisher)) < werr(*linalg.truncated_svd(w, r))
    # per-row importances give the same result as the full Fisher matrix
    a1, b1 = linalg.fisher_weighted_svd(w, r, fisher)
    a2, b2 = linalg.fisher_weighted_svd(w, r, fisher.sum(-1))
    assert torch.allclose(a1 @ b1, a2 @ b2, atol=1e-10)


def test_sparse_plus_low_rank_monotone_and_better_than_svd(gen):
    x = torch.randn(30, 20, generator=gen, dtype=torch.float64)
    a, b, s, hist = linalg.sparse_plus_low_rank(x, 4, 40, n_iter=30, tol=0.0,
                                                return_history=True)
    for prev, cur in zip(hist, hist[1:], strict=False):
        assert cur <= prev + 1e-10
    assert int((s != 0).sum()) == 40
    a0, b0 = linalg.truncated_svd(x, 4)
    assert float((x - a @ b - s).norm()) < float((x - a0 @ b0).norm())


def test_outputs_keep_input_dtype(gen):
    x = torch.randn(12, 9, generator=gen)
    for a, b in (linalg.truncated_svd(x, 3), linalg.randomized_svd(x, 3),
                 linalg.semi_nmf(x, 3, n_iter=5)):
        assert a.dtype == b.dtype == torch.float32


@pytest.mark.parametrize("rank", [0, -1, 13])
def test_bad_rank_is_a_clear_error(rank, gen):
    x = torch.randn(12, 9, generator=gen)
    for fn in (linalg.truncated_svd, linalg.randomized_svd, linalg.semi_nmf):
        with pytest.raises(ValueError, match="rank"):
            fn(x, rank)
    with pytest.raises(ValueError, match="rank"):
        linalg.nmf(x.abs(), rank)


def test_bad_inputs_are_clear_errors(gen):
    with pytest.raises(ValueError, match="2 dimensions"):
        linalg.truncated_svd(torch.randn(3, 4, 5), 2)
    with pytest.raises(ValueError, match="NaN"):
        linalg.truncated_svd(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="gram"):
        linalg.whitened_svd(torch.randn(4, 3), 2)
    with pytest.raises(ValueError, match="act_scale"):
        linalg.activation_aware_svd(torch.randn(4, 3), 2, torch.ones(4))
    with pytest.raises(ValueError, match="fisher"):
        linalg.fisher_weighted_svd(torch.randn(4, 3), 2, torch.ones(3))
    with pytest.raises(TypeError, match="integer"):
        linalg.truncated_svd(torch.randn(4, 3), 2.0)


def test_whitening_factor_handles_singular_gram(gen):
    xin = torch.randn(3, 10, generator=gen, dtype=torch.float64)  # rank-3 Gram, 10 features
    low = linalg.whitening_factor(xin.mT @ xin, damp=0.0)
    assert torch.isfinite(low).all()
    assert torch.allclose(low @ low.mT, xin.mT @ xin, atol=1e-6 * float((xin ** 2).sum()))


def test_rank_helpers():
    assert linalg.lowrank_params(100, 50, 10) == 1500
    assert linalg.max_useful_rank(100, 50) == 33  # 33*150 = 4950 < 5000 <= 34*150
    assert linalg.saves_parameters(100, 50, 33)
    assert not linalg.saves_parameters(100, 50, 34)
    assert linalg.max_useful_rank(1, 10) == 0
    r = linalg.rank_for_param_reduction(100, 50, 0.4)
    assert r * 150 <= 0.6 * 5000 < (r + 1) * 150
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert linalg.rank_for_energy(s, 9 / 14) == 1
    assert linalg.rank_for_energy(s, 9 / 14 + 1e-6) == 2
    assert linalg.rank_for_energy(s, 1.0) == 3
    with pytest.raises(ValueError):
        linalg.rank_for_param_reduction(10, 10, 1.0)
    with pytest.raises(ValueError):
        linalg.rank_for_energy(s, 0.0)


def test_allocate_ranks_meets_budget_and_prefers_cheap_layers():
    C = linalg.RankCandidate
    sensitive = [C(None, 1000, 0.0), C(8, 600, 0.5), C(4, 300, 2.0)]
    robust = [C(None, 1000, 0.0), C(8, 600, 0.01), C(4, 300, 0.02)]
    chosen = linalg.allocate_ranks([sensitive, robust], budget=1300)
    assert sum(c.params for c in chosen) <= 1300
    assert chosen[0].rank is None and chosen[1].rank == 4
    with pytest.raises(ValueError, match="budget"):
        linalg.allocate_ranks([sensitive, robust], budget=500)
