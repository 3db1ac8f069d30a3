"""Inference speed: lorank's HMM, HSMM and PCFG against bare reference loops, in one run.

Every contender is timed next to a *bare* reference written here: it takes the same inputs
and does only the necessary work -- normalize the factor once, exponentiate the emissions
once, the scaled (or log-space) recursion; no checks, nothing saved.  Its time is the floor
for the algorithm, and ``ratio`` (lorank time / bare time) is what lorank adds on top.

* HMM (``lorank.HMM`` / ``lorank.RankSpaceHMM``): dense, low-rank, low-rank + band (width 4),
  rank-space; forward only (``torch.no_grad``) and forward + backward (all parameters and the
  emissions require grad); the fwd+bwd ratio is against the bare *forward*.  For low-rank,
  a bare forward+backward (the scaled forward, the backward algorithm, the weight GEMMs and
  the softmax Jacobians, no autograd) measures the floor of that ratio.
* HSMM (``lorank.HSMM``, the sizes of ``inside_speed.py``) and PCFG (``lorank.PCFG``: dense,
  CP, rank-space at the sizes of ``inside_speed.py``), forward and forward + backward.
* Training steps (forward, backward, AdamW) of ``lorank.nn.hmm.HMMLanguageModel`` models
  "hmm", "lhmm", "lhmm_band" (Z = 1024, R = 128, w = 4) and "rank_space" (R = 32) on 4096
  random word ids from a 10k vocabulary.
* Optionally (``--research-code DIR``, a checkout of github.com/justinchiu/low-rank-models),
  the forward of that code's LHMM recursion (``BLHmmLm.compute_rff_loss``) on the same
  low-rank inputs.

Contenders are interleaved (bare, lorank, bare, lorank, ...) and the best time is kept.
Writes ``inference_speed.json`` and ``inference_speed.png`` next to this file and a section
of ``RESULTS.md`` (between markers; the rest of the file, e.g. hand-written notes, is kept).

    python benchmarks/inference_speed.py --threads 1           # the full run
    python benchmarks/inference_speed.py --threads 1 --quick   # small sizes, a smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import types
from pathlib import Path

import torch
from _common import machine_description

import lorank

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- inference_speed:begin -->", "<!-- inference_speed:end -->"


# ---- timing ----------------------------------------------------------------------------------
def interleaved(fns: dict, reps: int, budget_s: float) -> dict[str, float]:
    """Best wall time of each function, run in turns (one warm-up each); fewer turns when one
    turn takes long against ``budget_s``."""
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    turns = max(1, min(reps, int(budget_s / max(sum(first.values()), 1e-6))))
    best = {name: math.inf for name in fns}
    for _ in range(turns):
        for name, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


# ---- the two GEMM kernels of the bare loops ---------------------------------------------------
def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def torch_products(m: torch.Tensor, rows: int):
    """``x -> x @ m`` with ``torch.mm`` (MKL on CPU)."""
    return lambda x: x @ m


def onednn_products(m: torch.Tensor, rows: int):
    """``x -> x @ m`` on oneDNN's kernel, ``m`` packed once for ``rows``-row products (what
    lorank's GEMM backend does on CPU float32; written here with torch's ops)."""
    w = torch.ops.mkldnn._reorder_linear_weight(m.t().contiguous(), rows)
    linear = torch.ops.mkldnn._linear_pointwise.default
    return lambda x: linear(x, w, None, "none", [], "")


def torch_mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x @ y


def onednn_mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise.default(x, y.t(), None, "none", [], "")


KERNELS = {"torch": (torch_products, torch_mm), "onednn": (onednn_products, onednn_mm)}


def matmul_gflops(n: int = 2048) -> dict[str, float]:
    """Square float32 matmul rate of each kernel (torch's default, and oneDNN's if present)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    fns = {"torch": lambda: a @ b}
    if onednn_available():
        fns["onednn"] = lambda: onednn_mm(a, b)
    return {k: 2 * n**3 / t / 1e9 for k, t in interleaved(fns, 3, 10.0).items()}


# ---- HMM: inputs and bare references -----------------------------------------------------------
def hmm_inputs(kind: str, z: int, r: int | None, b: int, t: int, width: int, gen):
    """Parameters (a dict of leaf tensors) and emissions (B, T, Z) of one HMM case."""
    p = {"init": torch.randn(z, generator=gen)}
    if kind == "dense":
        p["logits"] = torch.randn(z, z, generator=gen) * 3
    else:
        p["left"] = torch.randn(z, r, generator=gen) * 3 / math.sqrt(8)
        p["right"] = torch.randn(z, r, generator=gen) * 3 / math.sqrt(8)
    if kind == "band":
        p["band"] = torch.randn(z, 2 * width + 1, generator=gen)
    vocab = 1000
    table = torch.randn(vocab, z, generator=gen).log_softmax(0)
    em = table[torch.randint(0, vocab, (b, t), generator=gen)]
    return p, em


def lorank_hmm(kind: str, p: dict, em: torch.Tensor, width: int):
    if kind == "dense":
        factor = lorank.Dense(p["logits"])
    else:
        factor = lorank.LowRank(p["left"], p["right"])
    if kind == "band":
        factor = factor + lorank.Banded(p["band"], width)
    cls = lorank.RankSpaceHMM if kind == "rank_space" else lorank.HMM
    return cls(p["init"], factor, em).log_partition


def _lowrank_probs(left, right, extra_log_norm=None):
    """Bare LowRank normalization: A (Z, R) and C^T (R, Z) (and the joint normalizer)."""
    s = torch.logsumexp(right, 0)
    ls = left + s
    ln = torch.logsumexp(ls, -1)
    if extra_log_norm is not None:
        ln = torch.logaddexp(ln, extra_log_norm)
    return (ls - ln[:, None]).exp_(), (right - s).exp_().t(), ln


def _scaled_emission(em):
    k = em.amax(-1)
    return (em - k[..., None]).exp_(), k.sum(1)


def bare_hmm(kind: str, p: dict, em: torch.Tensor, width: int, kernel: str = "torch"
             ) -> torch.Tensor:
    """The scaled forward algorithm, nothing else (see the module docstring); products on
    ``kernel`` (a key of :data:`KERNELS`)."""
    products = KERNELS[kernel][0]
    b, t_len, z = em.shape
    pi = p["init"].softmax(-1)
    e, ksum = _scaled_emission(em)
    if kind == "dense":
        mats = [p["logits"].softmax(-1)]
    elif kind == "band":
        masked = p["band"].clone()
        for k in range(2 * width + 1):  # band entries outside [0, Z) -> -inf
            o = k - width
            masked[max(0, z - o) :, k] = -math.inf
            masked[: max(0, -o), k] = -math.inf
        a, ct, ln = _lowrank_probs(p["left"], p["right"], torch.logsumexp(masked, -1))
        dt = (masked - ln[:, None]).exp_().t().contiguous()
        mats = [a, ct]
    else:
        a, ct, _ = _lowrank_probs(p["left"], p["right"])
        mats = [a, ct]
    if kind == "rank_space":
        return _bare_rank_space(pi, a, ct, e, KERNELS[kernel][1]) + ksum
    mats = [products(m, b) for m in mats]
    scales = em.new_empty(t_len, b)
    alpha = pi * e[:, 0]
    for t in range(t_len):
        if t > 0:
            u = alpha
            for m in mats:
                u = m(u)
            if kind == "band":
                for k in range(2 * width + 1):
                    o = k - width
                    if o >= 0:
                        u[:, o:].addcmul_(alpha[:, : z - o], dt[k, : z - o])
                    else:
                        u[:, : z + o].addcmul_(alpha[:, -o:], dt[k, -o:])
            alpha = u.mul_(e[:, t])
        c = alpha.sum(-1)
        scales[t] = c
        alpha.div_(c[:, None])
    return scales.log_().sum(0) + ksum


def _bare_rank_space(pi, a, ct, e, mm=torch_mm):
    """Rank space: every step's R x R matrix from one GEMM, then the O(R^2) recursion."""
    b, t_len, z = e.shape
    r = a.shape[1]
    kr = (ct.t().unsqueeze(-1) * a.unsqueeze(-2)).reshape(z, r * r)
    ms = mm(e[:, 1:].reshape(-1, z), kr).view(b, t_len - 1, r, r)
    alpha = pi * e[:, 0]
    c = alpha.sum(-1)
    logs = c.log()
    m = (alpha / c[:, None]) @ a
    for t in range(t_len - 1):
        m = torch.bmm(m.unsqueeze(1), ms[:, t]).squeeze(1)
        c = m.sum(-1)
        logs = logs + c.log()
        m.div_(c[:, None])
    return logs


def bare_lowrank_fwdbwd(p: dict, em: torch.Tensor, kernel: str = "torch"):
    """The floor of LowRank forward+backward: ``(log Z (B,), grads)`` of ``sum(log Z)`` w.r.t.
    ``init``, ``left``, ``right`` and the emissions, by the scaled forward pass saving its
    messages, the backward algorithm (two GEMMs a step) and one GEMM per weight gradient,
    then the two softmax Jacobians in closed form; products on ``kernel``.  Run it under
    ``torch.no_grad()``."""
    products, mm = KERNELS[kernel]
    b, t_len, z = em.shape
    left, right = p["left"], p["right"]
    r = left.shape[1]
    pi = p["init"].softmax(-1)
    s = torch.logsumexp(right, 0)
    cm = (right - s).exp_()  # C (Z, R), columns sum to one
    ls = left + s
    a = ls.sub_(torch.logsumexp(ls, -1, keepdim=True)).exp_()  # A (Z, R), rows sum to one
    by_a, by_ct = products(a, b), products(cm.t(), b)
    k = em.amax(-1, keepdim=True)
    e = (em - k).transpose(0, 1).contiguous().exp_()  # (T, B, Z)
    ah_all, m_all = em.new_empty(t_len, b, z), em.new_empty(t_len, b, r)
    scales = em.new_empty(t_len, b, 1)
    ah = torch.mul(pi, e[0], out=ah_all[0])
    for t in range(1, t_len):
        m = by_a(ah)
        torch.sum(m, -1, keepdim=True, out=scales[t - 1])
        m = torch.div(m, scales[t - 1], out=m_all[t])
        ah = torch.mul(by_ct(m), e[t], out=ah_all[t])
    torch.sum(ah, -1, keepdim=True, out=scales[t_len - 1])
    log_z = scales.log().sum(0).squeeze(-1) + k.squeeze(-1).sum(1)
    # backward: g = d logZ / d alpha_hat_t; the emission gradient (B, T, Z) is g * alpha_hat
    inv = 1.0 / scales
    ge = em.new_empty(b, t_len, z)
    ge_t = ge.transpose(0, 1)
    w_all, q_all = em.new_empty(t_len, b, z), em.new_empty(t_len, b, r)
    by_c, by_at = products(cm, b), products(a.t(), b)
    g = inv[t_len - 1].expand(b, z)
    for t in range(t_len - 1, 0, -1):
        w = torch.mul(g, e[t], out=w_all[t])
        torch.mul(g, ah_all[t], out=ge_t[t])  # the emission gradient (posterior) of step t
        q = torch.mul(by_c(w), inv[t - 1], out=q_all[t])
        g = by_at(q)
    d_pi = (g * e[0]).sum(0)
    torch.mul(g, ah_all[0], out=ge_t[0])
    d_a = mm(ah_all[:-1].reshape(-1, z).t(), q_all[1:].reshape(-1, r))  # (Z, R)
    d_c = mm(m_all[1:].reshape(-1, r).t(), w_all[1:].reshape(-1, z)).t()  # (Z, R)
    d_init = pi * (d_pi - (d_pi * pi).sum())
    d_left = d_a.mul_(a)  # softmax over r: A (dA - rowsum(dA A))
    d_left.addcmul_(a, d_left.sum(-1, keepdim=True), value=-1.0)
    d_right = d_c.mul(cm)  # softmax over z, plus s's gradient (C times d_left's column sums)
    d_right.addcmul_(cm, d_right.sum(0) - d_left.sum(0), value=-1.0)
    return log_z, {"init": d_init, "left": d_left, "right": d_right, "emission": ge}


def hmm_flops(kind: str, z: int, r: int | None, b: int, t: int, width: int) -> float:
    """Nominal forward flops: the GEMMs (and the band's multiply-adds)."""
    steps = t - 1
    if kind == "dense":
        return steps * 2 * b * z * z
    if kind == "rank_space":
        return 2 * b * steps * z * r * r + steps * 2 * b * r * r
    f = steps * 4 * b * z * r
    if kind == "band":
        f += steps * 2 * b * z * (2 * width + 1)
    return f


def research_fn(repo: Path):
    """``BLHmmLm.compute_rff_loss`` of the paper's code (imported, not copied), or None."""
    lhmm = repo / "lhmm"
    if not (lhmm / "models" / "blhmmlm.py").exists():
        raise FileNotFoundError(f"{lhmm}/models/blhmmlm.py not found (--research-code)")
    sys.path.insert(0, str(lhmm))
    for name in ("genbmm", "torch_struct"):  # imported at module level, unused here
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                stub = types.ModuleType(name)
                stub.logbmm = None
                sys.modules[name] = stub
    from models.blhmmlm import BLHmmLm  # noqa: E402

    return BLHmmLm.compute_rff_loss


def research_case(fn, p: dict, em_table, text):
    """The research code's forward on the same LowRank inputs: its normalization formula
    (``compute_rff_parameters``: normalized ``exp(left)`` rows, ``exp(right)``), written here
    and timed with it, then its recursion; emissions as a (Z, V) table."""
    left, right = p["left"], p["right"]
    start = p["init"].log_softmax(-1)
    stub = types.SimpleNamespace(C=left.shape[0])
    mask = torch.ones_like(text, dtype=torch.bool)

    def run():
        with torch.no_grad():
            ln = (left + right.logsumexp(0, keepdim=True)).logsumexp(-1)
            feats = ((left - ln[:, None]).exp(), right.exp())
            return fn(stub, text, start, feats, em_table, mask=mask)[0].evidence

    return run


# ---- HSMM -------------------------------------------------------------------------------------
def hsmm_inputs(kind, z, r, t, b, k, gen):
    p = {"init": torch.randn(z, generator=gen), "duration": torch.randn(z, k, generator=gen)}
    if kind == "dense":
        p["logits"] = torch.randn(z, z, generator=gen)
    else:
        p["left"] = torch.randn(z, r, generator=gen)
        p["right"] = torch.randn(z, r, generator=gen)
    return p, torch.randn(b, t, z, generator=gen)


def lorank_hsmm(kind, p, em):
    f = lorank.Dense(p["logits"]) if kind == "dense" else lorank.LowRank(p["left"], p["right"])
    return lorank.HSMM(p["init"], f, p["duration"], em).log_partition


def bare_hsmm(kind, p, em):
    """Semi-Markov forward in log space: segment scores from one cumulative sum, then
    ``alpha_t = LSE_d start_{t-d+1} + seg_{t,d}`` and ``start_{t+1} = log(exp(alpha_t) P)``."""
    b, t_len, z = em.shape
    k = p["duration"].shape[-1]
    dur = p["duration"].log_softmax(-1).t()  # (K, Z)
    if kind == "dense":
        mats = [p["logits"].softmax(-1)]
    else:
        a, ct, _ = _lowrank_probs(p["left"], p["right"])
        mats = [a, ct]
    cs = torch.cat([em.new_zeros(b, 1, z), em.cumsum(1)], 1)  # (B, T+1, Z)
    starts = [p["init"].log_softmax(-1).expand(b, z)]
    alpha = None
    for t in range(t_len):
        d = min(k, t + 1)
        window = torch.stack(starts[t - d + 1 : t + 1][::-1], 1)  # (B, d, Z)
        seg = cs[:, t + 1].unsqueeze(1) - cs[:, t + 1 - d : t + 1].flip(1) + dur[:d]
        alpha = torch.logsumexp(window + seg, 1)
        if t + 1 < t_len:
            mx = alpha.amax(-1, keepdim=True)
            x = (alpha - mx).exp()
            for m in mats:
                x = x @ m
            starts.append(x.log_() + mx)
    return torch.logsumexp(alpha, -1)


# ---- PCFG -------------------------------------------------------------------------------------
def pcfg_inputs(kind, m, r, n, b, gen):
    s = 2 * m  # m nonterminals and m preterminals
    if kind == "dense":
        params = {"logits": torch.randn(m, s, s, generator=gen)}
    else:  # CPRules / RankSpaceRules(head, left, right)
        params = {name: torch.randn(rows, r, generator=gen)
                  for name, rows in (("head", m), ("left", s), ("right", s))}
    term = torch.randn(b, n, m, generator=gen).log_softmax(-1)
    return {"rules": params, "root": torch.randn(m, generator=gen), "kind": kind}, term


def _rules(p):
    cls = {"dense": lorank.DenseRules, "cp": lorank.CPRules,
           "rank_space": lorank.RankSpaceRules}[p["kind"]]
    return cls(**p["rules"])


def lorank_pcfg(p, term):
    return lorank.PCFG(p["root"], _rules(p), term).log_partition


def _lmm(x, y):
    """``log(exp(x) @ exp(y))`` by max-shifted GEMM (x (..., n, k), y (k, m))."""
    xm = x.amax(-1, keepdim=True)
    ym = y.amax(-2, keepdim=True)
    return ((x - xm).exp() @ (y - ym).exp()).log() + xm + ym


def bare_pcfg(p, term):
    """The inside algorithm (CKY) in log space with one batched product per width over all
    spans and splits: dense by child blocks (O(n^3 S^2 + n^2 S^2 m)), CP (O(n^3 r + n^2 m r))
    and rank space (O(n^3 r + n^2 r^2)); all sentences have length n."""
    b, n, pp = term.shape
    kind, prm = p["kind"], p["rules"]
    root = p["root"].log_softmax(-1)
    if kind == "dense":
        logits = prm["logits"]
        m = logits.shape[0]
        probs = logits.flatten(1).softmax(-1).view_as(logits)
        blocks = {bl: probs[:, rs, cs].flatten(1).t()
                  for bl, rs, cs in (("NN", slice(0, m), slice(0, m)),
                                     ("NP", slice(0, m), slice(m, None)),
                                     ("PN", slice(m, None), slice(0, m)),
                                     ("PP", slice(m, None), slice(m, None)))}
        chart = term.new_full((b, n, n + 1, m), -math.inf)  # (start, width)
        for w in range(2, n + 1):
            nw = n - w + 1
            parts = []
            if w == 2:
                parts.append(("PP", term[:, :nw, None], term[:, 1:, None]))
            else:
                parts.append(("PN", term[:, :nw, None],
                              chart[:, 1 : nw + 1, w - 1, None]))
                parts.append(("NP", chart[:, :nw, w - 1, None], term[:, w - 1 :, None]))
            if w >= 4:
                ks = torch.arange(2, w - 1)
                starts = torch.arange(nw)[:, None] + ks
                parts.append(("NN", chart[:, :nw, 2 : w - 1], chart[:, starts, w - ks]))
            vals = []
            for bl, left, right in parts:
                lm = left.amax(-1, keepdim=True)
                rm = right.amax(-1, keepdim=True)
                tot = lm + rm
                big = tot.amax(2, keepdim=True)
                pl = (left - lm).exp() * (tot - big).exp()
                x = pl.transpose(-1, -2) @ (right - rm).exp()  # (B, nw, Sb, Sc)
                vals.append((x.flatten(-2) @ blocks[bl]).log() + big.squeeze(-1))
            chart[:, :nw, w] = torch.logsumexp(torch.stack(vals), 0)
        return torch.logsumexp(root + chart[:, 0, n], -1)
    head, left_f, right_f = prm["head"], prm["left"], prm["right"]
    m = head.shape[0]
    sl, sr = left_f.logsumexp(0), right_f.logsumexp(0)
    lh = head + sl + sr
    lh = lh - lh.logsumexp(-1, keepdim=True)
    ll, lr = left_f - sl, right_f - sr
    lproj = term.new_full((b, n, n + 1, lh.shape[1]), -math.inf)
    rproj = term.new_full((b, n + 1, n + 1, lh.shape[1]), -math.inf)
    lproj[:, :, 1] = _lmm(term, ll[m:])
    rproj[:, 1:, 1] = _lmm(term, lr[m:])
    if kind == "rank_space":
        to_l, to_r = _lmm(lh.t(), ll[:m]), _lmm(lh.t(), lr[:m])
    vec = None
    for w in range(2, n + 1):
        nw = n - w + 1
        s = torch.logsumexp(lproj[:, :nw, 1:w] + rproj[:, w:, 1:w].flip(2), 2)  # (B, nw, r)
        if kind == "rank_space":
            vec, lp, rp = s, _lmm(s, to_l), _lmm(s, to_r)
        else:
            vec = _lmm(s, lh.t())
            lp, rp = _lmm(vec, ll[:m]), _lmm(vec, lr[:m])
        lproj[:, :nw, w] = lp
        rproj[:, w:, w] = rp
    if kind == "rank_space":
        return torch.logsumexp(_lmm(root[None], lh) + vec[:, 0], -1)
    return torch.logsumexp(root + vec[:, 0], -1)


# ---- running cases ---------------------------------------------------------------------------
def leaves(p):
    """Copies of the parameter tensors that require grad (nested dicts too)."""
    if isinstance(p, dict):
        return {k: leaves(v) for k, v in p.items()}
    if isinstance(p, torch.Tensor):
        return p.detach().clone().requires_grad_(True)
    return p


def flat_leaves(p) -> list[torch.Tensor]:
    if isinstance(p, dict):
        return [t for v in p.values() for t in flat_leaves(v)]
    return [p] if isinstance(p, torch.Tensor) else []


def time_case(bare, ours, p, x, reps, budget, extra=None):
    """{fwd_bare, fwd, fwdbwd, ...} seconds, all contenders interleaved round by round, and
    the largest |log Z| difference between lorank and the bare loop."""

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(p, x)

        return run

    pg, xg = leaves(p), x.detach().clone().requires_grad_(True)

    def fwdbwd():
        ours(pg, xg).sum().backward()
        for t in [xg, *flat_leaves(pg)]:  # as zero_grad(set_to_none=True) in a training loop
            t.grad = None

    with torch.no_grad():
        diff = float((bare(p, x).double() - ours(p, x).double()).abs().max())
    fns = {"fwd_bare": fwd(bare), "fwd": fwd(ours), "fwdbwd": fwdbwd}
    if extra:
        fns.update(extra)
    out = interleaved(fns, reps, budget)
    out["logz_diff"] = diff
    return out


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


def bare_fwdbwd_run(p: dict, em: torch.Tensor, kernel: str = "torch") -> None:
    with torch.no_grad():
        bare_lowrank_fwdbwd(p, em, kernel)


def lowrank_grad_diff(p: dict, em: torch.Tensor, kernel: str = "torch") -> float:
    """Largest gradient difference between lorank and :func:`bare_lowrank_fwdbwd`, relative
    to each gradient's largest entry (the bare reference must compute the same thing)."""
    pg, xg = leaves(p), em.detach().clone().requires_grad_(True)
    lorank_hmm("lowrank", pg, xg, 0).sum().backward()
    with torch.no_grad():
        _, grads = bare_lowrank_fwdbwd(p, em, kernel)
    ours = {**{k: v.grad for k, v in pg.items()}, "emission": xg.grad}
    return max(float((grads[k] - g).abs().max() / g.abs().max().clamp_min(1e-30))
               for k, g in ours.items())


def run_hmm(args, gen, research) -> list[dict]:
    rows = []
    for kind, z, r, b, t in args.hmm_cases:
        p, em = hmm_inputs(kind, z, r, b, t, args.width, gen)
        bare = lambda p, em, kind=kind: bare_hmm(kind, p, em, args.width)  # noqa: E731
        ours = lambda p, em, kind=kind: lorank_hmm(kind, p, em, args.width)  # noqa: E731
        extra, grad_diff = {}, None
        if research is not None and kind == "lowrank":
            table = torch.randn(z, 1000, generator=gen).log_softmax(-1)
            text = torch.randint(0, 1000, (b, t), generator=gen)
            em = table.t()[text]  # the same emissions for every contender
            extra["fwd_research"] = research_case(research, p, table, text)
        onednn = onednn_available() and kind != "rank_space"
        if onednn:  # the same bare loop on the GEMM kernel lorank uses here
            extra["fwd_bare_onednn"] = _no_grad(
                lambda p=p, em=em, kind=kind: bare_hmm(kind, p, em, args.width, "onednn"))
        if kind == "lowrank":
            extra["fwdbwd_bare"] = lambda p=p, em=em: bare_fwdbwd_run(p, em)
            grad_diff = lowrank_grad_diff(p, em)
            if onednn:
                extra["fwdbwd_bare_onednn"] = lambda p=p, em=em: bare_fwdbwd_run(p, em, "onednn")
                grad_diff = max(grad_diff, lowrank_grad_diff(p, em, "onednn"))
        res = time_case(bare, ours, p, em, args.reps, args.budget, extra)
        if grad_diff is not None:
            res["grad_diff"] = grad_diff
        f = hmm_flops(kind, z, r, b, t, args.width)
        row = {"section": "hmm", "kind": kind, "Z": z, "R": r, "B": b, "T": t,
               "width": args.width if kind == "band" else None, "flops_fwd": f, **res}
        rows.append(row)
        print(fmt_row(row), flush=True)
        del p, em
        gc.collect()
    return rows


def run_hsmm(args, gen) -> list[dict]:
    rows = []
    for kind, z in args.hsmm_cases:
        p, em = hsmm_inputs(kind, z, 16, args.hsmm_t, 4, 20, gen)
        res = time_case(lambda p, x, kind=kind: bare_hsmm(kind, p, x),
                        lambda p, x, kind=kind: lorank_hsmm(kind, p, x), p, em, args.reps,
                        args.budget)
        row = {"section": "hsmm", "kind": kind, "Z": z, "R": 16 if kind != "dense" else None,
               "B": 4, "T": args.hsmm_t, "K": 20, **res}
        rows.append(row)
        print(fmt_row(row), flush=True)
    return rows


def run_pcfg(args, gen) -> list[dict]:
    rows = []
    for kind, m in args.pcfg_cases:
        p, term = pcfg_inputs(kind, m, 64, args.pcfg_n, 8, gen)
        res = time_case(bare_pcfg, lorank_pcfg, p, term, args.reps, args.budget)
        row = {"section": "pcfg", "kind": kind, "m": m, "R": 64 if kind != "dense" else None,
               "B": 8, "n": args.pcfg_n, **res}
        rows.append(row)
        print(fmt_row(row), flush=True)
    return rows


def run_train(args, gen) -> list[dict]:
    """Training steps of the LM models, interleaved; best step time per model."""
    from lorank.nn.hmm import HMMLanguageModel

    b, t, vocab = args.train_batch, 4096 // args.train_batch, 10000
    tokens = torch.randint(0, vocab, (b, t), generator=gen)
    lengths = torch.full((b,), t)
    z = args.train_states
    specs = {"hmm": dict(model="hmm"),
             "lhmm": dict(model="lhmm", rank=z // 8),
             "lhmm_band": dict(model="lhmm_band", rank=z // 8, band=4),
             "rank_space": dict(model="rank_space", rank=z // 32)}
    steps = {}
    for name, kw in specs.items():
        torch.manual_seed(0)
        model = HMMLanguageModel(vocab_size=vocab, num_states=z, hidden=128, **kw)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt):
            loss = -model(tokens, lengths).log_partition.sum() / lengths.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = step
    best = interleaved(steps, args.train_reps, 1e9)
    rows = []
    for name, s in best.items():
        row = {"section": "train", "kind": name, "Z": args.train_states,
               "R": specs[name].get("rank"), "B": b, "T": t, "step_s": s,
               "tokens_per_s": b * t / s}
        rows.append(row)
        print(f"train {name:11s} step {s:.3f}s  {b * t / s:8.0f} tokens/s", flush=True)
    return rows


def fmt_row(row: dict) -> str:
    size = " ".join(f"{k}={row[k]}" for k in ("Z", "m", "R", "B", "T", "n") if row.get(k))
    r_f = row["fwd"] / row["fwd_bare"]
    r_fb = row["fwdbwd"] / row["fwd_bare"]
    extra = ""
    if "fwdbwd_bare" in row:
        extra += (f"  bare fwd+bwd {row['fwdbwd_bare']:.4f}s "
                  f"({row['fwdbwd_bare'] / row['fwd_bare']:.2f}x; lorank/bare "
                  f"{row['fwdbwd'] / row['fwdbwd_bare']:.2f}, grad diff {row['grad_diff']:.1e})")
    if "fwd_bare_onednn" in row:
        b1 = row["fwd_bare_onednn"]
        extra += (f"  bare oneDNN fwd {b1:.4f}s (lorank fwd {row['fwd'] / b1:.2f}x, "
                  f"fwd+bwd {row['fwdbwd'] / b1:.2f}x)")
    if "fwdbwd_bare_onednn" in row:
        extra += (f"  bare oneDNN fwd+bwd {row['fwdbwd_bare_onednn']:.4f}s "
                  f"({row['fwdbwd_bare_onednn'] / row['fwd_bare_onednn']:.2f}x)")
    if "fwd_research" in row:
        ratio = row["fwd"] / row["fwd_research"]
        extra += f"  research {row['fwd_research']:.4f}s (lorank/research {ratio:.2f})"
    return (f"{row['section']:5s} {row['kind']:10s} {size:34s} bare {row['fwd_bare']:.4f}s  "
            f"fwd {row['fwd']:.4f}s ({r_f:.2f}x)  fwd+bwd {row['fwdbwd']:.4f}s ({r_fb:.2f}x)  "
            f"|dlogZ| {row['logz_diff']:.1e}{extra}")


# ---- report ----------------------------------------------------------------------------------
def acceptance(rows: list[dict]) -> list[str]:
    out = []
    lr = [r for r in rows if r["section"] == "hmm" and r["kind"] == "lowrank" and r["B"] == 16
          and r["T"] == 32 and r["R"] in (r["Z"] // 16, r["Z"] // 4)]
    if lr:
        worst_f = max(lr, key=lambda r: r["fwd"] / r["fwd_bare"])
        worst_b = max(lr, key=lambda r: r["fwdbwd"] / r["fwd_bare"])
        rf = worst_f["fwd"] / worst_f["fwd_bare"]
        rb = worst_b["fwdbwd"] / worst_b["fwd_bare"]
        out.append(f"- LowRank forward-only `HMM.log_partition` vs the bare loop (B=16, T=32, "
                   f"{len(lr)} sizes): worst {rf:.2f}x at Z={worst_f['Z']}, R={worst_f['R']} "
                   f"(target <= 1.15x): {'PASS' if rf <= 1.15 else 'FAIL'}")
        out.append(f"- LowRank forward+backward vs the bare forward: worst {rb:.2f}x at "
                   f"Z={worst_b['Z']}, R={worst_b['R']} (target <= 2.5x): "
                   f"{'PASS' if rb <= 2.5 else 'FAIL'}")
    floor = [r for r in lr if "fwdbwd_bare" in r]
    if floor:
        fl = [r["fwdbwd_bare"] / r["fwd_bare"] for r in floor]
        ours = [r["fwdbwd"] / r["fwdbwd_bare"] for r in floor]
        out.append(f"- The floor of that ratio: the bare forward+backward (written in the "
                   f"benchmark, same gradients to {max(r['grad_diff'] for r in floor):.0e} "
                   f"relative) takes {min(fl):.2f}x-{max(fl):.2f}x the bare forward; lorank's "
                   f"forward+backward is {min(ours):.2f}x-{max(ours):.2f}x the bare one")
    same = [r for r in lr if "fwd_bare_onednn" in r]
    if same:
        rf = [r["fwd"] / r["fwd_bare_onednn"] for r in same]
        rb = [r["fwdbwd"] / r["fwd_bare_onednn"] for r in same]
        line = (f"- Against the same bare loops on oneDNN's GEMM (the kernel lorank uses on CPU "
                f"float32): forward {min(rf):.2f}x-{max(rf):.2f}x the bare forward, "
                f"forward+backward {min(rb):.2f}x-{max(rb):.2f}x it")
        fb = [r for r in same if "fwdbwd_bare_onednn" in r]
        if fb:
            fl = [r["fwdbwd_bare_onednn"] / r["fwd_bare_onednn"] for r in fb]
            ours = [r["fwdbwd"] / r["fwdbwd_bare_onednn"] for r in fb]
            line += (f"; the bare forward+backward there takes {min(fl):.2f}x-{max(fl):.2f}x "
                     f"the bare forward and lorank's {min(ours):.2f}x-{max(ours):.2f}x the bare "
                     f"forward+backward")
        out.append(line)
    tr = {r["kind"]: r["step_s"] for r in rows if r["section"] == "train"}
    if {"hmm", "lhmm", "lhmm_band"} <= tr.keys():
        ratio = tr["lhmm"] / tr["lhmm_band"]
        ok = ratio >= 0.85 and tr["lhmm_band"] < tr["hmm"]
        out.append(f"- LHMM + band training step: {ratio:.2f}x the LHMM step's speed (target "
                   f">= 0.85x), {tr['hmm'] / tr['lhmm_band']:.2f}x the dense HMM's (target "
                   f"> 1x): {'PASS' if ok else 'FAIL'}")
    if {"hmm", "rank_space"} <= tr.keys():
        ratio = tr["hmm"] / tr["rank_space"]
        out.append(f"- Rank-space (R=32) training step: {ratio:.2f}x the dense HMM step's speed "
                   f"(target >= 1x): {'PASS' if ratio >= 1 else 'FAIL'}")
    res = [r for r in rows if "fwd_research" in r]
    if res:
        ratios = [r["fwd_research"] / r["fwd"] for r in res]
        out.append(f"- Forward only vs the paper's research code (`BLHmmLm.compute_rff_loss`): "
                   f"lorank is {min(ratios):.2f}x-{max(ratios):.2f}x as fast")
    return out


def table(rows: list[dict]) -> list[str]:
    lines = ["| section | kind | size | bare fwd s | fwd s | fwd / bare | fwd GFLOP/s | "
             "fwd+bwd s | fwd+bwd / bare fwd | bare fwd+bwd / bare fwd | "
             "fwd+bwd / bare fwd+bwd | oneDNN bare fwd s | fwd / oneDNN bare | "
             "fwd+bwd / oneDNN bare fwd | oneDNN bare fwd+bwd / its fwd | research fwd s | "
             "\\|Δ log Z\\| |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
             "---:|"]
    for r in rows:
        if r["section"] == "train":
            continue
        size = ", ".join(f"{k}={r[k]}" for k in ("Z", "m", "R", "B", "T", "n", "width", "K")
                         if r.get(k))
        gf = f"{r['flops_fwd'] / r['fwd'] / 1e9:.1f}" if r.get("flops_fwd") else "-"
        rs = f"{r['fwd_research']:.4f}" if "fwd_research" in r else "-"
        fb0 = r.get("fwdbwd_bare")
        floor = f"{fb0 / r['fwd_bare']:.2f} | {r['fwdbwd'] / fb0:.2f}" if fb0 else "- | -"
        b1, fb1 = r.get("fwd_bare_onednn"), r.get("fwdbwd_bare_onednn")
        same = (f"{b1:.4f} | {r['fwd'] / b1:.2f} | {r['fwdbwd'] / b1:.2f} | "
                + (f"{fb1 / b1:.2f}" if fb1 else "-")) if b1 else "- | - | - | -"
        lines.append(
            f"| {r['section']} | {r['kind']} | {size} | {r['fwd_bare']:.4f} | {r['fwd']:.4f} | "
            f"{r['fwd'] / r['fwd_bare']:.2f} | {gf} | {r['fwdbwd']:.4f} | "
            f"{r['fwdbwd'] / r['fwd_bare']:.2f} | {floor} | {same} | {rs} | "
            f"{r['logz_diff']:.1e} |")
    tr = [r for r in rows if r["section"] == "train"]
    if tr:
        dense = next((r["step_s"] for r in tr if r["kind"] == "hmm"), None)
        lines += ["", "| model | Z | R | batch | step s | tokens/s | speed vs dense |",
                  "|---|---:|---:|---|---:|---:|---:|"]
        for r in tr:
            vs = f"{dense / r['step_s']:.2f}x" if dense else "-"
            lines.append(f"| {r['kind']} | {r['Z']} | {r['R'] or '-'} | {r['B']} x {r['T']} | "
                         f"{r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {vs} |")
    return lines


def peak_text(peak) -> str:
    """``peak``: one rate (runs before the oneDNN backend) or a rate per kernel."""
    if not isinstance(peak, dict):
        return f"{peak:.1f} GFLOP/s"
    return ", ".join(f"{v:.1f} GFLOP/s ({'torch.mm' if k == 'torch' else k})"
                     for k, v in peak.items())


def write_results(rows, peak, args, wall_s: float, command: str | None = None,
                  machine: str | None = None) -> None:
    section = [
        BEGIN,
        "# Inference speed: lorank against bare reference loops",
        "",
        f"Machine: {machine or machine_description()}; square float32 matmul: "
        f"{peak_text(peak)}.",
        "",
        f"Command: `python benchmarks/inference_speed.py "
        f"{' '.join(args.argv) if command is None else command}` "
        f"(wall time {wall_s / 60:.1f} min).",
        "",
        "Each lorank call is timed next to a bare reference written in the benchmark (same "
        "inputs; normalize once, exponentiate once, the recursion; no checks, nothing saved), "
        "interleaved, best time kept.  `fwd` runs under `torch.no_grad()`; `fwd+bwd` has "
        "every parameter and the emissions require grad and calls `backward()`, and its ratio "
        "is against the bare *forward*.  For LowRank, `bare fwd+bwd` is the floor of that "
        "ratio: the same scaled forward saving its messages, the backward algorithm and one "
        "GEMM per weight gradient, written in the benchmark (no autograd; its gradients are "
        "checked against lorank's).  GFLOP/s counts the nominal GEMM work of the forward "
        "(HMM only).  `research fwd` is the paper's LHMM forward on the same inputs: the "
        "feature normalization of its `compute_rff_parameters` (written in the benchmark) and "
        "its recursion `BLHmmLm.compute_rff_loss`, imported from a checkout of "
        "github.com/justinchiu/low-rank-models (`--research-code`).  The `bare` loops call "
        "`torch.mm` (MKL on this CPU); the `oneDNN bare` ones are the same loops with their "
        "products on oneDNN (loop-invariant matrices packed once), the kernel lorank's GEMM "
        "backend picks on CPU float32 (`src/lorank/_gemm.py`).",
        "",
        "## Targets (this run)",
        "",
        *acceptance(rows),
        "",
        "## All measurements",
        "",
        *table(rows),
        "",
        "![inference speed](inference_speed.png)",
        END,
    ]
    path = args.out_dir / "RESULTS.md"
    old = path.read_text() if path.exists() else ""
    text = "\n".join(section)
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END) :]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + text + "\n"
    path.write_text(new)
    print(f"wrote {path}")


def plot(rows, path: Path, machine: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    hmm = [r for r in rows if r["section"] == "hmm"]
    labels = [f"{r['kind']}\nZ={r['Z']}" + (f" R={r['R']}" if r["R"] else "") for r in hmm]
    x = range(len(hmm))
    axes[0].bar([i - 0.2 for i in x], [r["fwd"] / r["fwd_bare"] for r in hmm], 0.4,
                label="forward / bare forward")
    axes[0].bar([i + 0.2 for i in x], [r["fwdbwd"] / r["fwd_bare"] for r in hmm], 0.4,
                label="fwd+bwd / bare forward")
    same = [(i, r) for i, r in enumerate(hmm) if "fwd_bare_onednn" in r]
    if same:  # the same ratios against the bare loop on oneDNN's kernel
        axes[0].plot([i - 0.2 for i, _ in same], [r["fwd"] / r["fwd_bare_onednn"] for _, r in same],
                     "k_", ms=9, label="forward / oneDNN bare forward")
        axes[0].plot([i + 0.2 for i, _ in same],
                     [r["fwdbwd"] / r["fwd_bare_onednn"] for _, r in same], "kx", ms=5,
                     label="fwd+bwd / oneDNN bare forward")
    axes[0].axhline(1.15, color="C0", ls="--", lw=1)
    axes[0].axhline(2.5, color="C1", ls="--", lw=1)
    axes[0].set_xticks(list(x), labels, rotation=90, fontsize=6)
    axes[0].set(title="HMM: time relative to the bare loop", ylabel="ratio")
    axes[0].legend(fontsize=7)
    other = [r for r in rows if r["section"] in ("hsmm", "pcfg")]
    labels = [f"{r['section']} {r['kind']}\n" + (f"Z={r['Z']}" if r.get("Z") else f"m={r['m']}")
              for r in other]
    x = range(len(other))
    axes[1].bar([i - 0.2 for i in x], [r["fwd"] / r["fwd_bare"] for r in other], 0.4,
                label="forward / bare forward")
    axes[1].bar([i + 0.2 for i in x], [r["fwdbwd"] / r["fwd_bare"] for r in other], 0.4,
                label="fwd+bwd / bare forward")
    axes[1].set_yscale("log")
    axes[1].set_xticks(list(x), labels, rotation=90, fontsize=6)
    axes[1].set(title="HSMM and PCFG: time relative to the bare loop", ylabel="ratio")
    axes[1].legend(fontsize=7)
    tr = [r for r in rows if r["section"] == "train"]
    if tr:
        axes[2].bar([r["kind"] for r in tr], [r["tokens_per_s"] for r in tr])
        axes[2].set(title=f"LM training step (Z={tr[0]['Z']}, {tr[0]['B'] * tr[0]['T']} "
                          "tokens)", ylabel="tokens / s")
    fig.suptitle(machine or machine_description(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10, help="rounds per case at most")
    ap.add_argument("--budget", type=float, default=40.0, help="seconds per case, roughly")
    ap.add_argument("--width", type=int, default=4, help="band width of lowrank+band")
    ap.add_argument("--sections", nargs="+", default=["hmm", "hsmm", "pcfg", "train"])
    ap.add_argument("--kinds", nargs="+", default=["dense", "lowrank", "band", "rank_space"],
                    help="HMM kinds to time")
    ap.add_argument("--research-code", type=Path, default=None,
                    help="checkout of github.com/justinchiu/low-rank-models")
    ap.add_argument("--train-reps", type=int, default=3)
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument("--from-json", type=Path, default=None,
                    help="rewrite the RESULTS.md section and plot from a saved run, no timing")
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = ap.parse_args(argv)
    args.argv = argv
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        for line in acceptance(saved["rows"]):
            print(line)
        plot(saved["rows"], args.out_dir / "inference_speed.png", saved["machine"])
        write_results(saved["rows"], saved["matmul_gflops"], args, saved["wall_s"],
                      saved["command"], saved["machine"])
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        zs, bt = [64, 256], (4, 8)
        args.hsmm_cases = [(k, z) for z in (32, 64) for k in ("dense", "low_rank")]
        args.pcfg_cases = [(k, m) for m in (8, 16) for k in ("dense", "cp", "rank_space")]
        args.hsmm_t, args.pcfg_n, args.train_batch, args.train_states = 16, 8, 64, 64
        args.reps, args.budget = min(args.reps, 2), min(args.budget, 5.0)
    else:
        zs, bt = [1024, 4096, 16384], (16, 32)
        args.hsmm_cases = [(k, z) for z in (64, 256, 1024) for k in ("dense", "low_rank")]
        args.pcfg_cases = ([("dense", m) for m in (32, 64, 128)]
                           + [(k, m) for m in (64, 256) for k in ("cp", "rank_space")])
        args.hsmm_t, args.pcfg_n, args.train_batch, args.train_states = 64, 30, 128, 1024
    cases = []
    for z in zs:
        if z <= 4096:
            cases.append(("dense", z, None, *bt))
        for div in (16, 4):
            cases.append(("lowrank", z, z // div, *bt))
        for div in (16, 4):
            cases.append(("band", z, z // div, *bt))
        for r in (16, 64):
            if z * r * r <= 1 << 26:
                cases.append(("rank_space", z, r, *bt))
    args.hmm_cases = [c for c in cases if c[0] in args.kinds]
    research = research_fn(args.research_code) if args.research_code else None
    peak = matmul_gflops(1024 if args.quick else 2048)
    print(f"# {machine_description()}\n# square matmul {peak_text(peak)}", flush=True)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    if "hmm" in args.sections:
        rows += run_hmm(args, gen, research)
    if "hsmm" in args.sections:
        rows += run_hsmm(args, gen)
    if "pcfg" in args.sections:
        rows += run_pcfg(args, gen)
    if "train" in args.sections:
        rows += run_train(args, gen)
    wall = time.perf_counter() - t0
    for line in acceptance(rows):
        print(line)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "inference_speed.json").write_text(
        json.dumps({"machine": machine_description(), "matmul_gflops": peak,
                    "command": " ".join(argv), "wall_s": wall, "rows": rows}, indent=1) + "\n")
    plot(rows, args.out_dir / "inference_speed.png")
    write_results(rows, peak, args, wall)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
