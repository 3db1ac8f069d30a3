"""``HMM`` and ``RankSpaceHMM`` against brute-force enumeration of all state paths (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from brute import (
    F64,
    FACTOR_KINDS,
    PROPERTY,
    brute_hmm,
    factor_tensors,
    leaves,
    random_factor,
    rebuild,
    reference_log_transition,
)
from hypothesis import given
from hypothesis import strategies as st

import lorank
from lorank import HMM, Banded, Dense, LowRank, RankSpaceHMM

NEG = -math.inf
B, T, Z = 3, 5, 3
LENGTHS = torch.tensor([5, 3, 1])


def _inputs(gen, kind="lowrank", batch=None, per_example_init=False, neg_inf=True, rank=2):
    f = random_factor(kind, Z, batch=batch, rank=rank, width=1, generator=gen)
    init = torch.randn(*((B,) if per_example_init else ()), Z, dtype=F64, generator=gen)
    em = torch.randn(B, T, Z, dtype=F64, generator=gen)
    if neg_inf:
        em[0, 1, 2] = NEG  # an impossible state at one step
        em[0, 3, :2] = NEG  # a single allowed state at another
        em[1, 3:] = NEG  # garbage in the padding
        em[2, 1:, 0] = 1e4
    return init, f, em


def _brute(h: HMM):
    return brute_hmm(h.init_logp, reference_log_transition(h.transition), h.emission, h.lengths)


def _cases():
    for kind in FACTOR_KINDS:
        for batch in (None, B):
            yield kind, batch, False
    yield "mixed", B, False
    yield "lowrank", None, True
    yield "lowrank", B, True


CASES = list(_cases())
IDS = [f"{k}-{'batched' if b else 'shared'}{'-light' if m else ''}" for k, b, m in CASES]


def _assert_close_finite(a, b, **kw):
    assert torch.equal(torch.isfinite(a), torch.isfinite(b)), (a, b)
    fin = torch.isfinite(b)
    torch.testing.assert_close(a[fin], b[fin], **kw)


# ---- every query against enumeration ------------------------------------------------------
@pytest.mark.parametrize("per_example_init", [False, True])
@pytest.mark.parametrize("kind,batch,light", CASES, ids=IDS)
def test_queries_match_brute_force(gen, kind, batch, light, per_example_init):
    init, f, em = _inputs(gen, kind, batch, per_example_init)
    h = HMM(init, f, em, LENGTHS, memory_light=light)
    ref = _brute(h)
    torch.testing.assert_close(h.init_logp, init.log_softmax(-1).expand(B, Z))
    torch.testing.assert_close(h.log_partition, ref.log_partition)
    torch.testing.assert_close(h.marginals, ref.marginals)
    assert torch.equal(h.argmax, ref.argmax)
    torch.testing.assert_close(h.max_score, ref.max_score)
    torch.testing.assert_close(h.entropy(), ref.entropy)
    torch.testing.assert_close(h.score(h.argmax), ref.max_score)
    # score and log_prob of every path of every example (padding filled with -1)
    n = Z ** int(LENGTHS.max())
    paths = torch.full((n, B, T), -1, dtype=torch.long)
    for b in range(B):
        k = len(ref.paths[b])
        paths[:, b, : int(LENGTHS[b])] = ref.paths[b].repeat(n // k, 1)
    score = h.score(paths)
    logp = h.log_prob(paths)
    assert score.shape == logp.shape == (n, B)
    for b in range(B):
        k = len(ref.paths[b])
        _assert_close_finite(score[:k, b], ref.joint[b])
        torch.testing.assert_close(logp[:k, b].exp(), ref.posterior[b])
        torch.testing.assert_close(torch.logsumexp(logp[:k, b], 0), torch.zeros((), dtype=F64))


def test_mask_repr_and_shapes(gen):
    init, f, em = _inputs(gen)
    h = HMM(init, f, em, LENGTHS)
    assert torch.equal(h.mask, torch.arange(T) < LENGTHS.unsqueeze(1))
    assert h.batch_size == B and h.max_length == T and h.num_states == Z
    assert "HMM(batch=3, T=5, states=3" in repr(h) and "LowRank" in repr(h)
    assert h.marginals.shape == (B, T, Z) and h.argmax.shape == (B, T)
    assert torch.equal(HMM(init, f, em).lengths, torch.full((B,), T))
    assert torch.equal(HMM(init, f, em, [5, 3, 1]).lengths, LENGTHS)  # a list is accepted


@pytest.mark.parametrize("kind", FACTOR_KINDS)
def test_entropy_gradients_match_brute_force_without_nan(gen, kind):
    """Regression: the entropy semiring's ``where`` gave NaN gradients wherever a weight was 0
    (every Banded factor, any -inf emission)."""
    init, f0, em = _inputs(gen, kind, B)
    f, params = leaves(f0)
    em = em.requires_grad_(True)
    h = HMM(init, f, em, LENGTHS)
    w = torch.randn(B, dtype=F64, generator=gen)
    ours = torch.autograd.grad((h.entropy() * w).sum(), [em, *params])
    ref_h = brute_hmm(
        h.init_logp, reference_log_transition(f, differentiable=True), em, LENGTHS
    ).entropy
    ref = torch.autograd.grad((ref_h * w).sum(), [em, *params])
    for a, b in zip(ours, ref, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


# ---- batched vs loop, padded vs unpadded --------------------------------------------------
def _example(f, b):
    """The factor of example ``b`` alone (a shared factor is returned as is)."""
    if not len(f.batch_shape):
        return f
    return rebuild(f, lambda t: t[b : b + 1] if t.dim() == 3 else t)


@pytest.mark.parametrize("kind,batch,light", CASES, ids=IDS)
def test_batch_equals_per_example_loop_and_padding_equals_true_length(gen, kind, batch, light):
    init, f, em = _inputs(gen, kind, batch, per_example_init=True)
    h = HMM(init, f, em, LENGTHS, memory_light=light)
    for b in range(B):
        length = int(LENGTHS[b])
        fb = _example(f, b)
        for padded in (True, False):
            e = em[b : b + 1] if padded else em[b : b + 1, :length]
            lengths = LENGTHS[b : b + 1] if padded else None
            hb = HMM(init[b : b + 1], fb, e, lengths, memory_light=light)
            torch.testing.assert_close(hb.log_partition, h.log_partition[b : b + 1])
            torch.testing.assert_close(hb.marginals[0, :length], h.marginals[b, :length])
            torch.testing.assert_close(hb.max_score, h.max_score[b : b + 1])
            assert torch.equal(hb.argmax[0, :length], h.argmax[b, :length])
            torch.testing.assert_close(hb.entropy(), h.entropy()[b : b + 1])
            path = h.argmax[b : b + 1, : e.shape[1]]
            torch.testing.assert_close(hb.score(path), h.max_score[b : b + 1])
        assert h.marginals[b, length:].eq(0).all()
        assert h.argmax[b, length:].eq(-1).all()


@pytest.mark.parametrize("kind,batch,light", CASES, ids=IDS)
def test_padding_contents_do_not_matter(gen, kind, batch, light):
    init, f, em = _inputs(gen, kind, batch, neg_inf=False)
    em2 = em.clone()
    mask = torch.arange(T) < LENGTHS.unsqueeze(1)
    em2[~mask] = torch.where(torch.rand(em2[~mask].shape, generator=gen) < 0.5, NEG, 1e4).to(F64)
    h1 = HMM(init, f, em, LENGTHS, memory_light=light)
    h2 = HMM(init, f, em2, LENGTHS, memory_light=light)
    torch.testing.assert_close(h1.log_partition, h2.log_partition)
    torch.testing.assert_close(h1.marginals, h2.marginals)
    assert torch.equal(h1.argmax, h2.argmax)
    torch.testing.assert_close(h1.max_score, h2.max_score)
    torch.testing.assert_close(h1.entropy(), h2.entropy())
    torch.testing.assert_close(h1.score(h1.argmax), h2.score(h1.argmax))
    g = torch.Generator
    s1 = h1.sample((7,), generator=g().manual_seed(0))
    s2 = h2.sample((7,), generator=g().manual_seed(0))
    assert torch.equal(s1, s2)


# ---- -inf emissions -----------------------------------------------------------------------
@pytest.mark.parametrize("kind,batch,light", CASES, ids=IDS)
def test_neg_inf_emissions_give_no_nan(gen, kind, batch, light):
    init, f0, em = _inputs(gen, kind, batch)
    em[2, 0] = NEG  # example 2 is impossible
    f, params = leaves(f0)
    em = em.requires_grad_(True)
    h = HMM(init, f, em, LENGTHS, memory_light=light)
    lz = h.log_partition
    assert lz[2] == NEG and torch.isfinite(lz[:2]).all()
    for name, x in [
        ("marginals", h.marginals),
        ("entropy", h.entropy()),
        ("max_score", h.max_score[:2]),
        ("log_prob", h.log_prob(h.argmax)[:2]),
    ]:
        assert not x.isnan().any(), name
    assert h.marginals[2].eq(0).all()
    assert h.max_score[2] == NEG
    real = h.mask[:2]
    assert h.argmax[:2][real].ge(0).all() and h.argmax[:2][real].lt(Z).all()
    assert h.argmax[2].eq(-1).all()  # the "no path" sentinel
    s = h.sample((50,), generator=torch.Generator().manual_seed(0))
    assert s[:, :2][:, real].ge(0).all() and s[:, :2][:, real].lt(Z).all()
    assert s[:, 2].eq(-1).all()
    # impossible states are never chosen
    impossible = torch.isneginf(em.detach()) & h.mask.unsqueeze(-1)
    for path in (h.argmax.unsqueeze(0), s):
        chosen = torch.nn.functional.one_hot(path[:, :2].clamp_min(0), Z).bool()
        assert not (chosen & impossible[:2]).any()
    grads = torch.autograd.grad(lz[:2].sum() + h.entropy()[:2].sum(), [em, *params])
    assert all(torch.isfinite(g).all() for g in grads)


def test_structural_zeros_in_dense_transitions(gen):
    logits = torch.randn(Z, Z, dtype=F64, generator=gen)
    logits[0, 1] = NEG
    logits[2, :2] = NEG
    init, _, em = _inputs(gen, neg_inf=False)
    h = HMM(init, Dense(logits), em, LENGTHS)
    ref = _brute(h)
    torch.testing.assert_close(h.log_partition, ref.log_partition)
    torch.testing.assert_close(h.marginals, ref.marginals)
    torch.testing.assert_close(h.entropy(), ref.entropy)
    assert torch.equal(h.argmax, ref.argmax)


# ---- rank space ---------------------------------------------------------------------------
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("rank", [1, 2, 5])
def test_rank_space_hmm_equals_hmm_and_brute_force(gen, batched, rank):
    init, f, em = _inputs(gen, "lowrank", B if batched else None, rank=rank)
    ref_h = HMM(init, f, em, LENGTHS)
    ref = _brute(ref_h)
    for chunk in (1 << 24, 1):
        r = RankSpaceHMM(init, f, em, LENGTHS, max_chunk_elements=chunk)
        assert r.rank == rank
        torch.testing.assert_close(r.log_partition, ref_h.log_partition)
        torch.testing.assert_close(r.log_partition, ref.log_partition)
        torch.testing.assert_close(r.marginals, ref_h.marginals)
        torch.testing.assert_close(r.marginals, ref.marginals)
    h = r.to_hmm()
    assert isinstance(h, HMM)
    torch.testing.assert_close(h.log_partition, ref.log_partition)
    assert torch.equal(h.argmax, ref.argmax)
    torch.testing.assert_close(h.entropy(), ref.entropy)


def test_rank_space_hmm_gradients_equal_hmm(gen):
    init0, f0, em0 = _inputs(gen, "lowrank", B)
    out = []
    for cls in (HMM, RankSpaceHMM):
        f, params = leaves(f0)
        init = init0.clone().requires_grad_(True)
        em = em0.clone().requires_grad_(True)
        lz = cls(init, f, em, LENGTHS).log_partition
        out.append(torch.autograd.grad(lz.sum(), [init, em, *params]))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b)


def test_rank_space_hmm_errors(gen):
    init, f, em = _inputs(gen, "dense")
    with pytest.raises(TypeError, match="RankSpaceHMM needs a LowRank transition, got Dense"):
        RankSpaceHMM(init, f, em)
    init, f, em = _inputs(gen, "lowrank")
    with pytest.raises(ValueError, match="max_chunk_elements must be a positive integer, got 0"):
        RankSpaceHMM(init, f, em, max_chunk_elements=0)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\]"):
        RankSpaceHMM(init, f, em, torch.tensor([6, 1, 1]))


# ---- sampling -----------------------------------------------------------------------------
def test_sample_shapes_and_padding(gen):
    init, f, em = _inputs(gen)
    h = HMM(init, f, em, LENGTHS)
    assert h.sample().shape == (B, T)
    s = h.sample((2, 3), generator=torch.Generator().manual_seed(1))
    assert s.shape == (2, 3, B, T) and s.dtype == torch.long
    assert s[..., ~h.mask].eq(-1).all()
    assert s[..., h.mask].ge(0).all() and s[..., h.mask].lt(Z).all()


@pytest.mark.parametrize("kind,batch", [("banded", None), ("lowrank", B)])
def test_sample_frequencies_converge_to_marginals(kind, batch):
    gen = torch.Generator().manual_seed(5)
    init, f, em = _inputs(gen, kind, batch)
    h = HMM(init, f, em, LENGTHS)
    n = 20000
    s = h.sample((n,), generator=torch.Generator().manual_seed(6))
    freq = torch.nn.functional.one_hot(s.clamp_min(0), Z).to(F64).mean(0)
    freq = freq * h.mask.unsqueeze(-1)
    p = h.marginals.clamp(0, 1)
    tol = 5 * torch.sqrt(p * (1 - p) / n) + 2.0 / n
    ok = (freq - p).abs() <= tol
    assert ok.all(), (freq[~ok], p[~ok])


# ---- dtypes -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", FACTOR_KINDS)
def test_float32_agrees_with_float64(gen, kind):
    init, f, em = _inputs(gen, kind, B, neg_inf=False)
    em = em.log_softmax(-1)
    h64 = HMM(init, f, em, LENGTHS)
    h32 = HMM(init.float(), rebuild(f, lambda t: t.float()), em.float(), LENGTHS)
    assert h32.log_partition.dtype == torch.float32
    torch.testing.assert_close(h32.log_partition.double(), h64.log_partition, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h32.marginals.double(), h64.marginals, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h32.entropy().double(), h64.entropy(), rtol=1e-4, atol=1e-5)
    assert torch.equal(h32.argmax, h64.argmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", FACTOR_KINDS)
def test_features_up_to_50_log_partition(gen, dtype, kind):
    """Log-features of +-50 (transition) with log-likelihood emissions: finite, accurate."""
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for _ in range(4):
        f = random_factor(kind, 6, batch=B, rank=3, width=1, generator=gen)
        for t in factor_tensors(f):
            t.copy_((torch.rand(t.shape, dtype=F64, generator=gen) * 2 - 1) * 50)
        f = rebuild(f, lambda t: t)
        init = (torch.rand(6, dtype=F64, generator=gen) * 2 - 1) * 50
        em = (torch.randn(B, T, 6, dtype=F64, generator=gen) * 3).log_softmax(-1)
        ref = brute_hmm(init.log_softmax(-1), reference_log_transition(f), em, LENGTHS)
        h = HMM(init.to(dtype), rebuild(f, lambda t: t.to(dtype)), em.to(dtype), LENGTHS)
        torch.testing.assert_close(h.log_partition.double(), ref.log_partition, **tol)
        torch.testing.assert_close(h.marginals.double(), ref.marginals, **tol)
        if kind == "lowrank":
            hl = HMM(init.to(dtype), h.transition, em.to(dtype), LENGTHS, memory_light=True)
            torch.testing.assert_close(hl.log_partition.double(), ref.log_partition, **tol)
            r = RankSpaceHMM(init.to(dtype), h.transition, em.to(dtype), LENGTHS)
            torch.testing.assert_close(r.log_partition.double(), ref.log_partition, **tol)


def test_float32_banded_with_extreme_emissions():
    """Regression (was a known limitation): float32 banded chains with +-50 band logits and
    emissions underflowed (a step's likelihood ratio below e^-87) and gave NaN marginals.
    Reachable-state shifts and the log-space backward fix it; what remains is float32's own
    limit: band probabilities below ~e^-103 are 0, which moves log Z by up to ~4e-3 here."""
    gen = torch.Generator().manual_seed(2)
    worst_lz = worst_marg = 0.0
    for _ in range(100):
        logits = (torch.rand(6, 3, generator=gen, dtype=F64) * 2 - 1) * 50
        em = (torch.rand(B, T, 6, dtype=F64, generator=gen) * 2 - 1) * 50
        h = HMM(torch.zeros(6), Banded(logits.float(), 1), em.float(), LENGTHS)
        ref = HMM(torch.zeros(6, dtype=F64), Banded(logits, 1), em, LENGTHS)
        assert torch.isfinite(h.log_partition).all() and torch.isfinite(h.marginals).all()
        worst_lz = max(worst_lz, float((h.log_partition.double() - ref.log_partition).abs().max()))
        worst_marg = max(worst_marg, float((h.marginals.double() - ref.marginals).abs().max()))
    assert worst_lz < 1e-2 and worst_marg < 1e-4, (worst_lz, worst_marg)


# ---- errors -------------------------------------------------------------------------------
def _err_cases():
    em = torch.zeros(2, 4, 3, dtype=F64)
    init = torch.zeros(3, dtype=F64)
    f = LowRank(torch.zeros(3, 2, dtype=F64), torch.zeros(3, 2, dtype=F64))
    nan = float("nan")
    return [
        (
            "emission 2d",
            lambda: HMM(init, f, em[0]),
            ValueError,
            r"emission must have 3 dimensions, got shape \(4, 3\)",
        ),
        (
            "emission NaN",
            lambda: HMM(init, f, em.clone().fill_(nan)),
            ValueError,
            r"emission \(shape \(2, 4, 3\)\) contains 24 NaN",
        ),
        (
            "emission int",
            lambda: HMM(init, f, em.long()),
            TypeError,
            r"emission must be a floating tensor, got dtype torch.int64",
        ),
        (
            "emission +inf",
            lambda: HMM(init, f, em + math.inf),
            ValueError,
            r"emission \(shape \(2, 4, 3\)\) contains \+inf",
        ),
        (
            "emission T=0",
            lambda: HMM(init, f, em[:, :0]),
            ValueError,
            r"emission must have at least one time step, got shape \(2, 0, 3\)",
        ),
        (
            "emission not a tensor",
            lambda: HMM(init, f, em.tolist()),
            TypeError,
            r"emission must be a torch.Tensor, got list",
        ),
        (
            "init states",
            lambda: HMM(torch.zeros(4, dtype=F64), f, em),
            ValueError,
            r"init must have shape \(3,\) or \(2, 3\) to match emission \(2, 4, 3\), got \(4,\)",
        ),
        (
            "init batch",
            lambda: HMM(torch.zeros(3, 3, dtype=F64), f, em),
            ValueError,
            r"init must have shape \(3,\) or \(2, 3\) .* got \(3, 3\)",
        ),
        (
            "init NaN",
            lambda: HMM(torch.full((3,), nan, dtype=F64), f, em),
            ValueError,
            r"init \(shape \(3,\)\) contains 3 NaN",
        ),
        (
            "init all -inf",
            lambda: HMM(torch.full((3,), NEG, dtype=F64), f, em),
            ValueError,
            r"init \(shape \(3,\)\) has a row that is all -inf",
        ),
        (
            "init dtype",
            lambda: HMM(init.float(), f, em),
            TypeError,
            r"init has dtype torch.float32 but emission \(2, 4, 3\) has dtype torch.float64",
        ),
        (
            "transition dtype",
            lambda: HMM(init, rebuild(f, lambda t: t.float()), em),
            TypeError,
            r"transition has dtype torch.float32 but emission \(2, 4, 3\) has dtype torch.float64",
        ),
        (
            "transition states",
            lambda: HMM(init, Dense(torch.zeros(4, 4, dtype=F64)), em),
            ValueError,
            r"transition has 4 states but emission \(2, 4, 3\) has 3",
        ),
        (
            "transition batch",
            lambda: HMM(init, Dense(torch.zeros(5, 3, 3, dtype=F64)), em),
            ValueError,
            r"batch shape \(2,\) to match emission \(2, 4, 3\), got \(5,\)",
        ),
        (
            "transition type",
            lambda: HMM(init, torch.zeros(3, 3, dtype=F64), em),
            TypeError,
            r"transition must be a lorank factor .* got Tensor",
        ),
        (
            "lengths > T",
            lambda: HMM(init, f, em, torch.tensor([5, 1])),
            ValueError,
            r"lengths must lie in \[1, 4\] .* got min 1 and max 5",
        ),
        (
            "lengths < 1",
            lambda: HMM(init, f, em, torch.tensor([0, 1])),
            ValueError,
            r"lengths must lie in \[1, 4\] .* got min 0 and max 1",
        ),
        (
            "lengths float",
            lambda: HMM(init, f, em, torch.tensor([1.0, 2.0])),
            TypeError,
            r"lengths must be an integer tensor, got dtype torch.float32",
        ),
        (
            "lengths shape",
            lambda: HMM(init, f, em, torch.tensor([1, 2, 3])),
            ValueError,
            r"lengths must have shape \(batch,\) = \(2,\), got \(3,\)",
        ),
        (
            "memory_light dense",
            lambda: (
                HMM(init, Dense(torch.zeros(3, 3, dtype=F64)), em, memory_light=True).log_partition
            ),
            TypeError,
            r"memory_light needs a LowRank transition factor, got Dense",
        ),
    ]


ERR = _err_cases()


@pytest.mark.parametrize("name,build,exc,pattern", ERR, ids=[c[0] for c in ERR])
def test_errors_name_the_argument_and_shapes(name, build, exc, pattern):
    with pytest.raises(exc, match=pattern):
        build()


def test_nan_and_inf_in_the_padding_are_still_rejected(gen):
    """The value check is one fused max over the whole emission, padding included."""
    init, f, em = _inputs(gen, neg_inf=False)
    for bad, pattern in ((math.nan, "contains 1 NaN"), (math.inf, r"contains \+inf")):
        e = em.clone()
        e[2, 4, 1] = bad  # example 2 has length 1: this is padding
        with pytest.raises(ValueError, match=pattern):
            HMM(init, f, e, LENGTHS)
        HMM(init, f, e, LENGTHS, validate_args=False)  # skipped on request


def test_validate_args_false_gives_the_same_results(gen):
    init, f, em = _inputs(gen, "lowrank+banded", B)
    for cls in (HMM, RankSpaceHMM):
        fac = f if cls is HMM else random_factor("lowrank", Z, generator=gen)
        checked = cls(init, fac, em, LENGTHS)
        fast = cls(init, fac, em, LENGTHS, validate_args=False)
        assert torch.equal(checked.log_partition, fast.log_partition)
        assert torch.equal(checked.marginals, fast.marginals)
        assert torch.equal(fast.lengths, LENGTHS)
        assert torch.equal(cls(init, fac, em, validate_args=False).lengths, torch.full((B,), T))
    # shape and dtype errors are raised either way; value errors only when validating
    with pytest.raises(ValueError, match="emission must have 3 dimensions"):
        HMM(init, f, em[0], validate_args=False)
    dead = Banded(torch.full((Z, 3), NEG, dtype=F64), 1)
    with pytest.raises(ValueError, match="no successor"):
        HMM(init, dead, em, LENGTHS)
    HMM(init, dead, em, LENGTHS, validate_args=False)


def test_path_errors(gen):
    init, f, em = _inputs(gen)
    h = HMM(init, f, em, LENGTHS)
    with pytest.raises(TypeError, match="path must be an integer tensor, got torch.float32"):
        h.score(torch.zeros(B, T))
    with pytest.raises(ValueError, match=r"path must have shape \(\.\.\., 3, 5\), got \(3, 4\)"):
        h.score(torch.zeros(B, T - 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"path states must lie in \[0, 3\) .* max 3"):
        h.log_prob(torch.full((B, T), 3))
    bad = h.argmax.clone()
    bad[0, 0] = -1  # -1 only allowed in the padding
    with pytest.raises(ValueError, match=r"min -1"):
        h.score(bad)


# ---- no mutation --------------------------------------------------------------------------
@pytest.mark.parametrize("kind,batch,light", CASES, ids=IDS)
def test_inputs_are_never_modified(gen, kind, batch, light):
    init, f, em = _inputs(gen, kind, batch, per_example_init=True)
    lengths = LENGTHS.clone()
    for requires_grad in (False, True):
        tensors = [init, em, lengths, *factor_tensors(f)]
        if requires_grad:
            f, params = leaves(f)
            em = em.clone().requires_grad_(True)
            tensors = [init, em, lengths, *params]
        saved = [t.detach().clone() for t in tensors]
        h = HMM(init, f, em, lengths, memory_light=light)
        if requires_grad:
            (h.log_partition.sum() + h.entropy().sum()).backward()
        outputs = [h.log_partition, h.marginals, h.argmax, h.max_score, h.entropy()]
        outputs += [h.log_prob(h.argmax), h.sample((3,), generator=torch.Generator())]
        if kind == "lowrank":
            r = RankSpaceHMM(init, f, em, lengths)
            outputs += [r.log_partition, r.marginals]
        assert all(isinstance(x, torch.Tensor) for x in outputs)
        for t, t0 in zip(tensors, saved, strict=True):
            assert torch.equal(t.detach(), t0)


# ---- properties ---------------------------------------------------------------------------
@PROPERTY
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 4),
    z=st.integers(1, 3),
    kind=st.sampled_from(FACTOR_KINDS),
    batched=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_property_hmm_matches_brute_force(b, t, z, kind, batched, seed, data):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(data.draw(st.lists(st.integers(1, t), min_size=b, max_size=b)))
    f = random_factor(kind, z, batch=b if batched else None, rank=2, width=1, generator=gen)
    init = torch.randn(z, dtype=F64, generator=gen)
    em = torch.randn(b, t, z, dtype=F64, generator=gen) * 2
    saved = [x.clone() for x in (init, em, lengths, *factor_tensors(f))]
    h = HMM(init, f, em, lengths)
    ref = _brute(h)
    torch.testing.assert_close(h.log_partition, ref.log_partition)
    torch.testing.assert_close(h.marginals, ref.marginals)
    sums = h.marginals.sum(-1)
    torch.testing.assert_close(sums[h.mask], torch.ones_like(sums[h.mask]))
    torch.testing.assert_close(h.max_score, ref.max_score)
    torch.testing.assert_close(h.score(h.argmax), ref.max_score)
    torch.testing.assert_close(h.entropy(), ref.entropy)
    for x, x0 in zip((init, em, lengths, *factor_tensors(f)), saved, strict=True):
        assert torch.equal(x, x0)


def test_single_state_and_single_step(gen):
    em = torch.randn(2, 4, 1, dtype=F64, generator=gen)
    h = HMM(
        torch.zeros(1, dtype=F64),
        LowRank(torch.zeros(1, 2, dtype=F64), torch.zeros(1, 2, dtype=F64)),
        em,
        torch.tensor([4, 2]),
    )
    torch.testing.assert_close(h.log_partition, torch.stack([em[0].sum(), em[1, :2].sum()]))
    torch.testing.assert_close(h.marginals.sum(-1), h.mask.to(F64))
    torch.testing.assert_close(h.entropy(), torch.zeros(2, dtype=F64))
    init, f, em = _inputs(gen, neg_inf=False)
    h = HMM(init, f, em[:, :1])
    torch.testing.assert_close(
        h.log_partition, torch.logsumexp(init.log_softmax(-1) + em[:, 0], -1)
    )
    torch.testing.assert_close(h.marginals[:, 0], (init.log_softmax(-1) + em[:, 0]).softmax(-1))


def test_public_api():
    for name in ("HMM", "RankSpaceHMM", "Dense", "LowRank", "Banded", "Sum", "Factor"):
        assert hasattr(lorank, name)


@pytest.mark.parametrize("kind", ["dense", "banded"])
def test_dead_end_states(gen, kind):
    """A transition row that is all -inf (a state with no successor) cannot be normalized.

    Regression 1: ``log_prob_columns``/``log_prob_entries`` gave NaN there (``log_probs`` gave
    -inf), and FFBS then drew that state at every step.  Regression 2: padding assumes rows
    that sum to one, so padded sequences got a wrong log Z; HMM now rejects such factors."""
    if kind == "dense":
        logits = torch.randn(Z, Z, dtype=F64, generator=gen)
        logits[1] = NEG
        f = Dense(logits)
    else:
        logits = torch.randn(Z, 3, dtype=F64, generator=gen)
        logits[1] = NEG
        f = Banded(logits, 1)
    cols = f.log_prob_columns(torch.arange(Z))
    assert not cols.isnan().any()
    torch.testing.assert_close(cols, f.log_probs().mT)
    assert f.log_prob_entries(torch.tensor([1]), torch.tensor([1])).item() == NEG
    em = torch.randn(B, T, Z, dtype=F64, generator=gen)
    with pytest.raises(ValueError, match=r"transition has states with no successor .*\[1\]"):
        HMM(torch.zeros(Z, dtype=F64), f, em, LENGTHS)
    # a sum with a part that covers the row is fine
    h = HMM(torch.zeros(Z, dtype=F64), f + random_factor("lowrank", Z, generator=gen), em, LENGTHS)
    torch.testing.assert_close(h.log_partition, _brute(h).log_partition)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_naming_the_argument(dtype):
    init, tr = torch.zeros(Z, dtype=dtype), Dense(torch.zeros(Z, Z, dtype=dtype))
    with pytest.raises(TypeError, match=rf"emission \(shape \(2, 4, 3\)\) has dtype {dtype}"):
        HMM(init, tr, torch.zeros(2, 4, Z, dtype=dtype))


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
@pytest.mark.parametrize("explicit_lengths", [False, True])
def test_empty_batch_gives_empty_results(kind, explicit_lengths):
    gen = torch.Generator().manual_seed(0)
    tr = random_factor(kind, Z, rank=2, width=1, generator=gen)
    em = torch.zeros(0, T, Z, dtype=F64, requires_grad=True)
    lengths = torch.zeros(0, dtype=torch.long) if explicit_lengths else None
    d = HMM(torch.zeros(Z, dtype=F64), tr, em, lengths=lengths)
    assert d.log_partition.shape == (0,)
    assert d.marginals.shape == (0, T, Z)
    assert d.argmax.shape == (0, T)
    assert d.entropy().shape == (0,)
    assert d.sample((2,)).shape == (2, 0, T)


def test_lengths_errors_name_the_tensor_they_index():
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\] \(the time dimension "
                                         r"of emission\), got min 0"):
        HMM(torch.zeros(Z), Dense(torch.zeros(Z, Z)), torch.zeros(2, T, Z), lengths=[0, 5])


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_impossible_sequence_gets_the_no_path_sentinel(kind):
    gen = torch.Generator().manual_seed(1)
    tr = random_factor(kind, Z, rank=2, width=1, generator=gen)
    em = torch.randn(B, T, Z, dtype=F64, generator=gen)
    em[1, 2] = NEG  # sequence 1 has probability 0; the others are untouched
    d = HMM(torch.zeros(Z, dtype=F64), tr, em, lengths=LENGTHS)
    alone = HMM(torch.zeros(Z, dtype=F64), tr, em[[0, 2]], lengths=LENGTHS[[0, 2]])
    assert torch.isneginf(d.log_partition[1]) and torch.isneginf(d.max_score[1])
    assert (d.argmax[1] == -1).all()
    assert torch.equal(d.argmax[[0, 2]], alone.argmax)
    samples = d.sample((4,), generator=torch.Generator().manual_seed(0))
    assert (samples[:, 1] == -1).all()
    assert (samples[:, [0, 2]] >= 0).sum() == 4 * int(LENGTHS[[0, 2]].sum())
    score, logp = d.score(d.argmax), d.log_prob(d.argmax)
    assert torch.isneginf(score[1]) and torch.isneginf(logp[1])
    torch.testing.assert_close(score[[0, 2]], alone.max_score)
    assert not torch.isnan(logp).any()
