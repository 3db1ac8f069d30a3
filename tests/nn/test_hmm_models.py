"""Neural HMM language models: the distribution of a batch against brute force, state and
feature dropout as exact restrictions of the full model, rank space = state space, sampling,
and argument errors."""

import math

import pytest
import torch
from brute import brute_hmm, reference_log_potentials

import lorank
from lorank.config import ConfigError
from lorank.nn.hmm import MODELS, HMMConfig, HMMLanguageModel, HMMLMConfig, NeuralHMM

F64 = torch.float64
V = 11


def _model(name, z=5, rank=2, **kw):
    torch.manual_seed(0)
    band = 1 if name == "lhmm_band" else None
    return HMMLanguageModel(vocab_size=V, num_states=z, model=name,
                            rank=None if name == "hmm" else rank, band=band, hidden=6,
                            **kw).to(F64)


def _batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (3, 4), generator=g)
    return tokens, torch.tensor([4, 2, 1])


@pytest.mark.parametrize("name", MODELS)
def test_log_partition_matches_brute_force(name):
    model = _model(name).eval()
    tokens, lengths = _batch()
    dist = model(tokens, lengths)
    assert isinstance(dist, lorank.RankSpaceHMM if name == "rank_space" else lorank.HMM)
    with torch.no_grad():
        emb = model.state_emb
        phi = reference_log_potentials(model.transition())
        trans = phi.log_softmax(-1)
        init = model.init_logits().log_softmax(-1)
        table = model.emission.log_probs(emb)  # (Z, V)
        emission = table.T[tokens]  # (B, T, Z)
    ref = brute_hmm(init, trans, emission, lengths)
    torch.testing.assert_close(dist.log_partition.detach(), ref.log_partition)


def test_emission_is_the_gathered_log_softmax():
    model = _model("lhmm")
    tokens, _ = _batch()
    em = model.emission(model.state_emb, tokens)
    full = model.emission.log_probs(model.state_emb)
    torch.testing.assert_close(em, full.T[tokens])
    # gradients through the gather equal those through the full table
    g1 = torch.autograd.grad(em.sum(), model.emission.word_emb)[0]
    g2 = torch.autograd.grad(full.T[tokens].sum(), model.emission.word_emb)[0]
    torch.testing.assert_close(g1, g2)


def test_rank_space_model_equals_lhmm():
    lhmm, rs = _model("lhmm"), _model("rank_space")
    rs.load_state_dict(lhmm.state_dict())
    tokens, lengths = _batch()
    a = lhmm.eval()(tokens, lengths).log_partition
    b = rs.eval()(tokens, lengths).log_partition
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a.sum(), lhmm.transition_net.projection)[0]
    gb = torch.autograd.grad(b.sum(), rs.transition_net.projection)[0]
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("name", ["hmm", "lhmm", "lhmm_band"])
def test_state_dropout_restricts_the_full_model(name):
    """With the kernel form, the training-mode transition over a subset of states is the full
    model's potentials restricted to the subset, renormalized (the band included: it links
    states whose full indices are within w).  (The mixture form renormalizes each topic over
    the kept states instead: test_dropout_keeps_exactly_the_drawn_states_and_features.)"""
    model = _model(name, z=9, rank=3, state_dropout=0.4, low_rank_form="kernel")
    g = torch.Generator().manual_seed(0)
    states, feats = model.train().sample_dropout(g)
    assert feats is None and states.numel() == round(9 * 0.6)
    assert torch.equal(states, states.sort().values)
    with torch.no_grad():
        full = reference_log_potentials(model.transition())
        sub = reference_log_potentials(model.transition(states=states))
    want = full[states][:, states].log_softmax(-1)
    torch.testing.assert_close(sub.log_softmax(-1), want)
    # the training distribution is an HMM over the kept states only
    tokens, lengths = _batch()
    dist = model(tokens, lengths, generator=torch.Generator().manual_seed(0))
    assert dist.num_states == states.numel()
    # the same generator seed draws the same subset; eval mode keeps every state
    again = model(tokens, lengths, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dist.log_partition, again.log_partition)
    assert model.eval()(tokens, lengths).num_states == 9


def test_feature_dropout_keeps_a_subset_of_rank_features():
    model = _model("lhmm", z=8, rank=4, feature_dropout=0.5, low_rank_form="kernel").train()
    states, feats = model.sample_dropout(torch.Generator().manual_seed(1))
    assert states is None and feats.numel() == 2
    f = model.transition(features=feats)
    assert isinstance(f, lorank.LowRank) and f.rank == 2
    with torch.no_grad():
        net = model.transition_net
        prev = net.prev_mlp(model.state_emb)
        torch.testing.assert_close(f.left, prev @ net.projection[:, feats])


def test_generate_ends_with_eos():
    model = _model("lhmm").eval()
    sents = model.generate(6, eos_id=1, max_length=8, generator=torch.Generator().manual_seed(0))
    assert len(sents) == 6
    for s in sents:
        assert 1 <= len(s) <= 8 and all(0 <= w < V for w in s)
        assert 1 not in s[:-1]
        assert s[-1] == 1 or len(s) == 8


def test_argument_errors():
    def lm(**kw):
        return HMMLanguageModel(vocab_size=V, num_states=4, **kw)

    with pytest.raises(ConfigError, match="unknown model 'foo'.*hmm, lhmm, lhmm_band, rank_sp"):
        lm(model="foo")
    with pytest.raises(ConfigError, match=r"rank \(8\) must be at most the number of states \(4\)"):
        lm(model="lhmm", rank=8)
    with pytest.raises(ConfigError, match="band applies to model 'lhmm_band' only"):
        lm(model="lhmm", band=2)
    with pytest.raises(ConfigError, match="state_dropout must be a probability"):
        lm(model="hmm", state_dropout=1.0)
    with pytest.raises(ConfigError, match="memory_light needs model 'lhmm'"):
        lm(model="hmm", memory_light=True)
    with pytest.raises(ValueError, match="vocab_size must be set"):
        HMMLanguageModel(num_states=4)
    with pytest.raises(TypeError, match="EmissionHead"):
        NeuralHMM(HMMConfig(num_states=4), torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="HMMConfig"):
        NeuralHMM({"num_states": 4}, torch.nn.Linear(2, 2))
    model = _model("lhmm")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 11\)"):
        model(torch.tensor([[0, 11]]))


def test_default_rank_and_aliases():
    c = HMMLMConfig(num_states=32, model="LHMM+band", hidden=4)
    assert c.model == "lhmm_band" and c.rank == 8 and c.band == 4
    assert HMMLanguageModel(c.replace(vocab_size=V)).rank == 8
    assert HMMLanguageModel(vocab_size=V, num_states=32, model="dense", hidden=4).rank is None
    assert HMMLMConfig(model="rank-space").model == "rank_space"


def test_memory_light_matches():
    a = _model("lhmm", memory_light=False).eval()
    b = _model("lhmm", memory_light=True).eval()
    b.load_state_dict(a.state_dict())
    tokens, lengths = _batch()
    la, lb = a(tokens, lengths).log_partition, b(tokens, lengths).log_partition
    torch.testing.assert_close(la, lb)
    assert math.isfinite(float(la.detach().sum()))


@pytest.mark.parametrize("form", ["kernel", "mixture"])
def test_embedding_transition_is_the_documented_formula(form):
    """Chiu, Deng & Rush (2021)'s parameterization: P = rownorm(exp(U W) exp(V W)^T) with
    transition-only embeddings U, V and one projection W; the mixture form is
    softmax_r(U W) softmax_states(V W)^T.  Both from the raw parameters, in float64."""
    model = _model("lhmm", z=7, rank=3, transition="embedding", low_rank_form=form)
    net = model.transition_net
    left, right = net.prev_emb @ net.projection, net.next_emb @ net.projection
    if form == "kernel":
        want = (left.exp() @ right.exp().T)
        want = want / want.sum(-1, keepdim=True)
    else:
        want = left.softmax(-1) @ right.softmax(0).T
    torch.testing.assert_close(model.transition().to_dense(), want)
    # the emission's state embeddings play no part in the transition
    assert model.transition_net.prev_emb is not model.state_emb
    with torch.no_grad():
        model.state_emb.add_(1.0)
    torch.testing.assert_close(model.transition().to_dense(), want)
    # initial logits: log phi(g(s)) phi(V)^T
    start = net.start_mlp(net.start_emb) @ net.projection
    init = torch.logsumexp(start + right, -1)
    torch.testing.assert_close(model.init_logits().log_softmax(-1), init.log_softmax(-1))


@pytest.mark.parametrize("transition", ["mlp", "embedding"])
@pytest.mark.parametrize("form", ["kernel", "mixture"])
def test_dropout_keeps_exactly_the_drawn_states_and_features(transition, form):
    model = _model("lhmm", z=10, rank=4, transition=transition, low_rank_form=form,
                   state_dropout=0.3, feature_dropout=0.5).train()
    states, feats = model.sample_dropout(torch.Generator().manual_seed(2))
    assert states.numel() == 7 and feats.numel() == 2
    got = model.transition(states=states, features=feats)
    net = model.transition_net
    prev = net.prev_emb if transition == "embedding" else net.prev_mlp(model.state_emb)
    left = (prev @ net.projection)[states][:, feats]
    right = (net.next_emb @ net.projection)[states][:, feats]
    if form == "kernel":
        want = (left.exp() @ right.exp().T)
        want = want / want.sum(-1, keepdim=True)
    else:
        want = left.softmax(-1) @ right.softmax(0).T
    torch.testing.assert_close(got.to_dense(), want)
