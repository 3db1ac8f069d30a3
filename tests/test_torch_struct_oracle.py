"""lorank's dense HMM against torch-struct's HMM (an independent implementation)."""

import pytest
import torch

import lorank

torch_struct = pytest.importorskip("torch_struct")


@pytest.mark.parametrize("z,t", [(3, 5), (8, 12)])
def test_dense_hmm_matches_torch_struct(z: int, t: int) -> None:
    gen = torch.Generator().manual_seed(z * 100 + t)
    b, vocab = 4, 7
    trans = torch.randn(z, z, generator=gen, dtype=torch.float64).log_softmax(-1)
    table = torch.randn(vocab, z, generator=gen, dtype=torch.float64).log_softmax(0)
    init = torch.randn(z, generator=gen, dtype=torch.float64).log_softmax(0)
    obs = torch.randint(0, vocab, (b, t), generator=gen)

    ours = lorank.HMM(init, lorank.Dense(trans), table[obs])
    # torch-struct indexes its transition [next, previous]
    theirs = torch_struct.HMM(trans.T, table, init, obs)
    torch.testing.assert_close(ours.log_partition, theirs.partition)
    # edge marginals (B, T-1, next, prev) -> state marginals at t >= 1
    edge = theirs.marginals
    torch.testing.assert_close(ours.marginals[:, 1:], edge.sum(-1))
    torch.testing.assert_close(ours.marginals[:, 0], edge[:, 0].sum(-2))
    # Viterbi: the best path's score agrees
    best = theirs.argmax  # (B, T-1, next, prev) one-hot
    their_path = torch.cat([best[:, :1].sum(-2).argmax(-1), best.sum(-1).argmax(-1)], dim=1)
    torch.testing.assert_close(ours.score(ours.argmax), ours.score(their_path))
    torch.testing.assert_close(ours.max_score, ours.score(their_path))
