"""lorank.compress.adapters (LoRA, WaRA) and lorank.linalg.wavelet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lorank.compress import (
    AdaptedLinear,
    AdapterConfig,
    LowRankLinear,
    SparseDictionaryLinear,
    adapter_parameters,
    attach_adapters,
    compress,
    heal,
    load_adapters,
    merge_adapters,
    save_adapters,
)
from lorank.linalg.wavelet import dwt2, idwt2, wavelet_matrices

pywt = pytest.importorskip("pywt")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 18, dtype=torch.float64)
        self.b = nn.Linear(18, 7, dtype=torch.float64)
        self.c = nn.Linear(18, 7, bias=False, dtype=torch.float64)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) + self.c(h)


@pytest.mark.parametrize("n", [6, 7, 16])
@pytest.mark.parametrize("wavelet", ["haar", "db2", "sym3"])
def test_wavelet_matrices_invert_and_match_pywt(n, wavelet, gen):
    a, s = wavelet_matrices(n, wavelet)
    assert torch.allclose(s @ a, torch.eye(n, dtype=torch.float64), atol=1e-10)  # filter digits
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    ca, cd = pywt.dwt(x.numpy(), wavelet, mode="periodization")
    assert np.allclose((a @ x).numpy(), np.concatenate([ca, cd]))
    if n % 2 == 0:  # orthogonal wavelets, even length: an orthogonal matrix
        assert torch.allclose(a @ a.mT, torch.eye(n, dtype=torch.float64), atol=1e-10)


def test_dwt2_matches_pywt_and_idwt2_inverts(gen):
    x = torch.randn(6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    c = dwt2(x, "db2")
    ca, (ch, cv, cd) = pywt.dwt2(x.detach().numpy(), "db2", mode="periodization")
    assert np.allclose(c.detach().numpy(), np.block([[ca, cv], [ch, cd]]))
    back = idwt2(c, (6, 8), "db2")
    assert torch.allclose(back, x, atol=1e-12)
    ref = pywt.idwt2((ca, (ch, cv, cd)), "db2", mode="periodization")
    assert np.allclose(idwt2(c, (6, 8), "db2").detach().numpy(), ref)
    back.sum().backward()  # differentiable
    assert torch.allclose(x.grad, torch.ones_like(x), atol=1e-12)
    with pytest.raises(ValueError, match="do not belong"):
        idwt2(torch.zeros(5, 8, dtype=torch.float64), (6, 8))


def _bases(gen):
    model = Net().eval()
    x = torch.randn(20, 12, generator=gen, dtype=torch.float64)
    low, _ = compress(model, method="svd", rank=4, measure_latency=False)
    dic, _ = compress(model, method="cospadi", param_reduction=0.3, calibration=[x],
                      dict_lowrank_fallback=False, measure_latency=False)
    assert isinstance(low.b, LowRankLinear) and isinstance(dic.b, SparseDictionaryLinear)
    return {"dense": model, "lowrank": low, "dictionary": dic}, x


@pytest.mark.parametrize("kind", ["lora", "wara"])
def test_zero_init_is_identity_and_merge_is_exact(kind, gen):
    bases, x = _bases(gen)
    for name, base in bases.items():
        ad = attach_adapters(base, kind=kind, rank=3, alpha=6.0, wavelet="db2")
        assert sum(isinstance(m, AdaptedLinear) for m in ad.modules()) == 3, name
        assert torch.equal(ad(x), base(x))  # B = 0: outputs unchanged
        with torch.no_grad():
            for p in adapter_parameters(ad):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        y = ad(x)
        assert not torch.allclose(y, base(x))
        merged = merge_adapters(ad)
        assert not any(isinstance(m, AdaptedLinear) for m in merged.modules())
        assert type(merged.b) is type(base.b)
        assert torch.allclose(merged(x), y, atol=1e-10), name


def test_wara_delta_is_idwt2_of_the_low_rank_coefficients(gen):
    lin = nn.Linear(9, 6, dtype=torch.float64)
    ad = AdaptedLinear(lin, AdapterConfig(kind="wara", rank=2, wavelet="haar"))
    with torch.no_grad():
        ad.adapter_b.normal_(generator=gen)
    coeff = (ad.adapter_b @ ad.adapter_a).detach()
    assert coeff.shape == (6, 10)  # odd input length: one more coefficient
    assert torch.allclose(ad.delta_weight(), idwt2(coeff, (6, 9), "haar"), atol=1e-12)


def test_adapters_only_train_in_heal(gen):
    model = Net()
    x = torch.randn(32, 12, generator=gen, dtype=torch.float64)
    target = torch.randn(32, 7, generator=gen, dtype=torch.float64)
    ad = attach_adapters(model, kind="wara", rank=2, target_modules=["b", "c"])
    before = {n: p.detach().clone() for n, p in ad.named_parameters() if "adapter" not in n}
    losses = heal(ad, [(x, target)], lambda out, b: ((out - b[1]) ** 2).mean(), steps=30,
                  lr=1e-2)
    assert losses[-1] < losses[0]
    for n, p in ad.named_parameters():
        if "adapter" not in n:
            assert torch.equal(p, before[n]), n
            assert p.requires_grad  # restored
    assert ad.b.adapter_b.abs().sum() > 0


@pytest.mark.parametrize("kind", ["lora", "wara"])
def test_safetensors_round_trip_is_exact(kind, gen, tmp_path):
    bases, x = _bases(gen)
    base = bases["dictionary"]
    ad = attach_adapters(base, kind=kind, rank=2, exclude_modules=["c"])
    with torch.no_grad():
        for p in adapter_parameters(ad):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    path = save_adapters(ad, tmp_path / "adapters.safetensors")
    back = load_adapters(base, path)
    assert torch.equal(back(x), ad(x))
    for (n1, p1), (n2, p2) in zip(sorted((n, p) for n, p in ad.named_parameters()
                                         if "adapter" in n),
                                  sorted((n, p) for n, p in back.named_parameters()
                                         if "adapter" in n), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    with pytest.raises(ValueError, match="no adapters"):
        save_adapters(base, tmp_path / "none.safetensors")


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "dora"}, "kind must be one of"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"dropout": 1.0}, "dropout"),
    ({"kind": "wara", "wavelet": "nope"}, "unknown wavelet"),
    ({"alpha": float("nan")}, "alpha"),
])
def test_bad_adapter_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(**kwargs)


def test_no_matching_layer_is_an_error():
    with pytest.raises(ValueError, match="no layer matches"):
        attach_adapters(Net(), target_modules=["nothing"])
    with pytest.raises(ValueError, match="no adapters"):
        heal(Net(), [], lambda o, b: o.sum(), steps=1)


def test_merge_into_a_shared_dictionary_member_keeps_save_load_exact(gen, tmp_path):
    from lorank.compress import load_compressed, save_compressed

    model = Net().eval()
    x = torch.randn(20, 12, generator=gen, dtype=torch.float64)
    dic, _ = compress(model, method="cospadi", param_reduction=0.3, calibration=[x],
                      share_dictionary=r"(?:b|c)", measure_latency=False)
    assert dic.b.atoms is dic.c.atoms
    ad = attach_adapters(dic, kind="lora", rank=2, target_modules=["b"])
    with torch.no_grad():
        ad.b.adapter_b.normal_(generator=gen)
    y = ad(x)
    merged = merge_adapters(ad)
    assert merged.b.atoms is not merged.c.atoms and merged.b.n_atoms == dic.b.n_atoms + 2
    assert torch.allclose(merged(x), y, atol=1e-10)
    save_compressed(merged, tmp_path)
    back = load_compressed(tmp_path, Net())
    assert torch.equal(back(x), merged(x))
