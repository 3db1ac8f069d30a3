"""``lorank train``: one run, the main job (two presets), and resuming a run from its own
settings."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from lorank._io import atomic_write_bytes, atomic_write_json
from lorank.cli.options import add_config_options, build, given
from lorank.config import Config
from lorank.tasks import TASKS, get_task, task_from_meta
from lorank.tasks.base import Task
from lorank.train.checkpoint import CHECKPOINT_NAME, read_metadata
from lorank.train.distributed import DistContext
from lorank.train.metrics import markdown_table
from lorank.train.trainer import TrainConfig, Trainer

#: the main job (``lorank train`` with no --model): the dense HMM and the LHMM (R = Z/4), each
#: with the learning rate that gave it the best validation perplexity in this budget (2 epochs
#: of 203 steps of <= 4096 tokens on Shakespeare; docs/results.md)
MAIN_JOB_MODELS: dict[str, dict[str, dict[str, Any]]] = {
    "hmm": {"model": dict(model="hmm", num_states=1024, hidden=128), "train": dict(lr=1e-2)},
    "lhmm": {"model": dict(model="lhmm", num_states=1024, hidden=128), "train": dict(lr=5e-3)},
}
MAIN_JOB_TRAIN: dict[str, Any] = dict(out="runs/main", epochs=2, batch_size=1024,
                                      max_tokens=4096, eval_every=50)

#: named settings for ``lorank train --recipe NAME`` (task lm), applied under the user's
#: options; ``rank_divisor`` sets a low-rank model's rank to Z / divisor unless --rank is given
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    # Chiu, Deng & Rush (2021), github justinchiu/low-rank-models lhmm/scripts/hmm_commands.sh:
    # batches of 256 tokens, AdamW lr 1e-3, clip 5, lr / 4 after 4 checks without improvement
    # (4 checks per epoch), 30 epochs, state and feature dropout 0.1, R = Z / 16, d = 256
    "paper": {
        "train": dict(max_tokens=256, batch_size=256, lr=1e-3, clip=5.0, lr_factor=0.25,
                      patience=4, eval_per_epoch=4, epochs=30),
        "model": dict(num_states=16384, hidden=256, transition="embedding",
                      low_rank_form="kernel", state_dropout=0.1, feature_dropout=0.1,
                      rank_divisor=16),
    },
}


def add_arguments(parser: argparse.ArgumentParser, task_name: str) -> None:
    """The options of ``lorank train --task task_name``."""
    parser.add_argument("--task", default=argparse.SUPPRESS, choices=sorted(TASKS),
                        help="what to train (default lm: HMM language models; with --resume: "
                             "the run's own task)")
    parser.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                        help="named settings under your options (lm): paper = Chiu, Deng & "
                             "Rush (2021)'s PTB recipe (docs/results.md)")
    cls = get_task(task_name) if task_name in TASKS else get_task("lm")
    add_config_options(parser.add_argument_group("training"), TrainConfig)
    add_config_options(parser.add_argument_group(f"data (--task {cls.name})"),
                       cls.data_config_class)
    title = f"model (--task {cls.name})"
    if cls.name == "lm":
        title += "; without --model, the main job trains hmm and lhmm"
    add_config_options(parser.add_argument_group(title), cls.model_config_class)


def config_classes(task_name: str) -> tuple[type[Config], ...]:
    cls = get_task(task_name)
    return (TrainConfig, cls.data_config_class, cls.model_config_class)


def _recipe(args: argparse.Namespace, cls: type[Task]) -> tuple[dict, dict]:
    """The recipe's training and model fields (without a recipe: {}, {})."""
    name = getattr(args, "recipe", None)
    if name is None:
        return {}, {}
    if cls.name != "lm":
        raise ValueError(f"--recipe {name} applies to --task lm, not {cls.name}")
    return dict(RECIPES[name]["train"]), dict(RECIPES[name]["model"])


def _model_config(cls: type[Task], args: argparse.Namespace, *layers: dict[str, Any],
                  **fixed: Any) -> Config:
    """The model config from preset ``layers``, the user's options and ``fixed``; a layer's
    ``rank_divisor`` gives a low-rank model rank Z / divisor unless --rank is set."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    divisor = merged.pop("rank_divisor", None)
    config = build(cls.model_config_class, args, merged, **fixed)
    if divisor and config.rank is not None and "rank" not in given(type(config), args):
        config = config.replace(rank=max(1, config.num_states // divisor))
    return config


def _print_run(m: dict[str, Any], out: Path) -> None:
    metric = m["metric"]
    unit = next((k for k in m if k.endswith("_per_s")), None)
    parts = [f"val {metric} {m.get(f'val_{metric}'):.2f}"]
    if m.get(f"test_{metric}") is not None:
        parts.append(f"test {metric} {m[f'test_{metric}']:.2f}")
    if unit:
        parts.append(f"{unit.replace('_per_s', '/s')} {m[unit]:,.0f}")
    parts.append(f"params {m.get('params', 0):,}")
    print(f"{m.get('model', m['task'])}: " + ", ".join(parts) + f"  ({out}/metrics.json)")


def _resume_task(args: argparse.Namespace, out: Path) -> tuple[Task, TrainConfig]:
    """The task and training settings of the run in ``out``, with the options the user gave
    (settings that change the model or the data must match the run's)."""
    meta = read_metadata(out / CHECKPOINT_NAME)
    if getattr(args, "task", meta["task"]) != meta["task"]:
        raise ValueError(f"cannot resume {str(out)!r}: it is a {meta['task']!r} run, not "
                         f"--task {args.task}")
    task = task_from_meta(meta)
    mine = [(task.data_config, build(type(task.data_config), args, task.data_config)),
            (task.model_config, build(type(task.model_config), args, task.model_config))]
    for stored, wanted in mine:
        diff = wanted.differences(stored)
        if diff:
            shown = ", ".join(f"{f}={getattr(stored, f)!r} in the run, {getattr(wanted, f)!r} "
                              f"given" for f in diff)
            raise ValueError(f"cannot resume {str(out)!r} with different settings ({shown}): "
                             f"resume without these options, or start a new run elsewhere")
    task.model_config = build(type(task.model_config), args, task.model_config)  # compute-only
    train = TrainConfig.from_dict(meta["train_config"])
    return task, build(TrainConfig, args, train, out=str(out), resume=True, overwrite=False)


def cmd_train(args: argparse.Namespace) -> int:
    dist = DistContext.from_env(getattr(args, "device", "auto"))
    try:
        return _train(args, dist)
    finally:
        dist.close()


def _train(args: argparse.Namespace, dist: DistContext) -> int:
    cls = get_task(getattr(args, "task", "lm"))
    out = Path(args.out) if getattr(args, "out", None) else None
    resume = getattr(args, "resume", False)
    if resume:
        if out is None:
            raise ValueError("--resume needs --out RUN_DIR: the run to continue")
        if (out / CHECKPOINT_NAME).is_file():
            task, train = _resume_task(args, out)
            return _run_one(task, train, dist)
        if not _main_job_dirs(out):
            raise FileNotFoundError(f"--resume: no run to continue in {str(out)!r} (no "
                                    f"{CHECKPOINT_NAME}, no main-job runs)")
    train, recipe = _recipe(args, cls)
    if cls.name == "lm" and "model" not in given(cls.model_config_class, args):
        return _main_job(args, dist)
    task = cls(build(cls.data_config_class, args), _model_config(cls, args, recipe))
    task.check_data_source()
    return _run_one(task, build(TrainConfig, args, train), dist)


def _run_one(task: Task, train: TrainConfig, dist: DistContext) -> int:
    trainer = Trainer(task, train, dist)
    metrics = trainer.fit()
    if dist.is_main:
        _print_run(metrics, trainer.out)
    return 0


def _main_job_dirs(root: Path) -> list[str]:
    return [n for n in MAIN_JOB_MODELS if (root / n / CHECKPOINT_NAME).is_file()]


def _main_job(args: argparse.Namespace, dist: DistContext) -> int:
    """Dense HMM vs LHMM on one corpus, with baselines; prints and saves a table."""
    cls = get_task("lm")
    recipe_train, recipe = _recipe(args, cls)
    root = Path(build(TrainConfig, args, MAIN_JOB_TRAIN, recipe_train).out)
    results, task = {}, None
    for name, preset in MAIN_JOB_MODELS.items():
        fixed = {"rank": None} if name == "hmm" else {}
        task = cls(build(cls.data_config_class, args),
                   _model_config(cls, args, preset["model"], recipe, **fixed))
        task.check_data_source()
        cfg = build(TrainConfig, args, MAIN_JOB_TRAIN, preset["train"], recipe_train)
        resume = cfg.resume and (root / name / CHECKPOINT_NAME).is_file()
        cfg = cfg.replace(out=str(root / name), resume=resume, overwrite=not cfg.resume)
        if dist.is_main:
            m = task.model_config
            print(f"== {name}: {m.num_states} states" + (f", rank {m.rank}" if m.rank else "")
                  + (f", {cfg.max_steps} steps" if cfg.max_steps else f", {cfg.epochs} epoch(s)")
                  + f" of batches of <= {cfg.max_tokens} tokens -> {cfg.out}", flush=True)
        results[name] = Trainer(task, cfg, dist).fit()
    if dist.is_main:
        _main_job_report(task, results, root, dist)
    return 0


def _main_job_report(task: Task, results: dict[str, dict], root: Path, dist) -> None:
    base = task.baselines()
    rows = [[f"{n} (add-k {b['k']:g})", None, None, None, b["val_ppl"], b["test_ppl"], None,
             None] for n, b in base.items()]
    for name, m in results.items():
        rows.append([name, m["num_states"], m["rank"], m["params"], m["val_ppl"],
                     m.get("test_ppl"), m["tokens_per_s"], m["train_seconds"]])
    header = ["model", "states", "rank", "params", "val ppl", "test ppl", "train tokens/s",
              "train s"]
    table = markdown_table(header, rows)
    corpus = task.data_config.corpus
    title = (f"{corpus}: {len(task.corpus.vocab)} words, {task.corpus.train.numel():,} training "
             f"tokens; device {dist.device}, world size {dist.world_size}")
    print("\n" + title + "\n\n" + table + "\n")
    lhmm, hmm = results.get("lhmm"), results.get("hmm")
    if lhmm and "bigram" in base:
        verdict = "beats" if lhmm["val_ppl"] < base["bigram"]["val_ppl"] else "does not beat"
        print(f"LHMM {verdict} the add-k bigram on validation perplexity "
              f"({lhmm['val_ppl']:.1f} vs {base['bigram']['val_ppl']:.1f}).")
    if lhmm and hmm and hmm["tokens_per_s"]:
        print(f"LHMM trains at {lhmm['tokens_per_s'] / hmm['tokens_per_s']:.2f}x the dense "
              f"HMM's tokens/s ({lhmm['train_seconds']:.0f} s vs {hmm['train_seconds']:.0f} s of "
              f"training); validation perplexity {lhmm['val_ppl']:.1f} vs {hmm['val_ppl']:.1f} "
              f"({100 * (lhmm['val_ppl'] / hmm['val_ppl'] - 1):+.1f}%).")
        same = [h for h in lhmm["history"] if h["step"] <= hmm["steps"]]
        if same and lhmm["steps"] > hmm["steps"]:
            print(f"After the dense HMM's {hmm['steps']} steps the LHMM was at "
                  f"{min(h['val_ppl'] for h in same):.1f}.")
    atomic_write_bytes(os.path.join(root, "summary.md"), f"{title}\n\n{table}\n".encode())
    fields = ("model", "num_states", "rank", "params", "val_ppl", "test_ppl", "tokens_per_s",
              "train_seconds", "steps", "epochs")
    atomic_write_json(os.path.join(root, "summary.json"), {
        "corpus": corpus, "baselines": base,
        "runs": {k: {f: v.get(f) for f in fields} for k, v in results.items()},
    })
    print(f"outputs: {root}/summary.md, {root}/summary.json, and one run directory per model "
          f"({', '.join(str(root / n) for n in results)})")


__all__ = ["add_arguments", "cmd_train", "config_classes", "MAIN_JOB_MODELS", "MAIN_JOB_TRAIN"]
