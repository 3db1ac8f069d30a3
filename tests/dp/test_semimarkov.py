"""Semi-Markov dynamic programs: segment scores, semirings, precision."""

import math

import pytest
import torch

import lorank
from lorank.dp import semimarkov
from lorank.semiring import LogSemiring, MaxSemiring

D = torch.float64


def _loop_segment_scores(em, dur):
    b, t, z = em.shape
    k = dur.shape[-1]
    out = torch.full((b, t, k, z), -math.inf, dtype=em.dtype)
    for e in range(t):
        for d in range(1, k + 1):
            if e - d + 1 >= 0:
                out[:, e, d - 1] = em[:, e - d + 1 : e + 1].sum(1) + dur[:, d - 1]
    return out


def test_segment_scores_match_loops_with_neg_inf():
    gen = torch.Generator().manual_seed(0)
    em = torch.randn(2, 6, 3, dtype=D, generator=gen)
    em[0, 2, 1] = -math.inf
    dur = torch.randn(3, 4, dtype=D, generator=gen)
    got = semimarkov.segment_scores(em, dur)
    want = _loop_segment_scores(em, dur)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin])
    assert not torch.isnan(got).any()


def test_segment_scores_gradcheck_shared_and_batched_durations():
    gen = torch.Generator().manual_seed(3)
    for t, k in ((6, 3), (3, 5), (1, 2)):  # K < T, K > T, a single step
        em = torch.randn(2, t, 3, dtype=D, generator=gen, requires_grad=True)
        for shape in ((3, k), (2, 3, k)):
            dur = torch.randn(*shape, dtype=D, generator=gen, requires_grad=True)
            w = torch.randn(2, t, k, 3, dtype=D, generator=gen)

            def f(em, dur, w=w):  # -inf entries weighted by 0 (their gradient is 0 anyway)
                seg = semimarkov.segment_scores(em, dur)
                return torch.where(torch.isinf(seg), 0.0, seg * w).sum()

            assert torch.autograd.gradcheck(f, (em, dur))
            # and against autograd of the plain loops
            g = torch.autograd.grad(f(em, dur), (em, dur))
            if dur.dim() == 2:
                ref = _loop_segment_scores(em, dur)
            else:  # per example
                ref = torch.cat([_loop_segment_scores(em[i : i + 1], dur[i]) for i in range(2)])
            want = torch.autograd.grad(
                torch.where(torch.isinf(ref), 0.0, ref * w).sum(), (em, dur))
            for x, y in zip(g, want, strict=True):
                torch.testing.assert_close(x, y)


def test_segment_scores_gradient_ignores_the_impossible_segments():
    # a gradient reaching the -inf entries (t < d) must not reach the emissions or durations
    gen = torch.Generator().manual_seed(5)
    for t, k in ((6, 3), (3, 5)):
        em = torch.randn(2, t, 3, dtype=D, generator=gen, requires_grad=True)
        for dur in (torch.randn(3, k, dtype=D, generator=gen, requires_grad=True),
                    torch.randn(2, 3, k, dtype=D, generator=gen, requires_grad=True)):
            w = torch.randn(2, t, k, 3, dtype=D, generator=gen)  # nonzero everywhere
            got = torch.autograd.grad(semimarkov.segment_scores(em, dur), (em, dur), w)
            if dur.dim() == 2:
                ref = _loop_segment_scores(em, dur)
            else:
                ref = torch.cat([_loop_segment_scores(em[i : i + 1], dur[i]) for i in range(2)])
            want = torch.autograd.grad(ref, (em, dur), w)
            for x, y in zip(got, want, strict=True):
                torch.testing.assert_close(x, y)


def test_segment_scores_under_torch_func():
    from torch.func import grad, jvp, vmap

    gen = torch.Generator().manual_seed(6)
    em = torch.randn(2, 5, 3, dtype=D, generator=gen)
    dur = torch.randn(3, 3, dtype=D, generator=gen)
    w = torch.randn(2, 5, 3, 3, dtype=D, generator=gen)

    def f(em, dur):
        seg = semimarkov.segment_scores(em, dur)
        return torch.where(torch.isinf(seg), 0.0, seg * w).sum()

    def f_loop(em, dur):
        seg = _loop_segment_scores(em, dur)
        return torch.where(torch.isinf(seg), 0.0, seg * w).sum()

    for x, y in zip(grad(f, argnums=(0, 1))(em, dur), grad(f_loop, argnums=(0, 1))(em, dur),
                    strict=True):
        torch.testing.assert_close(x, y)
    tangents = (torch.randn(2, 5, 3, dtype=D, generator=gen), torch.randn(3, 3, dtype=D,
                                                                          generator=gen))
    _, t = jvp(semimarkov.segment_scores, (em, dur), tangents)
    _, t_loop = jvp(_loop_segment_scores, (em, dur), tangents)
    torch.testing.assert_close(t, t_loop)
    batched = vmap(lambda e: semimarkov.segment_scores(e, dur))(em.unsqueeze(1))
    torch.testing.assert_close(batched.squeeze(1), semimarkov.segment_scores(em, dur))


def test_segment_scores_rejects_mismatched_durations():
    em = torch.zeros(2, 4, 3, dtype=D)
    with pytest.raises(ValueError, match="batch size"):
        semimarkov.segment_scores(em, torch.zeros(3, 3, 2, dtype=D))
    with pytest.raises(TypeError, match="dtype"):
        semimarkov.segment_scores(em, torch.zeros(3, 2))


def test_segment_scores_second_derivative():
    gen = torch.Generator().manual_seed(4)
    em = torch.randn(1, 5, 2, dtype=D, generator=gen, requires_grad=True)
    dur = torch.randn(2, 3, dtype=D, generator=gen, requires_grad=True)

    def f(em, dur):
        seg = semimarkov.segment_scores(em, dur)
        return torch.where(torch.isinf(seg), 0.0, seg.exp()).sum()

    assert torch.autograd.gradgradcheck(f, (em, dur))


def test_semirings_agree_with_fast_paths():
    gen = torch.Generator().manual_seed(1)
    b, t, z, k = 3, 7, 4, 3
    fac = lorank.LowRank(torch.randn(z, 2, dtype=D, generator=gen),
                         torch.randn(z, 2, dtype=D, generator=gen))
    init = torch.log_softmax(torch.randn(b, z, dtype=D, generator=gen), -1)
    dur = torch.log_softmax(torch.randn(z, k, dtype=D, generator=gen), -1)
    seg = semimarkov.segment_scores(torch.randn(b, t, z, dtype=D, generator=gen), dur)
    lengths = torch.tensor([7, 5, 2])
    lp = fac.log_probs()
    fast = semimarkov.log_partition(init, fac, seg, lengths)
    torch.testing.assert_close(semimarkov.semiring_forward(init, lp, seg, lengths, LogSemiring),
                               fast)
    best, states, starts = semimarkov.viterbi(init, lp, seg, lengths)
    torch.testing.assert_close(
        semimarkov.semiring_forward(init, lp, seg, lengths, MaxSemiring), best)
    torch.testing.assert_close(
        semimarkov.segmentation_score(init, fac, seg, lengths, states, starts), best)


def test_float32_long_sequence_keeps_precision():
    gen = torch.Generator().manual_seed(2)
    b, t, z, k = 1, 3000, 3, 5
    em = -50 + torch.randn(b, t, z, dtype=D, generator=gen)
    dur = torch.log_softmax(torch.randn(z, k, dtype=D, generator=gen), -1)
    s64 = semimarkov.segment_scores(em, dur)
    s32 = semimarkov.segment_scores(em.float(), dur.float())
    # differences of a float32 cumulative sum would be off by ~1e-2 here
    assert (s32.double() - s64)[torch.isfinite(s64)].abs().max() < 1e-3
