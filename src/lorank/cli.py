"""The ``lorank`` command line: ``train``, ``eval``, ``sample`` and ``compress``.

``lorank train`` with no ``--model`` is the main job: it trains the dense softmax HMM and the
LHMM on the built-in Shakespeare corpus (or ``--corpus``) with a budget that fits in about ten
minutes on two CPU cores (measured: 6 minutes, docs/results.md), then prints perplexity and
speed next to unigram and bigram baselines.  With ``--model`` it trains one model.
Multi-process data parallelism::

    torchrun --nproc_per_node 2 -m lorank.cli train --model lhmm --states 1024 ...

(gloo on CPU, nccl on GPU; ``--batch-size`` is per process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

#: the main job: ``lorank train`` without --model
MAIN_JOB = {
    "models": ("hmm", "lhmm"),
    "states": 1024,
    "rank": 128,
    "hidden": 128,
    "epochs": 2,  # on Shakespeare: 2 x 203 steps of <= 4096 tokens
    "max_steps": None,
    "batch_size": 1024,
    "max_tokens": 4096,
    "lr": 1e-2,
    "eval_every": 50,
    "out": "runs/main",
}


class CLIError(Exception):
    """A usage error reported as ``lorank: error: ...`` with exit status 2."""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--out", default=None, help="output directory (default runs/<model>)")
    g.add_argument("--epochs", type=_positive_int, default=None,
                   help="passes over the training data (default 1; the main job: 2)")
    g.add_argument("--max-steps", type=_positive_int, default=None,
                   help="stop after this many optimizer steps")  # fmt: skip
    g.add_argument("--batch-size", type=_positive_int, default=None,
                   help="sequences per batch and process (default 1024; --max-tokens binds first "
                        "for all but the shortest sequences)")
    g.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="cap on padded tokens (sequences x longest) per batch (default 4096)")
    g.add_argument("--accumulate", type=_positive_int, default=1,
                   help="batches per optimizer step (per process)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-2)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip", type=float, default=5.0, help="gradient-norm clipping")
    g.add_argument("--lr-factor", type=float, default=0.5,
                   help="reduce-on-plateau factor")  # fmt: skip
    g.add_argument("--patience", type=int, default=1,
                   help="evaluations without improvement before the lr is reduced")
    g.add_argument("--eval-per-epoch", type=_positive_int, default=4)
    g.add_argument("--eval-every", type=_positive_int, default=None,
                   help="steps between evaluations (overrides --eval-per-epoch)")
    g.add_argument("--checkpoint-every", type=_positive_int, default=None,
                   help="also checkpoint every this many steps")
    g.add_argument("--no-test", action="store_true", help="skip the final test evaluation")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.safetensors")
    g.add_argument("--overwrite", action="store_true",
                   help="start over even if <out> holds a checkpoint")
    g.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1")
    g.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser(task_name: str | None = None) -> argparse.ArgumentParser:
    from lorank.train.tasks import load_task_modules

    TASKS = load_task_modules()
    parser = argparse.ArgumentParser(
        prog="lorank", description="Low-rank structured models: train, evaluate, sample, compress."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    tp = sub.add_parser("train", help="train a model (no --model: the HMM vs LHMM main job)",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tp.add_argument("--task", default="lm", choices=sorted(TASKS),
                    help="what to train (default lm: HMM language models)")  # fmt: skip
    _add_train_arguments(tp)
    if task_name in TASKS:
        TASKS[task_name].add_arguments(tp)

    ep = sub.add_parser("eval", help="evaluate a checkpoint on valid/test")
    ep.add_argument("checkpoint", help="a checkpoint file or a run directory")
    ep.add_argument("--split", default="valid,test", help="comma-separated splits")
    ep.add_argument("--corpus", default=None, help="override the data source of the run")
    ep.add_argument("--batch-size", type=_positive_int, default=128)
    ep.add_argument("--max-tokens", type=_positive_int, default=4096)
    ep.add_argument("--device", default="auto")
    ep.add_argument("--json", action="store_true", help="print JSON")

    sp = sub.add_parser("sample", help="generate from a checkpoint")
    sp.add_argument("checkpoint", help="a checkpoint file or a run directory")
    sp.add_argument("--num", type=_positive_int, default=5)
    sp.add_argument("--max-length", type=_positive_int, default=40)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="auto")

    from lorank.compress.cli import add_parser as add_compress_parser

    add_compress_parser(sub)
    return parser


# --------------------------------------------------------------------------------------------
# train


def _train_config(args, out: str, **defaults):
    from lorank.train.trainer import TrainConfig

    def pick(name, fallback):
        v = getattr(args, name)
        return defaults.get(name, fallback) if v is None else v

    return TrainConfig(
        out=out,
        epochs=pick("epochs", 1),
        max_steps=pick("max_steps", None),
        batch_size=pick("batch_size", 1024),
        max_tokens=pick("max_tokens", 4096),
        accumulate=args.accumulate,
        lr=pick("lr", 1e-2),
        weight_decay=args.weight_decay,
        clip=args.clip,
        lr_factor=args.lr_factor,
        patience=args.patience,
        eval_per_epoch=args.eval_per_epoch,
        eval_every=pick("eval_every", None),
        eval_test=not args.no_test,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite or defaults.get("overwrite", False),
        device=args.device,
        progress=not args.no_progress,
        threads=args.threads,
    )


def _make_task(args):
    from lorank.train.tasks import get_task

    cls = get_task(args.task)
    data_config, model_config = cls.configs_from_args(args)
    check = getattr(cls, "check_model_config", None)
    if check is not None:
        check(model_config)
    return cls(data_config, model_config)


def _check_corpus(args) -> None:
    """Fail fast (before any training) on a corpus path that does not exist."""
    if getattr(args, "task", "lm") not in ("lm", "pcfg"):
        return  # not a text corpus (music: 'bach', 'folk', ...): the task's loader checks it
    corpus = getattr(args, "corpus", None)
    if corpus and corpus.lower() not in ("shakespeare", "ptb") and not Path(corpus).exists():
        raise FileNotFoundError(
            f"corpus {corpus!r} not found: use 'shakespeare', 'ptb', or a directory holding "
            f"train.txt, valid.txt and test.txt"
        )


def cmd_train(args) -> int:
    from lorank.train.distributed import DistContext
    from lorank.train.trainer import Trainer

    _check_corpus(args)
    dist = DistContext.from_env(args.device)
    try:
        if args.task == "lm" and args.model is None:
            return _main_job(args, dist)
        task = _make_task(args)
        out = args.out or os.path.join("runs", task.model_config.get("model", args.task))
        trainer = Trainer(task, _train_config(args, out), dist)
        metrics = trainer.fit()
        if dist.is_main:
            _print_run(metrics, out)
        return 0
    finally:
        dist.close()


def _print_run(m: dict[str, Any], out: str) -> None:
    metric = m["metric"]
    unit = next((k for k in m if k.endswith("_per_s")), None)
    parts = [f"val {metric} {m.get(f'val_{metric}'):.2f}"]
    if m.get(f"test_{metric}") is not None:
        parts.append(f"test {metric} {m[f'test_{metric}']:.2f}")
    if unit:
        parts.append(f"{unit.replace('_per_s', '/s')} {m[unit]:,.0f}")
    parts.append(f"params {m.get('params', 0):,}")
    print(f"{m.get('model', m['task'])}: " + ", ".join(parts) + f"  ({out}/metrics.json)")


def _main_job(args, dist) -> int:
    """Dense HMM vs LHMM on one corpus, with baselines; prints and saves a table."""
    from lorank._io import atomic_write_bytes, atomic_write_json
    from lorank.train.metrics import markdown_table
    from lorank.train.trainer import Trainer

    job = MAIN_JOB
    out_root = args.out or job["out"]
    states = job["states"] if args.states is None else args.states
    rank = min(job["rank"], states) if args.rank is None else args.rank
    rows, results = [], {}
    task = None
    for name in job["models"]:
        args.model = name
        saved = (args.states, args.rank, args.hidden)
        args.states = states
        args.rank = rank if name != "hmm" else None
        args.hidden = args.hidden or job["hidden"]
        task = _make_task(args)
        args.states, args.rank, args.hidden = saved
        cfg = _train_config(args, os.path.join(out_root, name), overwrite=True, **{
            k: job[k] for k in ("epochs", "max_steps", "batch_size", "max_tokens", "lr",
                                "eval_every")
        })  # fmt: skip
        if dist.is_main:
            print(f"== {name}: {states} states" + (f", rank {rank}" if name != "hmm" else "")
                  + (f", {cfg.max_steps} steps" if cfg.max_steps else f", {cfg.epochs} epoch(s)")
                  + f" of batches of <= {cfg.max_tokens} tokens", flush=True)
        metrics = Trainer(task, cfg, dist).fit()
        results[name] = metrics
    args.model = None
    if not dist.is_main:
        return 0
    base = task.baselines()
    for bname, b in base.items():
        rows.append([f"{bname} (add-k {b['k']:g})", None, None, None, b["val_ppl"],
                     b["test_ppl"], None, None])  # fmt: skip
    for name, m in results.items():
        rows.append([name, m["states"], m["rank"], m["params"], m["val_ppl"], m.get("test_ppl"),
                     m["tokens_per_s"], m["train_seconds"]])  # fmt: skip
    header = ["model", "states", "rank", "params", "val ppl", "test ppl", "train tokens/s",
              "train s"]  # fmt: skip
    table = markdown_table(header, rows)
    corpus = task.data_config["corpus"]
    title = (f"{corpus}: {len(task.corpus.vocab)} words, {task.corpus.train.numel():,} training "
             f"tokens; device {dist.device}, world size {dist.world_size}")  # fmt: skip
    print("\n" + title + "\n\n" + table + "\n")
    lhmm, hmm = results.get("lhmm"), results.get("hmm")
    if lhmm and "bigram" in base:
        verdict = "beats" if lhmm["val_ppl"] < base["bigram"]["val_ppl"] else "does not beat"
        print(f"LHMM {verdict} the add-k bigram on validation perplexity "
              f"({lhmm['val_ppl']:.1f} vs {base['bigram']['val_ppl']:.1f}).")  # fmt: skip
    if lhmm and hmm and hmm["tokens_per_s"]:
        print(f"LHMM trains at {lhmm['tokens_per_s'] / hmm['tokens_per_s']:.2f}x the dense "
              f"HMM's tokens/s.")  # fmt: skip
    atomic_write_bytes(os.path.join(out_root, "summary.md"),
                       (f"{title}\n\n{table}\n").encode())  # fmt: skip
    atomic_write_json(os.path.join(out_root, "summary.json"), {
        "corpus": corpus, "baselines": base,
        "runs": {k: {f: v.get(f) for f in ("model", "states", "rank", "params", "val_ppl",
                                             "test_ppl", "tokens_per_s", "train_seconds")}
                 for k, v in results.items()},
    })  # fmt: skip
    return 0


# --------------------------------------------------------------------------------------------
# eval and sample


def _load_for_inference(path: str, device: str, data: bool, corpus: str | None = None):
    from lorank.train.checkpoint import load_checkpoint, model_state
    from lorank.train.distributed import resolve_device
    from lorank.train.tasks import get_task

    tensors, meta = load_checkpoint(path)
    cls = get_task(meta["task"])
    data_config = dict(meta["data_config"])
    if corpus is not None:
        data_config["corpus"] = corpus
    task = cls(data_config, meta["model_config"])
    task.checkpoint_meta = meta
    if data:
        task.load_data()
        task.check_metadata(meta)
    dev = resolve_device(device)
    model = task.build_model()
    model.load_state_dict(model_state(tensors))
    model.to(dev).eval()
    return task, model, meta, dev


def cmd_eval(args) -> int:
    from lorank.train.distributed import DistContext
    from lorank.train.trainer import TrainConfig, Trainer

    _check_corpus(args)
    task, model, meta, dev = _load_for_inference(args.checkpoint, args.device, True, args.corpus)
    cfg = TrainConfig(batch_size=args.batch_size, max_tokens=args.max_tokens, progress=False)
    trainer = Trainer(task, cfg, DistContext(device=dev))
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "task": task.name}
    result.update(task.summary(model))
    for split in [s.strip() for s in args.split.split(",") if s.strip()]:
        if split not in ("train", "valid", "test"):
            raise CLIError(f"unknown split {split!r}: use train, valid or test")
        r = trainer.evaluate(split, model)
        result[f"{split}_{task.metric}"] = r[task.metric]
        result[f"{split}_nll"] = r["nll"]
        result[f"{split}_{task.unit}"] = r["units"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def cmd_sample(args) -> int:
    import torch

    task, model, meta, _ = _load_for_inference(args.checkpoint, args.device, False)
    if "vocab" in meta.get("task_meta", {}):
        task.vocab_itos = meta["task_meta"]["vocab"]
    gen = torch.Generator().manual_seed(args.seed)
    for line in task.sample(model, args.num, args.max_length, gen):
        print(line)
    return 0


def cmd_compress(args) -> int:
    from lorank.compress.cli import run

    return run(args)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "compress": cmd_compress}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # two-phase parsing: a task's own options are added once --task is known
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="lm")
    known, _ = pre.parse_known_args(argv[1:] if argv and argv[0] == "train" else [])
    parser = build_parser(known.task)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError,
            NotImplementedError) as e:
        parser.exit(2, f"lorank: error: {e}\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
