"""PCFG against brute-force enumeration of all trees of tiny grammars (float64, n <= 5).

The brute force builds the dense rule tensor from the factors' raw parameters by their
documented formulas (``brute_structures.rules_from_raw``), never from ``rules.log_probs()``.
"""

import math

import pytest
import torch
from brute_structures import (
    binary_trees,
    pcfg_brute,
    random_rules,
    root_from_raw,
    rules_from_raw,
)

from lorank.distributions.pcfg import PCFG, generate, tree_to_string
from lorank.dp import inside
from lorank.rules import CPRules, DenseRules, LowRankRules, RankSpaceRules

D = torch.float64
NEG = -math.inf
KINDS = ["dense", "low_rank", "cp", "rank_space"]


class Case:
    """A PCFG and the raw inputs it was built from."""

    def __init__(self, kind, m=2, p=2, n=5, lengths=(5, 3, 1), seed=0, root_all=True,
                 batch_rules=False, root_batched=False, edit=None):
        gen = torch.Generator().manual_seed(seed)
        b = len(lengths)
        self.rules = random_rules(kind, m, p, rank=3, generator=gen,
                                  batch=(b,) if batch_rules else ())
        shape = (b,) if root_batched else ()
        self.root = torch.randn(*shape, m + p if root_all else m, dtype=D, generator=gen)
        self.term = torch.randn(b, n, p, dtype=D, generator=gen)
        if edit is not None:
            edit(self)
        self.lengths = torch.tensor(lengths)
        self.m, self.p = m, p
        self.d = PCFG(self.root, self.rules, self.term, self.lengths)

    def brute(self, b):
        """Brute force for sentence b from the raw parameters."""
        lr = rules_from_raw(self.rules)
        lr = lr[b] if lr.dim() == 4 else lr
        root = root_from_raw(self.root, self.m, self.p)
        root = root[b] if root.dim() == 2 else root
        return pcfg_brute(root, lr, self.term[b], int(self.lengths[b]))


def _check_against_brute(c: Case):
    d = c.d
    ent = d.entropy()
    for b in range(d.batch_size):
        r = c.brute(b)
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


#: every rule kind, and the dense / low-rank "children" inside both on full S x S child
#: products (small grammars, the default here) and by blocks of symbol types (large ones)
LAYOUTS = [*KINDS, "dense/blocks", "low_rank/blocks"]


def _kind(layout: str, monkeypatch) -> str:
    kind, _, how = layout.partition("/")
    if how == "blocks":
        monkeypatch.setattr(inside, "UNIFIED_MAX_SYMBOLS", 0)
    return kind


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_rules", [False, True])
def test_against_brute_force(layout, batch_rules, monkeypatch):
    kind = _kind(layout, monkeypatch)
    _check_against_brute(Case(kind, seed=KINDS.index(kind), batch_rules=batch_rules))


def _rows(d, trees):
    """Brute trees for batch row 0 -> (N, B, 2n-1, 3), other rows copied from the argmax."""
    out = d.argmax.expand(len(trees), -1, -1, -1).clone()
    out[:, 0] = -1
    for i, t in enumerate(trees):
        out[i, 0, : len(t)] = torch.tensor(t)
    return out


def test_log_prob_normalizes_over_all_trees():
    c = Case("low_rank", n=4, lengths=(4, 2), seed=3)
    r = c.brute(0)
    lp = c.d.log_prob(_rows(c.d, r["trees"]))[:, 0]
    torch.testing.assert_close(lp.exp(), r["probs"])
    torch.testing.assert_close(lp.exp().sum(), torch.tensor(1.0, dtype=D))


@pytest.mark.parametrize("kind", ["dense", "rank_space"])
def test_sampling_matches_marginals(kind):
    d = Case(kind, n=4, lengths=(4, 3), seed=4).d
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
    dd = PCFG(root, DenseRules(rules_from_raw(rules)), term, lengths)
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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_log_partition(layout, monkeypatch):
    kind = _kind(layout, monkeypatch)
    gen = torch.Generator().manual_seed(7)
    rules = random_rules(kind, 2, 2, rank=2, generator=gen)
    params = [t.clone().requires_grad_(True) for t in rules.parameters()]
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
    d = Case("cp", n=5, lengths=(5,), seed=9).d
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
        Case("dense", root_all=False)
    d = Case("dense", root_all=False, lengths=(5, 3)).d
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
        PCFG(torch.zeros(2, dtype=D), rules, torch.randn(2, 4, 2, dtype=D))
    with pytest.raises(ValueError, match="root must have shape"):
        PCFG(torch.zeros(3, dtype=D), rules, term)
    with pytest.raises(ValueError, match="at most 3"):
        PCFG(torch.zeros(2, dtype=D), rules, term, max_length=3)
    # the error names the argument the caller passed (terminal), not an internal name
    with pytest.raises(ValueError, match=r"lengths must lie .*time dimension of terminal"):
        PCFG(torch.zeros(2, dtype=D), rules, term, torch.tensor([5, 2]))
    with pytest.raises(TypeError, match="rules must be a lorank.rules factor"):
        PCFG(torch.zeros(2, dtype=D), torch.randn(2, 5, 5), term)
    with pytest.raises(ValueError, match="children must have shape"):
        LowRankRules(torch.randn(2, 3), torch.randn(5, 5, 2))
    with pytest.raises(ValueError, match="left and right"):
        CPRules(torch.randn(2, 3), torch.randn(5, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="at least one preterminal"):
        DenseRules(torch.randn(2, 2, 2))
    d = PCFG(torch.zeros(2, dtype=D), rules, term)
    bad = d.argmax.clone()
    bad[0, 1, 1] += 1
    with pytest.raises(ValueError, match="well-formed"):
        d.score(bad)


# ---- issue 11: the edge cases a user hits ----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_padded_length_one_batch(kind):
    """A batch of one-word sentences (n = 1): every method works and matches brute force."""
    c = Case(kind, n=1, lengths=(1, 1), seed=20)
    d = c.d
    _check_against_brute(c)
    assert d.mbr().tolist() == d.argmax.tolist()
    s = d.sample((5,), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(d.log_prob(s)).all()
    assert d.span_marginals.shape == (2, 1, 1) and (d.span_marginals == 1).all()


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_dtypes_fail_up_front_naming_the_arguments(kind):
    rules64 = random_rules(kind, 2, 2)
    with pytest.raises(TypeError, match=r"rules has dtype torch.float64.*terminal has dtype "
                                        r"torch.float32"):
        PCFG(torch.randn(4), rules64, torch.randn(1, 3, 2))
    with pytest.raises(TypeError, match=r"root has dtype torch.float64.*terminal"):
        PCFG(torch.randn(4, dtype=D), random_rules(kind, 2, 2, dtype=torch.float32),
             torch.randn(1, 3, 2))
    # inside a factor, too
    p = list(rules64.parameters())
    p[-1] = p[-1].float()
    if len(p) > 1:
        with pytest.raises(TypeError, match=r"(children|left|right) has dtype torch.float32"):
            type(rules64)(*p)


@pytest.mark.parametrize("kind", KINDS)
def test_all_neg_inf_root_row_is_rejected(kind):
    def edit(c):
        c.root[1] = NEG

    with pytest.raises(ValueError, match=r"root \(shape \(3, 4\)\) has a row that is all -inf"):
        Case(kind, root_batched=True, edit=edit)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_rules", [False, True])
def test_unparseable_sentence_is_flagged_and_does_not_poison_the_batch(layout, batch_rules,
                                                                       monkeypatch):
    """No preterminal emits word 1 of sentence 1: that sentence is impossible; sentences 0
    (longer) and 2 (one word) are answered as if alone."""

    def edit(c):
        c.term[1, 1] = NEG
        c.term[2, 2:] = NEG  # -inf in padding is ignored

    kind = _kind(layout, monkeypatch)
    c = Case(kind, n=4, lengths=(4, 3, 1), seed=21, batch_rules=batch_rules, edit=edit)
    d = c.d
    _check_against_brute(c)  # sentence 1: log Z = max = -inf, marginals 0, entropy 0
    assert d.possible.tolist() == [True, False, True]
    sentinel = torch.full((7, 3), -1)
    assert torch.equal(d.argmax[1], sentinel) and torch.equal(d.mbr()[1], sentinel)
    assert d.entropy()[1] == 0 and (d.marginals[1] == 0).all()
    assert (d.span_marginals[1] == 0).all()
    lp = d.log_prob(d.argmax)
    assert torch.isfinite(lp[[0, 2]]).all() and lp[1] == NEG
    s = d.sample((20,), generator=torch.Generator().manual_seed(1))
    assert (s[:, 1] == -1).all() and (s[:, [0, 2], 0, 0] == 0).all()
    lps = d.log_prob(s)
    assert torch.isfinite(lps[:, [0, 2]]).all() and (lps[:, 1] == NEG).all()
    assert (d.to_chart(s)[:, 1] == 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_impossible_sentences_give_no_nan_gradients(layout, monkeypatch):
    kind = _kind(layout, monkeypatch)
    gen = torch.Generator().manual_seed(22)
    rules = random_rules(kind, 2, 2, rank=2, generator=gen)
    params = [t.clone().requires_grad_(True) for t in rules.parameters()]
    term = torch.randn(3, 4, 2, dtype=D, generator=gen)
    term[1, 2] = NEG
    term = term.requires_grad_(True)
    root = torch.randn(4, dtype=D, generator=gen)
    root[0] = NEG  # nonterminal 0 never the root
    root = root.requires_grad_(True)
    d = PCFG(root, type(rules)(*params), term, torch.tensor([4, 3, 1]))
    loss = d.log_partition[torch.isfinite(d.log_partition)].sum() + d.entropy().sum()
    assert d.span_marginals.requires_grad and (d.span_marginals[1] == 0).all()
    loss = loss + (d.span_marginals * torch.rand(3, 4, 4, dtype=D, generator=gen)).sum()
    grads = torch.autograd.grad(loss, [root, term, *params])
    for g in grads:
        assert not torch.isnan(g).any()
    assert (grads[1][1] == 0).all()  # nothing flows from an impossible sentence


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_naming_the_argument(dtype):
    root, rules = torch.randn(4, dtype=dtype), DenseRules(torch.randn(2, 4, 4, dtype=dtype))
    with pytest.raises(TypeError, match=rf"has dtype {dtype}.*float32 or float64"):
        _ = PCFG(root, rules, torch.randn(1, 3, 2, dtype=dtype)).log_partition
