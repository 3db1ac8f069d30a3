"""Shared checks and helpers of the factorization algorithms."""

from __future__ import annotations

import torch

from lorank._checks import check_tensor


def check_matrix(name: str, x: object) -> torch.Tensor:
    """A finite floating 2-D tensor, or a clear error."""
    x = check_tensor(name, x, ndim=2, allow_neg_inf=False)
    if x.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    return x


def check_rank(rank: object, shape: tuple[int, int], *, what: str = "rank") -> int:
    """``1 <= rank <= min(m, n)`` for a matrix of ``shape``, or a ValueError naming both."""
    m, n = shape
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{what} must be an integer, got {rank!r}")
    if rank <= 0:
        raise ValueError(f"{what} must be >= 1, got {rank}")
    if rank > min(m, n):
        raise ValueError(
            f"{what}={rank} exceeds min(m, n) = {min(m, n)} for a matrix of shape ({m}, {n})"
        )
    return rank


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 on CPU (cheap at layer sizes, and exact enough for the tests' identities);
    float32 (or the input's wider type) on accelerators."""
    if x.device.type == "cpu":
        return torch.float64
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def split_singular_values(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors ``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T`` (equal norms help
    fine-tuning after compression)."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root.unsqueeze(-1) * vh[:rank]
