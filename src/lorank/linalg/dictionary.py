"""Sparse dictionary factorizations ``X ≈ A @ B`` with a dense dictionary ``B`` (k x n, one
atom per row) and sparse codes ``A`` (m x k) holding ``nnz`` nonzeros in every row.

For a layer ``y = x @ X^T`` (X: out x in) every output neuron's weight row is a sparse
combination of k atoms of the input space: the union-of-subspaces model of CoSpaDi
(Shopkhoev et al. 2025), where a low-rank ``A B`` forces all rows into one subspace.  With
the calibration Gram matrix ``G = X_in^T X_in = L L^T`` the fit minimizes the output error
``||(X - A B) L||_F`` (whitening, as in SVD-LLM); without it the weight error.

* :func:`omp`: batched Gram-based orthogonal matching pursuit (Batch-OMP, Rubinstein,
  Zibulevsky & Elad 2008), optionally under an N:M constraint (at most N atoms of every M
  consecutive ones: DSFormer's semi-structured sparsity, Chand et al. 2023).
* :func:`sparse_dictionary`: alternating sparse coding (OMP) and dictionary update (the least
  squares MOD step, Engan et al. 1999) from the SVD basis; every step is guarded so the
  objective never increases.
* :func:`dictionary_bytes`: honest storage of the factorization (dictionary, nonzero values
  and the support as a bitmask of k bits per row).
"""

from __future__ import annotations

import math

import torch

from lorank.linalg._common import check_matrix, work_dtype
from lorank.linalg.svd import whitening_factor

__all__ = [
    "omp",
    "sparse_dictionary",
    "dictionary_bytes",
    "support_bytes",
    "check_nm",
]


def check_nm(nm: object, n_atoms: int | None = None) -> tuple[int, int]:
    """``(N, M)`` with ``1 <= N <= M`` (and M dividing ``n_atoms`` when given), or an error."""
    if not (isinstance(nm, tuple | list) and len(nm) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in nm)):
        raise ValueError(f"nm must be a pair of integers (N, M), got {nm!r}")
    n, m = nm
    if not 1 <= n <= m:
        raise ValueError(f"nm = ({n}, {m}) must satisfy 1 <= N <= M")
    if n_atoms is not None and n_atoms % m:
        raise ValueError(f"n_atoms = {n_atoms} must be a multiple of M = {m} for nm = {nm}")
    return n, m


def support_bytes(rows: int, n_atoms: int) -> int:
    """Bytes of the support bitmask: ``ceil(k / 8)`` per row (0 when every atom is used is
    not assumed: callers store a full support as dense factors instead)."""
    return rows * ((n_atoms + 7) // 8)


def dictionary_bytes(m: int, n: int, n_atoms: int, nnz: int, itemsize: int = 4,
                     *, share: int = 1) -> int:
    """Bytes of ``A (m x k, nnz per row) @ B (k x n)``: the dictionary ``k n`` (divided among
    ``share`` matrices that use it, rounded up), ``m nnz`` values and the bitmask support.
    A full support (``nnz == k``) is stored as dense factors, without a mask."""
    dict_bytes = -(-n_atoms * n * itemsize // share)
    mask = 0 if nnz >= n_atoms else support_bytes(m, n_atoms)
    return dict_bytes + m * nnz * itemsize + mask


def _check_sizes(n_atoms: object, nnz: object, n: int) -> tuple[int, int]:
    for name, v in (("n_atoms", n_atoms), ("nnz", nnz)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if n_atoms > n:
        raise ValueError(f"n_atoms = {n_atoms} exceeds the atom length n = {n} (at most n "
                         f"atoms span the input space)")
    if nnz > n_atoms:
        raise ValueError(f"nnz = {nnz} exceeds n_atoms = {n_atoms}")
    return n_atoms, nnz


def omp(
    gram: torch.Tensor,
    corr: torch.Tensor,
    nnz: int,
    *,
    nm: tuple[int, int] | None = None,
    chunk: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-OMP: for every column ``y_j`` of the signals, ``nnz`` atoms chosen greedily and
    their least-squares coefficients, from ``gram = D^T D`` (k x k) and ``corr = D^T Y``
    (k x m) alone (Rubinstein, Zibulevsky & Elad 2008; incremental Cholesky).

    Returns ``(index, values)``, each (m, nnz), indices ascending in every row.  With
    ``nm = (N, M)`` every group of M consecutive atoms gets exactly N of them."""
    gram = check_matrix("gram", gram)
    corr = check_matrix("corr", corr)
    k = gram.shape[0]
    if gram.shape != (k, k) or corr.shape[0] != k:
        raise ValueError(f"gram must be (k, k) and corr (k, m); got {tuple(gram.shape)} and "
                         f"{tuple(corr.shape)}")
    if isinstance(nnz, bool) or not isinstance(nnz, int) or not 1 <= nnz <= k:
        raise ValueError(f"nnz must be an integer in [1, {k}], got {nnz!r}")
    if nm is not None:
        n_keep, m_group = check_nm(nm, k)
        if nnz != n_keep * k // m_group:
            raise ValueError(f"with nm = {tuple(nm)} and k = {k} atoms nnz must be "
                             f"{n_keep * k // m_group}, got {nnz}")
    dt = gram.dtype
    dev = corr.device
    chunk = max(chunk, min(1024, 2 ** 21 // (nnz * k)))  # fewer Python steps on big inputs
    diag = gram.diagonal().clamp_min(torch.finfo(dt).tiny)
    floor = diag.max() * 1e-12
    m = corr.shape[1]
    out_idx = torch.empty(m, nnz, dtype=torch.long, device=dev)
    out_val = torch.empty(m, nnz, dtype=dt, device=dev)
    for lo in range(0, m, chunk):
        a0 = corr[:, lo:lo + chunk].mT.contiguous()  # (b, k)
        b = a0.shape[0]
        rows = torch.arange(b, device=dev)
        # L: Cholesky factor of G[I, I]; V = G[:, I] L^{-T}, so row j of V is L^{-1} G[I, j]
        # (the next row of L) and alpha = a0 - V z with z = L^{-1} a0[I]
        chol = torch.zeros(b, nnz, nnz, dtype=dt, device=dev)
        v = torch.zeros(b, nnz, k, dtype=dt, device=dev)  # V^T, rows contiguous
        z = torch.zeros(b, nnz, dtype=dt, device=dev)
        idx = torch.zeros(b, nnz, dtype=torch.long, device=dev)
        avail = torch.ones(b, k, dtype=torch.bool, device=dev)
        if nm is not None:
            counts = torch.zeros(b, k // m_group, dtype=torch.long, device=dev)
        alpha = a0
        for t in range(nnz):
            score = (alpha.abs() / diag.sqrt()).masked_fill(~avail, -1.0)
            j = score.argmax(-1)
            w = v[rows, :t, j]  # (b, t)
            ljj = (diag[j] - (w * w).sum(-1)).clamp_min(floor).sqrt()
            chol[:, t, :t] = w
            chol[:, t, t] = ljj
            col = gram[:, j].mT  # (b, k)
            if t:
                col = col - torch.bmm(w.unsqueeze(1), v[:, :t]).squeeze(1)
            v[:, t] = col / ljj.unsqueeze(-1)
            z[:, t] = (a0[rows, j] - (w * z[:, :t]).sum(-1)) / ljj
            alpha = alpha - v[:, t] * z[:, t:t + 1]
            idx[:, t] = j
            avail[rows, j] = False
            if nm is not None:
                grp = j // m_group
                counts[rows, grp] += 1
                full = counts[rows, grp] >= n_keep
                if full.any():
                    r = rows[full]
                    start = (grp[full] * m_group).unsqueeze(-1)
                    avail[r.unsqueeze(-1), start + torch.arange(m_group, device=dev)] = False
        coef = torch.linalg.solve_triangular(chol.mT, z.unsqueeze(-1), upper=True).squeeze(-1)
        order = idx.argsort(-1)
        out_idx[lo:lo + b] = torch.gather(idx, 1, order)
        out_val[lo:lo + b] = torch.gather(coef, 1, order)
    return out_idx, out_val


def _refit(gram: torch.Tensor, corr: torch.Tensor, index: torch.Tensor,
           chunk: int = 256) -> torch.Tensor:
    """Least-squares values on a fixed support: ``G[I, I] c = corr[I]`` per column."""
    m, s = index.shape
    out = torch.empty(m, s, dtype=gram.dtype, device=gram.device)
    eye = torch.eye(s, dtype=gram.dtype, device=gram.device)
    ridge = float(gram.diagonal().max()) * 1e-12
    for lo in range(0, m, chunk):
        sel = index[lo:lo + chunk]
        g = gram[sel.unsqueeze(-1), sel.unsqueeze(-2)] + ridge * eye
        rhs = torch.gather(corr[:, lo:lo + chunk].mT, 1, sel).unsqueeze(-1)
        chol, info = torch.linalg.cholesky_ex(g)
        if bool((info != 0).any()):
            out[lo:lo + chunk] = torch.linalg.lstsq(g, rhs).solution.squeeze(-1)
        else:
            out[lo:lo + chunk] = torch.cholesky_solve(rhs, chol).squeeze(-1)
    return out


def _column_errors(y: torch.Tensor, d: torch.Tensor, index: torch.Tensor,
                   values: torch.Tensor) -> torch.Tensor:
    """``||y_j - D c_j||^2`` for every column j."""
    r = y - d @ _dense_codes(index, values, d.shape[1]).mT
    return (r * r).sum(0)


def _dense_codes(index: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    c = torch.zeros(index.shape[0], k, dtype=values.dtype, device=values.device)
    return c.scatter_(1, index, values)


def _init_dictionary(y: torch.Tensor, k: int, generator: torch.Generator | None):
    """The top-k left singular vectors of the whitened signals y (n x m); when y has fewer
    than k independent columns, the rest are random unit vectors."""
    u, _, _ = torch.linalg.svd(y, full_matrices=False)
    d = u[:, :k]
    if d.shape[1] < k:
        extra = torch.randn(y.shape[0], k - d.shape[1], generator=generator,
                            dtype=torch.float64).to(device=y.device, dtype=y.dtype)
        d = torch.cat([d, extra / extra.norm(dim=0, keepdim=True)], 1)
    return d


def sparse_dictionary(
    x: torch.Tensor,
    n_atoms: int,
    nnz: int,
    *,
    gram: torch.Tensor | None = None,
    chol: torch.Tensor | None = None,
    damp: float = 1e-6,
    n_iter: int = 8,
    tol: float = 1e-4,
    nm: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    sparse_codes: bool = False,
    return_history: bool = False,
):
    """``x (m x n) ≈ A @ B``: dictionary ``B`` (k x n, unit-norm atoms in the whitened
    space), codes ``A`` (m x k) with ``nnz`` nonzeros per row; CoSpaDi (Shopkhoev et al. 2025).

    Minimizes ``||(x - A B) L||_F`` with ``L L^T = gram`` (the calibration Gram matrix of the
    layer's inputs, damped as in :func:`whitening_factor`; ``chol`` reuses a factor), or
    ``||x - A B||_F`` without one.  Alternates Batch-OMP coding and the least-squares
    dictionary update from the SVD basis of ``x L``; a row keeps its previous code when OMP
    finds a worse one, so the objective never increases.  With ``nnz == n_atoms`` the result
    is the whitened truncated SVD (the optimum).  ``nm=(N, M)``: N:M-structured codes.

    Atoms and code columns are returned with equal norms.  Returns ``(A, B)`` (A dense
    with exactly ``nnz`` stored entries per row; with
    ``sparse_codes`` the pair ``(index, values)``, each m x nnz, indices ascending) or
    ``(A, B, history)`` with the objective after initialization and every sweep."""
    x = check_matrix("x", x)
    m, n = x.shape
    k, s = _check_sizes(n_atoms, nnz, n)
    if nm is not None:
        n_keep, m_group = check_nm(nm, k)
        if s != n_keep * k // m_group:
            raise ValueError(f"nm = {tuple(nm)} with {k} atoms fixes nnz = "
                             f"{n_keep * k // m_group}, got nnz = {s}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be a nonnegative integer, got {n_iter!r}")
    dt = work_dtype(x)
    if chol is None and gram is not None:
        if gram.shape != (n, n):
            raise ValueError(f"gram must have shape ({n}, {n}) for x of shape ({m}, {n}), "
                             f"got {tuple(gram.shape)}")
        chol = whitening_factor(gram, damp)
    if chol is not None and chol.shape != (n, n):
        raise ValueError(f"chol must have shape ({n}, {n}), got {tuple(chol.shape)}")
    low = None if chol is None else chol.to(device=x.device, dtype=dt)
    y = (x.to(dt) @ low).mT if low is not None else x.to(dt).mT  # (n, m) whitened columns
    d = _init_dictionary(y, k, generator)
    gr, corr = d.mT @ d, d.mT @ y
    index, values = omp(gr, corr, s, nm=nm)
    err = float(_column_errors(y, d, index, values).sum())
    history: list[float] = [math.sqrt(err)]
    for _ in range(n_iter if s < k else 0):
        # MOD: the least-squares dictionary for the current codes, then unit-norm atoms
        c = _dense_codes(index, values, k)  # (m, k)
        cc = c.mT @ c
        ridge = float(cc.diagonal().max()) * 1e-12 + torch.finfo(dt).tiny
        d_new = torch.linalg.solve(cc + ridge * torch.eye(k, dtype=dt, device=x.device),
                                   c.mT @ y.mT).mT
        norms = d_new.norm(dim=0)
        dead = norms <= norms.max() * 1e-10
        d_new = d_new / norms.clamp_min(torch.finfo(dt).tiny)
        if dead.any():  # unused atoms restart at the worst-fitted signals
            resid = y - d @ c.mT
            worst = (resid * resid).sum(0).topk(int(dead.sum())).indices
            fill = resid[:, worst]
            d_new[:, dead] = fill / fill.norm(dim=0, keepdim=True).clamp_min(1e-300)
        gr_new, corr_new = d_new.mT @ d_new, d_new.mT @ y
        val_new = _refit(gr_new, corr_new, index)
        err_new = _column_errors(y, d_new, index, val_new)
        if float(err_new.sum()) <= err:
            d, gr, corr, values = d_new, gr_new, corr_new, val_new
            # new supports by OMP; a column keeps its code where OMP does worse
            omp_idx, omp_val = omp(gr, corr, s, nm=nm)
            better = (_column_errors(y, d, omp_idx, omp_val) < err_new).unsqueeze(-1)
            index = torch.where(better, omp_idx, index)
            values = torch.where(better, omp_val, values)
        prev, err = err, float(_column_errors(y, d, index, values).sum())
        history.append(math.sqrt(err))
        if prev - err <= tol * max(prev, 1e-300):
            break
    # B = D^T L^{-1}: the whitened atoms mapped back to the input space
    b = d.mT
    if low is not None:
        b = torch.linalg.solve_triangular(low.mT, b.mT, upper=True).mT
    # balance: atom j and code column j get equal norms (the product is unchanged), so
    # fine-tuning steps of a given size move both factors alike
    col = torch.zeros(k, dtype=dt, device=x.device).index_add_(
        0, index.flatten(), (values * values).flatten()).sqrt()
    row = b.norm(dim=1)
    ok = (col > 0) & (row > 0)
    t = torch.where(ok, (col / row.clamp_min(1e-300)).sqrt(), torch.ones_like(col))
    b = b * t.unsqueeze(-1)
    values = values / t[index]
    if sparse_codes:
        a = (index, values.to(x.dtype))
    else:
        a = _dense_codes(index, values, k).to(x.dtype)
    out = (a, b.to(x.dtype))
    return (*out, history) if return_history else out
