"""Hidden semi-Markov models: posteriors over segmentations, batch-first.

A segmentation of ``x_0 .. x_{L-1}`` is a sequence of segments ``(start, end, state)`` that
tile the sequence; its joint score is

    log p(z_1) + sum_k [log p(d_k | z_k) + sum_{t in segment k} log p(x_t | z_k)]
               + sum_{k>1} log P[z_{k-1}, z_k]

with durations ``d in 1..K`` and ``P`` any lorank transition factor (dense, low-rank, banded or
a sum: the low-rank speed-up of Chiu, Deng & Rush 2021 reaches the HSMM through the factor's
operators).  Segmentations are returned as :class:`Segmentation` ``(states, starts)``.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import NamedTuple

import torch

from lorank._checks import check_positive_int, check_tensor
from lorank._inputs import check_alike, log_normalize
from lorank.distributions.hmm import prepare_chain_inputs
from lorank.dp import semimarkov
from lorank.factors import Factor
from lorank.semiring import EntropySemiring


class Segmentation(NamedTuple):
    """Segmentations as two aligned tensors (..., B, T): ``states`` (long, the state of the
    segment covering each position, -1 at padding) and ``starts`` (bool, True where a segment
    begins).  A sequence with no segmentation of finite score (impossible) is the sentinel:
    all states -1 and no start."""

    states: torch.Tensor
    starts: torch.Tensor

    def segments(self, *index: int) -> list[tuple[int, int, int]]:
        """The segments ``(start, end_exclusive, state)`` of one sequence, e.g.
        ``seg.segments(b)`` (or ``seg.segments(s, b)`` with a leading sample dimension); ``[]``
        for the "no segmentation" sentinel."""
        st = self.states[index].tolist()
        sb = self.starts[index].tolist()
        out: list[tuple[int, int, int]] = []
        for t, (z, s) in enumerate(zip(st, sb, strict=True)):
            if z < 0:
                break
            if s or not out:
                out.append((t, t + 1, z))
            else:
                out[-1] = (out[-1][0], t + 1, z)
        return out

    def empty(self) -> torch.Tensor:
        """(..., B) bool: True for the "no segmentation" sentinel rows."""
        return ~self.starts.any(-1) & (self.states < 0).all(-1)


def poisson_duration(rate: torch.Tensor, max_duration: int) -> torch.Tensor:
    """Log-probabilities (..., K) of durations ``d = 1..K`` with ``d - 1 ~ Poisson(rate)``,
    truncated to K and renormalized; ``rate`` (...,) positive (e.g. one per state)."""
    k = check_positive_int("max_duration", max_duration)
    check_tensor("rate", rate)
    if bool((rate <= 0).any()):
        raise ValueError("rate must be positive")
    n = torch.arange(k, dtype=rate.dtype, device=rate.device)
    logp = n * rate.unsqueeze(-1).log() - rate.unsqueeze(-1) - torch.lgamma(n + 1)
    return torch.log_softmax(logp, dim=-1)


def gaussian_emission(
    x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Diagonal-Gaussian log-likelihoods ``log N(x_t; mean_z, diag(exp(log_std_z))^2)``:
    x (B, T, D), mean (Z, D), log_std (Z, D), (Z,) or a scalar -> (B, T, Z).  Uses the
    expansion ``|x|^2 - 2 x.mu + |mu|^2`` (one GEMM), not a (B, T, Z, D) tensor."""
    check_tensor("x", x, ndim=3)
    check_tensor("mean", mean, ndim=2)
    if x.shape[-1] != mean.shape[-1]:
        raise ValueError(
            f"x has feature size {x.shape[-1]} but mean has shape {tuple(mean.shape)}"
        )
    z, d = mean.shape
    ls = torch.as_tensor(log_std, dtype=x.dtype, device=x.device)
    if ls.dim() == 1:
        ls = ls.unsqueeze(-1)
    ls = ls.expand(z, d)
    prec = torch.exp(-2 * ls)  # (Z, D)
    quad = (x * x) @ prec.T - 2 * x @ (mean * prec).T + (mean * mean * prec).sum(-1)
    return -0.5 * quad - ls.sum(-1) - 0.5 * d * math.log(2 * math.pi)


def categorical_emission(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``log p(x_t | z)`` for integer tokens (B, T) and emission logits (Z, V): (B, T, Z).
    Negative tokens (padding) get 0."""
    check_tensor("logits", logits, ndim=2)
    if tokens.is_floating_point():
        raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
    logp = torch.log_softmax(logits, -1)
    v = logp.shape[-1]
    if tokens.numel() and int(tokens.max()) >= v:
        raise ValueError(f"tokens must lie in [0, {v}), got max {int(tokens.max())}")
    out = logp.T[tokens.clamp_min(0)]
    return torch.where((tokens >= 0).unsqueeze(-1), out, torch.zeros_like(out))


def prepare_hsmm_inputs(
    init: torch.Tensor,
    transition: Factor,
    duration: torch.Tensor,
    emission: torch.Tensor,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the inputs of :class:`HSMM` (shapes, one dtype and device, no NaN, no all
    ``-inf`` init row); return ``(init_logp (B, Z), duration_logp (Z, K) or (B, Z, K),
    lengths (B,))``.  A duration row of all ``-inf`` (a state that can never form a segment)
    is legal and stays ``-inf``.  O(1) passes over the inputs."""
    init_logp, lengths = prepare_chain_inputs(init, transition, emission, lengths)
    b, t_len, z = emission.shape
    check_tensor("duration", duration, ndim=(2, 3))
    if duration.shape[-1] < 1:
        raise ValueError(
            f"duration must allow at least one duration (K >= 1), got shape "
            f"{tuple(duration.shape)}"
        )
    if duration.shape[-2] != z or (duration.dim() == 3 and duration.shape[0] != b):
        raise ValueError(
            f"duration must have shape ({z}, K) or ({b}, {z}, K) to match emission "
            f"{tuple(emission.shape)}, got {tuple(duration.shape)}"
        )
    check_alike(emission=emission, duration=duration)
    return init_logp, log_normalize(duration), lengths


class HSMM:
    """Posterior over segmentations of a hidden semi-Markov model.

    Args:
        init: initial-state logits (Z,) or (B, Z) (softmax-normalized here).
        transition: a factor (``Dense``, ``LowRank``, ``Banded`` or a sum) between consecutive
            segments, shared or batched (B,).
        duration: duration logits (Z, K) or (B, Z, K) for durations 1..K (log-softmax
            normalized over K here; pass :func:`poisson_duration` output for Poisson).
        emission: (B, T, Z) per-step log-likelihoods ``log p(x_t | z)``.
        lengths: (B,) in [1, T]; default all T.

    A sequence with no segmentation of finite score is *impossible*: ``log_partition`` and
    ``max_score`` ``-inf``, marginals and entropy 0, ``argmax`` and samples the "no
    segmentation" sentinel (states -1, no start); other sequences of the batch are unaffected.
    """

    def __init__(
        self,
        init: torch.Tensor,
        transition: Factor,
        duration: torch.Tensor,
        emission: torch.Tensor,
        lengths: torch.Tensor | None = None,
    ):
        init_logp, duration_logp, lengths = prepare_hsmm_inputs(
            init, transition, duration, emission, lengths
        )
        b, t_len, z = emission.shape
        self.lengths, self.init_logp = lengths, init_logp
        self.duration_logp = duration_logp
        self.transition = transition
        self.emission = emission
        self.batch_size, self.max_length, self.num_states = b, t_len, z
        self.max_duration = duration.shape[-1]

    def _seg(self, emission: torch.Tensor) -> torch.Tensor:
        return semimarkov.segment_scores(emission, self.duration_logp)

    @cached_property
    def segment_scores(self) -> torch.Tensor:
        """(B, T, K, Z): log-potential of the segment ending at t with duration d = k+1."""
        return self._seg(self.emission)

    @cached_property
    def log_partition(self) -> torch.Tensor:
        """``log p(x)``: (B,), ``-inf`` for an impossible sequence. Differentiable."""
        return semimarkov.log_partition(
            self.init_logp, self.transition, self.segment_scores, self.lengths
        )

    @property
    def mask(self) -> torch.Tensor:
        steps = torch.arange(self.max_length, device=self.emission.device)
        return steps.unsqueeze(0) < self.lengths.unsqueeze(1)

    @cached_property
    def _grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            em = self.emission.detach().requires_grad_(True)
            seg = self._seg(em)
            seg_leaf = seg.detach().requires_grad_(True)
            logz = semimarkov.log_partition(
                self.init_logp.detach(), self.transition, seg_leaf, self.lengths
            )
            (g_seg,) = torch.autograd.grad(logz.sum(), seg_leaf)
            (g_em,) = torch.autograd.grad(seg, em, g_seg)
        return g_em * self.mask.unsqueeze(-1), g_seg

    @property
    def marginals(self) -> torch.Tensor:
        """Per-step state posteriors ``p(position t lies in a segment of state z | x)``:
        (B, T, Z), zero at padding and for an impossible sequence."""
        return self._grads[0]

    @property
    def segment_marginals(self) -> torch.Tensor:
        """Segment posteriors (B, T, K, Z): ``[b, t, k, z]`` = p(a segment of state z and
        duration k+1 has its last position at t | x), i.e. covers ``[t-k, t+1)``."""
        return self._grads[1]

    # ---- max-product -------------------------------------------------------------------
    @cached_property
    def _viterbi(self):
        seg = self.segment_scores.detach()  # cached outside no_grad: it stays differentiable
        with torch.no_grad():
            return semimarkov.viterbi(
                self.init_logp, self.transition.log_probs(), seg, self.lengths
            )

    @property
    def argmax(self) -> Segmentation:
        """The exact most probable segmentation (materializes the Z x Z transition); the
        sentinel for an impossible sequence."""
        _, states, starts = self._viterbi
        return Segmentation(states, starts)

    @property
    def max_score(self) -> torch.Tensor:
        """``max log p(x, segmentation)``: (B,)."""
        return self._viterbi[0]

    # ---- other queries -----------------------------------------------------------------
    def sample(
        self, sample_shape: torch.Size | tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> Segmentation:
        """Exact posterior samples (forward filtering, backward sampling), each tensor of
        shape (*sample_shape, B, T); the sentinel for an impossible sequence."""
        shape = torch.Size(sample_shape)
        seg = self.segment_scores.detach()
        with torch.no_grad():
            states, starts = semimarkov.sample(
                self.init_logp, self.transition, seg, self.lengths, shape.numel(), generator
            )
        return Segmentation(
            states.reshape(*shape, self.batch_size, self.max_length),
            starts.reshape(*shape, self.batch_size, self.max_length),
        )

    def entropy(self) -> torch.Tensor:
        """Entropy of the posterior over segmentations: (B,), by the entropy semiring on the
        dense transition; 0 for an impossible sequence."""
        return semimarkov.semiring_forward(
            self.init_logp, self.transition.log_probs(), self.segment_scores, self.lengths,
            EntropySemiring,
        )

    def _check(self, seg: Segmentation) -> tuple[Segmentation, torch.Tensor]:
        """Validated ``(segmentation, empty)``; ``empty`` (..., B) marks sentinel rows, which
        are replaced by a placeholder segmentation (every position its own state-0 segment)."""
        if not isinstance(seg, tuple) or len(seg) != 2:
            raise TypeError("expected a Segmentation (states, starts)")
        states, starts = seg
        want = (self.batch_size, self.max_length)
        for name, x in (("states", states), ("starts", starts)):
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or tuple(x.shape[-2:]) != want:
                raise ValueError(f"{name} must have shape (..., {want[0]}, {want[1]})")
        if states.shape != starts.shape:
            raise ValueError("states and starts must have the same shape")
        empty = Segmentation(states, starts.bool()).empty()
        states = torch.where(empty.unsqueeze(-1), torch.zeros_like(states), states).long()
        starts = starts.bool() | empty.unsqueeze(-1)
        m = self.mask.expand_as(states)
        real = states[m]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.num_states):
            raise ValueError(f"states must lie in [0, {self.num_states}) within lengths "
                             "(or be all -1 with no start: the no-segmentation sentinel)")
        if not bool(starts[..., 0].all()):
            raise ValueError("every segmentation must start a segment at position 0")
        prev = torch.cat([states[..., :1], states[..., :-1]], -1)
        if bool(((states != prev) & ~starts & m).any()):
            raise ValueError("states may only change where a segment starts")
        ends, dur = semimarkov.segment_ends(starts, self.lengths)
        if bool((dur[ends] >= self.max_duration).any()):
            raise ValueError(f"a segment is longer than the maximum duration {self.max_duration}")
        return Segmentation(states, starts), empty

    def score(self, seg: Segmentation) -> torch.Tensor:
        """``log p(x, segmentation)``: (..., B); ``-inf`` for the sentinel."""
        (states, starts), empty = self._check(seg)
        score = semimarkov.segmentation_score(
            self.init_logp, self.transition, self.segment_scores, self.lengths, states, starts
        )
        return torch.where(empty, torch.full_like(score, -math.inf), score)

    def log_prob(self, seg: Segmentation) -> torch.Tensor:
        """``log p(segmentation | x)``: (..., B); ``-inf`` for a segmentation of score
        ``-inf`` (the sentinel included), also on an impossible sequence."""
        score = self.score(seg)
        return torch.where(torch.isneginf(score), score, score - self.log_partition)

    def to_chart(self, seg: Segmentation) -> torch.Tensor:
        """The 0/1 segment indicator (..., B, T, K, Z) of segmentations (matches
        :attr:`segment_marginals` in expectation; all 0 for the sentinel)."""
        (states, starts), empty = self._check(seg)
        chart = semimarkov.segment_chart(
            states, starts, self.lengths, self.max_duration, self.num_states
        )
        return chart * (~empty).to(chart.dtype)[..., None, None, None]

    def __repr__(self) -> str:
        return (
            f"HSMM(batch={self.batch_size}, T={self.max_length}, states={self.num_states}, "
            f"K={self.max_duration}, transition={self.transition!r})"
        )
