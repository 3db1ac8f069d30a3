"""Binary-rule factors for PCFGs in Chomsky normal form with a nonterminal/preterminal split.

Symbols are numbered ``0..m-1`` for the m nonterminals (heads of binary rules, labels of spans
of width >= 2) and ``m..m+p-1`` for the p preterminals (labels of single words); ``S = m + p``.
A rule factor holds unnormalized log-potentials of ``A -> B C`` (A a nonterminal, B and C any
symbols) and normalizes them per head, ``T[A, B, C] = exp(phi[A, B, C]) / sum_{B', C'} ...``.

* :class:`DenseRules`: ``phi`` given as an (m, S, S) tensor;
* :class:`LowRankRules`: the low-rank PCFG of Chiu, Deng & Rush (2021), a matrix between the
  head and the *joint* children, ``T[A, (B, C)] ∝ sum_r exp(head[A, r] + children[B, C, r])``;
* :class:`CPRules`: the CP / tensor decomposition of TN-PCFG (Yang, Zhao & Tu 2021),
  ``T[A, B, C] ∝ sum_r exp(head[A, r] + left[B, r] + right[C, r])``, with an inside pass in
  O(n^3 r + n^2 m r);
* :class:`RankSpaceRules`: the same CP parameters, marginalized in rank space (Yang, Liu &
  Tu 2022): the chart holds rank vectors only, O(n^3 r + n^2 r^2), independent of m.

Each class normalizes the way :class:`lorank.LowRank` does: the product is split into a
row-stochastic head matrix and column-stochastic child matrices, so no entry exceeds 1.
Every factor may carry one leading batch dimension (one grammar per sentence).

Shared interface (every factor): ``parameters()`` (the raw tensors, in constructor order),
``log_probs()`` / ``to_dense()``, ``log_prob_entries(a, b, c)``, ``child_operators()`` and
``hyperedge_potentials()`` (the rules as :class:`lorank.LowRankPotential` hyperedges or dense
log-potentials, for :func:`lorank.distributions.hypergraph.cky_hypergraph`).  The factored
ones (``LowRankRules``, ``CPRules``, ``RankSpaceRules``) also have ``rank`` and
``log_factors()``: normalized log factors whose log-sum-exp over the rank gives ``log T``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorank._checks import check_tensor
from lorank._inputs import check_alike
from lorank._numerics import finite_or_zero
from lorank.dp.hypergraph import LowRankPotential
from lorank.semiring import safe_logsumexp

Operator = Callable[[torch.Tensor], torch.Tensor]
BLOCKS = ("NN", "NP", "PN", "PP")
#: the four blocks at once: an operator on full S x S child products (small grammars)
ALL = "AA"


def block_slices(blk: str, m: int, s: int) -> tuple[slice, slice]:
    """Symbol ranges of the two children of a block: ``N`` nonterminals, ``P`` preterminals,
    ``A`` all S symbols."""
    pick = {"N": slice(0, m), "P": slice(m, s), "A": slice(0, s)}
    return pick[blk[0]], pick[blk[1]]


def dense_child_operators(probs: torch.Tensor, m: int) -> dict[str, Operator]:
    """Child operators of a dense rule tensor ``probs`` (*batch, m, S, S) (taken as given, not
    normalized): per block, ``X -> X.flatten() @ T_block^T``, one GEMM."""
    ops = {}
    for blk in (*BLOCKS, ALL):
        rb, cb = block_slices(blk, m, probs.shape[-1])
        mat = probs[..., rb, cb].flatten(-2).transpose(-1, -2)  # (*batch, Sb*Sc, m)
        ops[blk] = (lambda mt: (lambda x: x.flatten(-2) @ mt))(mat)
    return ops



def _batched_rows(x: torch.Tensor, idx: torch.Tensor, nbatch: int) -> torch.Tensor:
    """``x[idx]`` for an unbatched x, ``x[b, idx[..., b]]`` for x with one batch dim (the
    batch index is idx's last dim)."""
    if nbatch == 0:
        return x[idx]
    b = torch.arange(x.shape[0], device=idx.device)
    return x[b, idx]


class Rules:
    """Base class of binary-rule factors."""

    num_nonterminals: int
    num_preterminals: int
    batch_shape: torch.Size
    #: which inside algorithm runs the factor: "children", "cp" or "rank_space"
    inside_kind = "children"

    @property
    def num_symbols(self) -> int:
        return self.num_nonterminals + self.num_preterminals

    def parameters(self) -> tuple[torch.Tensor, ...]:
        """The raw (unnormalized) tensors of the factor, in constructor order."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self.parameters()[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parameters()[0].device

    def log_probs(self) -> torch.Tensor:
        """The dense normalized ``log T``: (*batch, m, S, S). Materializes m S^2 entries."""
        raise NotImplementedError

    def log_prob_entries(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``log T[a, b, c]`` elementwise for index tensors (..., B) (any shape if unbatched)."""
        raise NotImplementedError

    def to_dense(self) -> DenseRules:
        """The same grammar as a :class:`DenseRules` (normalized log-probabilities)."""
        return DenseRules(self.log_probs())

    def child_operators(self) -> dict[str, Operator]:
        """For the "children" inside: per block of child symbols (``"NN"``, ``"NP"``,
        ``"PN"``, ``"PP"``; N = nonterminal, P = preterminal; ``"AA"``: all S x S at once), a
        map from probability-space child products X (B, n, Sb, Sc) to head scores (B, n, m):
        ``sum_{BC} T[A,B,C] X[B,C]``."""
        raise NotImplementedError

    def hyperedge_potentials(self) -> dict[str, torch.Tensor | LowRankPotential]:
        """Per block of child symbols (``"NN"``, ``"NP"``, ``"PN"``, ``"PP"``), the rules
        ``A -> B C`` with B, C in that block as a hyperedge log-potential (head A, tails B and
        C): a dense (*batch, m, Sb, Sc) tensor of ``log T``, or a :class:`LowRankPotential`
        for factored rules (normalized, so the hypergraph needs no normalization)."""
        lp = self.log_probs()
        out = {}
        for blk in BLOCKS:
            rb, cb = self._block_slices(blk)
            out[blk] = lp[..., rb, cb]
        return out

    def _block_slices(self, blk: str) -> tuple[slice, slice]:
        return block_slices(blk, self.num_nonterminals, self.num_symbols)

    def _check_sizes(self, m: int, p: int) -> None:
        if m < 1:
            raise ValueError(f"a grammar needs at least one nonterminal, got {m}")
        if p < 1:
            raise ValueError(f"a grammar needs at least one preterminal, got {p}")


class DenseRules(Rules):
    """Dense rules: ``logits`` (m, S, S) or (B, m, S, S) with ``S = m + num_preterminals``;
    ``T[A] = softmax`` over the S x S children."""

    def __init__(self, logits: torch.Tensor, num_preterminals: int | None = None):
        check_tensor("logits", logits, ndim=(3, 4))
        m, s1, s2 = logits.shape[-3:]
        if s1 != s2:
            raise ValueError(f"logits must have shape (..., m, S, S), got {tuple(logits.shape)}")
        if num_preterminals is not None and s1 != m + num_preterminals:
            raise ValueError(
                f"logits has S = {s1} children per side but m + num_preterminals = "
                f"{m} + {num_preterminals}"
            )
        self._check_sizes(m, s1 - m)
        self.logits = logits
        self.num_nonterminals, self.num_preterminals = m, s1 - m
        self.batch_shape = logits.shape[:-3]

    def parameters(self) -> tuple[torch.Tensor, ...]:
        return (self.logits,)

    def log_probs(self) -> torch.Tensor:
        flat = self.logits.flatten(-2)
        lse = finite_or_zero(safe_logsumexp(flat, -1, keepdim=True))
        return (flat - lse).view_as(self.logits)

    def log_prob_entries(self, a, b, c):
        lp = self.log_probs()
        rows = _batched_rows(lp, a, len(self.batch_shape))  # (..., S, S)
        s = self.num_symbols
        return rows.flatten(-2).gather(-1, (b * s + c).unsqueeze(-1)).squeeze(-1)

    def child_operators(self) -> dict[str, Operator]:
        return dense_child_operators(self.log_probs().exp(), self.num_nonterminals)

    def __repr__(self) -> str:
        return (f"DenseRules(nonterminals={self.num_nonterminals}, "
                f"preterminals={self.num_preterminals}, batch_shape={tuple(self.batch_shape)})")


class LowRankRules(Rules):
    """Low-rank rules between the head and the joint children (Chiu, Deng & Rush 2021):
    ``T[A, B, C] ∝ sum_r exp(head[A, r] + children[B, C, r])``.

    ``head`` (m, R) or (B, m, R) and ``children`` (S, S, R) or (B, S, S, R) are log-features
    (``phi(u) = exp(u W)`` gives ``head = u_A W``).  ``T = U V^T`` with U (m, R) row-stochastic
    and V (S*S, R) column-stochastic, so contracting the children costs O(S^2 R) per span
    instead of O(S^2 m).
    """

    def __init__(self, head: torch.Tensor, children: torch.Tensor):
        check_tensor("head", head, ndim=(2, 3))
        check_tensor("children", children, ndim=(3, 4))
        if head.dim() + 1 != children.dim():
            raise ValueError(
                f"head (m, R) and children (S, S, R) must both be batched or both not, got "
                f"{tuple(head.shape)} and {tuple(children.shape)}"
            )
        m, r = head.shape[-2:]
        s1, s2, r2 = children.shape[-3:]
        if s1 != s2 or r2 != r or head.shape[:-2] != children.shape[:-3]:
            raise ValueError(
                f"children must have shape (..., S, S, R={r}) with the batch of head "
                f"{tuple(head.shape)}, got {tuple(children.shape)}"
            )
        check_alike(head=head, children=children)
        self._check_sizes(m, s1 - m)
        self.head, self.children = head, children
        self.num_nonterminals, self.num_preterminals = m, s1 - m
        self.rank = r
        self.batch_shape = head.shape[:-2]

    def parameters(self) -> tuple[torch.Tensor, ...]:
        return (self.head, self.children)

    def log_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized log factors ``(log U (m, R), log V (S, S, R))`` with
        ``T[A, B, C] = sum_r U[A, r] V[B, C, r]``, U row-stochastic, V column-stochastic."""
        s = safe_logsumexp(self.children.flatten(-3, -2), -2)  # (*batch, R)
        lnorm = finite_or_zero(safe_logsumexp(self.head + s.unsqueeze(-2), -1))  # (*batch, m)
        lu = self.head + s.unsqueeze(-2) - lnorm.unsqueeze(-1)
        lv = self.children - finite_or_zero(s)[..., None, None, :]
        return lu, lv

    def log_probs(self) -> torch.Tensor:
        lu, lv = self.log_factors()
        return safe_logsumexp(lu[..., :, None, None, :] + lv.unsqueeze(-4), -1)

    def log_prob_entries(self, a, b, c):
        lu, lv = self.log_factors()
        nb = len(self.batch_shape)
        hu = _batched_rows(lu, a, nb)
        if nb == 0:
            cv = lv[b, c]
        else:
            bi = torch.arange(lv.shape[0], device=a.device)
            cv = lv[bi, b, c]
        return safe_logsumexp(hu + cv, -1)

    def child_operators(self) -> dict[str, Operator]:
        lu, lv = self.log_factors()
        ut = lu.exp().transpose(-1, -2)  # (*batch, R, m)
        v = lv.exp()
        ops = {}
        for blk in (*BLOCKS, ALL):
            rb, cb = self._block_slices(blk)
            vb = v[..., rb, cb, :].flatten(-3, -2)  # (*batch, Sb*Sc, R)
            ops[blk] = (lambda vv: (lambda x: (x.flatten(-2) @ vv) @ ut))(vb)
        return ops

    def hyperedge_potentials(self) -> dict[str, torch.Tensor | LowRankPotential]:
        lu, lv = self.log_factors()
        out = {}
        for blk in BLOCKS:
            rb, cb = self._block_slices(blk)
            out[blk] = LowRankPotential(lu, lv[..., rb, cb, :])
        return out

    def __repr__(self) -> str:
        return (f"LowRankRules(nonterminals={self.num_nonterminals}, "
                f"preterminals={self.num_preterminals}, rank={self.rank})")


class CPRules(Rules):
    """CP-decomposed rules (TN-PCFG, Yang, Zhao & Tu 2021):
    ``T[A, B, C] ∝ sum_r exp(head[A, r] + left[B, r] + right[C, r])``.

    ``head`` (m, R), ``left`` and ``right`` (S, R) are log-features (or batched with a leading
    B).  Normalized as ``T = sum_r H[A, r] L[B, r] R[C, r]`` with H row-stochastic and L, R
    column-stochastic (the softmax parametrization of TN-PCFG).  The inside pass keeps the
    charts' projections onto the rank: O(n^3 R + n^2 m R).
    """

    inside_kind = "cp"

    def __init__(self, head: torch.Tensor, left: torch.Tensor, right: torch.Tensor):
        check_tensor("head", head, ndim=(2, 3))
        check_tensor("left", left, ndim=(2, 3))
        check_tensor("right", right, ndim=(2, 3))
        if not (head.dim() == left.dim() == right.dim()):
            raise ValueError("head, left and right must all be batched or all not")
        m, r = head.shape[-2:]
        if left.shape != right.shape or left.shape[-1] != r or left.shape[:-2] != head.shape[:-2]:
            raise ValueError(
                f"left and right must have shape (..., S, R={r}) with the batch of head "
                f"{tuple(head.shape)}, got {tuple(left.shape)} and {tuple(right.shape)}"
            )
        check_alike(head=head, left=left, right=right)
        self._check_sizes(m, left.shape[-2] - m)
        self.head, self.left, self.right = head, left, right
        self.num_nonterminals, self.num_preterminals = m, left.shape[-2] - m
        self.rank = r
        self.batch_shape = head.shape[:-2]

    def parameters(self) -> tuple[torch.Tensor, ...]:
        return (self.head, self.left, self.right)

    def log_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalized log factors ``(log H (m, R), log L (S, R), log R (S, R))`` with
        ``T[A, B, C] = sum_r H[A, r] L[B, r] R[C, r]``."""
        sl = safe_logsumexp(self.left, -2)  # (*batch, R)
        sr = safe_logsumexp(self.right, -2)
        lnorm = finite_or_zero(safe_logsumexp(self.head + (sl + sr).unsqueeze(-2), -1))
        lh = self.head + (sl + sr).unsqueeze(-2) - lnorm.unsqueeze(-1)
        sl, sr = finite_or_zero(sl).unsqueeze(-2), finite_or_zero(sr).unsqueeze(-2)
        return lh, self.left - sl, self.right - sr

    def log_probs(self) -> torch.Tensor:
        lh, ll, lr = self.log_factors()
        return safe_logsumexp(
            lh[..., :, None, None, :] + ll[..., None, :, None, :] + lr[..., None, None, :, :], -1
        )

    def log_prob_entries(self, a, b, c):
        lh, ll, lr = self.log_factors()
        nb = len(self.batch_shape)
        return safe_logsumexp(
            _batched_rows(lh, a, nb) + _batched_rows(ll, b, nb) + _batched_rows(lr, c, nb), -1
        )

    def child_operators(self) -> dict[str, Operator]:
        lh, ll, lr = self.log_factors()
        ht = lh.exp().transpose(-1, -2)
        lp, rp = ll.exp(), lr.exp()
        ops = {}
        for blk in (*BLOCKS, ALL):
            rb, cb = self._block_slices(blk)
            lb, rbm = lp[..., rb, :], rp[..., cb, :]
            if lb.dim() == 3:  # batched: align with X (B, n, Sb, Sc)
                lb, rbm = lb.unsqueeze(1), rbm.unsqueeze(1)

            def op(x, lb=lb, rbm=rbm):
                # sum_r H[A, r] sum_{B,C} L[B, r] X[B, C] R[C, r]
                s = ((x @ rbm) * lb).sum(-2)  # (B, n, R)
                return s @ ht

            ops[blk] = op
        return ops

    def hyperedge_potentials(self) -> dict[str, torch.Tensor | LowRankPotential]:
        lh, ll, lr = self.log_factors()
        out = {}
        for blk in BLOCKS:
            rb, cb = self._block_slices(blk)
            out[blk] = LowRankPotential(lh, [ll[..., rb, :], lr[..., cb, :]])
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(nonterminals={self.num_nonterminals}, "
                f"preterminals={self.num_preterminals}, rank={self.rank})")


class RankSpaceRules(CPRules):
    """CP rules marginalized in rank space (Yang, Liu & Tu, NAACL 2022).

    Same parameters and distribution as :class:`CPRules`.  Since every span's inside vector
    is ``beta = H s`` for a rank vector s, its projections onto the children's rank spaces are
    ``s (H^T L_N)`` and ``s (H^T R_N)``: R x R matrices.  The chart holds rank vectors only
    and the inside pass costs O(n^3 R + n^2 R^2), independent of the number of symbols.
    """

    inside_kind = "rank_space"

    @classmethod
    def from_cp(cls, rules: CPRules) -> RankSpaceRules:
        return cls(rules.head, rules.left, rules.right)


__all__ = [
    "ALL",
    "BLOCKS",
    "block_slices",
    "dense_child_operators",
    "Rules",
    "DenseRules",
    "LowRankRules",
    "CPRules",
    "RankSpaceRules",
]
