"""Speed of the HMM forward/backward: dense vs low-rank (vs torch-struct), in one run.

Times ``log_partition`` forward and forward+backward for

* lorank ``Dense`` (softmax of a Z x Z logit matrix),
* lorank ``LowRank`` (two Z x R log-feature matrices), default and ``memory_light`` backward,
* torch-struct's ``HMM`` (its dense linear-chain CRF) where its B x T x Z x Z edge tensor fits,

measures this machine's square ``torch.matmul`` GFLOP/s, reports each method's achieved GFLOP/s
as a fraction of it, checks the issue's targets, and writes ``benchmarks/RESULTS.md`` plus a PNG
plot of time against rank.  ``--quick`` runs a small grid in about a minute.

    python benchmarks/chain_speed.py            # full grid (several minutes on 2 cores)
    python benchmarks/chain_speed.py --quick    # small grid, for a first look
"""

from __future__ import annotations

import argparse
import gc
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import best_time, machine_description

import lorank

HERE = Path(__file__).resolve().parent


@dataclass
class Row:
    z: int
    r: int | None
    b: int
    t: int
    method: str
    fwd_s: float | None = None
    fwdbwd_s: float | None = None
    fwd_gflop: float | None = None
    fwdbwd_gflop: float | None = None
    note: str = ""


def matmul_gflops(device: str, n: int = 4096, repeats: int = 3) -> dict[str, float]:
    """This machine's square float32 matmul rate: ``torch.mm``'s and, on CPU, oneDNN's (the
    kernel lorank's GEMM backend uses there; MKL's ``torch.mm`` is much slower on AMD CPUs)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    rates = {"torch.mm": 2 * n**3 / best_time(lambda: a @ b, repeats, device=device) / 1e9}
    if device == "cpu" and torch.backends.mkldnn.is_available():
        linear = torch.ops.mkldnn._linear_pointwise.default
        dt = best_time(lambda: linear(a, b.t(), None, "none", [], ""), repeats, device=device)
        rates["oneDNN"] = 2 * n**3 / dt / 1e9
    return rates


def make_inputs(z: int, b: int, t: int, device: str, gen: torch.Generator):
    vocab = 100
    table = torch.randn(vocab, z, generator=gen).log_softmax(0).to(device)
    obs = torch.randint(0, vocab, (b, t), generator=gen).to(device)
    return table, obs


def lorank_fn(make_factor, z, table, obs, backward: bool, memory_light=False):
    init = torch.zeros(z, device=table.device, requires_grad=True)

    def run():
        emission = table[obs]  # (B, T, Z)
        hmm = lorank.HMM(init, make_factor(), emission, memory_light=memory_light)
        lp = hmm.log_partition.sum()
        if backward:
            lp.backward()
        return lp

    return run


def struct_fn(trans_logp, table, obs, backward: bool):
    import torch_struct

    trans = trans_logp.detach().clone().requires_grad_(True)
    init = torch.zeros(trans.shape[0], device=trans.device).log_softmax(0)

    def run():
        # torch-struct indexes its transition as [next, previous]
        dist = torch_struct.HMM(trans.T, table, init, obs)
        lp = dist.partition.sum()
        if backward:
            lp.backward()
        return lp

    return run


def dense_maker(z, device, gen):
    logits = torch.randn(z, z, generator=gen).to(device).requires_grad_(True)
    return lambda: lorank.Dense(logits)


def lowrank_maker(z, r, device, gen):
    left = (torch.randn(z, r, generator=gen) / math.sqrt(r)).to(device).requires_grad_(True)
    right = (torch.randn(z, r, generator=gen) / math.sqrt(r)).to(device).requires_grad_(True)
    return lambda: lorank.LowRank(left, right)


def flops(method: str, z: int, r: int | None, b: int, t: int) -> tuple[float, float]:
    """Nominal (forward, forward+backward) floating-point operations of the GEMMs."""
    steps = t - 1
    if method.startswith("lowrank"):
        fwd = steps * 2 * (2 * b * z * r)
        bwd_prop = steps * 2 * (2 * b * z * r)
        bwd_weights = 2 * (2 * b * steps * z * r)
        extra = steps * (2 * b * z * r) if method == "lowrank-memlight" else 0
        return fwd, fwd + bwd_prop + bwd_weights + extra
    per = 2 * b * z * z
    return steps * per, steps * per * 3


def mem_ok(method: str, z: int, r: int | None, b: int, t: int, budget: float) -> bool:
    """Rough peak-memory estimate (bytes, float32) against the budget."""
    if method == "torch-struct":
        # its parallel scan multiplies B x T/2 pairs of Z x Z matrices in log space,
        # broadcasting a B x T/2 x Z x Z x Z tensor
        est = 4 * (b * t * z**3 // 2 + 6 * b * t * z * z)
    elif method == "dense":
        est = 4 * (6 * z * z + 10 * b * t * z)
    else:
        est = 4 * (8 * z * r + 10 * b * t * z + 4 * b * t * r)
    return est <= budget


def measure(row: Row, method: str, maker, z, table, obs, device: str, reps: int) -> None:
    """Fill ``row`` with forward and forward+backward times."""
    for backward in (False, True):
        if method == "torch-struct":
            fn = struct_fn(maker, table, obs, backward)
        else:
            fn = lorank_fn(maker, z, table, obs, backward, memory_light=method.endswith("memlight"))
        if not backward:
            with torch.no_grad():
                row.fwd_s = best_time(fn, reps, device=device)
        else:
            row.fwdbwd_s = best_time(fn, reps, device=device)
        del fn
        gc.collect()


def run(args) -> list[Row]:
    device = args.device
    gen = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    budget = args.memory_gb * 2**30
    t = args.T
    for z in args.states:
        for b in args.batch:
            table, obs = make_inputs(z, b, t, device, gen)
            methods: list[tuple[str, int | None]] = [("dense", None)]
            if z <= args.struct_max_states:
                methods.append(("torch-struct", None))
            for div in args.rank_div:
                r = z // div
                if r >= 1:
                    methods.append(("lowrank", r))
                    if args.memory_light:
                        methods.append(("lowrank-memlight", r))
            for method, r in methods:
                row = Row(z, r, b, t, method)
                if not mem_ok(method, z, r, b, t, budget):
                    row.note = "skipped: estimated memory above budget"
                    rows.append(row)
                    print(f"Z={z} B={b} {method} R={r}: {row.note}", flush=True)
                    continue
                reps = args.repeats if z * z * b <= 4096 * 4096 * 64 else 1
                if method == "dense":
                    maker = dense_maker(z, device, gen)
                elif method == "torch-struct":
                    maker = torch.randn(z, z, generator=gen).log_softmax(-1).to(device)
                else:
                    maker = lowrank_maker(z, r, device, gen)
                try:
                    measure(row, method, maker, z, table, obs, device, reps)
                except RuntimeError as err:  # allocation failures
                    row.note = f"failed: {str(err).splitlines()[0][:80]}"
                    rows.append(row)
                    print(f"Z={z} B={b} {method} R={r}: {row.note}", flush=True)
                    continue
                f_fwd, f_all = flops(method, z, r, b, t)
                row.fwd_gflop = f_fwd / row.fwd_s / 1e9
                row.fwdbwd_gflop = f_all / row.fwdbwd_s / 1e9
                rows.append(row)
                print(
                    f"Z={z:6d} B={b:3d} {method:17s} R={str(r):6s} fwd {row.fwd_s:8.4f}s "
                    f"fwd+bwd {row.fwdbwd_s:8.4f}s  {row.fwd_gflop:7.1f} GFLOP/s fwd",
                    flush=True,
                )
    return rows


def find(rows, z, b, method, r=None):
    for row in rows:
        if row.z == z and row.b == b and row.method == method and (r is None or row.r == r):
            return row
    return None


def targets(rows: list[Row], peak: float) -> list[str]:
    out = []
    d = find(rows, 4096, 16, "dense")
    lr = find(rows, 4096, 16, "lowrank", 256)
    if d and lr and d.fwdbwd_s and lr.fwdbwd_s:
        ratio = d.fwdbwd_s / lr.fwdbwd_s
        out.append(
            f"- Z=4096, R=256, B=16: low-rank forward+backward is {ratio:.1f}x faster than dense "
            f"(target >= 6x): {'PASS' if ratio >= 6 else 'FAIL'}"
        )
    lr = find(rows, 4096, 64, "lowrank", 1024)
    if lr and lr.fwd_gflop:
        frac = lr.fwd_gflop / peak
        out.append(
            f"- Z=4096, R=1024, B=64: low-rank forward reaches {lr.fwd_gflop:.1f} GFLOP/s = "
            f"{100 * frac:.0f}% of square matmul (target >= 45%): "
            f"{'PASS' if frac >= 0.45 else 'FAIL'}"
        )
    worst = None
    for row in rows:
        if row.method == "torch-struct" and row.fwdbwd_s:
            d = find(rows, row.z, row.b, "dense")
            if d and d.fwdbwd_s:
                for kind in ("fwd_s", "fwdbwd_s"):
                    ratio = getattr(row, kind) / getattr(d, kind)
                    if worst is None or ratio < worst[0]:
                        worst = (ratio, row.z, row.b, kind)
    if worst:
        out.append(
            f"- lorank dense vs torch-struct HMM: slowest case torch-struct/lorank time ratio "
            f"{worst[0]:.2f} (Z={worst[1]}, B={worst[2]}, {worst[3]}) (target >= 1): "
            f"{'PASS' if worst[0] >= 1 else 'FAIL'}"
        )
    return out


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


NOTES_HEADING = "## Notes"


def write_results(rows: list[Row], rates: dict[str, float], args, path: Path, plot_path: Path
                  ) -> None:
    peak = max(rates.values())
    lines = [
        "# Chain (HMM) speed: dense vs low-rank vs torch-struct",
        "",
        f"Machine: {machine_description()}; device `{args.device}`.",
        f"Square float32 matmul ({args.peak_n}x{args.peak_n}): "
        + ", ".join(f"{k} **{v:.1f} GFLOP/s**" for k, v in rates.items())
        + "; the peak below is the faster.",
        "",
        f"Command: `python benchmarks/chain_speed.py {' '.join(args.argv)}`",
        "",
        "Times are the best of a few runs (one for the largest sizes) of `log_partition` "
        "(forward, under `no_grad`) and of `log_partition` + `backward()` (fwd+bwd) with "
        f"T={args.T}. GFLOP/s counts the nominal GEMM work only (dense: 2BZ^2 per step "
        "forward; low-rank: 2 x 2BZR); `% peak` is forward GFLOP/s over the square-matmul "
        "rate. `vs dense` is dense fwd+bwd time over this method's.",
        "",
        "## Targets (this run)",
        "",
        *targets(rows, peak),
        "",
        "## All measurements",
        "",
        "| Z | R | B | method | fwd s | fwd+bwd s | fwd GFLOP/s | % peak | fwd+bwd GFLOP/s |"
        " vs dense | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        d = find(rows, row.z, row.b, "dense")
        speed = d.fwdbwd_s / row.fwdbwd_s if d and d.fwdbwd_s and row.fwdbwd_s else None
        pct = 100 * row.fwd_gflop / peak if row.fwd_gflop else None
        lines.append(
            f"| {row.z} | {row.r or '-'} | {row.b} | {row.method} | {fmt(row.fwd_s, '.4f')} | "
            f"{fmt(row.fwdbwd_s, '.4f')} | {fmt(row.fwd_gflop, '.1f')} | {fmt(pct, '.0f')} | "
            f"{fmt(row.fwdbwd_gflop, '.1f')} | {fmt(speed, '.1f')} | {row.note} |"
        )
    lines += ["", f"![time vs rank]({plot_path.name})", ""]
    # a hand-written "## Notes" section at the end of the old file survives a rerun
    old = path.read_text() if path.exists() else ""
    if NOTES_HEADING in old:
        lines += [old[old.index(NOTES_HEADING) :].rstrip(), ""]
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zs = sorted({r.z for r in rows})
    bs = sorted({r.b for r in rows})
    fig, axes = plt.subplots(1, len(bs), figsize=(6 * len(bs), 4.5), squeeze=False)
    for ax, b in zip(axes[0], bs, strict=True):
        for i, z in enumerate(zs):
            color = f"C{i}"
            pts = sorted(
                (r.r, r.fwdbwd_s)
                for r in rows
                if r.z == z and r.b == b and r.method == "lowrank" and r.fwdbwd_s
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=color, label=f"low-rank Z={z}")
            d = find(rows, z, b, "dense")
            if d and d.fwdbwd_s:
                ax.axhline(d.fwdbwd_s, color=color, ls="--", label=f"dense Z={z}")
            s = find(rows, z, b, "torch-struct")
            if s and s.fwdbwd_s:
                ax.axhline(s.fwdbwd_s, color=color, ls=":", label=f"torch-struct Z={z}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rank R")
        ax.set_ylabel("forward+backward time (s)")
        ax.set_title(f"HMM log-partition, B={b}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small grid (about a minute)")
    p.add_argument("--states", type=int, nargs="+", default=[64, 128, 256, 1024, 4096, 16384])
    p.add_argument("--rank-div", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    p.add_argument("-T", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--struct-max-states", type=int, default=256)
    p.add_argument("--memory-gb", type=float, default=16.0)
    p.add_argument("--memory-light", action="store_true", help="also time the memory-light mode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-n", type=int, default=4096)
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch threads (default: torch's choice); 1 is steadier on a shared machine",
    )
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.states = [64, 256, 1024]
        args.batch = [16]
        args.repeats = 2
        args.peak_n = 2048
        if args.out == HERE / "RESULTS.md":
            args.out = HERE / "RESULTS-quick.md"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rates = matmul_gflops(args.device, args.peak_n)
    peak = max(rates.values())
    print(f"machine: {machine_description()}\nsquare matmul: "
          + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in rates.items()), flush=True)
    rows = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_path = args.out.with_suffix(".png")
    plot(rows, plot_path)
    write_results(rows, rates, args, args.out, plot_path)
    for line in targets(rows, peak):
        print(line)


if __name__ == "__main__":
    main()
