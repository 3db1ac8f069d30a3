"""The CP (TN-PCFG) and rank-space inside pass with a hand-written outside (backward) pass.

Rules ``T[A, B, C] = sum_r H[A, r] L[B, r] R[C, r]`` (Yang, Zhao & Tu 2021).  Every span keeps
its left and right projections ``lproj[r] = sum_B inside[B] L[B, r]`` and
``rproj[r] = sum_C inside[C] R[C, r]``; a span's rank vector is

    s[i, w, r] = sum_{k=1}^{w-1} lproj[i, k, r] rproj[i+w, w-k, r]      (O(n R) per span)

and the projections of the span follow from s by GEMMs: CP forms ``y = H s`` (m symbols, with
an optional per-label potential) and ``x = y [L_N | R_N]``; rank space (Yang, Liu & Tu 2022)
maps s straight to ``x = s [H^T L_N | H^T R_N]`` (R x 2R).  ``log Z = log (y_top . rho)`` with
rho the root weights (CP: root over nonterminals; rank space: ``root_N^T H``).

Scaled probability space: each chart entry (a span's left or right projection) is divided by
its max and its log-scale is kept beside it; a span's split sum is then one elementwise
product of children and one weighted sum over the splits (weights ``exp(scale_k - max_k)``
<= 1), and its projections one GEMM.  Layout: left charts indexed (start, width), right
charts (end, n + 1 - width), so the children of all spans of width w are the strided slices
``[:, :nw, 1:w]`` and ``[:, w:, n+2-w:]`` (no flip, no copy).  The outside pass walks the
widths backwards, reuses the forward's split weights, adds each span's gradient into the
same slices in place (nothing is zero-filled or copied per width) and forms the gradients of
the projection matrices in one GEMM at the end.  A second-order backward (``create_graph``)
recomputes the pass under autograd (the hand-written backward is not itself differentiable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

NEG_INF = -math.inf


def _shift(x: torch.Tensor) -> torch.Tensor:
    """The detached max over the last dim (kept), 0 where it is not finite."""
    m = x.detach().amax(-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _log_pos(x: torch.Tensor) -> torch.Tensor:
    """``log x`` for ``x >= 0`` (``-inf`` at 0, no NaN gradient)."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).log(), NEG_INF)


@dataclass
class Trace:
    """What the outside pass needs from the inside pass: the charts and, per width w, the
    children slices, split weights, rank vectors and projection maxima."""

    lp: torch.Tensor  # (B, n, n+1, R) left projections, (start, width)
    rp: torch.Tensor  # (B, n+1, n+1, R) right projections, (end, n+1-width)
    left: dict = field(default_factory=dict)  # w -> (B, nw, w-1, R) views of lp
    right: dict = field(default_factory=dict)  # w -> views of rp
    wts: dict = field(default_factory=dict)  # w -> (B, nw, w-1) split weights
    s: dict = field(default_factory=dict)  # w -> (B, nw, R) rank vectors
    xmax: dict = field(default_factory=dict)  # w -> (B, nw, 2, 1) clamped projection maxima


def _project(s, span, label, h_t):
    """The vector a span feeds to its projections (rank space: s; CP: ``H s`` times the label
    potential) and the log-scale that it adds: s (B, X, R), span (B, X), label (B, X, m)."""
    add = span
    if h_t is None:
        return s, add
    y = s @ h_t
    if label is not None:
        ml = _shift(label)
        y = y * (label - ml).exp()
        add = ml.squeeze(-1) if add is None else add + ml.squeeze(-1)
    return y, add


def _at(pot: torch.Tensor | None, nw: int, w: int) -> torch.Tensor | None:
    return None if pot is None else pot[:, :nw, w]


def _top(s_top, lengths, span_pot, label_pot, h_t):
    """The top span's vector y and its extra log-scale, from its rank vector s_top (B, R)."""
    b = s_top.shape[0]
    bidx = torch.arange(b, device=lengths.device)
    span = None if span_pot is None else span_pot[bidx, 0, lengths].unsqueeze(1)
    label = None if label_pot is None else label_pot[bidx, 0, lengths].unsqueeze(1)
    y, add = _project(s_top.unsqueeze(1), span, label, h_t)
    return y.squeeze(1), (0.0 if add is None else add.squeeze(1))


def forward_pass(
    lproj1: torch.Tensor,
    rproj1: torch.Tensor,
    h_t: torch.Tensor | None,
    mx: torch.Tensor,
    root: torch.Tensor,
    span_pot: torch.Tensor | None,
    label_pot: torch.Tensor | None,
    lengths: torch.Tensor,
    keep: bool = False,
    track: bool = False,
    chart_out: bool = False,
):
    """``(log Z, trace, chart)``: log Z over nonterminal roots (B,) (``-inf`` for one-word
    sentences), the :class:`Trace` for the outside pass (``keep``; else None) and, with
    ``chart_out`` (CP only), the log inside chart (B, n, n+1, m) indexed by (start, width).

    lproj1, rproj1 (B, n, R): log projections of the words; h_t: ``H^T`` (R, m) or None
    (rank space); mx (K, 2R): ``[L_N | R_N]`` (CP) or ``[H^T L_N | H^T R_N]`` (rank space),
    probability space, possibly batched (B, ., .); root (B, K) log weights; span_pot
    (B, n, n+1) and label_pot (B, n, n+1, m) optional log-potentials; ``track``: safe for
    autograd (slices are copied before the charts are written again)."""
    b, n, r = lproj1.shape
    fi = torch.finfo(lproj1.dtype)
    new = lproj1.new_zeros if track else lproj1.new_empty  # only written entries are read
    lp, rp = new(b, n, n + 1, r), new(b, n + 1, n + 1, r)
    lc, rc = new(b, n, n + 1), new(b, n + 1, n + 1)  # log-scales
    for x, p, c in ((lproj1, lp[:, :, 1], lc[:, :, 1]), (rproj1, rp[:, 1:, n], rc[:, 1:, n])):
        top = x.detach().amax(-1, keepdim=True).clamp_min(fi.min)
        p.copy_((x - top).exp())
        c.copy_(top.squeeze(-1))
    trace = Trace(lp, rp) if keep else None
    len_set = set(lengths.tolist())
    top_s, top_c = lproj1.new_zeros(b, n + 1, r), lproj1.new_full((b, n + 1), NEG_INF)
    chart = lproj1.new_full((b, n, n + 1, h_t.shape[-1]), NEG_INF) if chart_out else None
    for w in range(2, n + 1):
        nw = n - w + 1
        left, right = lp[:, :nw, 1:w], rp[:, w:, n + 2 - w :]
        if track:  # autograd must not see the later in-place writes into the charts
            left, right = left.clone(), right.clone()
        scales = lc[:, :nw, 1:w] + rc[:, w:, n + 2 - w :]
        big = scales.detach().amax(-1, keepdim=True).clamp_min(fi.min)  # (B, nw, 1)
        wts = (scales - big).exp()
        s = (wts.unsqueeze(-2) @ (left * right)).squeeze(-2)  # (B, nw, R) at scale big
        if w in len_set:
            top_s[:, w], top_c[:, w] = s[:, 0], big[:, 0, 0]
        y, add = _project(s, _at(span_pot, nw, w), _at(label_pot, nw, w), h_t)
        cy = big if add is None else big + add.unsqueeze(-1)  # (B, nw, 1)
        if chart is not None:
            chart[:, :nw, w] = _log_pos(y) + cy
        x = (y @ mx).view(b, nw, 2, r)
        xraw = x.detach().amax(-1, keepdim=True)
        xs = cy.unsqueeze(-1) + xraw.log()  # (B, nw, 2, 1); -inf for a zero projection
        xmax = xraw.clamp_min(fi.tiny)
        x = x / xmax
        lp[:, :nw, w], rp[:, w:, n + 1 - w] = x[:, :, 0], x[:, :, 1]
        lc[:, :nw, w], rc[:, w:, n + 1 - w] = xs[:, :, 0, 0], xs[:, :, 1, 0]
        if keep:
            trace.left[w], trace.right[w], trace.wts[w] = left, right, wts
            trace.s[w], trace.xmax[w] = s, xmax
    bidx = torch.arange(b, device=lengths.device)
    y_top, add = _top(top_s[bidx, lengths], lengths, span_pot, label_pot, h_t)
    mr = _shift(root)
    dot = _log_pos((y_top * (root - mr).exp()).sum(-1))
    # an impossible sentence is -inf with zero gradient (also to the potentials in the scale)
    ok = (lengths >= 2) & torch.isfinite(dot)
    logz = torch.where(ok, top_c[bidx, lengths] + add + dot + mr.squeeze(-1), NEG_INF)
    return logz, trace, chart


def outside_pass(inputs, lengths: torch.Tensor, trace: Trace, grad: torch.Tensor):
    """Gradients of ``sum_b grad[b] log Z[b]`` with respect to the inputs of
    :func:`forward_pass` (None for absent inputs), by walking the widths backwards."""
    lproj1, rproj1, h_t, mx, root, span_pot, label_pot = inputs
    b, n, r = lproj1.shape
    g_ht = None if h_t is None else torch.zeros_like(h_t)
    g_span = None if span_pot is None else torch.zeros_like(span_pot)
    g_label = None if label_pot is None else torch.zeros_like(label_pot)
    if n < 2:
        zero = torch.zeros_like(lproj1)
        return (zero, zero.clone(), g_ht, torch.zeros_like(mx), torch.zeros_like(root), g_span,
                g_label)
    lp, rp = trace.lp, trace.rp
    gl, gr = torch.zeros_like(lp), torch.zeros_like(rp)  # gradients at the charts' scales
    # top: log Z = c + log(y . rho)  ->  d/dy (at y's scale) = grad rho / (y . rho)
    top_w = lengths.clamp(2, n)
    s_top = torch.stack([trace.s[int(w)][i, 0] for i, w in enumerate(top_w.tolist())])
    y_top, _ = _top(s_top, top_w, None, label_pot, h_t)
    rho = (root - _shift(root)).exp()
    dot = (y_top * rho).sum(-1)
    ok = (lengths >= 2) & (dot > 0)
    coef = torch.where(ok, grad / torch.where(ok, dot, torch.ones_like(dot)), 0.0)
    g_root = coef.unsqueeze(-1) * y_top * rho
    gy_top = coef.unsqueeze(-1) * rho  # (B, K)
    len_set = set(lengths.tolist())
    mxt = mx.transpose(-1, -2)
    ys, gxs, gys = [], [], []
    for w in range(n, 1, -1):
        nw = n - w + 1
        s = trace.s[w]
        # a zero projection (max clamped to tiny) never received a gradient: stays 0
        gx = torch.stack([gl[:, :nw, w], gr[:, w:, n + 1 - w]], 2).div_(trace.xmax[w])
        gx = gx.view(b, nw, 2 * r)
        gy = gx @ mxt  # (B, nw, K)
        if w in len_set:
            gy[:, 0] += (lengths == w).to(gy.dtype).unsqueeze(-1) * gy_top
        label = _at(label_pot, nw, w)
        y, _ = _project(s, None, label, h_t)
        ys.append(y)
        gxs.append(gx)
        if h_t is None:
            gs = gy
        else:
            if label is not None:
                g_label[:, :nw, w] = y * gy
                gy = gy * (label - _shift(label)).exp()
            gys.append(gy)
            gs = gy @ h_t.transpose(-1, -2)
        if g_span is not None:
            g_span[:, :nw, w] = (s * gs).sum(-1)
        t = gs.unsqueeze(2) * trace.wts[w].unsqueeze(-1)  # (B, nw, w-1, R)
        gl[:, :nw, 1:w].addcmul_(t, trace.right[w])
        gr[:, w:, n + 2 - w :].addcmul_(t, trace.left[w])
    g_mx = _outer_sum(ys, gxs, mx.dim())
    if h_t is not None:
        g_ht = _outer_sum([trace.s[w] for w in range(n, 1, -1)], gys, h_t.dim())
    g_l1 = lp[:, :, 1] * gl[:, :, 1]
    g_r1 = rp[:, 1:, n] * gr[:, 1:, n]
    return g_l1, g_r1, g_ht, g_mx, g_root, g_span, g_label


def _outer_sum(a: list[torch.Tensor], g: list[torch.Tensor], ndim: int) -> torch.Tensor:
    """``sum_{b, i} a[b, i]^T g[b, i]`` over lists of (B, nw, K) and (B, nw, J) tensors, one
    GEMM: (K, J), or per example (B, K, J) when ndim == 3."""
    a, g = torch.cat(a, 1), torch.cat(g, 1)
    if ndim == 3:
        return a.transpose(-1, -2) @ g
    return a.reshape(-1, a.shape[-1]).transpose(0, 1) @ g.reshape(-1, g.shape[-1])


class SplitInside(torch.autograd.Function):
    """``log Z`` over nonterminal roots by :func:`forward_pass`, with :func:`outside_pass` as
    its backward; a backward under ``create_graph`` recomputes the pass with autograd."""

    @staticmethod
    def forward(ctx, lproj1, rproj1, h_t, mx, root, span_pot, label_pot, lengths):
        inputs = (lproj1, rproj1, h_t, mx, root, span_pot, label_pot)
        keep = any(t is not None and t.requires_grad for t in inputs)
        logz, trace, _ = forward_pass(*inputs, lengths, keep=keep)
        if keep:
            ctx.save_for_backward(*[t if t is not None else torch.empty(0) for t in inputs],
                                  lengths)
            ctx.absent = [t is None for t in inputs]
            ctx.trace = trace  # intermediates only (no input or output): safe on ctx
        return logz

    @staticmethod
    def backward(ctx, grad):
        saved = list(ctx.saved_tensors)
        inputs = [None if gone else t for t, gone in zip(saved[:7], ctx.absent, strict=True)]
        lengths = saved[7]
        if torch.is_grad_enabled():  # create_graph: differentiate a tracked recomputation
            return (*_tracked_grads(inputs, lengths, grad), None)
        grads = outside_pass(inputs, lengths, ctx.trace, grad)
        return (*[g if ctx.needs_input_grad[i] else None for i, g in enumerate(grads)], None)


def _tracked_grads(inputs, lengths, grad):
    """Gradients with a graph (for a second-order backward): the saved inputs carry their
    history, so the pass is recomputed under autograd from them and differentiated."""
    with torch.enable_grad():
        logz, _, _ = forward_pass(*inputs, lengths, track=True)
        want = [t for t in inputs if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad(logz, want, grad, create_graph=True, allow_unused=True))
    out = []
    for t in inputs:
        g = next(got) if t is not None and t.requires_grad else None
        out.append(torch.zeros_like(t) if t is not None and t.requires_grad and g is None else g)
    return out


__all__ = ["SplitInside", "Trace", "forward_pass", "outside_pass"]
