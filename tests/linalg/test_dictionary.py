"""lorank.linalg.dictionary: Batch-OMP, sparse dictionary learning and its storage count."""

from __future__ import annotations

import itertools

import pytest
import torch

from lorank import linalg


def _incoherent_dictionary(n, k, gen):
    d = torch.randn(n, k, generator=gen, dtype=torch.float64)
    return d / d.norm(dim=0)


def _sparse_codes(m, k, s, gen):
    c = torch.zeros(m, k, dtype=torch.float64)
    for i in range(m):
        idx = torch.randperm(k, generator=gen)[:s]
        c[i, idx] = torch.randn(s, generator=gen, dtype=torch.float64).sign() * \
            (1 + torch.rand(s, generator=gen, dtype=torch.float64))
    return c


def test_omp_recovers_sparse_codes_of_an_incoherent_dictionary(gen):
    n, k, s, m = 64, 48, 4, 30
    d = _incoherent_dictionary(n, k, gen)
    c = _sparse_codes(m, k, s, gen)
    y = d @ c.mT
    idx, val = linalg.omp(d.mT @ d, d.mT @ y, s)
    got = torch.zeros(m, k, dtype=torch.float64).scatter_(1, idx, val)
    assert torch.allclose(got, c, atol=1e-9)
    assert bool((idx.diff(dim=-1) > 0).all())  # ascending


def test_omp_values_are_least_squares_on_the_chosen_support(gen):
    n, k, s, m = 20, 16, 5, 12
    d = _incoherent_dictionary(n, k, gen)
    y = torch.randn(n, m, generator=gen, dtype=torch.float64)
    idx, val = linalg.omp(d.mT @ d, d.mT @ y, s)
    for j in range(m):
        sub = d[:, idx[j]]
        ls = torch.linalg.lstsq(sub, y[:, j:j + 1]).solution.squeeze(-1)
        assert torch.allclose(val[j], ls, atol=1e-9)
    # the first atom is the best single one
    first = (d.mT @ y).abs().argmax(0)
    assert all(int(first[j]) in idx[j].tolist() for j in range(m))


def test_omp_nm_structure(gen):
    n, k, m = 24, 16, 10
    d = _incoherent_dictionary(n, k, gen)
    y = torch.randn(n, m, generator=gen, dtype=torch.float64)
    idx, _ = linalg.omp(d.mT @ d, d.mT @ y, 8, nm=(2, 4))
    groups = idx // 4
    for j in range(m):
        assert torch.bincount(groups[j], minlength=4).tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="nnz must be 8"):
        linalg.omp(d.mT @ d, d.mT @ y, 6, nm=(2, 4))


@pytest.mark.parametrize("whiten", [False, True])
def test_full_dictionary_reproduces_the_matrix(whiten, gen):
    m, n = 14, 10
    x = torch.randn(m, n, generator=gen, dtype=torch.float64)
    gram = None
    if whiten:
        xin = torch.randn(50, n, generator=gen, dtype=torch.float64)
        gram = xin.mT @ xin
    a, b = linalg.sparse_dictionary(x, n, n, gram=gram, damp=0.0)
    assert torch.allclose(a @ b, x, atol=1e-10)


def test_full_support_is_the_whitened_svd(gen):
    m, n, k = 20, 12, 5
    x = torch.randn(m, n, generator=gen, dtype=torch.float64)
    xin = torch.randn(40, n, generator=gen, dtype=torch.float64) * torch.logspace(0, 1, n,
                                                                                    dtype=torch.float64)
    gram = xin.mT @ xin
    chol = linalg.whitening_factor(gram, 1e-9)
    a, b = linalg.sparse_dictionary(x, k, k, chol=chol)
    a2, b2 = linalg.whitened_svd(x, k, chol=chol)
    assert torch.allclose(a @ b, a2 @ b2, atol=1e-9)


def test_objective_never_increases_and_beats_lowrank_on_sparse_structure(gen):
    m, n, k, s = 60, 24, 20, 4
    d = _incoherent_dictionary(n, k, gen)
    x = _sparse_codes(m, k, s, gen) @ d.mT
    a, b, hist = linalg.sparse_dictionary(x, k, s, n_iter=15, return_history=True,
                                          generator=gen)
    assert all(h2 <= h1 * (1 + 1e-12) for h1, h2 in itertools.pairwise(hist))
    assert int((a != 0).sum(-1).max()) <= s
    dict_err = float((x - a @ b).norm())
    assert abs(dict_err - hist[-1]) <= 1e-8 * max(1.0, hist[-1])
    # equal storage (float64): the largest rank fitting the dictionary's bytes
    nbytes = linalg.dictionary_bytes(m, n, k, s, 8)
    r = max(r for r in range(1, n + 1) if r * (m + n) * 8 <= nbytes)
    a2, b2 = linalg.truncated_svd(x, r)
    assert dict_err < 0.8 * float((x - a2 @ b2).norm())


def test_sparse_codes_output(gen):
    x = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    (idx, val), b = linalg.sparse_dictionary(x, 6, 3, sparse_codes=True, n_iter=2)
    a, b2 = linalg.sparse_dictionary(x, 6, 3, n_iter=2)
    dense = torch.zeros(9, 6, dtype=torch.float64).scatter_(1, idx, val)
    assert idx.shape == val.shape == (9, 3)
    assert torch.allclose(dense, a) and torch.allclose(b, b2)


def test_dictionary_bytes():
    # k*n*4 dictionary, m*s*4 values, m*ceil(k/8) mask bytes
    assert linalg.dictionary_bytes(10, 6, 9, 3, 4) == 9 * 6 * 4 + 10 * 3 * 4 + 10 * 2
    assert linalg.dictionary_bytes(10, 6, 8, 8, 4) == (8 * 6 + 10 * 8) * 4  # full: no mask
    assert linalg.dictionary_bytes(10, 6, 8, 2, 4, share=3) == -(-8 * 6 * 4 // 3) + 80 + 10
    assert linalg.support_bytes(5, 17) == 15


def test_bad_arguments(gen):
    x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match="n_atoms = 7 exceeds"):
        linalg.sparse_dictionary(x, 7, 2)
    with pytest.raises(ValueError, match="nnz = 5 exceeds n_atoms = 4"):
        linalg.sparse_dictionary(x, 4, 5)
    with pytest.raises(ValueError, match="gram must have shape"):
        linalg.sparse_dictionary(x, 4, 2, gram=torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="multiple of M"):
        linalg.sparse_dictionary(x, 6, 3, nm=(2, 4))
    with pytest.raises(ValueError, match="nm must be a pair"):
        linalg.check_nm((2, 4, 1))
    with pytest.raises(ValueError, match="1 <= N <= M"):
        linalg.check_nm((3, 2))
