"""Inside algorithms: padding, precision, kinds agreeing, Viterbi chart and MBR."""

import pytest
import torch
from brute_structures import random_rules

from lorank.dp import inside as dp
from lorank.dp import rank_inside

D = torch.float64
KINDS = ["dense", "low_rank", "cp", "rank_space"]


def _root(m, p, dtype=D):
    return torch.log_softmax(torch.randn(m + p, dtype=dtype), -1).expand(3, m + p)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_does_not_change_shorter_sentences(kind):
    gen = torch.Generator().manual_seed(0)
    m, p = 4, 3
    rules = random_rules(kind, m, p, rank=3, generator=gen)
    term = torch.randn(3, 7, p, dtype=D, generator=gen)
    root = _root(m, p)
    lengths = torch.tensor([7, 4, 1])
    full = dp.inside(root, rules, term, lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = dp.inside(root[b : b + 1], rules, term[b : b + 1, :n], torch.tensor([n]))
        torch.testing.assert_close(full[b], alone[0])
    # garbage (even -inf) in the padding is ignored
    term2 = term.clone()
    term2[1, 4:] = float("-inf")
    torch.testing.assert_close(dp.inside(root, rules, term2, lengths), full)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_long_sentence_matches_float64(kind):
    gen = torch.Generator().manual_seed(1)
    m, p, n = 10, 12, 30
    rules = random_rules(kind, m, p, rank=6, generator=gen, scale=2.0)
    term = 3 * torch.randn(2, n, p, dtype=D, generator=gen) - 5
    root = _root(m, p)[:2]
    lengths = torch.tensor([30, 17])
    want = dp.inside(root, rules, term, lengths)
    rules32 = type(rules)(*[t.float() for t in rules.parameters()])
    got = dp.inside(root.float(), rules32, term.float(), lengths)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


def test_kinds_share_gradients():
    gen = torch.Generator().manual_seed(2)
    cp = random_rules("cp", 5, 4, rank=3, generator=gen)
    term = torch.randn(2, 6, 4, dtype=D, generator=gen)
    root = _root(5, 4)[:2]
    lengths = torch.tensor([6, 5])
    grads = []
    for kind in ("children", "cp", "rank_space"):
        head = cp.head.clone().requires_grad_(True)
        r = type(cp)(head, cp.left, cp.right)
        dp.inside(root, r, term, lengths, kind=kind).sum().backward()
        grads.append(head.grad)
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], grads[2])


def test_rank_space_rejects_label_charts():
    rules = random_rules("rank_space", 2, 2)
    term = torch.randn(1, 3, 2, dtype=D)
    with pytest.raises(ValueError, match="rank-space"):
        dp.inside(_root(2, 2)[:1], rules, term, torch.tensor([3]), return_chart=True)


def test_max_chart_chunking_is_exact():
    gen = torch.Generator().manual_seed(3)
    rules = random_rules("dense", 4, 3, generator=gen)
    term = torch.randn(2, 6, 3, dtype=D, generator=gen)
    lengths = torch.tensor([6, 4])
    a = dp.max_chart(rules.log_probs(), term, lengths)
    b = dp.max_chart(rules.log_probs(), term, lengths, max_chunk_elements=7)
    torch.testing.assert_close(a, b)


def test_mbr_spans_single_word_and_shape():
    marg = torch.rand(2, 4, 4, dtype=D)
    spans = dp.mbr_spans(marg, torch.tensor([4, 1]))
    assert len(spans[0]) == 7 and spans[0][0] == (0, 4)
    assert spans[1] == [(0, 1)]


# ---- the hand-written outside pass of the CP / rank-space inside (lorank.dp.rank_inside) ----


def _split_inputs(rank_space, batched, gen, n=4, b=3, m=3, r=2, dtype=D, neg=False):
    """Random inputs of rank_inside.SplitInside: log word projections, H^T, [L|R] matrices,
    root, span and label potentials (``neg``: with -inf entries and a dead word)."""
    lead = (b,) if batched else ()

    def rnd(*shape, low=0.1):
        return (torch.rand(*shape, dtype=dtype, generator=gen) + low)

    lproj1 = torch.randn(b, n, r, dtype=dtype, generator=gen)
    rproj1 = torch.randn(b, n, r, dtype=dtype, generator=gen)
    if neg:
        lproj1[0, 1, 0] = float("-inf")
        rproj1[1, 2] = float("-inf")  # a word that is never a right child
    k = r if rank_space else m
    h_t = None if rank_space else rnd(*lead, r, m)
    mx = rnd(*lead, k, 2 * r)
    root = torch.randn(b, k, dtype=dtype, generator=gen)
    if neg:
        root[2, 0] = float("-inf")
    span = torch.randn(b, n, n + 1, dtype=dtype, generator=gen)
    label = None if rank_space else torch.randn(b, n, n + 1, m, dtype=dtype, generator=gen)
    return [lproj1, rproj1, h_t, mx, root, span, label]


@pytest.mark.parametrize("rank_space", [True, False])
@pytest.mark.parametrize("batched", [False, True])
def test_split_inside_gradcheck(rank_space, batched):
    gen = torch.Generator().manual_seed(10)
    inputs = _split_inputs(rank_space, batched, gen)
    lengths = torch.tensor([4, 3, 2])  # (one-word sentences give -inf: no finite difference)
    leaves = [None if t is None else t.requires_grad_(True) for t in inputs]

    def f(*xs):
        return rank_inside.SplitInside.apply(*xs, lengths)

    assert torch.autograd.gradcheck(f, leaves)
    # second order: the backward under create_graph recomputes the pass with autograd
    live = [t for t in leaves if t is not None]

    def g(*xs):
        it = iter(xs)
        return f(*[None if t is None else next(it) for t in leaves])

    assert torch.autograd.gradgradcheck(g, live, fast_mode=True)


@pytest.mark.parametrize("rank_space", [True, False])
def test_outside_pass_equals_autograd_with_neg_inf_and_zeros(rank_space):
    """The hand-written backward equals autograd through the same (tracked) forward, also
    with -inf word projections, a -inf root weight and a zero matrix column."""
    gen = torch.Generator().manual_seed(11)
    inputs = _split_inputs(rank_space, False, gen, n=6, neg=True)
    inputs[3][:, 1] = 0.0  # a rank the projections never reach
    lengths = torch.tensor([6, 4, 2])
    grad = torch.rand(3, dtype=D, generator=gen)
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in inputs]
    logz = rank_inside.SplitInside.apply(*leaves, lengths)
    live = [t for t in leaves if t is not None]
    ours = torch.autograd.grad(logz, live, grad)
    ref_leaves = [None if t is None else t.clone().requires_grad_(True) for t in inputs]
    ref, _, _ = rank_inside.forward_pass(*ref_leaves, lengths, track=True)
    torch.testing.assert_close(logz, ref)
    want = torch.autograd.grad(ref, [t for t in ref_leaves if t is not None], grad)
    for a, w in zip(ours, want, strict=True):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, w)


@pytest.mark.parametrize("kind", ["cp", "rank_space"])
def test_float32_gradients_match_float64(kind):
    gen = torch.Generator().manual_seed(12)
    m, p, n = 10, 12, 24
    rules = random_rules(kind, m, p, rank=6, generator=gen, scale=2.0)
    term = 3 * torch.randn(2, n, p, dtype=D, generator=gen) - 5
    root = _root(m, p)[:2]
    lengths = torch.tensor([24, 13])
    grads = []
    for dt in (D, torch.float32):
        ps = [t.detach().to(dt).requires_grad_(True) for t in rules.parameters()]
        te = term.detach().to(dt).requires_grad_(True)
        dp.inside(root.to(dt), type(rules)(*ps), te, lengths).sum().backward()
        grads.append([t.grad.double() for t in (*ps, te)])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
