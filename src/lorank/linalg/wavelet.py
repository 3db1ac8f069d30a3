"""One-level discrete wavelet transforms as matrices, built from PyWavelets' filter banks.

``analysis, synthesis = wavelet_matrices(n, "haar")``: ``analysis`` (n' x n) maps a signal
to its coefficients ``[approximation; detail]`` exactly as ``pywt.dwt(x, wavelet,
mode="periodization")`` does, and ``synthesis`` (n x n') is ``pywt.idwt``; ``synthesis @
analysis = I``.  For an even n and an orthogonal wavelet both are square and
``synthesis = analysis^T``.  As plain matrices they make the 2-D transform
``dwt2(X) = T_m X T_n^T`` (the four sub-bands ``cA, (cH, cV, cD)`` of ``pywt.dwt2`` as the
blocks ``[[cA, cV], [cH, cD]]``) differentiable in torch.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["wavelet_matrices", "dwt2", "idwt2"]


def _pywt():
    try:
        import pywt
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("wavelet transforms need PyWavelets: pip install PyWavelets") from e
    return pywt


@functools.lru_cache(maxsize=64)
def _matrices_np(n: int, wavelet: str) -> tuple[np.ndarray, np.ndarray]:
    pywt = _pywt()
    try:
        wav = pywt.Wavelet(wavelet)
    except ValueError as e:
        raise ValueError(f"unknown wavelet {wavelet!r} (a discrete wavelet name of PyWavelets, "
                         f"e.g. 'haar', 'db2', 'sym4')") from e
    if n < 2:
        raise ValueError(f"a wavelet transform needs a length >= 2, got {n}")
    ca, cd = pywt.dwt(np.eye(n), wav, mode="periodization", axis=0)
    analysis = np.concatenate([ca, cd], 0)  # (n', n)
    half = ca.shape[0]
    eye = np.eye(analysis.shape[0])
    rec = pywt.idwt(eye[:half], eye[half:], wav, mode="periodization", axis=0)
    synthesis = rec[:n]  # (n, n')
    return analysis, synthesis


def wavelet_matrices(n: int, wavelet: str = "haar", *, dtype=torch.float64,
                     device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(analysis (n' x n), synthesis (n x n'))`` of a one-level periodized DWT of length n
    (n' = n for even n, n + 1 for odd n)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an integer, got {n!r}")
    a, s = _matrices_np(n, wavelet)
    return (torch.tensor(a, dtype=dtype, device=device),
            torch.tensor(s, dtype=dtype, device=device))


def dwt2(x: torch.Tensor, wavelet: str = "haar") -> torch.Tensor:
    """One-level 2-D DWT of a matrix: ``pywt.dwt2``'s sub-bands as blocks
    ``[[cA, cV], [cH, cD]]``."""
    tm, _ = wavelet_matrices(x.shape[-2], wavelet, dtype=x.dtype, device=x.device)
    tn, _ = wavelet_matrices(x.shape[-1], wavelet, dtype=x.dtype, device=x.device)
    return tm @ x @ tn.mT


def idwt2(c: torch.Tensor, shape: tuple[int, int], wavelet: str = "haar") -> torch.Tensor:
    """Inverse of :func:`dwt2` for a matrix of ``shape``: ``idwt2(dwt2(X), X.shape) == X``."""
    _, sm = wavelet_matrices(shape[0], wavelet, dtype=c.dtype, device=c.device)
    _, sn = wavelet_matrices(shape[1], wavelet, dtype=c.dtype, device=c.device)
    if c.shape[-2:] != (sm.shape[1], sn.shape[1]):
        raise ValueError(f"coefficients of shape {tuple(c.shape)} do not belong to a "
                         f"{shape} matrix (expected {(sm.shape[1], sn.shape[1])})")
    return sm @ c @ sn.mT
