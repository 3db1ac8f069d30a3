"""The bare reference loops of ``benchmarks/inference_speed.py`` compute what lorank computes:
they are the floors its speed targets are measured against, so a wrong one would make a
ratio meaningless."""

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
inference_speed = pytest.importorskip("inference_speed")


def _case(kind: str, z: int = 12, r: int = 4, b: int = 3, t: int = 5, width: int = 2):
    gen = torch.Generator().manual_seed(0)
    p, em = inference_speed.hmm_inputs(kind, z, r, b, t, width, gen)
    return {k: v.double() for k, v in p.items()}, em.double()


@pytest.mark.parametrize("kind", ["dense", "lowrank", "band", "rank_space"])
def test_bare_forward_matches_lorank(kind):
    p, em = _case(kind)
    with torch.no_grad():
        bare = inference_speed.bare_hmm(kind, p, em, 2)
        ours = inference_speed.lorank_hmm(kind, p, em, 2)
    torch.testing.assert_close(bare, ours, rtol=1e-10, atol=1e-10)


def test_bare_lowrank_forward_backward_matches_autograd():
    p, em = _case("lowrank")
    pg = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    xg = em.clone().requires_grad_(True)
    log_z = inference_speed.lorank_hmm("lowrank", pg, xg, 0)
    log_z.sum().backward()
    with torch.no_grad():
        bare_z, grads = inference_speed.bare_lowrank_fwdbwd(p, em)
    torch.testing.assert_close(bare_z, log_z.detach(), rtol=1e-10, atol=1e-10)
    for name in ("init", "left", "right"):
        torch.testing.assert_close(grads[name], pg[name].grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(grads["emission"], xg.grad, rtol=1e-8, atol=1e-10)
    # the emission gradient is the state posterior: each step sums to one
    torch.testing.assert_close(grads["emission"].sum(-1), torch.ones(3, 5, dtype=torch.float64))
    assert inference_speed.lowrank_grad_diff(p, em) < 1e-10


@pytest.mark.skipif(not inference_speed.onednn_available(), reason="no oneDNN in this torch")
@pytest.mark.parametrize("kind", ["dense", "lowrank", "band", "rank_space"])
def test_bare_loops_on_onednn_match_torch(kind):
    """The benchmark's oneDNN variants of the bare loops (float32) compute the same values and
    gradients as its torch.mm ones."""
    gen = torch.Generator().manual_seed(1)
    p, em = inference_speed.hmm_inputs(kind, 40, 8, 4, 6, 2, gen)
    with torch.no_grad():
        ref = inference_speed.bare_hmm(kind, p, em, 2, "torch")
        got = inference_speed.bare_hmm(kind, p, em, 2, "onednn")
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
        if kind == "lowrank":
            z_ref, g_ref = inference_speed.bare_lowrank_fwdbwd(p, em, "torch")
            z_got, g_got = inference_speed.bare_lowrank_fwdbwd(p, em, "onednn")
            torch.testing.assert_close(z_got, z_ref, rtol=1e-5, atol=1e-4)
            for name, g in g_ref.items():
                torch.testing.assert_close(g_got[name], g, rtol=1e-4, atol=1e-5)
