"""Sparse plus low-rank: ``X ≈ A @ B + S`` with ``S`` holding at most ``nnz`` entries.

Alternating exact minimization (GoDec, Zhou & Tao 2011; the decomposition of SLTrain and
DSFormer): ``A B`` is the truncated SVD of ``X - S`` and ``S`` keeps the ``nnz`` largest
entries of ``X - A B`` in magnitude.  Each half-step is optimal given the other, so
``||X - A B - S||_F`` never increases.
"""

from __future__ import annotations

import torch

from lorank.linalg._common import check_matrix, check_rank, split_singular_values, work_dtype

__all__ = ["sparse_plus_low_rank", "nnz_for_density"]


def nnz_for_density(shape: tuple[int, int], density: float) -> int:
    """Number of sparse entries for a fraction ``density`` of an m x n matrix."""
    if not 0 <= density < 1:
        raise ValueError(f"sparse density must lie in [0, 1), got {density!r}")
    return int(round(density * shape[0] * shape[1]))


def _top_k(r: torch.Tensor, nnz: int) -> torch.Tensor:
    s = torch.zeros(r.shape, dtype=r.dtype, device=r.device)
    if nnz > 0:
        idx = r.abs().flatten().topk(nnz).indices
        s.view(-1)[idx] = r.flatten()[idx]
    return s


def sparse_plus_low_rank(
    x: torch.Tensor,
    rank: int,
    nnz: int,
    *,
    n_iter: int = 20,
    tol: float = 1e-7,
    return_history: bool = False,
):
    """``x ≈ A @ B + S``; returns ``(A, B, S)`` (S dense with at most ``nnz`` nonzeros) or
    ``(A, B, S, history)`` with ``||x - A B - S||_F`` after each sweep."""
    x = check_matrix("x", x)
    m, n = x.shape
    check_rank(rank, (m, n))
    if isinstance(nnz, bool) or not isinstance(nnz, int) or not 0 <= nnz <= m * n:
        raise ValueError(f"nnz must be an integer in [0, {m * n}], got {nnz!r}")
    xw = x.to(work_dtype(x)).contiguous()
    s = torch.zeros_like(xw)
    history: list[float] = []
    prev = float("inf")
    a = b = None
    for _ in range(max(1, n_iter)):
        u, sig, vh = torch.linalg.svd(xw - s, full_matrices=False)
        a, b = split_singular_values(u, sig, vh, rank)
        s = _top_k(xw - a @ b, nnz)
        err = float((xw - a @ b - s).norm())
        history.append(err)
        if nnz == 0 or prev - err <= tol * max(prev, 1e-300):
            break
        prev = err
    out = (a.to(x.dtype), b.to(x.dtype), s.to(x.dtype))
    return (*out, history) if return_history else out
