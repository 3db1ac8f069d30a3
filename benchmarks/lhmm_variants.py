"""Why the LHMM trailed the dense HMM, and what closes the gap: parameterization variants
trained with the main job's settings (Shakespeare, batches of <= 4096 tokens, AdamW, the
same seed and batches), one after the other in one process.

    python benchmarks/lhmm_variants.py --states 256 --epochs 1      # the quick proxy, ~4 min
    python benchmarks/lhmm_variants.py --states 1024 --epochs 2     # the main job's budget

Prints a table (validation perplexity, its curve, tokens/s) and writes
``benchmarks/lhmm_variants_Z<states>.{json,md}``.  Time with ``--threads 1`` on a shared
machine (two threads stall when another process holds the other core).
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
from _common import machine_description

from lorank._io import atomic_write_bytes, atomic_write_json
from lorank.data import load_corpus
from lorank.nn.hmm import HMMLMConfig
from lorank.tasks import LMTask, TextDataConfig
from lorank.train import TrainConfig, Trainer
from lorank.train.distributed import DistContext
from lorank.train.metrics import markdown_table

HERE = Path(__file__).resolve().parent

#: name -> (model config fields, training fields); rank R = Z/4 unless given
VARIANTS: dict[str, tuple[dict, dict]] = {
    "dense": (dict(model="hmm"), {}),
    "dense, lr 5e-3": (dict(model="hmm"), dict(lr=5e-3)),
    "kernel (Chiu et al.), mlp": (dict(model="lhmm", low_rank_form="kernel"), {}),
    "kernel, embedding net (paper code)": (dict(model="lhmm", low_rank_form="kernel",
                                                transition="embedding"), {}),
    "kernel, embedding net, dropout 0.1/0.1": (dict(model="lhmm", low_rank_form="kernel",
                                                    transition="embedding", state_dropout=0.1,
                                                    feature_dropout=0.1), {}),
    "kernel, mlp, feature dropout 0.1": (dict(model="lhmm", low_rank_form="kernel",
                                              feature_dropout=0.1), {}),
    "mixture, mlp": (dict(model="lhmm", low_rank_form="mixture"), {}),
    "mixture, mlp, init scale 2": (dict(model="lhmm", low_rank_form="mixture", init_scale=2.0),
                                   {}),
    "mixture, mlp, feature dropout 0.1": (dict(model="lhmm", low_rank_form="mixture",
                                               feature_dropout=0.1), {}),
    "mixture, embedding net, init 3": (dict(model="lhmm", low_rank_form="mixture",
                                            transition="embedding", init_scale=3.0), {}),
    "mixture, mlp, lr 5e-3": (dict(model="lhmm", low_rank_form="mixture"), dict(lr=5e-3)),
    "mixture, mlp, R = Z/2": (dict(model="lhmm", low_rank_form="mixture", rank_divisor=2), {}),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--states", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="variant names to run")
    p.add_argument("--out", default="runs/lhmm_variants")
    p.add_argument("--report", action="store_true",
                   help="only print the table of the stored JSON (no training)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = load_corpus("shakespeare", 10000)
    prefix = HERE / f"lhmm_variants_Z{args.states}"
    results: dict[str, dict] = {}
    t_all = time.perf_counter()
    if args.report:
        results = json.loads(prefix.with_suffix(".json").read_text())
    for name, (fields, train) in VARIANTS.items():
        if args.report or (args.only and name not in args.only):
            continue
        fields = dict(fields)
        divisor = fields.pop("rank_divisor", 4)
        if fields["model"] != "hmm":
            fields["rank"] = args.states // divisor
        config = HMMLMConfig(num_states=args.states, hidden=args.hidden, **fields)
        task = LMTask(TextDataConfig(), config)
        task.use_corpus(corpus)
        cfg = TrainConfig(out=str(Path(args.out) / name.replace(" ", "_").replace(",", "")),
                          epochs=args.epochs, batch_size=1024, max_tokens=4096,
                          eval_every=100 if args.epochs == 1 else 50, eval_test=False,
                          overwrite=True, progress=False, threads=args.threads,
                          **dict(dict(lr=args.lr), **train))
        with contextlib.redirect_stdout(io.StringIO()):
            m = Trainer(task, cfg, DistContext()).fit()
        results[name] = {"val_ppl": m["val_ppl"], "rank": config.rank, "lr": cfg.lr,
                         "tokens_per_s": m["tokens_per_s"], "steps": m["steps"],
                         "curve": [(h["step"], h["val_ppl"]) for h in m["history"]],
                         "config": config.to_dict()}
        print(f"{name}: val ppl {m['val_ppl']:.1f}", flush=True)
        atomic_write_json(prefix.with_suffix(".json"), results)
    dense = results.get("dense", {}).get("val_ppl")
    rows = [[name, r["rank"], f"{r['lr']:g}", r["val_ppl"],
             None if dense is None else f"{100 * (r['val_ppl'] / dense - 1):+.1f}%",
             " ".join(f"{v:.0f}" for _, v in r["curve"]), r["tokens_per_s"]]
            for name, r in results.items()]
    table = markdown_table(["variant", "rank", "lr", "val ppl", "vs dense", "val ppl curve",
                            "train tokens/s"], rows)
    took = "" if args.report else f"; {time.perf_counter() - t_all:.0f} s in all"
    text = (f"Shakespeare, Z = {args.states}, hidden {args.hidden}, {args.epochs} epoch(s) of "
            f"batches of <= 4096 tokens, seed 0{took}; {machine_description()}\n\n{table}\n")
    print("\n" + text)
    atomic_write_bytes(prefix.with_suffix(".md"), text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
