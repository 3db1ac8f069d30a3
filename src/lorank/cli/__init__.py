"""The ``lorank`` command line: ``train``, ``eval``, ``sample`` and ``compress``.

``lorank train`` with no ``--model`` is the main job: it trains the dense softmax HMM and the
LHMM on the built-in Shakespeare corpus (or ``--corpus``), then prints perplexity and speed
next to unigram and bigram baselines (docs/results.md has the measured table and time).  With
``--model`` it trains one model; ``--task`` picks music, PCFG or HSMM models instead.  The
options of each task are generated from its config dataclasses.  Multi-process data
parallelism::

    torchrun --nproc_per_node 2 -m lorank train --model lhmm --states 1024 ...

(gloo on CPU, nccl on GPU; ``--batch-size`` is per process).  ``lorank train --resume --out
RUN`` continues a run with its own settings.
"""

from __future__ import annotations

import argparse
import sys

from lorank.cli.compress import add_parser as add_compress_parser
from lorank.cli.compress import run as cmd_compress
from lorank.cli.infer import add_eval_arguments, add_sample_arguments, cmd_eval, cmd_sample
from lorank.cli.options import describe_error
from lorank.cli.train import add_arguments as add_train_arguments
from lorank.cli.train import cmd_train, config_classes
from lorank.config import ConfigError
from lorank.tasks import TASKS

COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "compress": cmd_compress}


def build_parser(task_name: str = "lm") -> argparse.ArgumentParser:
    """The parser of every command; ``train`` gets the options of ``task_name``."""
    parser = argparse.ArgumentParser(
        prog="lorank", description="Low-rank structured models: train, evaluate, sample, compress."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    tp = sub.add_parser("train", help="train a model (no --model: the HMM vs LHMM main job)",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(tp, task_name)
    add_eval_arguments(sub.add_parser("eval", help="evaluate a run on valid/test"))
    add_sample_arguments(sub.add_parser("sample", help="generate from a run"))
    add_compress_parser(sub)
    return parser


def _task_name(argv: list[str]) -> str:
    """The ``--task`` of a ``train`` command line (two-phase parsing: its options depend on it)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="lm")
    known, _ = pre.parse_known_args(argv[1:] if argv and argv[0] == "train" else [])
    return known.task if known.task in TASKS else "lm"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    task_name = _task_name(argv)
    parser = build_parser(task_name)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        parser.exit(2, f"lorank: error: {describe_error(e, config_classes(task_name))}\n")
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError,
            NotImplementedError, FloatingPointError) as e:
        parser.exit(2, f"lorank: error: {e}\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


__all__ = ["main", "build_parser", "COMMANDS"]
