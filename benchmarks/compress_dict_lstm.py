"""LSTM language model on Shakespeare: dictionary factorizations of the output layer, then
healing with adapters.

The model and training of ``benchmarks/compress_lstm.py`` (imported from it): a 2-layer
word-level LSTM LM (vocabulary 5000).  Its largest matrix, the 5000 x 200 output layer
(``out``, 1M weights), is compressed with SVD, whitened SVD, CoSpaDi and DSFormer (2:4
codes) at equal storage (each removes a fraction f of the layer's bytes; the dictionary
methods count their dictionary, nonzero values and support bitmask); calibration: 4 BPTT
windows of training text.  Test perplexity is reported without any training; DSFormer
also after its straight-through fine-tuning (STF), against whitened SVD after the same
number of ordinary fine-tuning steps.  Then the CoSpaDi model at f = 0.4 is healed with
LoRA or WaRA adapters (same rank, so the same adapter parameters) on ``out``, against full
fine-tuning, all for the same steps on the same windows.

    python benchmarks/compress_dict_lstm.py        # writes benchmarks/compress_dict_lstm.{json,md}
    python benchmarks/compress_dict_lstm.py --quick
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import best_time, machine_description, write_outputs  # noqa: E402
from compress_lstm import (  # noqa: E402
    LSTMLM,
    forward_fn,
    lm_loss,
    perplexity,
    random_windows,
    train,
)

from lorank.compress import (  # noqa: E402
    CompressConfig,
    adapter_parameters,
    attach_adapters,
    compress,
    finetune,
    heal,
    straight_through_finetune,
)
from lorank.data.text import batchify, load_corpus  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--train-steps", type=int, default=3500)
    ap.add_argument("--reductions", type=float, nargs="+", default=[0.4, 0.6, 0.8])
    ap.add_argument("--tune-steps", type=int, default=100)
    ap.add_argument("--adapter-rank", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=12000)
    ap.add_argument("--threads", type=int, default=2, help="threads for training the LM")
    ap.add_argument("--out", default=str(HERE / "compress_dict_lstm"))
    args = ap.parse_args(argv)
    emb = hidden = 200
    if args.quick:
        args.train_steps, args.reductions, args.tune_steps = 30, [0.4], 5
        args.eval_tokens, emb, hidden = 2000, 64, 64
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.time()
    corpus = load_corpus("shakespeare", vocab_size=5000)
    vocab = len(corpus.vocab.itos)
    train_streams = batchify(corpus.train, 20)
    test_streams = batchify(corpus.test[:args.eval_tokens], 16)
    model = LSTMLM(vocab, emb, hidden, 2, dropout=0.2)
    train(model, train_streams, 35, args.train_steps, lr=2e-3)
    tune_data = random_windows(train_streams, 35, args.tune_steps, seed=1)
    calib = random_windows(train_streams, 35, 4, seed=2)
    # the rest runs single-threaded: OMP's many small products only stall on a second
    # thread of a busy 2-core machine
    torch.set_num_threads(1)
    base_ppl = perplexity(model, test_streams, 35)
    print(f"original: test ppl {base_ppl:.1f}", flush=True)

    def tune_kwargs(lr):
        return {"steps": args.tune_steps, "lr": lr, "forward_fn": forward_fn, "clip_norm": 0.5}

    # latency of the output layer alone on one batch of hidden states (fastest of 20)
    hidden_batch = torch.randn(20 * 35, hidden)
    with torch.no_grad():
        dense_ms = 1000 * best_time(lambda: model.out(hidden_batch), 20)
    rows = []
    kept = {}
    for red in args.reductions:
        for method in ("svd", "whitened", "cospadi", "dsformer"):
            t0 = time.time()
            cfg = CompressConfig(method=method, param_reduction=red, target_modules=["out"],
                                 layer_types=("linear",), measure_latency=False)
            cm, rep = compress(model, cfg, calibration=calib, forward_fn=forward_fn)
            row = {"f": red, "method": method, "storage_removed": rep.target_reduction,
                   "rank_or_atoms": rep.layers[0].rank, "note": rep.layers[0].note,
                   "output_error": rep.layers[0].output_error,
                   "ppl": perplexity(cm, test_streams, 35), "seconds": time.time() - t0}
            with torch.no_grad():
                row["out_ms"] = 1000 * best_time(lambda cm=cm: cm.out(hidden_batch), 20)
            if method == "dsformer":
                straight_through_finetune(cm, tune_data, lm_loss, **tune_kwargs(5e-4))
                row["ppl_tuned"] = perplexity(cm, test_streams, 35)
                row["tuning"] = f"STF, {args.tune_steps} steps"
            elif method == "whitened":
                tuned = copy.deepcopy(cm)
                finetune(tuned, tune_data, lm_loss, **tune_kwargs(5e-4))
                row["ppl_tuned"] = perplexity(tuned, test_streams, 35)
                row["tuning"] = f"full fine-tuning, {args.tune_steps} steps"
            rows.append(row)
            kept[(red, method)] = cm
            tuned = f" -> {row['ppl_tuned']:.1f} ({row['tuning']})" if "tuning" in row else ""
            print(f"f={red:.1f} {method:9s}: storage removed {100 * row['storage_removed']:.1f}%"
                  f", out-err {row['output_error']:.4f}, ppl {row['ppl']:.1f}{tuned} "
                  f"[{row['seconds']:.0f}s]", flush=True)

    heal_rows = []
    base = kept[(args.reductions[0], "cospadi")]
    start_ppl = perplexity(base, test_streams, 35)
    for kind in ("lora", "wara", "full"):
        t0 = time.time()
        if kind == "full":
            m = copy.deepcopy(base)
            finetune(m, tune_data, lm_loss, **tune_kwargs(5e-4))
            trained = sum(p.numel() for p in m.parameters())
        else:
            m = attach_adapters(base, kind=kind, rank=args.adapter_rank, target_modules=["out"])
            heal(m, tune_data, lm_loss, **tune_kwargs(2e-3))
            trained = sum(p.numel() for p in adapter_parameters(m))
        heal_rows.append({"kind": kind, "trained_params": trained,
                          "ppl_before": start_ppl, "ppl_after": perplexity(m, test_streams, 35),
                          "seconds": time.time() - t0})
        print(f"heal {kind}: {trained:,} trained parameters, ppl {start_ppl:.1f} -> "
              f"{heal_rows[-1]['ppl_after']:.1f}", flush=True)
    result = {"vocab": vocab, "emb": emb, "hidden": hidden, "train_steps": args.train_steps,
              "eval_tokens": int(test_streams.numel()), "ppl": base_ppl,
              "out_weights": model.out.weight.numel(), "tune_steps": args.tune_steps,
              "dense_out_ms": dense_ms,
              "adapter_rank": args.adapter_rank, "heal_reduction": args.reductions[0],
              "rows": rows, "heal": heal_rows, "threads": args.threads,
              "machine": machine_description(),
              "command": "python benchmarks/compress_dict_lstm.py" +
                         (" --quick" if args.quick else ""),
              "total_seconds": time.time() - t_start}
    write_outputs(args.out, result, to_markdown(result))
    return 0


def to_markdown(res: dict) -> str:
    lines = [
        f"2-layer LSTM LM (emb {res['emb']}, hidden {res['hidden']}, vocab {res['vocab']}) "
        f"trained {res['train_steps']} steps; test perplexity {res['ppl']:.1f} on "
        f"{res['eval_tokens']:,} test tokens ({res['threads']} threads for training, 1 after).  "
        f"Compressed: the output layer "
        f"({res['out_weights']:,} weights) only.",
        "",
        "| f | method | storage removed | rank / atoms | layer output err | test ppl | "
        "ppl after tuning | `out` ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        tuned = f"{r['ppl_tuned']:.1f} ({r['tuning']})" if "tuning" in r else "-"
        lines.append(f"| {r['f']:.1f} | {r['method']} | {100 * r['storage_removed']:.1f}% | "
                     f"{r['rank_or_atoms']} | {r['output_error']:.4f} | {r['ppl']:.1f} | "
                     f"{tuned} | {r['out_ms']:.2f} |")
    lines += ["", f"`out` ms: fastest of 20 forwards of the output layer alone on 700 hidden "
                  f"vectors, 1 thread (dense: {res['dense_out_ms']:.2f} ms)."]
    lines += ["", f"Healing the CoSpaDi model at f = {res['heal_reduction']}: "
                  f"{res['tune_steps']} steps on the same training windows (adapters: rank "
                  f"{res['adapter_rank']} on `out`, lr 2e-3; full fine-tuning: lr 5e-4).", "",
              "| healing | trained parameters | ppl before | ppl after |", "|---|---|---|---|"]
    for h in res["heal"]:
        name = {"lora": "LoRA", "wara": "WaRA (haar)", "full": "full fine-tuning"}[h["kind"]]
        lines.append(f"| {name} | {h['trained_params']:,} | {h['ppl_before']:.1f} | "
                     f"{h['ppl_after']:.1f} |")
    lines += ["", f"Command: `{res['command']}` ({res['total_seconds'] / 60:.1f} min); "
                  f"machine: {res['machine']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
