"""LSTM language model on Shakespeare: post-hoc SVD vs TRP vs Maestro at equal rank.

The model, data, training loop and evaluation of ``benchmarks/compress_lstm.py`` (2-layer
word-level LSTM LM, 1500 Adam steps by default).  Every LSTM matrix (``W_ih`` and ``W_hh`` of both
layers, stacked over the gates) ends at rank r in {4, 16, 64}, so at each r all methods have
the same parameter count:

* **SVD**: plain training, then truncated SVD at rank r (``lorank.compress.compress``),
  test perplexity before and after the fine-tuning of ``compress_lstm.py`` (50 Adam steps);
* **TRP** (``lorank.compress.TRP``): trained from the same initialization with a
  projection onto rank r every ``--trp-period`` steps plus the nuclear-norm subgradient,
  then factorized (exact: the last projection is the factorization);
* **Maestro** (``lorank.compress.Maestro``): one training run per ordered-dropout sampler
  of the factorized LSTM at full capacity (optionally with the hierarchical group lasso),
  then truncated to its first r components, without retraining.  The factors get a 4x
  smaller Adam learning rate (``--maestro-factor-lr``): at the dense rate the factorized
  LSTM barely trains (test perplexity 419 after 1500 steps with the single sampler, against
  181 dense), because Adam moves a product of R components further per step than a matrix.

The fine-tuned column gives every compressed model the same 50 steps.

    python benchmarks/trainable_lstm.py          # writes benchmarks/trainable_lstm.{json,md,png}
    python benchmarks/trainable_lstm.py --quick  # tiny run (smoke test)
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from _common import finish, footer, new_axes, run_info, save_figure
from compress_lstm import LSTMLM, lm_loss, parse_args, perplexity, random_windows, train

from lorank.compress import (
    TRP,
    CompressConfig,
    Maestro,
    MaestroConfig,
    TRPConfig,
    compress,
    count_parameters,
    finetune,
)
from lorank.data.text import batchify, load_corpus

HERE = Path(__file__).resolve().parent


def lstm_matrix_params(model) -> int:
    """Weights of the LSTM matrices (dense or factorized), biases excluded."""
    return sum(p.numel() for n, p in model.lstm.named_parameters() if n.startswith("weight"))


def main(argv=None) -> int:
    def extra(ap):
        ap.add_argument("--trp-period", type=int, default=20)
        ap.add_argument("--trp-nuclear", type=float, default=1e-4)
        ap.add_argument("--maestro-samplers", nargs="+", default=["single", "independent"],
                        help="one Maestro run per ordered-dropout sampler")
        ap.add_argument("--maestro-lasso", type=float, default=0.0)
        ap.add_argument("--maestro-factor-lr", type=float, default=5e-4,
                        help="Adam learning rate of the Maestro factors (the rest: 2e-3)")

    args = parse_args(argv, __doc__, str(HERE / "trainable_lstm"), threads=1,
                      train_steps=1500, extra=extra)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    corpus = load_corpus("shakespeare", vocab_size=args.vocab)
    vocab = len(corpus.vocab.itos)
    train_streams = batchify(corpus.train, args.batch)
    test_streams = batchify(corpus.test[:args.eval_tokens], 16)
    ft_data = random_windows(train_streams, args.bptt, args.finetune_steps)
    lstm_cfg = {"layer_types": ("lstm",), "rnn_matrices": ("ih", "hh")}

    def fresh():
        torch.manual_seed(0)  # the initialization of compress_lstm.py, the same for every run
        return LSTMLM(vocab, args.emb, args.hidden, args.layers, dropout=0.2)

    def fit(model, on_optimizer=None, params=None):
        t0 = time.time()
        train(model, train_streams, args.bptt, args.train_steps, lr=2e-3,
              log_every=max(args.train_steps // 5, 1), on_optimizer=on_optimizer,
              params=params)
        return time.time() - t0

    def ppl(m):
        return perplexity(m, test_streams, args.bptt)

    def tuned_ppl(m):
        m = copy.deepcopy(m)
        finetune(m, ft_data, lm_loss, steps=args.finetune_steps, lr=5e-4,
                 forward_fn=lambda mod, b: mod(b[0])[0], clip_norm=0.5)
        return ppl(m)

    rows = []

    def record(method, rank, model, seconds, **extra):
        row = {"method": method, "rank": rank, "params": count_parameters(model),
               "lstm_matrix_params": lstm_matrix_params(model), "ppl": ppl(model),
               "ppl_finetuned": tuned_ppl(model), "train_seconds": seconds, **extra}
        rows.append(row)
        print(f"{method:8s} r={rank}: params {row['params']:,} (LSTM matrices "
              f"{row['lstm_matrix_params']:,}), test ppl {row['ppl']:.1f} -> "
              f"{row['ppl_finetuned']:.1f} fine-tuned", flush=True)

    print(f"Shakespeare: {corpus.train.numel():,} train tokens, vocab {vocab}", flush=True)
    base = fresh()
    secs = fit(base)
    record("dense", None, base, secs)
    for r in args.ranks:
        small, _ = compress(base, CompressConfig(method="svd", rank=r, measure_latency=False,
                                                 **lstm_cfg))
        record("svd", r, small, secs)

    for r in args.ranks:
        model = fresh()
        trp = TRP(model, TRPConfig(rank=r, period=args.trp_period,
                                   nuclear_weight=args.trp_nuclear, **lstm_cfg))
        secs = fit(model, trp.attach)
        small, _ = trp.compress(measure_latency=False)
        record("trp", r, small, secs)

    for sampler in args.maestro_samplers:
        mae = Maestro(fresh(), MaestroConfig(sampler=sampler, group_lasso=args.maestro_lasso,
                                             inplace=True, **lstm_cfg))
        factors = mae.factor_parameters()
        rest = [p for p in mae.model.parameters() if all(p is not f for f in factors)]
        secs = fit(mae.model, mae.attach,
                   [{"params": rest}, {"params": factors, "lr": args.maestro_factor_lr}])
        mae.model.eval()
        record(f"maestro-{sampler}", "full", mae.model, secs)
        for r in args.ranks:
            small, _ = mae.compress(rank=r)
            record(f"maestro-{sampler}", r, small, secs)

    result = {
        "corpus": "shakespeare (lorank.data.text.load_corpus)", "vocab": vocab,
        "train_tokens": corpus.train.numel(), "eval_tokens": int(test_streams.numel()),
        "model": {"emb": args.emb, "hidden": args.hidden, "layers": args.layers},
        "train_steps": args.train_steps, "finetune_steps": args.finetune_steps,
        "batch": args.batch, "bptt": args.bptt, "trp_period": args.trp_period,
        "trp_nuclear": args.trp_nuclear, "maestro_samplers": args.maestro_samplers,
        "maestro_lasso": args.maestro_lasso, "maestro_factor_lr": args.maestro_factor_lr,
        "rows": rows,
        **run_info("benchmarks/trainable_lstm.py", argv, args.threads, t_start),
    }
    finish(args.out, result, to_markdown, plot)
    return 0


def to_markdown(res: dict) -> str:
    m = res["model"]
    lines = [
        f"2-layer LSTM LM (emb {m['emb']}, hidden {m['hidden']}, vocab {res['vocab']}), every "
        f"run {res['train_steps']} Adam steps (batch {res['batch']}, BPTT {res['bptt']}) on "
        f"{res['train_tokens']:,} Shakespeare tokens from the same initialization; test "
        f"perplexity on {res['eval_tokens']:,} test tokens; all four LSTM matrices at rank r; "
        f"fine-tuning: {res['finetune_steps']} Adam steps (lr 5e-4) on the same random "
        f"training windows for every model.  TRP: projection every {res['trp_period']} steps, "
        f"nuclear weight {res['trp_nuclear']:g}; Maestro: one run per ordered-dropout "
        f"sampler ({', '.join(res['maestro_samplers'])}), factor learning rate "
        f"{res['maestro_factor_lr']:g} (everything else 2e-3), group lasso "
        f"{res['maestro_lasso']:g}, truncated to each r without retraining.",
        "",
        "| method | rank | params | LSTM matrix params | test ppl | ppl after fine-tuning | "
        "train min |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['rank'] or '-'} | {r['params']:,} | "
                     f"{r['lstm_matrix_params']:,} | {r['ppl']:.1f} | {r['ppl_finetuned']:.1f} | "
                     f"{r['train_seconds'] / 60:.1f} |")
    return "\n".join([*lines, "", footer(res)])


def plot(res: dict, path: Path) -> None:
    made = new_axes()
    if made is None:
        return
    fig, ax = made
    rows = [r for r in res["rows"] if isinstance(r["rank"], int)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [("svd", "ppl", "o-", "SVD"), ("svd", "ppl_finetuned", "o--", "SVD + fine-tuning"),
             ("trp", "ppl", "s-", "TRP")]
    lines += [(m, "ppl", "^-", "Maestro, " + m.split("-", 1)[1] + " sampler")
              for m in methods if m.startswith("maestro")]
    for method, key, style, label in lines:
        sub = sorted((r for r in rows if r["method"] == method), key=lambda r: r["rank"])
        ax.plot([r["lstm_matrix_params"] for r in sub], [r[key] for r in sub], style,
                label=label)
    dense = next(r for r in res["rows"] if r["method"] == "dense")
    ax.axhline(dense["ppl"], color="gray", ls=":", label="dense (no compression)")
    ax.set_xscale("log")
    ax.minorticks_off()
    svd = sorted((r for r in rows if r["method"] == "svd"), key=lambda r: r["rank"])
    ax.set_xticks([r["lstm_matrix_params"] for r in svd],
                  [f"{r['lstm_matrix_params'] / 1000:.0f}k\n(r={r['rank']})" for r in svd])
    ax.set_xlabel("LSTM matrix parameters")
    ax.set_ylabel("test perplexity")
    ax.set_title("LSTM LM on Shakespeare: rank r on every LSTM matrix")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
