"""Brute-force references in float64, independent of lorank's dynamic programs.

Everything here enumerates structures explicitly (tiny sizes only) or builds transition
matrices from their definitions with plain tensor ops, so the tests compare lorank against
code that shares none of its tricks (scaling, max shifts, custom backward passes).

* :func:`summarize`: log-partition, probabilities, entropy and argmax of any finite set of
  structures given their scores (reusable for semi-Markov and PCFG tests: enumerate the
  segmentations or trees, score them, summarize);
* :func:`enumerate_paths` / :func:`chain_path_scores` / :func:`brute_hmm`: all state paths of an
  HMM with ragged lengths;
* :func:`reference_log_transition`: the dense normalized ``log P`` of a factor from its
  definition (``Dense``, ``LowRank``, ``Banded``, ``Sum``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, settings

import lorank

F64 = torch.float64

#: hypothesis settings for brute-force property tests: few examples, no deadline (first calls of
#: torch ops are slow), derandomized so that CI runs are reproducible.
PROPERTY = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def enumerate_paths(length: int, num_states: int) -> torch.Tensor:
    """All state paths of a given length: (num_states ** length, length) long."""
    if length == 0:
        return torch.zeros(1, 0, dtype=torch.long)
    prod = itertools.product(range(num_states), repeat=length)
    return torch.tensor(list(prod), dtype=torch.long)


def summarize(scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """For structures with log-scores (N,) (``-inf`` = impossible): the log-partition, the
    probabilities (N,), the entropy (0 * log 0 = 0), the best index and the best score."""
    scores = scores.to(F64)
    log_z = torch.logsumexp(scores, 0)
    if torch.isfinite(log_z):
        logp = scores - log_z
        probs = logp.exp()
        # differentiable: no log of 0 anywhere, so autograd gives no NaN either
        entropy = -(probs * torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))).sum()
    else:
        probs = torch.zeros_like(scores)
        entropy = scores.new_zeros(())
    best = int(scores.argmax())
    return {
        "log_partition": log_z,
        "probs": probs,
        "entropy": entropy,
        "best": torch.tensor(best),
        "max_score": scores.max(),
    }


def chain_path_scores(
    init_logp: torch.Tensor, trans_logp: torch.Tensor, emission: torch.Tensor, paths: torch.Tensor
) -> torch.Tensor:
    """``log p(x, z)`` for paths (N, L) of one sequence: init (Z,), trans (Z, Z), emission (L, Z).

    Written as an explicit sum over positions so that ``-inf`` terms stay ``-inf``."""
    init_logp, trans_logp, emission = (x.to(F64) for x in (init_logp, trans_logp, emission))
    n, length = paths.shape
    score = init_logp[paths[:, 0]] + emission[0, paths[:, 0]]
    for t in range(1, length):
        score = score + trans_logp[paths[:, t - 1], paths[:, t]] + emission[t, paths[:, t]]
    return score


@dataclass
class BruteHMM:
    """Exact answers for a batch, all float64; padded positions: marginals 0, argmax -1."""

    log_partition: torch.Tensor  # (B,)
    marginals: torch.Tensor  # (B, T, Z)
    max_score: torch.Tensor  # (B,)
    argmax: torch.Tensor  # (B, T) long
    entropy: torch.Tensor  # (B,)
    paths: list[torch.Tensor]  # per example (Z ** L_b, L_b)
    joint: list[torch.Tensor]  # per example log p(x, z) for each path
    posterior: list[torch.Tensor]  # per example p(z | x) for each path


def brute_hmm(
    init_logp: torch.Tensor,
    trans_logp: torch.Tensor,
    emission: torch.Tensor,
    lengths: torch.Tensor | None = None,
) -> BruteHMM:
    """Enumerate every state path of every sequence.

    init_logp: (Z,) or (B, Z) normalized; trans_logp: (Z, Z) or (B, Z, Z) normalized log P;
    emission: (B, T, Z); lengths (B,) or None (all T)."""
    b, t_len, z = emission.shape
    if lengths is None:
        lengths = torch.full((b,), t_len, dtype=torch.long)
    init_logp = init_logp.to(F64).expand(b, z)
    trans_logp = trans_logp.to(F64).expand(b, z, z)
    out_lz = torch.zeros(b, dtype=F64)
    out_marg = torch.zeros(b, t_len, z, dtype=F64)
    out_max = torch.zeros(b, dtype=F64)
    out_arg = torch.full((b, t_len), -1, dtype=torch.long)
    out_ent = torch.zeros(b, dtype=F64)
    all_paths, all_joint, all_post = [], [], []
    for i in range(b):
        length = int(lengths[i])
        paths = enumerate_paths(length, z)
        joint = chain_path_scores(init_logp[i], trans_logp[i], emission[i, :length], paths)
        s = summarize(joint)
        onehot = torch.nn.functional.one_hot(paths, z).to(F64)  # (N, L, Z)
        out_marg[i, :length] = torch.einsum("n,nlz->lz", s["probs"], onehot)
        out_lz[i] = s["log_partition"]
        out_max[i] = s["max_score"]
        out_arg[i, :length] = paths[int(s["best"])]
        out_ent[i] = s["entropy"]
        all_paths.append(paths)
        all_joint.append(joint)
        all_post.append(s["probs"])
    return BruteHMM(out_lz, out_marg, out_max, out_arg, out_ent, all_paths, all_joint, all_post)


# ---- dense references of factors ---------------------------------------------------------


def reference_log_potentials(factor: lorank.Factor, differentiable: bool = False) -> torch.Tensor:
    """Unnormalized log-potentials ``phi`` (*batch, Z, Z) in float64, from the definitions
    (``differentiable``: keep the autograd graph to the factor's tensors)."""

    def get(t: torch.Tensor) -> torch.Tensor:
        return (t if differentiable else t.detach()).to(F64)

    if isinstance(factor, lorank.Dense):
        return get(factor.logits)
    if isinstance(factor, lorank.LowRank):
        left, right = get(factor.left), get(factor.right)
        # phi[i, j] = log sum_r exp(left[i, r] + right[j, r])
        return torch.logsumexp(left.unsqueeze(-2) + right.unsqueeze(-3), dim=-1)
    if isinstance(factor, lorank.Banded):
        logits = get(factor.logits)
        z, w = factor.num_states, factor.width
        out = torch.full((*logits.shape[:-2], z, z), -math.inf, dtype=F64)
        for i in range(z):
            for j in range(z):
                if abs(j - i) <= w:
                    out[..., i, j] = logits[..., i, j - i + w]
        return out
    if isinstance(factor, lorank.Sum):
        parts = [reference_log_potentials(p, differentiable) for p in factor.parts]
        return torch.logsumexp(torch.stack(torch.broadcast_tensors(*parts)), 0)
    raise TypeError(f"no reference for {type(factor).__name__}")


def reference_log_transition(factor: lorank.Factor, differentiable: bool = False) -> torch.Tensor:
    """The normalized dense ``log P`` (*batch, Z, Z) in float64 (an all -inf row, a state with
    no successor, stays all -inf)."""
    phi = reference_log_potentials(factor, differentiable)
    lse = torch.logsumexp(phi, dim=-1, keepdim=True)
    return phi - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def random_factor(
    kind: str,
    z: int,
    *,
    batch: int | None = None,
    rank: int = 2,
    width: int = 1,
    scale: float = 1.0,
    dtype: torch.dtype = F64,
    generator: torch.Generator | None = None,
) -> lorank.Factor:
    """A random factor of a given kind: dense, lowrank, banded, lowrank+banded, dense+banded;
    shared (batch None) or batched (batch, Z, ...); "mixed": a shared LowRank plus a Banded
    batched like ``batch``."""
    lead = () if batch is None else (batch,)

    def rnd(*shape):
        return (torch.randn(*lead, *shape, generator=generator, dtype=F64) * scale).to(dtype)

    if kind == "dense":
        return lorank.Dense(rnd(z, z))
    if kind == "lowrank":
        return lorank.LowRank(rnd(z, rank), rnd(z, rank))
    if kind == "banded":
        return lorank.Banded(rnd(z, 2 * width + 1), width)
    if kind == "lowrank+banded":
        return lorank.LowRank(rnd(z, rank), rnd(z, rank)) + lorank.Banded(
            rnd(z, 2 * width + 1), width
        )
    if kind == "mixed":  # a shared LowRank plus a per-example Banded
        left = torch.randn(z, rank, generator=generator, dtype=F64) * scale
        right = torch.randn(z, rank, generator=generator, dtype=F64) * scale
        return lorank.LowRank(left.to(dtype), right.to(dtype)) + lorank.Banded(
            rnd(z, 2 * width + 1), width
        )
    if kind == "dense+banded":
        return lorank.Dense(rnd(z, z)) + lorank.Banded(rnd(z, 2 * width + 1), width)
    raise ValueError(kind)


FACTOR_KINDS = ("dense", "lowrank", "banded", "lowrank+banded")


def factor_tensors(factor: lorank.Factor) -> list[torch.Tensor]:
    """The caller-owned tensors inside a factor (for no-mutation checks)."""
    if isinstance(factor, lorank.Dense | lorank.Banded):
        return [factor.logits]
    if isinstance(factor, lorank.LowRank):
        return [factor.left, factor.right]
    if isinstance(factor, lorank.Sum):
        return [t for p in factor.parts for t in factor_tensors(p)]
    raise TypeError(type(factor).__name__)


def rebuild(factor: lorank.Factor, fn) -> lorank.Factor:
    """The same kind of factor built from ``fn(t)`` of each of its tensors (e.g. a dtype cast,
    or ``lambda t: t.detach().clone().requires_grad_(True)`` for fresh leaves)."""
    if isinstance(factor, lorank.Sum):
        return lorank.Sum([rebuild(p, fn) for p in factor.parts])
    if isinstance(factor, lorank.LowRank):
        return lorank.LowRank(fn(factor.left), fn(factor.right))
    if isinstance(factor, lorank.Banded):
        return lorank.Banded(fn(factor.logits), factor.width)
    if isinstance(factor, lorank.Dense):
        return lorank.Dense(fn(factor.logits))
    raise TypeError(type(factor).__name__)


def leaves(factor: lorank.Factor) -> tuple[lorank.Factor, list[torch.Tensor]]:
    """A copy of ``factor`` whose tensors are fresh leaves requiring grad, and those leaves."""
    f = rebuild(factor, lambda t: t.detach().clone().requires_grad_(True))
    return f, factor_tensors(f)
