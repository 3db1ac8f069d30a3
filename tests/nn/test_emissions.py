"""Emission heads: softmax words (gathered columns), Bernoulli-88 piano keys against a
per-key brute force, and every head with every transition type."""

import pytest
import torch
from brute import brute_hmm, reference_log_potentials

import lorank
from lorank.nn.emissions import Bernoulli88Emission, SoftmaxEmission
from lorank.nn.hmm import MODELS, HMMConfig, NeuralHMM

F64 = torch.float64


def _rolls(b=3, t=5, k=88, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, k, generator=g) < 0.1


@pytest.mark.parametrize("layers", [0, 1])
def test_bernoulli88_matches_per_key_sum(layers):
    torch.manual_seed(0)
    head = Bernoulli88Emission(hidden=8, mlp_layers=layers).to(F64)
    emb = torch.randn(4, 8, dtype=F64)
    x = _rolls()
    em = head(emb, x)
    assert em.shape == (3, 5, 4)
    p = torch.sigmoid(head.key_logits(emb))  # (Z, 88)
    xf = x.to(F64).unsqueeze(-2)  # (B, T, 1, 88)
    ref = (xf * p.log() + (1 - xf) * (1 - p).log()).sum(-1)
    torch.testing.assert_close(em, ref)
    # bool and float observations agree
    torch.testing.assert_close(head(emb, x.to(F64)), em)


def test_bernoulli88_sample_and_errors():
    head = Bernoulli88Emission(hidden=4, mlp_layers=0)
    frames = head.sample(torch.randn(6, 4), torch.Generator().manual_seed(0))
    assert frames.shape == (6, 88) and frames.dtype == torch.bool
    with pytest.raises(ValueError, match=r"piano rolls must have shape \(B, T, 88\)"):
        head(torch.randn(2, 4), torch.zeros(1, 3, 87))
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        Bernoulli88Emission(hidden=0)


def test_softmax_emission_gather_and_unigram_init():
    torch.manual_seed(0)
    head = SoftmaxEmission(vocab_size=9, hidden=4, mlp_layers=1)
    emb = torch.randn(3, 4)
    tokens = torch.tensor([[1, 5, 5, 8], [0, 0, 2, 1]])
    em = head(emb, tokens)
    full = head.log_probs(emb)
    torch.testing.assert_close(em, full.T[tokens])
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(3))
    counts = torch.tensor([5.0, 1, 0, 0, 0, 0, 0, 0, 2])
    head.init_unigram(counts)
    p = (counts + 0.5) / (counts + 0.5).sum()
    torch.testing.assert_close(head.bias.exp(), p.float())
    with pytest.raises(ValueError, match="token ids must lie"):
        head(emb, torch.tensor([[9]]))
    with pytest.raises(TypeError, match="integer tensor"):
        head(emb, torch.zeros(1, 2))


@pytest.mark.parametrize("name", MODELS)
def test_bernoulli_head_with_every_transition(name):
    torch.manual_seed(0)
    head = Bernoulli88Emission(hidden=6, mlp_layers=1)
    config = HMMConfig(num_states=5, hidden=6, model=name, rank=None if name == "hmm" else 2,
                       band=1 if name == "lhmm_band" else None, state_dropout=0.4)
    model = NeuralHMM(config, head).to(F64).eval()
    x, lengths = _rolls(2, 4), torch.tensor([4, 3])
    dist = model(x, lengths)
    with torch.no_grad():
        trans = reference_log_potentials(model.transition()).log_softmax(-1)
        init = model.init_logits().log_softmax(-1)
        em = head(model.state_emb, x)
    ref = brute_hmm(init, trans, em, lengths)
    torch.testing.assert_close(dist.log_partition.detach(), ref.log_partition)
    # training with state dropout works and has gradients for the head
    model.train()
    loss = -model(x, lengths, generator=torch.Generator().manual_seed(0)).log_partition.sum()
    loss.backward()
    assert head.out.weight.grad is not None and torch.isfinite(head.out.weight.grad).all()
    # prior samples: frames per step
    paths, frames = model.eval().sample_paths(3, 4, torch.Generator().manual_seed(0))
    assert paths.shape == (3, 4) and len(frames) == 4 and frames[0].shape == (3, 88)
    if name == "rank_space":
        assert isinstance(dist, lorank.RankSpaceHMM)


def test_log_softmax_rows_gradients():
    """The gathered log-softmax's custom Function: value, gradient, second derivative and
    forward mode, in float64, against finite differences and the plain expression."""
    from lorank.nn.emissions import log_softmax_rows

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, dtype=torch.float64, generator=gen).requires_grad_()
    rows = torch.tensor([0, 3, 4, 8])

    def fn(t):
        return log_softmax_rows(t, rows)

    torch.testing.assert_close(fn(x), x.log_softmax(0)[rows])
    assert torch.autograd.gradcheck(fn, (x,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, (x,))
    # the head's output equals the full table's columns, gradients included
    head = SoftmaxEmission(vocab_size=30, hidden=8, mlp_layers=1).double()
    emb = torch.randn(6, 8, dtype=torch.float64, generator=gen).requires_grad_()
    tokens = torch.tensor([[3, 7, 3], [29, 0, 7]])
    out = head(emb, tokens)
    ref = head.log_probs(emb)[:, tokens].permute(1, 2, 0)
    torch.testing.assert_close(out, ref)
    w = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    g1 = torch.autograd.grad((out * w).sum(), [emb, head.word_emb])
    g2 = torch.autograd.grad((ref * w).sum(), [emb, head.word_emb])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)
