"""The scaled forward algorithm of a chain, with a hand-written backward algorithm.

One kernel serves every factor that is a sum of matrix chains and bands
(:class:`lorank.factors.ProbTerms`): ``Dense`` (``[P]``), ``LowRank`` (``[A, C^T]``, Chiu, Deng &
Rush 2021), ``Banded`` and their sums (the paper's "LHMM + band").  Each step is

    u_t = alpha_{t-1} @ P,   alpha_hat_t = u_t * exp(emission_t - k_t),   c_t = sum(alpha_hat_t),

with ``alpha_t = alpha_hat_t / c_t`` and ``log p(x) = sum_t (log c_t + k_t)``.  A band adds
``2w + 1`` shifted multiply-adds per step; the low-rank part two thin GEMMs.  Any positive
``c_t`` gives the exact value and gradient (its log is added back), so the plain ``LowRank``
loop sums the rank message ``alpha_hat_t @ A`` (R terms, equal to ``sum(alpha_hat_t)`` when
A's rows sum to one) instead of the Z-wide message.

* Without gradients (:func:`forward` with ``save=False``) nothing is kept but one ``(B, Z)``
  message: the emissions are shifted and exponentiated in one pass (time-major, padding set
  to 1: a padded step multiplies by ``P`` only, which keeps the mass of a row-stochastic P).
* With gradients, :class:`ScaledChain` keeps the scaled emissions, the unnormalized
  messages ``alpha_hat`` (T, B, Z) and the rank messages (T, B, R); its backward runs the
  backward algorithm with the weight gradients gathered into one GEMM per matrix after the
  time loop, and returns the emission gradient (the posterior marginals) directly.
* Shifts: ``k_t`` is the step's largest emission (one reduction, shared with the input
  check).  If a scale falls below ``tiny / eps`` (float32: every reachable state's emission
  lies ~87 nats below the step's maximum, e.g. a sparse band with extreme emissions), the value
  is recomputed with ``k_t`` the maximum over the *reachable* states of ``log u_t + emission_t``
  (every scale then lies in [1, Z]) and the gradient differentiates a log-space pass
  (:func:`plain_log_forward`), as it does when the backward messages overflow.
"""

from __future__ import annotations

import functools
import math
import threading
from contextlib import contextmanager

import torch

from lorank._gemm import Operand, mm
from lorank._numerics import safe_log
from lorank.factors import ProbTerms
from lorank.semiring import log_matmul, safe_logsumexp

Chains = list[list[torch.Tensor]]
Operands = list[list[Operand]]  # the chains' matrices, ready for repeated products
Bands = list[tuple[torch.Tensor, int]]  # (band probabilities transposed: (*batch, 2w+1, Z), w)


# ---- workspace ------------------------------------------------------------------------------
#: buffers up to this many bytes are kept for reuse between calls (per thread and use)
WORKSPACE_MAX_BYTES = 1 << 26
_local = threading.local()


@contextmanager
def workspace(name: str, shape: tuple[int, ...], like: torch.Tensor):
    """A scratch buffer of ``shape`` that never leaves the ``with`` block, reused across
    calls (a fresh multi-megabyte allocation is backed by new pages that must be faulted in,
    which shows at small sizes).  Kept per thread and ``name`` (a nested use of the same name
    gets a fresh buffer); larger than ``WORKSPACE_MAX_BYTES``: fresh, not kept."""
    numel = math.prod(shape)
    if numel * like.element_size() > WORKSPACE_MAX_BYTES:
        yield like.new_empty(shape)
        return
    cache = _local.__dict__.setdefault("buffers", {})
    # a buffer made under inference_mode cannot be written outside it
    key = (name, like.dtype, like.device, torch.is_inference_mode_enabled())
    buf = cache.pop(key, None)
    if buf is None or buf.numel() < numel:
        buf = like.new_empty(numel)
    try:
        yield buf[:numel].view(shape)
    finally:
        cache[key] = buf


# ---- emissions ------------------------------------------------------------------------------
def padding_index(lengths: torch.Tensor, t_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(t, b)`` indices of the padded steps (time-major), or None without padding."""
    pad = torch.arange(t_len, device=lengths.device).unsqueeze(1) >= lengths.unsqueeze(0)
    if not pad.any().item():
        return None
    t_idx, b_idx = pad.nonzero(as_tuple=True)
    return t_idx, b_idx


def emission_shift(
    emission: torch.Tensor, pad, emission_max: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-step shifts (B, T): the largest emission of each step (``emission_max`` if the
    caller has it), 0 where that is not finite and at padding. Detached, a new tensor."""
    k = emission.detach().amax(-1) if emission_max is None else emission_max.detach()
    k = torch.nan_to_num(k, nan=0.0, posinf=0.0, neginf=0.0)
    if pad is not None:
        k[pad[1], pad[0]] = 0.0
    return k


def exp_emission(
    emission: torch.Tensor, k: torch.Tensor, pad, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``exp(emission - k)`` time-major (T, B, Z), 1 at padding: one subtraction into a new
    buffer (or ``out``), one exponential in place, one write of the padded rows."""
    b, t_len, z = emission.shape
    e = emission.new_empty(t_len, b, z) if out is None else out
    torch.sub(emission.detach().transpose(0, 1), k.t().unsqueeze(-1), out=e)
    e.exp_()
    if pad is not None:
        e[pad] = 1.0
    return e


# ---- products -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _offsets(width: int, z: int) -> tuple[tuple[int, slice, slice], ...]:
    """``(k, src, dst)`` per band column k with offset ``o = k - width``: the slices with
    ``dst = src + o`` inside [0, Z) (cached: the step loops ask for them every step)."""
    out = []
    for k in range(2 * width + 1):
        o = k - width
        if abs(o) >= z:
            continue
        if o >= 0:
            out.append((k, slice(0, z - o), slice(o, z)))
        else:
            out.append((k, slice(-o, z), slice(0, z + o)))
    return tuple(out)


def band_apply(
    acc: torch.Tensor | None,
    x: torch.Tensor,
    dt: torch.Tensor,
    width: int,
    out: torch.Tensor | None = None,
    adjoint: bool = False,
) -> torch.Tensor:
    """``acc + x @ band`` (``acc + x @ band^T`` if ``adjoint``) with ``band[i, i + o] =
    dt[o + width, i]``: 2w+1 shifted multiply-adds (x (B, Z), dt (2w+1, Z) or (B, 2w+1, Z)).
    With ``acc`` None the result is a new tensor (or ``out``)."""
    z = x.shape[-1]
    center = dt[..., width, :]
    if acc is None:
        acc = x * center if out is None else torch.mul(x, center, out=out)
    else:
        acc.addcmul_(x, center)
    for k, src, dst in _offsets(width, z):
        if k != width:
            to, frm = (src, dst) if adjoint else (dst, src)
            acc[:, to].addcmul_(x[:, frm], dt[..., k, src])
    return acc


def band_weight_grad(
    alpha: torch.Tensor, w: torch.Tensor, width: int, batched: bool, block: int = 32
) -> torch.Tensor:
    """``grad[o + width, i] = sum_{t,b} alpha[t, b, i] w[t, b, i + o]`` (summed over b too
    unless ``batched``): alpha, w (T, B, Z) -> (2w+1, Z) or (B, 2w+1, Z).

    Shared bands: one batched GEMM over blocks of ``block`` states, ``alpha[:, blk]^T @
    w[:, blk +- width]`` (block x (block + 2w)), whose 2w+1 diagonals are the gradient -- a
    GEMM instead of 2w+1 passes over (T, B, Z) products."""
    z = alpha.shape[-1]
    k = 2 * width + 1
    if batched:
        out = alpha.new_zeros(alpha.shape[1], k, z)
        for kk, src, dst in _offsets(width, z):
            out[..., kk, src] = (alpha[..., src] * w[..., dst]).sum(0)
        return out
    a = alpha.reshape(-1, z)
    n = a.shape[0]
    wp = w.new_zeros(n, z + 2 * width)
    wp[:, width : width + z] = w.reshape(-1, z)
    nb, out = z // block, alpha.new_zeros(k, z)
    if nb:
        zp = z + 2 * width
        av = a.as_strided((nb, block, n), (block, 1, z))  # blocks of alpha^T
        wv = wp.as_strided((nb, n, block + 2 * width), (block, zp, 1))
        prod = torch.bmm(av, wv)  # (nb, block, block + 2w): prod[., i, j] pairs i, i + j - w
        cols = block + 2 * width
        diag = prod.as_strided((nb, block, k), (block * cols, cols + 1, 1))
        out[:, : nb * block] = diag.reshape(nb * block, k).t()
    for i in range(nb * block, z):  # the last z % block states
        out[:, i] = a[:, i] @ wp[:, i : i + k]
    return out


# ---- forward --------------------------------------------------------------------------------
def all_finite(tensors) -> bool:
    """Whether no tensor holds inf or NaN, with one synchronization: the sum of a tensor
    with a non-finite entry is non-finite (a finite sum that overflows says False too,
    which only sends the caller to its slower, safe path)."""
    sums = [t.sum() for t in tensors if t is not None]
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


def underflow_threshold(dtype: torch.dtype) -> float:
    """Scales below this have lost precision to underflow (float32: ~1e-31)."""
    fi = torch.finfo(dtype)
    return fi.tiny / fi.eps


def _plain_lowrank(chains: Chains, bands: Bands) -> bool:
    """One shared two-matrix chain and no band: the loops spell this case out."""
    return len(chains) == 1 and not bands and [m.dim() for m in chains[0]] == [2, 2]


def _needs_alpha(chains: Chains, bands: Bands) -> bool:
    """Whether a step needs the normalized message itself (a band or a one-matrix chain);
    otherwise the normalization is applied to the narrow first product only."""
    return bool(bands) or any(len(c) == 1 for c in chains)


def _operands(chains: Chains, rows: int, uses: int) -> Operands:
    return [[Operand(m, rows, uses) for m in mats] for mats in chains]


def _propagate(
    ah: torch.Tensor,
    cs: torch.Tensor,
    chains: Operands,
    bands: Bands,
    out: torch.Tensor | None,
    inter: list[list[torch.Tensor]] | None,
) -> torch.Tensor:
    """``u = (ah / cs) @ P`` (into ``out``; cs (B, 1)); writes each chain's intermediate
    products (already normalized) into ``inter[chain][i]`` when given."""
    alpha = ah / cs if _needs_alpha(chains, bands) else None
    u = None
    for ci, mats in enumerate(chains):
        x = alpha if alpha is not None else ah
        for i, m in enumerate(mats[:-1]):
            x = m.mm(x, None if inter is None else inter[ci][i])
            if i == 0 and alpha is None:
                x.div_(cs)
        if u is None:
            u = mats[-1].mm(x, out)
        else:
            mats[-1].addmm_(u, x)
    for dt, width in bands:
        u = band_apply(u, alpha, dt, width, out)
    return u


def forward(
    pi: torch.Tensor,
    emission: torch.Tensor,
    k: torch.Tensor,
    pad,
    chains: Chains,
    bands: Bands,
    save: bool,
    safe: bool = False,
):
    """The scaled forward pass: ``(log p(x) (B,), saved)``.

    ``saved`` (only with ``save``) holds ``(e, alpha_hat, scales, inter)`` for
    :class:`ScaledChain`'s backward; it is None if a scale underflowed (the caller then
    differentiates a log-space pass instead).  Without ``save``, an underflow (or an
    impossible sequence, a scale of 0) reruns the pass with ``safe`` reachable-state shifts
    (:func:`_safe_forward`).  The low-rank chain normalizes the narrow rank message instead
    of the (B, Z) message."""
    if safe:
        return _safe_forward(pi, emission.detach(), pad, chains, bands), None
    b, t_len, z = emission.shape
    em = emission.detach()
    if save:
        e = exp_emission(em, k, pad)
        ah_all = em.new_empty(t_len, b, z)
        inter = [[em.new_empty(t_len, b, m.shape[-1]) for m in mats[:-1]] for mats in chains]
        scales = _forward_loop(pi, e, chains, bands, ah_all, inter)
    else:
        with workspace("emission", (t_len, b, z), em) as buf:
            e = exp_emission(em, k, pad, out=buf)
            scales = _forward_loop(pi, e, chains, bands, None, None)
    if scales.numel() and not scales.min().item() >= underflow_threshold(em.dtype):  # NaN too
        if save:
            return None, None
        return _safe_forward(pi, em, pad, chains, bands), None
    log_z = scales.log().sum(0) + k.sum(1)
    return log_z, ((e, ah_all, scales, inter) if save else None)


def _forward_loop(pi, e, chains: Chains, bands: Bands, ah_all, inter) -> torch.Tensor:
    """The time loop of :func:`forward`: the scales (T, B); fills ``ah_all`` and ``inter``
    when given."""
    t_len, b, _ = e.shape
    scales = e.new_empty(t_len, b, 1)
    ah = torch.mul(pi, e[0]) if ah_all is None else torch.mul(pi, e[0], out=ah_all[0])
    # the step views made once (one unbind is cheaper than T - 1 Python indexings)
    es, cs = e.unbind(0), scales.unbind(0)
    ahs = None if ah_all is None else ah_all.unbind(0)
    if _plain_lowrank(chains, bands):
        # the plain LowRank chain, spelled out: the common case
        a, ct = (Operand(m, b, t_len - 1) for m in chains[0])
        ms = None if inter is None else inter[0][0].unbind(0)
        for t in range(1, t_len):
            m = a.mm(ah)
            # the scale of step t - 1 from the rank message: sum(ah @ A) = sum(ah) when A's
            # rows sum to one, an R-sum instead of a Z-sum; any positive scale is exact
            # (log c is added back), and 0 / 0 after an impossible step is caught by the caller
            torch.sum(m, -1, keepdim=True, out=cs[t - 1])
            if ms is None:
                ah = ct.mm_mul(m.div_(cs[t - 1]), es[t])
            else:
                m = torch.div(m, cs[t - 1], out=ms[t])
                ah = torch.mul(ct.mm(m), es[t], out=ahs[t])
        torch.sum(ah, -1, keepdim=True, out=cs[t_len - 1])
        return scales.squeeze(-1)
    ops = _operands(chains, b, t_len - 1)
    torch.sum(ah, -1, keepdim=True, out=cs[0])
    inters = None if inter is None else [[x.unbind(0) for x in c] for c in inter]
    for t in range(1, t_len):
        inter_t = None if inters is None else [[x[t] for x in c] for c in inters]
        out = None if ahs is None else ahs[t]
        ah = _propagate(ah, cs[t - 1], ops, bands, out, inter_t).mul_(es[t])
        torch.sum(ah, -1, keepdim=True, out=cs[t])
    return scales.squeeze(-1)


def _safe_forward(pi, em, pad, chains: Chains, bands: Bands) -> torch.Tensor:
    """The forward pass with reachable-state shifts: ``alpha_hat_t = exp(log u_t +
    emission_t - k_t)`` with ``k_t`` the maximum of ``log u_t + emission_t``, i.e. over the
    states reachable at step t (``u_t > 0``), so every scale lies in [1, Z], or is 0 for an
    impossible sequence; log p(x) = sum_t (log c_t + k_t)."""
    t_len, b = em.shape[1], em.shape[0]
    em = em.transpose(0, 1).clone()  # time-major, padding -> 0 (log 1)
    if pad is not None:
        em[pad] = 0.0
    tiny = torch.finfo(em.dtype).tiny
    scales = em.new_empty(t_len, b, 1)
    shifts = em.new_empty(t_len, b, 1)
    ah = None
    ops = _operands(chains, b, t_len - 1)
    for t in range(t_len):
        if ah is None:
            u = pi.clone()
        else:
            u = _propagate(ah, scales[t - 1].clamp_min(tiny), ops, bands, None, None)
        x = u.log_().add_(em[t])
        kt = x.amax(-1, keepdim=True)
        kt = torch.where(torch.isfinite(kt), kt, 0.0)
        shifts[t] = kt
        ah = x.sub_(kt).exp_()
        torch.sum(ah, -1, keepdim=True, out=scales[t])
    return (scales.log() + shifts).squeeze(-1).sum(0)


# ---- backward -------------------------------------------------------------------------------
#: below this rank, a weight gradient is computed as the GEMM whose output rows are the rank
#: (then copied to the matrix's layout): CPU BLAS runs that shape faster (benchmarks/RESULTS.md)
SMALL_RANK_GEMM = 128


def _weight_grad(
    x: torch.Tensor, g: torch.Tensor, batched: bool, like: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum_{t,b} x[t,b]^T g[t,b]`` as one GEMM: x (T, B, m), g (T, B, n) -> (m, n), or per
    example (B, m, n) for batched matrices.  If ``like`` (the matrix this is the gradient
    of) is a transposed view, the result is too, so that the gradient reaches the matrix's
    producer in its own memory layout."""
    want_t = like is not None and like.stride(-2) == 1 and like.stride(-1) != 1
    if batched:
        if want_t:
            return (g.permute(1, 2, 0) @ x.transpose(0, 1)).transpose(-1, -2)
        return x.permute(1, 2, 0) @ g.transpose(0, 1)
    m, n = x.shape[-1], g.shape[-1]
    xf, gf = x.reshape(-1, m), g.reshape(-1, n)
    if m != n and min(m, n) <= SMALL_RANK_GEMM:
        out = mm(xf.t(), gf) if m < n else mm(gf.t(), xf).t()  # rows of the product: the rank
        if (m > n) != want_t:  # out is a transposed view iff m > n
            out = out.t().contiguous().t() if want_t else out.contiguous()
        return out
    if want_t:
        return mm(gf.t(), xf).t()
    return mm(xf.t(), gf)


def backward(
    gz: torch.Tensor,
    pi: torch.Tensor,
    saved,
    chains: Chains,
    bands: Bands,
    pad,
    need: tuple[bool, bool, list[bool]],
):
    """The backward algorithm for :func:`forward`: ``(grad_pi, grad_emission (B, T, Z),
    [grad of each chain matrix and band, in ProbTerms order], finite)`` (None where not
    needed).  ``need``: (pi, emission, per tensor).  ``finite`` is False if the backward
    messages left the float range (they are likelihood ratios up to 1 / alpha, which float32
    cannot hold for extreme potentials): a non-finite message reaches the first step's
    message and every weight gradient, which are checked."""
    e, ah_all, scales, inter = saved
    t_len, b, z = e.shape
    any_w = any(need[2])
    pos = scales > 0
    inv = torch.where(pos, 1.0 / torch.where(pos, scales, 1.0), 0.0)  # (T, B)
    if need[1]:
        # dL/d alpha_hat lives in the emission gradient's buffer (batch-major, the emission's
        # layout) and becomes dL/d emission = dL/d alpha_hat * alpha_hat step by step
        ge = e.new_empty(b, t_len, z)
        return _with_weights(any_w, gz, pi, e, ah_all, inv, inter, chains, bands, pad, need,
                             ge.transpose(0, 1), ge)
    with workspace("backward", (t_len, b, z), e) as g_all:
        return _with_weights(any_w, gz, pi, e, ah_all, inv, inter, chains, bands, pad, need,
                             g_all, None)


def _with_weights(any_w, *args):
    if not any_w:
        return _backward_loop(*args, None)
    e = args[2]
    with workspace("weights", e.shape, e) as w_all:
        return _backward_loop(*args, w_all)


def _backward_loop(gz, pi, e, ah_all, inv, inter, chains, bands, pad, need, g_all, ge, w_all):
    """The body of :func:`backward`: ``g_all`` (T, B, Z) receives dL/d alpha_hat (a view of
    the emission gradient ``ge``, which it becomes, or scratch: then the plain LowRank loop
    writes only steps T - 1 and 0, the others stay in its loop variable); ``w_all`` keeps
    dL/du for the weight gradients (None if none is needed)."""
    t_len, b, z = e.shape
    need_pi, need_em, need_w = need
    alpha_mode = _needs_alpha(chains, bands)
    g_all[t_len - 1] = (gz * inv[t_len - 1]).unsqueeze(-1)
    # per chain, gradients w.r.t. the outputs of matrices 1..n-1 (the first one pre-scaled)
    gmid = [[e.new_empty(t_len, b, m.shape[-1]) for m in mats[:-1]] for mats in chains]
    mats_t = _operands([[m.transpose(-1, -2) for m in mats] for mats in chains], b, t_len - 1)
    # the step views made once (one unbind is cheaper than T - 1 Python indexings)
    gs, es, invs = g_all.unbind(0), e.unbind(0), inv.unsqueeze(-1).unbind(0)
    ws = None if w_all is None else w_all.unbind(0)
    ahs = None if ge is None else ah_all.unbind(0)
    if _plain_lowrank(chains, bands):
        at, c = mats_t[0]  # the plain LowRank chain, spelled out: the common case
        qs = gmid[0][0].unbind(0)
        g = gs[t_len - 1]  # dL/d alpha_hat_t; in g_all only where needed (the emission gradient)
        for t in range(t_len - 1, 0, -1):
            w = torch.mul(g, es[t]) if ws is None else torch.mul(g, es[t], out=ws[t])
            if ahs is not None:
                torch.mul(g, ahs[t], out=gs[t])
            # the gradient w.r.t. the rank product before normalization
            q = torch.mul(c.mm(w), invs[t - 1], out=qs[t])
            g = at.mm(q)
        if t_len > 1:
            gs[0].copy_(g)
    else:
        gmids = [[x.unbind(0) for x in c] for c in gmid]
        for t in range(t_len - 1, 0, -1):
            g = gs[t]
            w = torch.mul(g, es[t]) if ws is None else torch.mul(g, es[t], out=ws[t])
            if ahs is not None:
                g.mul_(ahs[t])
            it = invs[t - 1]
            beta = None
            for ci, mats in enumerate(mats_t):
                x = w
                for i in range(len(mats) - 1, 0, -1):
                    x = mats[i].mm(x, out=gmids[ci][i - 1][t])
                if not alpha_mode:
                    x.mul_(it)  # gradient w.r.t. the product before its normalization
                if beta is None:
                    beta = mats[0].mm(x, gs[t - 1])
                else:
                    mats[0].addmm_(beta, x)
            for dt, width in bands:
                beta = band_apply(beta, w, dt, width, gs[t - 1], adjoint=True)
            if alpha_mode:
                beta.mul_(it)
    g = g_all[0]
    grad_pi = g * e[0] if need_pi else None
    if ge is not None:
        g.mul_(ah_all[0])
        if pad is not None:
            ge[pad[1], pad[0]] = 0.0
    grads: list[torch.Tensor | None] = []
    if w_all is None:
        return grad_pi, ge, [None] * len(need_w), all_finite([g])
    if t_len == 1:
        zeros = [torch.zeros_like(m) for mats in chains for m in mats]
        zeros += [torch.zeros_like(dt) for dt, _ in bands]
        return grad_pi, ge, zeros, all_finite([g])
    # inputs of the first matrices at steps 1..T-1: alpha_{0..T-2} (normalized or not)
    prev = ah_all[:-1]
    if alpha_mode:
        prev = prev * inv[:-1].unsqueeze(-1)
    idx = iter(need_w)
    for ci, mats in enumerate(chains):
        ins = [prev] + [x[1:] for x in inter[ci]]
        outs = [x[1:] for x in gmid[ci]] + [w_all[1:]]
        for m, x, go in zip(mats, ins, outs, strict=True):
            grads.append(_weight_grad(x, go, m.dim() == 3, m) if next(idx) else None)
    for dt, width in bands:
        grads.append(band_weight_grad(prev, w_all[1:], width, dt.dim() == 3) if next(idx) else None)
    return grad_pi, ge, grads, all_finite([g, *grads])


# ---- the autograd Function ------------------------------------------------------------------
def split_terms(layout: tuple, tensors) -> tuple[Chains, Bands]:
    """Chains and bands from a flat tensor list and ``layout = (chain sizes, band widths)``."""
    sizes, widths = layout
    it = iter(tensors)
    chains = [[next(it) for _ in range(n)] for n in sizes]
    bands = [(next(it), w) for w in widths]
    return chains, bands


def layout_of(terms: ProbTerms) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(len(c) for c in terms.chains), tuple(w for _, w in terms.bands)


def plain_log_forward(pi, emission, pad, chains: Chains, bands: Bands) -> torch.Tensor:
    """:func:`forward` in log space, in plain differentiable ops: ``log p(x)`` (B,).

    Max-shifted products (``log_matmul``) and log-sum-exp over the band's shifted terms, so
    no message can overflow or underflow; zero probabilities are ``-inf`` with zero
    gradient.  The backward of :class:`ScaledChain` differentiates this when a higher
    derivative is asked for, or when the scaled backward overflowed (float32 with extreme
    potentials)."""
    b, t_len, z = emission.shape
    em = emission
    if pad is not None:
        mask = torch.zeros(b, t_len, 1, dtype=torch.bool, device=em.device)
        mask[pad[1], pad[0]] = True
        em = torch.where(mask, 0.0, em)
    log_chains = [[safe_log(m) for m in mats] for mats in chains]
    log_bands = [(safe_log(dt), width) for dt, width in bands]
    la = safe_log(pi) + em[:, 0]
    for t in range(1, t_len):
        parts = []
        for mats in log_chains:
            x = la
            for lm in mats:
                x = log_matmul(x.unsqueeze(-2), lm).squeeze(-2)
            parts.append(x)
        for ldt, width in log_bands:
            for k, src, dst in _offsets(width, z):
                shifted = torch.full_like(la, -math.inf)
                shifted[:, dst] = la[:, src] + ldt[..., k, src]
                parts.append(shifted)
        la = safe_logsumexp(torch.stack(parts), 0) + em[:, t]
    return safe_logsumexp(la, -1)


class ScaledChain(torch.autograd.Function):
    """``log p(x)`` (B,) of :func:`forward` with the hand-written backward algorithm.

    ``apply(pi, emission, k, pad, layout, *tensors)``: initial probabilities (B, Z), raw
    log-emissions (B, T, Z), shifts (B, T) from :func:`emission_shift`, padding index from
    :func:`padding_index`, and the factor's :class:`~lorank.factors.ProbTerms` flattened
    (``layout`` from :func:`layout_of`; bands transposed to (*batch, 2w+1, Z)).

    If a forward scale underflows or the backward messages overflow (float32 with extreme
    potentials), or a higher derivative is asked for, the backward differentiates
    :func:`plain_log_forward` instead.
    """

    @staticmethod
    def forward(ctx, pi, emission, k, pad, layout, *tensors):
        chains, bands = split_terms(layout, tensors)
        log_z, saved = forward(pi, emission, k, pad, chains, bands, save=True)
        ctx.layout, ctx.pad, ctx.num_tensors = layout, pad, len(tensors)
        ctx.log_space = saved is None
        if saved is None:  # underflow: the value from the safe forward, a log-space backward
            log_z, _ = forward(pi, emission, k, pad, chains, bands, save=False, safe=True)
            ctx.save_for_backward(pi, emission, *tensors)
            return log_z
        e, ah_all, scales, inter = saved
        flat_inter = [x for c in inter for x in c]
        ctx.save_for_backward(pi, emission, *tensors, e, ah_all, scales, *flat_inter)
        return log_z

    @staticmethod
    def backward(ctx, gz):
        pi, emission, *rest = ctx.saved_tensors
        tensors, rest = rest[: ctx.num_tensors], rest[ctx.num_tensors :]
        chains, bands = split_terms(ctx.layout, tensors)
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], *ctx.needs_input_grad[5:]]
        if not ctx.log_space and not torch.is_grad_enabled():
            e, ah_all, scales, *flat_inter = rest
            it = iter(flat_inter)
            inter = [[next(it) for _ in mats[:-1]] for mats in chains]
            grad_pi, grad_em, grads, finite = backward(
                gz, pi, (e, ah_all, scales, inter), chains, bands, ctx.pad,
                (needs[0], needs[1], needs[2:]),
            )
            if finite:
                return (grad_pi, grad_em, None, None, None, *grads)
        # create_graph=True, or the scaled passes left the float range: differentiate the
        # log-space forward
        create = torch.is_grad_enabled()  # True only for create_graph=True
        with torch.enable_grad():
            inputs = [pi, emission, *tensors]
            out = plain_log_forward(pi, emission, ctx.pad, chains, bands)
            want = [x for x, n in zip(inputs, needs, strict=True) if n]
            got = iter(torch.autograd.grad(
                out, want, gz, create_graph=create, allow_unused=True
            ))
        grads = [next(got) if n else None for n in needs]
        return (grads[0], grads[1], None, None, None, *grads[2:])
