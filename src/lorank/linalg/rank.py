"""Rank selection: parameter arithmetic, energy thresholds and budget allocation.

A rank-r factorization of an m x n matrix stores ``r (m + n)`` numbers, fewer than ``m n``
only when ``r < m n / (m + n)``: :func:`max_useful_rank` is the largest such r.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "lowrank_params",
    "max_useful_rank",
    "saves_parameters",
    "rank_for_param_reduction",
    "rank_for_energy",
    "tail_energy",
    "RankCandidate",
    "allocate_ranks",
]


def lowrank_params(m: int, n: int, rank: int) -> int:
    """Numbers stored by ``A (m x r) @ B (r x n)``: ``r (m + n)``."""
    return rank * (m + n)


def saves_parameters(m: int, n: int, rank: int) -> bool:
    """True when ``r (m + n) < m n``."""
    return lowrank_params(m, n, rank) < m * n


def max_useful_rank(m: int, n: int) -> int:
    """Largest r with ``r (m + n) < m n`` (0 if none, e.g. a 1 x n matrix)."""
    return (m * n - 1) // (m + n)


def rank_for_param_reduction(m: int, n: int, reduction: float) -> int:
    """Largest rank whose factors remove at least the fraction ``reduction`` of the m n
    weights: ``r (m + n) <= (1 - reduction) m n``, i.e. ``r = floor((1 - f) m n / (m + n))``.

    ``reduction=0.4`` leaves at most 60% of the layer's weight parameters.  Returns 0 when
    even rank 1 would keep too many (the caller leaves such a layer dense or clips to 1)."""
    if not 0 < reduction < 1:
        raise ValueError(f"param_reduction must lie strictly between 0 and 1, got {reduction!r}")
    r = math.floor((1 - reduction) * m * n / (m + n) + 1e-9)
    return min(r, min(m, n))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with ``sum_{i<r} s_i^2 >= energy * sum_i s_i^2``."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must lie in (0, 1], got {energy!r}")
    s2 = singular_values.double() ** 2
    total = float(s2.sum())
    if total == 0:
        return 1
    cum = torch.cumsum(s2, 0) / total
    r = int((cum < energy - 1e-12).sum()) + 1
    return min(r, singular_values.numel())


def tail_energy(singular_values: torch.Tensor, rank: int) -> float:
    """Relative truncation error ``sqrt(sum_{i>=r} s_i^2 / sum_i s_i^2)``."""
    s2 = singular_values.double() ** 2
    total = float(s2.sum())
    return math.sqrt(float(s2[rank:].sum()) / total) if total > 0 else 0.0


@dataclass(frozen=True)
class RankCandidate:
    """One option for a layer: ``rank`` (None = keep dense), its parameter count and its
    measured cost (loss increase, output error, ...; lower is better)."""

    rank: int | None
    params: int
    cost: float


def allocate_ranks(
    candidates: Sequence[Sequence[RankCandidate]], budget: int
) -> list[RankCandidate]:
    """Choose one candidate per layer so that the total parameters are ``<= budget``,
    greedily: every layer starts at its largest option and the step with the smallest cost
    increase per parameter saved is taken until the budget is met.

    Raises ValueError if even the smallest options exceed the budget."""
    if not candidates:
        raise ValueError("allocate_ranks needs at least one layer")
    opts = []
    for i, cands in enumerate(candidates):
        if not cands:
            raise ValueError(f"layer {i} has no rank candidates")
        # strictly decreasing parameter counts, largest first
        srt = sorted(cands, key=lambda c: -c.params)
        opts.append(srt)
    floor_total = sum(o[-1].params for o in opts)
    if floor_total > budget:
        raise ValueError(
            f"parameter budget {budget} is below {floor_total}, the smallest total the "
            f"candidate ranks reach; lower the reduction or allow smaller ranks"
        )
    pos = [0] * len(opts)
    total = sum(o[0].params for o in opts)
    while total > budget:
        best, best_score = -1, math.inf
        for i, o in enumerate(opts):
            if pos[i] + 1 >= len(o):
                continue
            cur, nxt = o[pos[i]], o[pos[i] + 1]
            saved = cur.params - nxt.params
            if saved <= 0:
                continue
            score = (nxt.cost - cur.cost) / saved
            if score < best_score:
                best, best_score = i, score
        if best < 0:  # pragma: no cover - floor_total check makes this unreachable
            raise ValueError("parameter budget cannot be met")
        total -= opts[best][pos[best]].params - opts[best][pos[best] + 1].params
        pos[best] += 1
    return [o[p] for o, p in zip(opts, pos, strict=True)]
