"""LHSMM: contract and learning on synthetic segment data."""

import pytest
import torch

import lorank
from lorank.config import ConfigError
from lorank.nn.hsmm import LHSMM, HSMMConfig


def _data():
    g = torch.Generator().manual_seed(0)
    xs = []
    for _ in range(8):
        seq = []
        while len(seq) < 40:
            level = float(torch.randint(-2, 3, (1,), generator=g))
            seq += [level] * int(torch.randint(3, 8, (1,), generator=g))
        xs.append(torch.tensor(seq[:40]))
    x = torch.stack(xs).unsqueeze(-1) + 0.1 * torch.randn(8, 40, 1, generator=g)
    return x, torch.tensor([40, 40, 35, 30, 40, 40, 20, 40])


@pytest.mark.parametrize("dense", [False, True])
def test_loss_decreases(dense):
    x, lengths = _data()
    model = LHSMM(num_states=12, rank=None if dense else 4, max_duration=8, emb_dim=8,
                  model="hsmm" if dense else "lhsmm", init_data=x, seed=0)
    dist = model((x, lengths))
    assert isinstance(dist, lorank.HSMM) and dist.log_partition.shape == (8,)
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = -model(x, lengths).log_partition.sum() / lengths.sum()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses
    seg = model(x, lengths).argmax
    assert seg.states.shape == (8, 40)


def test_errors():
    with pytest.raises(ConfigError, match="max_duration must be a positive integer"):
        LHSMM(num_states=4, max_duration=0)
    with pytest.raises(ValueError, match="x must have shape"):
        LHSMM(HSMMConfig(num_states=4, obs_dim=2))(torch.zeros(1, 5, 3))
