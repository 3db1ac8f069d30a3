"""PCFG posterior distributions over binary trees (Chomsky normal form), batch-first.

Symbols: nonterminals ``0..m-1`` label spans of width >= 2 and head binary rules;
preterminals ``m..m+p-1`` label single words.  A tree is a long tensor (2n-1, 3) of rows
``(start, end_exclusive, symbol)`` in pre-order, padded with -1 rows for shorter sentences;
batches of trees are (..., B, 2n-1, 3).

The generative model: a root symbol ~ ``root``; a nonterminal A rewrites to ``B C`` with
probability ``T[A, B, C]`` (a :mod:`lorank.rules` factor: dense, low-rank, CP or rank-space); a
preterminal emits one word with probability ``exp(terminal[b, i, T])`` for word i.
"""

from __future__ import annotations

from functools import cached_property

import torch

from lorank._checks import check_lengths, check_positive_int, check_tensor
from lorank._inputs import (
    check_alike,
    check_batch_shape,
    check_instance,
    check_no_dead_rows,
    grads_or_zeros,
)
from lorank.dp import inside as dp
from lorank.rules import Rules, dense_child_operators

NEG_INF = float("-inf")


def _check_root(root: torch.Tensor, m: int, p: int, b: int) -> torch.Tensor:
    """Validated root logits -> normalized log-probabilities (B, S) over all symbols."""
    check_tensor("root", root, ndim=(1, 2))
    size = root.shape[-1]
    if size not in (m, m + p) or (root.dim() == 2 and root.shape[0] != b):
        raise ValueError(
            f"root must have shape ({m},) / ({m + p},) or ({b}, {m}) / ({b}, {m + p}) "
            f"(nonterminals, or nonterminals then preterminals), got {tuple(root.shape)}"
        )
    check_no_dead_rows("root", root)
    logp = torch.log_softmax(root, -1)
    if size == m:
        logp = torch.cat([logp, logp.new_full((*logp.shape[:-1], p), NEG_INF)], -1)
    return logp.expand(b, m + p)


def prepare_pcfg_inputs(
    root: torch.Tensor,
    rules: Rules,
    terminal: torch.Tensor,
    lengths: torch.Tensor | None = None,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the inputs of :class:`PCFG` (shapes, one dtype and device, no NaN, no all
    ``-inf`` root row, lengths); return ``(root_logp (B, S), lengths (B,))``.  O(1) passes
    over the inputs."""
    check_instance("rules", rules, Rules, "a lorank.rules factor (DenseRules, LowRankRules, "
                   "CPRules or RankSpaceRules)")
    check_tensor("terminal", terminal, ndim=3)
    b, n, p = terminal.shape
    if n < 1:
        raise ValueError(f"terminal must have at least one word, got shape {(b, n, p)}")
    m = rules.num_nonterminals
    if p != rules.num_preterminals:
        raise ValueError(
            f"terminal has {p} preterminals (shape {tuple(terminal.shape)}) but the rules "
            f"have {rules.num_preterminals}"
        )
    check_batch_shape("rules", rules.batch_shape, b, f"terminal {tuple(terminal.shape)}")
    if isinstance(root, torch.Tensor):
        check_alike(terminal=terminal, root=root, rules=rules.parameters()[0])
    lengths = check_lengths(lengths, b, n, terminal.device, source="terminal")
    if max_length is not None:
        check_positive_int("max_length", max_length)
        longest = int(lengths.max()) if b else 0
        if longest > max_length:
            raise ValueError(
                f"a sentence has {longest} words but this model allows at most {max_length}"
            )
    root_logp = _check_root(root, m, p, b)
    if root.shape[-1] == m and bool((lengths == 1).any()):
        raise ValueError(
            "one-word sentences need a preterminal root: pass root logits over all "
            f"{m + p} symbols (nonterminals then preterminals), not only the {m} nonterminals"
        )
    return root_logp, lengths


class PCFG:
    """Posterior over the parse trees of sentences under a PCFG.

    Args:
        root: root logits over the m nonterminals, or over all S = m + p symbols (then a
            one-word sentence is a preterminal root); (m,) / (S,) or batched (B, .).
        rules: binary-rule factor (:class:`lorank.rules.DenseRules`, ``LowRankRules``,
            ``CPRules`` or ``RankSpaceRules``), shared or batched (B,).
        terminal: (B, n, p) log-likelihoods ``log p(w_i | preterminal)`` of the sentences.
        lengths: (B,) in [1, n]; default all n.
        max_length: optional limit; longer sentences raise a clear error.

    A sentence with no tree of finite score (e.g. a word no preterminal emits) is
    *impossible*: its ``log_partition`` and ``max_score`` are ``-inf``, its marginals and
    entropy 0, and its ``argmax``, samples and ``mbr()`` the all ``-1`` "no tree" sentinel;
    the other sentences of the batch are unaffected (docs/structures.md, conventions).
    """

    def __init__(
        self,
        root: torch.Tensor,
        rules: Rules,
        terminal: torch.Tensor,
        lengths: torch.Tensor | None = None,
        max_length: int | None = None,
    ):
        self.root_logp, self.lengths = prepare_pcfg_inputs(
            root, rules, terminal, lengths, max_length
        )
        self.rules = rules
        self.terminal = terminal
        b, n, p = terminal.shape
        m = rules.num_nonterminals
        self.batch_size, self.max_length = b, n
        self.num_nonterminals, self.num_preterminals = m, p
        self.num_symbols = m + p

    # ---- sum-product -------------------------------------------------------------------
    @cached_property
    def log_partition(self) -> torch.Tensor:
        """``log p(sentence)`` summed over all trees: (B,), ``-inf`` for an impossible
        sentence. Differentiable."""
        return dp.inside(self.root_logp, self.rules, self.terminal, self.lengths)

    @property
    def possible(self) -> torch.Tensor:
        """(B,) bool: True where the sentence has a tree of finite score."""
        return torch.isfinite(self.log_partition.detach())

    def _labeled_kind(self) -> str:
        return "cp" if self.rules.inside_kind == "rank_space" else self.rules.inside_kind

    def _span_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and width of every span of width >= 2 that fits in n words."""
        n = self.max_length
        ii, ww = torch.meshgrid(torch.arange(n), torch.arange(n + 1), indexing="ij")
        ok = (ww >= 2) & (ii + ww <= n)
        return ii[ok], ww[ok]

    def _word_mask(self, logz: torch.Tensor) -> torch.Tensor:
        """(B, n) bool: real words of the sentences whose ``logz`` is finite."""
        steps = torch.arange(self.max_length, device=self.lengths.device)
        return (steps < self.lengths.unsqueeze(1)) & torch.isfinite(logz.detach()).unsqueeze(1)

    @cached_property
    def marginals(self) -> torch.Tensor:
        """Labeled span posteriors (B, n, n, S): ``[b, i, j, A]`` = p(the span of words i..j,
        i.e. ``[i, j+1)``, is a constituent labeled A); width-1 spans carry the preterminals;
        all 0 for an impossible sentence.  (Rank-space rules use the CP inside pass here,
        which has per-label charts.)"""
        b, n, m = self.batch_size, self.max_length, self.num_nonterminals
        with torch.enable_grad():
            term = self.terminal.detach().requires_grad_(True)
            label = term.new_zeros(b, n, n + 1, m, requires_grad=True)
            logz = dp.inside(self.root_logp.detach(), self.rules, term, self.lengths,
                             label_pot=label, kind=self._labeled_kind())
            g_term, g_label = grads_or_zeros(logz.sum(), [term, label])
        out = g_term.new_zeros(b, n, n, self.num_symbols)
        ii, ww = self._span_grid()
        out[:, ii, ii + ww - 1, :m] = g_label[:, ii, ww]
        steps = torch.arange(n)
        out[:, steps, steps, m:] = g_term * self._word_mask(logz).unsqueeze(-1)
        return out.detach()

    def span_potential_log_partition(self, span_pot: torch.Tensor) -> torch.Tensor:
        """log Z with an extra log-potential (B, n, n+1) on every span (start, width >= 2),
        by the rules' own inside pass (rank space included)."""
        return dp.inside(self.root_logp, self.rules, self.terminal, self.lengths,
                         span_pot=span_pot)

    @cached_property
    def span_marginals(self) -> torch.Tensor:
        """Unlabeled span posteriors (B, n, n): ``[b, i, j]`` = p(words i..j, i.e.
        ``[i, j+1)``, form a constituent) (1 on the diagonal within lengths; all 0 for an
        impossible sentence).  Computed by the rules' own inside pass (O(n^3 R + n^2 R^2) in
        rank space) and differentiable with respect to the grammar and terminal scores."""
        b, n = self.batch_size, self.max_length
        create = torch.is_grad_enabled() and any(t.requires_grad for t in self._param_tensors())
        with torch.enable_grad():
            pot = self.terminal.new_zeros(b, n, n + 1, requires_grad=True)
            logz = self.span_potential_log_partition(pot)
            (g,) = grads_or_zeros(logz.sum(), [pot], create_graph=create)
        ii, ww = self._span_grid()
        out = g.new_zeros(b, n, n)
        out = out.index_put((torch.arange(b)[:, None], ii[None], (ii + ww - 1)[None]),
                            g[:, ii, ww])
        return out + torch.diag_embed(self._word_mask(logz).to(g.dtype))

    def _param_tensors(self) -> list[torch.Tensor]:
        return [self.terminal, self.root_logp, *self.rules.parameters()]

    # ---- max-product -------------------------------------------------------------------
    @cached_property
    def _viterbi(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            log_rules = self.rules.log_probs()
            term = dp.pad_terminal(self.terminal, self.lengths)
            chart = dp.symbol_chart(dp.max_chart(log_rules, term, self.lengths), term)
            top = chart[torch.arange(self.batch_size), 0, self.lengths] + self.root_logp
            trees = dp.decode(chart, log_rules, self.root_logp, self.lengths)[0]
        return top.amax(-1), trees

    @property
    def argmax(self) -> torch.Tensor:
        """The exact most probable tree (Viterbi CKY on the dense rule tensor): (B, 2n-1, 3);
        the all -1 sentinel for an impossible sentence."""
        return self._viterbi[1]

    @property
    def max_score(self) -> torch.Tensor:
        """``max_tree log p(sentence, tree)``: (B,), ``-inf`` for an impossible sentence."""
        return self._viterbi[0]

    def mbr(self) -> torch.Tensor:
        """Minimum-Bayes-risk tree from the span marginals: the bracketing with the largest
        expected number of correct spans, each labeled with its most probable symbol:
        (B, 2n-1, 3); the all -1 sentinel for an impossible sentence."""
        with torch.no_grad():
            marg = self.marginals
            spans = dp.mbr_spans(marg.sum(-1), self.lengths)
            possible = (marg.flatten(1).sum(-1) > 0).tolist()
        n, m = self.max_length, self.num_nonterminals
        out = torch.full((self.batch_size, 2 * n - 1, 3), -1, dtype=torch.long)
        for bi, sp in enumerate(spans):
            if not possible[bi]:
                continue
            for r, (i, j) in enumerate(sp):
                lab = marg[bi, i, j - 1, :m] if j - i >= 2 else marg[bi, i, j - 1, m:]
                sym = int(lab.argmax()) + (0 if j - i >= 2 else m)
                out[bi, r] = torch.tensor([i, j, sym])
        return out.to(self.terminal.device)

    # ---- other queries -----------------------------------------------------------------
    def sample(
        self, sample_shape: torch.Size | tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Exact posterior samples of trees (top-down sampling on the inside chart):
        (*sample_shape, B, 2n-1, 3); the all -1 sentinel for an impossible sentence."""
        shape = torch.Size(sample_shape)
        with torch.no_grad():
            term = dp.pad_terminal(self.terminal, self.lengths)
            _, chart = dp.inside(self.root_logp, self.rules, term, self.lengths,
                                 return_chart=True, kind=self._labeled_kind())
            chart = dp.symbol_chart(chart, term)
            trees = dp.decode(chart, self.rules.log_probs(), self.root_logp, self.lengths,
                              num=shape.numel(), generator=generator, sample=True)
        return trees.reshape(*shape, self.batch_size, 2 * self.max_length - 1, 3)

    def entropy(self) -> torch.Tensor:
        """Entropy of the posterior over trees: (B,), ``log Z - E[score]`` with the expected
        rule, root and word counts from autograd of a dense inside pass (materializes the
        m x S x S rule tensor; differentiable); 0 for an impossible sentence."""
        b = self.batch_size
        log_rules = self.rules.log_probs()
        create = torch.is_grad_enabled() and any(t.requires_grad for t in self._param_tensors())

        def as_input(t: torch.Tensor) -> torch.Tensor:
            return t.clone() if create and t.requires_grad else t.detach().requires_grad_(True)

        with torch.enable_grad():
            thetas = [as_input(self.root_logp),
                      as_input(log_rules.expand(b, *log_rules.shape[-3:])),
                      as_input(dp.pad_terminal(self.terminal, self.lengths))]
            # the normalized log rules taken as given: autograd w.r.t. them = expected counts
            ops = dense_child_operators(thetas[1].exp(), self.num_nonterminals)
            logz = dp.inside_children(thetas[0], ops, self.num_nonterminals, thetas[2],
                                      self.lengths)
            grads = grads_or_zeros(logz.sum(), thetas, create_graph=create)
        expected = 0
        for g, t in zip(grads, thetas, strict=True):
            safe_t = torch.where(torch.isfinite(t), t, torch.zeros_like(t))
            expected = expected + (g * safe_t).flatten(1).sum(-1)
        out = torch.where(torch.isfinite(logz), logz - expected, torch.zeros_like(logz))
        return out if create else out.detach()

    def score(self, trees: torch.Tensor) -> torch.Tensor:
        """``log p(sentence, tree)`` for trees (..., B, 2n-1, 3): (..., B); ``-inf`` for the
        all -1 "no tree" sentinel."""
        trees = self._check_trees(trees)
        m = self.num_nonterminals
        valid, internal, left, right = dp.tree_parts(trees)
        sym = trees[..., 2].clamp_min(0)
        lead = trees.shape[:-2]
        root = self.root_logp.expand(*lead[:-1], *self.root_logp.shape)
        score = root.gather(-1, sym[..., :1]).squeeze(-1)
        # rules: index tensors (..., rows, B) with the batch last
        a = sym.transpose(-1, -2)
        bsym = sym.gather(-1, left).transpose(-1, -2)
        csym = sym.gather(-1, right).transpose(-1, -2)
        a = torch.where(internal.transpose(-1, -2), a, torch.zeros_like(a)).clamp(max=m - 1)
        rule = self.rules.log_prob_entries(a, bsym, csym).transpose(-1, -2)
        score = score + torch.where(internal, rule, torch.zeros_like(rule)).sum(-1)
        leaf = valid & ~internal
        term = dp.pad_terminal(self.terminal, self.lengths)
        pos = trees[..., 0].clamp_min(0)
        pt = (sym - m).clamp_min(0)
        tb = term.expand(*lead[:-1], *term.shape)  # (..., B, n, p)
        tv = tb.gather(-2, pos.unsqueeze(-1).expand(*pos.shape, term.shape[-1]))
        tv = tv.gather(-1, pt.unsqueeze(-1)).squeeze(-1)
        score = score + torch.where(leaf, tv, torch.zeros_like(tv)).sum(-1)
        return torch.where(valid.any(-1), score, torch.full_like(score, NEG_INF))

    def log_prob(self, trees: torch.Tensor) -> torch.Tensor:
        """``log p(tree | sentence)``: (..., B); ``-inf`` for a tree of score ``-inf`` (the
        "no tree" sentinel included), also on an impossible sentence."""
        score = self.score(trees)
        zero_prob = torch.isneginf(score)
        return torch.where(zero_prob, score, score - self.log_partition)

    def to_chart(self, trees: torch.Tensor) -> torch.Tensor:
        """0/1 labeled span indicators (..., B, n, n, S) of trees (expectation: marginals)."""
        trees = self._check_trees(trees)
        n, s = self.max_length, self.num_symbols
        valid = trees[..., 0] >= 0
        start = trees[..., 0].clamp_min(0)
        end = (trees[..., 1] - 1).clamp_min(0)
        flat = (start * n + end) * s + trees[..., 2].clamp_min(0)
        out = torch.zeros(*trees.shape[:-2], n * n * s, dtype=self.terminal.dtype,
                          device=trees.device)
        out.scatter_add_(-1, flat, valid.to(out.dtype))
        return out.view(*trees.shape[:-2], n, n, s)

    def _check_trees(self, trees: torch.Tensor) -> torch.Tensor:
        if not isinstance(trees, torch.Tensor) or trees.is_floating_point():
            raise TypeError("trees must be an integer tensor (..., B, 2n-1, 3)")
        want = (self.batch_size, 2 * self.max_length - 1, 3)
        if trees.dim() < 3 or tuple(trees.shape[-3:]) != want:
            raise ValueError(f"trees must have shape (..., {want[0]}, {want[1]}, 3), got "
                             f"{tuple(trees.shape)}")
        m, s = self.num_nonterminals, self.num_symbols
        valid, internal, left, right = dp.tree_parts(trees)
        st, en, sy = trees[..., 0], trees[..., 1], trees[..., 2]
        bad = valid & ((sy < 0) | (sy >= s) | (en <= st))
        bad |= internal & (sy >= m)
        bad |= valid & (en - st == 1) & (sy < m)
        ls, le = st.gather(-1, left), en.gather(-1, left)
        rs, re = st.gather(-1, right), en.gather(-1, right)
        bad |= internal & ((ls != st) | (re != en) | (rs != le) | (le <= ls))
        nvalid = valid.sum(-1)
        tree = nvalid > 0  # all -1 rows: the "no tree" sentinel, accepted for any sentence
        bad_count = tree & ((nvalid != 2 * self.lengths - 1) | (en[..., 0] != self.lengths))
        if bool(bad.any()) or bool(bad_count.any()):
            raise ValueError("trees are not well-formed pre-order binary trees over the "
                             "sentences (rows (start, end_exclusive, symbol), -1 padded; all "
                             "-1 for no tree)")
        return trees

    def __repr__(self) -> str:
        return (f"PCFG(batch={self.batch_size}, n={self.max_length}, "
                f"nonterminals={self.num_nonterminals}, preterminals={self.num_preterminals}, "
                f"rules={self.rules!r})")


def generate(
    root: torch.Tensor,
    rules: Rules,
    emission_logits: torch.Tensor,
    num_samples: int,
    max_length: int = 40,
    generator: torch.Generator | None = None,
    max_tries: int = 100,
) -> list[tuple[list[int], list[tuple[int, int, int]]]]:
    """Sample sentences *and* their trees from an (unbatched) grammar: root logits (m,) or
    (S,), rules, and preterminal-to-word logits (p, V).  Derivations longer than
    ``max_length`` words are rejected and redrawn (at most ``max_tries`` times each).
    Returns ``[(words, tree_rows), ...]`` with tree rows (start, end_exclusive, symbol)."""
    check_positive_int("num_samples", num_samples)
    check_positive_int("max_length", max_length)
    if len(rules.batch_shape):
        raise ValueError("generate needs an unbatched grammar")
    m, p = rules.num_nonterminals, rules.num_preterminals
    s = m + p
    root_logp = _check_root(root, m, p, 1)[0]
    with torch.no_grad():
        rule_p = rules.log_probs().exp().reshape(m, s * s).double()
        word_p = torch.softmax(emission_logits.double(), -1)
        root_p = root_logp.exp().double()
    out = []
    for _ in range(num_samples):
        for _try in range(max_tries):
            res = _derive(root_p, rule_p, word_p, m, s, max_length, generator)
            if res is not None:
                out.append(res)
                break
        else:
            raise RuntimeError(
                f"no derivation of at most {max_length} words in {max_tries} tries; the grammar "
                "may favour very long sentences"
            )
    return out


def _derive(root_p, rule_p, word_p, m, s, max_length, generator):
    sym0 = int(torch.multinomial(root_p, 1, generator=generator))
    # pre-order expansion with a stack of (symbol, row index); spans filled in afterwards
    nodes: list[list[int]] = []  # [symbol, left_child, right_child]
    stack = [(sym0, -1, 0)]
    words: list[int] = []
    leaves = 0
    while stack:
        sym, parent, side = stack.pop()
        idx = len(nodes)
        nodes.append([sym, -1, -1])
        if parent >= 0:
            nodes[parent][1 + side] = idx
        if sym >= m:
            leaves += 1
            if leaves > max_length:
                return None
            words.append(int(torch.multinomial(word_p[sym - m], 1, generator=generator)))
        else:
            bc = int(torch.multinomial(rule_p[sym], 1, generator=generator))
            stack.append((bc % s, idx, 1))
            stack.append((bc // s, idx, 0))
    # spans: leaves are numbered left to right in pre-order
    spans = [None] * len(nodes)
    counter = [0]

    def fill(i):
        sym, lc, rc = nodes[i]
        if lc < 0:
            spans[i] = (counter[0], counter[0] + 1, sym)
            counter[0] += 1
        else:
            fill(lc)
            fill(rc)
            spans[i] = (spans[lc][0], spans[rc][1], sym)

    fill(0)
    return words, [tuple(x) for x in spans]


def tree_to_string(rows, words=None, symbol_names=None) -> str:
    """A bracketed string ``(A (B w0) (C w1))`` of one tree's rows (start, end, symbol)."""
    rows = [tuple(int(v) for v in r) for r in rows if int(r[0]) >= 0]
    pos = [0]

    def name(sym):
        return symbol_names[sym] if symbol_names else str(sym)

    def rec():
        i, j, sym = rows[pos[0]]
        pos[0] += 1
        if j - i == 1:
            w = words[i] if words is not None else i
            return f"({name(sym)} {w})"
        left = rec()
        right = rec()
        return f"({name(sym)} {left} {right})"

    return rec()


__all__ = ["PCFG", "generate", "tree_to_string"]
