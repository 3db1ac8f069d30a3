"""Hypergraph marginalization in any semiring, with low-rank hyperedges.

A hypergraph has nodes, each with a label set ``{0..L_v-1}`` and an optional unary
log-potential (*batch, L_v), and hyperedges from one head node to an ordered list of tail
nodes, each with a log-potential over the joint labels ``(head, tail_1, ..., tail_k)``.  The
inside value of a node is

    inside[v][a] = node_pot[v][a] (x) (+)_{edges e into v} (+)_{b_1..b_k}
                   pot_e[a, b_1, ..., b_k] (x) inside[t_1][b_1] (x) ... (x) inside[t_k][b_k]

(leaves: their unary potential), and the value of the hypergraph is ``(+)_a inside[root][a]``.

A :class:`LowRankPotential` writes ``pot_e[a, b] = log sum_r exp(head[a, r] + tails[b, r])``:
a matrix between the head's labels and the *joint* tail labels of rank R (Chiu, Deng & Rush
2021), or, with one feature matrix per tail, a CP tensor.  The marginalization then inserts a
rank layer: tails are first summed into R rank labels, then the rank into the head's labels,
costing ``(prod_i |T_i| + |H|) R`` instead of ``|H| prod_i |T_i|``.  That is exact in the
log (sum-product) semiring; for max or entropy the rank would become a latent label, so those
semirings expand low-rank potentials to dense ones unless ``rank_layer=True`` is forced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorank.semiring import LogSemiring, Semiring, safe_logsumexp


class LowRankPotential:
    """Low-rank hyperedge log-potential.

    Args:
        head: (*batch, H, R) log-features of the head labels.
        tails: either one tensor (*batch, T_1, ..., T_k, R) of log-features of the joint tail
            labels (head-vs-children low rank), or a list of k tensors (*batch, T_i, R), one
            per tail (CP: ``pot[a, b_1..b_k] = log sum_r exp(head[a,r] + sum_i tails_i[b_i,r])``).
    """

    def __init__(self, head: torch.Tensor, tails: torch.Tensor | Sequence[torch.Tensor]):
        if not isinstance(head, torch.Tensor) or head.dim() < 2:
            raise ValueError("head must be a tensor (*batch, H, R)")
        self.head = head
        self.rank = head.shape[-1]
        if isinstance(tails, torch.Tensor):
            self.joint = True
            self.tails = [tails]
            if tails.shape[-1] != self.rank:
                raise ValueError(
                    f"tails must end with the rank R={self.rank}, got {tuple(tails.shape)}")
        else:
            self.joint = False
            self.tails = list(tails)
            for t in self.tails:
                if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[-1] != self.rank:
                    raise ValueError(
                        f"each CP tail factor must be a tensor (*batch, T_i, R={self.rank})")

    def tail_sizes(self, nbatch: int) -> tuple[int, ...]:
        if self.joint:
            return tuple(self.tails[0].shape[nbatch:-1])
        return tuple(t.shape[-2] for t in self.tails)

    def log_factors(self) -> tuple[torch.Tensor, ...]:
        """``(head, *tails)``: ``pot = log sum_r exp(head[a, r] + tails...[b, r])`` (the same
        reading as ``log_factors()`` of the low-rank rule factors)."""
        return (self.head, *self.tails)

    def to_dense(self) -> torch.Tensor:
        """The dense log-potential (*batch, H, T_1, ..., T_k)."""
        if self.joint:
            tail = self.tails[0]
            k = self._k_joint()
            h = self.head.reshape(*self.head.shape[:-1], *([1] * k), self.rank)
            return safe_logsumexp(h + tail.unsqueeze(-k - 2), -1)
        k = len(self.tails)
        total = self.head.reshape(*self.head.shape[:-1], *([1] * k), self.rank)
        for i, t in enumerate(self.tails):
            shape = [1] * k
            shape[i] = t.shape[-2]
            total = total + t.reshape(*t.shape[:-2], 1, *shape, self.rank)
        return safe_logsumexp(total, -1)

    def _k_joint(self) -> int:
        return self.tails[0].dim() - self.head.dim() + 1

    def expand_batch(self, batch: torch.Size, nbatch_own: int) -> LowRankPotential:
        def ex(t, nlab):
            return t.expand(*batch, *t.shape[t.dim() - nlab :])

        if self.joint:
            return LowRankPotential(ex(self.head, 2), ex(self.tails[0], self._k_joint() + 1))
        return LowRankPotential(ex(self.head, 2), [ex(t, 2) for t in self.tails])


@dataclass
class Edge:
    head: int
    tails: tuple[int, ...]
    potential: torch.Tensor | LowRankPotential


def topological_order(num_nodes: int, edges: Sequence[Edge]) -> list[int]:
    """Nodes ordered so that every edge's tails come before its head; raises on cycles."""
    deps = [set() for _ in range(num_nodes)]
    users = [[] for _ in range(num_nodes)]
    for e in edges:
        for t in e.tails:
            if t not in deps[e.head]:
                deps[e.head].add(t)
                users[t].append(e.head)
    count = [len(d) for d in deps]
    ready = [v for v in range(num_nodes) if count[v] == 0]
    order = []
    while ready:
        v = ready.pop()
        order.append(v)
        for u in users[v]:
            count[u] -= 1
            if count[u] == 0:
                ready.append(u)
    if len(order) != num_nodes:
        raise ValueError("the hypergraph has a cycle: every edge's tails must precede its head")
    return order


def _contract(s: type[Semiring], pot: torch.Tensor, tails: list[torch.Tensor]) -> torch.Tensor:
    """``(+)_{b} pot[..., a, b_1..b_k] (x) v_1[b_1] (x) ... (x) v_k[b_k]`` -> (..., A), one
    tail at a time from the last."""
    x = pot
    k = len(tails)
    for i in range(k - 1, -1, -1):
        v = tails[i]
        v = v.reshape(*v.shape[:-1], *([1] * (i + 1)), v.shape[-1])
        x = s.sum(s.times(x, v), dim=-1)
    return x


def _edge_value(s, pot, tails, rank_layer: bool) -> torch.Tensor:
    if isinstance(pot, torch.Tensor):
        return _contract(s, s.convert(pot), tails)
    if not rank_layer:
        return _contract(s, s.convert(pot.to_dense()), tails)
    if pot.joint:
        t = pot.tails[0]
        k = len(tails)
        y = _contract(s, s.convert(t.movedim(-1, -k - 1)), tails)  # (..., R)
    else:
        y = None
        for tf, v in zip(pot.tails, tails, strict=True):
            yi = s.sum(s.times(s.convert(tf.transpose(-1, -2)), v.unsqueeze(-2)), dim=-1)
            y = yi if y is None else s.times(y, yi)
    return s.sum(s.times(s.convert(pot.head), y.unsqueeze(-2)), dim=-1)


def inside_values(
    num_labels: Sequence[int],
    node_potentials: Sequence[torch.Tensor],
    edges: Sequence[Edge],
    semiring: type[Semiring] = LogSemiring,
    rank_layer: bool | None = None,
) -> list[torch.Tensor]:
    """Inside values of every node in the semiring's representation (S?, *batch, L_v).
    ``node_potentials`` must already share one batch shape; ``rank_layer`` defaults to True
    for the log semiring only."""
    s = semiring
    if rank_layer is None:
        rank_layer = s is LogSemiring
    order = topological_order(len(num_labels), edges)
    incoming: list[list[Edge]] = [[] for _ in num_labels]
    for e in edges:
        incoming[e.head].append(e)
    values: list[torch.Tensor | None] = [None] * len(num_labels)
    for v in order:
        val = s.convert(node_potentials[v])
        if incoming[v]:
            parts = [_edge_value(s, e.potential, [values[t] for t in e.tails], rank_layer)
                     for e in incoming[v]]
            total = parts[0] if len(parts) == 1 else s.sum(torch.stack(parts, -1), dim=-1)
            val = s.times(val, total)
        values[v] = val
    return values


def marginalize(
    num_labels: Sequence[int],
    node_potentials: Sequence[torch.Tensor],
    edges: Sequence[Edge],
    root: int,
    semiring: type[Semiring] = LogSemiring,
    rank_layer: bool | None = None,
) -> torch.Tensor:
    """The value of the hypergraph ``(+)_a inside[root][a]``: (*batch,)."""
    values = inside_values(num_labels, node_potentials, edges, semiring, rank_layer)
    return semiring.unconvert(semiring.sum(values[root], dim=-1))
