"""LSTM language model on Shakespeare: SVD vs semi-NMF on input vs recurrent matrices.

The experiment of Winata et al. (2019), "On the Effectiveness of Low-Rank Matrix
Factorization for LSTM Model Compression", on this project's Shakespeare corpus
(``lorank.data.text.load_corpus("shakespeare")``): train a 2-layer word-level LSTM LM,
then factorize either the input-to-hidden matrices (``ih``) or the recurrent ones (``hh``)
of both layers with truncated SVD or semi-NMF at several ranks, and report test perplexity
against parameter count, before and after a brief fine-tuning of the compressed model (the
uncompressed model gets the same fine-tuning as the reference).

    python benchmarks/compress_lstm.py          # writes benchmarks/compress_lstm.{json,md}
    python benchmarks/compress_lstm.py --quick  # tiny run (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lorank.compress import CompressConfig, compress, count_parameters, finetune
from lorank.data.text import batchify, load_corpus

HERE = Path(__file__).resolve().parent


class LSTMLM(nn.Module):
    def __init__(self, vocab: int, emb: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=layers, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):
        h, state = self.lstm(self.drop(self.emb(x)), state)
        return self.out(self.drop(h)), state


def windows(streams: torch.Tensor, bptt: int):
    """(input, target) windows over batch-first streams (B, n)."""
    for i in range(0, streams.shape[1] - 1, bptt):
        j = min(i + bptt, streams.shape[1] - 1)
        yield streams[:, i:j], streams[:, i + 1:j + 1]


def random_windows(streams: torch.Tensor, bptt: int, count: int, seed: int = 0):
    """``count`` (input, target) windows at random offsets of the streams, the same for every
    model (fine-tuning data drawn from the whole training text, not one stretch of it)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, streams.shape[1] - bptt - 1, (count,), generator=gen)
    return [(streams[:, i : i + bptt], streams[:, i + 1 : i + bptt + 1]) for i in starts.tolist()]


def lm_loss(out, batch):
    logits = out[0] if isinstance(out, tuple) else out
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       batch[1].reshape(-1))


def forward_fn(model, batch):
    return model(batch[0])[0]


@torch.no_grad()
def perplexity(model, streams: torch.Tensor, bptt: int) -> float:
    model.eval()
    total, count = 0.0, 0
    state = None
    for x, y in windows(streams, bptt):
        logits, state = model(x, state)
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   y.reshape(-1), reduction="sum"))
        count += y.numel()
    return math.exp(total / count)


def train(model, streams, bptt, steps, lr, log_every=200, on_optimizer=None, params=None):
    """Adam with gradient clipping over truncated-BPTT windows.  ``params``: parameters or
    parameter groups for Adam (default all); ``on_optimizer(opt)`` is called once with the
    optimizer (``benchmarks/trainable_lstm.py`` attaches TRP / Maestro step hooks there)."""
    opt = torch.optim.Adam(model.parameters() if params is None else params, lr=lr)
    if on_optimizer is not None:
        on_optimizer(opt)
    model.train()
    step = 0
    t0 = time.time()
    while step < steps:
        state = None
        for x, y in windows(streams, bptt):
            if state is not None:
                state = tuple(s.detach() for s in state)
            logits, state = model(x, state)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            step += 1
            if step % log_every == 0:
                print(f"  train step {step}/{steps}: loss {float(loss.detach()):.3f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
            if step >= steps:
                break
    model.eval()


def parse_args(argv, doc: str, out: str, threads: int = 2, train_steps: int = 3500,
               extra=None) -> argparse.Namespace:
    """The model, data and fine-tuning options of this benchmark (shared with
    ``trainable_lstm.py``); ``extra(ap)`` adds more.  ``--quick`` shrinks everything."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--vocab", type=int, default=5000)
    ap.add_argument("--emb", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=200)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=train_steps)
    ap.add_argument("--finetune-steps", type=int, default=50)
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--bptt", type=int, default=35)
    ap.add_argument("--eval-tokens", type=int, default=12000,
                    help="test tokens used for perplexity (the Python-loop LSTM is slow)")
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--out", default=out)
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.train_steps, args.finetune_steps, args.ranks = 30, 5, [4]
        args.eval_tokens, args.hidden, args.emb = 2000, 64, 64
    return args


def main(argv=None) -> int:
    args = parse_args(argv, __doc__, str(HERE / "compress_lstm"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.time()
    corpus = load_corpus("shakespeare", vocab_size=args.vocab)
    vocab = len(corpus.vocab.itos)
    train_streams = batchify(corpus.train, args.batch)
    test_streams = batchify(corpus.test[:args.eval_tokens], 16)
    print(f"Shakespeare: {corpus.train.numel():,} train tokens, vocab {vocab}; "
          f"evaluating on the first {min(args.eval_tokens, corpus.test.numel()):,} test tokens",
          flush=True)

    model = LSTMLM(vocab, args.emb, args.hidden, args.layers, dropout=0.2)
    train(model, train_streams, args.bptt, args.train_steps, lr=2e-3)
    ft_data = random_windows(train_streams, args.bptt, args.finetune_steps)

    def tune(m):
        finetune(m, ft_data, lm_loss, steps=args.finetune_steps, lr=5e-4,
                 forward_fn=lambda mod, b: mod(b[0])[0], clip_norm=0.5)
        return m

    base_ppl = perplexity(model, test_streams, args.bptt)
    base_ft_ppl = perplexity(tune(copy.deepcopy(model)), test_streams, args.bptt)
    lstm_params = sum(p.numel() for n, p in model.lstm.named_parameters() if "weight" in n)
    print(f"original: test ppl {base_ppl:.1f} (after the same fine-tuning {base_ft_ppl:.1f}); "
          f"{count_parameters(model):,} parameters, {lstm_params:,} in LSTM matrices",
          flush=True)
    rows = []
    calib = ft_data[:4]
    for part in ("ih", "hh"):
        for method in ("svd", "snmf"):
            for rank in args.ranks:
                t0 = time.time()
                cfg = CompressConfig(method=method, rank=rank, layer_types=("lstm",),
                                     rnn_matrices=(part,), snmf_iters=200,
                                     measure_latency=False)
                cm, rep = compress(model, cfg, calibration=calib, forward_fn=forward_fn)
                lstm_after = sum(r.params_after for r in rep.layers)
                ppl = perplexity(cm, test_streams, args.bptt)
                ft_ppl = perplexity(tune(cm), test_streams, args.bptt)
                row = {"matrices": part, "method": method, "rank": rank,
                       "params": rep.model_params_after,
                       "lstm_matrix_params_compressed": lstm_after,
                       "lstm_matrix_params_dense": rep.target_params_before,
                       "weight_error": sum(r.weight_error for r in rep.layers) / len(rep.layers),
                       "ppl": ppl, "ppl_finetuned": ft_ppl, "seconds": time.time() - t0}
                rows.append(row)
                print(f"{part} {method:4s} r={rank:4d}: params {row['params']:,} ppl "
                      f"{ppl:.1f} -> {ft_ppl:.1f} after fine-tuning "
                      f"[{row['seconds']:.0f}s]", flush=True)
    result = {
        "corpus": "shakespeare (lorank.data.text.load_corpus)", "vocab": vocab,
        "train_tokens": corpus.train.numel(), "eval_tokens": int(test_streams.numel()),
        "model": {"emb": args.emb, "hidden": args.hidden, "layers": args.layers},
        "train_steps": args.train_steps, "finetune_steps": args.finetune_steps,
        "batch": args.batch, "bptt": args.bptt,
        "params": count_parameters(model), "lstm_matrix_params": lstm_params,
        "ppl": base_ppl, "ppl_finetuned": base_ft_ppl, "rows": rows,
        "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch {torch.__version__}",
        "command": "python benchmarks/compress_lstm.py" + (" --quick" if args.quick else ""),
        "total_seconds": time.time() - t_start,
    }
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out + ".md").write_text(to_markdown(result) + "\n")
    print(to_markdown(result))
    return 0


def to_markdown(res: dict) -> str:
    m = res["model"]
    lines = [
        f"2-layer LSTM LM (emb {m['emb']}, hidden {m['hidden']}, vocab {res['vocab']}; "
        f"{res['params']:,} parameters, {res['lstm_matrix_params']:,} in LSTM matrices) trained "
        f"{res['train_steps']} steps (batch {res['batch']}, BPTT {res['bptt']}) on "
        f"{res['train_tokens']:,} Shakespeare tokens; test perplexity on "
        f"{res['eval_tokens']:,} test tokens; fine-tuning: {res['finetune_steps']} Adam steps "
        "(lr 5e-4) on BPTT windows at random offsets of the training streams, the same for "
        "every model.",
        "",
        "| matrices | method | rank | params | LSTM matrix params | test ppl | "
        "ppl after fine-tuning |",
        "|---|---|---|---|---|---|---|",
        f"| - | original | - | {res['params']:,} | {res['lstm_matrix_params']:,} | "
        f"{res['ppl']:.1f} | {res['ppl_finetuned']:.1f} |",
    ]
    for r in res["rows"]:
        lstm = res["lstm_matrix_params"] - r["lstm_matrix_params_dense"] + \
            r["lstm_matrix_params_compressed"]
        lines.append(f"| {r['matrices']} | {r['method']} | {r['rank']} | {r['params']:,} | "
                     f"{lstm:,} | {r['ppl']:.1f} | {r['ppl_finetuned']:.1f} |")
    lines.append("")
    lines.append(f"Command: `{res['command']}` ({res['total_seconds'] / 60:.1f} min); machine: "
                 f"{res['machine']}, {res['threads']} threads.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
