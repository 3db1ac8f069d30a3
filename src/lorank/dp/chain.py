"""Chain (HMM) dynamic programs as pure functions of potentials, factors and lengths.

Conventions (batch-first):

* ``init_logp``: (B, Z) normalized log initial probabilities;
* ``factor``: a :class:`lorank.factors.Factor` (row-stochastic transition);
* ``emission``: (B, T, Z) log-likelihoods ``log p(x_t | z_t)``;
* ``lengths``: (B,) long, each in [1, T].  Positions ``t >= lengths[b]`` are padding.

The fast sum-product (:func:`log_partition`) runs in scaled probability space: each step is
``alpha <- (alpha @ P) * exp(emission_t - max)`` followed by a rescale whose log is accumulated,
so the low-rank factor costs two GEMMs of O(B Z R).  Padding is handled by setting padded
emissions to 0 (log 1): since every row of ``P`` sums to one, the extra steps preserve the mass,
which is exact for sum-product.  Max-product and the entropy semiring instead freeze the
messages past each length.
"""

from __future__ import annotations

import math

import torch

from lorank._numerics import gumbel_argmax
from lorank.dp import _rank_space
from lorank.dp import _scaled_chain as kernel
from lorank.factors import Factor, LowRank, ProbTerms, _bmv
from lorank.semiring import LogSemiring, Semiring

PAD = -1  #: the state index written at padded positions of paths and samples


def pad_emission(emission: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A copy of ``emission`` with positions ``t >= lengths[b]`` set to 0 (log 1)."""
    steps = torch.arange(emission.shape[1], device=emission.device)
    valid = steps.unsqueeze(0) < lengths.unsqueeze(1)
    return torch.where(valid.unsqueeze(-1), emission, torch.zeros_like(emission))


def _scaled_emission(emission: torch.Tensor, lengths: torch.Tensor):
    """``exp(em - k)`` with the per-step max ``k`` (detached: log Z is invariant to it)."""
    em = pad_emission(emission, lengths)
    k = em.detach().amax(dim=-1)  # detached first: amax would save its input for backward
    k = torch.where(torch.isfinite(k), k, torch.zeros_like(k))
    return (em - k.unsqueeze(-1)).exp(), k


def _log_scale(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log c, safe divisor)``: log 0 is a true -inf with a zero (not NaN) gradient."""
    pos = c > 0
    safe = torch.where(pos, c, torch.ones_like(c))
    return torch.where(pos, safe.log(), torch.full_like(c, -math.inf)), safe


def log_partition(
    init_logp: torch.Tensor,
    factor: Factor,
    emission: torch.Tensor,
    lengths: torch.Tensor,
    memory_light: bool = False,
    *,
    terms: ProbTerms | None = None,
    emission_max: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward algorithm in scaled probability space: log p(x) per sequence, (B,).

    Every built-in factor (a sum of matrix chains and bands, :class:`ProbTerms`) runs in one
    kernel (:mod:`lorank.dp._scaled_chain`): when nothing requires grad (or under
    ``torch.no_grad()`` / ``inference_mode()``) a forward that saves nothing; otherwise a
    custom autograd Function whose backward is the backward algorithm with the weight
    gradients gathered into one GEMM per matrix (band: 2w+1 shifted multiply-adds).
    ``memory_light`` (LowRank only) saves just the rank-space messages, O(B T R), and
    recomputes the rest on the way back.  ``terms`` (from ``factor.normalize()``) and
    ``emission_max`` (``emission.amax(-1)``) skip recomputing what a caller already has.
    """
    if memory_light and not isinstance(factor, LowRank):
        raise TypeError(
            f"memory_light needs a LowRank transition factor, got {type(factor).__name__}"
        )
    if terms is None:
        terms = factor.prob_terms()
    pi = init_logp.exp()
    if terms is None:  # a user-defined factor: its operator, plain autograd
        return _operator_log_partition(pi, factor, emission, lengths)
    tensors = terms.tensors()
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (pi, emission, *tensors)
    )
    if memory_light and grad:
        e, k = _scaled_emission(emission, lengths)
        a_mat, c_t = terms.chains[0]
        return _LowRankForward.apply(pi, a_mat, c_t.transpose(-1, -2), e) + k.sum(1)
    pad = kernel.padding_index(lengths, emission.shape[1])
    k = kernel.emission_shift(emission, pad, emission_max)
    bands = [(p.transpose(-1, -2).contiguous(), w) for p, w in terms.bands]
    if not grad:
        return kernel.forward(pi, emission, k, pad, terms.chains, bands, save=False)[0]
    flat = [m for c in terms.chains for m in c] + [p for p, _ in bands]
    return kernel.ScaledChain.apply(pi, emission, k, pad, kernel.layout_of(terms), *flat)


def _operator_log_partition(
    pi: torch.Tensor, factor: Factor, emission: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """The scaled forward through ``factor.prob_operator()`` in plain autograd ops."""
    e, k = _scaled_emission(emission, lengths)
    op = factor.prob_operator()
    alpha = pi * e[:, 0]
    logs = []
    for t in range(e.shape[1]):
        if t > 0:
            alpha = op(alpha) * e[:, t]
        log_c, safe = _log_scale(alpha.sum(-1))
        logs.append(log_c)
        alpha = alpha / safe.unsqueeze(-1)
    return torch.stack(logs, 1).sum(1) + k.sum(1)


def _plain_scaled_chain(pi: torch.Tensor, e: torch.Tensor, *mats: torch.Tensor) -> torch.Tensor:
    """The scaled forward of :class:`_ScaledChain` in plain (differentiable) autograd ops."""
    alpha = pi * e[:, 0]
    logs = []
    for t in range(e.shape[1]):
        if t > 0:
            for m in mats:
                alpha = _bmv(alpha, m)
            alpha = alpha * e[:, t]
        log_c, safe = _log_scale(alpha.sum(-1))
        logs.append(log_c)
        alpha = alpha / safe.unsqueeze(-1)
    return torch.stack(logs, 1).sum(1)


def _differentiable_backward(inputs: tuple, grad: torch.Tensor) -> tuple:
    """Backward by autograd through :func:`_plain_scaled_chain`, used when a higher derivative
    is asked for (``create_graph=True``): the hand-written backward passes are not themselves
    differentiable, and ``once_differentiable`` does not catch this case (it silently drops
    the second-order terms when the incoming gradient does not require grad)."""
    with torch.enable_grad():
        out = _plain_scaled_chain(*inputs)
        need = [x for x in inputs if x.requires_grad]
        grads = iter(torch.autograd.grad(out, need, grad, create_graph=True, allow_unused=True))
    return tuple(next(grads) if x.requires_grad else None for x in inputs)


def _outer_sum(x: torch.Tensor, y: torch.Tensor, batched: bool) -> torch.Tensor:
    """``sum_b x[b]^T y[b]``: (Z, R) for a shared factor, per-example (B, Z, R) if batched."""
    if batched:
        return x.unsqueeze(-1) * y.unsqueeze(-2)
    return x.transpose(0, 1) @ y


class _LowRankForward(torch.autograd.Function):
    """Scaled forward for ``P = A C^T`` saving only rank messages (B, T, R) and scales (B, T).

    The backward pass runs the backward algorithm, recomputing each state message from the
    saved rank message with one GEMM.  Inputs: ``pi`` (B, Z) initial probabilities, ``A``/``C``
    (Z, R) or (B, Z, R), ``e`` (B, T, Z) scaled emission likelihoods.  Output: sum_t log c_t.
    """

    @staticmethod
    def forward(ctx, pi, a_mat, c_mat, e):
        b, t_len, z = e.shape
        ct = c_mat.transpose(-1, -2)
        msgs = e.new_zeros(b, t_len, a_mat.shape[-1])
        scales = e.new_zeros(b, t_len)
        alpha = pi * e[:, 0]
        for t in range(t_len):
            if t > 0:
                m = _bmv(alpha, a_mat)
                msgs[:, t] = m
                alpha = _bmv(m, ct) * e[:, t]
            c = alpha.sum(-1)
            scales[:, t] = c
            alpha = alpha / torch.where(c > 0, c, torch.ones_like(c)).unsqueeze(-1)
        ctx.save_for_backward(pi, a_mat, c_mat, e, msgs, scales)
        log_c, _ = _log_scale(scales)
        return log_c.sum(1)

    @staticmethod
    def backward(ctx, grad):
        pi, a_mat, c_mat, e, msgs, scales = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            g_pi, g_e, g_a, g_ct = _differentiable_backward(
                (pi, e, a_mat, c_mat.transpose(-1, -2)), grad
            )
            return g_pi, g_a, None if g_ct is None else g_ct.transpose(-1, -2), g_e
        b, t_len, z = e.shape
        batched = a_mat.dim() == 3
        ct = c_mat.transpose(-1, -2)
        at = a_mat.transpose(-1, -2)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        inv = torch.where(scales > 0, 1.0 / safe, torch.zeros_like(scales))
        grad_a = torch.zeros_like(a_mat)
        grad_c = torch.zeros_like(c_mat)
        grad_e = torch.zeros_like(e)
        beta = grad.unsqueeze(-1).expand(b, z).contiguous()
        u_t = _bmv(msgs[:, t_len - 1], ct) if t_len > 1 else None
        for t in range(t_len - 1, 0, -1):
            # u_t = m_t C^T; alpha_t = u_t * e_t / c_t
            grad_e[:, t] = u_t * beta * inv[:, t : t + 1]
            w = e[:, t] * beta * inv[:, t : t + 1]
            q = _bmv(w, c_mat)  # d/dm_t
            grad_c += _outer_sum(w, msgs[:, t], batched)
            if t > 1:
                u_prev = _bmv(msgs[:, t - 1], ct)
                alpha_prev = u_prev * e[:, t - 1] * inv[:, t - 1 : t]
            else:
                u_prev = None
                alpha_prev = pi * e[:, 0] * inv[:, 0:1]
            grad_a += _outer_sum(alpha_prev, q, batched)
            beta = _bmv(q, at)
            u_t = u_prev
        grad_e[:, 0] = pi * beta * inv[:, 0:1]
        grad_pi = e[:, 0] * beta * inv[:, 0:1]
        return grad_pi, grad_a, grad_c, grad_e


def semiring_forward(
    init_logp: torch.Tensor,
    trans_logp: torch.Tensor,
    emission: torch.Tensor,
    lengths: torch.Tensor,
    semiring: type[Semiring] = LogSemiring,
) -> torch.Tensor:
    """The forward algorithm over any semiring on dense log-potentials ``trans_logp``
    ((Z, Z) or (B, Z, Z)); messages are frozen past each length. Returns (B,) (entropy:
    the entropy of the path distribution)."""
    s = semiring
    x = s.convert(init_logp + emission[:, 0])
    trans = s.convert(trans_logp if trans_logp.dim() == 3 else trans_logp.unsqueeze(0))
    for t in range(1, emission.shape[1]):
        new = s.matmul(x.unsqueeze(-2), trans).squeeze(-2)
        new = s.times(new, s.convert(emission[:, t]))
        active = (t < lengths).unsqueeze(-1)
        x = torch.where(active, new, x)
    return s.unconvert(s.sum(x, dim=-1))


def viterbi(
    init_logp: torch.Tensor,
    trans_logp: torch.Tensor,
    emission: torch.Tensor,
    lengths: torch.Tensor,
    max_chunk_elements: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact max-product with backpointers: (best log-score (B,), path (B, T) padded with -1;
    a sequence of probability 0 gets score ``-inf`` and the all ``-1`` path)."""
    b, t_len, z = emission.shape
    batched = trans_logp.dim() == 3
    chunk = max(1, max_chunk_elements // max(1, b * z))
    score = init_logp + emission[:, 0]
    identity = torch.arange(z, device=emission.device).expand(b, z)
    back = []
    for t in range(1, t_len):
        bests, args = [], []
        for j0 in range(0, z, chunk):
            tj = trans_logp[..., j0 : j0 + chunk]
            cand = score.unsqueeze(-1) + (tj if batched else tj.unsqueeze(0))
            best, arg = cand.max(dim=-2)
            bests.append(best)
            args.append(arg)
        new = torch.cat(bests, -1) + emission[:, t]
        active = (t < lengths).unsqueeze(-1)
        score = torch.where(active, new, score)
        back.append(torch.where(active, torch.cat(args, -1), identity))
    best_score, state = score.max(dim=-1)
    path = emission.new_full((b, t_len), PAD, dtype=torch.long)
    path[:, t_len - 1] = state
    for t in range(t_len - 1, 0, -1):
        state = back[t - 1].gather(1, state.unsqueeze(1)).squeeze(1)
        path[:, t - 1] = state
    steps = torch.arange(t_len, device=emission.device)
    keep = (steps < lengths.unsqueeze(1)) & ~torch.isneginf(best_score).unsqueeze(1)
    path = torch.where(keep, path, torch.full_like(path, PAD))
    return best_score, path


def forward_log_messages(
    init_logp: torch.Tensor, factor: Factor, emission: torch.Tensor
) -> torch.Tensor:
    """Log forward messages ``log p(x_{1:t}, z_t)``: (B, T, Z), by max-shifted GEMMs."""
    op = factor.log_operator()
    la = init_logp + emission[:, 0]
    out = [la]
    for t in range(1, emission.shape[1]):
        la = op(la) + emission[:, t]
        out.append(la)
    return torch.stack(out, 1)


def sample(
    init_logp: torch.Tensor,
    factor: Factor,
    emission: torch.Tensor,
    lengths: torch.Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Forward filtering, backward sampling: exact posterior samples (num_samples, B, T),
    padded with -1 (all ``-1`` for a sequence of probability 0).  Each backward step needs
    one column of ``P`` per sample (O(Z R))."""
    b, t_len, z = emission.shape
    la = forward_log_messages(init_logp, factor, emission)
    batch = torch.arange(b, device=emission.device)
    last = la[batch, lengths - 1].expand(num_samples, b, z)
    nxt = gumbel_argmax(last, generator)
    out = emission.new_full((num_samples, b, t_len), PAD, dtype=torch.long)
    out[:, batch, lengths - 1] = nxt
    for t in range(t_len - 2, -1, -1):
        active = t < lengths - 1
        if not bool(active.any()):
            continue
        logits = la[:, t].unsqueeze(0) + factor.log_prob_columns(nxt)
        cur = gumbel_argmax(logits, generator)
        nxt = torch.where(active, cur, nxt)
        out[:, :, t] = torch.where(active, cur, out[:, :, t])
    impossible = torch.isneginf(last[0].amax(-1)) if num_samples else None
    if impossible is not None and bool(impossible.any()):
        out[:, impossible] = PAD
    return out


def path_score(
    init_logp: torch.Tensor,
    factor: Factor,
    emission: torch.Tensor,
    lengths: torch.Tensor,
    path: torch.Tensor,
) -> torch.Tensor:
    """Log joint ``log p(x, z)`` of state paths (..., B, T); positions past lengths ignored;
    ``-inf`` for the all ``-1`` path (the answer of :func:`viterbi` and :func:`sample` for a
    sequence of probability 0)."""
    b, t_len, z = emission.shape
    valid = torch.arange(t_len, device=path.device) < lengths.unsqueeze(1)  # (B, T)
    sentinel = ((path == PAD) | ~valid).all(-1)
    p = torch.where(valid & ~sentinel.unsqueeze(-1), path, torch.zeros_like(path))
    lead = p.shape[:-2]
    em = emission.expand(*lead, b, t_len, z).gather(-1, p.unsqueeze(-1)).squeeze(-1)
    score = init_logp.expand(*lead, b, z).gather(-1, p[..., :1]).squeeze(-1)
    score = score + torch.where(valid, em, torch.zeros_like(em)).sum(-1)  # -inf * 0 is NaN
    if t_len > 1:
        i = p[..., :-1].transpose(-1, -2)  # (..., T-1, B): batch index last
        j = p[..., 1:].transpose(-1, -2)
        trans = factor.log_prob_entries(i, j).transpose(-1, -2)
        score = score + torch.where(valid[:, 1:], trans, torch.zeros_like(trans)).sum(-1)
    return score.masked_fill(sentinel, -math.inf)


def rank_space_log_partition(
    init_logp: torch.Tensor,
    factor: LowRank,
    emission: torch.Tensor,
    lengths: torch.Tensor,
    max_chunk_elements: int = 1 << 24,
    *,
    terms: ProbTerms | None = None,
    emission_max: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward algorithm in rank space (Yang, Liu & Tu, NAACL 2022): log p(x), (B,).

    With ``P = A C^T``, marginalizing each state ``z_t`` gives a chain over rank states whose
    step-t transition is ``M_t = C^T diag(p(x_t | .)) A`` (R x R).  All ``M_t`` come from one
    GEMM of the scaled emissions with the Khatri-Rao product of C and A (O(Z R^2) per token,
    in time chunks of at most ``max_chunk_elements`` entries); the recursion is O(R^2) per
    step, forwards and (in the hand-written backward, :mod:`lorank.dp._rank_space`)
    backwards.  ``terms``/``emission_max`` as in :func:`log_partition`.
    """
    if terms is None:
        terms = factor.prob_terms()
    a_mat, c_t = terms.chains[0]
    pi = init_logp.exp()
    pad = kernel.padding_index(lengths, emission.shape[1])
    k = kernel.emission_shift(emission, pad, emission_max)
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (pi, emission, a_mat, c_t)
    )
    if grad:
        return _rank_space.RankSpaceChain.apply(pi, emission, k, pad, max_chunk_elements,
                                                a_mat, c_t)
    log_z, _ = _rank_space.forward(pi, emission, k, pad, a_mat, c_t, max_chunk_elements, False)
    if log_z is None:  # a scale underflowed: the state-space pass with reachable shifts
        log_z, _ = kernel.forward(pi, emission, k, pad, [[a_mat, c_t]], [], False, safe=True)
    return log_z
