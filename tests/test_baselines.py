"""lorank.baselines against brute-force computations on tiny data."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from lorank.baselines import (
    IndependentKeys,
    NgramLM,
    evaluate_lm,
    fit_independent_keys,
    fit_ngram,
)
from lorank.data.text import EOS, build_corpus

TRAIN = ["the cat sat", "the dog sat on the cat", "a dog", "the the cat"]
VALID = ["the cat", "a bird sat"]
TEST = ["dog sat the", "cat"]


@pytest.fixture
def corpus():
    splits = {
        "train": [s.split() for s in TRAIN],
        "valid": [s.split() for s in VALID],
        "test": [s.split() for s in TEST],
    }
    return build_corpus("tiny", splits, vocab_size=6)  # forces some <unk>


def _brute_nll(corpus, split: str, order: int, k: float) -> tuple[float, int]:
    """Plain-Python add-k n-gram NLL: sentence by sentence, start context <eos>."""
    vocab = corpus.vocab
    V = len(vocab)
    tok = lambda w: w if w in vocab.stoi else "<unk>"  # noqa: E731
    train = [[tok(w) for w in s.split()] + [EOS] for s in TRAIN]
    uni = Counter(w for s in train for w in s)
    n = sum(uni.values())
    big, ctx = Counter(), Counter()
    for s in train:
        for u, w in zip([EOS, *s[:-1]], s, strict=True):
            big[u, w] += 1
            ctx[u] += 1
    text = {"valid": VALID, "test": TEST}[split]
    total, count = 0.0, 0
    for line in text:
        s = [tok(w) for w in line.split()] + [EOS]
        for u, w in zip([EOS, *s[:-1]], s, strict=True):
            if order == 1:
                p = (uni[w] + k) / (n + k * V)
            else:
                p = (big[u, w] + k) / (ctx[u] + k * V)
            total -= math.log(p)
            count += 1
    return total, count


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("k", [0.01, 0.5, 1.0])
def test_ngram_matches_brute_force(corpus, order, k):
    model, _ = fit_ngram(corpus, order, k=k)
    for split in ("valid", "test"):
        want, count = _brute_nll(corpus, split, order, k)
        got, n = model.nll(getattr(corpus, split))
        assert n == count  # every token predicted, <eos> included
        assert got == pytest.approx(want, rel=1e-12)
        assert model.perplexity(corpus.sentences(split)) == pytest.approx(math.exp(want / count))
    # the stream and the sentences one by one give the same numbers
    sents = corpus.sentences("valid")
    per_sentence = sum(model.nll([s])[0] for s in sents)
    assert per_sentence == pytest.approx(model.nll(corpus.valid)[0], rel=1e-12)


def test_bigram_rows_normalize(corpus):
    model = NgramLM.fit(corpus.train, len(corpus.vocab), 2, 0.3, corpus.vocab.eos_id)
    V = len(corpus.vocab)
    for u in range(V):
        # stream [u, w]: the second token is predicted from context u
        lp = torch.stack([model.token_log_probs(torch.tensor([u, w]))[1] for w in range(V)])
        assert float(lp.exp().sum()) == pytest.approx(1.0, abs=1e-12)


def test_k_chosen_on_validation(corpus):
    grid = (0.001, 0.03, 0.3, 3.0)
    model, scores = fit_ngram(corpus, 2, grid=grid)
    brute = {g: math.exp(_brute_nll(corpus, "valid", 2, g)[0] / 7) for g in grid}
    assert set(scores) == set(grid)
    for g in grid:
        assert scores[g] == pytest.approx(brute[g])
    assert model.k == min(brute, key=brute.get)
    out = evaluate_lm(model, corpus)
    assert out["valid_tokens"] == 7 and out["test_tokens"] == 6
    assert out["valid_ppl"] == pytest.approx(brute[model.k])


def test_ngram_rejects_bad_arguments(corpus):
    with pytest.raises(ValueError, match="order"):
        NgramLM.fit(corpus.train, len(corpus.vocab), 3, 1.0, 1)
    with pytest.raises(ValueError, match="k must be"):
        NgramLM.fit(corpus.train, len(corpus.vocab), 2, 0.0, 1)
    with pytest.raises(ValueError, match="token ids"):
        NgramLM.fit(corpus.train, 3, 2, 1.0, 1)


def test_independent_keys_brute_force():
    g = torch.Generator().manual_seed(0)
    train = [torch.rand(t, 88, generator=g) < 0.1 for t in (5, 9, 3)]
    valid = [torch.rand(t, 88, generator=g) < 0.1 for t in (4, 6)]
    alpha = 0.5
    model = IndependentKeys.fit(train, alpha)
    steps = 17
    on = [sum(int(r[:, k].sum()) for r in train) for k in range(88)]
    p = [(on[k] + alpha) / (steps + 2 * alpha) for k in range(88)]
    total = 0.0
    for r in valid:
        for t in range(r.shape[0]):
            for k in range(88):
                total -= math.log(p[k] if r[t, k] else 1 - p[k])
    assert model.nll(valid) == (pytest.approx(total, rel=1e-12), 10)
    assert model.nll_per_step(valid) == pytest.approx(total / 10, rel=1e-12)
    music = SimpleNamespace(train=train, valid=valid, test=valid[:1])
    best, out = fit_independent_keys(music, grid=(0.01, 0.5, 5.0))
    brute = {a: IndependentKeys.fit(train, a).nll_per_step(valid) for a in (0.01, 0.5, 5.0)}
    assert best.alpha == min(brute, key=brute.get)
    assert out["valid_nll_per_step"] == pytest.approx(brute[best.alpha])
    assert "test_nll_per_step" in out
