"""SVD-based low-rank factorizations ``X ≈ A @ B`` (A: m x r, B: r x n).

Every function returns ``(A, B)`` in the dtype of ``X``; the work is done in float64 on CPU.

* :func:`truncated_svd`: the Eckart-Young optimum of ``||X - A B||_F``; the error is the
  root-sum-square of the dropped singular values.
* :func:`randomized_svd`: Halko, Martinsson & Tropp (2011), range finder with power iterations.
* :func:`scaled_svd`: the optimum of ``||D_r (X - A B) D_c||_F`` for positive diagonal
  ``D_r``, ``D_c`` (closed form: SVD of ``D_r X D_c``, then unscale).
* :func:`fisher_weighted_svd`: FWSVD (Hsu et al., ICLR 2022): row weights
  ``sqrt(sum_j F_ij)`` from the empirical Fisher ``F = E[grad^2]`` of a loss.
* :func:`activation_aware_svd`: ASVD (Yuan et al. 2023): columns scaled by the mean absolute
  input activation to the power ``alpha``.
* :func:`whitened_svd`: SVD-LLM (Wang et al. 2024): with the calibration Gram matrix
  ``G = X_in^T X_in = L L^T`` (Cholesky), truncating the SVD of ``X L`` minimizes the output
  error ``||(X - A B) X_in^T||_F``, and that error equals the root-sum-square of the dropped
  singular values of ``X L``.
"""

from __future__ import annotations

import torch

from lorank.linalg._common import check_matrix, check_rank, split_singular_values, work_dtype

__all__ = [
    "svd_spectrum",
    "truncated_svd",
    "randomized_svd",
    "scaled_svd",
    "fisher_weighted_svd",
    "fisher_row_weights",
    "activation_aware_svd",
    "whitened_svd",
    "whitening_factor",
]


def svd_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Singular values of ``x`` (descending), float64 on CPU."""
    x = check_matrix("x", x)
    return torch.linalg.svdvals(x.to(work_dtype(x)))


def truncated_svd(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation ``x ≈ A @ B`` in Frobenius (and spectral) norm."""
    x = check_matrix("x", x)
    check_rank(rank, tuple(x.shape))
    u, s, vh = torch.linalg.svd(x.to(work_dtype(x)), full_matrices=False)
    a, b = split_singular_values(u, s, vh, rank)
    return a.to(x.dtype), b.to(x.dtype)


def randomized_svd(
    x: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomized truncated SVD (Halko et al. 2011, Alg. 4.4 with QR re-orthonormalized power
    iterations).  Exact when ``rank(x) <= rank`` (up to rounding); cost O(mn(r+p))."""
    x = check_matrix("x", x)
    m, n = x.shape
    check_rank(rank, (m, n))
    if oversample < 0 or n_iter < 0:
        raise ValueError(f"oversample and n_iter must be >= 0, got {oversample}, {n_iter}")
    xw = x.to(work_dtype(x))
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, dtype=xw.dtype).to(xw.device)
    q, _ = torch.linalg.qr(xw @ omega)
    for _ in range(n_iter):
        q, _ = torch.linalg.qr(xw.mT @ q)
        q, _ = torch.linalg.qr(xw @ q)
    ub, s, vh = torch.linalg.svd(q.mT @ xw, full_matrices=False)
    a, b = split_singular_values(q @ ub, s, vh, rank)
    return a.to(x.dtype), b.to(x.dtype)


def _positive_scale(name: str, d: torch.Tensor | None, size: int) -> torch.Tensor | None:
    if d is None:
        return None
    if not isinstance(d, torch.Tensor) or d.shape != (size,):
        shape = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise ValueError(f"{name} must be a tensor of shape ({size},), got {shape}")
    if not torch.isfinite(d).all() or (d <= 0).any():
        raise ValueError(f"{name} must be finite and strictly positive")
    return d


def scaled_svd(
    x: torch.Tensor,
    rank: int,
    *,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    return_spectrum: bool = False,
):
    """Minimize ``||diag(row_scale) (x - A B) diag(col_scale)||_F`` over rank-``rank`` A B.

    Returns ``(A, B)``, or ``(A, B, s)`` with ``s`` the singular values of the scaled matrix
    (whose dropped tail is the weighted error) when ``return_spectrum``."""
    x = check_matrix("x", x)
    m, n = x.shape
    check_rank(rank, (m, n))
    dt = work_dtype(x)
    xw = x.to(dt)
    dr = _positive_scale("row_scale", row_scale, m)
    dc = _positive_scale("col_scale", col_scale, n)
    if dr is not None:
        dr = dr.to(device=x.device, dtype=dt)
        xw = dr.unsqueeze(-1) * xw
    if dc is not None:
        dc = dc.to(device=x.device, dtype=dt)
        xw = xw * dc
    u, s, vh = torch.linalg.svd(xw, full_matrices=False)
    a, b = split_singular_values(u, s, vh, rank)
    if dr is not None:
        a = a / dr.unsqueeze(-1)
    if dc is not None:
        b = b / dc
    out = (a.to(x.dtype), b.to(x.dtype))
    return (*out, s) if return_spectrum else out


def fisher_row_weights(fisher: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """FWSVD row importances ``sqrt(sum_j F_ij)`` (F: m x n, or already summed: (m,)),
    floored at ``eps`` times their maximum so every weight stays positive."""
    if not isinstance(fisher, torch.Tensor) or fisher.dim() not in (1, 2):
        shape = tuple(fisher.shape) if isinstance(fisher, torch.Tensor) else type(fisher).__name__
        raise ValueError(f"fisher must have shape (m, n) or (m,), got {shape}")
    rows = fisher.to(work_dtype(fisher))
    if rows.dim() == 2:
        rows = rows.sum(-1)
    if (rows < 0).any() or not torch.isfinite(rows).all():
        raise ValueError("fisher information must be finite and nonnegative")
    w = rows.sqrt()
    top = float(w.max()) if w.numel() else 0.0
    if top == 0.0:
        return torch.ones_like(w)
    return w.clamp_min(top * eps)


def fisher_weighted_svd(
    x: torch.Tensor, rank: int, fisher: torch.Tensor, *, return_spectrum: bool = False
):
    """FWSVD: ``min ||diag(w) (x - A B)||_F`` with ``w = sqrt(row sums of the Fisher)``.

    ``fisher`` is the accumulated squared gradient of a loss with respect to ``x`` (same
    shape), or per-row importances (m,)."""
    x = check_matrix("x", x)
    w = fisher_row_weights(fisher)
    if w.shape != (x.shape[0],):
        raise ValueError(
            f"fisher must have shape {tuple(x.shape)} or ({x.shape[0]},) to match x, got "
            f"{tuple(fisher.shape)}"
        )
    return scaled_svd(x, rank, row_scale=w, return_spectrum=return_spectrum)


def activation_aware_svd(
    x: torch.Tensor,
    rank: int,
    act_scale: torch.Tensor,
    *,
    alpha: float = 0.5,
    eps: float = 1e-6,
    return_spectrum: bool = False,
):
    """ASVD: ``min ||(x - A B) diag(s^alpha)||_F`` with ``s`` the mean absolute activation of
    each input channel (column of ``x``; ``y = x_in @ x^T`` as in ``nn.Linear``).  Channels that
    carry large activations, which dominate the output error, are kept more accurately."""
    x = check_matrix("x", x)
    if not isinstance(act_scale, torch.Tensor) or act_scale.shape != (x.shape[1],):
        raise ValueError(
            f"act_scale must have shape ({x.shape[1]},) (one entry per input column of x), "
            f"got {tuple(act_scale.shape) if isinstance(act_scale, torch.Tensor) else act_scale}"
        )
    if (act_scale < 0).any() or not torch.isfinite(act_scale).all():
        raise ValueError("act_scale must be finite and nonnegative")
    s = act_scale.to(work_dtype(x)) ** alpha
    top = float(s.max())
    s = s.clamp_min(max(top, 1.0) * eps)
    return scaled_svd(x, rank, col_scale=s, return_spectrum=return_spectrum)


def whitening_factor(gram: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """Lower-triangular ``L`` with ``L L^T = gram + damp * mean(diag(gram)) * I``.

    The damping keeps a rank-deficient Gram matrix (fewer calibration vectors than input
    features, dead channels) factorizable; if Cholesky still fails the damping is raised
    tenfold until it succeeds."""
    gram = check_matrix("gram", gram)
    if gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square, got {tuple(gram.shape)}")
    g = gram.to(work_dtype(gram))
    g = (g + g.mT) / 2
    scale = float(g.diagonal().mean())
    if scale <= 0:
        scale = 1.0
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    d = damp
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex(g + (d * scale) * eye)
        if int(info) == 0:
            return chol
        d = max(d * 10, 1e-10)
    raise ValueError("gram matrix is not positive semi-definite (Cholesky failed)")


def whitened_svd(
    x: torch.Tensor,
    rank: int,
    gram: torch.Tensor | None = None,
    *,
    chol: torch.Tensor | None = None,
    damp: float = 1e-6,
    return_spectrum: bool = False,
):
    """SVD-LLM truncation-aware whitening for ``y = x_in @ x^T`` (x: out x in).

    With ``gram = X_in^T X_in = L L^T``: ``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T L^{-1}``
    where ``x L = U S V^T``.  Then ``||(x - A B) L||_F`` — the calibration output error — is
    exactly ``sqrt(sum_{i>r} S_i^2)``.  Pass ``chol`` to reuse a factor across calls."""
    x = check_matrix("x", x)
    m, n = x.shape
    check_rank(rank, (m, n))
    if chol is None:
        if gram is None:
            raise ValueError("whitened_svd needs the calibration gram matrix (or its chol)")
        if gram.shape != (n, n):
            raise ValueError(
                f"gram must have shape ({n}, {n}) for x of shape ({m}, {n}), "
                f"got {tuple(gram.shape)}"
            )
        chol = whitening_factor(gram, damp)
    dt = work_dtype(x)
    low = chol.to(device=x.device, dtype=dt)
    u, s, vh = torch.linalg.svd(x.to(dt) @ low, full_matrices=False)
    a, bw = split_singular_values(u, s, vh, rank)
    # B = bw L^{-1}  <=>  B L = bw  <=>  L^T B^T = bw^T
    b = torch.linalg.solve_triangular(low.mT, bw.mT, upper=True).mT
    out = (a.to(x.dtype), b.to(x.dtype))
    return (*out, s) if return_spectrum else out
