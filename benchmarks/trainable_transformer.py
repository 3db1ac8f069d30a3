"""Small transformer LM pretrained from scratch on Shakespeare: dense vs low-rank vs SLTrain.

A GPT-style decoder (pre-LayerNorm, causal attention, GELU MLP, tied embeddings) on
``lorank.data.text.load_corpus("shakespeare")``.  Every run sees the same token windows in
the same order.  The linear layers of attention and MLP (q, k, v, o, fc1, fc2) are:

* **dense**: ``nn.Linear``;
* **low-rank r**: ``B A`` only, as ``LowRankLinear`` layers initialized by the truncated SVD
  of the dense initialization (``lorank.compress.compress`` of the fresh model: the
  "spectral" initialization of factorized layers);
* **low-rank B=0 r**: ``B A`` only with SLTrain's initialization and scale
  (``SLTrainLinear`` with an empty sparse part), so that the sparse part is the only
  difference from SLTrain;
* **SLTrain r + d**: ``scale * B A + S`` with S on a fixed random support of density d
  (``lorank.compress.sltrain``).

Reported: validation perplexity, parameters, peak training memory and training tokens/s.
Peak training memory is counted, not sampled: the bytes of the parameters, their gradients
and AdamW's two state tensors, plus the largest total of the tensors autograd holds for the
backward pass during one training step (``torch.autograd.graph.saved_tensors_hooks``, each
storage counted once, parameters excluded).

    python benchmarks/trainable_transformer.py        # writes trainable_transformer.{json,md,png}
    python benchmarks/trainable_transformer.py --quick
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import finish, footer, new_axes, run_info, save_figure
from torch import nn

from lorank.compress import CompressConfig, SLTrainConfig, compress, count_parameters, sltrain
from lorank.data.text import load_corpus

HERE = Path(__file__).resolve().parent
TARGETS = ["q", "k", "v", "o", "fc1", "fc2"]


class Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (lin(h).view(b, t, self.heads, -1).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, context: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads, 4 * d) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, x):
        h = self.tok(x) + self.pos.weight[: x.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        return self.ln(h) @ self.tok.weight.mT  # tied output layer


def windows(ids: torch.Tensor, context: int, batch: int, steps: int, seed: int):
    """``steps`` batches of (input, target) windows at random offsets, the same for every run."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - context - 1, (batch,), generator=gen)
        x = torch.stack([ids[s: s + context + 1] for s in starts.tolist()])
        yield x[:, :-1], x[:, 1:]


def loss_of(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, context: int, batch: int = 32) -> float:
    model.eval()
    n = (ids.numel() - 1) // context
    x = ids[: n * context].view(n, context)
    y = ids[1: n * context + 1].view(n, context)
    total = 0.0
    for i in range(0, n, batch):
        logits = model(x[i: i + batch])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       y[i: i + batch].reshape(-1), reduction="sum"))
    model.train()
    return math.exp(total / y.numel())


def training_memory(model, opt, x, y) -> dict[str, int]:
    """Bytes of parameters, gradients, optimizer state and the peak of tensors saved for the
    backward pass in one training step (see the module docstring)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    live: dict[int, int] = {}
    peak = 0

    def pack(t):
        nonlocal peak
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in live:
            live[ptr] = t.untyped_storage().nbytes()
            peak = max(peak, sum(live.values()))
        return t

    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, x, y)
    loss.backward()
    p_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                  if p.grad is not None)
    opt_bytes = 2 * p_bytes  # AdamW: exp_avg and exp_avg_sq, one of each per parameter
    opt.zero_grad(set_to_none=True)
    return {"params": p_bytes, "grads": g_bytes, "optimizer": opt_bytes,
            "activations": peak, "total": p_bytes + g_bytes + opt_bytes + peak}


def run(name: str, model: nn.Module, args, data) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) *
        (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    train, valid = data
    batches = list(windows(train, args.context, args.batch, args.steps, args.seed))
    mem = training_memory(model, opt, *batches[0])
    model.train()
    t0 = time.perf_counter()
    losses = []
    for step, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"  {name} step {step + 1}/{args.steps}: loss "
                  f"{sum(losses[-20:]) / len(losses[-20:]):.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    seconds = time.perf_counter() - t0
    ppl = perplexity(model, valid, args.context)
    blocks = sum(p.numel() for p in model.blocks.parameters())
    row = {"name": name, "params": count_parameters(model), "block_params": blocks,
           "val_ppl": ppl, "train_seconds": seconds,
           "tokens_per_second": args.steps * args.batch * args.context / seconds,
           "memory": mem, "final_train_loss": sum(losses[-20:]) / len(losses[-20:])}
    print(f"{name}: val ppl {ppl:.1f}, {row['params']:,} params ({blocks:,} in blocks), "
          f"{row['tokens_per_second']:.0f} tokens/s, training memory "
          f"{mem['total'] / 2**20:.1f} MiB", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--vocab", type=int, default=5000)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--density", type=float, default=0.03)
    ap.add_argument("--rank", type=int, default=None, help="SLTrain rank (default width/4)")
    ap.add_argument("--small-rank", type=int, default=None,
                    help="SLTrain rank of the second pair (default width/8)")
    ap.add_argument("--eval-tokens", type=int, default=40000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="run only these names")
    ap.add_argument("--out", default=str(HERE / "trainable_transformer"))
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.width, args.eval_tokens = 20, 64, 4000
    torch.set_num_threads(args.threads)
    t_start = time.time()
    corpus = load_corpus("shakespeare", vocab_size=args.vocab)
    vocab = len(corpus.vocab.itos)
    data = (corpus.train, corpus.valid[: args.eval_tokens])
    d = args.width
    r_big = args.rank or d // 4
    r_small = args.small_rank or d // 8

    def fresh():
        torch.manual_seed(args.seed)
        return GPT(vocab, d, args.layers, args.heads, args.context)

    def equal_rank(r_sl: int) -> int:
        """Rank of B A alone with (about) the parameters of SLTrain at rank r_sl."""
        shapes = [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]
        sl = sum(r_sl * (m + n) + round(args.density * m * n) for m, n in shapes)
        return round(sl / sum(m + n for m, n in shapes))

    def sl(r: int, density: float):
        return sltrain(fresh(), SLTrainConfig(rank=r, density=density, alpha=args.alpha,
                                              target_modules=TARGETS, seed=args.seed))

    def spectral(r: int):
        return compress(fresh(), CompressConfig(rank=r, target_modules=TARGETS,
                                                measure_latency=False))[0]

    runs = [("dense", fresh)]
    for r in (r_small, r_big):
        r_lr = equal_rank(r)
        runs += [(f"low-rank r={r_lr}", lambda r_lr=r_lr: spectral(r_lr)),
                 (f"low-rank B=0 r={r_lr}", lambda r_lr=r_lr: sl(r_lr, 0.0)),
                 (f"SLTrain r={r} + {args.density:.0%}", lambda r=r: sl(r, args.density))]
    rows = []
    print(f"Shakespeare: {corpus.train.numel():,} train tokens, vocab {vocab}; "
          f"{args.steps} steps of {args.batch}x{args.context} tokens", flush=True)
    for name, make in runs:
        if args.only is None or name in args.only:
            rows.append(run(name, make(), args, data))
    result = {"corpus": "shakespeare (lorank.data.text.load_corpus)", "vocab": vocab,
              "train_tokens_seen": args.steps * args.batch * args.context,
              "eval_tokens": int(data[1].numel()),
              "model": {"width": d, "layers": args.layers, "heads": args.heads,
                        "context": args.context, "mlp": 4 * d},
              "steps": args.steps, "batch": args.batch, "lr": args.lr, "alpha": args.alpha,
              "density": args.density, "rows": rows,
              **run_info("benchmarks/trainable_transformer.py", argv, args.threads, t_start)}
    finish(args.out, result, to_markdown, plot)
    return 0


def to_markdown(res: dict) -> str:
    m = res["model"]
    lines = [
        f"GPT-style LM (width {m['width']}, {m['layers']} layers, {m['heads']} heads, MLP "
        f"{m['mlp']}, context {m['context']}, tied embeddings, vocab {res['vocab']}) pretrained "
        f"from scratch for {res['steps']} AdamW steps (lr {res['lr']:g}, warmup + cosine) of "
        f"{res['batch']}x{m['context']} tokens ({res['train_tokens_seen']:,} tokens, the same "
        f"windows for every run); validation perplexity on {res['eval_tokens']:,} tokens.  "
        f"Low-rank and SLTrain replace q, k, v, o, fc1, fc2 (SLTrain scale alpha/r, alpha "
        f"{res['alpha']:g}).",
        "",
        "| model | params | block params | val ppl | vs dense | training memory MiB "
        "(activations) | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    dense = next((r for r in res["rows"] if r["name"] == "dense"), None)
    for r in res["rows"]:
        rel = f"{100 * (r['val_ppl'] / dense['val_ppl'] - 1):+.1f}%" if dense else "-"
        mem = r["memory"]
        lines.append(f"| {r['name']} | {r['params']:,} | {r['block_params']:,} | "
                     f"{r['val_ppl']:.1f} | {rel} | {mem['total'] / 2**20:.1f} "
                     f"({mem['activations'] / 2**20:.1f}) | {r['tokens_per_second']:.0f} |")
    return "\n".join([*lines, "", footer(res)])


def plot(res: dict, path: Path) -> None:
    made = new_axes()
    if made is None:
        return
    fig, ax = made
    for prefix, marker in [("dense", "*"), ("low-rank r", "o"), ("low-rank B=0", "v"),
                           ("SLTrain", "s")]:
        sub = sorted((r for r in res["rows"] if r["name"].startswith(prefix)),
                     key=lambda r: r["block_params"])
        if sub:
            ax.plot([r["block_params"] for r in sub], [r["val_ppl"] for r in sub],
                    marker=marker, ls="-", label=prefix.removesuffix(" r"),
                    markersize=9 if marker == "*" else 6)
    ax.set_xscale("log")
    ax.minorticks_off()
    xs = sorted({r["block_params"] for r in res["rows"] if not r["name"].startswith("low")})
    ax.set_xticks(xs, [f"{x / 1e3:.0f}k" for x in xs])
    dense = [r for r in res["rows"] if r["name"] == "dense"]
    if dense:
        ax.axhline(dense[0]["val_ppl"], color="gray", ls=":", lw=1)
    ax.set_xlabel("parameters in the transformer blocks")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Transformer LM pretrained on Shakespeare")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
