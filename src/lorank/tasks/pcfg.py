"""The ``pcfg`` task: :class:`lorank.nn.NeuralPCFG` as a language model on a text corpus, with
rules ``dense`` (Kim, Dyer & Rush 2019), ``low_rank`` (LPCFG, Chiu, Deng & Rush 2021), ``cp``
(TN-PCFG, Yang, Zhao & Tu 2021) or ``rank_space`` (Yang, Liu & Tu 2022).

Each sentence without its ``<eos>`` is one string of the grammar; the unit count is the words
plus one end of sentence per sentence (as Kim et al. 2019), i.e. the token count of the HMM
language models (``--task lm``), so the perplexities are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorank.config import option
from lorank.nn.pcfg import NeuralPCFG, PCFGConfig
from lorank.tasks.lm import TextDataConfig, TextTask


@dataclass(frozen=True)
class PCFGDataConfig(TextDataConfig):
    """A text corpus for grammars: sentence lengths are capped (inside costs grow as n^3)."""

    max_length: int | None = option(40, "drop training sentences longer than this many words")
    eval_max_length: int | None = option(None, "also drop valid/test sentences longer than "
                                               "this (metrics.json counts what was dropped)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._positive_int("eval_max_length", optional=True)


class PCFGTask(TextTask, name="pcfg", metric="ppl", unit="tokens", data=PCFGDataConfig,
               model=PCFGConfig):
    """Neural PCFG language models; metric: perplexity per token (words + end of sentence)."""

    #: split -> sentences left out (empty, or longer than eval_max_length)
    dropped: dict[str, int] | None = None

    def use_corpus(self, corpus) -> None:
        self.dropped = {}
        super().use_corpus(corpus)

    def _max_sentence_tokens(self) -> int | None:
        m = self.data_config.max_length
        return m + 1 if m else None  # + <eos>

    def sentences(self, split: str) -> list[torch.Tensor]:
        """The words of each sentence (``<eos>`` removed); sentences without words, and for
        valid/test those longer than ``eval_max_length``, are left out (counted in
        :attr:`dropped`)."""
        if split not in self._sentences:
            limit = self.data_config.eval_max_length if split != "train" else None
            all_sentences = self.corpus.sentences(split)
            kept = [s[:-1] for s in all_sentences
                    if s.numel() > 1 and (limit is None or s.numel() - 1 <= limit)]
            self.dropped[split] = len(all_sentences) - len(kept)
            self._sentences[split] = kept
        return self._sentences[split]

    def model_name(self) -> str:
        return f"pcfg_{self.model_config.rule_type}"

    def build_model(self) -> nn.Module:
        if self.model_config.vocab_size is None:
            raise ValueError("the vocabulary size is unknown: load the data first")
        return NeuralPCFG(self.model_config)

    def count(self, batch) -> int:
        """Words plus one end of sentence per sentence."""
        return int(batch[1].sum()) + int(batch[1].numel())

    def nll(self, model, batch, generator):
        tokens, lengths = batch
        return -model(tokens, lengths).log_partition.sum()

    def extra_summary(self) -> dict[str, Any]:
        return {"sentences_dropped": dict(self.dropped)} if self.dropped else {}

    def sample(self, model, num, max_length, generator):
        itos = self.itos()
        out = model.sample_sentences(num, max_length=max_length, generator=generator)
        return [" ".join(itos[i] for i in words) for words, _ in out]


__all__ = ["PCFGTask", "PCFGDataConfig"]
