"""Low-rank convolutions: exactness, merge, groups, calibration statistics, counts, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from brute import PROPERTY
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lorank import linalg
from lorank.compress import (
    CompressConfig,
    ConvFactorization,
    LowRankConv,
    SparseLowRankConv,
    compress,
    count_parameters,
    load_compressed,
    merge,
    save_compressed,
)
from lorank.compress.conv import ConvSpec, conv_costs, conv_patches

F64 = torch.float64


def _full_rank(conv: nn.Module, decomposition: str) -> LowRankConv:
    """The exact factorization of ``conv`` (rank min(m, n) per group)."""
    fac = ConvFactorization(ConvSpec.of(conv), decomposition)
    mat = fac.matrix(conv.weight.detach())
    m, n = fac.block_shape
    parts = [linalg.truncated_svd(blk, min(m, n)) for blk in mat.split(m)]
    a, b = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    bias = None if conv.bias is None else conv.bias.detach()
    return LowRankConv.from_factors(fac, a, b, bias)


# geometries: (stride, padding, dilation, groups, padding_mode)
GEOMETRIES = [
    (1, 0, 1, 1, "zeros"),
    (2, 1, 1, 1, "zeros"),
    (1, 2, 2, 2, "reflect"),
    (3, 1, 2, 1, "circular"),
    (1, "same", 2, 3, "zeros"),
    (1, "valid", 1, 1, "replicate"),
]


@pytest.mark.parametrize("dim,decomposition", [(1, "channel"), (2, "channel"), (2, "spatial")])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_full_rank_factorization_reproduces_the_convolution(dim, decomposition, geometry, gen):
    stride, padding, dilation, groups, mode = geometry
    cls = nn.Conv1d if dim == 1 else nn.Conv2d
    kernel = 3 if dim == 1 else (3, 2)
    torch.manual_seed(0)
    conv = cls(6, 12, kernel, stride, padding, dilation, groups, padding_mode=mode, dtype=F64)
    x = torch.randn(2, 6, *(11,) * dim, generator=gen, dtype=F64)
    low = _full_rank(conv, decomposition)
    assert torch.allclose(low(x), conv(x), rtol=0, atol=1e-12)
    assert torch.allclose(low(x[0]), conv(x[0]), rtol=0, atol=1e-12)  # unbatched input
    # merge inverts the factorization: the same module type, geometry and weights
    merged = low.merge()
    assert type(merged) is cls and ConvSpec.of(merged) == ConvSpec.of(conv)
    assert torch.allclose(merged.weight, conv.weight, rtol=0, atol=1e-12)
    assert torch.equal(merged.bias, conv.bias)
    # factors() / set_factors() round trip (what a rank-adapting trainer would use)
    a, b = low.factors()
    low2 = LowRankConv(low.factorization, low.rank, dtype=F64)
    low2.set_factors(a, b)
    assert torch.equal(low2.dense_weight(), low.dense_weight())


@PROPERTY
@given(dim=st.sampled_from([1, 2]), cin=st.integers(1, 4), cout_per=st.integers(1, 3),
       groups=st.sampled_from([1, 2]), k=st.integers(1, 3), stride=st.integers(1, 3),
       pad=st.integers(0, 2), dil=st.integers(1, 2), spatial=st.booleans(),
       size=st.integers(7, 10))
def test_full_rank_property(dim, cin, cout_per, groups, k, stride, pad, dil, spatial, size):
    """Any geometry: the exact factorization and the merged convolution equal the original."""
    torch.manual_seed(cin * 31 + k)
    cls = nn.Conv1d if dim == 1 else nn.Conv2d
    conv = cls(cin * groups, cout_per * groups, k, stride, pad, dil, groups, dtype=F64)
    x = torch.randn(2, cin * groups, *(size,) * dim, dtype=F64)
    low = _full_rank(conv, "spatial" if spatial and dim == 2 else "channel")
    assert torch.allclose(low(x), conv(x), rtol=0, atol=1e-12)
    assert torch.allclose(low.merge().weight, conv.weight, rtol=0, atol=1e-12)


def test_sparse_conv_equals_its_dense_weight(gen):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, dtype=F64)
    fac = ConvFactorization(ConvSpec.of(conv), "spatial")
    mat = fac.matrix(conv.weight.detach())
    m, _ = fac.block_shape
    parts = [linalg.sparse_plus_low_rank(blk, 2, 5) for blk in mat.split(m)]
    a, b = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    s = torch.cat([p[2] for p in parts])
    mod = SparseLowRankConv.from_sparse_factors(fac, a, b, s, conv.bias.detach())
    assert mod.nnz == 10
    ref = conv.weight.detach().clone()
    with torch.no_grad():
        ref.copy_(fac.weight((a @ b).reshape(-1, b.shape[-1]) + s))
    assert torch.allclose(mod.dense_weight(), ref, atol=1e-12)
    x = torch.randn(3, 4, 9, 7, generator=gen, dtype=F64)
    merged = mod.merge()
    assert torch.allclose(mod(x), merged(x), atol=1e-12)
    assert torch.allclose(mod(x[1]), merged(x[1]), atol=1e-12)


class CNN(nn.Module):
    """Conv2d (3x3, padded), grouped strided Conv2d, Conv1d over rows, linear head."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        kw = {"dtype": dtype}
        self.c1 = nn.Conv2d(3, 12, 3, padding=1, **kw)
        self.c2 = nn.Conv2d(12, 16, 3, stride=2, groups=2, **kw)
        self.c3 = nn.Conv1d(16, 10, 3, dilation=2, padding=2, **kw)
        self.head = nn.Linear(10, 5, **kw)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))  # (N, 16, 4, 4)
        h = torch.relu(self.c3(h.flatten(2)))  # (N, 10, 16)
        return self.head(h.mean(-1))


def _images(gen, n=3, dtype=torch.float32):
    return [torch.randn(5, 3, 10, 10, generator=gen, dtype=dtype) for _ in range(n)]


def _loss(out, batch):
    return out.pow(2).mean()


def _make_conv_low_rank(model, rank, decomposition, gen):
    """Give every convolution exactly rank ``rank`` per group in the decomposition's matrix."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv1d | nn.Conv2d):
                dec = decomposition if mod.weight.dim() == 4 else "channel"
                fac = ConvFactorization(ConvSpec.of(mod), dec)
                m, n = fac.block_shape
                g = fac.blocks
                a = torch.randn(g, m, rank, generator=gen, dtype=mod.weight.dtype)
                b = torch.randn(g, rank, n, generator=gen, dtype=mod.weight.dtype)
                mod.weight.copy_(fac.weight((a @ b).reshape(g * m, n) / (rank * n) ** 0.5))


@pytest.mark.parametrize("method", ["svd", "randomized_svd", "snmf", "fwsvd", "asvd",
                                    "whitened", "svd+sparse"])
@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
def test_exact_rank_convolutions_compress_losslessly(method, decomposition, gen):
    """Every convolution's weight has rank r per group: every method at rank r (semi-NMF:
    r + 1) keeps the model's outputs, groups and calibration statistics included."""
    model = CNN(F64).eval()
    r = 2
    _make_conv_low_rank(model, r, decomposition, gen)
    calib = _images(gen, dtype=F64)
    cfg = CompressConfig(method=method, rank=r + (method == "snmf"), layer_types=["conv"],
                         conv_decomposition=decomposition, snmf_iters=3000,
                         whiten_damp=1e-12, measure_latency=False)
    cm, rep = compress(model, cfg, calibration=calib, loss_fn=_loss)
    assert [row.status for row in rep.layers] == ["factorized"] * 3
    assert rep.layer("c2").blocks == 2
    assert isinstance(cm.c1, LowRankConv) and isinstance(cm.c3, LowRankConv)
    assert cm.c3.factorization.decomposition == "channel"  # Conv1d: always channel
    assert cm.c2.factorization.decomposition == decomposition
    with torch.no_grad():
        ref, got = model(calib[0]), cm(calib[0])
    tol = 1e-6 if method == "snmf" else 1e-10
    assert torch.allclose(ref, got, rtol=0, atol=tol), float((ref - got).abs().max())
    merged = merge(cm)
    assert type(merged.c2) is nn.Conv2d and type(merged.c3) is nn.Conv1d
    with torch.no_grad():
        assert torch.allclose(merged(calib[0]), got, rtol=0, atol=1e-12)


def _conv_output_error(old, new, batches):
    """``||new(x) - old(x)|| / ||old(x) - bias||`` over the batches, measured by running."""
    num = den = 0.0
    with torch.no_grad():
        for x in batches:
            y = old(x)
            if old.bias is not None:
                y = y - old.bias.view(-1, *(1,) * (y.dim() - 2))
            num += float(((new(x) - old(x)) ** 2).sum())
            den += float((y ** 2).sum())
    return math.sqrt(num / den)


@pytest.mark.parametrize("method", ["svd", "whitened", "svd+sparse"])
@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
def test_report_output_error_is_the_convolutions_output_error(method, decomposition, gen):
    """The im2col Gram statistics give exactly the relative output error of each factorized
    convolution on the calibration inputs (for the spatial decomposition too, whose method
    inputs are the k x 1 patches)."""
    conv = nn.Conv2d(6, 8, 3, padding=1, stride=(1, 2), groups=2, dtype=F64)
    model = nn.Sequential(conv)
    calib = [torch.randn(4, 6, 9, 9, generator=gen, dtype=F64) for _ in range(2)]
    cm, rep = compress(model, CompressConfig(method=method, rank=2, measure_latency=False,
                                             conv_decomposition=decomposition),
                       calibration=calib)
    row = rep.layer("0")
    assert row.status == "factorized"
    assert row.output_error == pytest.approx(_conv_output_error(conv, cm[0], calib), rel=1e-9)
    w, w2 = conv.weight.detach(), cm[0].dense_weight().detach()
    assert row.weight_error == pytest.approx(float((w - w2).norm() / w.norm()), rel=1e-9)


def test_whitening_beats_svd_on_correlated_images(gen):
    """With strongly correlated input channels, the calibrated methods lose less output."""
    mix = torch.randn(8, 8, generator=gen) * torch.logspace(0, 1.5, 8)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    calib = [torch.einsum("nchw,cd->ndhw", torch.randn(6, 8, 8, 8, generator=gen), mix)
             for _ in range(3)]
    errs = {}
    for method in ("svd", "asvd", "whitened"):
        _, rep = compress(nn.Sequential(conv), CompressConfig(method=method, rank=4),
                          calibration=calib)
        errs[method] = rep.layer("0").output_error
    assert errs["whitened"] < errs["asvd"] < errs["svd"], errs


def _measured_costs(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Weights and FLOPs counted by running: every nn.Conv's ``2 * (C_in/G * prod k) *
    output numel`` per example, plus ``2 nnz`` per output position of a sparse part."""
    flops = [0]

    def hook(mod, args, out):
        per_out = mod.weight[0].numel()
        flops[0] += 2 * per_out * out[0].numel()

    convs = [m for m in module.modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]
    hooks = [c.register_forward_hook(hook) for c in convs]
    with torch.no_grad():
        y = module(x[:1])
    for h in hooks:
        h.remove()
    nnz = getattr(module, "nnz", 0)
    flops[0] += 2 * nnz * y[0, 0].numel()
    params = sum(c.weight.numel() for c in convs) + nnz
    return params, flops[0]


@pytest.mark.parametrize("method", ["svd", "svd+sparse"])
@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
def test_report_params_and_flops_match_the_modules(method, decomposition, gen):
    model = CNN()
    calib = _images(gen)
    cm, rep = compress(model, CompressConfig(method=method, param_reduction=0.4,
                                             conv_decomposition=decomposition,
                                             sparse_density=0.02), calibration=calib)
    assert rep.model_params_before == count_parameters(model)
    assert rep.model_params_after == count_parameters(cm)
    removed = sum(row.params_before - row.params_after for row in rep.layers)
    assert rep.model_params_before - rep.model_params_after == removed
    x = calib[0]
    inputs = {"c1": x, "c2": torch.relu(model.c1(x)),
              "c3": torch.relu(model.c2(torch.relu(model.c1(x)))).flatten(2)}
    for name, inp in inputs.items():
        row = rep.layer(name)
        assert row.status == "factorized" and row.kind == "conv"
        assert (row.params_before, row.flops_before) == \
            _measured_costs(getattr(model, name), inp.detach())
        assert (row.params_after, row.flops_after) == \
            _measured_costs(getattr(cm, name), inp.detach())
        assert row.flops_after < row.flops_before
        size = "x".join(map(str, inp.shape[2:]))
        assert f"per example at input {size}" in row.note
        if method == "svd":
            assert row.params_after <= 0.6 * row.params_before
    if method == "svd+sparse":
        assert isinstance(cm.c2, SparseLowRankConv) and cm.c2.nnz > 0


def test_flops_break_even_guard(gen):
    """A spatial factorization can save weights but not FLOPs: a horizontal stride makes the
    k x 1 convolution run on every column.  Without an input size FLOPs are per position."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, stride=(1, 3)))
    cfg = CompressConfig(rank=8, conv_decomposition="spatial")
    x = torch.randn(2, 8, 12, 30, generator=gen)
    cm, rep = compress(model, cfg, example_input=x)
    row = rep.layer("0")
    assert row.status == "dense" and "would not save FLOPs" in row.note
    assert type(cm[0]) is nn.Conv2d
    _, rep = compress(model, cfg)
    row = rep.layer("0")
    assert row.status == "factorized" and "per output position" in row.note
    assert row.flops_after == 2 * row.params_after
    # a rank that saves nothing stays dense on the parameter count
    _, rep = compress(model, CompressConfig(rank=12, conv_decomposition="spatial"))
    assert "would not save parameters" in rep.layer("0").note


def test_depthwise_and_plain_conv_selection():
    """A new user's first try: a bare Conv1d / Conv2d is selected by default; a depthwise
    convolution (1 x k² matrix per group) cannot save anything and stays dense."""
    cm, rep = compress(nn.Conv1d(64, 128, 3), CompressConfig(param_reduction=0.5))
    # the largest r with r (128 + 64 * 3) <= 0.5 * 128 * 192
    assert isinstance(cm, LowRankConv) and rep.layers[0].rank == 38
    cm, rep = compress(nn.Sequential(nn.Conv2d(32, 64, 3), nn.Conv2d(64, 64, 3, groups=64),
                                     nn.Linear(4, 4)),
                       CompressConfig(param_reduction=0.5, layer_types=["conv"]))
    assert [r.name for r in rep.layers] == ["0", "1"]
    assert rep.layer("0").status == "factorized" and isinstance(cm[0], LowRankConv)
    assert rep.layer("1").status == "dense" and rep.layer("1").blocks == 64
    assert "would not save parameters" in rep.layer("1").note
    assert type(cm[1]) is nn.Conv2d and type(cm[2]) is nn.Linear
    # the factors of a factorized convolution are not selected again
    _, rep = compress(cm, CompressConfig(param_reduction=0.5, layer_types=["conv"]))
    assert [r.name for r in rep.layers] == ["1"]


def test_energy_and_budget_modes_with_convolutions(gen):
    model = CNN()
    calib = _images(gen)
    _, rep = compress(model, CompressConfig(energy=0.6, layer_types=["conv"]))
    for name in ("c1", "c2", "c3"):
        fac = ConvFactorization(ConvSpec.of(getattr(model, name)))
        mat = fac.matrix(getattr(model, name).weight.detach())
        want = max(linalg.rank_for_energy(linalg.svd_spectrum(blk), 0.6)
                   for blk in mat.split(fac.block_shape[0]))
        assert rep.layer(name).rank == want and rep.layer(name).status == "factorized"
    cm, rep = compress(model, CompressConfig(budget_reduction=0.5, budget_candidates=4,
                                             method="whitened"), calibration=calib,
                       loss_fn=_loss)
    assert rep.target_params_after <= 0.5 * rep.target_params_before
    assert rep.model_params_after == count_parameters(cm)


@pytest.mark.parametrize("method,decomposition", [("svd", "channel"), ("svd+sparse", "spatial"),
                                                  ("whitened", "spatial")])
def test_save_load_round_trip(method, decomposition, tmp_path, gen):
    model = CNN().eval()
    calib = _images(gen)
    cm, rep = compress(model, CompressConfig(method=method, param_reduction=0.5,
                                             conv_decomposition=decomposition),
                       calibration=calib)
    save_compressed(cm, tmp_path / "c", rep)
    loaded = load_compressed(tmp_path / "c", CNN()).eval()
    assert {n: type(m) for n, m in cm.named_modules()} == \
        {n: type(m) for n, m in loaded.named_modules()}
    with torch.no_grad():
        assert torch.equal(cm(calib[0]), loaded(calib[0]))


def test_conv_errors():
    with pytest.raises(ValueError, match="conv_decomposition must be one of"):
        CompressConfig(rank=2, conv_decomposition="tucker")
    with pytest.raises(ValueError, match="spatial decomposition needs a Conv2d"):
        ConvFactorization(ConvSpec.of(nn.Conv1d(2, 2, 3)), "spatial")
    with pytest.raises(ValueError, match=r"stride must have 2 entries, got \(1,\)"):
        ConvSpec(2, 4, 4, (3, 3), (1,), (0, 0), (1, 1))
    with pytest.raises(ValueError, match="groups=3 must divide in_channels=4"):
        ConvSpec(1, 4, 6, (3,), (1,), (0,), (1,), groups=3)
    with pytest.raises(TypeError, match="expected nn.Conv1d or nn.Conv2d"):
        ConvSpec.of(nn.Conv3d(2, 2, 3))
    msg = r"rank 10 > min\(m, n\) = 8 for 0 \(matrix shape 8x54\)"
    with pytest.raises(ValueError, match=msg):
        compress(nn.Sequential(nn.Conv2d(6, 8, 3)), CompressConfig(rank=10))
    fac = ConvFactorization(ConvSpec.of(nn.Conv2d(4, 6, 3, groups=2)))
    low = LowRankConv(fac, 2)
    with pytest.raises(ValueError, match=r"factors must have shapes \(2, 3, 2\) and "
                                          r"\(2, 2, 18\), got \(3, 2\)"):
        low.set_factors(torch.zeros(3, 2), torch.zeros(2, 18))
    with pytest.raises(ValueError, match="conv input must have shape"):
        conv_patches(fac.spec, torch.zeros(1, 5, 8, 8))


def test_costs_without_input_size():
    conv = nn.Conv2d(6, 8, (3, 5), groups=2)
    assert conv_costs(conv, None) == (conv.weight.numel(), 2 * conv.weight.numel())
    assert conv_costs(conv, (7, 9)) == (conv.weight.numel(), 2 * conv.weight.numel() * 5 * 5)


def _low_rank_kernel(form: str, rank: int, cout: int, cin: int, k: int, gen) -> torch.Tensor:
    """A kernel of exact rank ``rank`` in the ``form`` decomposition's matrix."""
    if form == "channel":  # W[o, c, i, j] = sum_r A[o, r] B[r, c, i, j]
        return torch.einsum("or,rcij->ocij", torch.randn(cout, rank, dtype=F64, generator=gen),
                            torch.randn(rank, cin, k, k, dtype=F64, generator=gen))
    # spatial: W[o, c, i, j] = sum_r V[r, c, i] H[r, o, j]
    return torch.einsum("rci,roj->ocij", torch.randn(rank, cin, k, dtype=F64, generator=gen),
                        torch.randn(rank, cout, k, dtype=F64, generator=gen))


@pytest.mark.parametrize("form", ["channel", "spatial"])
def test_auto_decomposition_picks_the_form_in_which_the_kernel_is_low_rank(form, gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.Conv1d(12, 4, 3)).to(F64)
    conv1d = model[1]
    model = nn.Sequential(model[0])
    with torch.no_grad():
        model[0].weight.copy_(_low_rank_kernel(form, 2, 12, 8, 3, gen))
    x = torch.randn(2, 8, 6, 6, dtype=F64, generator=gen)
    for mode in (dict(param_reduction=0.6), dict(energy=0.999999)):
        small, report = compress(model, CompressConfig(layer_types=("conv",),
                                                       conv_decomposition="auto",
                                                       measure_latency=False, **mode))
        (row,) = report.layers
        assert row.note.startswith(f"auto: {form} "), row.note
        assert small[0].factorization.decomposition == form
        # the chosen form holds the kernel exactly at the chosen rank
        torch.testing.assert_close(small(x), model(x), atol=1e-9, rtol=0)
    # a Conv1d has no spatial form; auto needs a budget to compare the two forms at
    _, report = compress(nn.Sequential(conv1d), CompressConfig(
        layer_types=("conv",), conv_decomposition="auto", param_reduction=0.5,
        measure_latency=False))
    assert report.layers[0].note.startswith("channel decomposition")
    with pytest.raises(ValueError, match="conv_decomposition='auto' compares"):
        CompressConfig(rank=2, conv_decomposition="auto")
