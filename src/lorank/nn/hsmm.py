"""Low-rank hidden semi-Markov models: ``forward(x, lengths) -> lorank.HSMM``.

:class:`LHSMM` follows Chiu, Deng & Rush (2021): Z states, a rank-R transition
``P ∝ phi(U) phi(V)^T`` with ``phi(X) = exp(X W)`` (W initialized with orthogonal random
features), Poisson durations (``d - 1 ~ Poisson(rate_z)`` truncated to K), diagonal-Gaussian
emissions, and (like most HSMMs) no learned self-transition preference.  ``dense=True`` gives
the softmax-transition baseline.  The loss is ``-dist.log_partition.sum() / num_steps``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorank.config import Config, option
from lorank.distributions.hsmm import HSMM, gaussian_emission, poisson_duration
from lorank.factors import Dense, Factor, LowRank, orthogonal_random_features

HSMM_MODELS = ("lhsmm", "hsmm")


@dataclass(frozen=True)
class HSMMConfig(Config):
    """Settings of an :class:`LHSMM` (``obs_dim`` comes from the data)."""

    model: str = option("lhsmm", "lhsmm (low-rank transition) or hsmm (dense softmax)",
                        choices=HSMM_MODELS)
    num_states: int = option(64, "number of states Z", flag="--states")
    rank: int | None = option(None, "rank R of lhsmm (default min(8, Z))")
    max_duration: int = option(20, "longest segment K")
    emb_dim: int = option(64, "state-embedding size of the transition features")
    obs_dim: int = option(1, "observation size D", cli=False)

    def __post_init__(self) -> None:
        model = self._choice("model", HSMM_MODELS, {"dense": "hsmm", "lowrank": "lhsmm"})
        self._positive_int("num_states", "max_duration", "emb_dim", "obs_dim")
        self._rank(model == "lhsmm", min(8, self.num_states), self.num_states,
                   "rank applies to the low-rank 'lhsmm', not the dense 'hsmm'")


class LHSMM(nn.Module):
    """Low-rank HSMM with Poisson durations and Gaussian emissions.

    Build it from an :class:`HSMMConfig` or its fields (the paper: Z=1024, R=16, K=20;
    ``model="hsmm"`` is the dense softmax-transition baseline).  ``init_data``: optional
    (N, D) observations to initialize the means (random rows) and scales (their standard
    deviation); ``seed`` seeds the initialization.
    """

    def __init__(
        self,
        config: HSMMConfig | None = None,
        init_data: torch.Tensor | None = None,
        seed: int | None = None,
        **fields,
    ):
        super().__init__()
        config = HSMMConfig.resolve(config, **fields)
        self.config = config
        num_states, obs_dim, emb_dim = config.num_states, config.obs_dim, config.emb_dim
        rank, max_duration, dense = config.rank or 1, config.max_duration, config.model == "hsmm"
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        z, d = num_states, obs_dim
        self.num_states, self.obs_dim, self.max_duration = z, d, max_duration
        self.dense, self.rank = dense, rank
        self.init_logits = nn.Parameter(torch.zeros(z))
        self.log_rate = nn.Parameter(torch.randn(z, generator=gen) * 0.5 + 1.0)
        if dense:
            self.trans_logits = nn.Parameter(torch.randn(z, z, generator=gen) * 0.1)
        else:
            self.left_emb = nn.Parameter(torch.randn(z, emb_dim, generator=gen) * 0.5)
            self.right_emb = nn.Parameter(torch.randn(z, emb_dim, generator=gen) * 0.5)
            w = orthogonal_random_features(emb_dim, rank, generator=gen) / emb_dim**0.5
            self.projection = nn.Parameter(w)
        if init_data is not None:
            data = init_data.reshape(-1, d).float()
            idx = torch.randint(0, data.shape[0], (z,), generator=gen)
            mean = data[idx] + 0.01 * torch.randn(z, d, generator=gen) * data.std(0)
            log_std = data.std(0).clamp_min(1e-3).log().expand(z, d).clone()
        else:
            mean = torch.randn(z, d, generator=gen)
            log_std = torch.zeros(z, d)
        self.mean = nn.Parameter(mean)
        self.log_std = nn.Parameter(log_std)

    def transition(self) -> Factor:
        if self.dense:
            return Dense(self.trans_logits)
        return LowRank.from_embeddings(self.left_emb, self.right_emb, self.projection)

    def duration(self) -> torch.Tensor:
        """Truncated Poisson duration log-probabilities (Z, K)."""
        return poisson_duration(self.log_rate.exp(), self.max_duration)

    def forward(self, x, lengths: torch.Tensor | None = None) -> HSMM:
        """x (B, T, D) observations, lengths (B,); also accepts one ``(x, lengths)`` tuple."""
        if isinstance(x, (tuple, list)):
            x, lengths = x[0], x[1]
        if x.dim() != 3 or x.shape[-1] != self.obs_dim:
            raise ValueError(f"x must have shape (B, T, {self.obs_dim}), got {tuple(x.shape)}")
        em = gaussian_emission(x, self.mean, self.log_std.clamp(-7, 7))
        return HSMM(self.init_logits, self.transition(), self.duration(), em, lengths)

    def loss(self, x, lengths=None) -> torch.Tensor:
        """Per-step negative log-likelihood."""
        dist = self(x, lengths)
        return -dist.log_partition.sum() / dist.lengths.sum()


__all__ = ["LHSMM", "HSMMConfig", "HSMM_MODELS"]
