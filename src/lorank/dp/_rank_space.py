"""The forward algorithm of a low-rank HMM in rank space, with a hand-written backward.

With ``P = A C^T`` (A row-stochastic, C column-stochastic, both Z x R), summing out each
state ``z_t`` leaves a chain over R rank states with the step-t matrix
``M_t = C^T diag(e_t) A`` (Yang, Liu & Tu, NAACL 2022).  Every ``M_t`` comes from one GEMM
over all tokens, ``M = E @ K`` with E (T B, Z) the scaled emissions and ``K = C (x) A``
(Z, R^2) the row-wise Khatri-Rao product; the recursion ``m_{t+1} = m_t M_t / c_t`` is then
O(R^2) per step.  The backward pass runs the same recursion backwards (O(R^2) per step),
forms ``dL/dM_t = m_t^T g_t`` for all steps at once and returns to the emissions and to
K (hence A and C) with one GEMM each.  Time is processed in chunks of at most
``max_chunk_elements`` entries of M; with several chunks the backward recomputes M.
"""

from __future__ import annotations

import torch

from lorank._gemm import mm
from lorank.dp._scaled_chain import (
    _weight_grad,
    all_finite,
    exp_emission,
    plain_log_forward,
    underflow_threshold,
    workspace,
)


def khatri_rao(c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``K[j, r R + s] = c[j, r] a[j, s]``: (*batch, Z, R^2) from c, a (*batch, Z, R)."""
    z, r = a.shape[-2], a.shape[-1]
    return (c.unsqueeze(-1) * a.unsqueeze(-2)).reshape(*a.shape[:-2], z, r * r)


def _chunks(t_len: int, b: int, r: int, max_elements: int) -> list[tuple[int, int]]:
    """Time chunks [t0, t1) covering steps 1 .. T-1, each with at most ``max_elements``
    entries of M (at least one step)."""
    step = max(1, max_elements // max(1, b * r * r))
    return [(t0, min(t0 + step, t_len)) for t0 in range(1, t_len, step)]


def _build(e: torch.Tensor, kr: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
    """``M_t`` for t in [t0, t1): (t1 - t0, B, R^2), one GEMM (per example if batched)."""
    x = e[t0:t1]
    if kr.dim() == 2:
        return mm(x.reshape(-1, x.shape[-1]), kr).reshape(x.shape[0], x.shape[1], -1)
    return (x.transpose(0, 1) @ kr).transpose(0, 1)


def forward(pi, emission, k, pad, a, ct, max_elements: int, save: bool):
    """``(log p(x) (B,), saved)``; ``saved`` (with ``save``) is ``(e, kr, msgs, scales, M)``
    (M None if it took several chunks), or None if a scale underflowed (also: an impossible
    sequence), then ``log p(x)`` is None too."""
    b, t_len, z = emission.shape
    if save:
        e = exp_emission(emission.detach(), k, pad)
        return _forward(pi, e, k, a, ct, max_elements, True)
    with workspace("emission", (t_len, b, z), emission) as buf:
        e = exp_emission(emission.detach(), k, pad, out=buf)
        return _forward(pi, e, k, a, ct, max_elements, False)


def _forward(pi, e, k, a, ct, max_elements: int, save: bool):
    t_len, b, z = e.shape
    r = a.shape[-1]
    scales = e.new_empty(t_len, b, 1)
    msgs = e.new_empty(t_len, b, r) if save else None
    ah = pi * e[0]
    torch.sum(ah, -1, keepdim=True, out=scales[0])
    kr = m_all = None
    if t_len > 1:
        m = mm(ah.div_(scales[0]), a)  # 0 / 0 for an impossible first step: caught below
        kr = khatri_rao(ct.transpose(-1, -2), a)
        chunks = _chunks(t_len, b, r, max_elements)
        for t0, t1 in chunks:
            mc = _build(e, kr, t0, t1)
            if save and len(chunks) == 1:
                m_all = mc
            for s in range(t1 - t0):
                t = t0 + s
                if save:
                    msgs[t] = m
                m = torch.bmm(m.unsqueeze(1), mc[s].view(b, r, r)).squeeze(1)
                torch.sum(m, -1, keepdim=True, out=scales[t])
                m.div_(scales[t])
    scales = scales.squeeze(-1)
    if scales.numel() and not scales.min().item() >= underflow_threshold(e.dtype):  # NaN too
        return None, None
    log_z = scales.log().sum(0) + k.sum(1)
    return log_z, ((e, kr, msgs, scales, m_all) if save else None)


def _rows_mm(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x @ m`` for x (T, B, k) and m (k, n) or per example (B, k, n): (T, B, n)."""
    if m.dim() == 2:
        return mm(x.reshape(-1, x.shape[-1]), m).view(*x.shape[:-1], m.shape[-1])
    return (x.transpose(0, 1) @ m).transpose(0, 1)


def backward(gz, pi, a, ct, saved, pad, max_elements: int, need):
    """``(grad_pi, grad_emission (B, T, Z), grad_a, grad_ct, finite)`` (None where not
    needed); ``finite`` is False if the backward messages left the float range (a non-finite
    message reaches the first step's).

    ``dL/dM_t = m_t^T g_t`` is rank one, so nothing of size R^2 per token is formed: with
    ``u_t = m_t C^T`` and ``v_t = g_t A^T`` (two GEMMs over all tokens), ``dL/de_t = u_t v_t``,
    ``dL/dA = sum_t (e_t u_t)^T g_t`` and ``dL/dC = sum_t (e_t v_t)^T m_t``: O(Z R) per
    token, like the state-space backward.  The recursion ``b_t = M_t g_t`` uses the saved
    M (O(R^2) per step), or ``C^T (e_t * (A g_t))`` (O(Z R)) when M was built in chunks."""
    e, kr, msgs, scales, m_all = saved
    t_len, b, z = e.shape
    r = a.shape[-1]
    need_pi, need_em, need_a, need_ct = need
    pos = scales > 0
    inv = torch.where(pos, 1.0 / torch.where(pos, scales, 1.0), 0.0)
    at = a.transpose(-1, -2)
    c = ct.transpose(-1, -2)
    grad_a = grad_ct = None
    ge = e.new_zeros(t_len, b, z) if need_em else None
    if t_len > 1:
        gs_all = e.new_empty(t_len, b, r)
        gs_all[t_len - 1] = (gz * inv[t_len - 1]).unsqueeze(-1)
        for t in range(t_len - 1, 0, -1):
            gs = gs_all[t]
            if m_all is not None:  # dL/dm_t = M_t g_t
                bt = torch.bmm(m_all[t - 1].view(b, r, r), gs.unsqueeze(-1)).squeeze(-1)
            else:
                v = mm(gs, at).mul_(e[t])
                bt = mm(v, c)
            if t > 1:
                gs_all[t - 1] = bt.mul_(inv[t - 1].unsqueeze(-1))
        b1 = bt
        g0 = mm(b1, at).mul_(inv[0].unsqueeze(-1))  # m_1 = (pi * e_0 / c_0) @ A
        ms, gs1, e1 = msgs[1:], gs_all[1:], e[1:]
        eu = _rows_mm(ms, ct).mul_(e1)  # e_t * u_t
        v = _rows_mm(gs1, at)
        if need_em:
            torch.mul(eu, v, out=ge[1:])
        if need_a:
            alpha0 = pi * e[0] * inv[0].unsqueeze(-1)
            first = alpha0.t() @ b1 if a.dim() == 2 else alpha0.unsqueeze(-1) * b1.unsqueeze(-2)
            grad_a = _weight_grad(eu, gs1, a.dim() == 3) + first
        if need_ct:
            grad_ct = _weight_grad(v.mul_(e1), ms, a.dim() == 3).transpose(-1, -2)
    else:
        g0 = (gz * inv[0]).unsqueeze(-1).expand(b, z)
        if need_a:
            grad_a = torch.zeros_like(a)
        if need_ct:
            grad_ct = torch.zeros_like(ct)
    finite = all_finite([g0, grad_a, grad_ct])
    grad_pi = g0 * e[0] if need_pi else None
    if need_em:
        ge[0] = g0 * (pi * e[0])
        if pad is not None:
            ge[pad] = 0.0
        ge = ge.transpose(0, 1)
    return grad_pi, ge, grad_a, grad_ct, finite


class RankSpaceChain(torch.autograd.Function):
    """``log p(x)`` (B,) in rank space with the hand-written backward.

    ``apply(pi, emission, k, pad, max_elements, a, ct)``: as
    :class:`lorank.dp._scaled_chain.ScaledChain` with the factor's ``[A, C^T]``.  If a scale
    underflows or a higher derivative is asked for, the backward differentiates the
    state-space log-space forward instead (same value).
    """

    @staticmethod
    def forward(ctx, pi, emission, k, pad, max_elements, a, ct):
        log_z, saved = forward(pi, emission, k, pad, a, ct, max_elements, save=True)
        ctx.pad, ctx.max_elements = pad, max_elements
        ctx.log_space = saved is None
        if saved is None:
            from lorank.dp import _scaled_chain

            log_z, _ = _scaled_chain.forward(
                pi, emission, k, pad, [[a, ct]], [], save=False, safe=True
            )
            ctx.save_for_backward(pi, emission, a, ct)
            return log_z
        e, kr, msgs, scales, m_all = saved
        extra = [] if m_all is None else [m_all]
        ctx.has_m = m_all is not None
        ctx.save_for_backward(pi, emission, a, ct, e, kr, msgs, scales, *extra)
        return log_z

    @staticmethod
    def backward(ctx, gz):
        pi, emission, a, ct, *rest = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = [n[0], n[1], n[5], n[6]]
        if not ctx.log_space and not torch.is_grad_enabled():
            e, kr, msgs, scales, *m = rest
            grad_pi, ge, grad_a, grad_ct, finite = backward(
                gz, pi, a, ct, (e, kr, msgs, scales, m[0] if ctx.has_m else None), ctx.pad,
                ctx.max_elements, needs,
            )
            if finite:
                return grad_pi, ge, None, None, None, grad_a, grad_ct
        create = torch.is_grad_enabled()  # True only for create_graph=True
        with torch.enable_grad():
            inputs = [pi, emission, a, ct]
            val = plain_log_forward(pi, emission, ctx.pad, [[a, ct]], [])
            want = [x for x, w in zip(inputs, needs, strict=True) if w]
            got = iter(torch.autograd.grad(
                val, want, gz, create_graph=create, allow_unused=True
            ))
        g = [next(got) if w else None for w in needs]
        return g[0], g[1], None, None, None, g[2], g[3]


