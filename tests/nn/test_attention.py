"""lorank.nn.LowRankMultiHeadAttention: the LAMA formula, masking, sizes and errors."""

from __future__ import annotations

import pytest
import torch

from lorank.nn import LowRankMultiHeadAttention


def test_heads_are_rank_k_bilinear_forms(gen):
    torch.manual_seed(0)
    b, t, d, heads, k = 2, 5, 6, 3, 4
    att = LowRankMultiHeadAttention(d, heads, k, dtype=torch.float64)
    x = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    out, w = att(x, return_weights=True)
    gate = torch.tanh(att.u.weight @ att.context)
    for i in range(heads):
        # head i: softmax_t of tanh(V x_t)^T diag(P[:, i] * gate) 1, i.e. rank <= k
        aff = torch.tanh(x @ att.v.weight.mT) @ (att.pool[:, i] * gate)
        ref = torch.softmax(aff, -1)
        assert torch.allclose(w[:, i], ref, atol=1e-12)
        assert torch.allclose(out[:, i * d:(i + 1) * d], (ref.unsqueeze(-1) * x).sum(1),
                              atol=1e-12)
    assert out.shape == (b, heads * d)
    n_params = sum(p.numel() for p in att.parameters())
    assert n_params == 2 * k * d + k * heads + d


@pytest.mark.parametrize("context", ["learned", "mean"])
def test_padding_is_ignored(context, gen):
    att = LowRankMultiHeadAttention(4, 2, 3, context=context, concat=False,
                                    dtype=torch.float64)
    x = torch.randn(1, 6, 4, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False, False, False]])
    y1, w = att(x, mask, return_weights=True)
    x2 = x.clone()
    x2[:, 3:] = 100.0
    y2 = att(x2, mask)
    assert torch.allclose(y1, y2, atol=1e-12)
    assert torch.all(w[..., 3:] == 0)
    assert torch.allclose(y1, att(x[:, :3]), atol=1e-12)  # same as the unpadded sequence
    assert y1.shape == (1, 4)


def test_gradients_flow(gen):
    att = LowRankMultiHeadAttention(5, 2, 3, context="mean", dtype=torch.float64)
    x = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: att(z), (x,))


@pytest.mark.parametrize("kwargs, match", [
    ({"dim": 0, "heads": 1, "rank": 1}, "dim must be a positive"),
    ({"dim": 4, "heads": 2, "rank": 1, "context": "query"}, "context must be"),
    ({"dim": 4, "heads": 2, "rank": 1, "dropout": 1.5}, "dropout"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankMultiHeadAttention(**kwargs)


def test_bad_inputs(gen):
    att = LowRankMultiHeadAttention(4, 2, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, 4\)"):
        att(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        att(torch.zeros(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="without any real position"):
        att(torch.zeros(2, 3, 4), torch.tensor([[True, False, False], [False] * 3]))
