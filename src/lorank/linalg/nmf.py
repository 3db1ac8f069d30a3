"""Nonnegative factorizations.

* :func:`semi_nmf`: ``X ≈ A @ B`` with ``B >= 0`` and ``A`` of any sign (Ding, Li & Jordan,
  2010; the "SNMF" of Winata et al. 2019).  ``A`` is solved exactly by least squares and ``B``
  by HALS (exact coordinate-block minimization, the default) or by Ding's multiplicative
  update; both never increase ``||X - A B||_F^2``.
* :func:`nmf`: ``X ≈ W @ H`` with ``W, H >= 0`` for nonnegative ``X``; Frobenius loss by HALS
  (Cichocki & Phan 2009) or multiplicative updates (Lee & Seung 2001), or the generalized
  Kullback-Leibler divergence by multiplicative updates (Lee & Seung 2001).  All three are
  monotone.  KL fixed points preserve row and column sums of ``X`` (Ho & Van Dooren 2008),
  which :func:`lorank.compress.hmm.nmf_transition` relies on for stochastic matrices.
"""

from __future__ import annotations

import math

import torch

from lorank._checks import check_nonnegative_int
from lorank.linalg._common import check_matrix, check_rank, work_dtype

__all__ = ["semi_nmf", "nmf", "semi_nmf_objective", "kl_divergence"]

_TINY = 1e-300


def semi_nmf_objective(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """``||x - a @ b||_F^2``."""
    return float(((x - a @ b) ** 2).sum())


def kl_divergence(x: torch.Tensor, y: torch.Tensor) -> float:
    """Generalized KL divergence ``sum x log(x / y) - x + y`` (0 log 0 = 0)."""
    xy = torch.where(x > 0, x * (x.clamp_min(_TINY).log() - y.clamp_min(_TINY).log()), 0.0)
    return float((xy - x + y).sum())


def _check_iters(n_iter: int, tol: float) -> None:
    check_nonnegative_int("n_iter", n_iter)
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")


def _svd_init(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD-style starting point (Boutsidis & Gallopoulos 2008): for each leading singular
    triplet keep the dominant sign pattern of ``u v^T``.  Returns ``(W, H) >= 0``."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    m, n = x.shape
    w = x.new_zeros(m, rank)
    h = x.new_zeros(rank, n)
    for k in range(rank):
        uk, vk = u[:, k], vh[k]
        up, un = uk.clamp_min(0), (-uk).clamp_min(0)
        vp, vn = vk.clamp_min(0), (-vk).clamp_min(0)
        pos = up.norm() * vp.norm()
        neg = un.norm() * vn.norm()
        if pos >= neg:
            uu, vv, sig = up / up.norm().clamp_min(_TINY), vp / vp.norm().clamp_min(_TINY), pos
        else:
            uu, vv, sig = un / un.norm().clamp_min(_TINY), vn / vn.norm().clamp_min(_TINY), neg
        root = (s[k] * sig).sqrt()
        w[:, k] = root * uu
        h[k] = root * vv
    return w, h


def semi_nmf(
    x: torch.Tensor,
    rank: int,
    *,
    n_iter: int = 200,
    tol: float = 1e-7,
    method: str = "hals",
    init: str = "svd",
    generator: torch.Generator | None = None,
    return_history: bool = False,
):
    """Semi-NMF ``x ≈ A @ B`` with ``B >= 0`` (r x n) and ``A`` unconstrained (m x r).

    Alternates the exact least-squares ``A = x B^T (B B^T)^+`` with a nonnegative update of
    ``B`` (``method="hals"``: exact block updates of each row of B; ``"mu"``: Ding et al.'s
    multiplicative rule).  Stops after ``n_iter`` sweeps or when the relative decrease of the
    objective falls below ``tol``.  ``init="svd"`` starts from |V| of the truncated SVD
    (deterministic), ``"random"`` from uniform noise.

    Returns ``(A, B)`` or ``(A, B, history)`` where ``history`` lists ``||x - A B||_F^2``
    after each sweep (non-increasing)."""
    x = check_matrix("x", x)
    m, n = x.shape
    check_rank(rank, (m, n))
    _check_iters(n_iter, tol)
    if method not in ("hals", "mu"):
        raise ValueError(f"method must be 'hals' or 'mu', got {method!r}")
    dt = work_dtype(x)
    xw = x.to(dt)
    if init == "svd":
        _, s, vh = torch.linalg.svd(xw, full_matrices=False)
        b = (s[:rank].sqrt().unsqueeze(-1) * vh[:rank]).abs()
        b = b + 1e-3 * b.mean()
    elif init == "random":
        b = torch.rand(rank, n, generator=generator, dtype=dt).to(xw.device) + 0.1
    else:
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    eps = torch.finfo(dt).eps

    def sweep(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if method == "hals":
            b = _hals_rows(xw, a, b, nonneg_eps=0.0)
        else:
            xta = a.mT @ xw  # (r, n)
            ata = a.mT @ a  # (r, r)
            pos = lambda t: (t.abs() + t) / 2
            neg = lambda t: (t.abs() - t) / 2
            num = pos(xta) + neg(ata) @ b
            den = neg(xta) + pos(ata) @ b
            b = b * ((num + eps) / (den + eps)).sqrt()
        b = _revive_dead_rows(b, generator)
        return _lstsq_left(xw, b), b

    objective = lambda a, b: semi_nmf_objective(xw, a, b)
    pair, history = _minimize(sweep, objective, (_lstsq_left(xw, b), b), n_iter, tol)
    out = (pair[0].to(x.dtype), pair[1].to(x.dtype))
    return (*out, history) if return_history else out


def _minimize(sweep, objective, pair, n_iter: int, tol: float):
    """Apply ``sweep`` to the factor ``pair`` until ``n_iter`` sweeps or a relative decrease
    of ``objective`` below ``tol``; returns ``(pair, objective after each sweep)``."""
    history: list[float] = []
    prev = objective(*pair)
    for _ in range(n_iter):
        pair = sweep(*pair)
        obj = objective(*pair)
        history.append(obj)
        if prev - obj <= tol * max(prev, _TINY):
            break
        prev = obj
    return pair, history


def _lstsq_left(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``argmin_A ||x - A b||_F`` = ``x b^T (b b^T)^+``."""
    return torch.linalg.lstsq(b.mT, x.mT, driver="gelsd" if x.device.type == "cpu" else None)\
        .solution.mT


def _hals_rows(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, nonneg_eps: float):
    """One HALS sweep over the rows of ``b >= 0`` for ``min ||x - a b||_F`` (a fixed):
    each row gets its exact nonnegative minimizer given the others."""
    ata = a.mT @ a
    atx = a.mT @ x
    b = b.clone()
    for k in range(b.shape[0]):
        d = ata[k, k]
        if d <= 0:
            continue
        b[k] = (b[k] + (atx[k] - ata[k] @ b) / d).clamp_min(nonneg_eps)
    return b


def _revive_dead_rows(b: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A row of B that is all zero has a zero column in A (least squares), so its
    contribution is nil and any new value leaves the objective unchanged: restart it with
    small positive noise instead of losing the component forever."""
    dead = b.abs().sum(-1) == 0
    if dead.any():
        scale = float(b.abs().mean()) or 1.0
        noise = torch.rand(int(dead.sum()), b.shape[1], generator=generator, dtype=b.dtype)
        b = b.clone()
        b[dead] = noise.to(b.device) * scale
    return b


def nmf(
    x: torch.Tensor,
    rank: int,
    *,
    loss: str = "frobenius",
    solver: str | None = None,
    n_iter: int = 500,
    tol: float = 1e-8,
    init: str = "svd",
    generator: torch.Generator | None = None,
    return_history: bool = False,
):
    """Nonnegative ``x ≈ W @ H`` (W: m x r >= 0, H: r x n >= 0) for ``x >= 0``.

    ``loss="frobenius"`` (solver ``"hals"``, default, or ``"mu"``) or ``loss="kl"``
    (generalized Kullback-Leibler, solver ``"mu"``).  ``init="svd"`` is NNDSVDa
    (deterministic; zeros filled with the mean of ``x``), ``"random"`` uniform.
    Returns ``(W, H)`` or ``(W, H, history)`` with the loss after each sweep (monotone)."""
    x = check_matrix("x", x)
    if (x < 0).any():
        raise ValueError("nmf needs a nonnegative matrix x (use semi_nmf for mixed signs)")
    m, n = x.shape
    check_rank(rank, (m, n))
    _check_iters(n_iter, tol)
    if loss not in ("frobenius", "kl"):
        raise ValueError(f"loss must be 'frobenius' or 'kl', got {loss!r}")
    solver = solver or ("hals" if loss == "frobenius" else "mu")
    if (loss, solver) not in (("frobenius", "hals"), ("frobenius", "mu"), ("kl", "mu")):
        raise ValueError(f"solver {solver!r} is not available for loss {loss!r}")
    dt = work_dtype(x)
    xw = x.to(dt)
    mean = float(xw.mean())
    if init == "svd":
        w, h = _svd_init(xw, rank)
        fill = mean / 100 if mean > 0 else 1e-3
        w = torch.where(w > 0, w, torch.full_like(w, fill))
        h = torch.where(h > 0, h, torch.full_like(h, fill))
    elif init == "random":
        scale = math.sqrt(mean / rank) if mean > 0 else 1.0
        w = torch.rand(m, rank, generator=generator, dtype=dt).to(xw.device) * scale + 1e-3
        h = torch.rand(rank, n, generator=generator, dtype=dt).to(xw.device) * scale + 1e-3
    else:
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    eps = torch.finfo(dt).tiny ** 0.5
    objective = (
        (lambda w_, h_: float(((xw - w_ @ h_) ** 2).sum()))
        if loss == "frobenius"
        else (lambda w_, h_: kl_divergence(xw, w_ @ h_))
    )

    def sweep(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if solver == "hals":
            h = _hals_rows(xw, w, h, nonneg_eps=0.0)
            w = _hals_rows(xw.mT, h.mT, w.mT, nonneg_eps=0.0).mT
        elif loss == "frobenius":
            h = h * (w.mT @ xw) / (w.mT @ w @ h).clamp_min(eps)
            w = w * (xw @ h.mT) / (w @ (h @ h.mT)).clamp_min(eps)
        else:
            ratio = xw / (w @ h).clamp_min(eps)
            h = h * (w.mT @ ratio) / w.sum(0).unsqueeze(-1).clamp_min(eps)
            ratio = xw / (w @ h).clamp_min(eps)
            w = w * (ratio @ h.mT) / h.sum(1).unsqueeze(0).clamp_min(eps)
        return w, h

    (w, h), history = _minimize(sweep, objective, (w, h), n_iter, tol)
    out = (w.to(x.dtype), h.to(x.dtype))
    return (*out, history) if return_history else out
