"""The chain kernels (``lorank.dp._scaled_chain``, ``lorank.dp._rank_space``) in float64:
gradcheck of both custom autograd Functions for every factor kind, the inference path against
the gradient path (bit for bit), the band against a dense factor and rank space against state
space at sizes beyond brute force, padded vs unpadded, and the float32 underflow fallbacks."""

from __future__ import annotations

import math

import pytest
import torch
from brute import F64, leaves, random_factor, reference_log_potentials

from lorank import HMM, Banded, Dense, LowRank, RankSpaceHMM
from lorank.dp import _rank_space
from lorank.dp import _scaled_chain as kernel

B, T, Z = 3, 5, 4
LENGTHS = torch.tensor([5, 3, 1])
KINDS = ["dense", "lowrank", "banded", "lowrank+banded", "dense+banded", "mixed"]


def _kernel_inputs(gen, kind, batch, width=1):
    f = random_factor(kind, Z, batch=batch, rank=2, width=width, generator=gen)
    _, terms = f.normalize()
    em = torch.randn(B, T, Z, dtype=F64, generator=gen)
    pi = torch.randn(B, Z, dtype=F64, generator=gen).softmax(-1)
    pad = kernel.padding_index(LENGTHS, T)
    k = kernel.emission_shift(em, pad)
    bands = [(p.mT.contiguous(), w) for p, w in terms.bands]
    flat = [m for c in terms.chains for m in c] + [p for p, _ in bands]
    return pi, em, k, pad, kernel.layout_of(terms), flat


# ---- gradcheck of the custom Functions ------------------------------------------------------
@pytest.mark.parametrize("batch", [None, B], ids=["shared", "batched"])
@pytest.mark.parametrize("kind", KINDS)
def test_scaled_chain_gradcheck(gen, kind, batch):
    width = 2 if "band" in kind else 1
    pi, em, k, pad, layout, flat = _kernel_inputs(gen, kind, batch, width=width)
    inputs = [x.detach().clone().requires_grad_(True) for x in (pi, em, *flat)]

    def fn(pi, em, *flat):
        return kernel.ScaledChain.apply(pi, em, k, pad, layout, *flat)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("kind", ["lowrank", "lowrank+banded"])
def test_scaled_chain_gradgradcheck(gen, kind):
    """Second derivatives differentiate the log-space forward (create_graph=True)."""
    pi, em, k, pad, layout, flat = _kernel_inputs(gen, kind, None)
    inputs = [x.detach().clone().requires_grad_(True) for x in (pi, em, *flat)]

    def fn(pi, em, *flat):
        return kernel.ScaledChain.apply(pi, em, k, pad, layout, *flat)

    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("chunk", [1 << 24, 1], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("batch", [None, B], ids=["shared", "batched"])
def test_rank_space_gradcheck(gen, batch, chunk):
    f = random_factor("lowrank", Z, batch=batch, rank=3, generator=gen)
    a, ct = f.prob_terms().chains[0]
    em = torch.randn(B, T, Z, dtype=F64, generator=gen)
    pi = torch.randn(B, Z, dtype=F64, generator=gen).softmax(-1)
    pad = kernel.padding_index(LENGTHS, T)
    k = kernel.emission_shift(em, pad)
    inputs = [x.detach().clone().requires_grad_(True) for x in (pi, em, a, ct)]

    def fn(pi, em, a, ct):
        return _rank_space.RankSpaceChain.apply(pi, em, k, pad, chunk, a, ct)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("z,width,block", [(5, 1, 32), (70, 4, 32), (64, 2, 16), (3, 4, 2),
                                           (33, 3, 4)])
def test_band_weight_grad_equals_loops(gen, z, width, block):
    alpha = torch.randn(3, 2, z, dtype=F64, generator=gen)
    w = torch.randn(3, 2, z, dtype=F64, generator=gen)
    ref = torch.zeros(2 * width + 1, z, dtype=F64)
    ref_b = torch.zeros(2, 2 * width + 1, z, dtype=F64)
    for k in range(2 * width + 1):
        for i in range(z):
            j = i + k - width
            if 0 <= j < z:
                ref[k, i] = (alpha[..., i] * w[..., j]).sum()
                ref_b[:, k, i] = (alpha[..., i] * w[..., j]).sum(0)
    torch.testing.assert_close(kernel.band_weight_grad(alpha, w, width, False, block), ref)
    torch.testing.assert_close(kernel.band_weight_grad(alpha, w, width, True, block), ref_b)


def test_khatri_rao_builds_the_step_matrices(gen):
    """``E @ (C (x) A)`` equals ``C^T diag(e) A`` token by token."""
    a = torch.rand(Z, 3, dtype=F64, generator=gen)
    c = torch.rand(Z, 3, dtype=F64, generator=gen)
    e = torch.rand(7, Z, dtype=F64, generator=gen)
    m = (e @ _rank_space.khatri_rao(c, a)).reshape(7, 3, 3)
    for i in range(7):
        torch.testing.assert_close(m[i], c.T @ torch.diag(e[i]) @ a)


# ---- inference path == gradient path ---------------------------------------------------------
@pytest.mark.parametrize("batch", [None, B], ids=["shared", "batched"])
@pytest.mark.parametrize("kind", KINDS)
def test_inference_path_equals_gradient_path_bit_for_bit(gen, kind, batch):
    f0 = random_factor(kind, Z, batch=batch, rank=2, width=1, generator=gen)
    em = torch.randn(B, T, Z, dtype=F64, generator=gen)
    init = torch.randn(Z, dtype=F64, generator=gen)
    f, params = leaves(f0)
    with_grad = HMM(init, f, em.requires_grad_(True), LENGTHS).log_partition
    assert with_grad.requires_grad
    with torch.no_grad():
        no_grad = HMM(init, f, em, LENGTHS).log_partition
    with torch.inference_mode():
        inference = HMM(init, f, em, LENGTHS).log_partition
    plain = HMM(init, f0, em.detach(), LENGTHS).log_partition  # nothing requires grad
    for x in (no_grad, inference, plain):
        assert not x.requires_grad
        assert torch.equal(x, with_grad.detach())
    if kind == "lowrank":
        r_grad = RankSpaceHMM(init, f, em, LENGTHS).log_partition
        with torch.no_grad():
            r_no = RankSpaceHMM(init, f, em, LENGTHS).log_partition
        assert torch.equal(r_no, r_grad.detach())
        torch.testing.assert_close(r_no, no_grad, rtol=1e-12, atol=1e-12)


def test_inference_path_does_not_run_the_autograd_function(gen, monkeypatch):
    """Under no_grad, or when nothing requires grad, no custom Function runs (nothing saved),
    even if the factor's parameters require grad."""

    def boom(*args):
        raise AssertionError("the autograd Function ran on the inference path")

    monkeypatch.setattr(kernel.ScaledChain, "apply", boom)
    monkeypatch.setattr(_rank_space.RankSpaceChain, "apply", boom)
    f, _ = leaves(random_factor("lowrank+banded", Z, generator=gen))
    em = torch.randn(B, T, Z, dtype=F64, generator=gen)
    with torch.no_grad():
        assert HMM(torch.zeros(Z, dtype=F64), f, em, LENGTHS).log_partition.shape == (B,)
    fl, _ = leaves(random_factor("lowrank", Z, generator=gen))
    with torch.no_grad():
        assert RankSpaceHMM(torch.zeros(Z, dtype=F64), fl, em, LENGTHS).log_partition.shape == (B,)
    dense = random_factor("dense", Z, generator=gen)
    assert HMM(torch.zeros(Z, dtype=F64), dense, em).log_partition.shape == (B,)
    with pytest.raises(AssertionError, match="autograd Function ran"):
        _ = HMM(torch.zeros(Z, dtype=F64), f, em).log_partition  # sanity: grad mode uses it


def test_normalizer_computed_once(gen, monkeypatch):
    """Each row/column normalization runs once per HMM (the dead-row check reuses it), and
    the probabilities come from the same exponential (LowRank: columns then rows)."""
    import lorank.factors as factors

    calls = []
    orig = factors._softmax_parts

    def counting(x, dim):
        calls.append(tuple(x.shape))
        return orig(x, dim)

    monkeypatch.setattr(factors, "_softmax_parts", counting)
    for name in ("log_normalizer", "_column_lse"):
        monkeypatch.setattr(LowRank, name, lambda self: pytest.fail("recomputed"))
    f = LowRank(*(torch.randn(Z, 2, dtype=F64, generator=gen) for _ in range(2)))
    em = torch.randn(B, T, Z, dtype=F64, generator=gen)
    for hmm in (HMM, RankSpaceHMM):
        calls.clear()
        assert hmm(torch.zeros(Z, dtype=F64), f, em, LENGTHS).log_partition.shape == (B,)
        assert calls == [(Z, 2), (Z, 2)], hmm
    calls.clear()
    band = f + Banded(torch.zeros(Z, 3, dtype=F64), 1)
    assert HMM(torch.zeros(Z, dtype=F64), band, em).log_partition.shape == (B,)
    assert calls == [(Z, 2), (Z, 2), (Z, 3)]


# ---- band and rank space against dense oracles beyond brute force ----------------------------
def _grads(make_hmm, params, em):
    lz = make_hmm().log_partition
    w = torch.linspace(0.5, 1.5, lz.shape[0], dtype=F64)
    return [lz, *torch.autograd.grad((lz * w).sum(), [em, *params])]


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("batched", [False, True])
def test_band_chain_equals_dense_factor(gen, width, batched):
    """LowRank + Banded through the band kernel vs the same P as a Dense factor (the dense
    potentials built from the definitions with autograd): values and every gradient."""
    b, t, z = 4, 9, 37  # one 32-state block of the band's weight-gradient GEMM, and a tail
    lengths = torch.tensor([9, 4, 1, 7])
    f0 = random_factor("lowrank+banded", z, batch=b if batched else None, rank=3, width=width,
                       generator=gen)
    em0 = torch.randn(b, t, z, dtype=F64, generator=gen) * 2
    init = torch.randn(z, dtype=F64, generator=gen)
    out = []
    for dense in (False, True):
        f, params = leaves(f0)
        em = em0.clone().requires_grad_(True)
        fac = Dense(reference_log_potentials(f, differentiable=True)) if dense else f
        out.append(_grads(lambda fac=fac, em=em: HMM(init, fac, em, lengths), params, em))
    for a, ref in zip(*out, strict=True):
        torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1 << 24, 50], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("batched", [False, True])
def test_rank_space_equals_state_space(gen, batched, chunk):
    b, t, z, r = 3, 8, 11, 4
    lengths = torch.tensor([8, 5, 2])
    f0 = random_factor("lowrank", z, batch=b if batched else None, rank=r, generator=gen)
    em0 = torch.randn(b, t, z, dtype=F64, generator=gen) * 2
    em0[0, 3, :5] = -math.inf
    init0 = torch.randn(z, dtype=F64, generator=gen)
    out = []
    for cls in (HMM, RankSpaceHMM):
        f, params = leaves(f0)
        em = em0.clone().requires_grad_(True)
        init = init0.clone().requires_grad_(True)
        kw = {"max_chunk_elements": chunk} if cls is RankSpaceHMM else {}
        out.append(_grads(lambda f=f, em=em, init=init, cls=cls, kw=kw:
                          cls(init, f, em, lengths, **kw), [init, *params], em))
    for a, ref in zip(*out, strict=True):
        torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["lowrank+banded", "rank_space"])
def test_padded_equals_unpadded_and_batch_equals_loop(gen, kind):
    b, t, z = 3, 7, 9
    lengths = torch.tensor([7, 4, 2])
    f = random_factor("lowrank+banded" if kind != "rank_space" else "lowrank", z, rank=3,
                      width=2, generator=gen)
    em = torch.randn(b, t, z, dtype=F64, generator=gen)
    init = torch.randn(z, dtype=F64, generator=gen)
    cls = RankSpaceHMM if kind == "rank_space" else HMM
    h = cls(init, f, em, lengths)
    for i in range(b):
        n = int(lengths[i])
        alone = cls(init, f, em[i : i + 1, :n])
        torch.testing.assert_close(alone.log_partition, h.log_partition[i : i + 1])
        torch.testing.assert_close(alone.marginals[0], h.marginals[i, :n])
        assert h.marginals[i, n:].eq(0).all()


def test_plain_lowrank_scales_from_the_rank_message_are_exact_for_any_positive_factors(gen):
    """The plain LowRank loop takes each step's scale from the rank message (sum(ah @ A),
    which is sum(ah) only when A's rows sum to one): value and gradient must still be those
    of the unscaled chain when they do not (every positive scale is exact)."""
    b, t, z, r = 2, 6, 5, 3
    a = torch.rand(z, r, dtype=F64, generator=gen) + 0.1  # rows sum to anything
    ct = torch.rand(r, z, dtype=F64, generator=gen) + 0.1
    pi = torch.rand(b, z, dtype=F64, generator=gen)
    em = torch.randn(b, t, z, dtype=F64, generator=gen)
    k = kernel.emission_shift(em, None)
    leaves_ = [x.clone().requires_grad_(True) for x in (pi, em, a, ct)]
    got = kernel.ScaledChain.apply(leaves_[0], leaves_[1], k, None, ((2,), ()), *leaves_[2:])
    # the unscaled forward algorithm, in plain autograd ops
    ref_in = [x.clone().requires_grad_(True) for x in (pi, em, a, ct)]
    alpha = ref_in[0] * ref_in[1][:, 0].exp()
    for s in range(1, t):
        alpha = (alpha @ ref_in[2] @ ref_in[3]) * ref_in[1][:, s].exp()
    ref = alpha.sum(-1).log()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    ref.sum().backward()
    for x, y in zip(leaves_, ref_in, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)


# ---- float32 underflow ------------------------------------------------------------------------
def test_float32_underflowing_scales_use_reachable_shifts():
    """Only state 0 is reachable (a diagonal band, init on state 0) while every step's best
    emission is state 1's, 100 nats higher: the global-max shift underflows (e^-100) and the
    reachable-state shift gives the exact log Z = -100 T; gradients via the log-space pass."""
    z, t = 3, 6
    band = torch.zeros(z, 1)
    init = torch.tensor([0.0, -200.0, -200.0])
    em = torch.zeros(2, t, z)
    em[:, :, 0] = -100.0
    em.requires_grad_(True)
    h = HMM(init, Banded(band, 0), em)
    torch.testing.assert_close(h.log_partition.detach(), torch.full((2,), -100.0 * t))
    with torch.no_grad():
        torch.testing.assert_close(HMM(init, Banded(band, 0), em).log_partition,
                                   torch.full((2,), -100.0 * t))
    marg = h.marginals
    assert torch.isfinite(marg).all() and not marg.requires_grad
    torch.testing.assert_close(marg[..., 0], torch.ones(2, t))
    (g,) = torch.autograd.grad(h.log_partition.sum(), em)
    torch.testing.assert_close(g, marg)


def test_float32_rank_space_underflow_falls_back(gen):
    z = 4
    left = torch.zeros(z, 2)
    right = torch.tensor([[0.0, 0.0], [-200.0, -200.0], [0.0, 0.0], [0.0, 0.0]])
    em = torch.zeros(1, 5, z)
    em[:, :, 1] = 100.0  # the best emission sits on a state no transition reaches (P ~ e^-200)
    init = torch.tensor([0.0, -300.0, 0.0, 0.0])
    ref = HMM(init.double(), LowRank(left.double(), right.double()), em.double()).log_partition
    for grad in (False, True):
        e = em.clone().requires_grad_(grad)
        r = RankSpaceHMM(init, LowRank(left, right), e)
        torch.testing.assert_close(r.log_partition.detach().double(), ref, rtol=1e-5, atol=1e-4)
        assert torch.isfinite(r.marginals).all()


# ---- scratch buffers and checks ----------------------------------------------------------------
def test_workspace_reuses_buffers_but_never_shares_them(monkeypatch):
    like = torch.zeros(1, dtype=F64)
    with kernel.workspace("test", (3, 4), like) as a:
        a.fill_(1.0)
        with kernel.workspace("test", (3, 4), like) as nested:  # in use: a fresh buffer
            assert nested.data_ptr() != a.data_ptr()
        ptr = a.data_ptr()
    with kernel.workspace("test", (2, 5), like) as b:  # the same memory, any shape that fits
        assert b.data_ptr() == ptr and b.shape == (2, 5)
    monkeypatch.setattr(kernel, "WORKSPACE_MAX_BYTES", 8 * 11)
    with kernel.workspace("test", (3, 4), like) as big:  # over the cap: fresh, not kept
        assert big.data_ptr() != ptr
    with kernel.workspace("test", (2, 5), like) as c:
        assert c.data_ptr() == ptr


def test_inference_mode_and_no_grad_calls_mix(gen):
    """Regression: a scratch buffer made under inference_mode was reused outside it
    ("Inplace update to inference tensor outside InferenceMode")."""
    f = random_factor("lowrank+banded", Z, generator=gen)
    em = torch.randn(B, T, Z, dtype=F64, generator=gen)
    outs = []
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode, torch.enable_grad):
        with mode():
            e = em.clone().requires_grad_(mode is torch.enable_grad)
            h = HMM(torch.zeros(Z, dtype=F64), f, e, LENGTHS)
            outs.append(h.log_partition.detach().clone())
            if mode is torch.enable_grad:
                h.log_partition.sum().backward()
            fl = random_factor("lowrank", Z, generator=torch.Generator().manual_seed(1))
            r = RankSpaceHMM(torch.zeros(Z, dtype=F64), fl, em, LENGTHS).log_partition
            assert torch.isfinite(r).all()
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_all_finite():
    assert kernel.all_finite([torch.ones(3), None, torch.zeros(2, 2)])
    assert kernel.all_finite([])
    for bad in (math.inf, -math.inf, math.nan):
        assert not kernel.all_finite([torch.ones(3), torch.tensor([1.0, bad])])
