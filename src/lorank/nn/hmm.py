"""Neural HMMs: ``forward(x, lengths) -> lorank.HMM`` (or ``lorank.RankSpaceHMM``).

The parameterizations of Chiu & Rush (2020) and Chiu, Deng & Rush (2021), one module,
four transitions (``model``):

* ``"hmm"``: the softmax HMM baseline, ``P = softmax(f(E) N^T / sqrt(d))`` (dense Z x Z);
* ``"lhmm"``: ``P ∝ phi(f(E)) phi(N)^T`` with ``phi(X) = exp(X W)``, W (d, R) a learned
  projection initialized with orthogonal random features; each step costs O(Z R);
* ``"lhmm_band"``: the LHMM plus a learned band of width w, jointly normalized
  (``LowRank + Banded``);
* ``"rank_space"``: the LHMM's parameters, marginalized in rank space (Yang, Liu & Tu 2022).

E (Z, d) are state embeddings (shared with the emission head), N (Z, d) next-state
embeddings (also giving the initial distribution ``softmax(N s / sqrt(d))``), f a residual MLP,
as in Chiu & Rush (2020).  (Deriving N from E through a second MLP instead trains far worse:
on a toy cyclic language the dense model stayed at unigram perplexity.)  Emissions come from
an :class:`~lorank.nn.emissions.EmissionHead` (softmax over words, Bernoulli piano keys, ...).

Regularization as in the papers, active only in training mode and driven by an explicit
``torch.Generator`` (so data-parallel ranks and resumed runs draw the same subsets):

* state dropout: each batch uses a random subset of ``round(Z (1 - p))`` states: init,
  transition and emission are all restricted to it (a smaller HMM, hence also faster);
* feature dropout: each batch keeps a random subset of ``round(R (1 - p))`` rank features
  (dropping a feature zeroes a column of ``phi``; the row normalization absorbs the usual
  ``1 / (1 - p)`` rescaling).

Evaluation (``model.eval()``) uses every state and feature.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lorank._numerics import gumbel_argmax
from lorank.distributions.hmm import HMM, RankSpaceHMM
from lorank.factors import Banded, Dense, Factor, LowRank, orthogonal_random_features
from lorank.nn.emissions import EmissionHead, SoftmaxEmission, residual_mlp

MODELS = ("hmm", "lhmm", "lhmm_band", "rank_space")
_ALIASES = {"dense": "hmm", "softmax": "hmm", "lhmm+band": "lhmm_band", "band": "lhmm_band",
            "rankspace": "rank_space", "rank-space": "rank_space"}  # fmt: skip
#: band width of "lhmm_band" when none is given
DEFAULT_BAND = 4
#: standard deviation of the initial transition log-potentials (dense logits; LHMM log-features)
INIT_SCALE = 3.0


def canonical_model(name: str) -> str:
    """The canonical model name, or a ValueError listing the known ones."""
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return key


def default_rank(num_states: int) -> int:
    """Z / 4, the largest rank of the paper's sweeps."""
    return max(1, num_states // 4)


def _check_prob(name: str, p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")
    return float(p)


def _subset(n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """A sorted random subset of ``max(1, round(n (1 - p)))`` indices of range(n)."""
    keep = max(1, round(n * (1.0 - p)))
    return torch.randperm(n, generator=generator)[:keep].sort().values


class NeuralHMM(nn.Module):
    """An HMM with embedding-parameterized init/transition and a pluggable emission head.

    Args:
        num_states: Z.
        emission: the emission head (its ``hidden`` is the embedding size d).
        model: ``"hmm"``, ``"lhmm"``, ``"lhmm_band"`` or ``"rank_space"``.
        rank: R of the low-rank models (default Z / 4); must be <= Z.
        band: band width w of ``"lhmm_band"`` (default 4).
        mlp_layers: residual layers of the transition MLP f.
        state_dropout, feature_dropout: probabilities in [0, 1) (see the module docstring).
        memory_light: the LowRank chain's memory-light backward (``"lhmm"`` only).
        init_scale: standard deviation of the initial transition log-potentials: dense
            logits ``f(E) N^T / sqrt(d)`` and LHMM log-features ``f(E) W``, ``N W``.  With 1,
            the initial rows of P are nearly uniform (for the LHMM a sum of R similar
            exponentials) and training sits near unigram perplexity for a long time; with 3
            (the default) a 1024-state LHMM on Shakespeare reached validation perplexity ~320
            after 100 steps instead of ~430 (dense HMM: ~300 instead of ~450).
    """

    def __init__(
        self,
        num_states: int,
        emission: EmissionHead,
        model: str = "lhmm",
        rank: int | None = None,
        band: int | None = None,
        mlp_layers: int = 2,
        state_dropout: float = 0.0,
        feature_dropout: float = 0.0,
        memory_light: bool = False,
        init_scale: float = INIT_SCALE,
    ):
        super().__init__()
        if isinstance(num_states, bool) or not isinstance(num_states, int) or num_states < 1:
            raise ValueError(f"num_states must be a positive integer, got {num_states!r}")
        if not isinstance(emission, EmissionHead):
            raise TypeError(f"emission must be an EmissionHead, got {type(emission).__name__}")
        self.model = canonical_model(model)
        z, d = num_states, emission.hidden
        self.num_states, self.hidden = z, d
        self.low_rank = self.model != "hmm"
        if self.low_rank:
            rank = default_rank(z) if rank is None else rank
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"rank must be a positive integer, got {rank!r}")
            if rank > z:
                raise ValueError(
                    f"rank ({rank}) must be at most the number of states ({z}): a low-rank "
                    f"transition with R > Z is no cheaper than the dense one"
                )
        else:
            rank = None
        self.rank = rank
        if self.model == "lhmm_band":
            band = DEFAULT_BAND if band is None else band
            if isinstance(band, bool) or not isinstance(band, int) or band < 0:
                raise ValueError(f"band must be a nonnegative integer, got {band!r}")
        elif band:
            raise ValueError(f"band={band} needs model 'lhmm_band', got {self.model!r}")
        else:
            band = None
        self.band = band
        self.state_dropout = _check_prob("state_dropout", state_dropout)
        self.feature_dropout = _check_prob("feature_dropout", feature_dropout)
        if memory_light and self.model != "lhmm":
            raise ValueError(f"memory_light needs model 'lhmm', got {self.model!r}")
        self.memory_light = bool(memory_light)

        if not (isinstance(init_scale, (int, float)) and init_scale > 0):
            raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
        self.state_emb = nn.Parameter(torch.randn(z, d))
        # f(E) has unit-variance coordinates (LayerNorm), N ~ N(0, 1): dense logits
        # f(E) N^T / sqrt(d) and log-features f(E) W, N W have standard deviation init_scale
        self.next_emb = nn.Parameter(torch.randn(z, d) * (1.0 if self.low_rank else init_scale))
        self.prev_mlp = residual_mlp(d, mlp_layers)
        self.start = nn.Parameter(torch.zeros(d))
        if self.low_rank:
            w = orthogonal_random_features(d, rank) * (init_scale / math.sqrt(d))
            self.projection = nn.Parameter(w)
        if self.band is not None:
            self.band_out = nn.Linear(d, 2 * self.band + 1)
        self.emission = emission

    # ---- pieces ----------------------------------------------------------------------------
    def init_logits(self, states: torch.Tensor | None = None) -> torch.Tensor:
        """Initial-state logits (Z',) over ``states`` (all if None)."""
        nxt = self.next_emb if states is None else self.next_emb[states]
        return nxt @ self.start / math.sqrt(self.hidden)

    def transition(
        self,
        emb: torch.Tensor | None = None,
        states: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> Factor:
        """The transition factor over ``states`` (sorted indices; all if None) using rank
        ``features`` (indices; all if None)."""
        if emb is None:
            emb = self.state_emb if states is None else self.state_emb[states]
        prev = self.prev_mlp(emb)
        nxt = self.next_emb if states is None else self.next_emb[states]
        if not self.low_rank:
            return Dense(prev @ nxt.T / math.sqrt(self.hidden))
        w = self.projection if features is None else self.projection[:, features]
        factor: Factor = LowRank(prev @ w, nxt @ w)
        if self.band is not None:
            factor = factor + Banded(self._band_logits(prev, states), self.band)
        return factor

    def _band_logits(self, prev: torch.Tensor, states: torch.Tensor | None) -> torch.Tensor:
        """Band logits (Z', 2w+1) over the kept states.  The band links states whose *full*
        indices differ by at most w; among sorted kept states those pairs lie within w
        positions of each other, so they fit a width-w band of the subset."""
        full = self.band_out(prev)  # offsets in full index space
        if states is None:
            return full
        w, zs = self.band, prev.shape[0]
        st = states.to(prev.device)
        i = torch.arange(zs, device=prev.device).unsqueeze(-1)
        j = i + torch.arange(-w, w + 1, device=prev.device)
        jc = j.clamp(0, zs - 1)
        off = st[jc] - st[i]  # full-index offset of subset neighbour j
        ok = (j >= 0) & (j < zs) & (off.abs() <= w)
        vals = full.gather(-1, (off + w).clamp(0, 2 * w))
        return torch.where(ok, vals, torch.full_like(vals, -math.inf))

    def sample_dropout(
        self, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(states, features) index subsets for one training batch (None: keep all)."""
        if not self.training:
            return None, None
        states = features = None
        if self.state_dropout > 0:
            states = _subset(self.num_states, self.state_dropout, generator)
        if self.low_rank and self.feature_dropout > 0:
            features = _subset(self.rank, self.feature_dropout, generator)
        return states, features

    # ---- the distribution for a batch ------------------------------------------------------
    def forward(
        self,
        x,
        lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> HMM | RankSpaceHMM:
        """The posterior distribution for observations ``x`` (the head's format, batch
        first) with ``lengths`` (B,).  ``-dist.log_partition`` is the NLL of each sequence.
        In training mode, state/feature dropout draw from ``generator``."""
        states, features = self.sample_dropout(generator)
        if states is not None:
            states = states.to(self.state_emb.device)
        if features is not None:
            features = features.to(self.state_emb.device)
        emb = self.state_emb if states is None else self.state_emb[states]
        init = self.init_logits(states)
        trans = self.transition(emb, states, features)
        em = self.emission(emb, x)
        if self.model == "rank_space":
            return RankSpaceHMM(init, trans, em, lengths)
        return HMM(init, trans, em, lengths, memory_light=self.memory_light)

    # ---- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def sample_paths(
        self, num: int, length: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Ancestral samples from the prior: (state paths (num, length), observations per
        step [head.sample(...)] of length ``length``).  Uses every state."""
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"num must be a positive integer, got {num!r}")
        emb = self.state_emb
        init = self.init_logits().log_softmax(-1).float().cpu()
        trans = self.transition(emb)
        z = gumbel_argmax(init.expand(num, -1), generator)
        paths, obs = [], []
        for t in range(length):
            if t > 0:
                rows = trans.log_prob_rows(z.to(emb.device)).float().cpu()
                z = gumbel_argmax(rows, generator)
            paths.append(z)
            obs.append(self.emission.sample(emb[z.to(emb.device)], generator))
        return torch.stack(paths, 1), obs

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return (
            f"model={self.model!r}, states={self.num_states}, rank={self.rank}, "
            f"band={self.band}, state_dropout={self.state_dropout}, "
            f"feature_dropout={self.feature_dropout}"
        )


class HMMLanguageModel(NeuralHMM):
    """A word-level HMM language model: :class:`NeuralHMM` with a
    :class:`~lorank.nn.emissions.SoftmaxEmission` over ``vocab_size`` words.

    Each sentence (ending with ``<eos>``) is one HMM sequence; ``-log_partition`` summed over
    a batch divided by its token count (``<eos>`` included) is the per-token NLL and
    ``exp`` of it over a corpus the perplexity.  :meth:`config` holds the constructor's
    arguments (JSON) so a checkpoint can rebuild the model with :meth:`from_config`.
    """

    def __init__(
        self,
        vocab_size: int,
        num_states: int,
        model: str = "lhmm",
        rank: int | None = None,
        band: int | None = None,
        hidden: int = 256,
        mlp_layers: int = 2,
        state_dropout: float = 0.0,
        feature_dropout: float = 0.0,
        memory_light: bool = False,
        init_scale: float = INIT_SCALE,
    ):
        super().__init__(
            num_states,
            SoftmaxEmission(vocab_size, hidden, mlp_layers),
            model=model,
            rank=rank,
            band=band,
            mlp_layers=mlp_layers,
            state_dropout=state_dropout,
            feature_dropout=feature_dropout,
            memory_light=memory_light,
            init_scale=init_scale,
        )
        self.vocab_size = vocab_size
        self._config = {
            "vocab_size": vocab_size,
            "num_states": num_states,
            "model": self.model,
            "rank": self.rank,
            "band": self.band,
            "hidden": hidden,
            "mlp_layers": mlp_layers,
            "state_dropout": self.state_dropout,
            "feature_dropout": self.feature_dropout,
            "memory_light": self.memory_light,
        }

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HMMLanguageModel:
        return cls(**config)

    @torch.no_grad()
    def generate(
        self,
        num: int,
        eos_id: int,
        max_length: int = 50,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """``num`` sentences sampled from the model, each cut after its first ``eos_id``
        (included) or at ``max_length`` tokens."""
        _, obs = self.sample_paths(num, max_length, generator)
        words = torch.stack(obs, 1).tolist()
        out = []
        for row in words:
            out.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
        return out


__all__ = [
    "MODELS",
    "DEFAULT_BAND",
    "INIT_SCALE",
    "NeuralHMM",
    "HMMLanguageModel",
    "canonical_model",
    "default_rank",
]
