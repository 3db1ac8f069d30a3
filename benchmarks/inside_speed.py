"""Speed of PCFG inside passes and semi-Markov forward passes: dense vs low-rank vs CP vs
rank-space, against torch-struct and against an earlier lorank commit, in one run, with a plot.

PCFG (m nonterminals, p = m preterminals, sentence length n, batch B), ``log Z`` of

* ``dense``      -- ``DenseRules``: O(n^3 S^2 + n^2 S^2 m), S = m + p;
* ``low_rank``   -- ``LowRankRules`` (head vs joint children, Chiu et al. 2021):
  O(n^3 S^2 + n^2 S^2 r);
* ``cp``         -- ``CPRules`` (TN-PCFG): O(n^3 r + n^2 m r);
* ``rank_space`` -- ``RankSpaceRules`` (Yang, Liu & Tu 2022): O(n^3 r + n^2 r^2).

Each time includes normalizing the rule factor (for dense: the m x S x S softmax).  Tables:

1. forward (no grad: the inference path) vs m, and forward+backward at the largest m;
2. forward vs the rank r;
3. ``--baseline SRC``: this code vs the lorank package under SRC (e.g. commit d749afb:
   ``git worktree add /tmp/base d749afb`` then ``--baseline /tmp/base/src``), both imported
   in this process and timed alternately on the same inputs: rank-space and CP inside
   (forward+backward and forward, m = 256, r = 64, n = 30, B = 8) and ``HSMM.log_partition``;
4. dense ``PCFG.log_partition`` vs torch-struct's ``SentCFG.partition`` (both from logits,
   forward and forward+backward, alternately) at every size in the grid;
5. ``HSMM.log_partition`` with a dense Z x Z vs a rank-16 transition (K = 20).

    python benchmarks/inside_speed.py --threads 1 --baseline /tmp/base/src   # full run
    python benchmarks/inside_speed.py --quick                                # small grid

Writes ``inside_speed.json`` and ``inside_speed.png`` next to this file (``--quick``: to
``--out``, default /tmp) and prints the tables and the targets (rank-space fwd+bwd >= 2x the
baseline; dense not slower than SentCFG anywhere; rank-space or CP >= 10x dense at m = 256).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from _common import best_time, machine_description

import lorank
from lorank.dp import inside as dp

HERE = Path(__file__).resolve().parent
KINDS = ["dense", "low_rank", "cp", "rank_space"]


def load_copy(src: Path) -> dict:
    """The lorank package under ``src`` imported as a separate copy (its modules keep their own
    globals); this process's ``lorank`` is left untouched."""
    mine = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "lorank"}
    sys.path.insert(0, str(src))
    try:
        importlib.invalidate_caches()
        mods = {name: importlib.import_module(name)
                for name in ("lorank", "lorank.dp.inside", "lorank.rules")}
    finally:
        sys.path.remove(str(src))
        for k in [k for k in sys.modules if k.split(".")[0] == "lorank"]:
            del sys.modules[k]
        sys.modules.update(mine)
    return mods


def alternate(fns: dict, reps: int, budget_s: float = 60.0) -> dict:
    """Minimum wall time of each function, calling them in turn (one warm-up each), so that
    machine load affects all alike."""
    for f in fns.values():
        f()
    first = max(best_time(f, 1) for f in fns.values())
    reps = max(1, min(reps, int(budget_s / max(first * len(fns), 1e-6))))
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def make_rules(mod, kind, m, p, r, gen, dtype=torch.float32):
    """Raw random parameters and the rule class of ``kind`` from the rules module ``mod``."""
    s = m + p
    shapes = {"dense": [(m, s, s)], "low_rank": [(m, r), (s, s, r)]}.get(
        kind, [(m, r), (s, r), (s, r)])
    cls = {"dense": mod.DenseRules, "low_rank": mod.LowRankRules, "cp": mod.CPRules,
           "rank_space": mod.RankSpaceRules}[kind]
    return cls, [torch.randn(*sh, generator=gen, dtype=dtype) for sh in shapes]


def inside_fns(inside_mod, rules_mod, kind, m, r, n, b, seed=0):
    """(forward, forward+backward) closures of one inside pass on fixed random inputs."""
    gen = torch.Generator().manual_seed(seed)
    cls, params = make_rules(rules_mod, kind, m, m, r, gen)
    term = torch.randn(b, n, m, generator=gen).log_softmax(-1)
    root = torch.randn(2 * m, generator=gen).log_softmax(-1).expand(b, 2 * m)
    lengths = torch.full((b,), n)

    def fwd():
        with torch.no_grad():
            return inside_mod.inside(root, cls(*params), term, lengths)

    def fwdbwd():
        ps = [t.detach().requires_grad_(True) for t in params]
        inside_mod.inside(root, cls(*ps), term, lengths).sum().backward()

    return fwd, fwdbwd


def pcfg_time(kind, m, r, n, b, reps, backward=False):
    fwd, fwdbwd = inside_fns(dp, lorank, kind, m, r, n, b)
    return best_time(fwdbwd if backward else fwd, reps, budget_s=20.0), float(fwd().mean())


def hsmm_fns(mod, kind, z, r, t, b, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "dense":
        fac = mod.Dense(torch.randn(z, z, generator=gen))
    else:
        fac = mod.LowRank(torch.randn(z, r, generator=gen), torch.randn(z, r, generator=gen))
    em = torch.randn(b, t, z, generator=gen)
    dur = torch.randn(z, k, generator=gen)

    def fwd():
        with torch.no_grad():
            return mod.HSMM(torch.zeros(z), fac, dur, em).log_partition

    return fwd


def sentcfg_fns(m, n, b, seed=0):
    """(ours fwd, theirs fwd, ours fwd+bwd, theirs fwd+bwd): dense PCFG from the same logits."""
    import torch_struct

    gen = torch.Generator().manual_seed(seed)
    s = 2 * m
    logits = torch.randn(m, s, s, generator=gen)
    term = torch.randn(b, n, m, generator=gen).log_softmax(-1)
    root = torch.randn(m, generator=gen)
    lengths = torch.full((b,), n)

    def ours(lg):
        return lorank.PCFG(root, lorank.DenseRules(lg), term, lengths).log_partition

    def theirs(lg):
        rules = lg.flatten(1).log_softmax(-1).view(m, s, s).expand(b, m, s, s)
        dist = torch_struct.SentCFG((term, rules, root.log_softmax(-1).expand(b, m)),
                                    lengths=lengths)
        return dist.partition

    def fwd(f):
        def run():
            with torch.no_grad():
                return f(logits)
        return run

    def fwdbwd(f):
        def run():
            f(logits.detach().requires_grad_(True)).sum().backward()
        return run

    return fwd(ours), fwd(theirs), fwdbwd(ours), fwdbwd(theirs), (ours, theirs, logits)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small grid, for a first look")
    ap.add_argument("--out", type=Path, default=None, help="output folder")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 is steadier on a machine shared with other jobs)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="src/ folder of another lorank checkout to compare against")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*arg_constraints.*")
    out_dir = args.out or (Path("/tmp") if args.quick else HERE)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    b, n, r0 = 8, 30, 64
    if args.quick:
        ms, ranks, m_rank, n = [32, 64], [16, 64], 64, 12
        zs, hsmm_t = [64, 256], 32
        ts_ms, ts_ns = [4, 8], [5, 10]
    else:
        ms, ranks, m_rank = [32, 64, 128, 256], [16, 32, 64, 128, 256], 256
        zs, hsmm_t = [64, 128, 256, 512, 1024], 64
        ts_ms, ts_ns = [4, 8, 16, 32], [5, 10, 20, 30]
    results = {"machine": machine_description(), "batch": b, "length": n, "rank": r0,
               "pcfg_vs_m": [], "pcfg_vs_rank": [], "hsmm_vs_z": [], "sentcfg": []}
    print(f"# inside_speed on {results['machine']}")

    print(f"\n## 1. PCFG inside, forward (no grad), n={n}, B={b}, r={r0}, p=m (seconds)")
    print(f"{'m':>5} " + " ".join(f"{k:>11}" for k in KINDS) + "  dense/cp  dense/rank_space")
    for m in ms:
        row = {"m": m}
        for kind in KINDS:
            row[kind], row[kind + "_logz"] = pcfg_time(kind, m, r0, n, b, args.reps)
        results["pcfg_vs_m"].append(row)
        print(f"{m:>5} " + " ".join(f"{row[k]:>11.4f}" for k in KINDS)
              + f"  {row['dense'] / row['cp']:>8.1f}  {row['dense'] / row['rank_space']:>16.1f}")
    print(f"\n## 1b. PCFG inside forward+backward, n={n}, B={b}, m={ms[-1]}, r={r0} (seconds)")
    fb = {k: pcfg_time(k, ms[-1], r0, n, b, args.reps, backward=True)[0] for k in KINDS}
    results["pcfg_fwdbwd"] = {"m": ms[-1], **fb}
    print("  ".join(f"{k}: {v:.4f}" for k, v in fb.items()))

    print(f"\n## 2. PCFG inside forward vs rank, m={m_rank}, n={n}, B={b} (seconds)")
    for r in ranks:
        row = {"rank": r}
        for kind in ["low_rank", "cp", "rank_space"]:
            row[kind] = pcfg_time(kind, m_rank, r, n, b, args.reps)[0]
        results["pcfg_vs_rank"].append(row)
        print(f"r={r:>4}  " + "  ".join(f"{k}: {row[k]:.4f}" for k in row if k != "rank"))

    if args.baseline is not None:
        results["baseline"] = compare_baseline(args, ms[-1], r0, n, b, zs[-1], hsmm_t)

    print(f"\n## 4. dense PCFG log Z vs torch-struct SentCFG, B={b} (seconds; ratio = theirs "
          "/ ours, > 1: lorank faster)")
    print(f"{'m':>4} {'n':>4} {'fwd ours':>10} {'theirs':>10} {'ratio':>6}  {'fwd+bwd ours':>12} "
          f"{'theirs':>10} {'ratio':>6}")
    for m in ts_ms:
        for nn in ts_ns:
            fo, ft, bo, bt, (ours, theirs, lg) = sentcfg_fns(m, nn, b)
            with torch.no_grad():
                diff = float((ours(lg) - theirs(lg)).abs().max())
            tf = alternate({"ours": fo, "theirs": ft}, 2 * args.reps + 1, budget_s=20.0)
            tb = alternate({"ours": bo, "theirs": bt}, 2 * args.reps + 1, budget_s=20.0)
            row = {"m": m, "n": nn, "fwd_ours": tf["ours"], "fwd_theirs": tf["theirs"],
                   "fwdbwd_ours": tb["ours"], "fwdbwd_theirs": tb["theirs"], "max_abs_diff": diff}
            results["sentcfg"].append(row)
            print(f"{m:>4} {nn:>4} {tf['ours']:>10.4f} {tf['theirs']:>10.4f} "
                  f"{tf['theirs'] / tf['ours']:>6.2f}  {tb['ours']:>12.4f} {tb['theirs']:>10.4f} "
                  f"{tb['theirs'] / tb['ours']:>6.2f}   (|log Z diff| {diff:.1e})")

    print(f"\n## 5. HSMM log_partition, T={hsmm_t}, K=20, B=4, rank 16 (seconds)")
    for z in zs:
        row = {"z": z}
        for kind in ("dense", "low_rank"):
            row[kind] = best_time(hsmm_fns(lorank, kind, z, 16, hsmm_t, 4, 20), args.reps,
                                  budget_s=20.0)
        results["hsmm_vs_z"].append(row)
        print(f"Z={z:>5}  dense: {row['dense']:.4f}  low_rank: {row['low_rank']:.4f}  "
              f"speed-up {row['dense'] / row['low_rank']:.1f}x")

    print("\n## targets")
    targets = {}
    head = [r for r in results["pcfg_vs_m"] if r["m"] == 256]
    if head:
        h = head[0]
        best = min(h["cp"], h["rank_space"])
        targets["factored_vs_dense_m256"] = {"speedup": h["dense"] / best,
                                             "met": h["dense"] / best >= 10}
        print(f"m=256: rank-space or CP vs dense forward: {h['dense'] / best:.0f}x (>= 10x)")
    if "baseline" in results:
        sp = results["baseline"]["rank_space_fwdbwd"]["speedup"]
        targets["rank_space_fwdbwd_vs_baseline"] = {"speedup": sp, "met": sp >= 2}
        print(f"rank-space fwd+bwd vs baseline: {sp:.2f}x (>= 2x)")
    worst = min(min(r["fwd_theirs"] / r["fwd_ours"], r["fwdbwd_theirs"] / r["fwdbwd_ours"])
                for r in results["sentcfg"])
    targets["dense_vs_sentcfg_worst_ratio"] = {"ratio": worst, "met": worst >= 1}
    print(f"dense vs SentCFG, worst ratio over the grid: {worst:.2f} (>= 1)")
    for name, t in targets.items():
        print(f"  {name}: {'MET' if t['met'] else 'NOT MET'}")
    results["targets"] = targets
    results["wall_s"] = time.perf_counter() - t_start
    (out_dir / "inside_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out_dir / "inside_speed.png")
    print(f"\nwrote {out_dir / 'inside_speed.json'} and {out_dir / 'inside_speed.png'} "
          f"({results['wall_s']:.0f} s)")
    return 0


def compare_baseline(args, m, r, n, b, z, hsmm_t) -> dict:
    base = load_copy(args.baseline)
    print(f"\n## 3. this code vs {args.baseline} (alternating, same inputs; seconds)")
    out = {"path": str(args.baseline)}
    for kind in ("rank_space", "cp"):
        new_f, new_fb = inside_fns(dp, lorank, kind, m, r, n, b)
        old_f, old_fb = inside_fns(base["lorank.dp.inside"], base["lorank.rules"], kind, m, r,
                                   n, b)
        diff = float((new_f() - old_f()).abs().max())
        for mode, fns in (("fwdbwd", {"new": new_fb, "old": old_fb}),
                          ("fwd", {"new": new_f, "old": old_f})):
            t = alternate(fns, 4 * args.reps + 1)
            out[f"{kind}_{mode}"] = {**t, "speedup": t["old"] / t["new"], "max_abs_diff": diff}
            print(f"{kind:>10} {mode:>7} m={m} r={r} n={n} B={b}: new {t['new']:.4f}  "
                  f"old {t['old']:.4f}  -> {t['old'] / t['new']:.2f}x   (|log Z diff| {diff:.1e})")
    for kind in ("low_rank", "dense"):
        t = alternate({"new": hsmm_fns(lorank, kind, z, 16, hsmm_t, 4, 20),
                       "old": hsmm_fns(base["lorank"], kind, z, 16, hsmm_t, 4, 20)},
                      2 * args.reps + 1)
        out[f"hsmm_{kind}"] = {**t, "speedup": t["old"] / t["new"]}
        print(f"HSMM {kind:>8} Z={z} T={hsmm_t} K=20 B=4: new {t['new']:.4f}  "
              f"old {t['old']:.4f}  -> {t['old'] / t['new']:.2f}x")
    return out


def plot(results, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib not installed; no plot")
        return
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    rows = results["pcfg_vs_m"]
    for kind in KINDS:
        ax[0].plot([r["m"] for r in rows], [r[kind] for r in rows], "o-", label=kind)
    ax[0].set(xscale="log", yscale="log", xlabel="nonterminals m (= preterminals)",
              ylabel="seconds per inside pass",
              title=f"PCFG inside, n={results['length']}, B={results['batch']}, "
                    f"r={results['rank']}")
    ax[0].legend()
    rows = results["pcfg_vs_rank"]
    for kind in ["low_rank", "cp", "rank_space"]:
        ax[1].plot([r["rank"] for r in rows], [r[kind] for r in rows], "o-", label=kind)
    top = max(x["m"] for x in results["pcfg_vs_m"])
    dense = [r for r in results["pcfg_vs_m"] if r["m"] == top]
    ax[1].axhline(dense[0]["dense"], color="k", ls="--", label="dense")
    ax[1].set(xscale="log", yscale="log", xlabel="rank r", ylabel="seconds",
              title=f"PCFG inside vs rank, m={top}")
    ax[1].legend()
    rows = results["sentcfg"]
    for i, nn in enumerate(sorted({r["n"] for r in rows})):
        sel = [r for r in rows if r["n"] == nn]
        ax[2].plot([r["m"] for r in sel], [r["fwdbwd_theirs"] / r["fwdbwd_ours"] for r in sel],
                   "o-", color=f"C{i}", label=f"n={nn} fwd+bwd")
        ax[2].plot([r["m"] for r in sel], [r["fwd_theirs"] / r["fwd_ours"] for r in sel],
                   "x--", color=f"C{i}", label=f"n={nn} fwd")
    ax[2].axhline(1.0, color="k", lw=0.8)
    ax[2].set(xscale="log", yscale="log", xlabel="m (= p)",
              ylabel="SentCFG time / lorank time", title="dense PCFG vs torch-struct SentCFG")
    ax[2].legend(fontsize=7)
    rows = results["hsmm_vs_z"]
    ax[3].plot([r["z"] for r in rows], [r["dense"] for r in rows], "o-", label="dense")
    ax[3].plot([r["z"] for r in rows], [r["low_rank"] for r in rows], "o-", label="rank 16")
    ax[3].set(xscale="log", yscale="log", xlabel="states Z", ylabel="seconds",
              title="HSMM log-partition, K=20")
    ax[3].legend()
    fig.suptitle(results["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
