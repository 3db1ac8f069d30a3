"""Compressing a trained dense HMM transition into a ``lorank.LowRank`` factor.

A row-stochastic ``P`` (Z x Z) is factorized by nonnegative matrix factorization
``P ≈ W H`` (``lorank.linalg.nmf``) and rescaled to ``P ≈ A C^T`` with ``C = H^T``
normalized so each column sums to 1 and ``A = W diag(row sums of H)``; since NMF keeps the
row sums of ``P`` (exactly for the KL loss at a fixed point, approximately for Frobenius),
``A`` is (nearly) row-stochastic.  The factor is ``LowRank(left=log A, right=log C)``, whose
own normalization makes every row of the result sum to 1 exactly; the forward algorithm then
costs O(Z R) per step instead of O(Z^2) (Chiu, Deng & Rush 2021).
"""

from __future__ import annotations

import copy

import torch

from lorank._checks import check_positive_int
from lorank.compress.modules import register_structured
from lorank.factors import Dense, Factor, LowRank
from lorank.linalg import nmf
from lorank.nn.hmm import NeuralHMM, TransitionNet

__all__ = ["nmf_transition", "transition_error", "dense_to_lowrank", "compress_hmm",
           "FixedLowRankTransition", "break_even_rank"]

_FLOOR = 1e-30


def _as_matrix(transition: Factor | torch.Tensor) -> torch.Tensor:
    if isinstance(transition, Factor):
        if tuple(transition.batch_shape):
            raise ValueError("nmf_transition takes one (unbatched) transition factor")
        return transition.to_dense()
    if not isinstance(transition, torch.Tensor) or transition.dim() != 2 or \
            transition.shape[0] != transition.shape[1]:
        raise ValueError("transition must be a lorank Factor or a square (Z, Z) tensor")
    p = transition
    if not p.is_floating_point() or not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError("a transition matrix must be finite and nonnegative")
    rows = p.sum(-1, keepdim=True)
    if (rows <= 0).any():
        raise ValueError("every row of the transition matrix must have positive mass")
    return p / rows


def nmf_transition(
    transition: Factor | torch.Tensor,
    rank: int,
    *,
    loss: str = "frobenius",
    n_iter: int = 500,
    tol: float = 1e-9,
    init: str = "svd",
    generator: torch.Generator | None = None,
) -> LowRank:
    """A rank-``rank`` :class:`lorank.LowRank` approximation of a dense transition.

    ``transition``: a :class:`lorank.Dense` (or any unbatched factor) or a nonnegative
    (Z, Z) matrix (rows are normalized).  ``loss``: ``"frobenius"`` (HALS, fast) or ``"kl"``
    (multiplicative updates; the divergence of the rows as distributions).  For
    ``rank >= Z`` the exact factorization ``P = P I`` is returned."""
    check_positive_int("rank", rank)
    p = _as_matrix(transition)
    z = p.shape[0]
    pw = p.to(torch.float64)
    if rank >= z:
        a, c = pw, torch.eye(z, dtype=torch.float64, device=p.device)
    else:
        w, h = nmf(pw, rank, loss=loss, n_iter=n_iter, tol=tol, init=init, generator=generator)
        mass = h.sum(-1)  # (R,)
        keep = mass > 0
        w, h, mass = w[:, keep], h[keep], mass[keep]
        c = (h / mass.unsqueeze(-1)).mT  # (Z, R'), columns sum to 1
        a = w * mass  # (Z, R')
        if a.shape[1] < rank:  # dead components: pad with zero-mass columns
            pad = rank - a.shape[1]
            a = torch.cat([a, a.new_zeros(z, pad)], 1)
            c = torch.cat([c, c.new_full((z, pad), 1.0 / z)], 1)
    left = a.clamp_min(_FLOOR).log().to(p.dtype)
    right = c.clamp_min(_FLOOR).log().to(p.dtype)
    return LowRank(left, right)


def transition_error(p: Factor | torch.Tensor, q: Factor | torch.Tensor) -> dict[str, float]:
    """Distances between two transitions: relative Frobenius error and the mean over rows of
    KL(P_i || Q_i) in nats."""
    pm = _as_matrix(p).to(torch.float64)
    qm = _as_matrix(q).to(torch.float64)
    fro = float((pm - qm).norm() / pm.norm())
    kl = torch.where(pm > 0, pm * (pm.clamp_min(1e-300).log() - qm.clamp_min(1e-300).log()),
                     0.0).sum(-1).mean()
    return {"rel_frobenius": fro, "mean_row_kl": float(kl)}


def dense_to_lowrank(factor: Dense, rank: int, **kwargs) -> LowRank:
    """Alias of :func:`nmf_transition` for a :class:`lorank.Dense` factor."""
    if not isinstance(factor, Dense):
        raise TypeError(f"expected a lorank.Dense factor, got {type(factor).__name__}")
    return nmf_transition(factor, rank, **kwargs)


# ---------------------------------------------------------------------------------------------
# model level: a trained neural HMM (lorank.nn.NeuralHMM / HMMLanguageModel)


@register_structured
class FixedLowRankTransition(TransitionNet):
    """A :class:`lorank.nn.hmm.TransitionNet` holding ``LowRank(left, right)`` and the initial
    logits as parameters (what :func:`compress_hmm` puts into a :class:`~lorank.nn.NeuralHMM`);
    state and feature dropout restrict them to the sampled rows and columns."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, init_logits: torch.Tensor):
        super().__init__()
        if left.dim() != 2 or right.shape != left.shape or init_logits.shape != left.shape[:1]:
            raise ValueError(f"left/right must have shape (Z, R) and init_logits (Z,), got "
                             f"{tuple(left.shape)}, {tuple(right.shape)} and "
                             f"{tuple(init_logits.shape)}")
        # contiguous copies: a model rebuilt for loading (zeros, contiguous) then computes
        # with the same memory layout, so its outputs are bit-identical
        def param(t: torch.Tensor) -> torch.nn.Parameter:
            return torch.nn.Parameter(t.detach().clone(memory_format=torch.contiguous_format))

        self.left, self.right, self.init = param(left), param(right), param(init_logits)
        self.rank = left.shape[-1]

    def init_logits(self, states: torch.Tensor | None = None) -> torch.Tensor:
        return self.init if states is None else self.init[states]

    def factor(self, state_emb=None, states=None, features=None) -> LowRank:
        left, right = self.left, self.right
        if states is not None:
            left, right = left[states], right[states]
        if features is not None:
            left, right = left[:, features], right[:, features]
        return LowRank(left, right)

    def structure(self) -> dict:
        return {"type": "FixedLowRankTransition", "num_states": self.left.shape[0],
                "rank": self.rank}

    @classmethod
    def from_structure(cls, spec: dict) -> FixedLowRankTransition:
        z, r = spec["num_states"], spec["rank"]
        return cls(torch.zeros(z, r), torch.zeros(z, r), torch.zeros(z))


def break_even_rank(num_states: int, current_rank: int | None = None) -> int:
    """The largest transition rank worth compressing to: a rank-r factor costs 2 Z r numbers
    and multiply-adds per step, the dense matrix Z^2, so r < Z / 2; below an existing rank."""
    limit = (num_states - 1) // 2
    return limit if current_rank is None else min(limit, current_rank - 1)


def compress_hmm(
    model: NeuralHMM,
    rank: int,
    *,
    loss: str = "kl",
    n_iter: int = 500,
    inplace: bool = False,
) -> tuple[NeuralHMM, dict]:
    """Replace the transition network of a trained neural HMM (:class:`lorank.nn.NeuralHMM`,
    e.g. a dense ``model="hmm"`` language model) by a :class:`FixedLowRankTransition` holding a
    rank-``rank`` nonnegative factorization of its transition matrix (:func:`nmf_transition`,
    by default fitted by the mean row KL divergence, the likelihood's own measure; or
    ``loss="frobenius"``, faster) and its initial logits: a submodule swap.  ``rank`` must lie below
    :func:`break_even_rank`.  Returns ``(model, info)`` with info: rank, Z, transition-network
    parameters before and after, relative Frobenius error and mean row KL of the new
    transition."""
    if not isinstance(model, NeuralHMM):
        raise TypeError(f"compress_hmm takes a lorank.nn.NeuralHMM, got {type(model).__name__}")
    check_positive_int("rank", rank)
    z, current = model.num_states, model.rank
    limit = break_even_rank(z, current)
    if rank > limit:
        why = (f"its transition already has rank {current}" if current is not None and
               rank >= current else f"a rank-{rank} factor costs 2*Z*R = {2 * z * rank} numbers "
               f"and multiply-adds per step against Z^2 = {z * z} for the dense matrix")
        raise ValueError(f"rank {rank} would not make this {z}-state HMM cheaper: {why}; "
                         f"the break-even rank is {limit} (choose rank <= {limit})")
    was = model.training
    model.eval()
    with torch.no_grad():
        dense = model.transition().to_dense().to(torch.float64)
        init = model.init_logits().detach()
    model.train(was)
    low = nmf_transition(dense, rank, loss=loss, n_iter=n_iter)
    if not inplace:
        model = copy.deepcopy(model)
    before = sum(p.numel() for p in model.transition_net.parameters())
    ref = model.state_emb
    model.transition_net = FixedLowRankTransition(low.left.to(ref), low.right.to(ref),
                                                  init.to(ref))
    after = sum(p.numel() for p in model.transition_net.parameters())
    info = {"num_states": z, "rank": low.rank, "transition_params_before": before,
            "transition_params_after": after, **transition_error(dense, low.to_dense())}
    return model, info
