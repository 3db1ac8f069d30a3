"""HMM language models on a real corpus: dense HMM vs LHMM vs LHMM+band vs rank-space HMM.

For Z states and ranks Z/4 .. Z/32, trains every model with the same budget (``--max-steps``
optimizer steps of <= ``--max-tokens`` tokens, AdamW, the same seed and batch order) through
the library's trainer, evaluates validation and test perplexity (the best validation
checkpoint), and measures training speed twice:

* ``run tokens/s``: tokens over wall time of the whole training run (evaluation excluded);
* ``step tokens/s``: the best of ``--timing-reps`` timed optimizer steps on three fixed
  training batches (forward + backward + AdamW) -- the number to compare across models on a
  shared machine, where other processes only ever add time.

Writes ``benchmarks/lm_experiments.json`` (one record per model, updated after each run, so
an interrupted sweep continues with ``--resume``), ``docs/results.md`` and
``docs/lm_results.png`` (perplexity and speed against rank).

    python benchmarks/lm_experiments.py --states 1024 --max-steps 100
    python benchmarks/lm_experiments.py --quick          # a smoke run (64 states, 4 steps)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import torch
from _common import best_time, machine_description

from lorank._io import atomic_write_bytes, atomic_write_json
from lorank.nn.hmm import HMMLMConfig
from lorank.tasks import LMTask, TextDataConfig
from lorank.train import TrainConfig, Trainer
from lorank.train.distributed import DistContext
from lorank.train.metrics import markdown_table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def model_grid(states: int, divisors: list[int], models: list[str], rs_max_rank: int):
    grid = []
    if "hmm" in models:
        grid.append(("hmm", None))
    for name in ("lhmm", "lhmm_band", "rank_space"):
        if name not in models:
            continue
        for d in divisors:
            r = max(1, states // d)
            if name == "rank_space" and r > rs_max_rank:
                continue
            grid.append((name, r))
    return grid


def key_of(name: str, rank: int | None) -> str:
    return name if rank is None else f"{name}_R{rank}"


def step_speed(task: LMTask, cfg: TrainConfig, reps: int) -> float:
    """Tokens/s of the best of ``reps`` timings of three optimizer steps on fixed batches."""
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    batches = list(task.batches("train", batch_size=cfg.batch_size, max_tokens=cfg.max_tokens,
                                shuffle=True, seed=12345))
    # three batches of typical shape: the quartiles of the length-sorted batch list
    by_len = sorted(batches, key=lambda b: b[0].shape[1])
    chosen = [by_len[len(by_len) * q // 4] for q in (1, 2, 3)]
    tokens = sum(int(b[1].sum()) for b in chosen)

    def run():
        for tok, lens in chosen:
            loss = -model(tok, lens).log_partition.sum() / lens.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return tokens / best_time(run, reps)


def run_one(corpus, name: str, rank: int | None, args) -> dict:
    model_cfg = HMMLMConfig(model=name, num_states=args.states, rank=rank,
                            band=args.band if name == "lhmm_band" else None, hidden=args.hidden,
                            init_scale=args.init_scale)
    task = LMTask(TextDataConfig(corpus=args.corpus, vocab_size=args.vocab_size), model_cfg)
    task.use_corpus(corpus)
    cfg = TrainConfig(
        out=str(Path(args.out) / key_of(name, rank)),
        epochs=1000,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        lr=args.lr,
        eval_every=max(1, args.max_steps // 2),
        seed=args.seed,
        overwrite=True,
        device=args.device,
        progress=False,
    )
    speed = step_speed(task, cfg, args.timing_reps)
    t0 = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        m = Trainer(task, cfg, DistContext.from_env(args.device)).fit()
    wall = time.perf_counter() - t0
    rec = {k: m.get(k) for k in ("model", "num_states", "rank", "band", "params", "val_ppl",
                                 "test_ppl", "tokens_per_s", "steps", "epochs",
                                 "train_seconds", "eval_seconds", "device")}
    rec.update({"step_tokens_per_s": speed, "wall_seconds": wall,
                "history": [{k: h[k] for k in ("step", "val_ppl", "train_ppl")}
                            for h in m["history"]]})
    return rec


def plot(results: dict, baselines: dict, args, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"lhmm": ("o-", "LHMM"), "lhmm_band": ("s-", f"LHMM + band ({args.band})"),
              "rank_space": ("^-", "rank-space HMM")}
    for name, (style, label) in styles.items():
        rows = sorted((r for r in results.values() if r["model"] == name), key=lambda r: r["rank"])
        if not rows:
            continue
        ranks = [r["rank"] for r in rows]
        ax1.plot(ranks, [r["val_ppl"] for r in rows], style, label=label)
        ax2.plot(ranks, [r["step_tokens_per_s"] for r in rows], style, label=label)
    dense = results.get("hmm")
    if dense:
        ax1.axhline(dense["val_ppl"], color="k", ls="--", label="dense HMM")
        ax2.axhline(dense["step_tokens_per_s"], color="k", ls="--", label="dense HMM")
    if "bigram" in baselines:
        ax1.axhline(baselines["bigram"]["val_ppl"], color="gray", ls=":", label="add-k bigram")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"rank R (Z = {args.states})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("validation perplexity")
    ax2.set_ylabel("training tokens/s (best step timing)")
    ax1.set_title(f"{args.corpus}: perplexity after {args.max_steps} steps")
    ax2.set_title("training speed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def results_table(results: dict, baselines: dict) -> str:
    rows = []
    for b, v in baselines.items():
        rows.append([f"{b} (add-k {v['k']:g})", None, None, None, v["val_ppl"], v["test_ppl"],
                     None, None, None])
    order = {"hmm": 0, "lhmm": 1, "lhmm_band": 2, "rank_space": 3}
    dense = results.get("hmm")
    for r in sorted(results.values(), key=lambda r: (order[r["model"]], -(r["rank"] or 1e9))):
        rel = (r["step_tokens_per_s"] / dense["step_tokens_per_s"]) if dense else None
        rows.append([r["model"], r["num_states"], r["rank"], r["params"], r["val_ppl"],
                     r["test_ppl"],
                     round(r["step_tokens_per_s"]), None if rel is None else f"{rel:.2f}x",
                     round(r["tokens_per_s"])])
    header = ["model", "Z", "R", "params", "val ppl", "test ppl", "step tokens/s",
              "speed vs dense", "run tokens/s"]
    table = markdown_table(header, rows)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--vocab-size", type=int, default=10000)
    ap.add_argument("--states", type=int, default=1024)
    ap.add_argument("--rank-divisors", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--models", nargs="+", default=["hmm", "lhmm", "lhmm_band", "rank_space"])
    ap.add_argument("--rank-space-max-rank", type=int, default=None,
                    help="skip rank-space models above this rank (default Z/16: building the "
                         "R x R step matrices costs O(Z R^2) per token)")
    ap.add_argument("--band", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--init-scale", type=float, default=3.0,
                    help="std of the initial transition log-potentials (the LM task's default)")
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-reps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (on a shared machine 1 thread can be faster)")
    ap.add_argument("--out", default="runs/lm_experiments")
    ap.add_argument("--json", default=str(HERE / "lm_experiments.json"))
    ap.add_argument("--markdown", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "lm_results.png"))
    ap.add_argument("--resume", action="store_true", help="keep finished models of --json")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 64 states, ranks Z/4 and Z/16, 4 steps, no files in docs/")
    args = ap.parse_args(argv)
    if args.quick:
        args.states, args.max_steps, args.hidden, args.timing_reps = 64, 4, 32, 1
        args.rank_divisors = [4, 16]
        args.json = str(Path(args.out) / "quick.json")
        args.markdown = str(Path(args.out) / "quick.md")
        args.plot = str(Path(args.out) / "quick.png")
    rs_max = args.rank_space_max_rank or max(1, args.states // 16)
    if args.threads:
        torch.set_num_threads(args.threads)

    from lorank.data import load_corpus

    corpus = load_corpus(args.corpus, args.vocab_size)
    probe = LMTask(TextDataConfig(corpus=args.corpus, vocab_size=args.vocab_size),
                   HMMLMConfig(model="hmm", num_states=1))
    probe.use_corpus(corpus)
    baselines = probe.baselines()
    store = {"results": {}}
    if args.resume and Path(args.json).exists():
        store = json.loads(Path(args.json).read_text())
    results = store["results"]
    grid = model_grid(args.states, args.rank_divisors, args.models, rs_max)
    t_all = time.perf_counter()
    for name, rank in grid:
        key = key_of(name, rank)
        if key in results:
            print(f"{key}: kept from {args.json}")
            continue
        print(f"{key}: training {args.max_steps} steps ...", flush=True)
        rec = run_one(corpus, name, rank, args)
        results[key] = rec
        print(f"  val ppl {rec['val_ppl']:.1f}, test ppl {rec['test_ppl']:.1f}, step tokens/s "
              f"{rec['step_tokens_per_s']:,.0f}, run tokens/s {rec['tokens_per_s']:,.0f}, "
              f"{rec['wall_seconds']:.0f} s", flush=True)
        store.update({
            "machine": machine_description(), "device": rec["device"], "corpus": args.corpus,
            "vocab_size": len(corpus.vocab), "train_tokens": int(corpus.train.numel()),
            "baselines": baselines, "results": results,
            "settings": {k: getattr(args, k) for k in ("states", "rank_divisors", "band",
                         "hidden", "init_scale", "max_steps", "batch_size", "max_tokens", "lr",
                         "seed", "timing_reps", "threads")},
            "command": "python benchmarks/lm_experiments.py " + " ".join(argv or sys.argv[1:]),
        })
        atomic_write_json(args.json, store)
    print(f"sweep: {time.perf_counter() - t_all:.0f} s")
    plot_ok = plot(results, baselines, args, Path(args.plot))
    table = results_table(results, baselines)
    print("\n" + table)
    block = generated_block(table, store, args, plot_ok)
    update_markdown(Path(args.markdown), block)
    print(f"wrote {args.json}, {args.markdown}" + (f", {args.plot}" if plot_ok else ""))
    return 0


BEGIN, END = "<!-- lm_experiments:begin -->", "<!-- lm_experiments:end -->"


def generated_block(table: str, store: dict, args, plot_ok: bool) -> str:
    s = store.get("settings", {})
    lines = [
        BEGIN,
        f"Corpus `{store.get('corpus')}` ({store.get('vocab_size')} words, "
        f"{store.get('train_tokens', 0):,} training tokens); {s.get('max_steps')} optimizer "
        f"steps of <= {s.get('max_tokens')} tokens per model (AdamW, lr {s.get('lr')}, "
        f"hidden {s.get('hidden')}, init scale {s.get('init_scale', 3.0):g}, "
        f"band width {s.get('band')}, seed {s.get('seed')}); "
        f"device `{store.get('device')}`.",
        "",
        f"Machine: {store.get('machine')}.",
        "",
        f"Command: `{store.get('command')}`",
        "",
        table,
        "",
    ]
    if plot_ok:
        rel = os.path.relpath(args.plot, Path(args.markdown).parent)
        lines += [f"![perplexity and speed against rank]({rel})", ""]
    lines.append(END)
    return "\n".join(lines)


def update_markdown(path: Path, block: str) -> None:
    """Replace the generated block of ``path`` (or create the file around it)."""
    text = path.read_text() if path.exists() else "# Results\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())


if __name__ == "__main__":
    raise SystemExit(main())
