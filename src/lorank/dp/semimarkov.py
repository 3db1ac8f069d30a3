"""Semi-Markov (HSMM) dynamic programs as pure functions of potentials, factors and lengths.

Conventions (batch-first):

* ``init_logp``: (B, Z) normalized log initial-state probabilities;
* ``factor``: a :class:`lorank.factors.Factor`, the row-stochastic segment-to-segment transition;
* ``seg``: (B, T, K, Z) segment log-potentials, ``seg[b, t, d - 1, z]`` scores a segment of
  state ``z`` and duration ``d`` that *ends* at position ``t`` (inclusive); ``-inf`` where the
  segment would start before 0 (see :func:`segment_scores`);
* ``lengths``: (B,) long, each in [1, T]; the last segment of sequence ``b`` ends at
  ``lengths[b] - 1``.

Forward messages: ``start[t, z]`` is the log-mass of all prefixes in which a segment of state
``z`` starts at ``t``, ``alpha[t, z]`` that of all prefixes in which a segment of state ``z``
ends at ``t``.  ``start[0] = init``, ``start[t] = alpha[t - 1] @ P`` (one factor product: O(Z R)
for a low-rank factor) and ``alpha[t, z] = LSE_d start[t - d + 1, z] + seg[t, d - 1, z]``
(O(K Z)).  Segment scores are running sums of the emissions over the duration (K passes),
never loops over spans.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lorank._deferred import deferred_products
from lorank._numerics import gumbel_argmax
from lorank.factors import Factor
from lorank.semiring import LogSemiring, Semiring, safe_logsumexp

PAD = -1  #: state index written at padded positions


def segment_scores(
    emission: torch.Tensor, duration_logp: torch.Tensor, max_duration: int | None = None
) -> torch.Tensor:
    """Segment log-potentials ``seg[b, t, d-1, z] = duration[z, d-1] + sum_{s=t-d+1}^{t}
    emission[b, s, z]``: (B, T, K, Z), ``-inf`` where ``t - d + 1 < 0``.

    ``emission`` (B, T, Z) log-likelihoods; ``duration_logp`` (Z, K) or (B, Z, K).  Running
    sums over the duration, ``sums[t, d] = sums[t-1, d-1] + emission[t]``: every entry is a
    sum of at most K terms (no cancellation, so float32 keeps its precision on sequences of
    any length) and ``-inf`` emissions stay ``-inf`` (no NaN).  K passes over (B, T, Z), and
    as many in the hand-written backward (:class:`_SegmentScores`).
    """
    k = duration_logp.shape[-1] if max_duration is None else max_duration
    dur = duration_logp.transpose(-1, -2)  # (Z, K) -> (K, Z) / (B, K, Z)
    if dur.shape[-2] != k:
        raise ValueError(f"duration_logp {tuple(duration_logp.shape)} has {dur.shape[-2]} "
                         f"durations, but max_duration is {k}")
    if dur.dim() == 3 and dur.shape[0] != emission.shape[0]:
        raise ValueError(f"a batched duration_logp {tuple(duration_logp.shape)} must have the "
                         f"batch size of emission {tuple(emission.shape)}")
    if dur.dtype != emission.dtype:
        raise TypeError(f"duration_logp has dtype {dur.dtype} but emission "
                        f"{tuple(emission.shape)} has {emission.dtype}")
    return _SegmentScores.apply(emission, dur)


def _running_sums(x: torch.Tensor, k: int, fill: float = -math.inf) -> torch.Tensor:
    """``sums[b, t, d, z] = sum_{s=t-d}^{t} x[b, s, z]`` (B, T, K, Z), ``fill`` for t < d."""
    b, t_len, z = x.shape
    sums = x.new_full((b, t_len, k, z), fill)
    sums[:, :, 0] = x
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor(x)  # vmap: no out= there
    for d in range(1, min(k, t_len)):
        if wrapped:
            sums[:, d:, d] = sums[:, d - 1 : -1, d - 1] + x[:, d:]
        else:
            torch.add(sums[:, d - 1 : -1, d - 1], x[:, d:], out=sums[:, d:, d])
    return sums


class _SegmentScores(torch.autograd.Function):
    """``running sums + duration`` (``-inf`` where a segment would start before 0) with a
    backward of K passes over (B, T, Z): autograd of the in-place construction would fill and
    copy a (B, T, K, Z) gradient per duration.

    Backward, with ``G`` the output gradient at the possible segments (t >= d; the others are
    the constant ``-inf``): ``d emission[s] = sum_j acc_j[s + j]`` with ``acc_j[t] =
    sum_{j <= d <= t} G[t, d]`` (the segments ending at t long enough to cover s = t - j) and
    ``d dur[d] = sum_{b, t >= d} G[t, d]``.  Forward mode (``jvp``): the running sums of the
    emission tangent plus the duration tangent, 0 at the impossible segments."""

    generate_vmap_rule = True

    @staticmethod
    def forward(emission, dur):
        sums = _running_sums(emission, dur.shape[-2])
        return sums.add_(dur.unsqueeze(-3) if dur.dim() == 3 else dur)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.batched = inputs[1].dim() == 3

    @staticmethod
    def backward(ctx, g):
        b, t_len, k, z = g.shape
        grad_em = grad_dur = None
        if ctx.needs_input_grad[0]:
            grad_em = g.new_zeros(b, t_len, z)
            acc = g.new_zeros(b, t_len, z)
            for d in range(min(k, t_len) - 1, -1, -1):
                acc[:, d:] += g[:, d:, d]
                grad_em[:, : t_len - d] += acc[:, d:]
        if ctx.needs_input_grad[1]:
            dims = 1 if ctx.batched else (0, 1)
            grad_dur = g.sum(dims)
            m = min(k - 1, t_len)  # less the impossible segments: t < d, in the first m steps
            if m > 0:
                t_idx = torch.arange(m, device=g.device).unsqueeze(1)
                tri = (t_idx < torch.arange(k, device=g.device)).to(g.dtype).unsqueeze(-1)
                grad_dur = grad_dur - (g[:, :m] * tri).sum(dims)
        return grad_em, grad_dur

    @staticmethod
    def jvp(ctx, em_t, dur_t):
        k = dur_t.shape[-2]
        out = _running_sums(em_t, k, fill=0.0)
        out.add_(dur_t.unsqueeze(-3) if ctx.batched else dur_t)
        for d in range(1, k):  # the impossible segments are constant
            out[:, :d, d] = 0.0
        return out


def _stack_window(msgs: list[torch.Tensor], t: int, k: int, dim: int) -> torch.Tensor:
    """``msgs[t], msgs[t-1], ..., msgs[t-k+1]`` (those that exist) stacked on ``dim``: index
    ``d - 1`` holds the start message of a segment of duration ``d`` ending at ``t``."""
    lo = max(0, t - k + 1)
    return torch.stack(msgs[lo : t + 1][::-1], dim=dim)


def _step_scores(seg: torch.Tensor) -> list[torch.Tensor]:
    """``seg[..., t, :min(K, t + 1), :]`` for every t (the durations a segment ending at t can
    have), from one ``unbind``: under autograd, slicing ``seg[:, t]`` at every step would
    make each step's backward fill and copy a gradient as large as all of ``seg``."""
    k = seg.shape[-2]
    return [x if t + 1 >= k else x[..., : t + 1, :] for t, x in enumerate(seg.unbind(-3))]


def _gather_last(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``x[..., b, lengths[b] - 1, :]`` for x (..., B, T, Z): (..., B, Z)."""
    batch = torch.arange(x.shape[-3], device=x.device)
    return x[..., batch, lengths - 1, :]


def forward_messages(
    init_logp: torch.Tensor, factor: Factor, seg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log forward messages ``(start, alpha)``, each (B, T, Z), through the factor's
    log-space operator (two thin max-shifted GEMMs per step for a low-rank factor)."""
    with deferred_products() as tape:  # the transition's gradient: one GEMM per matrix
        op = factor.log_operator()
    first = tape.attach(init_logp)
    k = seg.shape[2]
    starts: list[torch.Tensor] = []
    alphas: list[torch.Tensor] = []
    for t, seg_t in enumerate(_step_scores(seg)):
        starts.append(first if t == 0 else op(alphas[t - 1]))
        window = _stack_window(starts, t, k, dim=1)  # (B, d, Z)
        alphas.append(safe_logsumexp(window + seg_t, dim=1))
    return torch.stack(starts, 1), torch.stack(alphas, 1)


def log_partition(
    init_logp: torch.Tensor, factor: Factor, seg: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """``log sum_segmentations exp(score)``: (B,).  O(T (Z R + K Z)) per sequence for a
    low-rank factor, O(T (Z^2 + K Z)) for a dense one."""
    _, alpha = forward_messages(init_logp, factor, seg)
    return safe_logsumexp(_gather_last(alpha, lengths), dim=-1)


def _maxplus(x: torch.Tensor, lp: torch.Tensor, max_chunk_elements: int = 1 << 24):
    """``max_i x[..., i] + lp[i, j]``: x (B, Z), lp (Z, Z) or (B, Z, Z) -> (B, Z)."""
    b, z = x.shape
    chunk = max(1, max_chunk_elements // max(1, b * z))
    outs = []
    for j0 in range(0, z, chunk):
        tj = lp[..., j0 : j0 + chunk]
        cand = x.unsqueeze(-1) + (tj if tj.dim() == 3 else tj.unsqueeze(0))
        outs.append(cand.amax(dim=-2))
    return torch.cat(outs, -1)


def max_messages(
    init_logp: torch.Tensor, trans_logp: torch.Tensor, seg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-product versions of :func:`forward_messages` on the dense ``log P``."""
    t_len, k = seg.shape[1], seg.shape[2]
    starts: list[torch.Tensor] = []
    alphas: list[torch.Tensor] = []
    for t in range(t_len):
        starts.append(init_logp if t == 0 else _maxplus(alphas[t - 1], trans_logp))
        window = _stack_window(starts, t, k, dim=1)
        alphas.append((window + seg[:, t, : window.shape[1]]).amax(dim=1))
    return torch.stack(starts, 1), torch.stack(alphas, 1)


def semiring_forward(
    init_logp: torch.Tensor,
    trans_logp: torch.Tensor,
    seg: torch.Tensor,
    lengths: torch.Tensor,
    semiring: type[Semiring] = LogSemiring,
) -> torch.Tensor:
    """The semi-Markov forward algorithm in any semiring on the dense ``log P`` ((Z, Z) or
    (B, Z, Z)): (B,) (entropy semiring: the entropy over segmentations)."""
    s = semiring
    k = seg.shape[2]
    trans = s.convert(trans_logp if trans_logp.dim() == 3 else trans_logp.unsqueeze(0))
    init = s.convert(init_logp)
    starts: list[torch.Tensor] = []
    alphas: list[torch.Tensor] = []
    for t, seg_t in enumerate(_step_scores(s.convert(seg))):
        if t == 0:
            starts.append(init)
        else:
            starts.append(s.matmul(alphas[t - 1].unsqueeze(-2), trans).squeeze(-2))
        window = _stack_window(starts, t, k, dim=-2)  # (S?, B, d, Z)
        alphas.append(s.sum(s.times(window, seg_t), dim=-2))
    alpha = torch.stack(alphas, dim=-2)  # (S?, B, T, Z)
    return s.unconvert(s.sum(_gather_last(alpha, lengths), dim=-1))


# ---- decoding: Viterbi and forward-filtering backward-sampling share one backtrack ----------


def backtrack(
    start: torch.Tensor,
    alpha: torch.Tensor,
    seg: torch.Tensor,
    lengths: torch.Tensor,
    columns: Callable[[torch.Tensor], torch.Tensor],
    pick: Callable[[torch.Tensor], torch.Tensor],
    num: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk back from each sequence end choosing, for the segment that ends at ``e`` with state
    ``z``, its duration (``pick`` over ``start[e-d+1, z] + seg[e, d-1, z]``) and the state of
    the segment before it (``pick`` over ``alpha[s-1, :] + log P[:, z]``).  With max-product
    messages and ``pick = argmax`` this is Viterbi; with sum-product messages and a Gumbel
    argmax it draws exact posterior samples.

    ``columns(j)``: ``log P[:, j]`` (..., Z) for indices j (num, B).  Returns ``(states,
    starts)``: (num, B, T) long (-1 at padding) and bool (True where a segment begins); all -1
    and no start for a sequence whose messages are all ``-inf`` at its end.
    """
    b, t_len, k, z = seg.shape
    dev = seg.device
    batch = torch.arange(b, device=dev).expand(num, b)
    steps = torch.arange(t_len, device=dev)
    states = torch.full((num, b, t_len), PAD, dtype=torch.long, device=dev)
    starts = torch.zeros((num, b, t_len), dtype=torch.bool, device=dev)
    end = (lengths - 1).expand(num, b).clone()
    last = alpha[batch, end]  # (num, B, Z)
    state = pick(last)
    # an impossible sequence (no finite-score segmentation) stays the sentinel: -1, no start
    active = torch.isfinite(last.amax(-1))
    durs = torch.arange(k, device=dev)
    for _ in range(t_len):
        if not bool(active.any()):
            break
        # duration of the segment (end, state)
        begin_idx = (end.unsqueeze(-1) - durs).clamp_min(0)  # (num, B, K)
        st = start[batch.unsqueeze(-1), begin_idx, state.unsqueeze(-1)]  # (num, B, K)
        sg = seg[batch, end, :, :].gather(-1, state[..., None, None].expand(num, b, k, 1))
        d = pick(st + sg.squeeze(-1))  # (num, B): duration - 1
        begin = end - d
        inside = (steps >= begin.unsqueeze(-1)) & (steps <= end.unsqueeze(-1))
        inside = inside & active.unsqueeze(-1)
        states = torch.where(inside, state.unsqueeze(-1), states)
        starts = starts | ((steps == begin.unsqueeze(-1)) & active.unsqueeze(-1))
        active = active & (begin > 0)
        if not bool(active.any()):
            break
        prev_end = (begin - 1).clamp_min(0)
        logits = alpha[batch, prev_end] + columns(state)
        prev_state = pick(logits)
        state = torch.where(active, prev_state, state)
        end = torch.where(active, prev_end, end)
    return states, starts


def viterbi(
    init_logp: torch.Tensor, trans_logp: torch.Tensor, seg: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact best segmentation: ``(max score (B,), states (B, T), starts (B, T))``."""
    start, alpha = max_messages(init_logp, trans_logp, seg)
    best = _gather_last(alpha, lengths).amax(-1)

    def columns(j: torch.Tensor) -> torch.Tensor:
        if trans_logp.dim() == 2:
            return trans_logp.transpose(0, 1)[j]
        bidx = torch.arange(trans_logp.shape[0], device=j.device)
        return trans_logp.transpose(1, 2)[bidx, j]

    states, starts = backtrack(start, alpha, seg, lengths, columns, lambda x: x.argmax(-1))
    return best, states[0], starts[0]


def sample(
    init_logp: torch.Tensor,
    factor: Factor,
    seg: torch.Tensor,
    lengths: torch.Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact posterior samples of segmentations: ``(states, starts)`` (num_samples, B, T).
    Each backward step needs one column of ``P`` per sample: O(Z R) for a low-rank factor."""
    start, alpha = forward_messages(init_logp, factor, seg)
    return backtrack(
        start,
        alpha,
        seg,
        lengths,
        factor.log_prob_columns,
        lambda x: gumbel_argmax(x, generator),
        num=num_samples,
    )


def segment_chart(
    states: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, max_duration: int,
    num_states: int,
) -> torch.Tensor:
    """The 0/1 indicator (..., B, T, K, Z) of the segments (end t, duration d, state z) of
    segmentations ``(states, starts)`` (..., B, T); its expectation is the segment marginals."""
    ends, dur_idx = segment_ends(starts, lengths)
    if bool((dur_idx[ends] >= max_duration).any()):
        raise ValueError(f"a segment is longer than max_duration={max_duration}")
    d1 = torch.nn.functional.one_hot(dur_idx.clamp(0, max_duration - 1), max_duration)
    z1 = torch.nn.functional.one_hot(states.clamp_min(0), num_states)
    return (d1.unsqueeze(-1) * z1.unsqueeze(-2) * ends[..., None, None]).to(torch.float64)


def segment_ends(starts: torch.Tensor, lengths: torch.Tensor):
    """``(ends, duration - 1)`` (..., B, T): where segments end (within lengths) and, at
    every position, the offset from the start of its segment."""
    t_len = starts.shape[-1]
    steps = torch.arange(t_len, device=starts.device)
    valid = steps < lengths.unsqueeze(-1)
    nxt = torch.cat([starts[..., 1:], torch.ones_like(starts[..., :1])], -1)
    ends = valid & (nxt | (steps == (lengths - 1).unsqueeze(-1)))
    seg_start = torch.where(starts, steps, torch.zeros_like(steps)).cummax(-1).values
    return ends, steps - seg_start


def segmentation_score(
    init_logp: torch.Tensor,
    factor: Factor,
    seg: torch.Tensor,
    lengths: torch.Tensor,
    states: torch.Tensor,
    starts: torch.Tensor,
) -> torch.Tensor:
    """Log joint score of segmentations ``(states, starts)`` (..., B, T): (..., B)."""
    b, t_len, k, z = seg.shape
    lead = states.shape[:-2]
    steps = torch.arange(t_len, device=states.device)
    valid = steps < lengths.unsqueeze(-1)
    st = torch.where(valid, states, torch.zeros_like(states))
    ends, dur_idx = segment_ends(starts, lengths)
    dur_idx = dur_idx.clamp(0, k - 1)
    segx = seg.expand(*lead, b, t_len, k, z)
    vals = segx.gather(-2, dur_idx[..., None, None].expand(*lead, b, t_len, 1, z)).squeeze(-2)
    vals = vals.gather(-1, st.unsqueeze(-1)).squeeze(-1)  # (..., B, T)
    score = torch.where(ends, vals, torch.zeros_like(vals)).sum(-1)
    score = score + init_logp.expand(*lead, b, z).gather(-1, st[..., :1]).squeeze(-1)
    if t_len > 1:
        i = st[..., :-1].transpose(-1, -2)  # (..., T-1, B)
        j = st[..., 1:].transpose(-1, -2)
        trans = factor.log_prob_entries(i, j).transpose(-1, -2)
        use = starts[..., 1:] & valid[:, 1:]
        score = score + torch.where(use, trans, torch.zeros_like(trans)).sum(-1)
    return score
