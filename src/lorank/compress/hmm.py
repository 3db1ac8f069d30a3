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

import torch

from lorank._checks import check_positive_int
from lorank.factors import Dense, Factor, LowRank
from lorank.linalg import nmf

__all__ = ["nmf_transition", "transition_error", "dense_to_lowrank", "compress_hmm",
           "attach_lowrank_transition", "LowRankTransition"]

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


class LowRankTransition(torch.nn.Module):
    """A fixed (trainable) low-rank transition ``LowRank(left, right)`` held as parameters;
    ``factor(states)`` restricts it to a subset of states (state dropout)."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor):
        super().__init__()
        # contiguous copies: a model rebuilt for loading (zeros, contiguous) then computes
        # with the same memory layout, so its outputs are bit-identical
        self.left = torch.nn.Parameter(left.detach().clone(memory_format=torch.contiguous_format))
        self.right = torch.nn.Parameter(
            right.detach().clone(memory_format=torch.contiguous_format))

    @property
    def rank(self) -> int:
        return self.left.shape[-1]

    def factor(self, states: torch.Tensor | None = None,
               features: torch.Tensor | None = None) -> LowRank:
        left, right = self.left, self.right
        if states is not None:
            left, right = left[states], right[states]
        if features is not None:
            left, right = left[:, features], right[:, features]
        return LowRank(left, right)


_SUBCLASSES: dict[type, type] = {}


def _with_fixed_transition(cls: type) -> type:
    """``cls`` with ``transition()`` served by its ``lowrank_transition`` submodule."""
    if cls not in _SUBCLASSES:
        def transition(self, emb=None, states=None, features=None):
            return self.lowrank_transition.factor(states)

        _SUBCLASSES[cls] = type(f"LowRankTransition{cls.__name__}", (cls,),
                                {"transition": transition, "__module__": __name__})
    return _SUBCLASSES[cls]


def attach_lowrank_transition(model: torch.nn.Module, left: torch.Tensor,
                              right: torch.Tensor) -> torch.nn.Module:
    """Make ``model`` (a ``lorank.nn.NeuralHMM``) use ``LowRank(left, right)`` as its
    transition, in place; also used to rebuild the structure before loading weights."""
    if not callable(getattr(model, "transition", None)) or not hasattr(model, "num_states"):
        raise TypeError(f"expected a lorank.nn.NeuralHMM, got {type(model).__name__}")
    if left.shape != (model.num_states, left.shape[-1]) or right.shape != left.shape:
        raise ValueError(f"left/right must have shape ({model.num_states}, R), got "
                         f"{tuple(left.shape)} and {tuple(right.shape)}")
    ref = next(model.parameters())
    model.lowrank_transition = LowRankTransition(left.to(ref), right.to(ref))
    if type(model) not in _SUBCLASSES.values():
        model.__class__ = _with_fixed_transition(type(model))
    return model


def compress_hmm(
    model: torch.nn.Module,
    rank: int,
    *,
    loss: str = "frobenius",
    n_iter: int = 500,
    inplace: bool = False,
) -> tuple[torch.nn.Module, dict]:
    """Replace the transition of a trained neural HMM (``lorank.nn.NeuralHMM``, e.g. a dense
    ``model="hmm"`` ``HMMLanguageModel``) by a rank-``rank`` nonnegative factorization of
    its dense transition matrix (:func:`nmf_transition`).  Returns ``(model, info)`` with
    info: rank, Z, dense and low-rank transition parameter counts, relative Frobenius error
    and mean row KL of the new transition.  The parameters that produced the old transition
    stay in the model (the emission may share the state embeddings)."""
    import copy

    was = model.training
    model.eval()
    with torch.no_grad():
        factor = model.transition()
        dense = factor.to_dense().to(torch.float64)
    model.train(was)
    low = nmf_transition(dense, rank, loss=loss, n_iter=n_iter)
    if not inplace:
        model = copy.deepcopy(model)
    attach_lowrank_transition(model, low.left, low.right)
    z = dense.shape[0]
    info = {"num_states": z, "rank": low.rank, "dense_transition_params": z * z,
            "lowrank_transition_params": 2 * z * low.rank,
            **transition_error(dense, low.to_dense())}
    return model, info
