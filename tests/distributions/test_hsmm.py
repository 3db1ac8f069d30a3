"""HSMM against brute-force enumeration of all segmentations (float64)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brute_structures import hsmm_brute  # noqa: E402

import lorank  # noqa: E402
from lorank.distributions.hsmm import (  # noqa: E402
    HSMM,
    Segmentation,
    categorical_emission,
    gaussian_emission,
    poisson_duration,
)

D = torch.float64


def _factor(kind, z, gen, batch=()):
    def r(*s):
        return torch.randn(*batch, *s, dtype=D, generator=gen)

    if kind == "dense":
        return lorank.Dense(r(z, z))
    if kind == "low_rank":
        return lorank.LowRank(r(z, 2), r(z, 2))
    if kind == "sum":
        return lorank.LowRank(r(z, 2), r(z, 2)) + lorank.Banded(r(z, 3), 1)
    raise ValueError(kind)


def _model(kind="dense", b=3, t=5, z=3, k=3, seed=0, batch_factor=False, lengths=(5, 3, 1)):
    gen = torch.Generator().manual_seed(seed)
    fac = _factor(kind, z, gen, (b,) if batch_factor else ())
    init = torch.randn(z, dtype=D, generator=gen)
    dur = torch.randn(z, k, dtype=D, generator=gen)
    em = torch.randn(b, t, z, dtype=D, generator=gen)
    return HSMM(init, fac, dur, em, torch.tensor(lengths[:b]))


def _brute(h, b):
    trans = h.transition.log_probs()
    trans = trans[b] if trans.dim() == 3 else trans
    return hsmm_brute(h.init_logp[b], trans, h.duration_logp, h.emission[b], int(h.lengths[b]))


def _to_seg(h, segs_list):
    """Brute-force segment lists of sequence b -> a Segmentation batch (N, B, T) placing them
    in batch row 0 and copying h.argmax for the other rows."""
    n = len(segs_list)
    states = h.argmax.states.expand(n, -1, -1).clone()
    starts = h.argmax.starts.expand(n, -1, -1).clone()
    states[:, 0] = -1
    starts[:, 0] = False
    for i, segs in enumerate(segs_list):
        for a, e, z in segs:
            states[i, 0, a : e + 1] = z
            starts[i, 0, a] = True
    return Segmentation(states, starts)


@pytest.mark.parametrize("kind", ["dense", "low_rank", "sum"])
@pytest.mark.parametrize("batch_factor", [False, True])
def test_against_brute_force(kind, batch_factor):
    h = _model(kind, batch_factor=batch_factor, seed=1)
    ent = h.entropy()
    for b in range(h.batch_size):
        r = _brute(h, b)
        torch.testing.assert_close(h.log_partition[b], r["log_partition"])
        torch.testing.assert_close(h.marginals[b], r["marginals"])
        torch.testing.assert_close(h.segment_marginals[b], r["segment_marginals"])
        torch.testing.assert_close(h.max_score[b], r["max_score"])
        torch.testing.assert_close(ent[b], r["entropy"])
    torch.testing.assert_close(h.score(h.argmax), h.max_score)


def test_argmax_is_the_unique_best():
    # continuous random scores with K=2 and distinct durations give no ties
    h = _model("dense", b=2, t=6, z=2, k=2, seed=3, lengths=(6, 4))
    for b in range(2):
        r = _brute(h, b)
        probs = r["probs"].sort(descending=True).values
        if probs[0] - probs[1] > 1e-9:
            assert h.argmax.segments(b) == r["argmax"]
        assert h.argmax.states[b, int(h.lengths[b]) :].eq(-1).all()


def test_log_prob_normalizes_over_all_segmentations():
    h = _model("low_rank", seed=2)
    r = _brute(h, 0)
    seg = _to_seg(h, r["all"])
    lp = h.log_prob(seg)[:, 0]
    torch.testing.assert_close(lp.exp().sum(), torch.tensor(1.0, dtype=D))
    torch.testing.assert_close(lp.exp(), r["probs"])


def test_sampling_matches_marginals():
    h = _model("sum", seed=4)
    gen = torch.Generator().manual_seed(0)
    s = h.sample((4000,), generator=gen)
    assert s.states.shape == (4000, 3, 5)
    emp = h.to_chart(s).mean(0)
    assert (emp - h.segment_marginals).abs().max() < 0.04
    assert torch.isfinite(h.log_prob(s)).all()
    assert (s.states[:, 1, 3:] == -1).all()


def test_factorizations_match_dense_equivalent():
    h = _model("sum", seed=5)
    hd = HSMM(h.init_logp[0], lorank.Dense(h.transition.log_probs()), h.duration_logp,
              h.emission, h.lengths)
    torch.testing.assert_close(h.log_partition, hd.log_partition)
    torch.testing.assert_close(h.segment_marginals, hd.segment_marginals)


def test_duration_one_is_an_hmm():
    gen = torch.Generator().manual_seed(6)
    z = 4
    fac = lorank.LowRank(torch.randn(z, 2, dtype=D, generator=gen),
                         torch.randn(z, 2, dtype=D, generator=gen))
    init = torch.randn(z, dtype=D, generator=gen)
    em = torch.randn(2, 7, z, dtype=D, generator=gen)
    lengths = torch.tensor([7, 4])
    h = HSMM(init, fac, torch.zeros(z, 1, dtype=D), em, lengths)
    hmm = lorank.HMM(init, fac, em, lengths)
    torch.testing.assert_close(h.log_partition, hmm.log_partition)
    torch.testing.assert_close(h.marginals, hmm.marginals)
    torch.testing.assert_close(h.entropy(), hmm.entropy())


def test_max_duration_longer_than_sequence():
    h = _model("dense", b=2, t=3, z=2, k=6, seed=7, lengths=(3, 2))
    for b in range(2):
        torch.testing.assert_close(h.log_partition[b], _brute(h, b)["log_partition"])


def test_gradcheck_log_partition():
    gen = torch.Generator().manual_seed(8)
    z, k = 3, 2
    left = torch.randn(z, 2, dtype=D, generator=gen, requires_grad=True)
    right = torch.randn(z, 2, dtype=D, generator=gen, requires_grad=True)
    dur = torch.randn(z, k, dtype=D, generator=gen, requires_grad=True)
    em = torch.randn(2, 4, z, dtype=D, generator=gen, requires_grad=True)
    init = torch.randn(z, dtype=D, generator=gen)

    def f(left, right, dur, em):
        return HSMM(init, lorank.LowRank(left, right), dur, em, torch.tensor([4, 2])).log_partition

    assert torch.autograd.gradcheck(f, (left, right, dur, em))


def test_errors():
    z = 3
    fac = lorank.Dense(torch.randn(z, z))
    em = torch.randn(2, 4, z)
    with pytest.raises(ValueError, match="K >= 1"):
        HSMM(torch.zeros(z), fac, torch.zeros(z, 0), em)
    with pytest.raises(ValueError, match="duration must have shape"):
        HSMM(torch.zeros(z), fac, torch.zeros(z + 1, 2), em)
    with pytest.raises(ValueError, match="dimensions"):
        HSMM(torch.zeros(z), fac, torch.zeros(z, 2), em[0])
    with pytest.raises(ValueError, match="init must have shape"):
        HSMM(torch.zeros(z + 1), fac, torch.zeros(z, 2), em)
    with pytest.raises(ValueError, match="lengths must lie"):
        HSMM(torch.zeros(z), fac, torch.zeros(z, 2), em, torch.tensor([5, 1]))
    with pytest.raises(TypeError, match="factor"):
        HSMM(torch.zeros(z), torch.randn(z, z), torch.zeros(z, 2), em)
    with pytest.raises(ValueError, match="states"):
        HSMM(torch.zeros(z), lorank.Dense(torch.randn(z + 1, z + 1)), torch.zeros(z, 2), em)
    h = HSMM(torch.zeros(z), fac, torch.zeros(z, 2), em)
    long_seg = Segmentation(torch.zeros(2, 4, dtype=torch.long),
                            torch.tensor([[True, False, False, False]] * 2))
    with pytest.raises(ValueError, match="longer than the maximum duration"):
        h.score(long_seg)
    with pytest.raises(ValueError, match="max_duration"):
        poisson_duration(torch.ones(3), 0)


def test_poisson_duration():
    rate = torch.tensor([0.5, 3.0], dtype=D)
    lp = poisson_duration(rate, 6)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, dtype=D))
    pois = torch.distributions.Poisson(rate.unsqueeze(-1)).log_prob(torch.arange(6, dtype=D))
    torch.testing.assert_close(lp, torch.log_softmax(pois, -1))


def test_emission_helpers():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 3, dtype=D, generator=gen)
    mean = torch.randn(4, 3, dtype=D, generator=gen)
    log_std = torch.randn(4, 3, dtype=D, generator=gen) * 0.3
    got = gaussian_emission(x, mean, log_std)
    want = torch.distributions.Normal(mean, log_std.exp()).log_prob(x.unsqueeze(-2)).sum(-1)
    torch.testing.assert_close(got, want)
    tokens = torch.tensor([[0, 2, -1]])
    logits = torch.randn(4, 3, dtype=D, generator=gen)
    ce = categorical_emission(tokens, logits)
    torch.testing.assert_close(ce[0, 1], torch.log_softmax(logits, -1)[:, 2])
    assert (ce[0, 2] == 0).all()
