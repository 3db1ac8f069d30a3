"""Speed of PCFG inside passes and semi-Markov forward passes: dense vs low-rank vs CP vs
rank-space, in one run, with a plot.

PCFG (m nonterminals, p = m preterminals, sentence length n, batch B), one ``log Z`` pass of

* ``dense``      -- ``DenseRules``: O(n^3 S^2 + n^2 S^2 m), S = m + p;
* ``low_rank``   -- ``LowRankRules`` (head vs joint children, Chiu et al. 2021):
  O(n^3 S^2 + n^2 S^2 r);
* ``cp``         -- ``CPRules`` (TN-PCFG): O(n^3 r + n^2 m r);
* ``rank_space`` -- ``RankSpaceRules`` (Yang, Liu & Tu 2022): O(n^3 r + n^2 r^2).

Each time includes normalizing the rule factor (for dense: the m x S x S softmax).
Semi-Markov: ``HSMM.log_partition`` with a dense Z x Z vs a rank-r transition (K = 20).

    python benchmarks/inside_speed.py            # full grid (a few minutes on 2 cores)
    python benchmarks/inside_speed.py --quick    # small grid, about 20 s

Writes ``inside_speed.json`` and ``inside_speed.png`` next to this file (``--quick``: to
``--out``, default /tmp) and prints a table and the issue's target check
(m = 256, n = 30, B = 8, r = 64: rank-space or CP >= 10x faster than dense).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _common import best_time, machine_description

import lorank
from lorank.dp import inside as dp
from lorank.rules import random_rules

HERE = Path(__file__).resolve().parent
KINDS = ["dense", "low_rank", "cp", "rank_space"]


def pcfg_case(kind, m, r, n, b, reps, backward=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = m
    rules = random_rules(kind, m, p, rank=r, dtype=torch.float32, generator=gen)
    params = [t for t in vars(rules).values() if isinstance(t, torch.Tensor)]
    term = torch.randn(b, n, p, generator=gen).log_softmax(-1)
    root = torch.randn(m + p, generator=gen).log_softmax(-1).expand(b, m + p)
    lengths = torch.full((b,), n)

    def fwd():
        with torch.no_grad():
            return dp.inside(root, type(rules)(*params), term, lengths)

    def fwdbwd():
        ps = [t.detach().requires_grad_(True) for t in params]
        dp.inside(root, type(rules)(*ps), term, lengths).sum().backward()

    value = fwd()
    return best_time(fwdbwd if backward else fwd, reps, budget_s=20.0), float(value.mean())


def hsmm_case(kind, z, r, t, b, k, reps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "dense":
        fac = lorank.Dense(torch.randn(z, z, generator=gen))
    else:
        fac = lorank.LowRank(torch.randn(z, r, generator=gen), torch.randn(z, r, generator=gen))
    em = torch.randn(b, t, z, generator=gen)
    dur = torch.randn(z, k, generator=gen)

    def fwd():
        with torch.no_grad():
            return lorank.HSMM(torch.zeros(z), fac, dur, em).log_partition

    return best_time(fwd, reps, budget_s=20.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small grid, for a first look")
    ap.add_argument("--out", type=Path, default=None, help="output folder")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 is steadier on a machine shared with other jobs)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = args.out or (Path("/tmp") if args.quick else HERE)
    out_dir.mkdir(parents=True, exist_ok=True)
    b, n, r0 = 8, 30, 64
    if args.quick:
        ms, ranks, m_rank, n = [32, 64], [16, 64], 64, 12
        zs, hsmm_t = [64, 256], 32
    else:
        ms, ranks, m_rank = [32, 64, 128, 256], [16, 32, 64, 128, 256], 256
        zs, hsmm_t = [64, 128, 256, 512, 1024], 64
    results = {"machine": machine_description(), "batch": b, "length": n, "rank": r0,
               "pcfg_vs_m": [], "pcfg_vs_rank": [], "hsmm_vs_z": []}
    print(f"# inside_speed on {results['machine']}")
    print(f"\n## PCFG inside, n={n}, B={b}, r={r0}, p=m (seconds)")
    print(f"{'m':>5} " + " ".join(f"{k:>11}" for k in KINDS) + "  dense/cp  dense/rank_space")
    for m in ms:
        row = {"m": m}
        for kind in KINDS:
            row[kind], row[kind + "_logz"] = pcfg_case(kind, m, r0, n, b, args.reps)
        results["pcfg_vs_m"].append(row)
        print(f"{m:>5} " + " ".join(f"{row[k]:>11.4f}" for k in KINDS)
              + f"  {row['dense'] / row['cp']:>8.1f}  {row['dense'] / row['rank_space']:>16.1f}")
    print(f"\n## PCFG inside forward+backward, n={n}, B={b}, m={ms[-1]}, r={r0} (seconds)")
    fb = {k: pcfg_case(k, ms[-1], r0, n, b, args.reps, backward=True)[0] for k in KINDS}
    results["pcfg_fwdbwd"] = {"m": ms[-1], **fb}
    print("  ".join(f"{k}: {v:.4f}" for k, v in fb.items()))
    print(f"\n## PCFG inside vs rank, m={m_rank}, n={n}, B={b} (seconds)")
    for r in ranks:
        row = {"rank": r}
        for kind in ["low_rank", "cp", "rank_space"]:
            row[kind] = pcfg_case(kind, m_rank, r, n, b, args.reps)[0]
        results["pcfg_vs_rank"].append(row)
        print(f"r={r:>4}  " + "  ".join(f"{k}: {row[k]:.4f}" for k in row if k != "rank"))
    print(f"\n## HSMM log_partition, T={hsmm_t}, K=20, B=4, rank 16 (seconds)")
    for z in zs:
        row = {"z": z, "dense": hsmm_case("dense", z, 16, hsmm_t, 4, 20, args.reps),
               "low_rank": hsmm_case("low_rank", z, 16, hsmm_t, 4, 20, args.reps)}
        results["hsmm_vs_z"].append(row)
        print(f"Z={z:>5}  dense: {row['dense']:.4f}  low_rank: {row['low_rank']:.4f}  "
              f"speed-up {row['dense'] / row['low_rank']:.1f}x")
    head = [r for r in results["pcfg_vs_m"] if r["m"] == 256]
    if head:
        h = head[0]
        best = min(h["cp"], h["rank_space"])
        ok = h["dense"] / best >= 10
        results["target"] = {"dense_s": h["dense"], "cp_s": h["cp"],
                             "rank_space_s": h["rank_space"],
                             "speedup": h["dense"] / best, "met": ok}
        print(f"\nTARGET m=256 n=30 B=8 r=64: dense {h['dense']:.3f}s, cp {h['cp']:.4f}s, "
              f"rank-space {h['rank_space']:.4f}s -> {h['dense'] / best:.0f}x "
              f"({'MET' if ok else 'NOT MET'}: >= 10x)")
    (out_dir / "inside_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out_dir / "inside_speed.png")
    print(f"\nwrote {out_dir / 'inside_speed.json'} and {out_dir / 'inside_speed.png'}")
    return 0


def plot(results, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib not installed; no plot")
        return
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
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
    dense = [r for r in results["pcfg_vs_m"] if r["m"] == max(x["m"] for x in results["pcfg_vs_m"])]
    if dense:
        ax[1].axhline(dense[0]["dense"], color="k", ls="--", label="dense")
    ax[1].set(xscale="log", yscale="log", xlabel="rank r", ylabel="seconds",
              title=f"PCFG inside vs rank, m={dense[0]['m'] if dense else '?'}")
    ax[1].legend()
    rows = results["hsmm_vs_z"]
    ax[2].plot([r["z"] for r in rows], [r["dense"] for r in rows], "o-", label="dense")
    ax[2].plot([r["z"] for r in rows], [r["low_rank"] for r in rows], "o-", label="rank 16")
    ax[2].set(xscale="log", yscale="log", xlabel="states Z", ylabel="seconds",
              title="HSMM log-partition, K=20")
    ax[2].legend()
    fig.suptitle(results["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
