"""Low-rank multi-head attention pooling (LAMA, Mehta, Rangwala & Ramakrishnan 2019).

A sequence ``x`` (B, T, d) is summarized by ``heads`` attention distributions over its
positions, all read off one rank-k factorization of the bilinear affinity between a global
context vector ``c`` and every position:

    score[b, i, t] = sum_r P[r, i] tanh(U c)[r] tanh(V x[b, t])[r]
    attn[b, i] = softmax_t(score[b, i]),   out[b] = concat_i sum_t attn[b, i, t] x[b, t]

so head i uses the affinity matrix ``V^T diag(P[:, i] * tanh(U c)) (.)`` — every head is a
rank-k bilinear form with shared factors ``U``, ``V`` (k x d) and its own pooling column of
``P`` (k x heads).  ``c`` is a learned vector (``context="learned"``) or the masked mean of
the sequence (``context="mean"``).  The module stores ``2 k d + k heads (+ d)`` numbers,
against ``4 d^2`` for standard multi-head attention.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LowRankMultiHeadAttention"]


class LowRankMultiHeadAttention(nn.Module):
    """LAMA attention pooling: (B, T, d) -> (B, heads * d) (``concat=True``) or
    (B, d) (head average), with the attention weights (B, heads, T) on request."""

    def __init__(self, dim: int, heads: int, rank: int, *, context: str = "learned",
                 concat: bool = True, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        for name, v in (("dim", dim), ("heads", heads), ("rank", rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if context not in ("learned", "mean"):
            raise ValueError(f"context must be 'learned' or 'mean', got {context!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        kw = {"device": device, "dtype": dtype}
        self.dim, self.heads, self.rank = dim, heads, rank
        self.context_mode = context
        self.concat = concat
        self.u = nn.Linear(dim, rank, bias=False, **kw)
        self.v = nn.Linear(dim, rank, bias=False, **kw)
        self.pool = nn.Parameter(torch.empty(rank, heads, **kw))
        nn.init.normal_(self.pool, std=1 / math.sqrt(rank))
        if context == "learned":
            self.context = nn.Parameter(torch.empty(dim, **kw))
            nn.init.normal_(self.context, std=1 / math.sqrt(dim))
        else:
            self.register_parameter("context", None)
        self.dropout = nn.Dropout(dropout)

    @property
    def out_features(self) -> int:
        return self.heads * self.dim if self.concat else self.dim

    def _context(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.context is not None:
            return self.context.expand(x.shape[0], -1)
        if mask is None:
            return x.mean(1)
        w = mask.to(x.dtype).unsqueeze(-1)
        return (x * w).sum(1) / w.sum(1).clamp_min(1)

    def scores(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalized affinities (B, heads, T); masked positions are -inf."""
        gate = torch.tanh(self.u(self._context(x, mask)))  # (B, k)
        feats = torch.tanh(self.v(x))  # (B, T, k)
        s = torch.einsum("btk,bk,kh->bht", feats, gate, self.pool)
        if mask is not None:
            s = s.masked_fill(~mask.unsqueeze(1), float("-inf"))
        return s

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                return_weights: bool = False):
        """``x`` (B, T, d); ``mask`` (B, T) bool, True at real positions (each row needs
        one)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, T, {self.dim}), got {tuple(x.shape)}")
        if mask is not None:
            if mask.shape != x.shape[:2] or mask.dtype != torch.bool:
                raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape[:2])}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
            if not bool(mask.any(-1).all()):
                raise ValueError("mask has a row without any real position")
        attn = torch.softmax(self.scores(x, mask), -1)  # (B, heads, T)
        out = self.dropout(attn) @ x  # (B, heads, d)
        out = out.flatten(1) if self.concat else out.mean(1)
        return (out, attn) if return_weights else out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, rank={self.rank}, "
                f"context={self.context_mode}, concat={self.concat}")
