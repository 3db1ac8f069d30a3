"""Tasks: what the generic trainer needs to know about a kind of model and data.

A task bundles a model factory, batch iterators, a unit counter (tokens, time steps) and a
metric (``"ppl"``: ``exp(NLL / units)``, or ``"nll_per_step"``: ``NLL / units``).  The trainer
(:mod:`lorank.train.trainer`) only calls the methods of :class:`Task`; ``lorank train --task
NAME`` looks ``NAME`` up in :data:`TASKS`.  Adding a task (music, PCFG, HSMM) is one subclass::

    @register_task
    class MusicTask(Task):
        name, metric, unit = "music", "nll_per_step", "steps"
        def add_arguments(parser): ...          # task-specific CLI options
        def configs_from_args(args): ...        # -> (data_config, model_config), JSON dicts
        def load_data(self): ...
        def build_model(self): ...              # an nn.Module; forward -> a distribution
        def batches(self, split, **kw): ...     # iterator of batches (sharded by rank)
        def count(self, batch): ...             # units in a batch
        def nll(self, model, batch, generator): # summed NLL of the batch (a scalar tensor)

The configs are stored in checkpoints, so ``lorank eval``/``lorank sample`` rebuild the task
and the model from a checkpoint alone.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

#: task name -> Task subclass
TASKS: dict[str, type[Task]] = {}
#: modules whose import registers more tasks; imported on the first lookup (a module that is
#: not installed is skipped).  Adding a task outside this file = one entry here.
TASK_MODULES: list[str] = ["lorank.train.music_task", "lorank.train.structure_tasks"]
_loaded = False


def load_task_modules() -> dict[str, type[Task]]:
    """Import :data:`TASK_MODULES` once; return :data:`TASKS`."""
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in TASK_MODULES:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name != mod:
                    raise
    return TASKS


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``lorank train --task cls.name``."""
    if not getattr(cls, "name", None):
        raise ValueError(f"task class {cls.__name__} needs a non-empty 'name'")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    load_task_modules()
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


class Task:
    """Base class; see the module docstring."""

    name: ClassVar[str] = ""
    #: "ppl" (exp of the mean NLL) or "nll_per_step" (the mean NLL)
    metric: ClassVar[str] = "ppl"
    #: what :meth:`count` counts, for throughput ("tokens/s", "steps/s")
    unit: ClassVar[str] = "tokens"

    def __init__(self, data_config: dict[str, Any], model_config: dict[str, Any]):
        self.data_config = dict(data_config)
        self.model_config = dict(model_config)

    # ---- command line ----------------------------------------------------------------------
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add the task's options to ``lorank train``."""

    @classmethod
    def configs_from_args(cls, args: argparse.Namespace) -> tuple[dict, dict]:
        """(data_config, model_config) from parsed arguments."""
        raise NotImplementedError

    # ---- data and model --------------------------------------------------------------------
    def load_data(self) -> None:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def batches(
        self,
        split: str,
        *,
        batch_size: int,
        max_tokens: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator:
        """Batches of ``split``; with ``world_size > 1`` this rank's share (every rank the same
        number of batches)."""
        raise NotImplementedError

    def to_device(self, batch, device: torch.device):
        if isinstance(batch, torch.Tensor):
            return batch.to(device)
        return type(batch)(self.to_device(b, device) for b in batch)

    def count(self, batch) -> int:
        """Number of predicted units (tokens incl. ``<eos>``, time steps) in a batch; the
        default reads ``(inputs, lengths)`` batches."""
        return int(batch[1].sum())

    def nll(self, model: nn.Module, batch, generator: torch.Generator | None) -> torch.Tensor:
        """Summed negative log-likelihood (nats) of the batch: a differentiable scalar; the
        default calls ``model(inputs, lengths, generator=...)`` and reads its log-partition."""
        inputs, lengths = batch
        return -model(inputs, lengths, generator=generator).log_partition.sum()

    # ---- reporting -------------------------------------------------------------------------
    def metric_value(self, nll: float, count: int) -> float:
        mean = nll / max(count, 1)
        if self.metric == "ppl":
            return math.exp(min(mean, 700.0))
        return mean

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """Facts about the run for metrics.json (model name, sizes, parameters)."""
        return {"params": sum(p.numel() for p in model.parameters())}

    def metadata(self) -> dict[str, Any]:
        """Extra JSON stored in checkpoints (e.g. the vocabulary)."""
        return {}

    def check_metadata(self, meta: dict[str, Any]) -> None:
        """Raise if the loaded data does not match a checkpoint's metadata."""

    def baselines(self) -> dict[str, dict[str, float]]:
        """Count-based baselines on the same data (name -> {valid_<metric>, test_<metric>})."""
        return {}

    def sample(
        self, model: nn.Module, num: int, max_length: int, generator: torch.Generator | None
    ) -> list[str]:
        raise NotImplementedError(f"task {self.name!r} cannot sample")


# --------------------------------------------------------------------------------------------
# language modelling with HMMs


def add_text_corpus_arguments(g) -> None:
    """The corpus options shared by the text tasks (lm, pcfg)."""
    g.add_argument("--corpus", default=None,
                   help="'shakespeare' (default), 'ptb', or a directory with train.txt, "
                        "valid.txt, test.txt")  # fmt: skip
    g.add_argument("--vocab-size", type=int, default=10000,
                   help="vocabulary cap incl. <unk> and <eos> (default 10000)")


def add_hmm_model_arguments(g, default_hidden: int, default_init_scale: float) -> None:
    """The ``NeuralHMM`` options shared by the HMM tasks (lm, music)."""
    g.add_argument("--model", default=None,
                   help="hmm (dense softmax), lhmm, lhmm_band or rank_space (default lhmm)")
    g.add_argument("--states", type=int, default=None, help="number of states Z")
    g.add_argument("--rank", type=int, default=None, help="rank R (default Z/4)")
    g.add_argument("--band", type=int, default=None, help="band width of lhmm_band")
    g.add_argument("--hidden", type=int, default=None,
                   help=f"embedding size d (default {default_hidden})")
    g.add_argument("--mlp-layers", type=int, default=2, help="residual layers per MLP")
    g.add_argument("--state-dropout", type=float, default=0.0,
                   help="fraction of states dropped per training batch")
    g.add_argument("--feature-dropout", type=float, default=0.0,
                   help="fraction of rank features dropped per training batch")
    g.add_argument("--memory-light", action="store_true",
                   help="lhmm: save O(BTR) instead of O(BTZ) for backward")
    g.add_argument("--init-scale", type=float, default=default_init_scale,
                   help="std of the initial transition log-potentials "
                        f"(default {default_init_scale:g})")  # fmt: skip


def hmm_model_config(args: argparse.Namespace, default_states: int,
                     default_hidden: int) -> dict[str, Any]:
    """The ``NeuralHMM`` config from the options of :func:`add_hmm_model_arguments`."""
    return {
        "model": args.model or "lhmm",
        "num_states": default_states if args.states is None else args.states,
        "rank": args.rank,
        "band": args.band,
        "hidden": args.hidden or default_hidden,
        "mlp_layers": args.mlp_layers,
        "state_dropout": args.state_dropout,
        "feature_dropout": args.feature_dropout,
        "memory_light": args.memory_light,
        "init_scale": args.init_scale,
    }


def _vocab_digest(itos: list[str]) -> str:
    return hashlib.sha256(json.dumps(itos).encode()).hexdigest()[:16]


@register_task
class LMTask(Task):
    """Word-level HMM language models (:class:`lorank.nn.hmm.HMMLanguageModel`) on a text
    corpus (:func:`lorank.data.load_corpus`).  Each sentence, ending with ``<eos>``, is one
    HMM sequence; perplexity is ``exp(total NLL / tokens incl. <eos>)``."""

    name = "lm"
    metric = "ppl"
    unit = "tokens"

    MODEL_KEYS = ("model", "num_states", "rank", "band", "hidden", "mlp_layers",
                  "state_dropout", "feature_dropout", "memory_light", "init_scale")  # fmt: skip

    def __init__(self, data_config: dict[str, Any], model_config: dict[str, Any]):
        super().__init__(data_config, model_config)
        self.corpus = None
        self.vocab_itos: list[str] | None = None  # set from a checkpoint for sampling
        self._sentences: dict[str, list[torch.Tensor]] = {}

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("language model (--task lm)")
        add_text_corpus_arguments(g)
        g.add_argument("--max-length", type=int, default=None,
                       help="drop training sentences longer than this many tokens (incl. <eos>)")
        add_hmm_model_arguments(g, default_hidden=256, default_init_scale=3.0)

    @classmethod
    def configs_from_args(cls, args: argparse.Namespace) -> tuple[dict, dict]:
        data = {
            "corpus": args.corpus or "shakespeare",
            "vocab_size": args.vocab_size,
            "max_length": args.max_length,
        }
        return data, hmm_model_config(args, default_states=1024, default_hidden=256)

    @classmethod
    def check_model_config(cls, config: dict[str, Any]) -> None:
        """Validate a model config before any data is loaded (clear CLI errors)."""
        from lorank.nn.hmm import canonical_model, default_rank

        model = canonical_model(config.get("model", "lhmm"))
        z = config.get("num_states")
        if isinstance(z, bool) or not isinstance(z, int) or z < 1:
            raise ValueError(f"states must be a positive integer, got {z!r}")
        r = config.get("rank")
        if r is not None and model != "hmm":
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"rank must be a positive integer, got {r!r}")
            if r > z:
                raise ValueError(f"rank ({r}) must be at most the number of states ({z})")
        if model == "hmm" and r is not None:
            raise ValueError("rank applies to low-rank models (lhmm, lhmm_band, rank_space), "
                             "not to the dense 'hmm'")  # fmt: skip
        if config.get("band") is not None and model != "lhmm_band":
            raise ValueError(f"band applies to model 'lhmm_band' only, got {model!r}")
        if model != "hmm" and r is None:
            config["rank"] = default_rank(z)
        config["model"] = model

    # ---- data ------------------------------------------------------------------------------
    def load_data(self) -> None:
        """Load the corpus (once: a task that already holds one keeps it)."""
        from lorank.data import load_corpus

        if self.corpus is not None:
            return
        d = self.data_config
        self.corpus = load_corpus(d["corpus"], d.get("vocab_size", 10000), d.get("max_length"))
        self._sentences = {}

    def sentences(self, split: str) -> list[torch.Tensor]:
        if split not in self._sentences:
            self._sentences[split] = self.corpus.sentences(split)
        return self._sentences[split]

    def build_model(self) -> nn.Module:
        from lorank.nn.hmm import HMMLanguageModel

        cfg = {k: self.model_config[k] for k in self.MODEL_KEYS if k in self.model_config}
        if self.corpus is not None:
            self.model_config["vocab_size"] = len(self.corpus.vocab)
        if "vocab_size" not in self.model_config:
            raise ValueError("the vocabulary size is unknown: load the data first")
        model = HMMLanguageModel(vocab_size=self.model_config["vocab_size"], **cfg)
        if self.corpus is not None:  # start at the unigram model (a checkpoint overwrites it)
            counts = torch.bincount(self.corpus.train, minlength=len(self.corpus.vocab))
            model.emission.init_unigram(counts)
        return model

    def batches(self, split, *, batch_size, max_tokens=None, shuffle=False, seed=0, rank=0,
                world_size=1):  # fmt: skip
        from lorank.data import sentence_batches

        return sentence_batches(
            self.sentences(split),
            batch_size,
            shuffle=shuffle,
            seed=seed,
            max_tokens=max_tokens,
            rank=rank,
            world_size=world_size,
        )

    # ---- reporting -------------------------------------------------------------------------
    def summary(self, model: nn.Module) -> dict[str, Any]:
        c = self.model_config
        return {
            "model": c["model"],
            "states": c["num_states"],
            "rank": c.get("rank") if c["model"] != "hmm" else None,
            "band": getattr(model, "band", c.get("band")),
            "hidden": c.get("hidden"),
            "corpus": self.data_config["corpus"],
            "vocab_size": c.get("vocab_size"),
            "params": sum(p.numel() for p in model.parameters()),
        }

    def metadata(self) -> dict[str, Any]:
        itos = self.corpus.vocab.itos
        return {"vocab": itos, "vocab_sha": _vocab_digest(itos), "eos_id": 1}

    def check_metadata(self, meta: dict[str, Any]) -> None:
        want = meta.get("task_meta", {}).get("vocab_sha")
        have = _vocab_digest(self.corpus.vocab.itos)
        if want is not None and want != have:
            raise ValueError(
                f"the corpus {self.data_config['corpus']!r} gives a different vocabulary than "
                f"the checkpoint was trained with (vocab hash {have} != {want})"
            )

    def baselines(self) -> dict[str, dict[str, float]]:
        from lorank.baselines import bigram_lm, evaluate_lm, unigram_lm

        out = {}
        for name, fit in (("unigram", unigram_lm), ("bigram", bigram_lm)):
            r = evaluate_lm(fit(self.corpus), self.corpus)
            out[name] = {"k": r["k"], "val_ppl": r["valid_ppl"], "test_ppl": r["test_ppl"]}
        return out

    def sample(self, model, num, max_length, generator):
        itos = self.corpus.vocab.itos if self.corpus is not None else self.vocab_itos
        return [" ".join(itos[i] for i in s)
                for s in model.generate(num, eos_id=1, max_length=max_length,
                                        generator=generator)]  # fmt: skip


__all__ = ["Task", "LMTask", "TASKS", "TASK_MODULES", "register_task", "get_task",
           "load_task_modules"]
