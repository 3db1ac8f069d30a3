"""The ``lm`` task: word-level HMM language models (:class:`lorank.nn.HMMLanguageModel`) on a
text corpus (:func:`lorank.data.load_corpus`).

Each sentence, ending with ``<eos>``, is one HMM sequence; perplexity is
``exp(total NLL / tokens incl. <eos>)``.  ``metrics.json`` also holds the add-k unigram and
bigram baselines of the same corpus.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorank.baselines import bigram_lm, evaluate_lm, unigram_lm
from lorank.config import Config, option
from lorank.data import load_corpus, sentence_batches
from lorank.nn.hmm import HMMLanguageModel, HMMLMConfig
from lorank.tasks.base import Task, require_splits

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class TextDataConfig(Config):
    """A text corpus: a built-in name or a directory in Mikolov's PTB layout."""

    corpus: str = option("shakespeare", "'shakespeare', 'ptb', or a directory with train.txt, "
                                        "valid.txt, test.txt")
    vocab_size: int = option(10000, "vocabulary cap incl. <unk> and <eos>")
    max_length: int | None = option(None, "drop training sentences longer than this many "
                                          "tokens (incl. <eos>)")

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, str) or not self.corpus:
            raise self._error("corpus", f"corpus must be a non-empty string, got "
                                        f"{self.corpus!r}")
        self._positive_int("vocab_size")
        self._positive_int("max_length", optional=True)


def vocab_digest(itos: list[str]) -> str:
    """A short hash of a vocabulary (checkpoints record it to catch a changed corpus)."""
    return hashlib.sha256(json.dumps(itos).encode()).hexdigest()[:16]


class TextTask(Task, data=TextDataConfig):
    """Shared by the tasks that model sentences of a text corpus (lm, pcfg): the corpus, its
    vocabulary metadata, n-gram baselines and sampling of word sequences."""

    corpus = None
    #: the vocabulary, restored from a checkpoint for sampling without the corpus
    vocab_itos: list[str] | None = None

    def _max_sentence_tokens(self) -> int | None:
        return self.data_config.max_length

    def check_data_source(self) -> None:
        corpus = self.data_config.corpus
        if corpus.lower() not in ("shakespeare", "ptb") and not Path(corpus).exists():
            raise FileNotFoundError(f"corpus {corpus!r} not found: use 'shakespeare', 'ptb', or "
                                    f"a directory holding train.txt, valid.txt and test.txt")

    def load_data(self) -> None:
        """Load the corpus (once), check every split, fill in the vocabulary size."""
        if self.corpus is None:
            d = self.data_config
            self.use_corpus(load_corpus(d.corpus, d.vocab_size, self._max_sentence_tokens()))

    def use_corpus(self, corpus) -> None:
        """Take an already loaded :class:`lorank.data.Corpus` (benchmarks share one)."""
        self.corpus = corpus
        self._sentences = {}
        require_splits({s: len(self.sentences(s)) for s in SPLITS},
                       f"corpus {self.data_config.corpus!r}")
        self.model_config = self.model_config.replace(vocab_size=len(corpus.vocab))

    def sentences(self, split: str) -> list[torch.Tensor]:
        """The token ids of each sentence of ``split`` (``<eos>`` included)."""
        if split not in self._sentences:
            self._sentences[split] = self.corpus.sentences(split)
        return self._sentences[split]

    def batches(self, split, *, batch_size, max_tokens=None, **order):
        return sentence_batches(self.sentences(split), batch_size, max_tokens=max_tokens, **order)

    def itos(self) -> list[str]:
        if self.corpus is not None:
            return self.corpus.vocab.itos
        if self.vocab_itos is None:
            raise ValueError("sampling needs the vocabulary (load the data or a checkpoint)")
        return self.vocab_itos

    def metadata(self) -> dict[str, Any]:
        itos = self.corpus.vocab.itos
        return {"vocab": itos, "vocab_sha": vocab_digest(itos), "eos_id": 1}

    def check_metadata(self, meta: dict[str, Any]) -> None:
        want = meta.get("task_meta", {}).get("vocab_sha")
        have = vocab_digest(self.corpus.vocab.itos)
        if want is not None and want != have:
            raise ValueError(
                f"the corpus {self.data_config.corpus!r} gives a different vocabulary than the "
                f"checkpoint was trained with (vocab hash {have} != {want})"
            )

    def restore_metadata(self, task_meta: dict[str, Any]) -> None:
        self.vocab_itos = task_meta.get("vocab")

    def baselines(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, fit in (("unigram", unigram_lm), ("bigram", bigram_lm)):
            r = evaluate_lm(fit(self.corpus), self.corpus)
            out[name] = {"k": r["k"], "val_ppl": r["valid_ppl"], "test_ppl": r["test_ppl"]}
        return out


#: parameter names of checkpoint format 1 that moved into ``NeuralHMM.transition_net``
_V1_TRANSITION_PREFIXES = ("next_emb", "prev_mlp.", "start", "projection", "band_out.")


def upgrade_neural_hmm_state(state: dict[str, torch.Tensor], version: int) -> dict:
    """Rename a format-1 ``NeuralHMM`` state dict to today's module layout."""
    if version >= 2:
        return state
    out = {}
    for k, v in state.items():
        if k.startswith(_V1_TRANSITION_PREFIXES):
            k = "transition_net." + k
        out[k] = v
    return out


class LMTask(TextTask, name="lm", metric="ppl", unit="tokens", model=HMMLMConfig):
    """Word-level HMM language models; metric: perplexity per token (incl. ``<eos>``)."""

    def build_model(self) -> nn.Module:
        if self.model_config.vocab_size is None:
            raise ValueError("the vocabulary size is unknown: load the data first")
        model = HMMLanguageModel(self.model_config)
        if self.corpus is not None:  # start at the unigram model (a checkpoint overwrites it)
            counts = torch.bincount(self.corpus.train, minlength=len(self.corpus.vocab))
            model.emission.init_unigram(counts)
        return model

    def upgrade_state(self, state, version):
        return upgrade_neural_hmm_state(state, version)

    def sample(self, model, num, max_length, generator):
        itos = self.itos()
        return [" ".join(itos[i] for i in s)
                for s in model.generate(num, eos_id=1, max_length=max_length,
                                        generator=generator)]


__all__ = ["TextDataConfig", "TextTask", "LMTask", "vocab_digest", "upgrade_neural_hmm_state"]
