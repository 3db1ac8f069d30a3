"""The GEMM backend (``lorank._gemm``): oneDNN's products equal torch's, the dispatch goes
where it says, and the chains give the same values and gradients on either backend."""

from __future__ import annotations

import pytest
import torch

import lorank
from lorank import _gemm

needs_onednn = pytest.mark.skipif(not _gemm._AVAILABLE, reason="no oneDNN in this torch build")


@pytest.fixture
def count_onednn(monkeypatch):
    """Counts oneDNN calls (plain and fused) while forwarding them."""
    calls = {"n": 0}
    linear, binary = _gemm._LINEAR, _gemm._LINEAR_BINARY

    def counted(fn):
        def call(*args):
            calls["n"] += 1
            return fn(*args)

        return call

    monkeypatch.setattr(_gemm, "_LINEAR", counted(linear))
    monkeypatch.setattr(_gemm, "_LINEAR_BINARY", counted(binary))
    return calls


@pytest.fixture
def backend():
    old = _gemm.get_backend()
    yield _gemm.set_backend
    _gemm.set_backend(old)


def _close(a, b, tol=2e-5):
    scale = b.abs().max().clamp_min(1.0)
    assert ((a - b).abs().max() / scale).item() < tol


def _same_on_both(run, backend, count_onednn, calls: bool = True):
    """``run() -> (values, gradients)`` on torch.mm (no oneDNN call) and on oneDNN (some, if
    ``calls``): equal to float32 rounding."""
    backend("torch")
    ref = run()
    assert count_onednn["n"] == 0
    backend("onednn")
    got = run()
    assert (count_onednn["n"] > 0) == calls
    for g, r in zip(got[0], ref[0], strict=True):
        _close(g, r)
    for g, r in zip(got[1], ref[1], strict=True):
        _close(g, r, 1e-4)


@needs_onednn
@pytest.mark.parametrize("packed", [False, True])
def test_operand_products_equal_torch(packed, count_onednn, monkeypatch):
    monkeypatch.setattr(_gemm, "MIN_WORK", 0)
    monkeypatch.setattr(_gemm, "MIN_PACK_WORK", 0 if packed else 1 << 62)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 96, generator=gen)
    m = torch.randn(96, 40, generator=gen)
    other = torch.randn(16, 40, generator=gen)
    ref = x.double() @ m.double()
    for mat in (m, m.t().contiguous().t()):  # contiguous and transposed layouts
        op = _gemm.Operand(mat, rows=16, uses=10)
        _close(op.mm(x).double(), ref)
        out = torch.empty(16, 40)
        assert op.mm(x, out=out) is out
        _close(out.double(), ref)
        _close(op.mm_mul(x, other).double(), ref * other.double())
        acc = other.clone()
        assert op.addmm_(acc, x) is acc
        _close(acc.double(), ref + other.double())
        _close(op.mm(x[:5]).double(), ref[:5])  # fewer rows than packed for
    assert count_onednn["n"] == 10


@needs_onednn
def test_mm_views_and_fallbacks(count_onednn, monkeypatch):
    monkeypatch.setattr(_gemm, "MIN_WORK", 0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 30, generator=gen)
    g = torch.randn(64, 20, generator=gen)
    _close(_gemm.mm(x.t(), g).double(), x.t().double() @ g.double())  # strided operands
    assert count_onednn["n"] == 1
    # float64, per-example matrices and tensors that autograd tracks stay with torch
    _close(_gemm.mm(x.double().t(), g.double()), x.t().double() @ g.double(), 1e-12)
    batched = torch.randn(64, 30, 5, generator=gen)
    _close(_gemm.mm(x, batched), (x.unsqueeze(1) @ batched).squeeze(1), 1e-6)
    w = torch.randn(30, 20, requires_grad=True)
    y = _gemm.mm(x, w)
    y.sum().backward()
    _close(w.grad, x.sum(0, keepdim=True).t().expand(30, 20), 1e-5)
    assert count_onednn["n"] == 1


@needs_onednn
def test_small_products_stay_with_torch(count_onednn):
    _gemm.mm(torch.randn(4, 8), torch.randn(8, 4))
    assert count_onednn["n"] == 0


@needs_onednn
def test_torch_backend_never_calls_onednn(count_onednn, backend, monkeypatch):
    monkeypatch.setattr(_gemm, "MIN_WORK", 0)
    backend("torch")
    _gemm.mm(torch.randn(16, 64), torch.randn(64, 32))
    _gemm.Operand(torch.randn(64, 32), rows=16, uses=100).mm(torch.randn(16, 64))
    assert count_onednn["n"] == 0


def test_backend_names_are_checked(backend):
    with pytest.raises(ValueError, match="'mkl'"):
        backend("mkl")
    assert backend("torch") in _gemm.BACKENDS
    assert _gemm.get_backend() == "torch"


def _hmm_grads(kind: str, gen: torch.Generator, t: int = 9, em_grad: bool = True):
    z, r, b = 48, 12, 6
    init = torch.randn(z, generator=gen).requires_grad_()
    tensors = [init]
    if kind == "dense":
        logits = torch.randn(z, z, generator=gen).requires_grad_()
        factor, tensors = lorank.Dense(logits), [*tensors, logits]
    else:
        left = torch.randn(z, r, generator=gen).requires_grad_()
        right = torch.randn(z, r, generator=gen).requires_grad_()
        factor, tensors = lorank.LowRank(left, right), [*tensors, left, right]
        if kind == "lowrank+banded":
            band = torch.randn(z, 3, generator=gen).requires_grad_()
            factor, tensors = factor + lorank.Banded(band, 1), [*tensors, band]
    em = torch.randn(b, t, z, generator=gen).log_softmax(-1).requires_grad_(em_grad)
    lengths = torch.tensor([9, 7, 9, 1, 4, 9]).clamp(max=t)
    with torch.no_grad():
        fwd_only = lorank.HMM(init, factor, em, lengths=lengths).log_partition
    log_z = lorank.HMM(init, factor, em, lengths=lengths).log_partition
    wrt = [*tensors, em] if em_grad else tensors
    grads = torch.autograd.grad((log_z * torch.arange(1.0, b + 1)).sum(), wrt)
    return (fwd_only, log_z.detach()), grads


@needs_onednn
@pytest.mark.parametrize("kind", ["dense", "lowrank", "lowrank+banded"])
@pytest.mark.parametrize("t, em_grad", [(9, True), (9, False), (1, True)])
def test_chain_same_on_both_backends(kind, t, em_grad, count_onednn, backend, monkeypatch):
    """The scaled chain (forward only, forward + backward with and without the emission
    gradient, one step, padding) on oneDNN equals torch's."""
    monkeypatch.setattr(_gemm, "MIN_WORK", 0)
    monkeypatch.setattr(_gemm, "MIN_PACK_WORK", 0)
    _same_on_both(lambda: _hmm_grads(kind, torch.Generator().manual_seed(2), t, em_grad),
                  backend, count_onednn, calls=t > 1)  # one step: no product


@needs_onednn
def test_chain_backward_runs_on_onednn(count_onednn, backend, monkeypatch):
    """The hand-written backward's products themselves go to oneDNN (not only the forward)."""
    monkeypatch.setattr(_gemm, "MIN_WORK", 0)
    backend("onednn")
    gen = torch.Generator().manual_seed(9)
    left, right = torch.randn(40, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    em = torch.randn(3, 6, 40, generator=gen)
    log_z = lorank.HMM(torch.zeros(40), lorank.LowRank(left, right), em).log_partition
    n_forward = count_onednn["n"]
    assert n_forward >= 2 * 5  # two products per step
    log_z.sum().backward()
    assert count_onednn["n"] - n_forward >= 2 * 5 + 2  # two per step, one per weight


@needs_onednn
def test_derivative_modes_never_reach_onednn(count_onednn, monkeypatch):
    """Forward mode and torch.func through the non-differentiable products (a factor's
    ``matmul``, ``mm``, an ``Operand``) fall back to torch and keep their tangents."""
    import torch.autograd.forward_ad as fwAD

    monkeypatch.setattr(_gemm, "MIN_WORK", 0)
    gen = torch.Generator().manual_seed(10)
    factor = lorank.LowRank(torch.randn(30, 6, generator=gen), torch.randn(30, 6, generator=gen))
    p = factor.log_probs().exp()
    x, dx = torch.rand(4, 30, generator=gen), torch.randn(4, 30, generator=gen)
    m = torch.randn(30, 20, generator=gen)
    n0 = count_onednn["n"]  # the reference p itself may be built on oneDNN
    with fwAD.dual_level():
        y = factor.matmul(fwAD.make_dual(x, dx))
        _close(fwAD.unpack_dual(y).tangent, dx @ p, 1e-5)
        y = _gemm.mm(fwAD.make_dual(x, dx), m)
        _close(fwAD.unpack_dual(y).tangent, dx @ m, 1e-5)
        y = _gemm.Operand(m, rows=4, uses=10).mm(fwAD.make_dual(x, dx))
        _close(fwAD.unpack_dual(y).tangent, dx @ m, 1e-5)
    _, tangent = torch.func.jvp(factor.matmul, (x,), (dx,))
    _close(tangent, dx @ p, 1e-5)
    _close(torch.func.vmap(lambda v: _gemm.mm(v.unsqueeze(0), m))(x).squeeze(1), x @ m, 1e-5)
    assert count_onednn["n"] == n0


@needs_onednn
def test_rank_space_same_on_both_backends(count_onednn, backend, monkeypatch):
    monkeypatch.setattr(_gemm, "MIN_WORK", 0)
    gen = torch.Generator().manual_seed(3)
    z, r, b, t = 40, 6, 5, 8
    params = [torch.randn(z), torch.randn(z, r), torch.randn(z, r)]
    em = torch.randn(b, t, z, generator=gen).log_softmax(-1)

    def run():
        leaves = [p.clone().requires_grad_() for p in [*params, em]]
        init, left, right, e = leaves
        log_z = lorank.RankSpaceHMM(init, lorank.LowRank(left, right), e).log_partition
        return [log_z.detach()], torch.autograd.grad(log_z.sum(), leaves)

    _same_on_both(run, backend, count_onednn)


@needs_onednn
def test_memory_light_same_on_both_backends(count_onednn, backend, monkeypatch):
    monkeypatch.setattr(_gemm, "MIN_WORK", 0)
    gen = torch.Generator().manual_seed(4)
    z, r, b, t = 32, 8, 4, 7
    params = [torch.randn(z, generator=gen), torch.randn(z, r, generator=gen),
              torch.randn(z, r, generator=gen), torch.randn(b, t, z, generator=gen)]

    def run():
        leaves = [p.clone().requires_grad_() for p in params]
        init, left, right, em = leaves
        hmm = lorank.HMM(init, lorank.LowRank(left, right), em, memory_light=True)
        log_z = hmm.log_partition
        return [log_z.detach()], torch.autograd.grad(log_z.sum(), leaves)

    _same_on_both(run, backend, count_onednn)


@pytest.mark.parametrize("value, expect", [("torch", "torch"), ("auto", "auto"), ("mkl", None)])
def test_backend_from_environment(value, expect):
    import os
    import subprocess
    import sys

    env = {**os.environ, "LORANK_GEMM": value}
    code = "from lorank import _gemm; print(_gemm.get_backend())"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if expect is None:
        assert res.returncode != 0 and "GEMM backend must be one of" in res.stderr
    else:
        assert res.returncode == 0 and res.stdout.strip() == expect


@needs_onednn
def test_matmul_gradients_equal_torch(count_onednn):
    """The differentiable product: value, both gradients, a second derivative (create_graph)
    and forward mode equal ``a @ b``'s (float32; oneDNN for all of them)."""
    gen = torch.Generator().manual_seed(5)
    a0, b0 = torch.randn(200, 64, generator=gen), torch.randn(64, 300, generator=gen)
    w = torch.randn(200, 300, generator=gen)

    def grads(fn):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        y = fn(a, b)
        ga, gb = torch.autograd.grad((y * w).sum(), [a, b], create_graph=True)
        # a second derivative: d/db of sum(ga^2)
        (ggb,) = torch.autograd.grad(ga.pow(2).sum(), [b])
        return y.detach(), ga.detach(), gb.detach(), ggb

    ref = grads(lambda a, b: a @ b)
    n0 = count_onednn["n"]
    got = grads(_gemm.matmul)
    assert count_onednn["n"] - n0 >= 4  # forward, two gradients, the second derivative's
    for g, r in zip(got, ref, strict=True):
        _close(g, r, 1e-5)
    import torch.autograd.forward_ad as fwAD

    da, db = torch.randn_like(a0), torch.randn_like(b0)
    with fwAD.dual_level():
        y = _gemm.matmul(fwAD.make_dual(a0, da), fwAD.make_dual(b0, db))
        _close(fwAD.unpack_dual(y).tangent, da @ b0 + a0 @ db, 1e-5)


@needs_onednn
def test_matmul_under_torch_func_uses_torch(count_onednn):
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(200, 64, generator=gen), torch.randn(64, 300, generator=gen)
    g = torch.func.grad(lambda x: _gemm.matmul(x, b).sum())(a)
    _close(g, torch.ones(200, 300) @ b.t(), 1e-5)
    batched = torch.func.vmap(lambda x: _gemm.matmul(x, b))(a.view(4, 50, 64))
    _close(batched.reshape(200, 300), a @ b, 1e-5)
    assert count_onednn["n"] == 0


def test_matmul_float64_is_exact():
    a = torch.randn(30, 20, dtype=torch.float64, requires_grad=True)
    b = torch.randn(20, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_gemm.matmul, (a, b))
    torch.testing.assert_close(_gemm.matmul(a, b), a @ b, rtol=0, atol=0)


@needs_onednn
@pytest.mark.filterwarnings("ignore:Input #.*double precision")
def test_matmul_function_gradcheck(monkeypatch):
    """gradcheck / gradgradcheck of the custom Function itself (float32: oneDNN has no float64
    product; finite differences with a large step, so loose tolerances)."""
    monkeypatch.setattr(_gemm, "MIN_WORK", 0)
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(6, 5, generator=gen).requires_grad_()
    b = torch.randn(5, 4, generator=gen).requires_grad_()
    kw = {"eps": 1e-2, "atol": 1e-2, "rtol": 1e-2}
    assert torch.autograd.gradcheck(_gemm._MatMul.apply, (a, b), **kw)
    assert torch.autograd.gradgradcheck(_gemm._MatMul.apply, (a, b), **kw)
    assert torch.autograd.gradcheck(_gemm._MatMul.apply, (a, b), check_forward_ad=True,
                                    check_backward_ad=False, check_batched_grad=False, **kw)


@needs_onednn
@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_hsmm_same_on_both_backends(kind, count_onednn, backend, monkeypatch):
    """The semi-Markov forward (log-space operators, and the deferred transition gradient:
    a 256 x 256 matrix) on oneDNN equals torch's, value and gradients."""
    monkeypatch.setattr(_gemm, "MIN_WORK", 0)
    gen = torch.Generator().manual_seed(8)
    z, r, b, t, k = 256, 8, 3, 7, 3
    params = [torch.randn(z, generator=gen), torch.randn(z, k, generator=gen),
              torch.randn(b, t, z, generator=gen)]
    params += ([torch.randn(z, z, generator=gen)] if kind == "dense"
               else [torch.randn(z, r, generator=gen), torch.randn(z, r, generator=gen)])

    def run():
        leaves = [p.clone().requires_grad_() for p in params]
        init, duration, em, *mats = leaves
        factor = lorank.Dense(*mats) if kind == "dense" else lorank.LowRank(*mats)
        log_z = lorank.HSMM(init, factor, duration, em).log_partition
        return [log_z.detach()], torch.autograd.grad(log_z.sum(), leaves)

    _same_on_both(run, backend, count_onednn)


@needs_onednn
def test_emission_heads_same_on_both_backends(count_onednn, backend, monkeypatch):
    """The word and piano-roll heads (float32, through ``matmul``) on both backends."""
    from lorank.nn.emissions import Bernoulli88Emission, SoftmaxEmission

    monkeypatch.setattr(_gemm, "MIN_WORK", 0)
    torch.manual_seed(11)
    word, keys = SoftmaxEmission(vocab_size=50, hidden=16), Bernoulli88Emission(hidden=16)
    emb = torch.randn(12, 16)
    tokens = torch.randint(0, 50, (3, 7))
    roll = (torch.rand(3, 7, 88) < 0.1).float()

    def run():
        e = emb.clone().requires_grad_()
        out = [word(e, tokens), keys(e, roll)]
        params = [e, word.word_emb, word.bias, *keys.parameters()]
        grads = torch.autograd.grad(sum(o.sum() for o in out), params)
        return [o.detach() for o in out], grads

    _same_on_both(run, backend, count_onednn)
