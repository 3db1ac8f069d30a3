"""Hypergraph API: generic semantics, low-rank rank layers, and HMM / HSMM / CKY instances
checked against the specialized programs (float64)."""

import itertools

import pytest
import torch
from brute_structures import random_rules

import lorank
from lorank.distributions.hsmm import HSMM
from lorank.distributions.hypergraph import (
    Hypergraph,
    LowRankPotential,
    cky_hypergraph,
    cky_node,
    hmm_hypergraph,
    hsmm_hypergraph,
)
from lorank.distributions.pcfg import PCFG
from lorank.semiring import LogSemiring

D = torch.float64


def _small_graph(gen, low_rank):
    g = Hypergraph()
    x = g.add_node(3, torch.randn(2, 3, dtype=D, generator=gen))  # batched leaf
    y = g.add_node(2, torch.randn(2, dtype=D, generator=gen))
    s = g.add_node(4, torch.randn(4, dtype=D, generator=gen))
    dense = torch.randn(4, 3, 2, dtype=D, generator=gen)
    if low_rank == "joint":
        pot = LowRankPotential(torch.randn(4, 5, dtype=D, generator=gen),
                               torch.randn(3, 2, 5, dtype=D, generator=gen))
    else:
        pot = LowRankPotential(torch.randn(4, 5, dtype=D, generator=gen),
                               [torch.randn(3, 5, dtype=D, generator=gen),
                                torch.randn(2, 5, dtype=D, generator=gen)])
    g.add_edge(s, [x, y], dense)
    g.add_edge(s, [x, y], pot)
    g.add_edge(s, [y], torch.randn(4, 2, dtype=D, generator=gen))
    return g, (x, y, s), dense, pot


def _enumerate(g, dense, pot, nodes):
    """Brute force over all labelings: derivation = (edge choice, labels)."""
    x, y, s = nodes
    px, py, ps = g.potentials
    scores = []
    full = pot.to_dense()
    single = g.edges[2].potential
    for a in range(4):
        for bx, by in itertools.product(range(3), range(2)):
            base = ps[a] + px[:, bx] + py[by]
            scores.append(base + dense[a, bx, by])
            scores.append(base + full[a, bx, by])
        for by in range(2):
            scores.append((ps[a] + py[by] + single[a, by]).expand(2))
    return torch.stack(scores, -1)


@pytest.mark.parametrize("low_rank", ["joint", "cp"])
def test_generic_semantics_against_enumeration(low_rank):
    gen = torch.Generator().manual_seed(0)
    g, nodes, dense, pot = _small_graph(gen, low_rank)
    scores = _enumerate(g, dense, pot, nodes)
    torch.testing.assert_close(g.log_partition(), scores.logsumexp(-1))
    torch.testing.assert_close(g.max_score(), scores.amax(-1))
    p = torch.softmax(scores, -1)
    torch.testing.assert_close(g.entropy(), -(p * p.log()).sum(-1))
    # the rank layer and the dense expansion agree in the log semiring
    torch.testing.assert_close(g.marginalize(LogSemiring, rank_layer=False), g.log_partition())


def test_marginals_and_argmax_of_root():
    gen = torch.Generator().manual_seed(1)
    g, (x, y, s), _, _ = _small_graph(gen, "cp")
    marg = g.marginals()
    torch.testing.assert_close(marg[s].sum(-1), torch.ones(2, dtype=D))
    assert (marg[x].sum(-1) <= 1 + 1e-12).all()
    am = g.argmax()
    assert am[s].shape == (2,) and (am[s] >= 0).all()


@pytest.mark.parametrize("kind", ["dense", "low_rank", "sum"])
def test_hmm_instance(kind):
    gen = torch.Generator().manual_seed(2)
    z, t = 4, 5
    if kind == "dense":
        fac = lorank.Dense(torch.randn(z, z, dtype=D, generator=gen))
    else:
        fac = lorank.LowRank(torch.randn(z, 2, dtype=D, generator=gen),
                             torch.randn(z, 2, dtype=D, generator=gen))
        if kind == "sum":
            fac = fac + lorank.Banded(torch.randn(z, 3, dtype=D, generator=gen), 1)
    init = torch.randn(z, dtype=D, generator=gen)  # logits, as HMM takes them
    em = torch.randn(2, t, z, dtype=D, generator=gen)
    g = hmm_hypergraph(init, fac, em)
    h = lorank.HMM(init, fac, em)
    torch.testing.assert_close(g.log_partition(), h.log_partition)
    torch.testing.assert_close(g.max_score(), h.max_score)
    torch.testing.assert_close(g.entropy(), h.entropy())
    marg = torch.stack(g.marginals(), 1)
    torch.testing.assert_close(marg, h.marginals)
    torch.testing.assert_close(torch.stack(g.argmax(), -1), h.argmax)


@pytest.mark.parametrize("kind", ["dense", "low_rank"])
def test_hsmm_instance(kind):
    gen = torch.Generator().manual_seed(3)
    z, t, k = 3, 6, 3
    if kind == "dense":
        fac = lorank.Dense(torch.randn(z, z, dtype=D, generator=gen))
    else:
        fac = lorank.LowRank(torch.randn(z, 2, dtype=D, generator=gen),
                             torch.randn(z, 2, dtype=D, generator=gen))
    init = torch.randn(z, dtype=D, generator=gen)
    dur = torch.randn(z, k, dtype=D, generator=gen)
    em = torch.randn(2, t, z, dtype=D, generator=gen)
    h = HSMM(init, fac, dur, em)
    g = hsmm_hypergraph(init, fac, dur, em)  # the same (unnormalized) inputs
    torch.testing.assert_close(g.log_partition(), h.log_partition)
    torch.testing.assert_close(g.max_score(), h.max_score)
    torch.testing.assert_close(g.entropy(), h.entropy())


@pytest.mark.parametrize("kind", ["dense", "low_rank", "cp", "rank_space"])
def test_cky_instance(kind):
    gen = torch.Generator().manual_seed(4)
    rules = random_rules(kind, 3, 2, rank=2, generator=gen)
    term = torch.randn(2, 5, 2, dtype=D, generator=gen)
    root = torch.randn(5, dtype=D, generator=gen)
    d = PCFG(root, rules, term)
    g = cky_hypergraph(root, rules, term)  # the same (unnormalized) inputs
    torch.testing.assert_close(g.log_partition(), d.log_partition)
    torch.testing.assert_close(g.max_score(), d.max_score)
    torch.testing.assert_close(g.entropy(), d.entropy())
    # span-node marginals equal the PCFG's labeled span marginals
    marg = g.marginals()
    for v, name in enumerate(g.names):
        if isinstance(name, tuple) and name[0] == "span":
            _, i, j = name
            assert cky_node(i, j, 5) == v  # the documented node order
            want = d.marginals[:, i, j - 1]
            want = want[:, :3] if j - i > 1 else want[:, 3:]
            torch.testing.assert_close(marg[v], want)


def test_one_word_cky_instance():
    rules = random_rules("cp", 2, 3, rank=2)
    term = torch.randn(1, 1, 3, dtype=D)
    root = torch.randn(5, dtype=D)
    d = PCFG(root, rules, term)
    g = cky_hypergraph(root, rules, term)
    torch.testing.assert_close(g.log_partition(), d.log_partition)
    assert g.names[-1] == "root" and len(g.names) == 2


def test_errors():
    g = Hypergraph()
    a = g.add_node(2)
    b = g.add_node(3)
    with pytest.raises(ValueError, match="positive integer"):
        g.add_node(0)
    with pytest.raises(ValueError, match="node potential"):
        g.add_node(2, torch.zeros(3))
    with pytest.raises(ValueError, match="edge potential must have shape"):
        g.add_edge(b, [a], torch.zeros(2, 3))
    with pytest.raises(ValueError, match="node id"):
        g.add_edge(b, [7], torch.zeros(3, 2))
    with pytest.raises(ValueError, match="joint tail"):
        g.add_edge(b, [a], LowRankPotential(torch.zeros(3, 4), torch.zeros(5, 4)))
    with pytest.raises(ValueError, match="rank"):
        LowRankPotential(torch.zeros(3, 4), torch.zeros(2, 5))
    g.add_edge(b, [a], torch.zeros(3, 2))
    g.add_edge(a, [b], torch.zeros(2, 3))
    with pytest.raises(ValueError, match="cycle"):
        g.log_partition()


def test_builders_validate_like_the_distributions():
    """The builders take the distributions' inputs and reject what they reject."""
    rules = random_rules("cp", 2, 2, rank=2)
    with pytest.raises(TypeError, match="root has dtype torch.float32"):
        cky_hypergraph(torch.zeros(4), rules, torch.randn(1, 3, 2, dtype=D))
    root = torch.zeros(2, 4, dtype=D)
    root[0] = float("-inf")
    with pytest.raises(ValueError, match="root .* all -inf"):
        cky_hypergraph(root, rules, torch.randn(2, 3, 2, dtype=D))
    fac = lorank.Dense(torch.randn(3, 3, dtype=D))
    with pytest.raises(TypeError, match="duration has dtype"):
        hsmm_hypergraph(torch.zeros(3, dtype=D), fac, torch.zeros(3, 2), torch.randn(1, 4, 3,
                                                                                     dtype=D))
    with pytest.raises(ValueError, match="init must have shape"):
        hmm_hypergraph(torch.zeros(4, dtype=D), fac, torch.randn(1, 4, 3, dtype=D))


def test_impossible_input_has_entropy_zero_everywhere():
    """One answer for an impossible input: log Z = -inf and entropy 0, in the distributions
    and in their hypergraphs alike."""
    gen = torch.Generator().manual_seed(5)
    rules = random_rules("dense", 2, 2, generator=gen)
    term = torch.randn(2, 3, 2, dtype=D, generator=gen)
    term[1, 1] = float("-inf")
    root = torch.randn(4, dtype=D, generator=gen)
    d, g = PCFG(root, rules, term), cky_hypergraph(root, rules, term)
    for ent in (d.entropy(), g.entropy()):
        torch.testing.assert_close(ent[1], torch.tensor(0.0, dtype=D))
    assert g.log_partition()[1] == d.log_partition[1] == float("-inf")
    fac = lorank.Dense(torch.randn(3, 3, dtype=D, generator=gen))
    em = torch.randn(2, 4, 3, dtype=D, generator=gen)
    em[1, 2] = float("-inf")
    dur, init = torch.randn(3, 2, dtype=D, generator=gen), torch.zeros(3, dtype=D)
    h, gh = HSMM(init, fac, dur, em), hsmm_hypergraph(init, fac, dur, em)
    for ent in (h.entropy(), gh.entropy()):
        torch.testing.assert_close(ent[1], torch.tensor(0.0, dtype=D))
