"""lorank.compress: layer selection, exactness at full rank, reports, merge and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorank.compress import (
    CompressConfig,
    LowRankEmbedding,
    LowRankLinear,
    LowRankRNN,
    SparseLowRankLinear,
    compress,
    count_parameters,
    merge,
)


class TinyLM(nn.Module):
    """Embedding -> LSTM/GRU -> Linear -> Linear: every supported layer type."""

    def __init__(self, vocab=40, emb=24, hidden=20, rnn="LSTM", layers=2, bidirectional=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        cls = nn.LSTM if rnn == "LSTM" else nn.GRU
        self.rnn = cls(emb, hidden, num_layers=layers, bidirectional=bidirectional)
        d = hidden * (2 if bidirectional else 1)
        self.proj = nn.Linear(d, 32)
        self.out = nn.Linear(32, vocab)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.out(torch.tanh(self.proj(h)))


def _lm_loss(out, batch):
    return nn.functional.cross_entropy(out[:-1].reshape(-1, out.shape[-1]),
                                       batch[1:].reshape(-1))


def _make_low_rank(model: nn.Module, rank: int, gen: torch.Generator) -> None:
    """Overwrite every weight matrix with an exactly rank-``rank`` matrix of similar scale
    (a stacked RNN matrix of rank r has gate blocks of rank <= r: both granularities are
    exact)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                m, n = p.shape
                p.copy_(torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)
                        / (rank * n) ** 0.5)


def _batches(gen, n=3, t=9, b=4, vocab=40):
    return [torch.randint(0, vocab, (t, b), generator=gen) for _ in range(n)]


ALL_METHODS = ["svd", "randomized_svd", "snmf", "fwsvd", "asvd", "whitened", "svd+sparse"]


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("granularity", ["stacked", "per_gate"])
def test_exact_rank_weights_give_identical_outputs(method, granularity, gen):
    """Every layer's weights have rank r: compressing at that rank changes no output."""
    torch.manual_seed(0)
    model = TinyLM().eval()
    r = 3
    _make_low_rank(model, r, gen)
    calib = _batches(gen)
    x = calib[0]
    # a rank-r row space needs r+1 nonnegative generators (semi-NMF)
    rank = r + 1 if method == "snmf" else r
    cfg = CompressConfig(method=method, rank=rank, rnn_granularity=granularity,
                         snmf_iters=3000, whiten_damp=1e-9)
    cm, report = compress(model, cfg, calibration=calib, loss_fn=_lm_loss)
    assert all(row.status == "factorized" for row in report.layers)
    assert isinstance(cm.emb, LowRankEmbedding)
    assert isinstance(cm.rnn, LowRankRNN)
    assert isinstance(cm.proj, LowRankLinear)
    with torch.no_grad():
        ref, got = model(x), cm(x)
    tol = 1e-4 if method == "snmf" else 1e-5
    assert torch.allclose(ref, got, atol=tol), float((ref - got).abs().max())
    # the original model is untouched (inplace=False)
    assert isinstance(model.proj, nn.Linear)


def test_full_rank_modules_equal_dense(gen):
    lin = nn.Linear(7, 5)
    a, b = lin.weight.detach().clone(), torch.eye(7)[:5]
    # A B = W exactly at rank min(m, n) = 5
    u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    mod = LowRankLinear.from_factors(u * s, vh, lin.bias.detach())
    x = torch.randn(3, 7, generator=gen)
    assert torch.allclose(mod(x), lin(x), atol=1e-6)
    assert isinstance(mod.merge(), nn.Linear)
    assert torch.allclose(mod.merge()(x), lin(x), atol=1e-6)
    del a, b
    for mode in ("LSTM", "GRU"):
        rnn = (nn.LSTM if mode == "LSTM" else nn.GRU)(6, 5, num_layers=2, bidirectional=True,
                                                     batch_first=True)
        lr = LowRankRNN.from_rnn(rnn)
        xs = torch.randn(2, 4, 6, generator=gen)
        y1, h1 = rnn(xs)
        y2, h2 = lr(xs)
        assert torch.allclose(y1, y2, atol=1e-6)
        w = lr.matrix("weight_hh_l1_reverse").detach()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        lr.factorize("weight_hh_l1_reverse", u * s, vh)
        y3, _ = lr(xs)
        assert torch.allclose(y1, y3, atol=1e-5)
        assert torch.allclose(lr.merge()(xs)[0], y1, atol=1e-5)


def test_report_counts_match_numel(gen):
    model = TinyLM()
    calib = _batches(gen)
    cm, report = compress(model, CompressConfig(param_reduction=0.5), calibration=calib)
    assert report.model_params_before == sum(p.numel() for p in model.parameters())
    assert report.model_params_after == sum(p.numel() for p in cm.parameters())
    assert report.model_params_after == count_parameters(cm)
    removed = sum(x.params_before - x.params_after for x in report.layers)
    assert report.model_params_before - report.model_params_after == removed
    assert report.layer("proj").params_after == \
        cm.proj.first.weight.numel() + cm.proj.second.weight.numel()
    assert report.layer("emb").params_after == cm.emb.table.numel() + cm.emb.proj.numel()
    hh = report.layer("rnn.weight_hh_l1")
    assert hh.params_after == cm.rnn.weight_hh_l1_left.numel() + \
        cm.rnn.weight_hh_l1_right.numel()
    for row in report.layers:
        m, n = row.shape
        assert row.params_after <= 0.5 * m * n  # param_reduction=0.5 per matrix
        assert row.flops_after < row.flops_before or row.kind == "embedding"
        assert 0 < row.weight_error < 1
        assert row.output_error is not None
    d = report.to_dict()
    assert d["summary"]["target_params_before"] == report.target_params_before
    assert "| proj |" in report.table()
    assert report.latency_before_ms is not None and report.latency_after_ms is not None


def test_unprofitable_rank_stays_dense_with_note():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 100))
    # rank 6: 6*(10+10)=120 >= 100 keeps layer 0 dense; 6*110 = 660 < 1000 factorizes layer 1
    cm, report = compress(model, CompressConfig(rank=6))
    assert isinstance(cm[0], nn.Linear)
    assert isinstance(cm[1], LowRankLinear)
    row = report.layer("0")
    assert row.status == "dense" and "would not save parameters" in row.note
    assert row.params_after == row.params_before
    assert report.model_params_after < report.model_params_before
    # no layer grows, whatever the rank
    cm2, rep2 = compress(model, CompressConfig(rank=10))
    assert rep2.model_params_after <= rep2.model_params_before
    assert all(r.params_after <= r.params_before for r in rep2.layers)


def test_energy_and_budget_modes(gen):
    model = TinyLM()
    calib = _batches(gen)
    _, rep = compress(model, CompressConfig(energy=0.9, layer_types=["linear"]))
    assert all(r.rank is not None or r.status == "dense" for r in rep.layers)
    _, rep_hi = compress(model, CompressConfig(energy=0.99, layer_types=["linear"]))
    assert sum(r.params_after for r in rep_hi.layers) >= sum(r.params_after for r in rep.layers)
    for cal in (None, calib):
        cm, rep = compress(model, CompressConfig(budget_reduction=0.5, budget_candidates=4),
                           calibration=cal)
        assert rep.target_params_after <= 0.5 * rep.target_params_before
        assert rep.model_params_after == count_parameters(cm)
    # with a loss, the sensitivity is the loss increase
    _, rep = compress(model, CompressConfig(budget_reduction=0.3, budget_candidates=3,
                                            method="whitened"),
                      calibration=calib, loss_fn=_lm_loss)
    assert rep.target_params_after <= 0.7 * rep.target_params_before


def test_target_and_exclude_patterns():
    model = TinyLM()
    _, rep = compress(model, CompressConfig(rank=2, target_modules=["proj", "out"]))
    assert [r.name for r in rep.layers] == ["proj", "out"]
    _, rep = compress(model, CompressConfig(rank=2, target_modules=r"(proj|rnn)",
                                            exclude_modules=["proj"]))
    assert {r.name for r in rep.layers} == {f"rnn.weight_{p}_l{i}" for p in ("ih", "hh")
                                           for i in (0, 1)}
    _, rep = compress(model, CompressConfig(rank=2, layer_types=["lstm"],
                                            rnn_matrices=["ih"]))
    assert [r.name for r in rep.layers] == ["rnn.weight_ih_l0", "rnn.weight_ih_l1"]
    _, rep = compress(model, CompressConfig(rank=2, rank_pattern={"out": 5}))
    assert rep.layer("out").rank == 5 and rep.layer("proj").rank == 2


def test_gru_and_bidirectional(gen):
    model = TinyLM(rnn="GRU", bidirectional=True).eval()
    _make_low_rank(model, 2, gen)
    x = _batches(gen, n=1)[0]
    cm, rep = compress(model, CompressConfig(rank=2, layer_types=["gru"],
                                             rnn_granularity="per_gate"))
    assert len(rep.layers) == 8 and all(r.blocks == 3 for r in rep.layers)
    with torch.no_grad():
        assert torch.allclose(model(x), cm(x), atol=1e-5)


def test_merge_restores_dense_modules(gen):
    model = TinyLM().eval()
    x = _batches(gen, n=1)[0]
    cm, _ = compress(model, CompressConfig(rank=3, method="svd+sparse", sparse_density=0.05))
    assert isinstance(cm.proj, SparseLowRankLinear)
    with torch.no_grad():
        y = cm(x)
    merged = merge(cm)
    assert type(merged.emb) is nn.Embedding and type(merged.rnn) is nn.LSTM
    assert type(merged.proj) is nn.Linear and type(merged.out) is nn.Linear
    with torch.no_grad():
        assert torch.allclose(merged(x), y, atol=1e-5)
    with pytest.raises(KeyError):
        merge(merged, ["proj"])


def test_inplace_and_kwargs():
    model = TinyLM()
    out, rep = compress(model, rank=2, layer_types=["linear"], inplace=True)
    assert out is model and isinstance(model.proj, LowRankLinear)
    assert rep.config["rank"] == 2


def test_sparse_plus_low_rank_counts_sparse_entries():
    model = nn.Sequential(nn.Linear(30, 40))
    cm, rep = compress(model, CompressConfig(rank=4, method="svd+sparse",
                                             sparse_density=0.02))
    row = rep.layer("0")
    assert row.params_after == 4 * 70 + cm[0].nnz
    assert cm[0].nnz == 24
    assert rep.model_params_after == count_parameters(cm)


# ---- errors --------------------------------------------------------------------------------


def test_bad_configs_are_clear_errors(gen):
    model = TinyLM()
    with pytest.raises(ValueError, match="positive integer"):
        CompressConfig(rank=0)
    with pytest.raises(ValueError, match="positive integer"):
        CompressConfig(rank=-3)
    with pytest.raises(ValueError, match="exactly one"):
        CompressConfig(rank=2, energy=0.9)
    with pytest.raises(ValueError, match="exactly one"):
        CompressConfig()
    with pytest.raises(ValueError, match="method"):
        CompressConfig(rank=2, method="tucker")
    with pytest.raises(ValueError, match="param_reduction"):
        CompressConfig(param_reduction=1.5)
    msg = r"rank 33 > min\(m, n\) = 20 for proj \(matrix shape 32x20\)"
    with pytest.raises(ValueError, match=msg):
        compress(model, CompressConfig(rank=33, target_modules=["proj"]))
    with pytest.raises(ValueError, match="no layer matches.*candidate layers: emb"):
        compress(model, CompressConfig(rank=2, target_modules=["nonexistent"]))
    for method in ("fwsvd", "asvd", "whitened"):
        with pytest.raises(ValueError, match="calibration"):
            compress(model, CompressConfig(rank=2, method=method))
    with pytest.raises(ValueError, match="loss"):
        compress(model, CompressConfig(rank=2, method="fwsvd"), calibration=_batches(gen))
    with pytest.raises(ValueError, match="no batch"):
        compress(model, CompressConfig(rank=2, method="whitened"), calibration=[])
    with pytest.raises(ValueError, match="unknown CompressConfig fields"):
        compress(model, CompressConfig(rank=2), bogus=1)


def test_data_aware_methods_lower_output_error(gen):
    """On correlated inputs the calibrated methods beat plain SVD in output error."""
    torch.manual_seed(0)
    mix = torch.randn(48, 48, generator=gen) * torch.logspace(0, 1.5, 48)
    model = nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 48))
    calib = [torch.randn(64, 48, generator=gen) @ mix for _ in range(4)]
    errs = {}
    for method in ("svd", "asvd", "whitened"):
        _, rep = compress(model, CompressConfig(method=method, rank=8,
                                                target_modules=["0"]), calibration=calib)
        errs[method] = rep.layer("0").output_error
    assert errs["whitened"] < errs["asvd"] < errs["svd"]


def test_layers_without_calibration_signal_stay_dense(gen):
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(12, 12)
            self.unused = nn.Linear(12, 12)

        def forward(self, x):
            return self.used(x)

    calib = [torch.randn(8, 12, generator=gen) for _ in range(2)]
    for method in ("whitened", "fwsvd"):
        cm, rep = compress(Unused(), CompressConfig(method=method, rank=2), calibration=calib,
                           loss_fn=lambda out, b: out.pow(2).sum())
        assert rep.layer("used").status == "factorized"
        assert rep.layer("unused").status == "dense" and "kept dense" in rep.layer("unused").note
    with pytest.raises(ValueError, match="no selected layer was reached"):
        compress(Unused(), CompressConfig(method="asvd", rank=2, target_modules=["unused"]),
                 calibration=calib)


def test_compress_config_is_frozen_canonical_and_round_trips():
    import dataclasses
    import json

    cfg = CompressConfig(method="cospadi", rank=8, dict_sparsity=[0.5], rnn_matrices=["ih"],
                         rank_pattern={"fc": 3})
    assert cfg.layer_types == ("linear",) and cfg.dict_sparsity == (0.5,)  # canonical once
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 4
    again = CompressConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again is not cfg
