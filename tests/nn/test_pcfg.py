"""Neural PCFG / LPCFG / TN-PCFG language models: contract and learning on a tiny corpus."""

import pytest
import torch

import lorank
from lorank.nn.pcfg import NeuralPCFG


def _corpus():
    # a tiny regular language: det noun verb (det noun)?
    g = torch.Generator().manual_seed(0)
    sents = []
    for _ in range(24):
        s = [int(torch.randint(0, 2, (1,), generator=g)), 2 + int(torch.randint(0, 3, (1,),
             generator=g)), 5 + int(torch.randint(0, 2, (1,), generator=g))]
        if bool(torch.rand(1, generator=g) < 0.5):
            s += [int(torch.randint(0, 2, (1,), generator=g)), 2]
        sents.append(s)
    n = max(len(s) for s in sents)
    tokens = torch.zeros(len(sents), n, dtype=torch.long)
    for i, s in enumerate(sents):
        tokens[i, : len(s)] = torch.tensor(s)
    return tokens, torch.tensor([len(s) for s in sents])


@pytest.mark.parametrize("rule_type", ["dense", "low_rank", "cp", "rank_space"])
def test_loss_decreases(rule_type):
    torch.manual_seed(0)
    tokens, lengths = _corpus()
    model = NeuralPCFG(vocab_size=8, num_nonterminals=4, num_preterminals=5, hidden=32,
                       rule_type=rule_type, rank=None if rule_type == "dense" else 4, seed=0)
    dist = model((tokens, lengths))
    assert isinstance(dist, lorank.PCFG) and dist.log_partition.shape == (24,)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = -model(tokens, lengths).log_partition.sum() / lengths.sum()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.3, losses
    out = model.sample_sentences(3, max_length=10, generator=torch.Generator().manual_seed(1))
    assert len(out) == 3 and all(1 <= len(w) <= 10 for w, _ in out)


def test_one_word_sentences_and_errors():
    model = NeuralPCFG(vocab_size=5, num_nonterminals=2, num_preterminals=3, hidden=8,
                       max_length=4)
    d = model(torch.tensor([[3, 0, 0]]), torch.tensor([1]))
    assert torch.isfinite(d.log_partition).all()
    with pytest.raises(ValueError, match="at most 4"):
        model(torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[7, 1]]))
    with pytest.raises(ValueError, match="rule_type"):
        NeuralPCFG(vocab_size=5, rule_type="sparse")
