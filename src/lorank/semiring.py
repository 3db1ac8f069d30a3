"""Semirings over log-space scores, as in torch-struct: one dynamic program, many questions.

Every semiring here works on *log-potentials*: ``times`` is addition, ``plus`` is a reduction
over a dimension.  The entropy semiring carries a pair ``(log Z, H)`` stacked on a leading
dimension of size 2.  Impossible events are true ``-inf``; reductions guard the max so that
an all-``-inf`` slice gives ``-inf`` (never NaN) and finite gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorank import _gemm
from lorank._deferred import current_tape
from lorank._numerics import records_derivatives, safe_log, stable_shift

NEG_INF = float("-inf")


def safe_logsumexp(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """``logsumexp`` that returns ``-inf`` (not NaN) on all ``-inf`` slices, with finite grads
    (when no derivative is recorded: ``torch.logsumexp``, the same values in one call)."""
    if not records_derivatives(x):
        return torch.logsumexp(x, dim, keepdim)
    m = stable_shift(x, dim)
    out = safe_log((x - m).exp().sum(dim=dim, keepdim=True)) + m
    return out if keepdim else out.squeeze(dim)


def log_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) @ exp(b))`` by max-shifted GEMM: a (..., n, k), b (..., k, m)."""
    return log_matmul_by(b)(a)


def log_matmul_by(b: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``a -> log(exp(a) @ exp(b))`` for a fixed ``b`` (..., k, m): b's column shift and
    exponential are computed once, not at every product (the same values as
    :func:`log_matmul`; a dynamic program applies one matrix at every step)."""
    bm = stable_shift(b, -2)
    eb = (b - bm).exp()
    tape = current_tape()
    if tape is not None and tape.defers(eb):  # one GEMM for eb's gradient (lorank._deferred)
        idx = tape.register(eb)

        def product(x: torch.Tensor) -> torch.Tensor:
            return tape.product(x, idx)
    else:

        def product(x: torch.Tensor) -> torch.Tensor:
            return _gemm.matmul(x, eb)

    def apply(a: torch.Tensor) -> torch.Tensor:
        am = stable_shift(a, -1)
        return safe_log(product((a - am).exp())) + am + bm

    return apply


class Semiring:
    """Interface: ``times`` combines scores, ``sum`` marginalizes a dimension."""

    name = "semiring"
    #: number of stacked components (1 for scalar semirings, 2 for entropy)
    size = 1

    @staticmethod
    def convert(x: torch.Tensor) -> torch.Tensor:
        """Lift log-potentials into the semiring."""
        return x

    @staticmethod
    def unconvert(x: torch.Tensor) -> torch.Tensor:
        """Read the result out of the semiring."""
        return x

    @staticmethod
    def times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    @classmethod
    def sum(cls, x: torch.Tensor, dim: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def matmul(cls, a: torch.Tensor, b: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """Semiring product of a (..., n, k) with b (..., k, m), chunked over m to bound memory."""
        outs = []
        for start in range(0, b.shape[-1], chunk):
            bc = b[..., start : start + chunk]
            outs.append(cls.sum(cls.times(a.unsqueeze(-1), bc.unsqueeze(-3)), dim=-2))
        return torch.cat(outs, dim=-1)


class LogSemiring(Semiring):
    """Sum-product in log space: marginal likelihoods; gradients give marginals."""

    name = "log"

    @classmethod
    def sum(cls, x: torch.Tensor, dim: int) -> torch.Tensor:
        return safe_logsumexp(x, dim=dim)

    @classmethod
    def matmul(cls, a: torch.Tensor, b: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        return log_matmul(a, b)


class MaxSemiring(Semiring):
    """Max-product (Viterbi) in log space."""

    name = "max"

    @classmethod
    def sum(cls, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.amax(dim=dim)


class EntropySemiring(Semiring):
    """Pairs ``(log Z, H)`` stacked on dim 0: the entropy of the distribution over paths.

    ``times`` adds both parts (independent pieces); ``sum`` over alternatives with log-weights
    ``a_i`` and entropies ``h_i`` gives ``(LSE a, sum_i w_i (h_i - log w_i))``, ``w = softmax(a)``.
    """

    name = "entropy"
    size = 2

    @staticmethod
    def convert(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x, torch.zeros_like(x)])

    @staticmethod
    def unconvert(x: torch.Tensor) -> torch.Tensor:
        return x[1]

    @staticmethod
    def times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    @classmethod
    def sum(cls, x: torch.Tensor, dim: int) -> torch.Tensor:
        a, h = x[0], x[1]
        d_inner = dim
        log_z = safe_logsumexp(a, dim=d_inner, keepdim=True)
        finite = torch.isfinite(log_z)
        log_w = torch.where(finite, a - torch.where(finite, log_z, torch.zeros_like(log_z)), a)
        w = log_w.exp()
        # 0 * (h - (-inf)) must be 0, not NaN -- in the forward *and* the backward pass
        safe_log_w = torch.where(w > 0, log_w, torch.zeros_like(log_w))
        contrib = torch.where(w > 0, w * (h - safe_log_w), torch.zeros_like(w))
        return torch.stack([log_z.squeeze(d_inner), contrib.sum(dim=d_inner)])


SEMIRINGS = {s.name: s for s in (LogSemiring, MaxSemiring, EntropySemiring)}
