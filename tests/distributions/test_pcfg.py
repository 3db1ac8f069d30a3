"""PCFG against brute-force enumeration of all trees of tiny grammars (float64, n <= 5)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brute_structures import binary_trees, pcfg_brute  # noqa: E402

from lorank.distributions.pcfg import PCFG, generate, tree_to_string  # noqa: E402
from lorank.rules import (  # noqa: E402
    CPRules,
    DenseRules,
    LowRankRules,
    RankSpaceRules,
    random_rules,
)

D = torch.float64
KINDS = ["dense", "low_rank", "cp", "rank_space"]


def _model(kind, m=2, p=2, n=5, lengths=(5, 3, 1), seed=0, root_all=True, batch_rules=False):
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    rules = random_rules(kind, m, p, rank=3, generator=gen, batch=(b,) if batch_rules else ())
    root = torch.randn(m + p if root_all else m, dtype=D, generator=gen)
    term = torch.randn(b, n, p, dtype=D, generator=gen)
    return PCFG(root, rules, term, torch.tensor(lengths))


def _brute(d, b):
    lr = d.rules.log_probs()
    lr = lr[b] if lr.dim() == 4 else lr
    return pcfg_brute(d.root_logp[b], lr, d.terminal[b], int(d.lengths[b]))


def _rows(d, trees):
    """Brute trees for batch row 0 -> (N, B, 2n-1, 3), other rows copied from the argmax."""
    out = d.argmax.expand(len(trees), -1, -1, -1).clone()
    out[:, 0] = -1
    for i, t in enumerate(trees):
        out[i, 0, : len(t)] = torch.tensor(t)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_against_brute_force(kind):
    d = _model(kind, seed=KINDS.index(kind))
    ent = d.entropy()
    for b in range(d.batch_size):
        r = _brute(d, b)
        torch.testing.assert_close(d.log_partition[b], r["log_partition"])
        torch.testing.assert_close(d.marginals[b], r["marginals"])
        torch.testing.assert_close(d.span_marginals[b], r["marginals"].sum(-1))
        torch.testing.assert_close(d.max_score[b], r["max_score"])
        torch.testing.assert_close(ent[b], r["entropy"])
        probs = r["probs"].sort(descending=True).values
        if len(probs) == 1 or probs[0] - probs[1] > 1e-9:
            got = [tuple(x) for x in d.argmax[b].tolist() if x[0] >= 0]
            assert got == r["argmax"]
    torch.testing.assert_close(d.score(d.argmax), d.max_score)


@pytest.mark.parametrize("kind", ["dense", "cp"])
def test_batched_rules(kind):
    d = _model(kind, batch_rules=True, lengths=(4, 3), n=4, seed=11)
    for b in range(2):
        r = _brute(d, b)
        torch.testing.assert_close(d.log_partition[b], r["log_partition"])
        torch.testing.assert_close(d.marginals[b], r["marginals"])
        torch.testing.assert_close(d.max_score[b], r["max_score"])


def test_log_prob_normalizes_over_all_trees():
    d = _model("low_rank", n=4, lengths=(4, 2), seed=3)
    r = _brute(d, 0)
    lp = d.log_prob(_rows(d, r["trees"]))[:, 0]
    torch.testing.assert_close(lp.exp(), r["probs"])
    torch.testing.assert_close(lp.exp().sum(), torch.tensor(1.0, dtype=D))


@pytest.mark.parametrize("kind", ["dense", "rank_space"])
def test_sampling_matches_marginals(kind):
    d = _model(kind, n=4, lengths=(4, 3), seed=4)
    s = d.sample((3000,), generator=torch.Generator().manual_seed(0))
    assert s.shape == (3000, 2, 7, 3)
    assert (d.to_chart(s).mean(0) - d.marginals).abs().max() < 0.04
    assert torch.isfinite(d.log_prob(s)).all()


@pytest.mark.parametrize("kind", ["low_rank", "cp", "rank_space"])
def test_factorizations_match_dense_equivalent(kind):
    gen = torch.Generator().manual_seed(5)
    m, p, n = 6, 5, 8
    rules = random_rules(kind, m, p, rank=4, generator=gen)
    root = torch.randn(m, dtype=D, generator=gen)
    term = torch.randn(3, n, p, dtype=D, generator=gen)
    lengths = torch.tensor([8, 6, 2])
    d = PCFG(root, rules, term, lengths)
    dd = PCFG(root, rules.to_dense(), term, lengths)
    torch.testing.assert_close(d.log_partition, dd.log_partition)
    torch.testing.assert_close(d.marginals, dd.marginals)
    torch.testing.assert_close(d.span_marginals, dd.span_marginals)
    torch.testing.assert_close(d.entropy(), dd.entropy())


def test_rank_space_equals_cp_at_scale():
    gen = torch.Generator().manual_seed(6)
    m, p, r, n = 40, 30, 8, 14
    cp = random_rules("cp", m, p, rank=r, generator=gen)
    rs = RankSpaceRules.from_cp(cp)
    root = torch.randn(m, dtype=D, generator=gen)
    term = torch.randn(2, n, p, dtype=D, generator=gen)
    a = PCFG(root, cp, term, torch.tensor([14, 9]))
    b = PCFG(root, rs, term, torch.tensor([14, 9]))
    torch.testing.assert_close(a.log_partition, b.log_partition)
    torch.testing.assert_close(a.span_marginals, b.span_marginals)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_log_partition(kind):
    gen = torch.Generator().manual_seed(7)
    rules = random_rules(kind, 2, 2, rank=2, generator=gen)
    names = {"dense": ["logits"], "low_rank": ["head", "children"]}.get(
        kind, ["head", "left", "right"])
    params = [getattr(rules, k).clone().requires_grad_(True) for k in names]
    term = torch.randn(2, 4, 2, dtype=D, generator=gen, requires_grad=True)
    root = torch.randn(4, dtype=D, generator=gen, requires_grad=True)
    cls = type(rules)

    def f(root, term, *ps):
        return PCFG(root, cls(*ps), term, torch.tensor([4, 3])).log_partition

    assert torch.autograd.gradcheck(f, (root, term, *params))


def test_span_marginals_and_entropy_are_differentiable():
    gen = torch.Generator().manual_seed(8)
    head = torch.randn(2, 2, dtype=D, generator=gen, requires_grad=True)
    left = torch.randn(4, 2, dtype=D, generator=gen)
    right = torch.randn(4, 2, dtype=D, generator=gen)
    term = torch.randn(1, 4, 2, dtype=D, generator=gen, requires_grad=True)
    root = torch.zeros(2, dtype=D)

    def spans(head, term):
        return PCFG(root, RankSpaceRules(head, left, right), term).span_marginals

    def ent(head, term):
        return PCFG(root, CPRules(head, left, right), term).entropy()

    assert torch.autograd.gradcheck(spans, (head, term))
    assert torch.autograd.gradcheck(ent, (head, term))


def test_mbr_maximizes_expected_correct_spans():
    d = _model("cp", n=5, lengths=(5,), seed=9)
    marg = d.span_marginals[0]
    best = max(
        sum(float(marg[s[0], s[1] - 1]) for s in _spans(t)) for t in binary_trees(0, 5)
    )
    tree = d.mbr()[0]
    got = sum(float(marg[i, j - 1]) for i, j, _ in tree.tolist() if i >= 0)
    assert abs(got - best) < 1e-9
    assert d.score(d.mbr()).isfinite().all()


def _spans(tree):
    out = [(tree[0], tree[1])]
    if len(tree) == 4:
        out += _spans(tree[2]) + _spans(tree[3])
    return out


def test_one_word_sentences_need_a_preterminal_root():
    with pytest.raises(ValueError, match="preterminal root"):
        _model("dense", root_all=False)
    d = _model("dense", root_all=False, lengths=(5, 3))
    assert torch.isfinite(d.log_partition).all()


def test_generate_sentences_and_trees():
    gen = torch.Generator().manual_seed(10)
    rules = random_rules("cp", 3, 4, rank=2, generator=gen, dtype=torch.float32)
    root = torch.randn(7)
    words = torch.randn(4, 9)
    out = generate(root, rules, words, 20, max_length=12, generator=gen)
    assert len(out) == 20
    for ws, tree in out:
        assert 1 <= len(ws) <= 12 and all(0 <= w < 9 for w in ws)
        assert len(tree) == 2 * len(ws) - 1 and tree[0][:2] == (0, len(ws))
        s = tree_to_string(tree, ws)
        assert s.count("(") == len(tree)
        # the generated tree is a valid parse of the generated sentence
        term = torch.log_softmax(words, -1).T[torch.tensor(ws)].unsqueeze(0)
        d = PCFG(root, rules, term)
        rows = torch.full((1, 2 * len(ws) - 1, 3), -1, dtype=torch.long)
        rows[0] = torch.tensor(tree)
        assert torch.isfinite(d.score(rows)).all()


def test_errors():
    rules = random_rules("dense", 2, 3)
    term = torch.randn(2, 4, 3, dtype=D)
    with pytest.raises(ValueError, match="preterminals"):
        PCFG(torch.zeros(2), rules, torch.randn(2, 4, 2, dtype=D))
    with pytest.raises(ValueError, match="root must have shape"):
        PCFG(torch.zeros(3), rules, term)
    with pytest.raises(ValueError, match="at most 3"):
        PCFG(torch.zeros(2), rules, term, max_length=3)
    with pytest.raises(ValueError, match="lengths must lie"):
        PCFG(torch.zeros(2), rules, term, torch.tensor([5, 2]))
    with pytest.raises(TypeError, match="rules"):
        PCFG(torch.zeros(2), torch.randn(2, 5, 5), term)
    with pytest.raises(ValueError, match="children must have shape"):
        LowRankRules(torch.randn(2, 3), torch.randn(5, 5, 2))
    with pytest.raises(ValueError, match="left and right"):
        CPRules(torch.randn(2, 3), torch.randn(5, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="at least one preterminal"):
        DenseRules(torch.randn(2, 2, 2))
    d = PCFG(torch.zeros(2), rules, term)
    bad = d.argmax.clone()
    bad[0, 1, 1] += 1
    with pytest.raises(ValueError, match="well-formed"):
        d.score(bad)
