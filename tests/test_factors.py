"""Transition factors against their dense definitions (float64 references in ``brute``)."""

from __future__ import annotations

import math

import pytest
import torch
from brute import (
    F64,
    FACTOR_KINDS,
    factor_tensors,
    leaves,
    random_factor,
    rebuild,
    reference_log_potentials,
    reference_log_transition,
)

import lorank
from lorank import Banded, Dense, LowRank, Sum

NEG = -math.inf
KINDS = FACTOR_KINDS + ("dense+banded",)
B, Z = 3, 5


def _dense_mv(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """x (..., B, Z) @ p (Z, Z) or per example (B, Z, Z)."""
    if p.dim() == 2:
        return x @ p
    return (x.unsqueeze(-2) @ p).squeeze(-2)


def _log_dense_mv(lx: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    if lp.dim() == 2:
        return torch.logsumexp(lx.unsqueeze(-1) + lp, -2)
    return torch.logsumexp(lx.unsqueeze(-1) + lp, -2)


def _mixed_sum(gen, dtype=F64) -> Sum:
    """A shared LowRank plus a batched Banded (the batch comes from one part only)."""
    left = torch.randn(Z, 2, dtype=F64, generator=gen).to(dtype)
    right = torch.randn(Z, 2, dtype=F64, generator=gen).to(dtype)
    band = torch.randn(B, Z, 3, dtype=F64, generator=gen).to(dtype)
    return LowRank(left, right) + Banded(band, 1)


def _factors(gen):
    for kind in KINDS:
        for batch in (None, B):
            yield (
                f"{kind}-{'batched' if batch else 'shared'}",
                random_factor(kind, Z, batch=batch, rank=2, width=1, generator=gen),
            )
    yield "lowrank+banded-mixed", _mixed_sum(gen)


@pytest.fixture
def factors(gen):
    return dict(_factors(gen))


# ---- dense equivalence --------------------------------------------------------------------
def test_log_probs_and_to_dense_equal_the_definition(factors):
    for name, f in factors.items():
        ref = reference_log_transition(f)
        lp = f.log_probs()
        assert lp.shape == ref.shape, name
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(lp), finite), name
        torch.testing.assert_close(lp[finite], ref[finite], msg=name)
        dense = f.to_dense()
        torch.testing.assert_close(dense, ref.exp(), msg=name)
        torch.testing.assert_close(dense.sum(-1), torch.ones_like(dense[..., 0]), msg=name)
        assert (dense >= 0).all(), name
        assert f.dtype == F64
        assert f.num_states == Z
        expected_batch = () if "shared" in name else (B,)
        assert tuple(f.batch_shape) == expected_batch, name


@pytest.mark.parametrize("lead", [(), (4,)])
def test_matmul_and_log_matmul_equal_dense_products(factors, gen, lead):
    for name, f in factors.items():
        p = reference_log_transition(f).exp()
        x = torch.rand(*lead, B, Z, dtype=F64, generator=gen)
        torch.testing.assert_close(f.matmul(x), _dense_mv(x, p), msg=name)
        torch.testing.assert_close(f.prob_operator()(x), _dense_mv(x, p), msg=name)
        lx = torch.randn(*lead, B, Z, dtype=F64, generator=gen) * 3
        lx[..., 0, 1] = NEG  # an impossible state
        lx[..., 1, :] = NEG  # an impossible message
        out = f.log_matmul(lx)
        ref = _log_dense_mv(lx, reference_log_transition(f))
        assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), name
        finite = torch.isfinite(ref)
        torch.testing.assert_close(out[finite], ref[finite], msg=name)
        assert not out.isnan().any(), name
        torch.testing.assert_close(f.log_operator()(lx)[finite], ref[finite], msg=name)


def test_dense_equivalent_gives_the_same_products(factors, gen):
    """``Dense(to_dense().log())`` is the same transition."""
    for name, f in factors.items():
        d = Dense(f.to_dense().log())
        torch.testing.assert_close(d.to_dense(), f.to_dense(), msg=name)
        x = torch.rand(B, Z, dtype=F64, generator=gen)
        torch.testing.assert_close(d.matmul(x), f.matmul(x), msg=name)
        lx = torch.randn(B, Z, dtype=F64, generator=gen)
        torch.testing.assert_close(d.log_matmul(lx), f.log_matmul(lx), msg=name)


@pytest.mark.parametrize("lead", [(), (4,)])
def test_log_prob_entries_and_columns_equal_the_dense_matrix(factors, gen, lead):
    for name, f in factors.items():
        lp = reference_log_transition(f)  # (Z, Z) or (B, Z, Z)
        i = torch.randint(0, Z, (*lead, B), generator=gen)
        j = torch.randint(0, Z, (*lead, B), generator=gen)
        batch = torch.arange(B)
        want = lp[i, j] if lp.dim() == 2 else lp[batch, i, j]
        got = f.log_prob_entries(i, j)
        assert got.shape == (*lead, B), name
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), name
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[fin], want[fin], msg=name)
        cols = f.log_prob_columns(j)  # (..., B, Z): column j of log P, per example
        want_cols = lp.mT[j] if lp.dim() == 2 else lp.mT[batch, j]
        assert cols.shape == (*lead, B, Z), name
        assert torch.equal(torch.isfinite(cols), torch.isfinite(want_cols)), name
        fin = torch.isfinite(want_cols)
        torch.testing.assert_close(cols[fin], want_cols[fin], msg=name)


def test_shared_factor_entries_accept_any_index_shape(gen):
    f = random_factor("lowrank+banded", Z, rank=2, generator=gen)
    lp = reference_log_transition(f)
    i = torch.randint(0, Z, (2, 3, 4), generator=gen)
    j = torch.randint(0, Z, (2, 3, 4), generator=gen)
    torch.testing.assert_close(f.log_prob_entries(i, j), lp[i, j])
    torch.testing.assert_close(f.log_prob_columns(j), lp.mT[j])


def test_prob_matrices_multiply_to_the_transition(gen):
    for batch in (None, B):
        for kind in ("dense", "lowrank"):
            f = random_factor(kind, Z, batch=batch, rank=3, generator=gen)
            mats = f.prob_matrices()
            prod = mats[0]
            for m in mats[1:]:
                prod = prod @ m
            torch.testing.assert_close(prod, f.to_dense())
            assert all((m >= 0).all() and (m <= 1).all() for m in mats)
        for kind in ("banded", "lowrank+banded"):
            assert random_factor(kind, Z, batch=batch, generator=gen).prob_matrices() is None


def _band_dense(probs: torch.Tensor, width: int) -> torch.Tensor:
    """The (…, Z, Z) matrix with ``out[i, i + k - width] = probs[i, k]`` (by loops)."""
    z = probs.shape[-2]
    out = probs.new_zeros(*probs.shape[:-2], z, z)
    for i in range(z):
        for k in range(2 * width + 1):
            j = i + k - width
            if 0 <= j < z:
                out[..., i, j] = probs[..., i, k]
    return out


def test_prob_terms_add_up_to_the_transition(factors):
    """``normalize()`` gives the log normalizer and terms (matrix chains + bands) whose sum
    is ``P``; every entry is a probability."""
    for name, f in factors.items():
        log_norm, terms = f.normalize()
        torch.testing.assert_close(log_norm, f.log_normalizer(), msg=name)
        total = 0
        for mats in terms.chains:
            prod = mats[0]
            for m in mats[1:]:
                prod = prod @ m
            total = total + prod
        for probs, width in terms.bands:
            total = total + _band_dense(probs, width)
        torch.testing.assert_close(total.expand_as(f.to_dense()), f.to_dense(), msg=name)
        assert all(((t >= 0) & (t <= 1)).all() for t in terms.tensors()), name
        assert len(f.tensors()) == len(factor_tensors(f))
        assert all(a is b for a, b in zip(f.tensors(), factor_tensors(f), strict=True))


def test_lowrank_stochastic_factors(gen):
    for batch in (None, B):
        f = random_factor("lowrank", Z, batch=batch, rank=3, scale=5.0, generator=gen)
        a, c = f.stochastic_factors()
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a[..., 0]))
        torch.testing.assert_close(c.sum(-2), torch.ones_like(c[..., 0, :]))
        torch.testing.assert_close(a @ c.mT, f.to_dense())
        # a larger (joint) normalizer makes A's rows sum to less than one
        a2, _ = f.stochastic_factors(f.log_normalizer() + math.log(2.0))
        torch.testing.assert_close(a2.sum(-1), torch.full_like(a2[..., 0], 0.5))


def test_lowrank_from_embeddings(gen):
    u = torch.randn(Z, 4, dtype=F64, generator=gen)
    v = torch.randn(Z, 4, dtype=F64, generator=gen)
    w = torch.randn(4, 3, dtype=F64, generator=gen)
    f = LowRank.from_embeddings(u, v, w)
    torch.testing.assert_close(f.to_dense(), LowRank(u @ w, v @ w).to_dense())
    assert f.rank == 3
    with pytest.raises(ValueError, match=r"left_emb has feature size 4 .*\(5, 3\)"):
        LowRank.from_embeddings(u, v, torch.randn(5, 3, dtype=F64))


def test_banded_special_widths(gen):
    # width 0: the identity
    f = Banded(torch.randn(Z, 1, dtype=F64, generator=gen), 0)
    torch.testing.assert_close(f.to_dense(), torch.eye(Z, dtype=F64))
    # width >= Z - 1: every entry allowed, equal to a Dense factor with the same potentials
    w = Z + 1
    logits = torch.randn(Z, 2 * w + 1, dtype=F64, generator=gen)
    f = Banded(logits, w)
    dense_logits = torch.stack([logits[i, torch.arange(Z) - i + w] for i in range(Z)])
    torch.testing.assert_close(f.to_dense(), Dense(dense_logits).to_dense())
    x = torch.rand(2, Z, dtype=F64, generator=gen)
    torch.testing.assert_close(f.matmul(x), Dense(dense_logits).matmul(x))


def test_sum_flattens_and_normalizes_jointly(gen):
    a = random_factor("lowrank", Z, rank=2, generator=gen)
    b = random_factor("banded", Z, generator=gen)
    c = random_factor("dense", Z, generator=gen)
    s = (a + b) + c
    assert isinstance(s, Sum) and len(s.parts) == 3
    phi = torch.logsumexp(
        torch.stack([reference_log_potentials(p) for p in (a, b, c)]), 0
    ).log_softmax(-1)
    torch.testing.assert_close(s.log_probs(), phi)
    assert "LowRank" in repr(s) and "Banded" in repr(s)
    with pytest.raises(TypeError):
        _ = a + 1


def test_dense_with_structural_zeros(gen):
    logits = torch.randn(Z, Z, dtype=F64, generator=gen)
    logits[0, 1:] = NEG  # state 0 is absorbing
    logits[2, 3] = NEG
    f = Dense(logits)
    assert f.to_dense()[0, 0] == 1.0
    assert f.log_probs()[2, 3] == NEG
    x = torch.rand(B, Z, dtype=F64, generator=gen)
    torch.testing.assert_close(f.matmul(x), x @ logits.softmax(-1))
    assert f.log_prob_entries(torch.tensor([2]), torch.tensor([3])).item() == NEG


# ---- extreme log-features -----------------------------------------------------------------
def _extreme(kind: str, dtype: torch.dtype, gen: torch.Generator, batch):
    f = random_factor(kind, 6, batch=batch, rank=3, width=1, generator=gen)
    for t in factor_tensors(f):
        t.copy_((torch.rand(t.shape, dtype=F64, generator=gen) * 2 - 1) * 50)
    f = rebuild(f, lambda t: t)  # Banded precomputes its masked logits
    return rebuild(f, lambda t: t.to(dtype)), reference_log_transition(f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", FACTOR_KINDS)
@pytest.mark.parametrize("batch", [None, 2])
def test_features_up_to_50_no_overflow(gen, dtype, kind, batch):
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    nb = batch or 2
    for _ in range(5):
        f, ref = _extreme(kind, dtype, gen, batch)
        p = ref.exp()
        dense = f.to_dense()
        assert torch.isfinite(dense).all()
        torch.testing.assert_close(
            dense.sum(-1).to(F64), torch.ones(p.shape[:-1], dtype=F64), **tol
        )
        torch.testing.assert_close(dense.to(F64), p, **tol)
        x = torch.rand(nb, 6, dtype=F64, generator=gen)
        out = f.matmul(x.to(dtype))
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.to(F64), _dense_mv(x, p), **tol)
        lx = (torch.rand(nb, 6, dtype=F64, generator=gen) * 2 - 1) * 50
        lout = f.log_matmul(lx.to(dtype))
        lref = _log_dense_mv(lx, ref)
        assert not lout.isnan().any()
        # entries within 60 nats of their row's max are accurate (smaller ones are negligible)
        near = lref > lref.amax(-1, keepdim=True) - 60
        torch.testing.assert_close(lout.to(F64)[near], lref[near], **tol)
        # rows of log P: the entries that carry the mass are accurate
        lp = f.log_probs().to(F64)
        big = ref > -30
        torch.testing.assert_close(lp[big], ref[big], **tol)
        assert not lp.isnan().any()
        j = torch.randint(0, 6, (4, nb), generator=gen)
        cols = f.log_prob_columns(j).to(F64)
        assert not cols.isnan().any()
        want = ref.mT[j] if ref.dim() == 2 else ref.mT[torch.arange(nb), j]
        big = want > -30
        torch.testing.assert_close(cols[big], want[big], **tol)


def test_lowrank_float32_rows_sum_to_one_with_opposite_features():
    """Regression: left @ right^T with separate max shifts lost precision (rows summed to 1.017)."""
    left = torch.tensor([[50.0, -50.0], [50.0, -50.0], [-50.0, 50.0]])
    right = torch.tensor([[-50.0, 50.0], [-50.0, 50.0], [-50.0, 50.0]])
    f = LowRank(left, right)
    torch.testing.assert_close(f.to_dense().sum(-1), torch.ones(3))
    torch.testing.assert_close(f.log_probs(), torch.full((3, 3), -math.log(3.0)))
    torch.testing.assert_close(
        f.log_prob_columns(torch.tensor([0, 2])), torch.full((2, 3), -math.log(3.0))
    )


# ---- gradients ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_factor_gradients_match_the_definition(gen, kind):
    f, params = leaves(random_factor(kind, 4, batch=2, rank=2, generator=gen))
    x = torch.rand(2, 4, dtype=F64, generator=gen)
    w = torch.randn(2, 4, dtype=F64, generator=gen)
    ours = torch.autograd.grad((f.matmul(x) * w).sum() + (f.log_matmul(x.log()) * w).sum(), params)
    p = reference_log_transition(f, differentiable=True)
    ref_out = (_dense_mv(x, p.exp()) * w).sum() + (_log_dense_mv(x.log(), p) * w).sum()
    ref = torch.autograd.grad(ref_out, params)
    for a, b in zip(ours, ref, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


# ---- no mutation, errors ------------------------------------------------------------------
def test_factor_operations_never_modify_inputs(factors, gen):
    for name, f in factors.items():
        before = [t.clone() for t in factor_tensors(f)]
        x = torch.rand(B, Z, dtype=F64, generator=gen)
        lx = x.log()
        x0, lx0 = x.clone(), lx.clone()
        f.matmul(x)
        f.log_matmul(lx)
        f.log_probs()
        f.to_dense()
        f.log_prob_columns(torch.zeros(B, dtype=torch.long))
        f.log_prob_entries(torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.long))
        f.log_normalizer()
        for t, t0 in zip(factor_tensors(f), before, strict=True):
            assert torch.equal(t, t0), name
        assert torch.equal(x, x0) and torch.equal(lx, lx0), name


def test_banded_masks_out_of_range_entries_without_touching_the_logits():
    logits = torch.zeros(3, 3, dtype=F64)
    f = Banded(logits, 1)
    assert logits.eq(0).all()
    torch.testing.assert_close(f.to_dense()[0], torch.tensor([0.5, 0.5, 0.0], dtype=F64))


@pytest.mark.parametrize(
    "build,exc,pattern",
    [
        (lambda: Dense(torch.zeros(3, 4)), ValueError, r"logits must be square .*\(3, 4\)"),
        (lambda: Dense(torch.zeros(3)), ValueError, r"logits must have 2 or 3 dimensions.*\(3,\)"),
        (lambda: Dense(torch.zeros(3, 3, dtype=torch.long)), TypeError, r"logits.*int64"),
        (
            lambda: Dense(torch.full((3, 3), math.nan)),
            ValueError,
            r"logits \(shape \(3, 3\)\) contains 9 NaN",
        ),
        (lambda: Dense(torch.full((3, 3), math.inf)), ValueError, r"logits .*\+inf"),
        (lambda: Dense([[0.0]]), TypeError, r"logits must be a torch.Tensor, got list"),
        (
            lambda: LowRank(torch.zeros(3, 2), torch.zeros(3, 3)),
            ValueError,
            r"left and right must have the same shape .*left \(3, 2\) and right \(3, 3\)",
        ),
        (
            lambda: LowRank(torch.zeros(3, 2), torch.zeros(3, 2, dtype=F64)),
            TypeError,
            r"left and right must have the same dtype.*float32.*float64",
        ),
        (
            lambda: LowRank(torch.zeros(3, 2), torch.full((3, 2), math.nan)),
            ValueError,
            r"right \(shape \(3, 2\)\) contains 6 NaN",
        ),
        (lambda: LowRank(torch.zeros(2, 3, 2, 1), torch.zeros(2, 3, 2, 1)), ValueError, r"left"),
        (
            lambda: Banded(torch.zeros(4, 3), 2),
            ValueError,
            r"\(\.\.\., Z, 5\) for width=2, got \(4, 3\)",
        ),
        (lambda: Banded(torch.zeros(4, 3), -1), ValueError, r"width must be a nonnegative"),
        (lambda: Banded(torch.zeros(4, 3), 1.0), ValueError, r"width must be a nonnegative"),
        (
            lambda: Dense(torch.zeros(3, 3)) + Dense(torch.zeros(4, 4)),
            ValueError,
            r"same num_states, got \[3, 4\]",
        ),
        (
            lambda: Dense(torch.zeros(2, 3, 3)) + Dense(torch.zeros(4, 3, 3)),
            ValueError,
            r"batch shape.*\(2,\), \(4,\)",
        ),
        (
            lambda: Dense(torch.zeros(3, 3)) + Dense(torch.zeros(3, 3, dtype=F64)),
            TypeError,
            r"same dtype.*float32.*float64",
        ),
    ],
)
def test_factor_errors_name_the_argument(build, exc, pattern):
    with pytest.raises(exc, match=pattern):
        build()


def test_orthogonal_random_features(gen):
    w = lorank.orthogonal_random_features(8, 20, generator=gen, dtype=F64)
    assert w.shape == (8, 20) and w.dtype == F64
    # each block of 8 columns is orthogonal (an orthogonal matrix with rescaled columns)
    block = w[:, :8]
    gram = block.T @ block
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-10, rtol=0)
    assert lorank.orthogonal_random_features(4, 2).dtype == torch.float32
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        lorank.orthogonal_random_features(4, 0)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        lorank.orthogonal_random_features(-1, 2)


def _row_factors(z: int = 7):
    g = torch.Generator().manual_seed(3)
    dense = lorank.Dense(torch.randn(z, z, generator=g, dtype=torch.float64))
    low = lorank.LowRank(*torch.randn(2, z, 3, generator=g, dtype=torch.float64))
    band = lorank.Banded(torch.randn(z, 5, generator=g, dtype=torch.float64), 2)
    return {"dense": dense, "lowrank": low, "banded": band, "sum": low + band}


@pytest.mark.parametrize("kind", ["dense", "lowrank", "banded", "sum"])
def test_log_prob_rows_match_dense_rows(kind):
    f = _row_factors()[kind]
    i = torch.tensor([0, 3, 6, 3])
    rows = f.log_prob_rows(i)
    assert rows.shape == (4, 7)
    torch.testing.assert_close(rows, f.log_probs()[i])
    torch.testing.assert_close(rows.exp().sum(-1), torch.ones(4, dtype=torch.float64))


def test_log_prob_rows_refuses_batched_factor():
    f = lorank.Dense(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="unbatched"):
        f.log_prob_rows(torch.tensor([0]))


def test_fused_softmax_gradcheck(gen):
    """``_Softmax`` (the factors' normalization: log normalizer and probabilities together):
    gradcheck and gradgradcheck, including an all -inf row (probabilities 0, gradient 0)."""
    from lorank.factors import _Softmax

    x = torch.randn(4, 5, dtype=F64, generator=gen)
    x[1, :2] = NEG
    for dim in (-1, 0):
        fn = lambda x, dim=dim: _Softmax.apply(x, dim)  # noqa: E731
        inp = x.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(fn, (inp,))
        assert torch.autograd.gradgradcheck(fn, (inp,))
    dead = x.clone()
    dead[2] = NEG
    dead.requires_grad_(True)
    ln, p = _Softmax.apply(dead, -1)
    assert ln[2] == NEG and p[2].eq(0).all()
    (g,) = torch.autograd.grad((ln[torch.isfinite(ln)].sum() + (p * p).sum()), dead)
    assert torch.isfinite(g).all() and g[2].eq(0).all()
    ref_ln = torch.logsumexp(x, -1)
    torch.testing.assert_close(_Softmax.apply(x, -1)[0], ref_ln)
    torch.testing.assert_close(_Softmax.apply(x, -1)[1], x.softmax(-1))
