"""Transition factors: row-stochastic Z x Z matrices that multiply messages without being built.

A factor holds *unnormalized* log-potentials ``phi[i, j]`` and is normalized per row,
``P[i, j] = exp(phi[i, j]) / sum_j' exp(phi[i, j'])``.  Every factor offers

* ``matmul(x)``:      ``x @ P`` for probability-space messages ``x`` (..., Z);
* ``log_matmul(lx)``: ``log(exp(lx) @ P)`` for log-space messages (max-shifted GEMMs);
* ``log_probs()`` / ``to_dense()``: the dense matrix, only when asked;
* ``log_prob_entries(i, j)`` and ``log_prob_columns(j)``: entries and columns of ``log P``.

``Dense`` does a GEMM, ``LowRank`` two thin GEMMs through rank space (Chiu, Deng & Rush 2021),
``Banded`` a banded product, and ``a + b`` a jointly normalized sum (the paper's "LHMM + band").
A factor may carry one leading batch dimension (one transition matrix per example).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from lorank import _gemm
from lorank._checks import check_positive_int, check_tensor
from lorank._numerics import finite_or_zero
from lorank.semiring import log_matmul, log_matmul_by, safe_logsumexp

Operator = Callable[[torch.Tensor], torch.Tensor]


class ProbTerms(NamedTuple):
    """A row-stochastic ``P`` as a sum of terms that the chain kernel multiplies directly.

    ``P = sum_k (M_k1 @ M_k2 @ ...) + sum_b band_b``: ``chains`` lists the matrix products
    (Dense: ``[[P]]``, LowRank: ``[[A, C^T]]``), each matrix (n_in, n_out) or batched
    (B, n_in, n_out); ``bands`` lists ``(probs, width)`` with probs (*batch, Z, 2*width+1) the
    band entries ``P[i, i + k - width]`` (0 where that column falls outside [0, Z)).
    """

    chains: list[list[torch.Tensor]]
    bands: list[tuple[torch.Tensor, int]]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the terms, chains first (the order the chain kernel takes them)."""
        return [m for c in self.chains for m in c] + [p for p, _ in self.bands]


def _bmv(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x @ m`` for messages x (..., B, Z) and m (Z, K) or batched (B, Z, K)."""
    if m.dim() == 2:
        return _gemm.mm(x, m) if x.dim() == 2 else x @ m
    return (x.unsqueeze(-2) @ m).squeeze(-2)


def _log_bmv_by(lm: torch.Tensor) -> Operator:
    """``lx -> log(exp(lx) @ exp(lm))`` with the same shapes as :func:`_bmv`; ``exp(lm)``
    computed once for every call."""
    op = log_matmul_by(lm)
    if lm.dim() == 2:
        return op
    return lambda lx: op(lx.unsqueeze(-2)).squeeze(-2)


def _rows(m: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """Rows ``m[i]`` (..., K) for m (Z, K), or ``m[b, i[..., b]]`` for batched m (B, Z, K)."""
    if m.dim() == 2:
        return m[i]
    batch = torch.arange(m.shape[0], device=m.device)
    return m[batch, i]



def _softmax_plain(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_softmax_parts` without autograd: five passes, in place."""
    m = torch.nan_to_num(x.amax(dim, keepdim=True), nan=0.0, posinf=0.0, neginf=0.0)
    ex = (x - m).exp_()
    tot = ex.sum(dim, keepdim=True)
    log_norm = tot.log().add_(m).squeeze(dim)  # log 0 = -inf: an all -inf slice
    return log_norm, ex.div_(tot.clamp_min_(torch.finfo(x.dtype).tiny))


class _Softmax(torch.autograd.Function):
    """``(logsumexp(x, dim), softmax(x, dim))`` with a fused backward,
    ``dx = P (dP - sum(dP P) + d logsumexp)`` (0 on an all -inf slice)."""

    @staticmethod
    def forward(ctx, x, dim):
        log_norm, p = _softmax_plain(x.detach(), dim)
        ctx.save_for_backward(p)
        ctx.dim = dim
        return log_norm, p

    @staticmethod
    def backward(ctx, g_norm, g_p):
        (p,) = ctx.saved_tensors
        dim = ctx.dim
        if g_p is None:
            return p * g_norm.unsqueeze(dim), None
        g_p = g_p.contiguous()  # a transposed gradient makes every product below strided
        gp = g_p * p
        t = gp.sum(dim, keepdim=True)
        if g_norm is not None:
            t = t - g_norm.unsqueeze(dim)
        if torch.is_grad_enabled():  # create_graph: out of place, differentiable
            return gp - p * t, None
        return gp.addcmul_(p, t, value=-1.0), None


def _softmax_parts(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logsumexp(x, dim), exp(x - logsumexp))`` from one exponential: the log normalizer
    (-inf for an all -inf slice, as :func:`safe_logsumexp`) and the normalized probabilities
    (0 for such a slice), with a fused backward."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Softmax.apply(x, dim)
    return _softmax_plain(x, dim)


class _Own(NamedTuple):
    """A factor's own normalization, kept in a ``normalize()`` memo."""

    log_norm: torch.Tensor
    probs: torch.Tensor


def _own_probs(memo: dict, key, log_norm: torch.Tensor) -> torch.Tensor | None:
    """The memoized probabilities renormalized to ``log_norm`` (as is if it is the factor's
    own normalizer; rescaled by ``exp(own - log_norm)`` for a sum's joint one), or None."""
    own = memo.get(key)
    if own is None:
        return None
    if own.log_norm is log_norm:
        return own.probs
    return own.probs * (own.log_norm - finite_or_zero(log_norm)).exp().unsqueeze(-1)


class Factor:
    """Base class of transition factors (row-normalized nonnegative Z x Z matrices)."""

    num_states: int
    #: () for one shared matrix, (B,) for one per example
    batch_shape: torch.Size

    # ---- to implement -------------------------------------------------------------------
    def log_normalizer(self) -> torch.Tensor:
        """Log row sums of the unnormalized potentials: (*batch, Z)."""
        raise NotImplementedError

    def prob_operator_with(self, log_norm: torch.Tensor) -> Operator:
        """``x -> x @ (exp(phi) / exp(log_norm)[:, None])`` in probability space, stably."""
        raise NotImplementedError

    def log_operator_with(self, log_norm: torch.Tensor) -> Operator:
        """Log-space version of :meth:`prob_operator_with`."""
        raise NotImplementedError

    def log_normalizer_into(self, memo: dict) -> torch.Tensor:
        """:meth:`log_normalizer`, leaving in ``memo`` what :meth:`prob_terms_with` can reuse."""
        return self.log_normalizer()

    def prob_terms_with(self, log_norm: torch.Tensor, memo: dict) -> ProbTerms | None:
        """``P`` as :class:`ProbTerms` with the row normalizer ``log_norm`` (-inf rows are
        treated as 0); None if the factor has no such form (the chain then uses
        :meth:`prob_operator`)."""
        return None

    def tensors(self) -> list[torch.Tensor]:
        """The tensors that define the factor (to ask whether any requires grad); [] for a
        factor that does not say."""
        return []

    def _row_softmax(self, phi: torch.Tensor, memo: dict) -> torch.Tensor:
        """The row log normalizer of potentials ``phi``, its probabilities kept in ``memo``."""
        own = _Own(*_softmax_parts(phi, -1))
        memo[("rows", id(self))] = own
        return own.log_norm

    def _row_probs(self, phi: torch.Tensor, log_norm: torch.Tensor, memo: dict) -> torch.Tensor:
        """``exp(phi - log_norm)``: the memoized probabilities if ``log_norm`` is phi's own."""
        p = _own_probs(memo, ("rows", id(self)), log_norm)
        if p is None:
            p = (phi - finite_or_zero(log_norm).unsqueeze(-1)).exp()
        return p

    def _log_unnorm_dense(self) -> torch.Tensor:
        raise NotImplementedError

    def _log_unnorm_entries(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _log_unnorm_columns(self, j: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _log_unnorm_rows(self, i: torch.Tensor) -> torch.Tensor:
        """Rows ``phi[i, :]`` (n, Z) of an unbatched factor; subclasses avoid building Z x Z."""
        return self._log_unnorm_dense()[i]

    # ---- shared API ---------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        for attr in ("logits", "left"):  # the parameters of the built-in factors: no compute
            t = getattr(self, attr, None)
            if isinstance(t, torch.Tensor):
                return t.dtype
        return self.log_normalizer().dtype

    def prob_operator(self) -> Operator:
        """A function ``x -> x @ P`` with everything independent of ``x`` computed once."""
        return self.prob_operator_with(finite_or_zero(self.log_normalizer()))

    def log_operator(self) -> Operator:
        """A function ``lx -> log(exp(lx) @ P)`` with the factor's tensors prepared once."""
        return self.log_operator_with(finite_or_zero(self.log_normalizer()))

    def prob_matrices(self) -> list[torch.Tensor] | None:
        """``[M_1, ..., M_k]`` with ``P = M_1 @ ... @ M_k`` (Dense: ``[P]``, LowRank:
        ``[A, C^T]``), each (Z_in, Z_out) or batched; None if the factor is not such a chain."""
        terms = self.prob_terms()
        if terms is None or terms.bands or len(terms.chains) != 1:
            return None
        return terms.chains[0]

    def prob_terms(self) -> ProbTerms | None:
        """``P`` as a sum of matrix chains and bands (:class:`ProbTerms`); None for factors
        without such a form."""
        return self.normalize()[1]

    def normalize(self) -> tuple[torch.Tensor, ProbTerms | None]:
        """``(log_normalizer(), prob_terms())`` with every shared piece computed once (for
        ``LowRank`` the column log-sums and ``left + s``, as a bare implementation would)."""
        memo: dict = {}
        log_norm = self.log_normalizer_into(memo)
        return log_norm, self.prob_terms_with(log_norm, memo)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ P`` for probability-space messages x (..., Z) (batched factors: (..., B, Z))."""
        return self.prob_operator()(x)

    def log_matmul(self, lx: torch.Tensor) -> torch.Tensor:
        """``log(exp(lx) @ P)`` for log-space messages, via max-shifted GEMMs."""
        return self.log_operator()(lx)

    def log_probs(self) -> torch.Tensor:
        """The dense normalized ``log P``: (*batch, Z, Z). Materializes Z x Z."""
        return self._log_unnorm_dense() - finite_or_zero(self.log_normalizer()).unsqueeze(-1)

    def to_dense(self) -> torch.Tensor:
        """The dense transition matrix ``P``: (*batch, Z, Z). Materializes Z x Z."""
        return self.log_probs().exp()

    def log_prob_entries(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """``log P[i, j]`` elementwise for index tensors of shape (..., B) (or any shape if
        the factor is unbatched)."""
        # an all -inf row (a dead end) stays -inf, not NaN
        ln = finite_or_zero(self.log_normalizer())
        return self._log_unnorm_entries(i, j) - _rows(ln.unsqueeze(-1), i).squeeze(-1)

    def log_prob_rows(self, i: torch.Tensor) -> torch.Tensor:
        """Rows ``log P[i, :]`` (n, Z) of an unbatched factor for state indices i (n,), without
        building Z x Z (O(n Z R) for LowRank)."""
        if len(self.batch_shape):
            raise ValueError(
                "log_prob_rows needs an unbatched factor, got batch shape "
                f"{tuple(self.batch_shape)}"
            )
        ln = finite_or_zero(self.log_normalizer())
        return self._log_unnorm_rows(i) - ln[i].unsqueeze(-1)

    def log_prob_columns(self, j: torch.Tensor) -> torch.Tensor:
        """Columns ``log P[:, j]``: (..., Z) for index tensor j of shape (...)."""
        return self._log_unnorm_columns(j) - finite_or_zero(self.log_normalizer())

    def __add__(self, other: Factor) -> Factor:
        if not isinstance(other, Factor):
            return NotImplemented
        return Sum([self, other])

    def _check_batch(self, *tensors: torch.Tensor, name: str) -> None:
        for t in tensors:
            if t.dim() not in (2, 3):
                raise ValueError(
                    f"{name} must have shape (Z, K) or (B, Z, K), got {tuple(t.shape)}"
                )


class Dense(Factor):
    """Dense transition ``P = softmax(logits, -1)``; logits (Z, Z) or (B, Z, Z)."""

    def __init__(self, logits: torch.Tensor):
        check_tensor("logits", logits, ndim=(2, 3))
        if logits.shape[-1] != logits.shape[-2]:
            raise ValueError(f"logits must be square (..., Z, Z), got {tuple(logits.shape)}")
        self.logits = logits
        self.num_states = logits.shape[-1]
        self.batch_shape = logits.shape[:-2]

    def log_normalizer(self) -> torch.Tensor:
        return safe_logsumexp(self.logits, dim=-1)

    def prob_operator_with(self, log_norm: torch.Tensor) -> Operator:
        p = (self.logits - log_norm.unsqueeze(-1)).exp()
        return lambda x: _bmv(x, p)

    def log_normalizer_into(self, memo: dict) -> torch.Tensor:
        return self._row_softmax(self.logits, memo)

    def prob_terms_with(self, log_norm: torch.Tensor, memo: dict) -> ProbTerms:
        return ProbTerms([[self._row_probs(self.logits, log_norm, memo)]], [])

    def tensors(self) -> list[torch.Tensor]:
        return [self.logits]

    def log_operator_with(self, log_norm: torch.Tensor) -> Operator:
        return _log_bmv_by(self.logits - log_norm.unsqueeze(-1))

    def _log_unnorm_dense(self) -> torch.Tensor:
        return self.logits

    def _log_unnorm_entries(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return _rows(self.logits, i).gather(-1, j.unsqueeze(-1)).squeeze(-1)

    def _log_unnorm_columns(self, j: torch.Tensor) -> torch.Tensor:
        return _rows(self.logits.transpose(-1, -2), j)

    def _log_unnorm_rows(self, i: torch.Tensor) -> torch.Tensor:
        return self.logits[i]

    def __repr__(self) -> str:
        return f"Dense(num_states={self.num_states}, batch_shape={tuple(self.batch_shape)})"


class LowRank(Factor):
    """Low-rank transition ``P[i, j] ∝ sum_r exp(left[i, r] + right[j, r])``.

    ``left`` and ``right`` are log-features (Z, R) or (B, Z, R): the paper's positive feature
    map ``phi(U) = exp(U W)`` has ``left = U @ W`` (Chiu, Deng & Rush, NeurIPS 2021).  The
    matrix factors as ``P = A @ C.T`` with ``A = softmax_r(left + s - ...)`` row-stochastic
    (Z, R) and ``C = softmax_j(right)`` column-stochastic (Z, R), so every entry used in the
    probability-space product lies in [0, 1]: no overflow for any finite log-features.
    """

    def __init__(self, left: torch.Tensor, right: torch.Tensor):
        check_tensor("left", left, ndim=(2, 3))
        check_tensor("right", right, ndim=(2, 3))
        if left.shape != right.shape:
            raise ValueError(
                f"left and right must have the same shape (..., Z, R), got "
                f"left {tuple(left.shape)} and right {tuple(right.shape)}"
            )
        if left.dtype != right.dtype:
            raise TypeError(
                f"left and right must have the same dtype, got left {left.dtype} "
                f"{tuple(left.shape)} and right {right.dtype} {tuple(right.shape)}"
            )
        self.left = left
        self.right = right
        self.num_states = left.shape[-2]
        self.rank = left.shape[-1]
        self.batch_shape = left.shape[:-2]

    @classmethod
    def from_embeddings(
        cls, left_emb: torch.Tensor, right_emb: torch.Tensor, projection: torch.Tensor
    ) -> LowRank:
        """``phi(U) phi(V)^T`` with ``phi(X) = exp(X W)``: embeddings (Z, d), projection (d, R)."""
        check_tensor("projection", projection, ndim=2)
        for name, emb in (("left_emb", left_emb), ("right_emb", right_emb)):
            check_tensor(name, emb, ndim=(2, 3))
            if emb.shape[-1] != projection.shape[0]:
                raise ValueError(
                    f"{name} has feature size {emb.shape[-1]} but projection has shape "
                    f"{tuple(projection.shape)}; expected ({emb.shape[-1]}, R)"
                )
        return cls(left_emb @ projection, right_emb @ projection)

    def _column_lse(self) -> torch.Tensor:
        """``s[r] = log sum_j exp(right[j, r])``: (*batch, R)."""
        return safe_logsumexp(self.right, dim=-2)

    def _parts(self, memo: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(s, C, left + s)`` with C = exp(right - s), computed once per ``memo``."""
        key = ("lowrank", id(self))
        if key not in memo:
            s, c = _softmax_parts(self.right, -2)
            memo[key] = (s, c, self.left + s.unsqueeze(-2))
        return memo[key]

    def log_normalizer_into(self, memo: dict) -> torch.Tensor:
        own = _Own(*_softmax_parts(self._parts(memo)[2], -1))
        memo[("lowrank-a", id(self))] = own
        return own.log_norm

    def log_normalizer(self) -> torch.Tensor:
        return safe_logsumexp(self.left + self._column_lse().unsqueeze(-2), dim=-1)

    def stochastic_factors(self, log_norm: torch.Tensor | None = None, memo: dict | None = None):
        """``(A, C)`` with ``P = A @ C.mT``: A (Z, R) row-stochastic, C (Z, R) columns sum to 1.

        With a larger ``log_norm`` (a joint normalizer of a sum), A's rows sum to less than 1.
        """
        memo = {} if memo is None else memo
        _, c, ls = self._parts(memo)
        if log_norm is None:
            log_norm = self.log_normalizer_into(memo)
        a = _own_probs(memo, ("lowrank-a", id(self)), log_norm)
        if a is None:  # no own normalization in the memo
            a = (ls - finite_or_zero(log_norm).unsqueeze(-1)).exp()
        return a, c

    def prob_operator_with(self, log_norm: torch.Tensor) -> Operator:
        a, c = self.stochastic_factors(log_norm)
        ct = c.transpose(-1, -2)
        return lambda x: _bmv(_bmv(x, a), ct)

    def prob_terms_with(self, log_norm: torch.Tensor, memo: dict) -> ProbTerms:
        a, c = self.stochastic_factors(log_norm, memo)
        return ProbTerms([[a, c.transpose(-1, -2)]], [])

    def tensors(self) -> list[torch.Tensor]:
        return [self.left, self.right]

    def log_operator_with(self, log_norm: torch.Tensor) -> Operator:
        s = self._column_lse()
        la = self.left + s.unsqueeze(-2) - log_norm.unsqueeze(-1)
        lct = (self.right - finite_or_zero(s).unsqueeze(-2)).transpose(-1, -2)
        by_a, by_ct = _log_bmv_by(la), _log_bmv_by(lct)
        return lambda lx: by_ct(by_a(lx))

    def _shifted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left + s, right - s)``: the same potentials, but ``right - s`` is log C (columns
        sum to 1), so the max-shifted GEMMs below cannot lose a whole row or column to
        underflow (with raw ``left @ right^T``, float32 features of +-50 gave rows of P
        summing to 1.017)."""
        s = self._column_lse().unsqueeze(-2)
        return self.left + s, self.right - finite_or_zero(s)

    def _log_unnorm_dense(self) -> torch.Tensor:
        la, lc = self._shifted()
        return log_matmul(la, lc.transpose(-1, -2))

    def _log_unnorm_entries(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return safe_logsumexp(_rows(self.left, i) + _rows(self.right, j), dim=-1)

    def _log_unnorm_columns(self, j: torch.Tensor) -> torch.Tensor:
        la, lc = self._shifted()
        rj = _rows(lc, j)  # (..., R) or (..., B, R)
        return log_matmul(rj.unsqueeze(-2), la.transpose(-1, -2)).squeeze(-2)

    def _log_unnorm_rows(self, i: torch.Tensor) -> torch.Tensor:
        la, lc = self._shifted()
        return log_matmul(la[i], lc.transpose(-1, -2))

    def __repr__(self) -> str:
        return (
            f"LowRank(num_states={self.num_states}, rank={self.rank}, "
            f"batch_shape={tuple(self.batch_shape)})"
        )


class Banded(Factor):
    """Banded transition: ``P[i, j] ∝ exp(logits[i, j - i + width])`` for ``|j - i| <= width``.

    ``logits`` has shape (Z, 2*width + 1) or (B, Z, 2*width + 1); column k holds offset
    ``k - width``.  Entries that fall outside [0, Z) are ignored.  Products cost O(Z * width).
    """

    def __init__(self, logits: torch.Tensor, width: int):
        if isinstance(width, bool) or not isinstance(width, int) or width < 0:
            raise ValueError(f"width must be a nonnegative integer, got {width!r}")
        check_tensor("logits", logits, ndim=(2, 3))
        k = 2 * width + 1
        if logits.shape[-1] != k:
            raise ValueError(
                f"logits must have shape (..., Z, 2*width+1) = (..., Z, {k}) for width={width}, "
                f"got {tuple(logits.shape)}"
            )
        self.width = width
        self.num_states = z = logits.shape[-2]
        self.batch_shape = logits.shape[:-2]
        rows = torch.arange(z, device=logits.device).unsqueeze(-1)
        offs = torch.arange(k, device=logits.device) - width
        cols = rows + offs
        self._valid = (cols >= 0) & (cols < z)
        self.logits = logits
        self._masked = torch.where(
            self._valid, logits, torch.full_like(logits, -math.inf)
        )  # a new tensor: the caller's logits are never modified
        # out[j] = sum_k y_pad[j - k + 2w, k] with y padded by w on both sides of the Z axis
        self._gather_rows = (torch.arange(z).unsqueeze(-1) - torch.arange(k) + 2 * width).to(
            logits.device
        )
        self._gather_cols = torch.arange(k, device=logits.device).expand(z, k)

    def log_normalizer(self) -> torch.Tensor:
        return safe_logsumexp(self._masked, dim=-1)

    def _shift(self, y: torch.Tensor, fill: float) -> torch.Tensor:
        w = self.width
        pad = y.new_full((*y.shape[:-2], w, y.shape[-1]), fill)
        y_pad = torch.cat([pad, y, pad], dim=-2)
        return y_pad[..., self._gather_rows, self._gather_cols]

    def prob_operator_with(self, log_norm: torch.Tensor) -> Operator:
        band = (self._masked - log_norm.unsqueeze(-1)).exp()
        return lambda x: self._shift(x.unsqueeze(-1) * band, 0.0).sum(-1)

    def log_operator_with(self, log_norm: torch.Tensor) -> Operator:
        band = self._masked - log_norm.unsqueeze(-1)
        return lambda lx: safe_logsumexp(self._shift(lx.unsqueeze(-1) + band, -math.inf), -1)

    def log_normalizer_into(self, memo: dict) -> torch.Tensor:
        return self._row_softmax(self._masked, memo)

    def prob_terms_with(self, log_norm: torch.Tensor, memo: dict) -> ProbTerms:
        return ProbTerms([], [(self._row_probs(self._masked, log_norm, memo), self.width)])

    def tensors(self) -> list[torch.Tensor]:
        return [self.logits]

    def _log_unnorm_dense(self) -> torch.Tensor:
        z, w = self.num_states, self.width
        out = self._masked.new_full((*self.batch_shape, z, z + 2 * w), -math.inf)
        rows = torch.arange(z, device=out.device).unsqueeze(-1)
        cols = rows + torch.arange(2 * w + 1, device=out.device)
        out[..., rows, cols] = self._masked
        return out[..., w : w + z]

    def _log_unnorm_entries(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        k = j - i + self.width
        ok = (k >= 0) & (k <= 2 * self.width)
        vals = _rows(self._masked, i).gather(-1, k.clamp(0, 2 * self.width).unsqueeze(-1))
        return torch.where(ok, vals.squeeze(-1), torch.full_like(vals.squeeze(-1), -math.inf))

    def _log_unnorm_columns(self, j: torch.Tensor) -> torch.Tensor:
        z, w = self.num_states, self.width
        i = torch.arange(z, device=j.device)
        k = j.unsqueeze(-1) - i + w  # (..., Z)
        ok = (k >= 0) & (k <= 2 * w)
        kc = k.clamp(0, 2 * w)
        if self._masked.dim() == 2:
            vals = self._masked[i, kc]
        else:
            b = torch.arange(self._masked.shape[0], device=j.device).unsqueeze(-1)
            vals = self._masked[b, i, kc]
        return torch.where(ok, vals, torch.full_like(vals, -math.inf))

    def _log_unnorm_rows(self, i: torch.Tensor) -> torch.Tensor:
        z, w = self.num_states, self.width
        out = self._masked.new_full((i.shape[0], z + 2 * w), -math.inf)
        cols = i.unsqueeze(-1) + torch.arange(2 * w + 1, device=i.device)
        out = out.scatter(1, cols, self._masked[i])
        return out[:, w : w + z]

    def __repr__(self) -> str:
        return f"Banded(num_states={self.num_states}, width={self.width})"


class Sum(Factor):
    """Jointly normalized sum: ``P[i, j] ∝ sum_k exp(phi_k[i, j])`` (e.g. LowRank + Banded)."""

    def __init__(self, parts: list[Factor]):
        flat: list[Factor] = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, Sum) else [p])
        sizes = {p.num_states for p in flat}
        if len(sizes) != 1:
            raise ValueError(f"factors in a sum must have the same num_states, got {sorted(sizes)}")
        self.parts = flat
        self.num_states = flat[0].num_states
        shapes = {tuple(p.batch_shape) for p in flat}
        if len(shapes - {()}) > 1:
            raise ValueError(
                f"factors in a sum must share one batch shape (or be unbatched), got "
                f"{sorted(shapes)}"
            )
        dtypes = sorted({str(p.dtype) for p in flat})
        if len(dtypes) != 1:
            raise TypeError(f"factors in a sum must have the same dtype, got {dtypes}")
        self.batch_shape = torch.Size(max(shapes, key=len))

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def log_normalizer_into(self, memo: dict) -> torch.Tensor:
        norms = [p.log_normalizer_into(memo) for p in self.parts]
        return torch.stack(torch.broadcast_tensors(*norms)).logsumexp(0)

    def log_normalizer(self) -> torch.Tensor:
        norms = [p.log_normalizer() for p in self.parts]
        return torch.stack(torch.broadcast_tensors(*norms)).logsumexp(0)

    def prob_operator_with(self, log_norm: torch.Tensor) -> Operator:
        ops = [p.prob_operator_with(log_norm) for p in self.parts]
        return lambda x: sum(op(x) for op in ops)

    def log_operator_with(self, log_norm: torch.Tensor) -> Operator:
        ops = [p.log_operator_with(log_norm) for p in self.parts]

        def apply(lx: torch.Tensor) -> torch.Tensor:
            return safe_logsumexp(torch.stack([op(lx) for op in ops]), 0)

        return apply

    def prob_terms_with(self, log_norm: torch.Tensor, memo: dict) -> ProbTerms | None:
        chains: list[list[torch.Tensor]] = []
        bands: list[tuple[torch.Tensor, int]] = []
        for p in self.parts:
            terms = p.prob_terms_with(log_norm, memo)
            if terms is None:
                return None
            chains += terms.chains
            bands += terms.bands
        return ProbTerms(chains, bands)

    def tensors(self) -> list[torch.Tensor]:
        return [t for p in self.parts for t in p.tensors()]

    def _combine(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return safe_logsumexp(torch.stack(torch.broadcast_tensors(*xs)), 0)

    def _log_unnorm_dense(self) -> torch.Tensor:
        return self._combine([p._log_unnorm_dense() for p in self.parts])

    def _log_unnorm_entries(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self._combine([p._log_unnorm_entries(i, j) for p in self.parts])

    def _log_unnorm_columns(self, j: torch.Tensor) -> torch.Tensor:
        return self._combine([p._log_unnorm_columns(j) for p in self.parts])

    def _log_unnorm_rows(self, i: torch.Tensor) -> torch.Tensor:
        return self._combine([p._log_unnorm_rows(i) for p in self.parts])

    def __repr__(self) -> str:
        return " + ".join(repr(p) for p in self.parts)


def orthogonal_random_features(
    dim: int, rank: int, generator: torch.Generator | None = None, dtype=torch.float32
) -> torch.Tensor:
    """A (dim, rank) projection of stacked orthogonal blocks with chi-distributed column norms,
    the random-feature initialization used for ``phi(U) = exp(U W)`` (Choromanski et al. 2021;
    Chiu, Deng & Rush 2021)."""
    check_positive_int("dim", dim)
    check_positive_int("rank", rank)
    blocks = []
    for _ in range(math.ceil(rank / dim)):
        g = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(g)
        blocks.append(q)
    w = torch.cat(blocks, dim=1)[:, :rank]
    norms = torch.randn(dim, rank, generator=generator, dtype=torch.float64).norm(dim=0)
    return (w * norms).to(dtype)
