"""Polyphonic music: dense HMM vs LHMM at several ranks on piano rolls, with the
independent-keys baseline, NLL per time step (nats) and time per epoch; a table and a plot.

Every model trains through the library's trainer (``lorank.train.Trainer`` with the
``music`` task, exactly what ``lorank train --task music`` runs) for the same number of
epochs on a corpus, is evaluated on the validation split after each epoch, and the best
validation model is scored on the test split.  The baseline is
:func:`lorank.baselines.fit_independent_keys` (per-key Bernoulli marginals, smoothing chosen
on valid).

    python benchmarks/music_experiments.py                       # bach and folk, ~20 min
    python benchmarks/music_experiments.py --corpora bach --epochs 2 --out /tmp/m   # smoke run

Defaults: Z = 512 states, the dense HMM and LHMMs of rank Z/4, Z/8, Z/16, state embeddings
of size 128, AdamW 1e-2 halved on a validation plateau, 16 pieces per batch, 60 epochs on
bach and 15 on folk, one torch thread.  Time per epoch is reported twice: the wall time of
training (which other jobs on a shared machine inflate) and the CPU time of one epoch's
forward and backward passes (minimum of ``--timing-reps`` runs per batch; with one thread,
other processes add nothing to it).

Writes ``music_experiments.json``, ``music_experiments.md`` and ``music_experiments.png``
next to this file (``--out DIR``: there instead); run directories (checkpoints,
``metrics.json``) go under ``--runs`` (default ``runs/music_experiments``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from _common import machine_description

from lorank._io import atomic_write_bytes, atomic_write_json
from lorank.nn.hmm import MusicHMMConfig
from lorank.tasks.music import MusicDataConfig, MusicTask
from lorank.train.metrics import markdown_table
from lorank.train.trainer import TrainConfig, Trainer

HERE = Path(__file__).resolve().parent


def model_grid(states: int, divisors: list[int], dense: bool = True) -> list[dict]:
    """The dense HMM and LHMMs of rank ``states / d`` for each divisor d."""
    out = [{"name": "hmm", "model": "hmm", "rank": None}] if dense else []
    for d in divisors:
        r = max(1, states // d)
        out.append({"name": f"lhmm_r{r}", "model": "lhmm", "rank": r})
    return out


def cpu_seconds(fn, reps: int) -> float:
    """Minimum CPU time (``time.process_time``) of ``fn()`` over ``reps`` runs after one
    warm-up.  With one torch thread this is the work itself: other processes on a shared
    machine slow the wall clock (time slicing) but add no CPU time to this process."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def timed_epoch_seconds(task: MusicTask, model: torch.nn.Module, args) -> float:
    """CPU seconds of one training epoch's forward and backward passes (:func:`cpu_seconds`
    per batch; every ``--timing-stride``-th batch, scaled up to the epoch's time steps)."""
    model.train()
    batches = list(task.batches("train", batch_size=args.batch_size,
                                max_tokens=args.max_steps_per_batch))
    picked = batches[:: args.timing_stride]
    seconds = 0.0
    for batch in picked:

        def step(batch=batch):
            model.zero_grad(set_to_none=True)
            task.nll(model, batch, None).backward()

        seconds += cpu_seconds(step, args.timing_reps)
    model.zero_grad(set_to_none=True)
    units = sum(task.count(b) for b in batches)
    return seconds * units / sum(task.count(b) for b in picked)


def run_one(corpus: str, spec: dict, args, epochs: int) -> dict:
    """Train one model; return its row (metrics of the best validation checkpoint)."""
    model_config = MusicHMMConfig(
        model=spec["model"], num_states=args.states, rank=spec["rank"], hidden=args.hidden,
        mlp_layers=args.mlp_layers, emission_layers=args.emission_layers,
        state_dropout=args.state_dropout,
        low_rank_form=args.low_rank_form if spec["model"] != "hmm" else "kernel")
    task = MusicTask(MusicDataConfig(corpus=corpus, max_pieces=args.max_pieces), model_config)
    cfg = TrainConfig(
        out=os.path.join(args.runs, corpus, spec["name"]),
        epochs=epochs,
        batch_size=args.batch_size,
        max_tokens=args.max_steps_per_batch,
        eval_batch_size=256,
        eval_max_tokens=32768,
        lr=args.lr,
        clip=5.0,
        patience=args.patience,
        eval_per_epoch=1,
        eval_test=True,
        seed=args.seed,
        overwrite=True,
        progress=not args.no_progress,
        threads=args.threads,
    )
    t0 = time.perf_counter()
    trainer = Trainer(task, cfg)
    m = trainer.fit()
    wall = time.perf_counter() - t0
    epoch_s = timed_epoch_seconds(task, trainer.model, args)
    row = {
        "corpus": corpus,
        "name": spec["name"],
        "model": m["model"],
        "states": m["num_states"],
        "rank": m["rank"],
        "params": m["params"],
        "epochs": m["epochs"],
        "val_nll_per_step": m["val_nll_per_step"],
        "test_nll_per_step": m.get("test_nll_per_step"),
        "best_epoch": next((h["epoch"] for h in m["history"] if h["step"] == m["best_step"]),
                           None),
        "train_seconds": m["train_seconds"],
        "wall_seconds_per_epoch": m["train_seconds"] / max(m["epochs"], 1e-9),
        "seconds_per_epoch": epoch_s,
        "steps_per_s": m["time_steps_per_s"],
        "wall_seconds": wall,
        "history": [{"epoch": h["epoch"], "val_nll_per_step": h["val_nll_per_step"],
                     "train_nll_per_step": h["train_nll_per_step"]}
                    for h in m["history"]],
        "baseline": m["baselines"]["independent_keys"],
        "pieces": m["pieces"],
    }
    print(f"{corpus} {spec['name']}: val {row['val_nll_per_step']:.3f}, test "
          f"{row['test_nll_per_step']:.3f} nats/step; {row['seconds_per_epoch']:.2f} CPU s/epoch, "
          f"{row['steps_per_s']:,.0f} steps/s", flush=True)
    return row


def table(rows: list[dict]) -> str:
    """The results as a markdown table (baseline first, then the models, per corpus)."""
    header = ["corpus", "model", "states", "rank", "params", "epochs (best)", "val NLL/step",
              "test NLL/step", "CPU s/epoch", "wall s/epoch"]
    body = []
    for corpus in dict.fromkeys(r["corpus"] for r in rows):
        base = next(r["baseline"] for r in rows if r["corpus"] == corpus)
        body.append([corpus, f"independent keys (alpha {base['alpha']:g})", "-", "-", "88",
                     "-", f"{base['val_nll_per_step']:.2f}",
                     f"{base.get('test_nll_per_step', float('nan')):.2f}", "-", "-"])
        for r in rows:
            if r["corpus"] == corpus:
                body.append([corpus, r["model"], str(r["states"]), str(r["rank"] or "-"),
                             f"{r['params']:,}",
                             f"{r['epochs']:.0f} ({r['best_epoch'] or 0:.0f})",
                             f"{r['val_nll_per_step']:.2f}", f"{r['test_nll_per_step']:.2f}",
                             f"{r['seconds_per_epoch']:.2f}",
                             f"{r['wall_seconds_per_epoch']:.2f}"])
    return markdown_table(header, body)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed; no plot")
        return
    corpora = list(dict.fromkeys(r["corpus"] for r in rows))
    fig, axes = plt.subplots(1, len(corpora), figsize=(5.5 * len(corpora), 4), squeeze=False)
    for ax, corpus in zip(axes[0], corpora, strict=True):
        sub = [r for r in rows if r["corpus"] == corpus]
        for r in sub:
            label = r["model"] + (f" R={r['rank']}" if r["rank"] else "") + f" Z={r['states']}"
            xs = [h["epoch"] for h in r["history"]]
            ax.plot(xs, [h["val_nll_per_step"] for h in r["history"]], marker=".", label=label)
        ax.axhline(sub[0]["baseline"]["val_nll_per_step"], color="gray", ls="--",
                   label="independent keys")
        ax.set_title(f"{corpus}: validation NLL per time step")
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats / step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpora", nargs="+", default=["bach", "folk"])
    ap.add_argument("--states", type=int, default=512, help="Z (default 512)")
    ap.add_argument("--rank-divisors", type=int, nargs="+", default=[4, 8, 16],
                    help="LHMM ranks Z/d (default 4 8 16)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense HMM")
    ap.add_argument("--epochs", type=int, nargs="+", default=None,
                    help="epochs per corpus, in --corpora order (default bach 60, folk 15)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--mlp-layers", type=int, default=2)
    ap.add_argument("--emission-layers", type=int, default=1)
    ap.add_argument("--state-dropout", type=float, default=0.0)
    ap.add_argument("--low-rank-form", default="kernel", help="kernel or mixture (LHMMs)")
    ap.add_argument("--batch-size", type=int, default=16, help="pieces per batch")
    ap.add_argument("--max-steps-per-batch", type=int, default=4096,
                    help="cap on pieces x longest piece per batch")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--patience", type=int, default=1,
                    help="epochs without improvement before the lr is halved")
    ap.add_argument("--max-pieces", type=int, default=None, help="subset, for smoke runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a busy 2-core machine 2 threads are "
                         "many times slower)")
    ap.add_argument("--timing-reps", type=int, default=2,
                    help="runs per batch in the CPU-time epoch timing (the minimum counts)")
    ap.add_argument("--timing-stride", type=int, default=1,
                    help="time every k-th training batch (scaled to the epoch)")
    ap.add_argument("--runs", default="runs/music_experiments")
    ap.add_argument("--out", type=Path, default=HERE, help="where the json/md/png go")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    default_epochs = {"bach": 60, "folk": 15}
    if args.epochs is None:
        epochs = [default_epochs.get(c, 5) for c in args.corpora]
    elif len(args.epochs) == 1:
        epochs = args.epochs * len(args.corpora)
    elif len(args.epochs) == len(args.corpora):
        epochs = args.epochs
    else:
        ap.error(f"--epochs takes one value or one per corpus ({len(args.corpora)}), got "
                 f"{len(args.epochs)}")
    torch.set_num_threads(args.threads)
    grid = model_grid(args.states, args.rank_divisors, dense=not args.no_dense)
    machine = machine_description()
    print(machine, flush=True)
    rows = []
    t0 = time.perf_counter()
    for corpus, ep in zip(args.corpora, epochs, strict=True):
        for spec in grid:
            rows.append(run_one(corpus, spec, args, ep))
    total = time.perf_counter() - t0
    md = table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    atomic_write_json(args.out / "music_experiments.json", {
        "machine": machine, "settings": settings,
        "epochs": dict(zip(args.corpora, epochs, strict=True)),
        "total_seconds": total, "rows": rows,
    })
    head = (f"Machine: {machine}. Total {total / 60:.1f} min. Epochs: "
            + ", ".join(f"{c} {e}" for c, e in zip(args.corpora, epochs, strict=True)) + ".")
    atomic_write_bytes(args.out / "music_experiments.md", f"{head}\n\n{md}\n".encode())
    print("\n" + head + "\n\n" + md)
    plot(rows, args.out / "music_experiments.png")
    for corpus in dict.fromkeys(r["corpus"] for r in rows):
        sub = [r for r in rows if r["corpus"] == corpus and r["model"] == "lhmm"]
        base = next(r["baseline"]["val_nll_per_step"] for r in rows if r["corpus"] == corpus)
        if sub:
            best = min(sub, key=lambda r: r["val_nll_per_step"])
            verdict = "beats" if best["val_nll_per_step"] < base else "does NOT beat"
            print(f"{corpus}: the best LHMM (R={best['rank']}, val {best['val_nll_per_step']:.3f})"
                  f" {verdict} independent keys (val {base:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
