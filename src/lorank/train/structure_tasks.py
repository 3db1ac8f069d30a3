"""Tasks ``pcfg`` and ``hsmm``: the other low-rank structures of Chiu, Deng & Rush (2021)
through the generic trainer.

* ``pcfg``: :class:`lorank.nn.pcfg.NeuralPCFG` as a language model on a text corpus
  (:func:`lorank.data.load_corpus`), rules ``dense`` (Kim, Dyer & Rush 2019), ``low_rank``
  (LPCFG), ``cp`` (TN-PCFG, Yang, Zhao & Tu 2021) or ``rank_space`` (Yang, Liu & Tu 2022).
  Each sentence without its ``<eos>`` is one string of the grammar; the unit count is the
  words plus one end of sentence per sentence (as Kim et al. 2019), i.e. the token count of
  the HMM language models (``--task lm``), so the perplexities are comparable.
* ``hsmm``: :class:`lorank.nn.hsmm.LHSMM` (or its dense-transition baseline) on the weekly
  Mauna Loa CO2 series (:func:`lorank.data.series.co2_splits`, which needs the PyPI package
  ``statsmodels`` for its data file); metric: NLL per time step (nats).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from torch import nn

from lorank.train.tasks import LMTask, Task, add_text_corpus_arguments, register_task


def _positive(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


# --------------------------------------------------------------------------------------------
# PCFG language models


@register_task
class PCFGTask(LMTask):
    """Neural PCFG language models; metric: perplexity per token (words + end of sentence).

    Shares the corpus, vocabulary metadata and n-gram baselines of :class:`LMTask`."""

    name = "pcfg"
    metric = "ppl"
    unit = "tokens"

    RULE_ALIASES = {"lpcfg": "low_rank", "lowrank": "low_rank", "low-rank": "low_rank",
                    "tn": "cp", "tnpcfg": "cp", "tn-pcfg": "cp", "rank-space": "rank_space",
                    "rankspace": "rank_space", "kim": "dense"}  # fmt: skip

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("PCFG language model (--task pcfg)")
        add_text_corpus_arguments(g)
        g.add_argument("--max-length", type=int, default=40,
                       help="drop training sentences longer than this many words (default 40; "
                            "inside costs grow as length^3)")  # fmt: skip
        g.add_argument("--eval-max-length", type=int, default=None,
                       help="also drop valid/test sentences longer than this (default: keep "
                            "all; metrics.json counts what was dropped)")  # fmt: skip
        g.add_argument("--rules", default=None,
                       help="dense (default), low_rank, cp or rank_space")
        g.add_argument("--nonterminals", type=int, default=None, help="m (default 30)")
        g.add_argument("--preterminals", type=int, default=None, help="p (default 60)")
        g.add_argument("--rank", type=int, default=None,
                       help="rank of low_rank/cp/rank_space rules (default 64)")
        g.add_argument("--hidden", type=int, default=None, help="embedding size (default 256)")

    @classmethod
    def configs_from_args(cls, args: argparse.Namespace) -> tuple[dict, dict]:
        data = {
            "corpus": args.corpus or "shakespeare",
            "vocab_size": args.vocab_size,
            "max_length": args.max_length,
            "eval_max_length": args.eval_max_length,
        }
        model = {
            "rule_type": args.rules or "dense",
            "num_nonterminals": args.nonterminals or 30,
            "num_preterminals": args.preterminals or 60,
            "rank": args.rank,
            "hidden": args.hidden or 256,
        }
        return data, model

    @classmethod
    def check_model_config(cls, config: dict[str, Any]) -> None:
        """Validate a model config before any data is loaded; fills in the canonical rule
        type and the default rank (64; None for dense rules)."""
        from lorank.nn.pcfg import RULE_TYPES

        rt = str(config.get("rule_type", "dense")).lower()
        rt = cls.RULE_ALIASES.get(rt, rt)
        if rt not in RULE_TYPES:
            raise ValueError(f"unknown rules {config.get('rule_type')!r}: choose one of "
                             f"{', '.join(RULE_TYPES)}")  # fmt: skip
        config["rule_type"] = rt
        for key in ("num_nonterminals", "num_preterminals", "hidden"):
            _positive(key.replace("num_", ""), config.get(key))
        r = config.get("rank")
        if rt == "dense":
            if r is not None:
                raise ValueError("rank applies to factored rules (low_rank, cp, rank_space), "
                                 "not to dense rules")  # fmt: skip
        else:
            config["rank"] = 64 if r is None else _positive("rank", r)

    # ---- data ------------------------------------------------------------------------------
    def load_data(self) -> None:
        from lorank.data import load_corpus

        d = self.data_config
        for key in ("max_length", "eval_max_length"):
            if d.get(key) is not None:
                _positive(key, d[key])
        max_tokens = d["max_length"] + 1 if d.get("max_length") else None  # + <eos>
        self.corpus = load_corpus(d["corpus"], d.get("vocab_size", 10000), max_tokens)
        self._sentences = {}
        self.dropped: dict[str, int] = {}

    def sentences(self, split: str) -> list[torch.Tensor]:
        """The words of each sentence (``<eos>`` removed); sentences without words, and for
        valid/test those longer than ``eval_max_length``, are left out (counted in
        :attr:`dropped`)."""
        if split not in self._sentences:
            limit = self.data_config.get("eval_max_length") if split != "train" else None
            kept = []
            for s in self.corpus.sentences(split):
                words = s[:-1]
                if words.numel() >= 1 and (limit is None or words.numel() <= limit):
                    kept.append(words)
            self.dropped[split] = len(self.corpus.sentences(split)) - len(kept)
            if not kept:
                raise ValueError(f"no {split} sentence left (eval_max_length="
                                 f"{self.data_config.get('eval_max_length')})")  # fmt: skip
            self._sentences[split] = kept
        return self._sentences[split]

    def build_model(self) -> nn.Module:
        from lorank.nn.pcfg import NeuralPCFG

        if self.corpus is not None:
            self.model_config["vocab_size"] = len(self.corpus.vocab)
        if "vocab_size" not in self.model_config:
            raise ValueError("the vocabulary size is unknown: load the data first")
        c = self.model_config
        return NeuralPCFG(
            c["vocab_size"],
            num_nonterminals=c["num_nonterminals"],
            num_preterminals=c["num_preterminals"],
            hidden=c["hidden"],
            rule_type=c["rule_type"],
            rank=c.get("rank") or 1,  # NeuralPCFG ignores the rank of dense rules
        )

    def count(self, batch) -> int:
        """Words plus one end of sentence per sentence."""
        return int(batch[1].sum()) + int(batch[1].numel())

    def nll(self, model, batch, generator):
        tokens, lengths = batch
        return -model(tokens, lengths).log_partition.sum()

    # ---- reporting -------------------------------------------------------------------------
    def summary(self, model: nn.Module) -> dict[str, Any]:
        c = self.model_config
        out = {
            "model": f"pcfg_{c['rule_type']}",
            "rule_type": c["rule_type"],
            "nonterminals": c["num_nonterminals"],
            "preterminals": c["num_preterminals"],
            "rank": c.get("rank"),
            "hidden": c["hidden"],
            "corpus": self.data_config["corpus"],
            "vocab_size": c.get("vocab_size"),
            "params": sum(p.numel() for p in model.parameters()),
        }
        if getattr(self, "dropped", None):
            out["sentences_dropped"] = dict(self.dropped)
        return out

    def sample(self, model, num, max_length, generator):
        itos = self.corpus.vocab.itos if self.corpus is not None else self.vocab_itos
        if itos is None:
            raise ValueError("sampling needs the vocabulary (load the data or a checkpoint)")
        out = model.sample_sentences(num, max_length=max_length, generator=generator)
        return [" ".join(itos[i] for i in words) for words, _ in out]


# --------------------------------------------------------------------------------------------
# HSMMs on a real series


@register_task
class HSMMTask(Task):
    """Low-rank (or dense) HSMMs on the weekly CO2 series; metric: NLL per time step."""

    name = "hsmm"
    metric = "nll_per_step"
    unit = "steps"

    MODELS = ("lhsmm", "hsmm")

    def __init__(self, data_config: dict[str, Any], model_config: dict[str, Any]):
        super().__init__(data_config, model_config)
        self.data = None

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("HSMM on a time series (--task hsmm)")
        g.add_argument("--series", default="co2",
                       help="co2 (weekly Mauna Loa CO2 from statsmodels' data; the only "
                            "built-in series)")  # fmt: skip
        g.add_argument("--csv", default=None,
                       help="read the CO2 series from this CSV (a 'co2' column) instead")
        g.add_argument("--window", type=int, default=104, help="weeks per sequence (104)")
        g.add_argument("--train-stride", type=int, default=26,
                       help="weeks between training windows (26)")
        g.add_argument("--valid-fraction", type=float, default=0.1)
        g.add_argument("--test-fraction", type=float, default=0.2)
        g.add_argument("--model", default=None,
                       help="lhsmm (low-rank transition, default) or hsmm (dense softmax)")
        g.add_argument("--states", type=int, default=None, help="number of states Z (64)")
        g.add_argument("--rank", type=int, default=None, help="rank R of lhsmm (default 8)")
        g.add_argument("--max-duration", type=int, default=None,
                       help="longest segment K (default 20)")
        g.add_argument("--emb-dim", type=int, default=None,
                       help="state-embedding size of the transition features (64)")

    @classmethod
    def configs_from_args(cls, args: argparse.Namespace) -> tuple[dict, dict]:
        data = {
            "series": args.series,
            "csv": args.csv,
            "window": args.window,
            "train_stride": args.train_stride,
            "valid_fraction": args.valid_fraction,
            "test_fraction": args.test_fraction,
        }
        model = {
            "model": args.model or "lhsmm",
            "num_states": args.states or 64,
            "rank": args.rank,
            "max_duration": args.max_duration or 20,
            "emb_dim": args.emb_dim or 64,
        }
        return data, model

    @classmethod
    def check_model_config(cls, config: dict[str, Any]) -> None:
        """Validate before loading data; fills in the default rank (8, at most Z)."""
        model = str(config.get("model", "lhsmm")).lower()
        model = {"dense": "hsmm", "dense_hsmm": "hsmm", "lowrank": "lhsmm"}.get(model, model)
        if model not in cls.MODELS:
            raise ValueError(f"unknown model {config.get('model')!r}: choose lhsmm or hsmm")
        config["model"] = model
        z = _positive("states", config.get("num_states"))
        _positive("max_duration", config.get("max_duration"))
        _positive("emb_dim", config.get("emb_dim"))
        r = config.get("rank")
        if model == "hsmm":
            if r is not None:
                raise ValueError("rank applies to the low-rank 'lhsmm', not the dense 'hsmm'")
        else:
            r = min(8, z) if r is None else _positive("rank", r)
            if r > z:
                raise ValueError(f"rank ({r}) must be at most the number of states ({z})")
            config["rank"] = r

    # ---- data ------------------------------------------------------------------------------
    def load_data(self) -> None:
        from lorank.data.series import co2_splits

        d = self.data_config
        if d.get("series", "co2") != "co2":
            raise ValueError(f"unknown series {d.get('series')!r}: the built-in one is 'co2'")
        self.data = co2_splits(
            d.get("window", 104),
            d.get("train_stride", 26),
            valid_fraction=d.get("valid_fraction", 0.1),
            test_fraction=d.get("test_fraction", 0.2),
            path=d.get("csv"),
        )
        if self.data.windows["valid"].shape[0] == 0:
            raise ValueError("the hsmm task evaluates on a validation split: valid_fraction "
                             f"must be > 0, got {d.get('valid_fraction')}")  # fmt: skip

    def build_model(self) -> nn.Module:
        from lorank.nn.hsmm import LHSMM

        c = self.model_config
        init = None
        if self.data is not None:  # means start at random training observations
            w, ln = self.data.windows["train"], self.data.lengths["train"]
            mask = torch.arange(w.shape[1]).unsqueeze(0) < ln.unsqueeze(1)
            init = w[mask]
        return LHSMM(
            c["num_states"],
            1,
            rank=c.get("rank") or 1,  # ignored by the dense model
            max_duration=c["max_duration"],
            emb_dim=c["emb_dim"],
            dense=c["model"] == "hsmm",
            init_data=init,
        )

    def batches(self, split, *, batch_size, max_tokens=None, shuffle=False, seed=0, rank=0,
                world_size=1):  # fmt: skip
        """``(windows (B, T, 1), lengths (B,))`` batches; ``max_tokens`` caps ``B x T``."""
        from lorank.data._batching import BatchIterator, length_batches

        if self.data is None:
            raise RuntimeError("call load_data() before batches()")
        windows, lengths = self.data.windows[split], self.data.lengths[split]
        idx = length_batches(lengths, batch_size, max_tokens=max_tokens, shuffle=shuffle,
                             seed=seed, rank=rank, world_size=world_size)  # fmt: skip

        def collate(ix: list[int]):
            lens = lengths[ix]
            return windows[ix, : int(lens.max())].clone(), lens.clone()

        return BatchIterator(idx, collate)

    def nll(self, model, batch, generator):
        x, lengths = batch
        return -model(x, lengths).log_partition.sum()

    # ---- reporting -------------------------------------------------------------------------
    def gaussian_baseline(self) -> dict[str, float]:
        """NLL per step of one Gaussian fitted to the training weeks (after standardizing
        with the training statistics: the standard normal) on valid and test."""
        out = {}
        for split in ("valid", "test"):
            w, ln = self.data.windows[split], self.data.lengths[split]
            if ln.numel() == 0:
                continue
            mask = torch.arange(w.shape[1]).unsqueeze(0) < ln.unsqueeze(1)
            x = w[mask].double()
            nll = 0.5 * math.log(2 * math.pi) + 0.5 * float((x**2).mean())
            out[f"{'val' if split == 'valid' else split}_nll_per_step"] = nll
        return out

    def baselines(self) -> dict[str, dict[str, float]]:
        return {"gaussian": self.gaussian_baseline()}

    def summary(self, model: nn.Module) -> dict[str, Any]:
        c = self.model_config
        out: dict[str, Any] = {
            "model": c["model"],
            "states": c["num_states"],
            "rank": c.get("rank") if c["model"] == "lhsmm" else None,
            "max_duration": c["max_duration"],
            "series": self.data_config.get("series", "co2"),
            "params": sum(p.numel() for p in model.parameters()),
        }
        if self.data is not None:
            out["weeks"] = dict(self.data.weeks)
            out["baselines"] = self.baselines()
        return out

    def metadata(self) -> dict[str, Any]:
        return {"mean": self.data.mean, "std": self.data.std, "weeks": dict(self.data.weeks)}

    def check_metadata(self, meta: dict[str, Any]) -> None:
        want = meta.get("task_meta", {})
        if "mean" not in want:
            return
        have = self.metadata()
        if want["weeks"] != have["weeks"] or not math.isclose(want["mean"], have["mean"],
                                                              rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(
                f"the series gives different data than the checkpoint was trained on "
                f"(weeks {have['weeks']} vs {want['weeks']}, mean {have['mean']} vs "
                f"{want['mean']})"
            )


__all__ = ["PCFGTask", "HSMMTask"]
