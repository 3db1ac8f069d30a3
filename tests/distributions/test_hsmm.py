"""HSMM against brute-force enumeration of all segmentations (float64).

The brute force takes the transition matrix from the factor's raw parameters by its documented
formula (``brute.reference_log_transition``) and normalizes init and durations itself."""

import math

import pytest
import torch
from brute import leaves, random_factor, reference_log_transition
from brute_structures import hsmm_brute, normalize_rows

import lorank
from lorank.distributions.hsmm import (
    HSMM,
    Segmentation,
    categorical_emission,
    gaussian_emission,
    poisson_duration,
)

D = torch.float64
NEG = -math.inf


def _factor(kind, z, gen, batch=()):
    name = {"low_rank": "lowrank", "sum": "lowrank+banded"}.get(kind, kind)
    return random_factor(name, z, batch=batch[0] if batch else None, generator=gen)


class Case:
    """An HSMM and the raw inputs it was built from (``edit`` may change them first)."""

    def __init__(self, kind="dense", b=3, t=5, z=3, k=3, seed=0, batch_factor=False,
                 lengths=(5, 3, 1), edit=None):
        gen = torch.Generator().manual_seed(seed)
        self.transition = _factor(kind, z, gen, (b,) if batch_factor else ())
        self.init = torch.randn(z, dtype=D, generator=gen)
        self.duration = torch.randn(z, k, dtype=D, generator=gen)
        self.emission = torch.randn(b, t, z, dtype=D, generator=gen)
        if edit is not None:
            edit(self)
        self.lengths = torch.tensor(lengths[:b])
        self.h = HSMM(self.init, self.transition, self.duration, self.emission, self.lengths)

    def brute(self, b):
        trans = reference_log_transition(self.transition)
        trans = trans[b] if trans.dim() == 3 else trans
        return hsmm_brute(normalize_rows(self.init, 1), trans, normalize_rows(self.duration, 1),
                          self.emission[b], int(self.lengths[b]))


def _check_against_brute(c: Case):
    h = c.h
    ent = h.entropy()
    for b in range(h.batch_size):
        r = c.brute(b)
        torch.testing.assert_close(h.log_partition[b], r["log_partition"])
        torch.testing.assert_close(h.marginals[b], r["marginals"])
        torch.testing.assert_close(h.segment_marginals[b], r["segment_marginals"])
        torch.testing.assert_close(h.max_score[b], r["max_score"])
        torch.testing.assert_close(ent[b], r["entropy"])
    torch.testing.assert_close(h.score(h.argmax), h.max_score)


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


@pytest.mark.parametrize("kind", ["dense", "low_rank", "banded", "sum"])
@pytest.mark.parametrize("batch_factor", [False, True])
def test_against_brute_force(kind, batch_factor):
    _check_against_brute(Case(kind, batch_factor=batch_factor, seed=1))


def test_argmax_is_the_unique_best():
    # continuous random scores with K=2 and distinct durations give no ties
    c = Case("dense", b=2, t=6, z=2, k=2, seed=3, lengths=(6, 4))
    h = c.h
    for b in range(2):
        r = c.brute(b)
        probs = r["probs"].sort(descending=True).values
        if probs[0] - probs[1] > 1e-9:  # segments() ends are exclusive, brute's inclusive
            assert h.argmax.segments(b) == [(a, e + 1, z) for a, e, z in r["argmax"]]
        assert h.argmax.states[b, int(h.lengths[b]) :].eq(-1).all()


def test_log_prob_normalizes_over_all_segmentations():
    c = Case("low_rank", seed=2)
    h = c.h
    r = c.brute(0)
    seg = _to_seg(h, r["all"])
    lp = h.log_prob(seg)[:, 0]
    torch.testing.assert_close(lp.exp().sum(), torch.tensor(1.0, dtype=D))
    torch.testing.assert_close(lp.exp(), r["probs"])


def test_sampling_matches_marginals():
    c = Case("sum", seed=4)
    h = c.h
    gen = torch.Generator().manual_seed(0)
    s = h.sample((4000,), generator=gen)
    assert s.states.shape == (4000, 3, 5)
    emp = h.to_chart(s).mean(0)
    assert (emp - h.segment_marginals).abs().max() < 0.04
    assert torch.isfinite(h.log_prob(s)).all()
    assert (s.states[:, 1, 3:] == -1).all()


def test_factorizations_match_dense_equivalent():
    c = Case("sum", seed=5)
    h = c.h
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
    c = Case("dense", b=2, t=3, z=2, k=6, seed=7, lengths=(3, 2))
    h = c.h
    for b in range(2):
        torch.testing.assert_close(h.log_partition[b], c.brute(b)["log_partition"])


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


# ---- issue 11: the edge cases a user hits ----------------------------------------------------
EDGE_KINDS = ["dense", "low_rank", "banded", "sum"]


def _no_nan_anywhere(c: Case):
    """Every output and every gradient (of log Z, entropy and marginals) is NaN-free."""
    h = c.h
    fac, params = leaves(c.transition)
    init = c.init.clone().requires_grad_(True)
    dur = c.duration.clone().requires_grad_(True)
    em = c.emission.clone().requires_grad_(True)
    g = HSMM(init, fac, dur, em, c.lengths)
    outs = [g.log_partition, g.marginals, g.segment_marginals, g.max_score, g.entropy(),
            g.score(g.argmax), g.log_prob(g.argmax)]
    for o in outs:
        assert not torch.isnan(o).any()
    finite = torch.isfinite(g.log_partition)
    loss = g.log_partition[finite].sum() + g.entropy().sum()
    grads = torch.autograd.grad(loss, [init, dur, em, *params])
    for gr in grads:
        assert not torch.isnan(gr).any()
    assert not torch.isnan(h.sample((4,), generator=torch.Generator().manual_seed(0)).states).any()


@pytest.mark.parametrize("kind", EDGE_KINDS)
@pytest.mark.parametrize("batch_factor", [False, True])
def test_all_neg_inf_duration_row(kind, batch_factor):
    """State 1 can never form a segment: it is simply never used (no NaN anywhere)."""

    def edit(c):
        c.duration[1] = NEG

    c = Case(kind, seed=30, batch_factor=batch_factor, edit=edit)
    _check_against_brute(c)
    _no_nan_anywhere(c)
    assert (c.h.marginals[..., 1] == 0).all()
    assert not (c.h.argmax.states == 1).any()


@pytest.mark.parametrize("kind", EDGE_KINDS)
def test_impossible_sequence_is_flagged_and_does_not_poison_the_batch(kind):
    """No state can emit position 2 of sequence 1; sequences 0 and 2 are answered as if alone."""

    def edit(c):
        c.emission[1, 2] = NEG
        c.emission[2, 1:] = NEG  # -inf in padding is ignored

    c = Case(kind, seed=31, edit=edit)
    h = c.h
    _check_against_brute(c)
    _no_nan_anywhere(c)
    assert h.log_partition[1] == NEG and h.max_score[1] == NEG and h.entropy()[1] == 0
    assert (h.argmax.states[1] == -1).all() and not h.argmax.starts[1].any()
    assert h.argmax.segments(1) == [] and h.argmax.empty().tolist() == [False, True, False]
    s = h.sample((10,), generator=torch.Generator().manual_seed(2))
    assert s.empty()[:, 1].all() and not s.empty()[:, [0, 2]].any()
    lp = h.log_prob(s)
    assert torch.isfinite(lp[:, [0, 2]]).all() and (lp[:, 1] == NEG).all()
    assert (h.to_chart(s)[:, 1] == 0).all()


def test_dead_transition_row_is_legal():
    """A state with no successor may still end the sequence (HSMMs allow it)."""

    def edit(c):
        c.transition.logits[0] = NEG

    c = Case("dense", seed=32, edit=edit)
    _check_against_brute(c)
    _no_nan_anywhere(c)


def test_mixed_dtypes_fail_up_front_naming_the_arguments():
    z = 3
    em = torch.randn(2, 4, z, dtype=D)
    fac = lorank.Dense(torch.randn(z, z, dtype=D))
    with pytest.raises(TypeError, match=r"duration has dtype torch.float32.*emission has dtype "
                                        r"torch.float64"):
        HSMM(torch.zeros(z, dtype=D), fac, torch.zeros(z, 2), em)
    with pytest.raises(TypeError, match="init has dtype torch.float32"):
        HSMM(torch.zeros(z), fac, torch.zeros(z, 2, dtype=D), em)
    with pytest.raises(TypeError, match="transition has dtype torch.float32"):
        HSMM(torch.zeros(z, dtype=D), lorank.Dense(torch.randn(z, z)), torch.zeros(z, 2,
             dtype=D), em)


def test_all_neg_inf_init_row_is_rejected():
    init = torch.zeros(2, 3, dtype=D)
    init[1] = NEG
    with pytest.raises(ValueError, match=r"init .* all -inf"):
        HSMM(init, lorank.Dense(torch.randn(3, 3, dtype=D)), torch.zeros(3, 2, dtype=D),
             torch.randn(2, 4, 3, dtype=D))


def test_segments_have_exclusive_ends():
    seg = Segmentation(torch.tensor([[2, 2, 0, -1]]), torch.tensor([[True, False, True, False]]))
    assert seg.segments(0) == [(0, 2, 2), (2, 3, 0)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_naming_the_argument(dtype):
    import lorank

    with pytest.raises(TypeError, match=rf"has dtype {dtype}.*float32 or float64"):
        lorank.HSMM(torch.randn(3, dtype=dtype), lorank.Dense(torch.randn(3, 3, dtype=dtype)),
                    torch.randn(3, 2, dtype=dtype), torch.randn(1, 4, 3, dtype=dtype))
