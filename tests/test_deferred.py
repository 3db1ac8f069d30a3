"""Deferred matrix gradients (``lorank._deferred``): the HSMM's transition gradient as one GEMM
equals autograd's per-step outer products, in every way a gradient can be asked for."""

import pytest
import torch

import lorank
import lorank._deferred as deferred

D = torch.float64


def _hsmm_inputs(kind: str, seed: int = 0, b: int = 3, t: int = 7, z: int = 6, k: int = 3):
    gen = torch.Generator().manual_seed(seed)
    p = {"init": torch.randn(z, dtype=D, generator=gen),
         "duration": torch.randn(z, k, dtype=D, generator=gen)}
    if kind == "dense":
        p["logits"] = torch.randn(z, z, dtype=D, generator=gen)
    elif kind == "batched":
        p["logits"] = torch.randn(b, z, z, dtype=D, generator=gen)
    else:
        p["left"] = torch.randn(z, 2, dtype=D, generator=gen)
        p["right"] = torch.randn(z, 2, dtype=D, generator=gen)
    em = torch.randn(b, t, z, dtype=D, generator=gen)
    return p, em


def _log_z(p: dict, em: torch.Tensor) -> torch.Tensor:
    if "logits" in p:
        f = lorank.Dense(p["logits"])
    else:
        f = lorank.LowRank(p["left"], p["right"])
    lengths = torch.tensor([em.shape[1], 4, 1][: em.shape[0]])
    return lorank.HSMM(p["init"], f, p["duration"], em, lengths).log_partition


def _leaves(p, em):
    return ({k: v.clone().requires_grad_(True) for k, v in p.items()},
            em.clone().requires_grad_(True))


@pytest.fixture
def defer_all(monkeypatch):
    """Defer every matrix (the threshold is for speed only), and count the deferred passes."""
    monkeypatch.setattr(deferred, "DEFER_MIN_NUMEL", 0)
    calls = []
    orig = deferred.MatrixTape.matrix_grads

    def counted(self):
        calls.append(len(self.mats))
        return orig(self)

    monkeypatch.setattr(deferred.MatrixTape, "matrix_grads", counted)
    return calls


def _reference_grads(p, em, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(deferred.MatrixTape, "defers", lambda self, mat: False)
        pr, xr = _leaves(p, em)
        _log_z(pr, xr).sum().backward()
    return {**{k: v.grad for k, v in pr.items()}, "emission": xr.grad}


@pytest.mark.parametrize("kind", ["dense", "batched", "lowrank"])
def test_deferred_gradients_match_per_step_autograd(kind, defer_all, monkeypatch):
    p, em = _hsmm_inputs(kind)
    want = _reference_grads(p, em, monkeypatch)
    pg, xg = _leaves(p, em)
    _log_z(pg, xg).sum().backward()
    assert defer_all == [1 if kind != "lowrank" else 2]  # the sink ran once, on every matrix
    got = {**{k: v.grad for k, v in pg.items()}, "emission": xg.grad}
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, msg=name)


def test_partial_then_full_backward_counts_each_step_once(defer_all, monkeypatch):
    p, em = _hsmm_inputs("dense", seed=1)
    want = _reference_grads(p, em, monkeypatch)
    pg, xg = _leaves(p, em)
    out = _log_z(pg, xg).sum()
    # a gradient for the emissions only: the sink does not run, nothing may be left recorded
    (ge,) = torch.autograd.grad(out, [xg], retain_graph=True)
    torch.testing.assert_close(ge, want["emission"])
    assert defer_all == []
    out.backward(retain_graph=True)
    out.backward()  # twice: the gradients double, no step is counted a third time
    torch.testing.assert_close(pg["logits"].grad, 2 * want["logits"])


def test_second_derivatives_through_deferred_products(defer_all, monkeypatch):
    p, em = _hsmm_inputs("dense", seed=2, b=2, t=5, z=4)

    def hvp(defer: bool):
        with monkeypatch.context() as m:
            if not defer:
                m.setattr(deferred.MatrixTape, "defers", lambda self, mat: False)
            logits = p["logits"].clone().requires_grad_(True)
            q = {**p, "logits": logits}
            (g,) = torch.autograd.grad(_log_z(q, em).sum(), logits, create_graph=True)
            (h,) = torch.autograd.grad((g * g).sum(), logits)
        return g.detach(), h

    g1, h1 = hvp(True)
    g0, h0 = hvp(False)
    torch.testing.assert_close(g1, g0)
    torch.testing.assert_close(h1, h0)


def test_small_matrices_and_forward_mode_keep_the_plain_product():
    p, em = _hsmm_inputs("dense")
    tape = deferred.MatrixTape()
    m = p["logits"].clone().requires_grad_(True)
    assert not tape.defers(m)  # below DEFER_MIN_NUMEL
    import torch.autograd.forward_ad as fwAD

    big = torch.zeros(256, 256, dtype=D, requires_grad=True)
    assert tape.defers(big)
    with fwAD.dual_level():
        assert not tape.defers(big)
    with torch.no_grad():
        assert not tape.defers(big)


def test_a_pass_without_the_sink_then_a_pass_from_an_early_step(defer_all, monkeypatch):
    from lorank.dp import semimarkov

    p, em = _hsmm_inputs("dense", seed=3)
    init = torch.log_softmax(p["init"], -1).expand(em.shape[0], -1)
    seg = semimarkov.segment_scores(em, torch.log_softmax(p["duration"], -1))

    def grads(defer: bool):
        with monkeypatch.context() as m:
            if not defer:
                m.setattr(deferred.MatrixTape, "defers", lambda self, mat: False)
            logits = p["logits"].clone().requires_grad_(True)
            s = seg.detach().requires_grad_(True)
            _, alpha = semimarkov.forward_messages(init, lorank.Dense(logits), s)
            full = torch.logsumexp(alpha[:, -1], -1).sum()
            torch.autograd.grad(full, [s], retain_graph=True)  # every step runs, no sink
            early = torch.logsumexp(alpha[:, 2], -1).sum()  # depends on steps 0..2 only
            (g,) = torch.autograd.grad(early, [logits])
        return g

    torch.testing.assert_close(grads(True), grads(False))
