"""compress(method='cospadi' | 'dsformer'): exactness, storage, output error, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lorank.compress import (
    CompressConfig,
    LowRankLinear,
    SparseDictionaryLinear,
    compress,
    load_compressed,
    merge,
    save_compressed,
    straight_through_finetune,
)
from lorank.compress.dictionary import pack_support, unpack_support


class MLP(nn.Module):
    def __init__(self, d=24, h=40, out=20, dtype=torch.float64):
        super().__init__()
        self.up = nn.Linear(d, h, dtype=dtype)
        self.down = nn.Linear(h, out, dtype=dtype)
        self.side = nn.Linear(h, out, bias=False, dtype=dtype)

    def forward(self, x):
        h = torch.tanh(self.up(x))
        return self.down(h) + self.side(h)


def _calib(gen, d=24, n=4, dtype=torch.float64):
    mix = torch.randn(d, d, generator=gen, dtype=dtype)
    return [torch.randn(64, d, generator=gen, dtype=dtype) @ mix for _ in range(n)]


def _dictionary_weights(model, gen, atoms_per_row=2, n_atoms=None):
    """Weights whose rows are sparse combinations of random unit atoms (low coherence)."""
    with torch.no_grad():
        for lin in (model.up, model.down, model.side):
            out, inp = lin.weight.shape
            k = n_atoms or inp
            d = torch.randn(inp, k, generator=gen, dtype=torch.float64)
            d = d / d.norm(dim=0)
            c = torch.zeros(out, k, dtype=torch.float64)
            for i in range(out):
                c[i, torch.randperm(k, generator=gen)[:atoms_per_row]] = \
                    torch.randn(atoms_per_row, generator=gen, dtype=torch.float64)
            lin.weight.copy_(c @ d.mT / math.sqrt(inp))


def test_full_dictionary_reproduces_the_layer(gen):
    model = MLP().eval()
    calib = _calib(gen)
    cm, rep = compress(model, method="cospadi", rank=24, dict_sparsity=(1.0,),
                       target_modules=["up"], calibration=calib, measure_latency=False,
                       whiten_damp=0.0)
    assert isinstance(cm.up, LowRankLinear)  # s = k: a dense code
    x = calib[0]
    assert torch.allclose(cm(x), model(x), atol=1e-10)
    assert rep.layer("up").weight_error < 1e-12


def test_full_dictionary_with_sparse_codes_in_its_own_basis(gen):
    """k = d atoms and s < k: exact when every row is s-sparse in some basis."""
    model = MLP().eval()
    _dictionary_weights(model, gen, atoms_per_row=3)
    cm, rep = compress(model, method="cospadi", rank=40, dict_sparsity=(0.5,),
                       target_modules=["down"], calibration=_calib(gen), measure_latency=False)
    assert isinstance(cm.down, SparseDictionaryLinear) and cm.down.nnz == 20
    # 20 of the 40 atoms per row, a full-rank dictionary: the rows are reproduced
    assert rep.layer("down").output_error < 1e-8


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("structured", [True, False])
def test_never_worse_than_whitened_svd_at_equal_storage(seed, structured):
    """Random low-coherence matrices: rows that mix 2 of 16 random unit atoms (structured:
    rank 16 > the rank-14 budget of whitened SVD) or Gaussian ones."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 160, dtype=torch.float64),
                          nn.Tanh(), nn.Linear(160, 24, dtype=torch.float64)).eval()
    if structured:
        with torch.no_grad():
            d = torch.randn(24, 16, generator=gen, dtype=torch.float64)
            c = torch.zeros(160, 16, dtype=torch.float64)
            for i in range(160):
                c[i, torch.randperm(16, generator=gen)[:2]] = torch.randn(2, generator=gen,
                                                                        dtype=torch.float64)
            model[0].weight.copy_(c @ (d / d.norm(dim=0)).mT)
    calib = _calib(gen)
    kw = {"param_reduction": 0.3, "calibration": calib, "measure_latency": False,
          "whiten_damp": 1e-8}
    _, rep_w = compress(model, method="whitened", **kw)
    _, rep_c = compress(model, method="cospadi", **kw)
    for row_w, row_c in zip(rep_w.layers, rep_c.layers, strict=True):
        assert row_c.params_after <= math.floor(0.7 * row_c.params_before)
        assert row_c.output_error <= row_w.output_error * (1 + 1e-9)
    if structured:  # union of subspaces: far better on the layer built that way
        assert rep_c.layers[0].output_error < 0.75 * rep_w.layers[0].output_error


def test_storage_accounting_matches_saved_tensors(gen, tmp_path):
    model = MLP(dtype=torch.float32).eval()
    calib = _calib(gen, dtype=torch.float32)
    cm, rep = compress(model, method="cospadi", param_reduction=0.3, calibration=calib,
                       share_dictionary=r"(?:down|side)", dict_lowrank_fallback=False,
                       measure_latency=False)
    save_compressed(cm, tmp_path, rep)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    total = 0
    for row in rep.layers:
        mod = cm.get_submodule(row.name)
        assert isinstance(mod, SparseDictionaryLinear)
        names = [f"{row.name}.{t}" for t in ("values", "support", "atoms")]
        nbytes = sum(saved[n].nbytes for n in names if n in saved)
        assert row.storage_bytes == nbytes
        assert row.params_after == -(-nbytes // 4)
        total += nbytes
    # the shared dictionary is saved once and counted once
    assert ("down.atoms" in saved) != ("side.atoms" in saved)
    weights = sum(t.nbytes for k, t in saved.items() if not k.endswith("bias"))
    assert total == weights


def test_forward_is_dense_times_sparse_and_trains(gen, monkeypatch):
    model = MLP().eval()
    cm, _ = compress(model, method="cospadi", param_reduction=0.3, calibration=_calib(gen),
                     dict_lowrank_fallback=False, measure_latency=False)
    x = torch.randn(3, 5, 24, generator=gen, dtype=torch.float64)
    expected = (torch.tanh(x @ cm.up.dense_weight().mT + cm.up.bias))
    monkeypatch.setattr(SparseDictionaryLinear, "dense_weight",
                        lambda self: (_ for _ in ()).throw(AssertionError("densified")))
    monkeypatch.setattr(SparseDictionaryLinear, "codes_dense",
                        lambda self: (_ for _ in ()).throw(AssertionError("densified")))
    got = torch.tanh(cm.up(x))
    assert torch.allclose(got, expected, atol=1e-12)
    got.sum().backward()
    assert cm.up.values.grad is not None and cm.up.atoms.grad is not None
    monkeypatch.undo()
    dense = merge(cm)
    assert isinstance(dense.up, nn.Linear)
    assert torch.allclose(dense(x), cm(x), atol=1e-12)


def test_sparse_forward_gradcheck(gen):
    mask = torch.zeros(5, 6, dtype=torch.bool)
    for i in range(5):
        mask[i, torch.randperm(6, generator=gen)[:3]] = True
    ar = torch.arange(6).expand(5, 6)
    mod = SparseDictionaryLinear.from_codes(
        ar[mask].view(5, 3), torch.randn(5, 3, generator=gen, dtype=torch.float64),
        torch.randn(6, 4, generator=gen, dtype=torch.float64),
        torch.randn(5, generator=gen, dtype=torch.float64))
    x = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(mod(x), x @ mod.dense_weight().mT + mod.bias, atol=1e-12)

    params = (mod.values, mod.atoms)
    assert torch.autograd.gradcheck(lambda x: mod(x), (x,))
    y = mod(x)
    grads = torch.autograd.grad(y.sum(), params)
    dense = torch.autograd.grad((x @ (mod.codes_dense() @ mod.atoms).mT).sum(), params)
    for g1, g2 in zip(grads, dense, strict=True):
        assert torch.allclose(g1, g2, atol=1e-12)


def test_save_load_round_trip_is_exact(gen, tmp_path):
    model = MLP().eval()
    cm, rep = compress(model, method="cospadi", param_reduction=0.4, calibration=_calib(gen),
                       share_dictionary=r"(?:down|side)", measure_latency=False)
    assert cm.down.atoms is cm.side.atoms
    save_compressed(cm, tmp_path, rep)
    back = load_compressed(tmp_path, MLP())
    assert back.down.atoms is back.side.atoms
    x = torch.randn(7, 24, generator=gen, dtype=torch.float64)
    assert torch.equal(back(x), cm(x))
    for name, t in cm.state_dict().items():
        assert torch.equal(back.state_dict()[name], t)


def test_pack_support_round_trip(gen):
    mask = torch.rand(7, 19, generator=gen) < 0.4
    packed = pack_support(mask)
    assert packed.shape == (7, 3) and packed.dtype == torch.uint8
    assert torch.equal(unpack_support(packed, 19), mask)


def test_dsformer_nm_codes_and_straight_through_finetune(gen):
    torch.manual_seed(0)
    model = MLP().eval()
    calib = _calib(gen)
    cm, rep = compress(model, method="dsformer", param_reduction=0.3, dict_nm=(2, 4),
                       measure_latency=False)
    assert rep.method == "dsformer"
    for name in ("up", "down", "side"):
        mod = cm.get_submodule(name)
        assert isinstance(mod, SparseDictionaryLinear) and mod.nm == (2, 4)
        groups = mod.index() // 4
        for row in groups:
            assert set(torch.bincount(row).tolist()) == {2}
    data = [(x, model(x).detach()) for x in calib]

    def loss(out, batch):
        return ((out - batch[1]) ** 2).mean()

    with torch.no_grad():
        before = sum(float(loss(cm(b[0]), b)) for b in data)
    losses = straight_through_finetune(cm, data, loss, steps=60, lr=3e-3)
    with torch.no_grad():
        after = sum(float(loss(cm(b[0]), b)) for b in data)
    assert len(losses) == 60 and after < before
    for name in ("up", "down", "side"):
        mod = cm.get_submodule(name)
        assert isinstance(mod, SparseDictionaryLinear)
        assert set(torch.bincount((mod.index() // 4)[0]).tolist()) == {2}


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "cospadi", "energy": 0.9}, "takes rank .* or param_reduction"),
    ({"method": "cospadi", "rank": 4, "layer_types": ("embedding",)}, "linear layers only"),
    ({"method": "cospadi", "rank": 4, "dict_sparsity": (0.0,)}, "dict_sparsity"),
    ({"method": "dsformer", "rank": 4, "dict_nm": (3, 2)}, "dict_nm"),
    ({"method": "cospadi", "rank": 4, "share_dictionary": "(("}, "share_dictionary"),
    ({"method": "cospadi", "rank": 4, "dict_iters": -1}, "dict_iters"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressConfig(**kwargs)


def test_bad_runtime_settings(gen):
    model = MLP()
    with pytest.raises(ValueError, match="data-aware"):
        compress(model, method="cospadi", rank=4)
    with pytest.raises(ValueError, match="rank \\(atoms\\) 30 > 24"):
        compress(model, method="cospadi", rank=30, calibration=_calib(gen),
                 target_modules=["up"], measure_latency=False)
    with pytest.raises(ValueError, match="input sizes differ"):
        compress(model, method="cospadi", param_reduction=0.3, calibration=_calib(gen),
                 share_dictionary=".*", measure_latency=False)
    with pytest.raises(ValueError, match="no N:M dictionary layer"):
        straight_through_finetune(model, [], lambda o, b: o.sum(), steps=1)
