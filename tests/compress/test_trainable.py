"""Trainable low rank: TRP, Maestro and SLTrain (lorank.compress.trainable)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorank.compress import (
    TRP,
    LowRankLinear,
    LowRankRNN,
    Maestro,
    MaestroConfig,
    MaestroLinear,
    MaestroRNN,
    SLTrainConfig,
    SLTrainLinear,
    SparseLowRankLinear,
    TRPConfig,
    load_compressed,
    merge,
    save_compressed,
    sltrain,
    train_low_rank,
)
from lorank.compress.trainable import group_norms, sltrain_report, sparse_lowrank_linear

D = torch.float64


class RNNLM(nn.Module):
    """Embedding -> LSTM/GRU -> Linear -> Linear; every LSTM block and ``proj`` has min
    dimension ``hidden``."""

    def __init__(self, vocab=30, hidden=8, rnn="LSTM", layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        cls = nn.LSTM if rnn == "LSTM" else nn.GRU
        self.rnn = cls(hidden, hidden, num_layers=layers)
        self.proj = nn.Linear(hidden, 12)
        self.out = nn.Linear(12, vocab)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.out(torch.tanh(self.proj(h)))


def _loss(out, batch):
    return nn.functional.cross_entropy(out[:-1].reshape(-1, out.shape[-1]),
                                       batch[1:].reshape(-1))


def _data(gen, n=3, t=7, b=3, vocab=30):
    return [torch.randint(0, vocab, (t, b), generator=gen) for _ in range(n)]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return RNNLM(**kw).to(D)


# ---- TRP ------------------------------------------------------------------------------------


def test_trp_full_rank_zero_regularization_is_plain_training(gen):
    data = _data(gen, n=4)
    plain = _model()
    trained = copy.deepcopy(plain)
    cfg = TRPConfig(rank=8, period=1, nuclear_weight=0.0, target_modules=["rnn", "proj"])
    trp = TRP(trained, cfg)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (plain, trained)]
    trp.attach(opts[1])
    for step in range(6):
        for m, opt in zip((plain, trained), opts, strict=True):
            opt.zero_grad()
            _loss(m(data[step % 4]), data[step % 4]).backward()
            opt.step()
        for (n, p), q in zip(plain.named_parameters(), trained.parameters(), strict=True):
            assert torch.equal(p, q), (step, n)
    assert trp.steps == 6 and all(v == [8] for v in trp.ranks.values())


def test_trp_projection_is_the_truncated_svd(gen):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trp = TRP(model, TRPConfig(rank=3, target_modules=["rnn", "proj"],
                               rnn_granularity="per_gate"))
    ranks = trp.project()
    assert set(ranks) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1",
                          "rnn.weight_hh_l1", "proj"}
    assert ranks["rnn.weight_ih_l0"] == [3] * 4
    w0 = before["proj.weight"]
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    assert torch.allclose(model.proj.weight, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-12)
    for g in range(4):  # per gate: every 8 x 8 block has rank 3
        blk = model.rnn.weight_hh_l1[g * 8:(g + 1) * 8]
        ref = before["rnn.weight_hh_l1"][g * 8:(g + 1) * 8]
        u, s, vh = torch.linalg.svd(ref)
        assert torch.allclose(blk, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-12)
    assert torch.equal(model.out.weight, before["out.weight"])  # not selected


def test_trp_energy_rank_and_nuclear_subgradient(gen):
    model = _model()
    w = model.proj.weight.detach().clone()
    # at full rank the subgradient U V^T is the gradient of the nuclear norm
    trp = TRP(model, TRPConfig(energy=1.0, nuclear_weight=0.5, target_modules=["proj"]))
    wp = w.clone().requires_grad_()
    torch.linalg.matrix_norm(wp, "nuc").backward()
    model.proj.weight.grad = torch.ones_like(w)
    trp.before_step()
    assert torch.allclose(model.proj.weight.grad, 1 + 0.5 * wp.grad, atol=1e-12)
    # energy rule: the smallest rank keeping that fraction of sum s_i^2
    s = torch.linalg.svdvals(w)
    energy = float((s[:5] ** 2).sum() / (s ** 2).sum())
    trp = TRP(model, TRPConfig(energy=energy, nuclear_weight=0.5, target_modules=["proj"]))
    assert trp.project() == {"proj": [5]}
    model.proj.weight.grad = None
    trp.before_step()
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(model.proj.weight.grad, 0.5 * u[:, :5] @ vh[:5], atol=1e-12)
    assert torch.linalg.matrix_rank(model.proj.weight) == 5


def test_trp_nuclear_subgradient_is_the_gradient_of_the_current_nuclear_norm(gen):
    model = _model()
    trp = TRP(model, TRPConfig(rank=2, nuclear_weight=1.0, target_modules=["proj"]))
    w = model.proj.weight.detach().clone().requires_grad_()
    torch.linalg.matrix_norm(w, "nuc").backward()  # full rank: the gradient is U V^T
    model.proj.weight.grad = None
    trp.before_step()  # not projected yet: the tail is regularized too, not only the top 2
    torch.testing.assert_close(model.proj.weight.grad, w.grad, atol=1e-10, rtol=0)
    s0 = torch.linalg.svdvals(model.proj.weight.detach())
    with torch.no_grad():
        model.proj.weight -= 0.1 * model.proj.weight.grad
    s1 = torch.linalg.svdvals(model.proj.weight.detach())
    torch.testing.assert_close(s0 - s1, torch.full_like(s0, 0.1), atol=1e-10, rtol=0)


def test_trp_compress_does_not_cut_an_energy_projection_twice(gen):
    data = _data(gen)
    model = _model()
    trp = TRP(model, TRPConfig(energy=0.9, period=1, target_modules=["proj"]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trp.attach(opt)
    for b in data:  # the last step projects
        opt.zero_grad()
        _loss(model(b), b).backward()
        opt.step()
    trp.detach()
    trained = model.proj.weight.detach().clone()
    small, report = trp.compress()
    assert [r.rank for r in report.layers] == trp.ranks["proj"]
    assert torch.equal(model.proj.weight, trained)  # no further projection
    torch.testing.assert_close(small.proj.dense_weight(), trained, atol=1e-10, rtol=0)


def test_trp_projects_a_tied_weight_once_and_attaches_once(gen):
    emb = nn.Embedding(10, 6).to(D)
    head = nn.Linear(6, 10, bias=False).to(D)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict({"emb": emb, "head": head})
    trp = TRP(model, TRPConfig(energy=0.8, nuclear_weight=1.0))
    assert [w.key for w in trp.matrices] == ["emb"] and trp.aliases == {"head": "emb"}
    emb.weight.grad = None
    trp.before_step()  # one subgradient, not two
    torch.testing.assert_close(emb.weight.grad, TRP.nuclear_subgradient(trp.matrices[0]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trp.attach(opt)
    with pytest.raises(RuntimeError, match="already attached"):
        trp.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    trp.detach()
    first = trp.project()["emb"]
    small, report = trp.compress()  # no step since the projection: the same ranks
    assert {r.name: r.rank for r in report.layers} == {"emb": first[0], "head": first[0]}


def test_trp_compress_is_exact_and_reports_ranks(gen):
    data = _data(gen)
    model = _model()
    trp = TRP(model, TRPConfig(rank=2, period=2, nuclear_weight=1e-3, layer_types=("lstm",)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trp.attach(opt)
    for b in data:
        opt.zero_grad()
        _loss(model(b), b).backward()
        opt.step()
    trp.detach()
    small, report = trp.compress()
    assert isinstance(small.rnn, LowRankRNN) and small is not model
    assert {r.rank for r in report.layers} == {2} and report.method == "trp"
    with torch.no_grad():  # compress() projected once more: the factorization is exact
        assert torch.allclose(small(data[0]), model(data[0]), atol=1e-10)
    assert report.model_params_after == sum(p.numel() for p in small.parameters())


def test_trp_errors():
    with pytest.raises(ValueError, match="exactly one of TRPConfig.rank and TRPConfig.energy"):
        TRPConfig()
    with pytest.raises(ValueError, match="TRPConfig.period"):
        TRPConfig(rank=2, period=0)
    with pytest.raises(ValueError, match="nuclear_weight"):
        TRPConfig(rank=2, nuclear_weight=-1.0)
    with pytest.raises(ValueError, match="exceeds min"):
        TRP(_model(), TRPConfig(rank=9, target_modules=["proj"]))
    with pytest.raises(ValueError, match="candidate layers"):
        TRP(_model(), TRPConfig(rank=2, target_modules=["nothing"]))


@pytest.mark.parametrize("groups", [1, 2])
def test_trp_on_convolutions_projects_each_group_and_compresses_exactly(gen, groups):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=groups), nn.ReLU(),
                          nn.Flatten(),
                          nn.Linear(6 * 5 * 5, 3)).to(D)
    x = torch.randn(4, 4, 5, 5, dtype=D, generator=gen)
    y = torch.randint(0, 3, (4,), generator=gen)
    trp = TRP(model, TRPConfig(rank=2, period=1, nuclear_weight=1e-3, layer_types=("conv",)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trp.attach(opt)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    trp.detach()
    w = model[0].weight.detach()
    for g in range(groups):  # every group's (C_out/G, C_in/G * k * k) block has rank 2
        block = w[g * 6 // groups:(g + 1) * 6 // groups].reshape(6 // groups, -1)
        assert torch.linalg.matrix_rank(block) == 2
    small, report = trp.compress()
    assert [(r.name, r.rank) for r in report.layers] == [("0", 2)]
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-10, rtol=0)
    assert report.model_params_after == sum(p.numel() for p in small.parameters())
    with pytest.raises(ValueError, match="exceeds min"):  # a 3-row block has rank <= 3
        TRP(copy.deepcopy(model), TRPConfig(rank=4 if groups == 2 else 7, layer_types=("conv",)))


# ---- Maestro --------------------------------------------------------------------------------


def _maestro_linear(gen, inp=7, out=5, cap=5):
    mod = MaestroLinear(inp, out, cap, dtype=D)
    with torch.no_grad():
        mod.first.weight.copy_(torch.randn(cap, inp, generator=gen, dtype=D))
        mod.second.weight.copy_(torch.randn(out, cap, generator=gen, dtype=D))
    return mod


def test_maestro_linear_without_dropout_is_the_dense_product(gen):
    mod = _maestro_linear(gen)
    x = torch.randn(4, 3, 7, generator=gen, dtype=D)
    dense = mod.second.weight @ mod.first.weight
    want = x @ dense.mT + mod.bias
    mod.set_width("", 2)  # a sampled width acts in training mode only
    assert torch.allclose(mod.eval()(x), want, atol=1e-12)
    mod.set_width("", None)
    assert torch.allclose(mod.train()(x), want, atol=1e-12)
    lin = nn.Linear(7, 5, dtype=D)
    assert torch.allclose(MaestroLinear.from_linear(lin)(x), lin(x), atol=1e-12)


def test_maestro_truncation_keeps_the_first_components(gen):
    mod = _maestro_linear(gen).train()
    x = torch.randn(6, 7, generator=gen, dtype=D)
    u, vt = mod.second.weight.detach().clone(), mod.first.weight.detach().clone()
    want = x @ vt[:3].mT @ u[:, :3].mT + mod.bias
    mod.set_width("", 3)  # ordered dropout keeping 3 components
    y = mod(x)
    assert torch.allclose(y, want, atol=1e-12)
    y.sum().backward()  # the dropped components get no gradient
    assert mod.first.weight.grad[3:].abs().max() == 0 and mod.first.weight.grad[:3].abs().max() > 0
    low = mod.to_lowrank(3)
    assert isinstance(low, LowRankLinear) and torch.allclose(low(x), want, atol=1e-12)
    mod.truncate(3)
    assert torch.equal(mod.first.weight, vt[:3]) and torch.equal(mod.second.weight, u[:, :3])
    assert mod.capacity == 3 and torch.allclose(mod.eval()(x), want, atol=1e-12)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 3\]"):
        mod.truncate(4)


@pytest.mark.parametrize("granularity", ["stacked", "per_gate"])
@pytest.mark.parametrize("rnn", ["LSTM", "GRU"])
def test_maestro_rnn_is_the_same_network_and_truncates(rnn, granularity, gen):
    torch.manual_seed(0)
    dense = (nn.LSTM if rnn == "LSTM" else nn.GRU)(6, 5, num_layers=2, batch_first=True).to(D)
    mod = MaestroRNN.from_dense(dense, ("ih", "hh"), granularity)
    x = torch.randn(3, 4, 6, generator=gen, dtype=D)
    assert torch.allclose(mod(x)[0], dense(x)[0], atol=1e-12)
    for name in mod.unit_keys():
        mod.set_unit_rank(name, 2)
    fused = mod(x)[0]
    mod.stats_hook = lambda name, inp: None  # the Python time loop of LowRankRNN
    assert torch.allclose(mod(x)[0], fused, atol=1e-12)
    mod.stats_hook = None
    low = mod.to_lowrank()
    assert low.factorized["weight_ih_l1"]["rank"] == 2 and torch.allclose(low(x)[0], fused,
                                                                          atol=1e-12)
    left = mod.weight_hh_l0_left.detach().clone()
    mod.truncate()
    assert torch.equal(mod.weight_hh_l0_left, left[..., :2])
    assert torch.allclose(mod(x)[0], fused, atol=1e-12)


def test_group_norms_and_shrinking(gen):
    left = torch.randn(2, 5, 4, generator=gen, dtype=D)
    right = torch.randn(2, 4, 3, generator=gen, dtype=D)
    a, b = group_norms(left, right, 3)
    for i in range(3):
        assert torch.allclose(a[i], left[..., i:3].norm()) and \
            torch.allclose(b[i], right[:, i:3].norm())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4)).to(D)
    mae = Maestro(model, MaestroConfig(group_lasso=0.1, prune_threshold=1e-6, sampler="none"))
    first = mae.model[0]
    with torch.no_grad():
        first.first.weight[4:] *= 1e-5  # trailing components with tiny importance
        first.second.weight[:, 4:] *= 1e-5
    assert mae.shrink() == {"0": 4, "2": 4}
    for p in mae.model.parameters():
        p.grad = torch.zeros_like(p)
    mae.before_step()  # adds the group-lasso gradient
    u, vt = first.second.weight, first.first.weight
    pen = sum(group_norms(*m.factors(), m.rank)[0].sum() + group_norms(*m.factors(), m.rank)[1]
              .sum() for m in (mae.model[0], mae.model[2]))
    want = torch.autograd.grad(0.1 * pen, [u, vt])
    assert torch.allclose(u.grad, want[0]) and torch.allclose(vt.grad, want[1])
    assert vt.grad[4:].abs().max() == 0  # pruned components are outside every group


def test_maestro_samplers_and_compress(gen):
    model = _model()
    mae = Maestro(model, MaestroConfig(target_modules=["rnn", "proj"], seed=3))
    assert isinstance(mae.model.rnn, MaestroRNN) and isinstance(mae.model.proj, MaestroLinear)
    assert isinstance(model.rnn, nn.LSTM)  # the caller's model is untouched
    assert [u.key for u in mae.units] == ["rnn.weight_hh_l0", "rnn.weight_hh_l1",
                                          "rnn.weight_ih_l0", "rnn.weight_ih_l1", "proj"]
    seen = set()
    for _ in range(30):
        mae.resample()
        widths = {**mae.model.rnn.widths, **({"proj": mae.model.proj.width}
                                             if mae.model.proj.width else {})}
        assert len(widths) == 1 and 1 <= next(iter(widths.values())) <= 8
        seen |= set(widths)
    assert len(seen) >= 4
    x = _data(gen)[0]
    mae.model.eval()
    with torch.no_grad():
        assert torch.allclose(mae.model(x), model(x), atol=1e-10)  # eval: full rank
    small, report = mae.compress(rank={"proj": 2, "rnn.weight_ih_l0": 3})
    assert isinstance(small.proj, LowRankLinear) and isinstance(small.rnn, LowRankRNN)
    assert {r.name: r.rank for r in report.layers}["rnn.weight_ih_l0"] == 3
    assert report.layer("rnn.weight_hh_l1").rank == 8 and report.layer("proj").weight_error > 0
    mae.model.proj.set_unit_rank("", 2)
    mae.model.rnn.set_unit_rank("weight_ih_l0", 3)
    with torch.no_grad():
        assert torch.allclose(small(x), mae.model(x), atol=1e-10)
    assert mae.rank_report()["proj"] == {"shape": (12, 8), "blocks": 1, "rank": 2,
                                         "capacity": 8, "params": 40, "dense_params": 96}


@pytest.mark.parametrize("sampler", ["single", "none"])
def test_ordered_dropout_learns_the_principal_components(sampler):
    """Fitting a linear map, ordered dropout makes every prefix of the factorization nearly
    the best approximation of its rank (Eckart-Young); plain factorized training does not."""
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=D))
    q2, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=D))
    s = torch.tensor([5.0, 4, 3, 2, 1, 0.5], dtype=D)
    target = q1 * s @ q2.T
    torch.manual_seed(0)
    mae = Maestro(nn.Sequential(nn.Linear(6, 6, bias=False, dtype=D)),
                  MaestroConfig(sampler=sampler))
    opt = torch.optim.Adam(mae.model.parameters(), lr=0.02)
    mae.attach(opt)
    for _ in range(400):
        x = torch.randn(64, 6, generator=g, dtype=D)
        loss = (mae.model(x) - x @ target.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ratios = []
    with torch.no_grad():
        for r in (1, 2, 3):
            w = mae.compress(rank=r)[0][0].dense_weight()
            ratios.append(float((w - target).norm() / s[r:].norm()))  # 1 = optimal
    if sampler == "single":
        assert max(ratios) < 1.1, ratios
    else:
        assert max(ratios) > 1.5, ratios


def test_maestro_errors():
    with pytest.raises(ValueError, match="MaestroConfig.sampler"):
        MaestroConfig(sampler="random")
    with pytest.raises(ValueError, match="layer_types must be a non-empty subset"):
        MaestroConfig(layer_types=("embedding",))
    with pytest.raises(ValueError, match="exceeds min"):
        Maestro(_model(), MaestroConfig(rank=9, target_modules=["proj"]))


# ---- SLTrain --------------------------------------------------------------------------------


def _sl(gen, inp=9, out=7, rank=2, nnz=10):
    mod = SLTrainLinear(inp, out, rank, nnz, scale=0.5, generator=gen, dtype=D)
    with torch.no_grad():
        mod.second.weight.normal_(generator=gen)  # B starts at zero; make the test informative
    return mod


def test_sltrain_parameters_and_forward_are_low_rank_plus_sparse(gen):
    mod = _sl(gen)
    assert sum(p.numel() for p in mod.parameters()) == 2 * (9 + 7) + 10 + 7
    assert not any(p.shape == (7, 9) for p in mod.parameters())
    idx = mod.sparse_index
    assert idx.dtype == torch.long and idx.numel() == 10 and (idx[1:] > idx[:-1]).all()
    assert "sparse_index" in dict(mod.named_buffers())
    s = torch.zeros(7 * 9, dtype=D)
    s[idx] = mod.sparse_values.detach()
    w = 0.5 * mod.second.weight @ mod.first.weight + s.view(7, 9)
    x = torch.randn(2, 4, 9, generator=gen, dtype=D)
    assert torch.allclose(mod(x), x @ w.mT + mod.bias, atol=1e-12)
    assert torch.allclose(mod.dense_weight(), w, atol=1e-12)
    assert torch.allclose(merge(nn.Sequential(mod))[0](x), mod(x), atol=1e-12)
    conv = mod.to_sparse_lowrank()
    assert type(conv) is SparseLowRankLinear and torch.allclose(conv(x), mod(x), atol=1e-12)
    low = _sl(gen, nnz=0)  # no sparse part: plain factorized forward, same map
    w = 0.5 * low.second.weight @ low.first.weight
    assert torch.allclose(low(x), x @ w.mT + low.bias, atol=1e-12)
    assert type(low.to_sparse_lowrank()) is LowRankLinear


def test_sltrain_gradients_reach_only_the_support(gen):
    mod = _sl(gen)
    x = torch.randn(5, 9, generator=gen, dtype=D)
    w = mod.dense_weight().detach().requires_grad_()
    (x @ w.mT).pow(2).sum().backward()
    mod(x).sub(mod.bias).pow(2).sum().backward()
    # the chain rule through W = 0.5 B A + S: only S's support gets a gradient of its own
    assert torch.allclose(mod.sparse_values.grad, w.grad.view(-1)[mod.sparse_index])
    b, a = mod.second.weight.detach(), mod.first.weight.detach()
    assert torch.allclose(mod.second.weight.grad, 0.5 * w.grad @ a.mT, atol=1e-12)
    assert torch.allclose(mod.first.weight.grad, 0.5 * b.mT @ w.grad, atol=1e-12)
    # the backward recomputes W: no out x in tensor is saved for it
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        mod(x)
    assert saved and (7, 9) not in saved


def test_sltrain_trains_under_autocast(gen):
    torch.manual_seed(0)
    mod = SLTrainLinear(16, 8, 4, 20, generator=gen)
    with torch.no_grad():
        mod.second.weight.normal_(generator=gen)
    x = torch.randn(3, 16, generator=gen)
    ref = mod(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mod(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)
    y.float().pow(2).sum().backward()
    grads = [mod.sparse_values.grad, mod.first.weight.grad, mod.second.weight.grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all()
               for g in grads)


def test_sparse_lowrank_linear_gradcheck(gen):
    x = torch.randn(3, 5, generator=gen, dtype=D, requires_grad=True)
    b = torch.randn(4, 2, generator=gen, dtype=D, requires_grad=True)
    a = torch.randn(2, 5, generator=gen, dtype=D, requires_grad=True)
    v = torch.randn(6, generator=gen, dtype=D, requires_grad=True)
    bias = torch.randn(4, generator=gen, dtype=D, requires_grad=True)
    idx = torch.tensor([0, 3, 7, 8, 15, 19])
    assert torch.autograd.gradcheck(
        lambda *t: sparse_lowrank_linear(*t[:4], idx, t[4], scale=0.7), (x, b, a, v, bias))
    assert torch.autograd.gradcheck(lambda *t: sparse_lowrank_linear(*t, idx), (x, b, a, v))


def test_sltrain_replaces_selected_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.Linear(8, 3))
    new = sltrain(model, SLTrainConfig(rank=2, density=0.1, exclude_modules=["3"], seed=1))
    assert isinstance(model[0], nn.Linear)  # copy
    assert isinstance(new[0], SLTrainLinear) and isinstance(new[3], nn.Linear)
    assert new[0].nnz == 13 and new[0].scale == 16.0 and new[0].second.weight.abs().max() == 0
    again = sltrain(model, SLTrainConfig(rank=2, density=0.1, exclude_modules=["3"], seed=1))
    assert torch.equal(again[2].sparse_index, new[2].sparse_index)
    assert not torch.equal(new[0].sparse_index[:5], new[2].sparse_index[:5])
    rep = sltrain_report(new)
    assert rep.layer("0").params_after == 2 * 24 + 13 and rep.model_params_before == \
        sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="SLTrainConfig.rank=9 exceeds"):
        sltrain(model, SLTrainConfig(rank=9))
    with pytest.raises(ValueError, match="SLTrainConfig.density"):
        SLTrainConfig(rank=2, density=1.0)
    with pytest.raises(ValueError, match="layer_types"):
        SLTrainConfig(layer_types=("lstm",))


# ---- save / load, the training entry ---------------------------------------------------------


def test_save_load_round_trips_every_new_module(tmp_path, gen):
    model = _model()
    mae = Maestro(model, MaestroConfig(target_modules=["rnn", "proj"]))
    mae.model.proj.set_unit_rank("", 5)
    mae.model.rnn.set_unit_rank("weight_hh_l1", 3)
    net = sltrain(mae.model, SLTrainConfig(rank=3, density=0.2, target_modules=["out"]))
    net.eval()
    save_compressed(net, tmp_path)
    loaded = load_compressed(tmp_path, _model(seed=5)).eval()
    assert {n: type(m) for n, m in loaded.named_modules()} == \
        {n: type(m) for n, m in net.named_modules()}
    assert loaded.rnn.factorized == net.rnn.factorized and loaded.proj.rank == 5
    state, got = net.state_dict(), loaded.state_dict()
    assert state.keys() == got.keys() and all(torch.equal(state[k], got[k]) for k in state)
    x = _data(gen)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


@pytest.mark.parametrize("config", [
    TRPConfig(rank=2, period=2, nuclear_weight=1e-3, target_modules=["rnn"]),
    MaestroConfig(target_modules=["rnn", "proj"], group_lasso=1e-3, prune_every=2),
    SLTrainConfig(rank=2, target_modules=["proj", "out"]),
])
def test_train_low_rank(config, gen):
    model = _model()
    data = _data(gen)
    small, report, losses = train_low_rank(model, data, _loss, config, steps=4, lr=1e-2,
                                           rank=2 if isinstance(config, MaestroConfig) else None)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert report.layers and all(r.rank == 2 for r in report.layers)
    assert report.model_params_after == sum(p.numel() for p in small.parameters())
    assert not small.training
    with torch.no_grad():
        assert torch.isfinite(small(data[0])).all()


def test_maestro_rank_limits(gen):
    with pytest.raises(ValueError, match="MaestroConfig.rank=9 exceeds min.*of rnn"):
        Maestro(_model(), MaestroConfig(rank=9, target_modules=["rnn"]))
    mae = Maestro(_model(), MaestroConfig(rank=6, target_modules=["rnn", "proj"]))
    assert mae.rank_report()["rnn.weight_ih_l0"]["capacity"] == 6
    mae.model.proj.set_unit_rank("", 3)  # e.g. after shrinking: pruned components stay out
    with pytest.raises(ValueError, match=r"Maestro.compress\(proj\): rank must be an integer "
                                         r"in \[1, 3\] \(the rank in use\)"):
        mae.compress(rank=4)
    with pytest.raises(ValueError, match=r"\[1, 6\] \(the capacity\)"):
        mae.model.proj.set_unit_rank("", 7)


def test_maestro_shrink_keys_report_and_rnn_capacity(gen):
    # capacity: only the selected RNN matrices count (W_hh 64 x 16 takes rank 8 although
    # W_ih of layer 0 has 4 columns)
    lstm = nn.Sequential(nn.LSTM(4, 16)).to(D)
    mae = Maestro(lstm, MaestroConfig(rank=8, rnn_matrices=("hh",)))
    assert mae.rank_report()["0.weight_hh_l0"]["capacity"] == 8
    with pytest.raises(ValueError, match="rank=8 exceeds min"):
        Maestro(lstm, MaestroConfig(rank=8, rnn_matrices=("ih", "hh")))
    # shrinking redraws the widths inside the new ranks: no gradient reaches pruned parts
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(D)
    dense_params = sum(p.numel() for p in model.parameters())
    mae = Maestro(model, MaestroConfig(sampler="independent", seed=1))
    lin = mae.model[0]
    lin.width = 8
    with torch.no_grad():
        lin.first.weight[2:] *= 1e-6  # components 2.. unimportant
        lin.second.weight[:, 2:] *= 1e-6
    mae.shrink(threshold=1e-3)
    assert lin.rank == 2 and lin.width <= 2
    lin.width = 8  # a stale width is clipped to the rank all the same
    mae.model.train()
    mae.model(torch.randn(5, 8, dtype=D, generator=gen)).sum().backward()
    assert (lin.first.weight.grad[2:] == 0).all() and (lin.second.weight.grad[:, 2:] == 0).all()
    # a rank dict with an unknown key is an error, not silently ignored
    with pytest.raises(KeyError, match=r"unknown unit keys \['O'\]; the units are \['0', '2'\]"):
        mae.compress(rank={"O": 1})
    with pytest.raises(KeyError, match="unknown unit keys"):
        mae.truncate({"zero": 1})
    # the report counts the dense model's parameters as "before"
    small, report = mae.compress()
    assert report.model_params_before == dense_params
    assert report.model_params_after == sum(p.numel() for p in small.parameters())


def test_hf_conv1d_layers(gen):
    """GPT-2's Conv1D (weight stored in x out) under all three methods."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2Model(cfg).eval()
    x = torch.randint(0, 40, (2, 6), generator=gen)
    trp = TRP(model, TRPConfig(rank=3, target_modules=["c_fc"]))
    trp.project()
    assert torch.linalg.matrix_rank(model.h[0].mlp.c_fc.weight) == 3
    small, _ = trp.compress()
    assert isinstance(small.h[0].mlp.c_fc, LowRankLinear) and small.h[0].mlp.c_fc.orig == "Conv1D"
    with torch.no_grad():
        ref = model(x).last_hidden_state
        assert torch.allclose(small(x).last_hidden_state, ref, atol=1e-4)
    mae = Maestro(model, MaestroConfig(target_modules=["c_proj"]))
    with torch.no_grad():
        assert torch.allclose(mae.model.eval()(x).last_hidden_state, ref, atol=1e-4)
    assert type(merge(mae.model).h[0].mlp.c_proj).__name__ == "Conv1D"
    net = sltrain(model, SLTrainConfig(rank=2, target_modules=["c_attn"]))
    lin = net.h[0].attn.c_attn
    assert isinstance(lin, SLTrainLinear) and (lin.out_features, lin.in_features) == (48, 16)
    assert torch.isfinite(net(x).last_hidden_state).all()
