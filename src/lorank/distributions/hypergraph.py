"""A small public API for hypergraphs, and HMM / HSMM / CKY written as instances.

    g = lorank.Hypergraph()
    x = g.add_node(3, potential=torch.randn(3))           # leaf with a unary log-potential
    y = g.add_node(3, potential=torch.randn(3))
    s = g.add_node(2)
    g.add_edge(s, [x, y], torch.randn(2, 3, 3))          # dense: (head, tail_1, tail_2)
    g.add_edge(s, [x, y], lorank.LowRankPotential(torch.randn(2, 4), torch.randn(3, 3, 4)))
    g.log_partition()    # root: the last node added, unless given
    g.marginals()        # per node (*batch, L): expected use of each label
    g.max_score(), g.argmax(), g.entropy()

Potentials may carry leading batch dimensions (broadcast together).  Low-rank edges insert a
rank layer in the log semiring (see :mod:`lorank.dp.hypergraph`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorank._checks import check_positive_int, check_tensor
from lorank.distributions.hmm import prepare_chain_inputs
from lorank.distributions.hsmm import prepare_hsmm_inputs
from lorank.distributions.pcfg import prepare_pcfg_inputs
from lorank.dp import hypergraph as hg
from lorank.dp.hypergraph import Edge, LowRankPotential
from lorank.dp.semimarkov import segment_scores
from lorank.factors import Factor, LowRank
from lorank.rules import Rules
from lorank.semiring import EntropySemiring, LogSemiring, MaxSemiring, Semiring


class Hypergraph:
    """A directed acyclic hypergraph with labeled nodes and (low-rank) hyperedge potentials."""

    def __init__(self) -> None:
        self.num_labels: list[int] = []
        self.potentials: list[torch.Tensor | None] = []
        self.names: list[object] = []
        self.edges: list[Edge] = []

    # ---- building ----------------------------------------------------------------------
    def add_node(self, num_labels: int, potential: torch.Tensor | None = None,
                 name: object = None) -> int:
        """A node with ``num_labels`` labels and an optional unary log-potential
        (*batch, num_labels); returns its id."""
        check_positive_int("num_labels", num_labels)
        if potential is not None:
            check_tensor("potential", potential)
            if potential.dim() < 1 or potential.shape[-1] != num_labels:
                raise ValueError(
                    f"node potential must have shape (*batch, {num_labels}), got "
                    f"{tuple(potential.shape)}"
                )
        self.num_labels.append(num_labels)
        self.potentials.append(potential)
        self.names.append(name)
        return len(self.num_labels) - 1

    def _check_node(self, v: int, what: str) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(self.num_labels):
            raise ValueError(f"{what} must be a node id in [0, {len(self.num_labels)}), got {v!r}")

    def add_edge(self, head: int, tails: Sequence[int],
                 potential: torch.Tensor | LowRankPotential) -> None:
        """A hyperedge ``head <- tails`` with a log-potential: a tensor (*batch, L_head,
        L_tail_1, ..., L_tail_k) or a :class:`LowRankPotential`."""
        self._check_node(head, "head")
        tails = tuple(tails)
        for t in tails:
            self._check_node(t, "tail")
        if head in tails:
            raise ValueError("an edge's head cannot be one of its tails")
        sizes = (self.num_labels[head], *(self.num_labels[t] for t in tails))
        k = len(tails)
        if isinstance(potential, LowRankPotential):
            if potential.head.shape[-2] != sizes[0]:
                raise ValueError(
                    f"low-rank head features must have shape (*batch, {sizes[0]}, R), got "
                    f"{tuple(potential.head.shape)}")
            if potential.joint:
                t = potential.tails[0]
                if t.dim() < k + 1 or tuple(t.shape[-k - 1 : -1]) != sizes[1:]:
                    raise ValueError(
                        f"joint tail features must have shape (*batch, {sizes[1:]}, R), got "
                        f"{tuple(t.shape)}")
            else:
                got = tuple(t.shape[-2] for t in potential.tails)
                if got != sizes[1:]:
                    raise ValueError(f"CP tail factors must have sizes {sizes[1:]}, got {got}")
        else:
            check_tensor("potential", potential)
            if potential.dim() < k + 1 or tuple(potential.shape[-k - 1 :]) != sizes:
                raise ValueError(
                    f"edge potential must have shape (*batch, {', '.join(map(str, sizes))}), "
                    f"got {tuple(potential.shape)}")
        self.edges.append(Edge(head, tails, potential))

    # ---- batching ----------------------------------------------------------------------
    def _batch_shape(self) -> torch.Size:
        shapes = []
        for p in self.potentials:
            if p is not None:
                shapes.append(p.shape[:-1])
        for e in self.edges:
            k = len(e.tails)
            if isinstance(e.potential, LowRankPotential):
                shapes.append(e.potential.head.shape[:-2])
            else:
                shapes.append(e.potential.shape[: e.potential.dim() - k - 1])
        try:
            return torch.broadcast_shapes(*shapes) if shapes else torch.Size()
        except RuntimeError as err:
            raise ValueError(f"potentials have incompatible batch shapes: {err}") from None

    def _prepared(self, extra: list[torch.Tensor] | None = None):
        batch = self._batch_shape()
        ref = next((p for p in self.potentials if p is not None), None)
        if ref is None:
            e = self.edges[0].potential if self.edges else None
            ref = e if isinstance(e, torch.Tensor) else (e.head if e is not None else None)
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        device = ref.device if ref is not None else None
        pots = []
        for v, p in enumerate(self.potentials):
            if p is None:
                p = torch.zeros(self.num_labels[v], dtype=dtype, device=device)
            p = p.expand(*batch, self.num_labels[v])
            if extra is not None:
                p = p + extra[v]
            pots.append(p)
        edges = []
        for e in self.edges:
            if isinstance(e.potential, LowRankPotential):
                pot = e.potential.expand_batch(batch, 0)
            else:
                k = len(e.tails) + 1
                pot = e.potential.expand(*batch, *e.potential.shape[e.potential.dim() - k :])
            edges.append(Edge(e.head, e.tails, pot))
        return batch, pots, edges

    def _root(self, root: int | None) -> int:
        if not self.num_labels:
            raise ValueError("the hypergraph has no nodes")
        root = len(self.num_labels) - 1 if root is None else root
        self._check_node(root, "root")
        return root

    # ---- queries -----------------------------------------------------------------------
    def marginalize(self, semiring: type[Semiring] = LogSemiring, root: int | None = None,
                    rank_layer: bool | None = None) -> torch.Tensor:
        """The hypergraph's value in ``semiring``: (*batch,)."""
        root = self._root(root)
        _, pots, edges = self._prepared()
        return hg.marginalize(self.num_labels, pots, edges, root, semiring, rank_layer)

    def log_partition(self, root: int | None = None) -> torch.Tensor:
        """log of the total weight of all derivations of the root: (*batch,)."""
        return self.marginalize(LogSemiring, root)

    def max_score(self, root: int | None = None) -> torch.Tensor:
        """The best derivation's log-weight (low-rank edges expanded exactly): (*batch,)."""
        return self.marginalize(MaxSemiring, root)

    def entropy(self, root: int | None = None) -> torch.Tensor:
        """Entropy of the distribution over derivations: (*batch,)."""
        return self.marginalize(EntropySemiring, root)

    def _node_grads(self, semiring, root):
        root = self._root(root)
        batch = self._batch_shape()
        ref = self._prepared()[1][0]
        with torch.enable_grad():
            extra = [torch.zeros(*batch, n, dtype=ref.dtype, device=ref.device,
                                 requires_grad=True) for n in self.num_labels]
            _, pots, edges = self._prepared(extra)
            val = hg.marginalize(self.num_labels, pots, edges, root, semiring)
            return list(torch.autograd.grad(val.sum(), extra, allow_unused=True))

    def marginals(self, root: int | None = None) -> list[torch.Tensor]:
        """Per node, (*batch, L_v): the expected number of times each label of the node is
        used by a derivation of the root (autograd of the log-partition)."""
        grads = self._node_grads(LogSemiring, root)
        return [torch.zeros(n) if g is None else g for g, n in zip(grads, self.num_labels,
                                                                   strict=True)]

    def argmax(self, root: int | None = None) -> list[torch.Tensor]:
        """Per node, (*batch,) long: its label in the best derivation, -1 if unused (from the
        max-semiring subgradient; ties are broken arbitrarily)."""
        grads = self._node_grads(MaxSemiring, root)
        out = []
        for g in grads:
            if g is None:
                out.append(torch.tensor(-1))
                continue
            used = g.sum(-1) > 0.5
            out.append(torch.where(used, g.argmax(-1), torch.full_like(g.argmax(-1), -1)))
        return out

    def __repr__(self) -> str:
        return f"Hypergraph(nodes={len(self.num_labels)}, edges={len(self.edges)})"


# ---- instances ------------------------------------------------------------------------------


def _transition_potential(factor: Factor) -> torch.Tensor | LowRankPotential:
    """``pot[j, i] = log P[i, j]`` (head: next state j, tail: previous state i)."""
    if isinstance(factor, LowRank):
        a, c = factor.stochastic_factors()
        return LowRankPotential(torch.log(c), [torch.log(a)])
    return factor.log_probs().transpose(-1, -2)


def hmm_hypergraph(init: torch.Tensor, transition: Factor,
                   emission: torch.Tensor) -> Hypergraph:
    """The HMM forward algorithm as a hypergraph, from the inputs of :class:`lorank.HMM`
    (``init`` logits (Z,) or (B, Z), ``transition`` factor, ``emission`` (B, T, Z); validated
    the same way, every sequence of full length T): node ``t`` (Z labels, id t) has the
    emission (plus the initial distribution at t = 0) as potential and one edge from node
    ``t-1`` with ``log P^T`` (a low-rank edge for a ``LowRank`` factor); the root is node T-1."""
    init_logp, _ = prepare_chain_inputs(init, transition, emission, None)
    g = Hypergraph()
    t_len = emission.shape[-2]
    trans = _transition_potential(transition)
    prev = None
    for t in range(t_len):
        pot = emission[..., t, :] + (init_logp if t == 0 else 0)
        v = g.add_node(emission.shape[-1], pot, name=("x", t))
        if prev is not None:
            g.add_edge(v, [prev], trans)
        prev = v
    return g


def hsmm_hypergraph(init: torch.Tensor, transition: Factor, duration: torch.Tensor,
                    emission: torch.Tensor) -> Hypergraph:
    """The semi-Markov forward algorithm as a hypergraph, from the inputs of
    :class:`lorank.HSMM` (``init`` and ``duration`` logits, validated and normalized the same
    way; every sequence of full length T): nodes ``start(t)`` (id 2t) and ``end(t)`` (id 2t+1)
    with Z labels; ``end(t) <- start(s)`` for ``t - s < K`` with the segment score on the
    diagonal; ``start(s) <- end(s-1)`` with the transition.  The root is ``end(T-1)``."""
    init_logp, duration_logp, _ = prepare_hsmm_inputs(init, transition, duration, emission)
    z = emission.shape[-1]
    t_len = emission.shape[-2]
    seg = segment_scores(emission, duration_logp)
    k = seg.shape[-2]
    off = torch.full((z, z), float("-inf"), dtype=emission.dtype, device=emission.device)
    eye = torch.eye(z, dtype=torch.bool, device=emission.device)
    trans = _transition_potential(transition)
    g = Hypergraph()
    starts, ends = [], []
    for t in range(t_len):
        sv = g.add_node(z, init_logp if t == 0 else None, name=("start", t))
        if t > 0:
            g.add_edge(sv, [ends[t - 1]], trans)
        starts.append(sv)
        ev = g.add_node(z, name=("end", t))
        for d in range(1, min(k, t + 1) + 1):
            diag = torch.where(eye, seg[..., t, d - 1, :].unsqueeze(-1), off)
            g.add_edge(ev, [starts[t - d + 1]], diag)
        ends.append(ev)
    return g


def cky_node(start: int, end: int, n: int) -> int:
    """The id of the node of span ``[start, end)`` in :func:`cky_hypergraph` over n words:
    nodes are numbered by width, then by start (widths 1, 2, ..., n); the root node comes
    last, with id ``n (n + 1) / 2``."""
    if not 0 <= start < end <= n:
        raise ValueError(f"need 0 <= start < end <= n, got start={start}, end={end}, n={n}")
    w = end - start
    return (w - 1) * n - (w - 1) * (w - 2) // 2 + start


def cky_hypergraph(root: torch.Tensor, rules: Rules, terminal: torch.Tensor) -> Hypergraph:
    """CKY as a hypergraph, from the inputs of :class:`lorank.PCFG` (``root`` logits over the
    m nonterminals or all S symbols, (.) or (B, .); ``rules``; ``terminal`` (B, n, p);
    validated and normalized the same way, every sentence of full length n).

    One node per span (preterminal labels and the word scores as potentials for single words;
    nonterminal labels otherwise), one edge per split with the rule block of the children's
    symbol types (low-rank or CP edges for factored rules, from
    :meth:`lorank.rules.Rules.hyperedge_potentials`), and a one-label root node with the root
    distribution.  Node order: by width, then start (:func:`cky_node`); the root is last.
    Each node's ``name`` is ``("span", start, end_exclusive)`` (the root's: ``"root"``)."""
    root_logp, _ = prepare_pcfg_inputs(root, rules, terminal)
    m, p = rules.num_nonterminals, rules.num_preterminals
    n = terminal.shape[-2]
    pots = rules.hyperedge_potentials()
    g = Hypergraph()
    node = {}
    for i in range(n):
        node[i, i + 1] = g.add_node(p, terminal[..., i, :], name=("span", i, i + 1))
    for w in range(2, n + 1):
        for i in range(n - w + 1):
            v = g.add_node(m, name=("span", i, i + w))
            for k in range(i + 1, i + w):
                blk = ("P" if k - i == 1 else "N") + ("P" if i + w - k == 1 else "N")
                g.add_edge(v, [node[i, k], node[k, i + w]], pots[blk])
            node[i, i + w] = v
    top = g.add_node(1, name="root")
    sl = slice(m, m + p) if n == 1 else slice(0, m)
    g.add_edge(top, [node[0, n]], root_logp[..., sl].unsqueeze(-2))
    return g


__all__ = [
    "Hypergraph",
    "LowRankPotential",
    "hmm_hypergraph",
    "hsmm_hypergraph",
    "cky_hypergraph",
    "cky_node",
]
