"""Semi-Markov dynamic programs: segment scores, semirings, precision."""

import math

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
