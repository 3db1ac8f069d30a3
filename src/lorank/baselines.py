"""Count-based baselines: add-k unigram/bigram language models and an independent-keys
Bernoulli model for piano rolls.

Token accounting is the one the HMM language models use: every token of every sentence is
predicted, ``<eos>`` included, none is given; the first token of a sentence is predicted from
the sentence start, which the bigram model represents by the context ``<eos>`` (the end of the
previous sentence), so scoring a corpus's concatenated stream and scoring its sentences one by
one give the same number.  ``perplexity = exp(total NLL / number of predicted tokens)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: add-k values tried on validation when none is given
K_GRID: tuple[float, ...] = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
#: pseudo-counts tried for the Bernoulli baseline
ALPHA_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0)

__all__ = [
    "NgramLM",
    "fit_ngram",
    "unigram_lm",
    "bigram_lm",
    "evaluate_lm",
    "IndependentKeys",
    "fit_independent_keys",
    "K_GRID",
    "ALPHA_GRID",
]


def _as_stream(data: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """A 1-D id stream from a stream or a list of sentences (each ending with <eos>)."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 1:
            raise ValueError(f"an id stream must be 1-D, got shape {tuple(data.shape)}")
        return data.long()
    if len(data) == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([s.reshape(-1).long() for s in data])


@dataclass
class NgramLM:
    """An add-k smoothed unigram (``order=1``) or bigram (``order=2``) model over ``vocab_size``
    tokens (``<unk>`` and ``<eos>`` included, both predictable).

    ``p(w) = (c(w) + k) / (N + k V)``;  ``p(w | u) = (c(u, w) + k) / (c(u) + k V)``.
    Bigram counts are stored sparsely (sorted keys ``u * V + w``)."""

    order: int
    vocab_size: int
    k: float
    eos_id: int
    unigram: torch.Tensor  # (V,) float64 counts
    context: torch.Tensor  # (V,) float64 counts of each context (bigram)
    pair_keys: torch.Tensor  # (P,) sorted long keys u * V + w (bigram)
    pair_counts: torch.Tensor  # (P,) float64

    @classmethod
    def fit(
        cls,
        train: torch.Tensor | Sequence[torch.Tensor],
        vocab_size: int,
        order: int,
        k: float,
        eos_id: int,
    ) -> NgramLM:
        """Count on ``train`` (a stream or sentences, each ending with ``eos_id``)."""
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        if not k > 0:
            raise ValueError(f"k must be > 0, got {k!r}")
        ids = _as_stream(train)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}"
            )
        uni = torch.bincount(ids, minlength=vocab_size).double()
        if order == 2:
            prev = torch.cat([torch.tensor([eos_id]), ids[:-1]])
            keys, counts = torch.unique(prev * vocab_size + ids, return_counts=True)
            context = torch.bincount(prev, minlength=vocab_size).double()
            counts = counts.double()
        else:
            keys = torch.zeros(0, dtype=torch.long)
            counts = torch.zeros(0, dtype=torch.float64)
            context = torch.zeros(vocab_size, dtype=torch.float64)
        return cls(order, vocab_size, float(k), eos_id, uni, context, keys, counts)

    def with_k(self, k: float) -> NgramLM:
        """The same counts with another ``k``."""
        if not k > 0:
            raise ValueError(f"k must be > 0, got {k!r}")
        return NgramLM(self.order, self.vocab_size, float(k), self.eos_id, self.unigram,
                       self.context, self.pair_keys, self.pair_counts)

    def token_log_probs(self, data: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """log p of every token of ``data`` (float64, same length as the stream)."""
        ids = _as_stream(data)
        V, k = self.vocab_size, self.k
        if self.order == 1:
            return torch.log((self.unigram[ids] + k) / (self.unigram.sum() + k * V))
        prev = torch.cat([torch.tensor([self.eos_id]), ids[:-1]])
        keys = prev * V + ids
        pos = torch.searchsorted(self.pair_keys, keys).clamp_max(max(len(self.pair_keys) - 1, 0))
        if len(self.pair_keys):
            hit = self.pair_keys[pos] == keys
            c = torch.where(hit, self.pair_counts[pos], torch.zeros((), dtype=torch.float64))
        else:
            c = torch.zeros(ids.shape, dtype=torch.float64)
        return torch.log((c + k) / (self.context[prev] + k * V))

    def nll(self, data: torch.Tensor | Sequence[torch.Tensor]) -> tuple[float, int]:
        """(total negative log-likelihood in nats, number of predicted tokens)."""
        lp = self.token_log_probs(data)
        return float(-lp.sum()), int(lp.numel())

    def perplexity(self, data: torch.Tensor | Sequence[torch.Tensor]) -> float:
        total, n = self.nll(data)
        return math.exp(total / n)


def fit_ngram(corpus, order: int, k: float | None = None, grid: Sequence[float] = K_GRID):
    """Fit on ``corpus.train``; if ``k`` is None pick it from ``grid`` by validation
    perplexity.  Returns ``(model, valid_perplexities: dict[k, ppl])``."""
    base = NgramLM.fit(corpus.train, len(corpus.vocab), order, 1.0, corpus.vocab.eos_id)
    if k is not None:
        model = base.with_k(k)
        return model, {float(k): model.perplexity(corpus.valid)}
    scores = {float(g): base.with_k(g).perplexity(corpus.valid) for g in grid}
    best = min(scores, key=scores.__getitem__)
    return base.with_k(best), scores


def unigram_lm(corpus, k: float | None = None, grid: Sequence[float] = K_GRID) -> NgramLM:
    """Add-k unigram model fit on ``corpus.train`` (``k`` chosen on valid if None)."""
    return fit_ngram(corpus, 1, k, grid)[0]


def bigram_lm(corpus, k: float | None = None, grid: Sequence[float] = K_GRID) -> NgramLM:
    """Add-k bigram model fit on ``corpus.train`` (``k`` chosen on valid if None)."""
    return fit_ngram(corpus, 2, k, grid)[0]


def evaluate_lm(model: NgramLM, corpus) -> dict[str, float]:
    """Valid/test perplexity, NLL and token counts of a fitted n-gram model."""
    out: dict[str, float] = {"order": model.order, "k": model.k}
    for split in ("valid", "test"):
        total, n = model.nll(getattr(corpus, split))
        out[f"{split}_nll"] = total
        out[f"{split}_tokens"] = n
        out[f"{split}_ppl"] = math.exp(total / n)
    return out


# --------------------------------------------------------------------------------------------
# music


@dataclass
class IndependentKeys:
    """Each of the 88 keys is an independent Bernoulli with its training marginal:
    ``p_k = (on_k + alpha) / (steps + 2 alpha)``."""

    probs: torch.Tensor  # (88,) float64
    alpha: float

    @classmethod
    def fit(cls, rolls: Sequence[torch.Tensor], alpha: float = 0.5) -> IndependentKeys:
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if len(rolls) == 0:
            raise ValueError("no training pieces")
        on = sum(r.double().sum(0) for r in rolls)
        steps = sum(r.shape[0] for r in rolls)
        return cls((on + alpha) / (steps + 2 * alpha), float(alpha))

    def nll(self, rolls: Sequence[torch.Tensor]) -> tuple[float, int]:
        """(total NLL in nats, number of time steps)."""
        lp1, lp0 = torch.log(self.probs), torch.log1p(-self.probs)
        total, steps = 0.0, 0
        for r in rolls:
            x = r.double()
            total -= float((x @ lp1 + (1 - x) @ lp0).sum())
            steps += x.shape[0]
        return total, steps

    def nll_per_step(self, rolls: Sequence[torch.Tensor]) -> float:
        """Mean NLL per time step (nats), summed over the 88 keys: the number the polyphonic
        music literature reports (total NLL / total time steps)."""
        total, steps = self.nll(rolls)
        return total / steps


def fit_independent_keys(
    music, alpha: float | None = None, grid: Sequence[float] = ALPHA_GRID
) -> tuple[IndependentKeys, dict[str, float]]:
    """Fit on ``music.train`` (alpha chosen on valid if None); return the model and its
    per-step NLL on valid and test (empty splits are skipped)."""
    if alpha is None:
        if not music.valid:
            raise ValueError("choosing alpha needs validation pieces (pass alpha=...)")
        scores = {a: IndependentKeys.fit(music.train, a).nll_per_step(music.valid) for a in grid}
        alpha = min(scores, key=scores.__getitem__)
    model = IndependentKeys.fit(music.train, alpha)
    out: dict[str, float] = {"alpha": alpha}
    for split in ("valid", "test"):
        rolls = getattr(music, split)
        if rolls:
            out[f"{split}_nll_per_step"] = model.nll_per_step(rolls)
    return model, out
