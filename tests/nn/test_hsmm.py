"""LHSMM: contract and learning on synthetic segment data."""

import pytest
import torch

import lorank
from lorank.nn.hsmm import LHSMM, sequence_windows


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
    model = LHSMM(12, 1, rank=4, max_duration=8, emb_dim=8, dense=dense, init_data=x, seed=0)
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


def test_windows_and_errors():
    w = sequence_windows(torch.arange(100.0), 20, 10)
    assert w.shape == (9, 20, 1)
    torch.testing.assert_close(w.mean(), torch.tensor(0.0), atol=0.2, rtol=0)
    with pytest.raises(ValueError, match="fewer than one window"):
        sequence_windows(torch.arange(5.0), 20)
    with pytest.raises(ValueError, match="positive integer"):
        LHSMM(4, 1, max_duration=0)
    with pytest.raises(ValueError, match="x must have shape"):
        LHSMM(4, 2)(torch.zeros(1, 5, 3))
