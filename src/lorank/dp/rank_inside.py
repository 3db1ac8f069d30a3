"""The CP (TN-PCFG) and rank-space inside pass with a hand-written outside (backward) pass.

Rules ``T[A, B, C] = sum_r H[A, r] L[B, r] R[C, r]`` (Yang, Zhao & Tu 2021).  Every span keeps
its left and right projections ``lproj[r] = sum_B inside[B] L[B, r]`` and
``rproj[r] = sum_C inside[C] R[C, r]``; a span's rank vector is

    s[i, w, r] = sum_{k=1}^{w-1} lproj[i, k, r] rproj[i+w, w-k, r]      (O(n R) per span)

and the projections of the span follow from s by GEMMs: CP forms ``y = H s`` (m symbols, with
an optional per-label potential) and ``x = y [L_N | R_N]``; rank space (Yang, Liu & Tu 2022)
maps s straight to ``x = s [H^T L_N | H^T R_N]`` (R x 2R).  ``log Z = log (y_top . rho)`` with
rho the root weights (CP: root over nonterminals; rank space: ``root_N^T H``).

Charts live in scaled probability space: each span's vectors are divided by their max and a
log-scale is kept per span, so the split sum is one elementwise product and a weighted sum
over splits, and the projections are GEMMs.  Layout: left charts indexed (start, width),
right charts (end, n + 1 - width), so the children of all spans of width w are the strided
slices ``[:, :nw, 1:w]`` and ``[:, w:, n+2-w:]`` (no flip, no copy).  The outside pass walks
the widths backwards and adds each span's gradient into the same slices in place, so autograd
never zero-fills or copies a chart per width.  A second-order backward (``create_graph``)
recomputes the pass under autograd (the hand-written backward is not itself differentiable).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

NEG_INF = -math.inf


def _shift(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The detached max over ``dim`` (kept), 0 where it is not finite."""
    m = x.detach().amax(dim, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _log_pos(x: torch.Tensor) -> torch.Tensor:
    """``log x`` for ``x >= 0`` (``-inf`` at 0, no NaN gradient)."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).log(), NEG_INF)


def _normalized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled probabilities ``(exp(x - c), c)`` of log vectors x (..., R); c (...) is the
    detached max (``-inf`` when all of x is)."""
    c = _shift(x)
    p = (x - c).exp()
    dead = torch.isneginf(x.detach()).all(-1, keepdim=True)
    return p, torch.where(dead, NEG_INF, c).squeeze(-1)


def _max_normalized(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x / max(x)`` and ``scale + log max(x)`` for nonnegative x (..., R), scale (...);
    a zero vector stays zero with scale ``-inf``."""
    mx = x.detach().amax(-1, keepdim=True)
    safe = torch.where(mx > 0, mx, torch.ones_like(mx))
    return x / safe, scale + _log_pos(mx).squeeze(-1)


def _exp_scale(to: torch.Tensor, frm: torch.Tensor) -> torch.Tensor:
    """``exp(to - frm)`` (...,) -> (..., 1), 0 where ``frm`` is ``-inf`` (a zero vector)."""
    ok = torch.isfinite(frm)
    return torch.where(ok, (to - torch.where(ok, frm, torch.zeros_like(frm))).exp(),
                       torch.zeros_like(frm)).unsqueeze(-1)


class Charts(NamedTuple):
    """Scaled charts of one pass (values max-normalized per span, log-scales beside)."""

    lp: torch.Tensor  # (B, n, n+1, R) left projections, (start, width)
    lc: torch.Tensor  # (B, n, n+1) their log-scales
    rp: torch.Tensor  # (B, n+1, n+1, R) right projections, (end, n+1-width)
    rc: torch.Tensor  # (B, n+1, n+1)
    ps: torch.Tensor | None  # (B, n, n+1, R) rank vectors s (kept for the backward pass)
    sc: torch.Tensor | None  # (B, n, n+1) their log-scales, without the span potential


def _project(s, sc, w, nw, h_t, label_pot, span_pot):
    """``(y, cy)``: the span's vector fed to the projections (rank space: s; CP: H s times
    the label potential) and its log-scale (B, nw)."""
    cy = sc if span_pot is None else sc + span_pot[:, :nw, w]
    if h_t is None:
        return s, cy
    y = s @ h_t
    if label_pot is not None:
        lab = label_pot[:, :nw, w]
        ml = _shift(lab)
        y = y * (lab - ml).exp()
        cy = cy + ml.squeeze(-1)
    return y, cy


def _children(charts: Charts, w: int, nw: int, n: int, track: bool):
    """The split operands of all spans of width w: left / right children (B, nw, w-1, R)
    and their summed log-scales (B, nw, w-1)."""
    left = charts.lp[:, :nw, 1:w]
    right = charts.rp[:, w:, n + 2 - w :]
    scales = charts.lc[:, :nw, 1:w] + charts.rc[:, w:, n + 2 - w :]
    if track:  # autograd must not see later in-place writes into the charts
        left, right, scales = left.clone(), right.clone(), scales.clone()
    return left, right, scales


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
    """``log Z`` over nonterminal roots (B,) (``-inf`` for one-word sentences), the charts
    (``keep``: with the rank vectors, for the backward pass) and, with ``chart_out`` (CP
    only), the log inside chart (B, n, n+1, m) indexed by (start, width).

    lproj1, rproj1 (B, n, R): log projections of the words; h_t: ``H^T`` (R, m) or None
    (rank space); mx (K, 2R): ``[L_N | R_N]`` (CP) or ``[H^T L_N | H^T R_N]`` (rank space),
    probability space, possibly batched (B, ., .); root (B, K) log weights; span_pot
    (B, n, n+1) and label_pot (B, n, n+1, m) optional log-potentials; ``track``: safe for
    autograd (slices are copied before the charts are written again)."""
    b, n, r = lproj1.shape
    lp = lproj1.new_zeros(b, n, n + 1, r)
    lc = lproj1.new_full((b, n, n + 1), NEG_INF)
    rp = lproj1.new_zeros(b, n + 1, n + 1, r)
    rc = lproj1.new_full((b, n + 1, n + 1), NEG_INF)
    p1, c1 = _normalized(lproj1)
    lp[:, :, 1], lc[:, :, 1] = p1, c1
    p1, c1 = _normalized(rproj1)
    rp[:, 1:, n], rc[:, 1:, n] = p1, c1
    ps = lproj1.new_zeros(b, n, n + 1, r) if keep else None
    sc = lproj1.new_full((b, n, n + 1), NEG_INF) if keep else None
    charts = Charts(lp, lc, rp, rc, ps, sc)
    k_dim = root.shape[-1]
    top_y = lproj1.new_zeros(b, n + 1, k_dim)
    top_c = lproj1.new_full((b, n + 1), NEG_INF)
    chart = None
    if chart_out:
        chart = lproj1.new_full((b, n, n + 1, h_t.shape[-1]), NEG_INF)
    for w in range(2, n + 1):
        nw = n - w + 1
        left, right, scales = _children(charts, w, nw, n, track)
        big = _shift(scales)  # (B, nw, 1)
        wts = (scales - big).exp()
        s = (wts.unsqueeze(-2) @ (left * right)).squeeze(-2)  # (B, nw, R)
        s, s_scale = _max_normalized(s, big.squeeze(-1))
        if keep:
            ps[:, :nw, w], sc[:, :nw, w] = s, s_scale
        y, cy = _project(s, s_scale, w, nw, h_t, label_pot, span_pot)
        if chart is not None:
            chart[:, :nw, w] = _log_pos(y) + cy.unsqueeze(-1)
        top_y[:, w], top_c[:, w] = y[:, 0], cy[:, 0]
        x = y @ mx  # (B, nw, 2R)
        xl, cl = _max_normalized(x[..., :r], cy)
        xr, cr = _max_normalized(x[..., r:], cy)
        lp[:, :nw, w], lc[:, :nw, w] = xl, cl
        rp[:, w:, n + 1 - w], rc[:, w:, n + 1 - w] = xr, cr
    bidx = torch.arange(b, device=lengths.device)
    y_top, c_top = top_y[bidx, lengths], top_c[bidx, lengths]
    mr = _shift(root)
    dot = (y_top * (root - mr).exp()).sum(-1)
    logz = c_top + _log_pos(dot) + mr.squeeze(-1)
    logz = torch.where(lengths >= 2, logz, torch.full_like(logz, NEG_INF))
    return logz, charts, chart


def outside_pass(saved, grad: torch.Tensor):
    """Gradients of ``sum_b grad[b] log Z[b]`` with respect to the inputs of
    :func:`forward_pass` (None for absent inputs), by walking the widths backwards."""
    lproj1, rproj1, h_t, mx, root, span_pot, label_pot, lengths, charts = saved
    lp, lc, rp, rc, ps, sc = charts
    b, n, r = lproj1.shape
    gl, gr = torch.zeros_like(lp), torch.zeros_like(rp)  # gradients at the charts' scales
    g_mx = torch.zeros_like(mx)
    g_ht = None if h_t is None else torch.zeros_like(h_t)
    g_span = None if span_pot is None else torch.zeros_like(span_pot)
    g_label = None if label_pot is None else torch.zeros_like(label_pot)
    # top: log Z = c + log(y . rho)  ->  d/dy (at y's scale) = grad rho / (y . rho)
    bidx = torch.arange(b, device=lengths.device)
    top_w = lengths.clamp(min=2, max=n) if n >= 2 else lengths
    mr = _shift(root)
    rho = (root - mr).exp()
    y_top = None
    if n >= 2:
        s_top, c_top = ps[bidx, 0, top_w], sc[bidx, 0, top_w]
        y_top, _ = _project(s_top.unsqueeze(1), c_top.unsqueeze(1), 0, 1, h_t, None, None)
        y_top = y_top.squeeze(1)
        if label_pot is not None:
            lab = label_pot[bidx, 0, top_w]
            y_top = y_top * (lab - _shift(lab)).exp()
    if y_top is None:
        g_root = torch.zeros_like(root)
        coef_top = root.new_zeros(b, 1)
    else:
        dot = (y_top * rho).sum(-1)
        ok = (lengths >= 2) & (dot > 0)
        coef_top = torch.where(ok, grad / torch.where(ok, dot, torch.ones_like(dot)),
                               torch.zeros_like(dot)).unsqueeze(-1)
        g_root = coef_top * y_top * rho
    gy_top = coef_top * rho  # (B, K)
    mxt = mx.transpose(-1, -2)
    for w in range(n, 1, -1):
        nw = n - w + 1
        s, s_scale = ps[:, :nw, w], sc[:, :nw, w]
        y, cy = _project(s, s_scale, w, nw, h_t, label_pot, span_pot)
        gx = torch.cat([gl[:, :nw, w] * _exp_scale(cy, lc[:, :nw, w]),
                        gr[:, w:, n + 1 - w] * _exp_scale(cy, rc[:, w:, n + 1 - w])], -1)
        gy = gx @ mxt  # (B, nw, K)
        gy[:, 0] += (lengths == w).to(gy.dtype).unsqueeze(-1) * gy_top
        g_mx += _outer_sum(y, gx, mx.dim())
        if h_t is None:
            gs = gy
        else:
            if label_pot is not None:
                g_label[:, :nw, w] = y * gy
                lab = label_pot[:, :nw, w]
                gy = gy * (lab - _shift(lab)).exp()
            gs = gy @ h_t.transpose(-1, -2)
            g_ht += _outer_sum(s, gy, h_t.dim())
        if g_span is not None:
            g_span[:, :nw, w] = (s * gs).sum(-1)
        left, right, scales = _children(charts, w, nw, n, False)
        t = gs.unsqueeze(2) * _exp_scale(scales, s_scale.unsqueeze(-1))
        gl[:, :nw, 1:w].addcmul_(t, right)
        gr[:, w:, n + 2 - w :].addcmul_(t, left)
    g_l1 = lp[:, :, 1] * gl[:, :, 1]
    g_r1 = rp[:, 1:, n] * gr[:, 1:, n]
    return g_l1, g_r1, g_ht, g_mx, g_root, g_span, g_label


def _outer_sum(a: torch.Tensor, g: torch.Tensor, ndim: int) -> torch.Tensor:
    """``sum_{b, i} a[b, i]^T g[b, i]`` -> (K, J), or per example (B, K, J) when ndim == 3."""
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
        logz, charts, _ = forward_pass(lproj1, rproj1, h_t, mx, root, span_pot, label_pot,
                                       lengths, keep=keep)
        if keep:
            ctx.save_for_backward(*[t if t is not None else torch.empty(0) for t in inputs],
                                  lengths, *charts)
            ctx.absent = [t is None for t in inputs]
        return logz

    @staticmethod
    def backward(ctx, grad):
        saved = list(ctx.saved_tensors)
        inputs = [None if gone else t for t, gone in zip(saved[:7], ctx.absent, strict=True)]
        lengths, charts = saved[7], Charts(*saved[8:])
        if torch.is_grad_enabled():  # create_graph: differentiate a tracked recomputation
            return (*_tracked_grads(inputs, lengths, grad), None)
        grads = outside_pass((*inputs, lengths, charts), grad)
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


__all__ = ["SplitInside", "forward_pass", "outside_pass"]
