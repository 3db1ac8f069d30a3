"""Neural HMMs: ``forward(x, lengths) -> lorank.HMM`` (or ``lorank.RankSpaceHMM``).

The parameterizations of Chiu & Rush (2020) and Chiu, Deng & Rush (2021), one module,
four transitions (:attr:`HMMConfig.model`):

* ``"hmm"``: the softmax HMM baseline, ``P = softmax(f(E) N^T / sqrt(d))`` (dense Z x Z);
* ``"lhmm"``: ``P ∝ phi(f(E)) phi(N)^T`` with ``phi(X) = exp(X W)``, W (d, R) a learned
  projection initialized with orthogonal random features; each step costs O(Z R);
* ``"lhmm_band"``: the LHMM plus a learned band of width w, jointly normalized
  (``LowRank + Banded``);
* ``"rank_space"``: the LHMM's parameters, marginalized in rank space (Yang, Liu & Tu 2022).

A :class:`NeuralHMM` holds the state embeddings E (Z, d) shared with its emission head and a
*transition network* (:class:`TransitionNet`, the submodule ``transition_net``) that maps them
to the initial logits and the transition factor.  Swapping that submodule changes the
transition and nothing else (``lorank.compress.compress_hmm`` puts a fixed low-rank factor
there).  :class:`MLPTransition` is the network above: N (Z, d) next-state embeddings (also
giving the initial distribution ``softmax(N s / sqrt(d))``) and a residual MLP f.

Regularization as in the papers, active only in training mode and driven by an explicit
``torch.Generator`` (so data-parallel ranks and resumed runs draw the same subsets):

* state dropout: each batch uses a random subset of ``round(Z (1 - p))`` states: init,
  transition and emission are all restricted to it (a smaller HMM, hence also faster; the
  kernel form restricts the potentials, the mixture form renormalizes each topic over the
  kept states);
* feature dropout: each batch keeps a random subset of ``round(R (1 - p))`` rank features
  (dropping a feature zeroes a column of ``phi``; the row normalization absorbs the usual
  ``1 / (1 - p)`` rescaling).

Evaluation (``model.eval()``) uses every state and feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorank._checks import check_positive_int
from lorank._gemm import matmul
from lorank._numerics import gumbel_argmax
from lorank.config import Config, option
from lorank.distributions.hmm import HMM, RankSpaceHMM
from lorank.factors import Banded, Dense, Factor, LowRank, orthogonal_random_features
from lorank.nn.emissions import Bernoulli88Emission, EmissionHead, SoftmaxEmission, residual_mlp
from lorank.semiring import log_matmul, safe_logsumexp

MODELS = ("hmm", "lhmm", "lhmm_band", "rank_space")
#: transition networks: "mlp" (Chiu & Rush 2020) or "embedding" (Chiu, Deng & Rush 2021)
TRANSITIONS = ("mlp", "embedding")
#: how log-features make a low-rank transition: "kernel" (Chiu, Deng & Rush 2021) or "mixture"
LOW_RANK_FORMS = ("kernel", "mixture")
MODEL_ALIASES = {"dense": "hmm", "softmax": "hmm", "lhmm+band": "lhmm_band", "band": "lhmm_band",
                 "rankspace": "rank_space"}
#: band width of "lhmm_band" when none is given
DEFAULT_BAND = 4


@dataclass(frozen=True)
class HMMConfig(Config):
    """Settings of a :class:`NeuralHMM`: the transition model, sizes and regularization."""

    #: runs written before these fields existed
    LEGACY = {"transition": "mlp", "init_scale": 3.0, "low_rank_form": "kernel"}

    model: str = option("lhmm", "hmm (dense softmax), lhmm, lhmm_band or rank_space",
                        choices=MODELS)
    num_states: int = option(1024, "number of states Z", flag="--states")
    rank: int | None = option(None, "rank R of the low-rank models (default Z/4)")
    band: int | None = option(None, f"band width w of lhmm_band (default {DEFAULT_BAND})")
    hidden: int = option(256, "embedding size d")
    mlp_layers: int = option(2, "residual layers per MLP")
    transition: str = option("mlp", "transition network: mlp (f(E) shared with the emission, "
                                    "Chiu & Rush 2020) or embedding (transition-only "
                                    "embeddings, shared projection: Chiu, Deng & Rush 2021)",
                             choices=TRANSITIONS)
    low_rank_form: str = option("mixture", "mixture: P = softmax_r(f(E) W) softmax_states(N W)^T;"
                                           " kernel: P ∝ exp(f(E) W) exp(N W)^T (Chiu, Deng & "
                                           "Rush 2021), the same family with the mixture weights "
                                           "coupled to the columns' mass",
                                choices=LOW_RANK_FORMS)
    state_dropout: float = option(0.0, "fraction of states dropped per training batch")
    feature_dropout: float = option(0.0, "fraction of rank features dropped per training batch")
    init_scale: float | None = option(None, "scale of the initial transition log-potentials: "
                                            "their standard deviation for mlp (default 3), a "
                                            "factor on the xavier-uniform embeddings for "
                                            "embedding (default 1)")
    memory_light: bool = option(False, "lhmm: save O(BTR) instead of O(BTZ) for backward",
                                compute_only=True)

    def __post_init__(self) -> None:
        model = self._choice("model", MODELS, MODEL_ALIASES)
        transition = self._choice("transition", TRANSITIONS)
        self._choice("low_rank_form", LOW_RANK_FORMS)
        self._positive_int("num_states", "hidden")
        self._nonnegative_int("mlp_layers")
        self._probability("state_dropout", "feature_dropout")
        if self.init_scale is None:
            self._set("init_scale", 3.0 if transition == "mlp" else 1.0)
        self._positive_float("init_scale")
        z = self.num_states
        self._rank(model != "hmm", max(1, z // 4), z, "rank applies to low-rank models (lhmm, "
                                                      "lhmm_band, rank_space), not to the dense "
                                                      "'hmm'")
        if model == "lhmm_band":
            if self.band is None:
                self._set("band", DEFAULT_BAND)
            self._nonnegative_int("band")
        elif self.band is not None:
            raise self._error("band", f"band applies to model 'lhmm_band' only, got {model!r}")
        if not isinstance(self.memory_light, bool):
            raise self._error("memory_light", f"memory_light must be a bool, got "
                                              f"{self.memory_light!r}")
        if self.memory_light and model != "lhmm":
            raise self._error("memory_light", f"memory_light needs model 'lhmm', got {model!r}")

    @property
    def low_rank(self) -> bool:
        """Whether the transition is a low-rank factor (every model but ``"hmm"``)."""
        return self.model != "hmm"


@dataclass(frozen=True)
class HMMLMConfig(HMMConfig):
    """Settings of an :class:`HMMLanguageModel` (``vocab_size`` comes from the corpus)."""

    vocab_size: int | None = option(None, "number of word types V", cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._positive_int("vocab_size", optional=True)


@dataclass(frozen=True)
class MusicHMMConfig(HMMConfig):
    """Settings of a :class:`MusicHMM` (88-key Bernoulli emissions)."""

    LEGACY = {"transition": "mlp", "init_scale": 1.0, "low_rank_form": "kernel"}

    num_states: int = option(256, "number of states Z", flag="--states")
    hidden: int = option(128, "embedding size d")
    init_scale: float | None = option(1.0, "scale of the initial transition log-potentials "
                                           "(see --task lm)")
    emission_layers: int = option(1, "residual layers of the key-logit MLP (0: linear in the "
                                     "state embedding)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._nonnegative_int("emission_layers")


def _subset(n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """A sorted random subset of ``max(1, round(n (1 - p)))`` indices of range(n)."""
    keep = max(1, round(n * (1.0 - p)))
    return torch.randperm(n, generator=generator)[:keep].sort().values


def low_rank_factor(left: torch.Tensor, right: torch.Tensor, form: str) -> LowRank:
    """``LowRank(left, right)`` for ``form="kernel"``; for ``"mixture"`` the rows' mixture
    weights are ``softmax_r(left)`` whatever the columns: ``left`` is shifted by the log mass
    ``LSE_j right[j, r]`` of each column, which the factor's normalization adds back."""
    if form == "mixture":
        left = left - safe_logsumexp(right, dim=-2).unsqueeze(-2)
    return LowRank(left, right)


class TransitionNet(nn.Module):
    """The interface of a :class:`NeuralHMM`'s transition network.

    ``init_logits(states)`` gives the initial-state logits over ``states`` (sorted indices;
    all if None); ``factor(state_emb, states, features)`` the transition factor over them,
    from the rows ``state_emb`` of the model's state embeddings, keeping only the rank
    ``features`` (indices; all if None) of a low-rank factor.  ``rank`` is the factor's rank
    (None for a dense one).
    """

    rank: int | None = None

    def init_logits(self, states: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def factor(
        self,
        state_emb: torch.Tensor,
        states: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> Factor:
        raise NotImplementedError


class MLPTransition(TransitionNet):
    """``P = softmax(f(E) N^T / sqrt(d))`` (dense), ``P ∝ exp(f(E) W) exp(N W)^T`` (low
    rank) and optionally a learned band ``Banded(g(f(E)), w)`` added to the low-rank part
    (Chiu & Rush 2020; Chiu, Deng & Rush 2021)."""

    def __init__(self, config: HMMConfig):
        super().__init__()
        z, d, s = config.num_states, config.hidden, config.init_scale
        self.low_rank = config.low_rank
        self.rank = config.rank
        self.band = config.band
        self.form = config.low_rank_form
        self.hidden = d
        # f(E) has unit-variance coordinates (LayerNorm), N ~ N(0, 1): dense logits
        # f(E) N^T / sqrt(d) and log-features f(E) W, N W have standard deviation s
        self.next_emb = nn.Parameter(torch.randn(z, d) * (1.0 if self.low_rank else s))
        self.prev_mlp = residual_mlp(d, config.mlp_layers)
        self.start = nn.Parameter(torch.zeros(d))
        if self.low_rank:
            self.projection = nn.Parameter(orthogonal_random_features(d, self.rank) * (s / d**0.5))
        if self.band is not None:
            self.band_out = nn.Linear(d, 2 * self.band + 1)

    def init_logits(self, states: torch.Tensor | None = None) -> torch.Tensor:
        nxt = self.next_emb if states is None else self.next_emb[states]
        return nxt @ self.start / math.sqrt(self.hidden)

    def factor(self, state_emb, states=None, features=None) -> Factor:
        prev = self.prev_mlp(state_emb)
        nxt = self.next_emb if states is None else self.next_emb[states]
        if not self.low_rank:
            return Dense(matmul(prev, nxt.T) / math.sqrt(self.hidden))
        w = self.projection if features is None else self.projection[:, features]
        factor: Factor = low_rank_factor(prev @ w, nxt @ w, self.form)
        if self.band is not None:
            factor = factor + Banded(band_logits(self.band_out(prev), self.band, states),
                                     self.band)
        return factor


def band_logits(full: torch.Tensor, width: int, states: torch.Tensor | None) -> torch.Tensor:
    """Band logits (Z', 2w+1) over the kept ``states`` from the full-index band logits of their
    rows (Z', 2w+1).  The band links states whose *full* indices differ by at most w; among
    sorted kept states those pairs lie within w positions of each other, so they fit a width-w
    band of the subset."""
    if states is None:
        return full
    w, zs = width, full.shape[0]
    st = states.to(full.device)
    i = torch.arange(zs, device=full.device).unsqueeze(-1)
    j = i + torch.arange(-w, w + 1, device=full.device)
    jc = j.clamp(0, zs - 1)
    off = st[jc] - st[i]  # full-index offset of subset neighbour j
    ok = (j >= 0) & (j < zs) & (off.abs() <= w)
    vals = full.gather(-1, (off + w).clamp(0, 2 * w))
    return torch.where(ok, vals, torch.full_like(vals, -math.inf))


class EmbeddingTransition(TransitionNet):
    """The transition network of Chiu, Deng & Rush (2021)'s code: transition-only state
    embeddings U and next-state embeddings V (Z, d), no MLP; ``P = softmax(U V^T)`` (dense) or
    ``P ∝ exp(U W) exp(V W)^T`` (low rank) with one learned projection W (d, R) shared by both
    sides, initialized with orthogonal random features with chi-distributed norms; initial
    logits from a start vector through an MLP g: ``g(s) V^T`` or ``log exp(g(s) W) exp(V W)^T``.
    U, V are xavier-uniform times ``init_scale``; an optional band reads U."""

    def __init__(self, config: HMMConfig):
        super().__init__()
        z, d = config.num_states, config.hidden
        self.low_rank, self.rank, self.band = config.low_rank, config.rank, config.band
        self.form = config.low_rank_form
        self.prev_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(z, d)) *
                                     config.init_scale)
        self.next_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(z, d)) *
                                     config.init_scale)
        self.start_emb = nn.Parameter(torch.randn(d) / d**0.5)
        self.start_mlp = nn.Sequential(nn.Linear(d, d), residual_mlp(d, config.mlp_layers,
                                                                     norm=False))
        if self.low_rank:
            self.projection = nn.Parameter(orthogonal_random_features(d, self.rank))
        if self.band is not None:
            self.band_out = nn.Linear(d, 2 * self.band + 1)

    def _features(self, x: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        w = self.projection if features is None else self.projection[:, features]
        return x @ w

    def init_logits(self, states: torch.Tensor | None = None) -> torch.Tensor:
        start = self.start_mlp(self.start_emb)
        nxt = self.next_emb if states is None else self.next_emb[states]
        if not self.low_rank:
            return nxt @ start
        start_features = self._features(start, None).unsqueeze(0)  # (1, R)
        return log_matmul(start_features, self._features(nxt, None).T)[0]

    def factor(self, state_emb=None, states=None, features=None) -> Factor:
        prev = self.prev_emb if states is None else self.prev_emb[states]
        nxt = self.next_emb if states is None else self.next_emb[states]
        if not self.low_rank:
            return Dense(matmul(prev, nxt.T))
        factor: Factor = low_rank_factor(self._features(prev, features),
                                         self._features(nxt, features), self.form)
        if self.band is not None:
            factor = factor + Banded(band_logits(self.band_out(prev), self.band, states),
                                     self.band)
        return factor


class NeuralHMM(nn.Module):
    """An HMM with embedding-parameterized init/transition and a pluggable emission head.

    Args:
        config: the :class:`HMMConfig` (validated there).
        emission: the emission head; its ``hidden`` must equal ``config.hidden``.
    """

    def __init__(self, config: HMMConfig, emission: EmissionHead):
        super().__init__()
        if not isinstance(config, HMMConfig):
            raise TypeError(f"config must be an HMMConfig, got {type(config).__name__}")
        if not isinstance(emission, EmissionHead):
            raise TypeError(f"emission must be an EmissionHead, got {type(emission).__name__}")
        if emission.hidden != config.hidden:
            raise ValueError(f"the emission head's hidden size ({emission.hidden}) differs from "
                             f"config.hidden ({config.hidden})")
        self.config = config
        self.num_states, self.hidden = config.num_states, config.hidden
        self.state_emb = nn.Parameter(torch.randn(config.num_states, config.hidden))
        nets = {"mlp": MLPTransition, "embedding": EmbeddingTransition}
        self.transition_net: TransitionNet = nets[config.transition](config)
        self.emission = emission

    @property
    def rank(self) -> int | None:
        """The rank of the transition factor (None for a dense transition)."""
        return self.transition_net.rank

    # ---- pieces ----------------------------------------------------------------------------
    def init_logits(self, states: torch.Tensor | None = None) -> torch.Tensor:
        """Initial-state logits (Z',) over ``states`` (all if None)."""
        return self.transition_net.init_logits(states)

    def transition(
        self, states: torch.Tensor | None = None, features: torch.Tensor | None = None
    ) -> Factor:
        """The transition factor over ``states`` (sorted indices; all if None) using rank
        ``features`` (indices; all if None)."""
        emb = self.state_emb if states is None else self.state_emb[states]
        return self.transition_net.factor(emb, states, features)

    def sample_dropout(
        self, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(states, features) index subsets for one training batch (None: keep all)."""
        if not self.training:
            return None, None
        cfg, device = self.config, self.state_emb.device
        states = features = None
        if cfg.state_dropout > 0:
            states = _subset(self.num_states, cfg.state_dropout, generator).to(device)
        if self.rank is not None and cfg.feature_dropout > 0:
            features = _subset(self.rank, cfg.feature_dropout, generator).to(device)
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
        emb = self.state_emb if states is None else self.state_emb[states]
        init = self.init_logits(states)
        trans = self.transition_net.factor(emb, states, features)
        em = self.emission(emb, x)
        if self.config.model == "rank_space" and isinstance(trans, LowRank):
            return RankSpaceHMM(init, trans, em, lengths)
        memory_light = self.config.memory_light and isinstance(trans, LowRank)
        return HMM(init, trans, em, lengths, memory_light=memory_light)

    # ---- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def sample_paths(
        self, num: int, length: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Ancestral samples from the prior: (state paths (num, length), observations per
        step [head.sample(...)] of length ``length``).  Uses every state."""
        check_positive_int("num", num)
        emb = self.state_emb
        init = self.init_logits().log_softmax(-1).float().cpu()
        trans = self.transition()
        z = gumbel_argmax(init.expand(num, -1), generator)
        paths, obs = [], []
        for t in range(length):
            if t > 0:
                rows = trans.log_prob_rows(z.to(emb.device)).float().cpu()
                z = gumbel_argmax(rows, generator)
            paths.append(z)
            obs.append(self.emission.sample(emb[z.to(emb.device)], generator))
        return torch.stack(paths, 1), obs

    def extra_repr(self) -> str:
        c = self.config
        return (f"model={c.model!r}, states={c.num_states}, rank={c.rank}, band={c.band}, "
                f"state_dropout={c.state_dropout}, feature_dropout={c.feature_dropout}")


class HMMLanguageModel(NeuralHMM):
    """A word-level HMM language model: :class:`NeuralHMM` with a
    :class:`~lorank.nn.emissions.SoftmaxEmission` over ``vocab_size`` words.

    Build it from an :class:`HMMLMConfig` or from its fields:
    ``HMMLanguageModel(vocab_size=10000, num_states=1024, model="lhmm")``.  Each sentence
    (ending with ``<eos>``) is one HMM sequence; ``-log_partition`` summed over a batch divided
    by its token count (``<eos>`` included) is the per-token NLL.
    """

    def __init__(self, config: HMMLMConfig | None = None, **fields):
        config = HMMLMConfig.resolve(config, **fields)
        if config.vocab_size is None:
            raise ValueError("HMMLMConfig.vocab_size must be set to build a language model")
        super().__init__(config, SoftmaxEmission(config.vocab_size, config.hidden,
                                                 config.mlp_layers))
        self.vocab_size = config.vocab_size

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
        return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in words]


class MusicHMM(NeuralHMM):
    """A polyphonic-music HMM: :class:`NeuralHMM` with a
    :class:`~lorank.nn.emissions.Bernoulli88Emission` over the 88 piano keys."""

    def __init__(self, config: MusicHMMConfig | None = None, **fields):
        config = MusicHMMConfig.resolve(config, **fields)
        head = Bernoulli88Emission(config.hidden, mlp_layers=config.emission_layers)
        super().__init__(config, head)


__all__ = [
    "MODELS",
    "DEFAULT_BAND",
    "HMMConfig",
    "HMMLMConfig",
    "MusicHMMConfig",
    "TransitionNet",
    "MLPTransition",
    "EmbeddingTransition",
    "TRANSITIONS",
    "NeuralHMM",
    "HMMLanguageModel",
    "MusicHMM",
]
