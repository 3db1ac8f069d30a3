"""Property tests (hypothesis) for PCFG and HSMM: small random grammars / segment models,
ragged lengths and random ``-inf`` masks on every raw input.

For every draw: log Z equals brute-force enumeration from the raw parameters; no NaN in any
output or gradient; ``score(argmax) == max_score``; marginals sum to the expected counts; every
sample is well-formed or the "impossible" sentinel, exactly for the impossible inputs.
"""

import math

import torch
from brute import PROPERTY, reference_log_transition
from brute_structures import (
    hsmm_brute,
    normalize_rows,
    pcfg_brute,
    root_from_raw,
    rules_from_raw,
)
from hypothesis import given
from hypothesis import strategies as st

import lorank
from lorank.distributions.hsmm import HSMM
from lorank.distributions.pcfg import PCFG
from lorank.rules import CPRules, DenseRules, LowRankRules, RankSpaceRules

D = torch.float64
NEG = -math.inf
RULES = {"dense": DenseRules, "low_rank": LowRankRules, "cp": CPRules,
         "rank_space": RankSpaceRules}


def _masked(gen: torch.Generator, shape, q: float, keep_rows: bool = False) -> torch.Tensor:
    """Standard normal entries, each ``-inf`` with probability q; ``keep_rows``: every row
    (last dim) keeps its first finite... at least one finite entry."""
    x = torch.randn(*shape, dtype=D, generator=gen)
    x = torch.where(torch.rand(*shape, dtype=D, generator=gen) < q, NEG, x)
    if keep_rows:
        dead = torch.isneginf(x).all(-1)
        x[..., 0] = torch.where(dead, 0.0, x[..., 0])
    return x


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.clone().requires_grad_(True)


def _no_nan(*xs):
    for x in xs:
        assert not torch.isnan(x).any()


def _lengths(draw, b, n):
    return torch.tensor([draw(st.integers(1, n)) for _ in range(b)])


@st.composite
def pcfg_cases(draw):
    kind = draw(st.sampled_from(sorted(RULES)))
    m, p, r = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    n, b = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    q = draw(st.sampled_from([0.0, 0.15, 0.4]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    batch = (b,) if draw(st.booleans()) else ()
    s = m + p
    shapes = {"dense": [(m, s, s)], "low_rank": [(m, r), (s, s, r)]}.get(
        kind, [(m, r), (s, r), (s, r)])
    params = [_masked(gen, (*batch, *sh), q) for sh in shapes]
    root = _masked(gen, (s,), q, keep_rows=True)
    term = _masked(gen, (b, n, p), q)
    return kind, params, root, term, _lengths(draw, b, n)


@PROPERTY
@given(pcfg_cases())
def test_pcfg_properties(case):
    kind, params, root, term, lengths = case
    leaves = [_leaf(t) for t in (root, term, *params)]
    rules = RULES[kind](*leaves[2:])
    d = PCFG(leaves[0], rules, leaves[1], lengths)
    m, p = rules.num_nonterminals, rules.num_preterminals
    logz, ent = d.log_partition, d.entropy()
    lr, rt = rules_from_raw(rules).detach(), root_from_raw(root, m, p)
    for b in range(d.batch_size):
        want = pcfg_brute(rt, lr[b] if lr.dim() == 4 else lr, term[b], int(lengths[b]))
        torch.testing.assert_close(logz[b].detach(), want["log_partition"])
        torch.testing.assert_close(ent[b].detach(), want["entropy"])
    possible = torch.isfinite(logz.detach())
    marg, spans = d.marginals, d.span_marginals
    _no_nan(logz, ent, marg, spans, d.max_score)
    # marginals: 2 len - 1 constituents, len of them single words; none if impossible
    count = torch.where(possible, 2 * lengths - 1, 0).to(D)
    torch.testing.assert_close(marg.sum((1, 2, 3)), count)
    torch.testing.assert_close(spans.detach().sum((1, 2)), count)
    torch.testing.assert_close(torch.diagonal(marg, 0, 1, 2).sum((1, 2)),
                               torch.where(possible, lengths, 0).to(D))
    torch.testing.assert_close(d.score(d.argmax).detach(), d.max_score)
    assert torch.equal(d.argmax[:, 0, 0] >= 0, possible)
    samples = d.sample((6,), generator=torch.Generator().manual_seed(0))
    lp = d.log_prob(samples)  # raises unless every sample is well-formed or the sentinel
    assert torch.equal(samples[:, :, 0, 0] >= 0, possible.expand(6, -1))
    assert torch.isfinite(lp[:, possible]).all() and (lp[:, ~possible] == NEG).all()
    loss = logz[possible].sum() + ent.sum()
    if loss.requires_grad:
        _no_nan(*torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))


FACTORS = ["dense", "lowrank", "banded", "lowrank+banded"]


def _factor(kind, raw):
    if kind == "dense":
        return lorank.Dense(raw[0])
    if kind == "lowrank":
        return lorank.LowRank(raw[0], raw[1])
    if kind == "banded":
        return lorank.Banded(raw[0], 1)
    return lorank.LowRank(raw[0], raw[1]) + lorank.Banded(raw[2], 1)


@st.composite
def hsmm_cases(draw):
    kind = draw(st.sampled_from(FACTORS))
    z, k, t, b = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4)),
                  draw(st.integers(1, 3)))
    q = draw(st.sampled_from([0.0, 0.15, 0.4]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    batch = (b,) if draw(st.booleans()) else ()
    shapes = {"dense": [(z, z)], "lowrank": [(z, 2), (z, 2)], "banded": [(z, 3)],
              "lowrank+banded": [(z, 2), (z, 2), (z, 3)]}[kind]
    raw = [_masked(gen, (*batch, *sh), q) for sh in shapes]
    init = _masked(gen, (z,), q, keep_rows=True)
    duration = _masked(gen, (z, k), q)
    emission = _masked(gen, (b, t, z), q)
    return kind, raw, init, duration, emission, _lengths(draw, b, t)


@PROPERTY
@given(hsmm_cases())
def test_hsmm_properties(case):
    kind, raw, init, duration, emission, lengths = case
    leaves = [_leaf(x) for x in (init, duration, emission, *raw)]
    fac = _factor(kind, leaves[3:])
    h = HSMM(leaves[0], fac, leaves[1], leaves[2], lengths)
    logz, ent = h.log_partition, h.entropy()
    trans = reference_log_transition(fac)
    for b in range(h.batch_size):
        want = hsmm_brute(normalize_rows(init, 1), trans[b] if trans.dim() == 3 else trans,
                          normalize_rows(duration, 1), emission[b], int(lengths[b]))
        torch.testing.assert_close(logz[b].detach(), want["log_partition"])
        torch.testing.assert_close(ent[b].detach(), want["entropy"])
    possible = torch.isfinite(logz.detach())
    marg, seg = h.marginals, h.segment_marginals
    _no_nan(logz, ent, marg, seg, h.max_score)
    # every real position of a possible sequence lies in exactly one segment
    mask = (torch.arange(h.max_length) < lengths.unsqueeze(1)) & possible.unsqueeze(1)
    torch.testing.assert_close(marg.sum(-1), mask.to(D))
    durs = torch.arange(1, h.max_duration + 1, dtype=D)
    torch.testing.assert_close((seg.sum(-1) * durs).sum((1, 2)),
                               torch.where(possible, lengths, 0).to(D))
    torch.testing.assert_close(h.score(h.argmax).detach(), h.max_score)
    assert torch.equal(h.argmax.empty(), ~possible)
    samples = h.sample((6,), generator=torch.Generator().manual_seed(0))
    lp = h.log_prob(samples)  # raises unless every sample is well-formed or the sentinel
    assert torch.equal(samples.empty(), (~possible).expand(6, -1))
    assert torch.isfinite(lp[:, possible]).all() and (lp[:, ~possible] == NEG).all()
    loss = logz[possible].sum() + ent.sum()
    if loss.requires_grad:
        _no_nan(*torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
