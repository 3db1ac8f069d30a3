"""Inside algorithms (CKY) for PCFGs as pure functions of potentials, rule factors and lengths.

Conventions (batch-first):

* ``root_logp``: (B, S) normalized log root probabilities over all symbols (``-inf`` where
  a symbol may not be the root; preterminals only matter for one-word sentences);
* ``rules``: a :class:`lorank.rules.Rules` factor (m nonterminals, p preterminals, S = m + p);
* ``term``: (B, n, p) log-likelihoods ``log p(w_i | preterminal)`` (padding ignored);
* ``lengths``: (B,) long in [1, n].

Charts are indexed by ``(start, width)``; a second copy indexed by ``(end, width)`` turns
"all splits of all spans of one width" into two strided slices, so the only Python loop is the
one over widths (torch-struct's diagonal trick).  Every inside pass accepts
``span_pot`` (B, n, n+1) (log-potential added to every span of width >= 2, for differentiable
span marginals) and ``label_pot`` (B, n, n+1, m) (per span and nonterminal; not in rank space).
"""

from __future__ import annotations

import math

import torch

from lorank._numerics import gumbel_noise, safe_log, stable_shift
from lorank.dp import rank_inside
from lorank.rules import ALL, Rules
from lorank.semiring import log_matmul, safe_logsumexp

NEG_INF = -math.inf


def _scaled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log vectors (..., K) -> probabilities divided by their max, and the detached log max
    (...) (clamped to the dtype's lowest value, so an all ``-inf`` vector is zeros)."""
    top = x.detach().amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).min)
    return (x - top).exp(), top.squeeze(-1)


def _top_log_partition(root_logp, top_v, top_c, term, lengths):
    """log Z from each sentence's top-span nonterminal vector (B, m) at log-scale (B,) and,
    for one-word sentences, the preterminal scores."""
    m = top_v.shape[-1]
    root_n = root_logp[:, :m]
    mr = stable_shift(root_n, -1)
    dot = safe_log((top_v * (root_n - mr).exp()).sum(-1))
    # an impossible sentence is -inf with zero gradient (also to the potentials in the scale)
    nt = torch.where(torch.isfinite(dot), top_c + dot + mr.squeeze(-1), NEG_INF)
    one_word = safe_logsumexp(root_logp[:, m:] + term[:, 0], -1)
    return torch.where(lengths == 1, one_word, nt)


def pad_terminal(term: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``term`` with the word scores past each sentence's length replaced by 0 (a new tensor),
    so that padding never contributes -inf or NaN."""
    steps = torch.arange(term.shape[1], device=term.device)
    valid = (steps.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)
    return torch.where(valid, term, torch.zeros_like(term))


def inside(
    root_logp: torch.Tensor,
    rules: Rules,
    term: torch.Tensor,
    lengths: torch.Tensor,
    span_pot: torch.Tensor | None = None,
    label_pot: torch.Tensor | None = None,
    return_chart: bool = False,
    kind: str | None = None,
):
    """log Z (B,) by the inside algorithm the factor asks for (``kind`` overrides:
    "children", "cp" or "rank_space").  With ``return_chart``, also the nonterminal chart
    (B, n, n+1, m) of log inside scores indexed by (start, width) (not in rank space)."""
    kind = kind or rules.inside_kind
    term = pad_terminal(term, lengths)
    if kind == "children":
        return inside_children(root_logp, rules.child_operators(), rules.num_nonterminals,
                               term, lengths, span_pot, label_pot, return_chart)
    if kind in ("cp", "rank_space"):
        if kind == "rank_space" and (label_pot is not None or return_chart):
            raise ValueError("rank-space inside has no per-label chart; use kind='cp'")
        lh, ll, lr = rules.log_factors()
        return inside_factored(root_logp, lh, ll, lr, term, lengths, span_pot, label_pot,
                               rank_space=kind == "rank_space", return_chart=return_chart)
    raise ValueError(f"unknown inside kind {kind!r}")


#: grammars with at most this many symbols run the children inside on full S x S child
#: products (up to 4x the arithmetic of the blocks, but far fewer tensor operations: small
#: grammars are bound by per-operation overhead); larger ones by blocks of symbol types.
UNIFIED_MAX_SYMBOLS = 24


def _split_unified(op, cl, cr, sl, sr, w, nw, n):
    """Head scores (B, nw, m) of all spans of width w at log-scale (B, nw, 1) from full-symbol
    charts: ``X = sum_k wts_k left_k (x) right_k`` over all splits, one batched GEMM, then the
    rules' ``"AA"`` operator."""
    left, right = cl[:, :nw, 1:w].clone(), cr[:, w:, n + 2 - w :].clone()
    scales = sl[:, :nw, 1:w] + sr[:, w:, n + 2 - w :]
    big = scales.detach().amax(-1, keepdim=True).clamp_min(torch.finfo(cl.dtype).min)
    x = (left * (scales - big).exp().unsqueeze(-1)).transpose(-1, -2) @ right
    return op(x), big


def _split_blocks(ops, tp, tc, cl, cr, sl, sr, w, nw, n):
    """As :func:`_split_unified` on nonterminal charts, by blocks of child symbol types
    (preterminal children are the words ``tp`` at log-scales ``tc``)."""
    b = tp.shape[0]
    # (block, left (B, nw, [K,] Sb), right, log-scales (B, nw[, K]))
    if w == 2:
        parts = [("PP", tp[:, :nw], tp[:, 1:], tc[:, :nw] + tc[:, 1:])]
    else:
        parts = [("PN", tp[:, :nw], cr[:, w:, n + 2 - w].clone(),
                  tc[:, :nw] + sr[:, w:, n + 2 - w]),
                 ("NP", cl[:, :nw, w - 1].clone(), tp[:, w - 1 :],
                  sl[:, :nw, w - 1] + tc[:, w - 1 :])]
    if w >= 4:
        parts.append(("NN", cl[:, :nw, 2 : w - 1].clone(), cr[:, w:, n + 3 - w : n].clone(),
                      sl[:, :nw, 2 : w - 1] + sr[:, w:, n + 3 - w : n]))
    scales = torch.cat([sc.view(b, nw, -1) for *_, sc in parts], -1)
    big = scales.detach().amax(-1, keepdim=True).clamp_min(torch.finfo(tp.dtype).min)
    beta = 0
    for blk, left, right, sc in parts:
        wts = (sc - (big if sc.dim() == 3 else big.squeeze(-1))).exp()
        if blk == "NN":  # sum over the splits: one batched GEMM
            x = (left * wts.unsqueeze(-1)).transpose(-1, -2) @ right
        else:
            x = left.unsqueeze(-1) * (right * wts.unsqueeze(-1)).unsqueeze(-2)
        beta = beta + ops[blk](x)
    return beta, big


def inside_children(
    root_logp, ops, m, term, lengths, span_pot=None, label_pot=None, return_chart=False
):
    """Inside pass for rules given as child operators (dense and low-rank head-vs-children).

    For each width w, the split products of all spans ``X = sum_k left_k (x) right_k`` (one
    batched GEMM over the splits, O(n S^2) per span) go through the rules' operator (O(S^2 m)
    dense, O(S^2 R + R m) low-rank): on full S x S products for small grammars, else by
    blocks of child symbol types (a width-1 child is a preterminal).  Scaled probability
    space: each chart entry is divided by its max and its log-scale kept beside it, so a
    width costs a few dozen tensor operations.  Charts: left children indexed (start, width),
    right children (end, n + 1 - width).  ``return_chart``: also the log inside chart
    (B, n, n+1, m) indexed by (start, width).
    """
    b, n, p = term.shape
    unified = ALL in ops and m + p <= UNIFIED_MAX_SYMBOLS
    size = m + p if unified else m
    tp, tc = _scaled(term)  # (B, n, p), (B, n)
    cl, cr = term.new_zeros(b, n, n + 1, size), term.new_zeros(b, n + 1, n + 1, size)
    sl = term.new_full((b, n, n + 1), NEG_INF)
    sr = term.new_full((b, n + 1, n + 1), NEG_INF)
    if unified:  # the words: width-1 entries with only a preterminal part
        cl[:, :, 1, m:], sl[:, :, 1] = tp, tc
        cr[:, 1:, n, m:], sr[:, 1:, n] = tp, tc
    len_set = set(lengths.tolist())
    top_v, top_c = term.new_zeros(b, n + 1, m), term.new_full((b, n + 1), NEG_INF)
    chart = term.new_full((b, n, n + 1, m), NEG_INF) if return_chart else None
    for w in range(2, n + 1):
        nw = n - w + 1
        if unified:
            beta, cy = _split_unified(ops[ALL], cl, cr, sl, sr, w, nw, n)
        else:
            beta, cy = _split_blocks(ops, tp, tc, cl, cr, sl, sr, w, nw, n)
        cy = cy.squeeze(-1)
        if label_pot is not None:
            lab = label_pot[:, :nw, w]
            ml = stable_shift(lab, -1)
            beta = beta * (lab - ml).exp()
            cy = cy + ml.squeeze(-1)
        if span_pot is not None:
            cy = cy + span_pot[:, :nw, w]
        bmax = beta.detach().amax(-1, keepdim=True)
        beta = beta / bmax.clamp_min(torch.finfo(term.dtype).tiny)
        cy = cy + bmax.squeeze(-1).log()  # -inf for a span no tree can cover
        if chart is not None:
            chart[:, :nw, w] = safe_log(beta) + cy.unsqueeze(-1)
        if w in len_set:
            top_v[:, w], top_c[:, w] = beta[:, 0], cy[:, 0]
        cl[:, :nw, w, :m], sl[:, :nw, w] = beta, cy
        cr[:, w:, n + 1 - w, :m], sr[:, w:, n + 1 - w] = beta, cy
    bidx = torch.arange(b, device=term.device)
    logz = _top_log_partition(root_logp, top_v[bidx, lengths], top_c[bidx, lengths], term,
                              lengths)
    return (logz, chart) if return_chart else logz


def inside_factored(
    root_logp, lh, ll, lr, term, lengths, span_pot=None, label_pot=None,
    rank_space=False, return_chart=False,
):
    """Inside pass for CP rules ``T = sum_r H[A,r] L[B,r] R[C,r]`` (normalized log factors lh
    (m, R), ll and lr (S, R), possibly batched) by :mod:`lorank.dp.rank_inside`: TN-PCFG's
    O(n^3 R + n^2 m R) pass, or the rank-space O(n^3 R + n^2 R^2) pass (Yang, Liu & Tu 2022),
    with a hand-written outside pass as the backward; when no input requires grad (or grad
    is disabled) the forward runs alone and saves nothing.  ``return_chart`` (CP only): also
    the log inside chart (B, n, n+1, m), computed without gradient."""
    m = lh.shape[-2]
    lproj1 = log_matmul(term, ll[..., m:, :])  # (B, n, R): the words as left children
    rproj1 = log_matmul(term, lr[..., m:, :])
    h, l_n, r_n = lh.exp(), ll[..., :m, :].exp(), lr[..., :m, :].exp()
    if rank_space:
        ht = h.transpose(-1, -2)
        h_t, mx = None, torch.cat([ht @ l_n, ht @ r_n], -1)  # (R, 2R)
        root = log_matmul(root_logp[:, :m].unsqueeze(-2), lh).squeeze(-2)  # log root_N^T H
    else:
        h_t, mx, root = h.transpose(-1, -2), torch.cat([l_n, r_n], -1), root_logp[:, :m]
    args = (lproj1, rproj1, h_t, mx, root, span_pot, label_pot)
    chart = None
    if return_chart or not (torch.is_grad_enabled()
                            and any(t is not None and t.requires_grad for t in args)):
        # inference: nothing saved for a backward pass
        with torch.no_grad():
            logz_nt, _, chart = rank_inside.forward_pass(*args, lengths, chart_out=return_chart)
    else:
        logz_nt = rank_inside.SplitInside.apply(*args, lengths)
    one_word = safe_logsumexp(root_logp[:, m:] + term[:, 0], -1)
    logz = torch.where(lengths == 1, one_word, logz_nt)
    return (logz, chart) if return_chart else logz


# ---- max-product and top-down decoding ---------------------------------------------------


def symbol_chart(chart_nt: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """The full-symbol chart (B, n, n+1, S): nonterminal scores for widths >= 2, preterminal
    scores (``term``) for width 1, -inf elsewhere."""
    b, n, _, m = chart_nt.shape
    p = term.shape[-1]
    nt = chart_nt.clone()
    nt[:, :, 1] = NEG_INF
    pt = term.new_full((b, n, n + 1, p), NEG_INF)
    pt[:, :, 1] = term
    return torch.cat([nt, pt], -1)


def max_chart(
    log_rules: torch.Tensor, term: torch.Tensor, lengths: torch.Tensor,
    max_chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Max-product inside chart over nonterminals (B, n, n+1, m) on the dense ``log T``
    ((m, S, S) or (B, m, S, S)).  Max does not factor through a rank, so this is
    O(n^3 S^2 + n^2 S^2 m) whatever the factorization (heads processed in chunks)."""
    term = pad_terminal(term, lengths)
    b, n, p = term.shape
    m = log_rules.shape[-3]
    batched = log_rules.dim() == 4
    chart = term.new_full((b, n, n + 1, m), NEG_INF)
    pt = slice(m, m + p)
    nt = slice(0, m)
    for w in range(2, n + 1):
        nw = n - w + 1
        best = term.new_full((b, nw, m), NEG_INF)
        for k in range(1, w):
            left = term[:, :nw] if k == 1 else chart[:, :nw, k]
            right = term[:, k : k + nw] if w - k == 1 else chart[:, k : k + nw, w - k]
            rb = pt if k == 1 else nt
            cb = pt if w - k == 1 else nt
            x = (left.unsqueeze(-1) + right.unsqueeze(-2)).flatten(-2)  # (B, nw, Sb*Sc)
            rules = log_rules[..., rb, cb].flatten(-2)  # (*batch, m, Sb*Sc)
            sbc = x.shape[-1]
            chunk = max(1, max_chunk_elements // max(1, b * nw * sbc))
            outs = []
            for a0 in range(0, m, chunk):
                ra = rules[..., a0 : a0 + chunk, :]
                ra = ra.unsqueeze(1) if batched else ra
                outs.append((x.unsqueeze(-2) + ra).amax(-1))
            best = torch.maximum(best, torch.cat(outs, -1))
        chart[:, :nw, w] = best
    return chart


def decode(
    chart: torch.Tensor,
    log_rules: torch.Tensor,
    root_logp: torch.Tensor,
    lengths: torch.Tensor,
    num: int = 1,
    generator: torch.Generator | None = None,
    sample: bool = False,
    max_chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Top-down decoding of trees from a full-symbol chart (B, n, n+1, S).

    Every node ``(i, w, A)`` picks ``(k, B, C)`` over ``log T[A, B, C] + chart[i, k, B] +
    chart[i+k, w-k, C]``: the argmax (Viterbi, on a max-product chart) or a Gumbel-argmax
    draw (exact posterior sampling, on a sum-product chart).  All ``num * B`` trees are
    expanded in lock-step (pre-order, one node per step; the stack is a tensor).

    Returns trees (num, B, 2n-1, 3) long: rows ``(start, end_exclusive, symbol)`` in pre-order,
    padded with -1; all rows -1 (the "no tree" sentinel) for a sentence without a finite-score
    tree.
    """
    b, n, _, s = chart.shape
    m = log_rules.shape[-3]
    dev = chart.device
    nn_ = num * b
    bidx = torch.arange(b, device=dev).repeat(num)  # sample-major
    lens = lengths[bidx]
    rows = torch.arange(nn_, device=dev)

    def pick(logits):
        if sample:
            logits = logits + gumbel_noise(logits.shape, generator, logits.dtype, logits.device)
        return logits.argmax(-1)

    top = chart[bidx, 0, lens] + root_logp[bidx]
    root_sym = pick(top)
    stack = torch.zeros(nn_, n + 1, 3, dtype=torch.long, device=dev)
    stack[:, 0, 0] = 0
    stack[:, 0, 1] = lens
    stack[:, 0, 2] = root_sym
    # an impossible sentence (no tree has a finite score) starts with an empty stack: its
    # output stays the all -1 "no tree" sentinel
    sp = torch.isfinite(top.amax(-1)).long()
    out = torch.full((nn_, 2 * n - 1, 3), -1, dtype=torch.long, device=dev)
    ks = torch.arange(1, max(n, 2), device=dev)  # candidate split offsets 1..n-1
    batched = log_rules.dim() == 4
    for step in range(2 * n - 1):
        active = sp > 0
        if not bool(active.any()):
            break
        top_idx = (sp - 1).clamp_min(0)
        node = stack[rows, top_idx]  # (N, 3)
        i, w, a = node[:, 0], node[:, 1], node[:, 2]
        sp = sp - active.long()
        out[:, step] = torch.where(active.unsqueeze(-1),
                                   torch.stack([i, i + w, a], -1), out[:, step])
        expand = active & (w >= 2)
        if not bool(expand.any()):
            continue
        ex = expand.nonzero().squeeze(-1)
        kk = []
        for c0 in range(0, ex.numel(), max(1, max_chunk_elements // max(1, n * s * s))):
            e = ex[c0 : c0 + max(1, max_chunk_elements // max(1, n * s * s))]
            ie, we, ae, be = i[e], w[e], a[e].clamp(0, m - 1), bidx[e]
            li = ie.unsqueeze(-1).expand(-1, ks.numel())
            left = chart[be.unsqueeze(-1), li, ks]  # (E, n-1, S)
            ri = (ie.unsqueeze(-1) + ks).clamp(max=n - 1)
            rw = (we.unsqueeze(-1) - ks).clamp(min=0)
            right = chart[be.unsqueeze(-1), ri, rw]
            ok = (ks < we.unsqueeze(-1)).unsqueeze(-1)
            left = torch.where(ok, left, torch.full_like(left, NEG_INF))
            rl = log_rules[be, ae] if batched else log_rules[ae]  # (E, S, S)
            logits = rl.unsqueeze(1) + left.unsqueeze(-1) + right.unsqueeze(-2)
            kk.append(pick(logits.flatten(1)))
        choice = torch.cat(kk)
        k = choice // (s * s) + 1
        bsym = (choice // s) % s
        csym = choice % s
        ie, we = i[ex], w[ex]
        spe = sp[ex]
        stack[ex, spe] = torch.stack([ie + k, we - k, csym], -1)
        stack[ex, spe + 1] = torch.stack([ie, k, bsym], -1)
        sp[ex] = spe + 2
    return out.view(num, b, 2 * n - 1, 3)


def tree_parts(trees: torch.Tensor):
    """Per node of pre-order trees (..., 2n-1, 3): ``(valid, internal, left, right)`` where
    ``left``/``right`` index the children rows (the left child follows its parent; the right
    child follows the left subtree, which has ``2 * width - 1`` nodes)."""
    start, end = trees[..., 0], trees[..., 1]
    valid = start >= 0
    width = torch.where(valid, end - start, torch.zeros_like(start))
    nrows = trees.shape[-2]
    idx = torch.arange(nrows, device=trees.device).expand_as(start)
    internal = valid & (width >= 2)
    left = (idx + 1).clamp(max=nrows - 1)
    lw = width.gather(-1, left)
    right = (idx + 2 * lw).clamp(max=nrows - 1)
    return valid, internal, left, right


def mbr_spans(span_marg: torch.Tensor, lengths: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Minimum-Bayes-risk bracketing: the binary tree maximizing the summed span marginals
    (B, n, n) [first word, last word] of its spans; returns the spans (start, end_exclusive) of
    each tree in pre-order.  O(n^3) by width, vectorized over starts."""
    b, n, _ = span_marg.shape
    sc = span_marg.new_full((b, n, n + 1), NEG_INF)
    arg = torch.zeros(b, n, n + 1, dtype=torch.long)
    starts = torch.arange(n, device=span_marg.device)
    sc[:, :, 1] = span_marg[:, starts, starts]
    for w in range(2, n + 1):
        nw = n - w + 1
        ii = torch.arange(nw, device=span_marg.device)
        cand = torch.stack([sc[:, :nw, k] + sc[:, k : k + nw, w - k] for k in range(1, w)], -1)
        best, bk = cand.max(-1)
        sc[:, :nw, w] = best + span_marg[:, ii, ii + w - 1]
        arg[:, :nw, w] = (bk + 1).cpu()
    out = []
    for bi in range(b):
        spans, todo = [], [(0, int(lengths[bi]))]
        while todo:
            i, w = todo.pop()
            spans.append((i, i + w))
            if w >= 2:
                k = int(arg[bi, i, w])
                todo.append((i + k, w - k))
                todo.append((i, k))
        out.append(spans)
    return out
