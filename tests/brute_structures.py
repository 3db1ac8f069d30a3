"""Brute-force enumerators for tiny semi-Markov models and PCFGs (float64 oracles).

Everything here is deliberately naive: list every structure, score it from the definition,
and compute log-partition, marginals, argmax and entropy from the explicit list.
"""

from __future__ import annotations

import itertools
import math

import torch


# ---- semi-Markov ------------------------------------------------------------------------
def compositions(n: int, k: int):
    """All tuples of positive durations <= k that sum to n."""
    if n == 0:
        yield ()
        return
    for d in range(1, min(k, n) + 1):
        for rest in compositions(n - d, k):
            yield (d,) + rest


def hsmm_segmentations(length: int, max_duration: int, num_states: int):
    """Every segmentation as a list of (start, end_inclusive, state) (the HSMM's
    ``Segmentation.segments()`` gives end_exclusive = end_inclusive + 1)."""
    for durs in compositions(length, max_duration):
        for labels in itertools.product(range(num_states), repeat=len(durs)):
            segs, t = [], 0
            for d, z in zip(durs, labels, strict=True):
                segs.append((t, t + d - 1, z))
                t += d
            yield segs


def hsmm_score(init_logp, trans_logp, dur_logp, emission, segs) -> float:
    """init_logp (Z,), trans_logp (Z, Z), dur_logp (Z, K), emission (T, Z)."""
    s = float(init_logp[segs[0][2]])
    for i, (a, b, z) in enumerate(segs):
        s += float(dur_logp[z, b - a]) + float(emission[a : b + 1, z].sum())
        if i > 0:
            s += float(trans_logp[segs[i - 1][2], z])
    return s


def hsmm_brute(init_logp, trans_logp, dur_logp, emission, length):
    """Dict with log_partition, marginals (T, Z), segment_marginals (T, K, Z), best score,
    best segments and entropy for one sequence of the given length."""
    t_len, z = emission.shape
    k = dur_logp.shape[-1]
    segs_all = list(hsmm_segmentations(length, k, z))
    scores = torch.tensor(
        [hsmm_score(init_logp, trans_logp, dur_logp, emission, s) for s in segs_all],
        dtype=torch.float64,
    )
    logz = torch.logsumexp(scores, 0)
    p = (scores - logz).exp() if torch.isfinite(logz) else torch.zeros_like(scores)
    marg = torch.zeros(t_len, z, dtype=torch.float64)
    seg_marg = torch.zeros(t_len, k, z, dtype=torch.float64)
    for w, segs in zip(p.tolist(), segs_all, strict=True):
        for a, b, s in segs:
            marg[a : b + 1, s] += w
            seg_marg[b, b - a, s] += w
    best = int(scores.argmax())
    ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum()
    return {
        "log_partition": logz,
        "marginals": marg,
        "segment_marginals": seg_marg,
        "max_score": scores[best],
        "argmax": segs_all[best] if torch.isfinite(logz) else [],
        "entropy": ent,
        "all": segs_all,
        "probs": p,
    }


# ---- PCFG -------------------------------------------------------------------------------
def binary_trees(i: int, j: int):
    """Unlabeled binary bracketings of [i, j) as nested tuples (i, j, left, right) / (i, j)."""
    if j - i == 1:
        yield (i, j)
        return
    for k in range(i + 1, j):
        for left in binary_trees(i, k):
            for right in binary_trees(k, j):
                yield (i, j, left, right)


def _nodes(tree, out):
    out.append((tree[0], tree[1]))
    if len(tree) == 4:
        _nodes(tree[2], out)
        _nodes(tree[3], out)
    return out


def pcfg_trees(n: int, m: int, p: int):
    """Every labeled tree over n words as a pre-order list of (start, end, symbol), where
    symbols 0..m-1 are nonterminals (spans of width >= 2) and m..m+p-1 preterminals."""
    for shape in binary_trees(0, n):
        nodes = _nodes(shape, [])
        choices = [range(m) if b - a > 1 else range(m, m + p) for a, b in nodes]
        for labels in itertools.product(*choices):
            yield [(a, b, s) for (a, b), s in zip(nodes, labels, strict=True)]


def pcfg_score(root_logp, rule_logp, term, tree) -> float:
    """root_logp (S,) over all symbols (-inf where not allowed), rule_logp (m, S, S),
    term (n, p) log p(w_i | preterminal)."""
    m = rule_logp.shape[0]
    s = float(root_logp[tree[0][2]])
    # children of a node in pre-order: left child is next, right child follows its subtree
    for idx, (a, b, sym) in enumerate(tree):
        if b - a == 1:
            s += float(term[a, sym - m])
            continue
        left = tree[idx + 1]
        right = next(x for x in tree[idx + 2 :] if x[0] == left[1] and x[1] == b)
        s += float(rule_logp[sym, left[2], right[2]])
    return s


def pcfg_brute(root_logp, rule_logp, term, length):
    """Dict with log_partition, marginals (n, n, S) [start, end-inclusive, symbol], max score
    and best tree, and entropy, for one sentence of the given length."""
    m, s_all, _ = rule_logp.shape
    p = s_all - m
    n = term.shape[0]
    trees = list(pcfg_trees(length, m, p))
    scores = torch.tensor(
        [pcfg_score(root_logp, rule_logp, term, t) for t in trees], dtype=torch.float64
    )
    logz = torch.logsumexp(scores, 0)
    prob = (scores - logz).exp() if torch.isfinite(logz) else torch.zeros_like(scores)
    marg = torch.zeros(n, n, s_all, dtype=torch.float64)
    for w, tree in zip(prob.tolist(), trees, strict=True):
        for a, b, sym in tree:
            marg[a, b - 1, sym] += w
    best = int(scores.argmax())
    ent = -(prob * torch.where(prob > 0, prob.log(), torch.zeros_like(prob))).sum()
    return {
        "log_partition": logz,
        "marginals": marg,
        "max_score": scores[best],
        "argmax": trees[best] if torch.isfinite(logz) else [],
        "entropy": ent,
        "trees": trees,
        "probs": prob,
    }


def logsumexp_list(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


# ---- raw rule factors -> dense tables, by the documented formulas --------------------------
# Deliberately independent of the library's normalization code (log_factors, log_probs):
# a bug there must show as a mismatch.  Transition factors: ``brute.reference_log_transition``.


def normalize_rows(phi: torch.Tensor, ndim: int) -> torch.Tensor:
    """``log(exp(phi) / sum exp(phi))`` over the last ``ndim`` dims, in float64; a slice of
    all ``-inf`` (an outcome-free row) stays ``-inf``."""
    phi = phi.double()
    flat = phi.reshape(*phi.shape[: phi.dim() - ndim], -1)
    out = torch.full_like(flat, -math.inf)
    for idx in itertools.product(*[range(s) for s in flat.shape[:-1]]):
        row = flat[idx]
        if torch.isfinite(row).any():
            top = row[torch.isfinite(row)].max()
            p = torch.exp(row - top)
            out[idx] = torch.log(p / p.sum())
    return out.reshape(phi.shape)


def _lse_rank(x: torch.Tensor) -> torch.Tensor:
    """``log sum_r exp(x[..., r])`` by an explicit loop over r (no library code)."""
    x = x.double()
    out = torch.full(x.shape[:-1], -math.inf, dtype=torch.float64)
    for r in range(x.shape[-1]):
        out = torch.logaddexp(out, x[..., r])
    return out


def rules_from_raw(rules) -> torch.Tensor:
    """log T (*batch, m, S, S) of a rule factor from its raw parameters:

    * DenseRules:   ``T[A] = softmax_{B,C} logits[A, B, C]``;
    * LowRankRules: ``T[A, B, C] ∝ sum_r exp(head[A, r] + children[B, C, r])``;
    * CPRules / RankSpaceRules: ``T[A, B, C] ∝ sum_r exp(head[A,r] + left[B,r] + right[C,r])``.
    """
    kind = type(rules).__name__
    if kind == "DenseRules":
        phi = rules.logits
    elif kind == "LowRankRules":
        h, c = rules.head, rules.children
        phi = _lse_rank(h[..., :, None, None, :] + c[..., None, :, :, :])
    elif kind in ("CPRules", "RankSpaceRules"):
        h, lf, rt = rules.head, rules.left, rules.right
        phi = _lse_rank(h[..., :, None, None, :] + lf[..., None, :, None, :]
                        + rt[..., None, None, :, :])
    else:
        raise ValueError(kind)
    return normalize_rows(phi, 2)


def random_rules(kind: str, m: int, p: int, rank: int = 4, batch: tuple[int, ...] = (),
                 dtype=torch.float64, generator: torch.Generator | None = None,
                 scale: float = 1.0):
    """A random grammar of the given kind ("dense", "low_rank", "cp", "rank_space")."""
    from lorank.rules import CPRules, DenseRules, LowRankRules, RankSpaceRules

    s = m + p

    def rnd(*shape):
        return scale * torch.randn(*batch, *shape, dtype=dtype, generator=generator)

    if kind == "dense":
        return DenseRules(rnd(m, s, s))
    if kind == "low_rank":
        return LowRankRules(rnd(m, rank), rnd(s, s, rank))
    if kind == "cp":
        return CPRules(rnd(m, rank), rnd(s, rank), rnd(s, rank))
    if kind == "rank_space":
        return RankSpaceRules(rnd(m, rank), rnd(s, rank), rnd(s, rank))
    raise ValueError(f"unknown rules kind {kind!r}")


def root_from_raw(root: torch.Tensor, m: int, p: int) -> torch.Tensor:
    """Root log-probabilities (*batch, S) from root logits over m nonterminals or S symbols."""
    lp = normalize_rows(root, 1)
    if root.shape[-1] == m:
        lp = torch.cat([lp, torch.full((*lp.shape[:-1], p), -math.inf, dtype=lp.dtype)], -1)
    return lp
