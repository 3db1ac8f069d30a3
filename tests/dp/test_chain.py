"""Chain dynamic programs (``lorank.dp.chain``) against brute-force enumeration in float64."""

from __future__ import annotations

import math

import pytest
import torch
from brute import (
    F64,
    FACTOR_KINDS,
    PROPERTY,
    brute_hmm,
    enumerate_paths,
    factor_tensors,
    leaves,
    random_factor,
    reference_log_transition,
)
from hypothesis import given
from hypothesis import strategies as st

from lorank import LowRank
from lorank.dp import chain
from lorank.semiring import EntropySemiring, LogSemiring, MaxSemiring

NEG = -math.inf
B, T, Z = 3, 5, 3
LENGTHS = torch.tensor([5, 3, 1])


def _problem(gen, kind="lowrank", batch=None, neg_inf=True, z=Z, t=T, b=B, rank=2):
    f = random_factor(kind, z, batch=batch, rank=rank, width=1, generator=gen)
    init_logp = torch.randn(b, z, dtype=F64, generator=gen).log_softmax(-1)
    em = torch.randn(b, t, z, dtype=F64, generator=gen)
    if neg_inf:
        em[0, 1, 0] = NEG  # an impossible state at one step
        em[0, 3, 1:] = NEG  # only state 0 allowed at another
        em[1, 4] = NEG  # garbage in the padding of example 1 (length 3)
    return init_logp, f, em


def _ref(init_logp, f, em, lengths):
    return brute_hmm(init_logp, reference_log_transition(f), em, lengths)


def _cases():
    for kind in FACTOR_KINDS:
        for batch in (None, B):
            yield kind, batch, False
    yield "mixed", B, False
    yield "lowrank", None, True
    yield "lowrank", B, True


CASES = list(_cases())
IDS = [f"{k}-{'batched' if b else 'shared'}{'-light' if m else ''}" for k, b, m in CASES]


# ---- sum-product --------------------------------------------------------------------------
@pytest.mark.parametrize("kind,batch,light", CASES, ids=IDS)
def test_log_partition_and_marginals_match_brute_force(gen, kind, batch, light):
    init_logp, f, em = _problem(gen, kind, batch)
    ref = _ref(init_logp, f, em, LENGTHS)
    em = em.requires_grad_(True)
    lz = chain.log_partition(init_logp, f, em, LENGTHS, memory_light=light)
    torch.testing.assert_close(lz, ref.log_partition)
    (marg,) = torch.autograd.grad(lz.sum(), em)
    mask = (torch.arange(T) < LENGTHS.unsqueeze(1)).unsqueeze(-1)
    torch.testing.assert_close(marg * mask, ref.marginals)
    assert marg[~mask.expand_as(marg)].eq(0).all()  # padding gets no gradient


@pytest.mark.parametrize("kind,batch,light", CASES, ids=IDS)
def test_parameter_gradients_match_brute_force(gen, kind, batch, light):
    init, f0, em = _problem(gen, kind, batch)
    f, params = leaves(f0)
    init = init.clone().requires_grad_(True)
    em = em.clone().requires_grad_(True)
    w = torch.randn(B, dtype=F64, generator=gen)
    lz = chain.log_partition(init.log_softmax(-1), f, em, LENGTHS, memory_light=light)
    ours = torch.autograd.grad((lz * w).sum(), [init, em, *params])
    ref_lz = brute_hmm(
        init.log_softmax(-1), reference_log_transition(f, differentiable=True), em, LENGTHS
    ).log_partition
    ref = torch.autograd.grad((ref_lz * w).sum(), [init, em, *params])
    for name, a, b in zip(["init", "emission", "p0", "p1", "p2"], ours, ref, strict=False):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, msg=name)


def test_generic_loop_equals_scaled_chain(gen):
    """A LowRank inside a one-part Sum takes the generic loop; same value and gradients."""
    from lorank import Sum

    init, f0, em = _problem(gen, "lowrank", B)
    f, params = leaves(f0)
    em = em.requires_grad_(True)
    out = []
    for fac in (f, Sum([f])):
        lz = chain.log_partition(init, fac, em, LENGTHS)
        out.append((lz, *torch.autograd.grad(lz.sum(), [em, *params])))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b)


def test_impossible_sequences_give_neg_inf_and_zero_gradients(gen):
    for kind, batch, light in CASES:
        init, f0, em = _problem(gen, kind, batch)
        f, params = leaves(f0)
        em[2, 0] = NEG  # example 2 (length 1) is impossible
        em[0, 2] = NEG  # example 0 is impossible at step 2
        em = em.requires_grad_(True)
        lz = chain.log_partition(init, f, em, LENGTHS, memory_light=light)
        assert lz[0] == NEG and lz[2] == NEG and torch.isfinite(lz[1]), (kind, batch, light)
        # gradients are finite (log Z = -inf has no meaningful gradient: the steps before the
        # impossible one still contribute their filtered posteriors, the rest gives zeros)
        grads = torch.autograd.grad(lz[1] + lz.sum(), [em, *params])
        for g in grads:
            assert torch.isfinite(g).all(), (kind, batch, light)
        assert grads[0][0, 2:].eq(0).all() and grads[0][2].eq(0).all()


# ---- memory-light custom autograd ---------------------------------------------------------
@pytest.mark.parametrize("batched", [False, True])
def test_lowrank_forward_gradcheck(gen, batched):
    lead = (B,) if batched else ()
    f = LowRank(
        torch.randn(*lead, Z, 2, dtype=F64, generator=gen),
        torch.randn(*lead, Z, 2, dtype=F64, generator=gen),
    )
    a, c = f.stochastic_factors()
    em = torch.randn(B, T, Z, dtype=F64, generator=gen)
    e, _ = chain._scaled_emission(em, LENGTHS)  # padded steps are exactly 1
    pi = torch.randn(B, Z, dtype=F64, generator=gen).softmax(-1)
    inputs = [x.detach().clone().requires_grad_(True) for x in (pi, a, c, e)]
    assert torch.autograd.gradcheck(chain._LowRankForward.apply, inputs)


@pytest.mark.parametrize("batched", [False, True])
def test_memory_light_gradcheck_end_to_end_with_padding(gen, batched):
    lead = (B,) if batched else ()
    left = torch.randn(*lead, Z, 2, dtype=F64, generator=gen, requires_grad=True)
    right = torch.randn(*lead, Z, 2, dtype=F64, generator=gen, requires_grad=True)
    init = torch.randn(Z, dtype=F64, generator=gen, requires_grad=True)
    em = torch.randn(B, T, Z, dtype=F64, generator=gen)
    em[0, 2, 1] = NEG
    em.requires_grad_(True)

    def fn(init, left, right, em):
        return chain.log_partition(
            init.log_softmax(-1).expand(B, Z), LowRank(left, right), em, LENGTHS, True
        )

    assert torch.autograd.gradcheck(fn, (init, left, right, em))


@pytest.mark.parametrize("batched", [False, True])
def test_memory_light_gradients_equal_default(gen, batched):
    init0, f0, em0 = _problem(gen, "lowrank", B if batched else None)
    w = torch.randn(B, dtype=F64, generator=gen)
    grads = []
    for light in (False, True):
        f, params = leaves(f0)
        init = init0.clone().requires_grad_(True)
        em = em0.clone().requires_grad_(True)
        lz = chain.log_partition(init, f, em, LENGTHS, memory_light=light)
        grads.append([lz, *torch.autograd.grad((lz * w).sum(), [f.left, f.right, init, em])])
    for name, a, b in zip(["value", "left", "right", "init", "emission"], *grads, strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_memory_light_requires_lowrank(gen):
    init, f, em = _problem(gen, "dense")
    with pytest.raises(
        TypeError, match="memory_light needs a LowRank transition factor, got Dense"
    ):
        chain.log_partition(init, f, em, LENGTHS, memory_light=True)


@pytest.mark.parametrize("light", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_second_derivatives_are_correct(gen, light, batched):
    """Regression: the hand-written backward passes are not differentiable, and
    ``once_differentiable`` silently dropped the second-order terms (create_graph=True gave
    wrong Hessian-vector products).  They now fall back to autograd for higher derivatives."""
    lead = (B,) if batched else ()
    left = torch.randn(*lead, Z, 2, dtype=F64, generator=gen, requires_grad=True)
    right = torch.randn(*lead, Z, 2, dtype=F64, generator=gen, requires_grad=True)
    init = torch.randn(Z, dtype=F64, generator=gen, requires_grad=True)
    em = torch.randn(B, T, Z, dtype=F64, generator=gen, requires_grad=True)

    def fn(init, left, right, em):
        return chain.log_partition(
            init.log_softmax(-1).expand(B, Z), LowRank(left, right), em, LENGTHS, light
        )

    assert torch.autograd.gradgradcheck(fn, (init, left, right, em))
    # and against brute force: d/d(em) of sum(marginals**2)
    em2 = em.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(init, left, right, em2).sum(), em2, create_graph=True)
    (h,) = torch.autograd.grad(g.pow(2).sum(), em2)
    em3 = em.detach().clone().requires_grad_(True)
    f = LowRank(left.detach(), right.detach())
    ref_lz = brute_hmm(init.detach().log_softmax(-1), reference_log_transition(f), em3, LENGTHS)
    (g3,) = torch.autograd.grad(ref_lz.log_partition.sum(), em3, create_graph=True)
    (h3,) = torch.autograd.grad(g3.pow(2).sum(), em3)
    torch.testing.assert_close(h, h3)


# ---- other semirings, Viterbi, scores -----------------------------------------------------
@pytest.mark.parametrize("kind,batch", [(k, b) for k, b, m in CASES if not m])
def test_semiring_forward_matches_brute_force(gen, kind, batch):
    init, f, em = _problem(gen, kind, batch)
    ref = _ref(init, f, em, LENGTHS)
    lp = f.log_probs()
    torch.testing.assert_close(
        chain.semiring_forward(init, lp, em, LENGTHS, LogSemiring), ref.log_partition
    )
    torch.testing.assert_close(
        chain.semiring_forward(init, lp, em, LENGTHS, MaxSemiring), ref.max_score
    )
    torch.testing.assert_close(
        chain.semiring_forward(init, lp, em, LENGTHS, EntropySemiring), ref.entropy
    )


@pytest.mark.parametrize("kind,batch", [(k, b) for k, b, m in CASES if not m])
def test_viterbi_matches_brute_force(gen, kind, batch):
    init, f, em = _problem(gen, kind, batch)
    ref = _ref(init, f, em, LENGTHS)
    for chunk in (1 << 24, 1):  # one chunk, and one target state per chunk
        score, path = chain.viterbi(init, f.log_probs(), em, LENGTHS, max_chunk_elements=chunk)
        torch.testing.assert_close(score, ref.max_score)
        assert torch.equal(path, ref.argmax)
        torch.testing.assert_close(chain.path_score(init, f, em, LENGTHS, path), ref.max_score)


@pytest.mark.parametrize("kind,batch", [(k, b) for k, b, m in CASES if not m])
def test_path_score_of_every_path(gen, kind, batch):
    init, f, em = _problem(gen, kind, batch)
    ref = _ref(init, f, em, LENGTHS)
    n = Z**T
    paths = torch.full((n, B, T), -1, dtype=torch.long)  # padding positions: -1
    for b in range(B):
        length = int(LENGTHS[b])
        paths[:, b, :length] = ref.paths[b].repeat(n // len(ref.paths[b]), 1)
    got = chain.path_score(init, f, em, LENGTHS, paths)  # (n, B)
    assert not got.isnan().any()  # regression: -inf emissions in the padding gave NaN
    for b in range(B):
        k = len(ref.paths[b])
        want = ref.joint[b]
        fin = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got[:k, b]), fin)
        torch.testing.assert_close(got[:k, b][fin], want[fin])


def test_forward_log_messages_match_brute_force(gen):
    for kind in FACTOR_KINDS:
        init, f, em = _problem(gen, kind, B)
        msgs = chain.forward_log_messages(init, f, em)
        lp = reference_log_transition(f)
        for b in range(B):
            for t in range(T):
                paths = enumerate_paths(t + 1, Z)
                score = init[b, paths[:, 0]] + em[b, 0, paths[:, 0]]
                for s in range(1, t + 1):
                    score = score + lp[b, paths[:, s - 1], paths[:, s]] + em[b, s, paths[:, s]]
                want = torch.stack([torch.logsumexp(score[paths[:, -1] == j], 0) for j in range(Z)])
                fin = torch.isfinite(want)
                assert torch.equal(torch.isfinite(msgs[b, t]), fin), (kind, b, t)
                torch.testing.assert_close(msgs[b, t][fin], want[fin])


# ---- rank space ---------------------------------------------------------------------------
@pytest.mark.parametrize("batched", [False, True])
def test_rank_space_log_partition(gen, batched):
    init, f, em = _problem(gen, "lowrank", B if batched else None, rank=4)
    ref = _ref(init, f, em, LENGTHS)
    for chunk in (1 << 24, 1, 40):
        em_g = em.clone().requires_grad_(True)
        lz = chain.rank_space_log_partition(init, f, em_g, LENGTHS, max_chunk_elements=chunk)
        torch.testing.assert_close(lz, ref.log_partition)
        (marg,) = torch.autograd.grad(lz.sum(), em_g)
        mask = (torch.arange(T) < LENGTHS.unsqueeze(1)).unsqueeze(-1)
        torch.testing.assert_close(marg * mask, ref.marginals)


# ---- sampling -----------------------------------------------------------------------------
def _binomial_tol(p: torch.Tensor, n: int, sigmas: float = 5.0) -> torch.Tensor:
    """``sigmas`` binomial standard errors of a frequency over n draws (plus 2/n for p ~ 0)."""
    p = p.clamp(0.0, 1.0)  # a marginal of 1 + 1e-16 must not give a NaN tolerance
    return sigmas * torch.sqrt(p * (1 - p) / n) + 2.0 / n


@pytest.mark.parametrize("kind,batch", [("lowrank", None), ("lowrank+banded", B), ("dense", B)])
def test_sample_frequencies_converge_to_marginals(kind, batch):
    gen = torch.Generator().manual_seed(7)
    init, f, em = _problem(gen, kind, batch)
    ref = _ref(init, f, em, LENGTHS)
    n = 20000
    s = chain.sample(init, f, em, LENGTHS, n, generator=torch.Generator().manual_seed(8))
    assert s.shape == (n, B, T)
    mask = torch.arange(T) < LENGTHS.unsqueeze(1)
    assert s[:, ~mask].eq(-1).all()
    assert s[:, mask].ge(0).all() and s[:, mask].lt(Z).all()
    freq = torch.nn.functional.one_hot(s.clamp_min(0), Z).to(F64).mean(0) * mask.unsqueeze(-1)
    err = (freq - ref.marginals).abs()
    ok = err <= _binomial_tol(ref.marginals, n)  # False on NaN
    assert ok.all(), (freq[~ok], ref.marginals[~ok])
    # states impossible under the posterior are never drawn
    impossible = (ref.marginals == 0) & mask.unsqueeze(-1)
    assert freq[impossible].eq(0).all()


def test_sample_path_distribution_matches_brute_force():
    gen = torch.Generator().manual_seed(11)
    b, t, z = 2, 3, 2
    lengths = torch.tensor([3, 2])
    init, f, em = _problem(gen, "lowrank+banded", None, neg_inf=False, z=z, t=t, b=b)
    ref = _ref(init, f, em, lengths)
    n = 20000
    s = chain.sample(init, f, em, lengths, n, generator=torch.Generator().manual_seed(12))
    for i in range(b):
        length = int(lengths[i])
        codes = (s[:, i, :length] * (z ** torch.arange(length - 1, -1, -1))).sum(-1)
        counts = torch.bincount(codes, minlength=z**length).to(F64) / n
        # enumerate_paths lists paths in the same lexicographic (base-z) order
        p = ref.posterior[i]
        assert ((counts - p).abs() <= _binomial_tol(p, n)).all(), (counts, p)


def test_sample_is_reproducible_with_a_generator(gen):
    init, f, em = _problem(gen)
    s1 = chain.sample(init, f, em, LENGTHS, 5, generator=torch.Generator().manual_seed(3))
    s2 = chain.sample(init, f, em, LENGTHS, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2)


# ---- properties ---------------------------------------------------------------------------
@PROPERTY
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 5),
    z=st.integers(1, 3),
    kind=st.sampled_from(FACTOR_KINDS),
    batched=st.booleans(),
    light=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_property_log_partition_marginals_no_mutation(b, t, z, kind, batched, light, seed, data):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(data.draw(st.lists(st.integers(1, t), min_size=b, max_size=b)))
    light = light and kind == "lowrank"
    f = random_factor(kind, z, batch=b if batched else None, rank=2, width=1, generator=gen)
    init = torch.randn(b, z, dtype=F64, generator=gen).log_softmax(-1)
    em = torch.randn(b, t, z, dtype=F64, generator=gen) * 2
    if data.draw(st.booleans()) and z > 1:
        em[0, t - 1, 0] = NEG
    saved = [x.clone() for x in (init, em, lengths, *factor_tensors(f))]
    ref = _ref(init, f, em, lengths)
    em_g = em.clone().requires_grad_(True)
    lz = chain.log_partition(init, f, em_g, lengths, memory_light=light)
    torch.testing.assert_close(lz, ref.log_partition)
    (marg,) = torch.autograd.grad(lz.sum(), em_g)
    mask = torch.arange(t) < lengths.unsqueeze(1)
    sums = marg.sum(-1)
    torch.testing.assert_close(sums[mask], torch.ones_like(sums[mask]))
    assert sums[~mask].eq(0).all()
    torch.testing.assert_close(marg, ref.marginals)
    # the caller's tensors are untouched
    for x, x0 in zip((init, em, lengths, *factor_tensors(f)), saved, strict=True):
        assert torch.equal(x, x0)


def test_pad_emission_returns_a_copy(gen):
    em = torch.randn(B, T, Z, dtype=F64, generator=gen)
    em0 = em.clone()
    out = chain.pad_emission(em, LENGTHS)
    assert torch.equal(em, em0)
    assert out[1, 3:].eq(0).all() and out[2, 1:].eq(0).all()
    assert torch.equal(out[0], em[0])
