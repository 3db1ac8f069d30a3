"""Inside algorithms: padding, precision, kinds agreeing, Viterbi chart and MBR."""

import pytest
import torch
from brute_structures import random_rules

from lorank.dp import inside as dp

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
