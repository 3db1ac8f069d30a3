"""Semirings and the safe log-space primitives they are built on."""

from __future__ import annotations

import math

import pytest
import torch
from brute import F64, PROPERTY, summarize
from hypothesis import given
from hypothesis import strategies as st

from lorank.semiring import (
    SEMIRINGS,
    EntropySemiring,
    LogSemiring,
    MaxSemiring,
    log_matmul,
    log_matmul_by,
    safe_logsumexp,
)

NEG = -math.inf


# ---- safe_logsumexp -----------------------------------------------------------------------
def test_safe_logsumexp_matches_torch_on_finite_and_partly_neg_inf(gen):
    x = torch.randn(4, 5, 6, dtype=F64, generator=gen)
    x[0, 1, :3] = NEG
    x[2, :, 0] = NEG
    for dim in (0, 1, -1):
        for keepdim in (False, True):
            torch.testing.assert_close(
                safe_logsumexp(x, dim, keepdim), torch.logsumexp(x, dim, keepdim)
            )


def test_safe_logsumexp_all_neg_inf_is_neg_inf_with_finite_zero_grad():
    x = torch.full((3, 4), NEG, dtype=F64)
    x[1, 2] = 0.5  # one row with a finite entry
    x.requires_grad_(True)
    out = safe_logsumexp(x, dim=-1)
    assert out[0] == NEG and out[2] == NEG
    assert float(out[1].detach()) == pytest.approx(0.5)
    out.sum().backward()
    assert torch.isfinite(x.grad).all(), x.grad
    assert x.grad[0].eq(0).all() and x.grad[2].eq(0).all()
    assert x.grad[1, 2] == pytest.approx(1.0)


def test_safe_logsumexp_and_safe_log_second_derivatives_with_neg_inf(gen):
    from lorank._numerics import safe_log

    x = torch.randn(3, 4, dtype=F64, generator=gen)
    x[0] = NEG  # an all -inf slice: value -inf, gradients 0 (first and second order)
    x[1, 2] = NEG
    x.requires_grad_(True)
    w = torch.randn(3, dtype=F64, generator=gen)

    def f(x):
        out = safe_logsumexp(x, -1)
        return torch.where(torch.isinf(out), 0.0, out * w).sum()

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    assert torch.isfinite(g).all() and torch.isfinite(gg).all()
    assert (g[0] == 0).all() and (gg[0] == 0).all()

    p = torch.tensor([0.0, 0.5, 2.0], dtype=F64, requires_grad=True)
    y = safe_log(p)
    assert y[0] == NEG
    # a gradient of 3 reaches every entry, log 0 too: its derivative there is 0, not inf
    (g,) = torch.autograd.grad(y, p, torch.full((3,), 3.0, dtype=F64), create_graph=True)
    torch.testing.assert_close(g, torch.tensor([0.0, 6.0, 1.5], dtype=F64))
    (gg,) = torch.autograd.grad(g.sum(), p)
    torch.testing.assert_close(gg, torch.tensor([0.0, -12.0, -0.75], dtype=F64))
    q = torch.tensor([0.5, 2.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda q: safe_log(q).sum(), (q,))


def test_guarded_helpers_agree_with_their_one_call_form_and_in_forward_mode():
    import torch.autograd.forward_ad as fwAD

    from lorank._numerics import safe_log

    x = torch.tensor([[NEG, NEG], [0.0, 1.0], [math.nan, 1.0]], dtype=F64)
    p = torch.tensor([0.0, 2.0, math.nan], dtype=F64)
    plain = safe_logsumexp(x, -1), safe_log(p)  # no derivative recorded: one call each
    guarded = (safe_logsumexp(x.clone().requires_grad_(True), -1),
               safe_log(p.clone().requires_grad_(True)))
    for a, b in zip(plain, guarded, strict=True):
        torch.testing.assert_close(a, b.detach(), equal_nan=True)  # NaN is never hidden
    with fwAD.dual_level():  # forward mode takes the guarded form: finite tangents
        t = fwAD.unpack_dual(safe_logsumexp(fwAD.make_dual(x[:2], torch.ones(2, 2, dtype=F64)),
                                            -1)).tangent
        torch.testing.assert_close(t, torch.tensor([0.0, 1.0], dtype=F64))
        t = fwAD.unpack_dual(safe_log(fwAD.make_dual(p[:2], torch.ones(2, dtype=F64)))).tangent
        torch.testing.assert_close(t, torch.tensor([0.0, 0.5], dtype=F64))


def test_safe_logsumexp_grad_is_softmax(gen):
    x = torch.randn(3, 7, dtype=F64, generator=gen)
    x[0, :2] = NEG
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(safe_logsumexp(x, -1).sum(), x)
    torch.testing.assert_close(g, x.detach().softmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_safe_logsumexp_no_overflow_for_large_values(dtype):
    x = torch.tensor([[1e4, 1e4 - 1.0, -1e4], [-1e4, -1e4, NEG]], dtype=dtype)
    out = safe_logsumexp(x, -1)
    ref = torch.logsumexp(x.to(F64), -1)
    torch.testing.assert_close(out.to(F64), ref)


# ---- log_matmul ---------------------------------------------------------------------------
def _naive_log_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(a.unsqueeze(-1) + b.unsqueeze(-3), dim=-2)


@pytest.mark.parametrize(
    "sa,sb", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((1, 4), (3, 4, 2))]
)
def test_log_matmul_matches_naive(gen, sa, sb):
    a = torch.randn(*sa, dtype=F64, generator=gen) * 3
    b = torch.randn(*sb, dtype=F64, generator=gen) * 3
    a.view(-1)[::5] = NEG  # scattered impossible entries
    torch.testing.assert_close(log_matmul(a, b), _naive_log_matmul(a, b))


def test_log_matmul_by_a_fixed_matrix_matches_naive_at_every_call(gen):
    b = torch.randn(4, 5, dtype=F64, generator=gen) * 3
    b[:, 1] = NEG
    op = log_matmul_by(b)
    for _ in range(3):  # the prepared exponential is reused, never modified
        a = torch.randn(2, 3, 4, dtype=F64, generator=gen) * 3
        torch.testing.assert_close(op(a), _naive_log_matmul(a, b))


def test_log_matmul_gradients_match_naive(gen):
    a = torch.randn(3, 4, dtype=F64, generator=gen)
    b = torch.randn(4, 5, dtype=F64, generator=gen)
    a[0, 1] = NEG
    b[2, :] = NEG
    a.requires_grad_(True)
    b.requires_grad_(True)
    w = torch.randn(3, 5, dtype=F64, generator=gen)
    ga = torch.autograd.grad((log_matmul(a, b) * w).sum(), [a, b])
    gn = torch.autograd.grad((_naive_log_matmul(a, b) * w).sum(), [a, b])
    for x, y in zip(ga, gn, strict=True):
        torch.testing.assert_close(x, y)


def test_log_matmul_all_neg_inf_rows_and_columns_give_neg_inf_and_finite_grads(gen):
    a = torch.randn(3, 4, dtype=F64, generator=gen)
    b = torch.randn(4, 5, dtype=F64, generator=gen)
    a[1] = NEG  # an impossible row
    b[:, 2] = NEG  # an impossible column
    a.requires_grad_(True)
    b.requires_grad_(True)
    out = log_matmul(a, b)
    assert out[1].eq(NEG).all() and out[:, 2].eq(NEG).all()
    assert torch.isfinite(out[[0, 2]][:, [0, 1, 3, 4]]).all()
    out.masked_fill(torch.isinf(out), 0).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    # an all -inf product, differentiated directly (upstream gradient nonzero)
    a2 = torch.full((2, 3), NEG, dtype=F64, requires_grad=True)
    b2 = torch.randn(3, 2, dtype=F64, generator=gen, requires_grad=True)
    out2 = log_matmul(a2, b2)
    assert out2.eq(NEG).all()
    out2.sum().backward()
    assert torch.isfinite(a2.grad).all() and torch.isfinite(b2.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_matmul_no_overflow_for_features_up_to_50(gen, dtype):
    a = (torch.rand(6, 5, generator=gen, dtype=F64) * 2 - 1) * 50
    b = (torch.rand(5, 7, generator=gen, dtype=F64) * 2 - 1) * 50
    out = log_matmul(a.to(dtype), b.to(dtype))
    assert torch.isfinite(out).all()
    ref = _naive_log_matmul(a, b)
    # entries within ~80 nats of their row max are accurate in float32 too
    near = ref > ref.amax(-1, keepdim=True) - 60
    torch.testing.assert_close(out.to(F64)[near], ref[near], rtol=1e-5, atol=1e-4)


# ---- semirings ----------------------------------------------------------------------------
def test_semiring_registry():
    assert SEMIRINGS == {"log": LogSemiring, "max": MaxSemiring, "entropy": EntropySemiring}


def test_log_and_max_semiring_sum_and_matmul(gen):
    a = torch.randn(2, 3, 4, dtype=F64, generator=gen)
    b = torch.randn(2, 4, 5, dtype=F64, generator=gen)
    a[0, 0] = NEG
    torch.testing.assert_close(LogSemiring.sum(a, -1), torch.logsumexp(a, -1))
    torch.testing.assert_close(LogSemiring.matmul(a, b), _naive_log_matmul(a, b))
    torch.testing.assert_close(MaxSemiring.sum(a, 1), a.amax(1))
    naive_max = (a.unsqueeze(-1) + b.unsqueeze(-3)).amax(-2)
    torch.testing.assert_close(MaxSemiring.matmul(a, b), naive_max)
    # the generic chunked product gives the same answer for any chunk size
    torch.testing.assert_close(MaxSemiring.matmul(a, b, chunk=2), naive_max)
    torch.testing.assert_close(MaxSemiring.matmul(a, b, chunk=1), naive_max)


def test_entropy_semiring_sum_is_the_entropy_of_the_softmax(gen):
    a = torch.randn(3, 6, dtype=F64, generator=gen) * 2
    a[1, :4] = NEG
    x = EntropySemiring.convert(a)
    assert x.shape == (2, 3, 6)
    out = EntropySemiring.sum(x, dim=-1)
    for row in range(3):
        s = summarize(a[row])
        assert EntropySemiring.unconvert(out)[row] == pytest.approx(float(s["entropy"]))
        assert out[0, row] == pytest.approx(float(s["log_partition"]))


def test_entropy_semiring_two_level_composition(gen):
    """sum over alternatives i of sub-distributions (scores s[i, k]) = entropy of all (i, k)."""
    s = torch.randn(4, 5, dtype=F64, generator=gen) * 2
    s[0, 1:] = NEG
    s[2, 0] = NEG
    a = torch.logsumexp(s, -1)
    h = torch.stack([summarize(row)["entropy"] for row in s])
    out = EntropySemiring.sum(torch.stack([a, h]), dim=0)
    ref = summarize(s.reshape(-1))
    assert out[1] == pytest.approx(float(ref["entropy"]))
    assert out[0] == pytest.approx(float(ref["log_partition"]))


def test_entropy_semiring_matmul_equals_enumeration(gen):
    """(x ⊗ M) summed: the entropy of pairs (i, j) with score x[i] + M[i, j]."""
    x = torch.randn(4, dtype=F64, generator=gen)
    m = torch.randn(4, 3, dtype=F64, generator=gen)
    m[0, 0] = NEG
    prod = EntropySemiring.matmul(
        EntropySemiring.convert(x).unsqueeze(-2), EntropySemiring.convert(m)
    ).squeeze(-2)
    total = EntropySemiring.sum(prod, dim=-1)
    ref = summarize((x.unsqueeze(-1) + m).reshape(-1))
    assert EntropySemiring.unconvert(total) == pytest.approx(float(ref["entropy"]))


def test_entropy_semiring_all_neg_inf_and_grads_without_nan(gen):
    a = torch.randn(3, 5, dtype=F64, generator=gen)
    a[0] = NEG  # nothing possible
    a[1, :3] = NEG  # some impossible alternatives
    a.requires_grad_(True)
    out = EntropySemiring.sum(EntropySemiring.convert(a), dim=-1)
    assert out[0, 0] == NEG and out[1, 0] == 0.0
    assert torch.isfinite(out[1]).all()
    out[1].sum().backward()
    assert torch.isfinite(a.grad).all(), a.grad
    # gradient equals that of the direct entropy
    b = a.detach()[1:].clone().requires_grad_(True)
    direct = torch.stack([summarize(row)["entropy"] for row in b]).sum()
    (g,) = torch.autograd.grad(direct, b)
    torch.testing.assert_close(a.grad[1:], g)


@PROPERTY
@given(
    n=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    n_neg=st.integers(0, 5),
)
def test_entropy_semiring_sum_property(n, seed, n_neg):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dtype=F64, generator=gen) * 3
    a[: min(n_neg, n - 1)] = NEG
    out = EntropySemiring.sum(EntropySemiring.convert(a), dim=0)
    ref = summarize(a)
    assert float(out[1]) == pytest.approx(float(ref["entropy"]), abs=1e-12)
    assert 0.0 <= float(out[1]) <= math.log(n) + 1e-12
