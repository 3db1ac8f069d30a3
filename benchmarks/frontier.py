"""The speed-accuracy frontier of HMM language models (Chiu, Deng & Rush 2021, Figure 3):
dense HMMs at Z in {256 .. 2048} against LHMMs at Z in {1024 .. 8192} with R in {Z/16, Z/8,
Z/4}, each trained through the library's trainer for the same wall-clock budget, plus a
trained dense HMM converted to an LHMM (rank-R KL factorization of its transition) with and
without a short fine-tuning.

For every model it records validation perplexity over training time (every evaluation) and,
after training, inference speed: tokens per second of the forward-only ``log_partition`` (no
gradient) over the validation split, the best of ``--timing-reps`` passes.  Outputs a JSON
(updated after each model, so an interrupted run continues with ``--resume``), a markdown
table and a plot with three panels: validation perplexity against training time (one curve per
model), against inference tokens/s, and against rank.

    python benchmarks/frontier.py --corpus shakespeare --budget 240 --threads 2
    python benchmarks/frontier.py --corpus ptb --budget 240 --threads 2
    python benchmarks/frontier.py --quick       # a smoke run: tiny models, seconds each

Long runs: one at a time, never next to another timing job (``flock /work/cpu.lock ...``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch
from _common import best_time, machine_description

from lorank._io import atomic_write_bytes, atomic_write_json
from lorank.compress import compress_hmm
from lorank.data import load_corpus
from lorank.nn.hmm import HMMLMConfig
from lorank.tasks import LMTask, TextDataConfig, load_run
from lorank.train import TrainConfig, Trainer
from lorank.train.distributed import DistContext
from lorank.train.metrics import markdown_table

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default="shakespeare", help="shakespeare, ptb or a directory")
    p.add_argument("--vocab-size", type=int, default=10000)
    p.add_argument("--dense", default="256,512,1024,2048", help="dense HMM state counts")
    p.add_argument("--lhmm", default="1024,2048,4096,8192", help="LHMM state counts")
    p.add_argument("--rank-divisors", default="8,4", help="LHMM ranks Z/d for these d")
    p.add_argument("--convert", default="1024", help="dense HMM sizes to convert (empty: none)")
    p.add_argument("--convert-divisors", default="8,4", help="conversion ranks Z/d")
    p.add_argument("--budget", type=float, default=150.0,
                   help="training seconds per model (evaluation excluded)")
    p.add_argument("--finetune-budget", type=float, default=None,
                   help="training seconds of a converted model's fine-tuning (default budget/4)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--transition", default="mlp", help="LHMM transition network")
    p.add_argument("--dense-transition", default="mlp", help="dense HMM transition network")
    p.add_argument("--low-rank-form", default="mixture", help="LHMM form: mixture or kernel")
    p.add_argument("--lr", type=float, default=5e-3, help="LHMM learning rate")
    p.add_argument("--dense-lr", type=float, default=1e-2, help="dense HMM learning rate")
    p.add_argument("--state-dropout", type=float, default=0.0)
    p.add_argument("--feature-dropout", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timing-reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/frontier", help="run directories")
    p.add_argument("--json", default=None, help="default benchmarks/frontier_<corpus>.json")
    p.add_argument("--resume", action="store_true", help="skip models already in the JSON")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.dense, args.lhmm, args.rank_divisors = "16,32", "32,64", "8,4"
        args.convert, args.convert_divisors, args.budget = "32", "4", 3.0
        args.eval_every, args.timing_reps = 5, 1
        args.json = args.json or str(Path(args.out) / "quick.json")
    args.json = args.json or str(HERE / f"frontier_{Path(args.corpus).name}.json")
    args.finetune_budget = args.finetune_budget or args.budget / 4
    return args


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def grid(args) -> list[tuple[str, dict]]:
    """(key, model config fields) of every model to train."""
    out = []
    for z in ints(args.dense):
        out.append((f"hmm_Z{z}", dict(model="hmm", num_states=z,
                                      transition=args.dense_transition)))
    for z in ints(args.lhmm):
        for d in ints(args.rank_divisors):
            out.append((f"lhmm_Z{z}_R{z // d}", dict(model="lhmm", num_states=z, rank=z // d,
                                                      transition=args.transition,
                                                      low_rank_form=args.low_rank_form)))
    return out


def make_task(args, corpus, fields: dict) -> LMTask:
    cfg = HMMLMConfig(hidden=args.hidden, state_dropout=args.state_dropout,
                      feature_dropout=args.feature_dropout if fields["model"] != "hmm" else 0.0,
                      **fields)
    task = LMTask(TextDataConfig(corpus=args.corpus, vocab_size=args.vocab_size), cfg)
    task.use_corpus(corpus)
    return task


def train_config(args, key: str, budget: float, lr: float | None = None) -> TrainConfig:
    return TrainConfig(out=str(Path(args.out) / key), epochs=10_000, max_seconds=budget,
                       batch_size=args.batch_size, max_tokens=args.max_tokens,
                       lr=args.lr if lr is None else lr,
                       eval_every=args.eval_every, eval_test=False, seed=args.seed,
                       overwrite=True, progress=False, threads=args.threads)


@torch.no_grad()
def inference_tokens_per_s(task: LMTask, model, args) -> float:
    """Tokens/s of forward-only log-partitions over the validation split (best pass)."""
    model.eval()
    batches = list(task.batches("valid", batch_size=args.batch_size, max_tokens=args.max_tokens))
    tokens = sum(task.count(b) for b in batches)

    def run():
        for inputs, lengths in batches:
            model(inputs, lengths).log_partition.sum().item()

    return tokens / best_time(run, args.timing_reps)


def record(key: str, kind: str, task: LMTask, metrics: dict, model, args, **extra) -> dict:
    cfg = task.model_config
    return {
        "key": key, "kind": kind, "model": cfg.model, "num_states": cfg.num_states,
        "rank": model.rank, "params": sum(p.numel() for p in model.parameters()),
        "val_ppl": metrics["val_ppl"], "steps": metrics["steps"],
        "train_seconds": metrics["train_seconds"],
        "curve": [(h["train_seconds"], h["val_ppl"]) for h in metrics["history"]],
        "infer_tokens_per_s": inference_tokens_per_s(task, model, args), **extra,
    }


def fit(task: LMTask, cfg: TrainConfig, model=None) -> tuple[dict, object]:
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        trainer = Trainer(task, cfg, DistContext(), model=model)
        metrics = trainer.fit()
    if trainer.best_state is not None:
        trainer.model.load_state_dict(trainer.best_state)
    return metrics, trainer.model


def convert(args, corpus, store: dict) -> None:
    """Dense HMM -> rank-R LHMM by a KL factorization of its transition, then fine-tuned."""
    for z in ints(args.convert):
        src_key = f"hmm_Z{z}"
        if src_key not in store["models"]:
            print(f"skip conversion of {src_key}: not trained", file=sys.stderr)
            continue
        for d in ints(args.convert_divisors):
            r = z // d
            key = f"convert_Z{z}_R{r}"
            if args.resume and key in store["models"]:
                continue
            task = make_task(args, corpus, dict(model="hmm", num_states=z,
                                                transition=args.dense_transition))
            _, dense, _ = load_run(Path(args.out) / src_key)
            t0 = time.perf_counter()
            low, info = compress_hmm(dense, r, loss="kl")
            fit_s = time.perf_counter() - t0
            ev = Trainer(task, train_config(args, key, 1.0), DistContext()).evaluate("valid", low)
            tuned_metrics, tuned = fit(task, train_config(args, key, args.finetune_budget), low)
            rec = record(key, "convert", task, tuned_metrics, tuned, args,
                         val_ppl_before_finetune=ev["ppl"], kl_fit_seconds=fit_s,
                         transition_error=info, source=src_key)
            store["models"][key] = rec
            atomic_write_json(args.json, store)
            print(f"{key}: KL fit {ev['ppl']:.1f} ppl ({fit_s:.0f} s), fine-tuned "
                  f"{rec['val_ppl']:.1f}", flush=True)


def time_offset(store: dict, r: dict) -> float:
    """Seconds spent before a model's own training: for a converted model, its dense source's
    training and the KL fit (0 for the others)."""
    if r["kind"] != "convert":
        return 0.0
    return store["models"][r["source"]]["train_seconds"] + r["kl_fit_seconds"]


def table(store: dict) -> str:
    rows = []
    for r in sorted(store["models"].values(), key=lambda r: (r["kind"], r["num_states"],
                                                             r["rank"] or 0)):
        rows.append([r["key"], r["num_states"], r["rank"], r["params"], r["val_ppl"],
                     r.get("val_ppl_before_finetune"), r["steps"], r["train_seconds"],
                     r["train_seconds"] + time_offset(store, r),
                     f"{r['train_seconds'] / max(r['steps'], 1):.2f}", r["infer_tokens_per_s"]])
    header = ["model", "states", "rank", "params", "val ppl", "val ppl (KL fit only)", "steps",
              "train s", "total s (convert: + source + fit)", "s / step",
              "inference tokens/s"]
    return markdown_table(header, rows)


def plot(store: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = {"hmm": "tab:red", "lhmm": "tab:blue", "convert": "tab:green"}
    for r in store["models"].values():
        kind = "convert" if r["kind"] == "convert" else r["model"]
        t, v = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        t = [x + time_offset(store, r) for x in t]  # converts: after the source's training
        axes[0].plot(t, v, "-", color=colors[kind], alpha=0.35 + 0.6 * (r["num_states"] /
                     max(x["num_states"] for x in store["models"].values())), lw=1.2)
        axes[0].annotate(r["key"].replace("_", " "), (t[-1], v[-1]) if t else (0, 0),
                         fontsize=6, color=colors[kind])
        axes[1].scatter(r["infer_tokens_per_s"], r["val_ppl"], color=colors[kind])
        axes[1].annotate(r["key"].replace("_", " "), (r["infer_tokens_per_s"], r["val_ppl"]),
                         fontsize=6)
        if r["rank"] is not None and r["kind"] != "convert":
            axes[2].scatter(r["rank"], r["val_ppl"], color=colors[kind])
            axes[2].annotate(f"Z={r['num_states']}", (r["rank"], r["val_ppl"]), fontsize=6)
    for z in {r["num_states"] for r in store["models"].values() if r["model"] == "hmm"}:
        dense = store["models"].get(f"hmm_Z{z}")
        if dense:
            axes[2].axhline(dense["val_ppl"], color="tab:red", lw=0.8, ls="--")
            axes[2].annotate(f"dense Z={z}", (0.01, dense["val_ppl"]), fontsize=6,
                             color="tab:red", xycoords=("axes fraction", "data"))
    axes[0].set(xlabel="training seconds (converts: after the dense source's)",
                ylabel="validation perplexity",
                title="perplexity over training time")
    axes[1].set(xscale="log", xlabel="inference tokens/s (forward only)",
                ylabel="validation perplexity", title="accuracy vs inference speed")
    axes[2].set(xscale="log", xlabel="rank R", ylabel="validation perplexity",
                title="LHMM perplexity vs rank")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(store["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = load_corpus(args.corpus, args.vocab_size)
    store = {"models": {}}
    if args.resume and Path(args.json).exists():
        store = json.loads(Path(args.json).read_text())
    store["machine"] = machine_description()
    store["title"] = (f"{args.corpus}: {len(corpus.vocab)} words, {corpus.train.numel():,} "
                      f"training tokens; {args.budget:g} s of training per model (dense lr "
                      f"{args.dense_lr:g}, LHMM lr {args.lr:g}, {args.low_rank_form} form) "
                      f"({args.threads} threads); {store['machine']}")
    store["args"] = vars(args)
    t_all = time.perf_counter()
    for key, fields in grid(args):
        if args.resume and key in store["models"]:
            continue
        task = make_task(args, corpus, fields)
        lr = args.dense_lr if fields["model"] == "hmm" else args.lr
        metrics, model = fit(task, train_config(args, key, args.budget, lr))
        store["models"][key] = record(key, "train", task, metrics, model, args)
        atomic_write_json(args.json, store)
        r = store["models"][key]
        print(f"{key}: val ppl {r['val_ppl']:.1f} after {r['steps']} steps "
              f"({r['train_seconds']:.0f} s); inference {r['infer_tokens_per_s']:,.0f} tokens/s",
              flush=True)
    convert(args, corpus, store)
    store["wall_seconds"] = time.perf_counter() - t_all + store.get("wall_seconds", 0.0)
    atomic_write_json(args.json, store)
    text = f"{store['title']}\n\n{table(store)}\n"
    print("\n" + text)
    atomic_write_bytes(Path(args.json).with_suffix(".md"), text.encode())
    plot(store, Path(args.json).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
