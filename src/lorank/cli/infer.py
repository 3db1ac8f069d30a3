"""``lorank eval`` and ``lorank sample``: a trained (or compressed) run from its files alone."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from lorank.tasks import load_run
from lorank.train.distributed import DistContext, resolve_device
from lorank.train.trainer import TrainConfig, Trainer

SPLITS = ("train", "valid", "test")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint file, a run directory, or a `lorank "
                                      "compress` output directory")
    p.add_argument("--split", default="valid,test", help="comma-separated splits")
    p.add_argument("--corpus", default=None, help="override the data source of the run")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON")


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint file, a run directory, or a `lorank "
                                      "compress` output directory")
    p.add_argument("--num", type=int, default=5)
    p.add_argument("--max-length", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def cmd_eval(args: argparse.Namespace) -> int:
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ValueError(f"unknown split(s) {bad or splits}: use train, valid or test")
    cfg = TrainConfig(batch_size=args.batch_size, max_tokens=args.max_tokens, progress=False)
    dev = resolve_device(args.device)
    task, model, meta = load_run(args.checkpoint, device=dev, data=True, corpus=args.corpus)
    trainer = Trainer(task, cfg, DistContext(device=dev))
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "task": task.name}
    if meta.get("kind") == "lorank":  # written by lorank compress
        result["compressed"] = True
    result.update(task.summary(model))
    for split in splits:
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


def cmd_sample(args: argparse.Namespace) -> int:
    if args.num < 1 or args.max_length < 1:
        raise ValueError(f"--num and --max-length must be positive, got {args.num} and "
                         f"{args.max_length}")
    task, model, _ = load_run(args.checkpoint, device=resolve_device(args.device))
    gen = torch.Generator().manual_seed(args.seed)
    for line in task.sample(model, args.num, args.max_length, gen):
        print(line)
    return 0


__all__ = ["add_eval_arguments", "add_sample_arguments", "cmd_eval", "cmd_sample"]
