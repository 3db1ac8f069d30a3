"""Where a training step of an HMM language model spends its time: the emission head against
the transition and the chain, dense HMM vs LHMM, as the number of states grows.

Explains the frontier (``benchmarks/frontier.py``): at a fixed wall-clock budget on a CPU, a
model with more states takes fewer steps, and the part of the step that the low-rank
transition does not touch (the emission head: an MLP over the Z state embeddings and a
softmax over the vocabulary for every state, O(Z h V)) sets the floor of the LHMM's cost.

For each model it times, on one batch of ``--batch-size`` x ``--length`` tokens of the
Shakespeare training text (forward + backward, best of ``--reps`` interleaved runs, 1 thread):

* ``step``: the whole training loss ``-log p(x)`` and its backward (no optimizer update);
* ``emission``: the emission head alone, ``emission(state_emb, x)`` (B, T, Z) and a backward
  of its sum (the same kernels as in the step);
* ``chain``: the rest, the transition factor built from the network and the forward algorithm
  with its backward, on fixed emissions.

    python benchmarks/step_costs.py            # writes benchmarks/step_costs.{json,md}
    python benchmarks/step_costs.py --quick    # tiny sizes (smoke test)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from _common import alternating_min_ms, machine_description, write_outputs

from lorank.data import load_corpus
from lorank.distributions.hmm import HMM
from lorank.nn.hmm import HMMLanguageModel

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", default="256,512,1024,2048", help="dense HMM sizes Z")
    p.add_argument("--lhmm", default="1024,2048,4096,8192", help="LHMM sizes Z (R = Z/8)")
    p.add_argument("--rank-divisor", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "step_costs"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.dense, args.lhmm, args.vocab_size, args.hidden = "16,32", "32", 200, 16
        args.batch_size, args.length, args.reps = 4, 8, 1
        args.out = str(Path("/tmp") / "step_costs_quick")
    return args


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def batch(vocab_size: int, b: int, t: int) -> torch.Tensor:
    """``b`` windows of ``t`` tokens of the Shakespeare training split (fixed offsets)."""
    corpus = load_corpus("shakespeare", vocab_size=vocab_size)
    stream = corpus.train
    starts = torch.linspace(0, stream.numel() - t - 1, b).long()
    return torch.stack([stream[s:s + t] for s in starts.tolist()])


def costs(model: HMMLanguageModel, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Milliseconds of the step and of its two parts (best of ``reps`` interleaved runs)."""
    model.train()
    emb = model.state_emb

    def step():
        model.zero_grad(set_to_none=True)
        (-model(x).log_partition.sum()).backward()

    def emission():
        model.zero_grad(set_to_none=True)
        model.emission(emb, x).sum().backward()

    with torch.no_grad():
        em_fixed = model.emission(emb, x)

    def chain():
        model.zero_grad(set_to_none=True)
        trans = model.transition_net.factor(emb)
        (-HMM(model.init_logits(), trans, em_fixed).log_partition.sum()).backward()

    ms = alternating_min_ms([step, emission, chain], reps, warmup=1)
    return dict(zip(("step", "emission", "chain"), ms, strict=True))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    x = batch(args.vocab_size, args.batch_size, args.length)
    rows = []
    grid = [("hmm", z, None) for z in ints(args.dense)]
    grid += [("lhmm", z, z // args.rank_divisor) for z in ints(args.lhmm)]
    for kind, z, r in grid:
        torch.manual_seed(0)
        model = HMMLanguageModel(vocab_size=args.vocab_size, num_states=z, model=kind, rank=r,
                                 hidden=args.hidden)
        c = costs(model, x, args.reps)
        rows.append({"model": kind, "states": z, "rank": r, **c})
        print(f"{kind} Z={z} R={r}: step {c['step']:.0f} ms, emission {c['emission']:.0f} ms, "
              f"chain {c['chain']:.0f} ms", flush=True)
    result = {"command": "python benchmarks/step_costs.py" + "".join(
                  f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
              "machine": machine_description(), "tokens": x.numel(),
              "batch": [args.batch_size, args.length], "hidden": args.hidden,
              "vocab_size": args.vocab_size, "rows": rows, "seconds": time.time() - t0}
    write_outputs(args.out, result, to_markdown(result))
    return 0


def to_markdown(res: dict) -> str:
    lines = [
        f"One training step's forward + backward on {res['tokens']:,} tokens "
        f"({res['batch'][0]} x {res['batch'][1]}), vocabulary {res['vocab_size']:,}, "
        f"embedding {res['hidden']}; best of interleaved runs; {res['machine']}.",
        "",
        "| model | states | rank | step ms | emission ms | chain ms | emission share |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        share = r["emission"] / max(r["emission"] + r["chain"], 1e-9)
        lines.append(f"| {r['model']} | {r['states']:,} | {r['rank'] or '-'} | {r['step']:.0f} | "
                     f"{r['emission']:.0f} | {r['chain']:.0f} | {share:.0%} |")
    lines += ["", f"Command: `{res['command']}` ({res['seconds'] / 60:.1f} min)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
