"""Low-rank hidden semi-Markov models: ``forward(x, lengths) -> lorank.HSMM``.

:class:`LHSMM` follows Chiu, Deng & Rush (2021): Z states, a rank-R transition
``P ∝ phi(U) phi(V)^T`` with ``phi(X) = exp(X W)`` (W initialized with orthogonal random
features), Poisson durations (``d - 1 ~ Poisson(rate_z)`` truncated to K), diagonal-Gaussian
emissions, and (like most HSMMs) no learned self-transition preference.  ``dense=True`` gives
the softmax-transition baseline.  The loss is ``-dist.log_partition.sum() / num_steps``.
"""

from __future__ import annotations

import torch
from torch import nn

from lorank.distributions.hsmm import HSMM, gaussian_emission, poisson_duration
from lorank.factors import Dense, Factor, LowRank, orthogonal_random_features


class LHSMM(nn.Module):
    """Low-rank HSMM with Poisson durations and Gaussian emissions.

    Args:
        num_states: Z (the paper: 1024).
        obs_dim: D, the observation size.
        rank: R of the transition (the paper: 16); ignored with ``dense=True``.
        max_duration: K (the paper: 20).
        emb_dim: state-embedding size for the transition features.
        dense: use a dense softmax transition instead.
        init_data: optional (N, D) observations to initialize the means (random rows) and
            scales (their standard deviation).
    """

    def __init__(
        self,
        num_states: int,
        obs_dim: int,
        rank: int = 16,
        max_duration: int = 20,
        emb_dim: int = 64,
        dense: bool = False,
        init_data: torch.Tensor | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        for name, v in (("num_states", num_states), ("obs_dim", obs_dim), ("rank", rank),
                        ("max_duration", max_duration), ("emb_dim", emb_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
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


def sequence_windows(series: torch.Tensor, length: int, stride: int | None = None,
                     standardize: bool = True) -> torch.Tensor:
    """Cut a (N, D) (or (N,)) series into overlapping windows (W, length, D) for training,
    standardized per feature with the series' own mean and standard deviation."""
    x = series.float()
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    if standardize:
        x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    stride = stride or length
    if x.shape[0] < length:
        raise ValueError(f"series has {x.shape[0]} steps, fewer than one window of {length}")
    return x.unfold(0, length, stride).transpose(1, 2).contiguous()


__all__ = ["LHSMM", "sequence_windows"]
