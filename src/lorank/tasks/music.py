"""The ``music`` task: neural HMMs (dense, low-rank, banded, rank-space) with a factored
Bernoulli emission over the 88 piano keys (:class:`lorank.nn.MusicHMM`), trained on piano rolls
from music21's scores.

``lorank train --task music --corpus bach --model lhmm --states 256 --rank 64`` reports the
negative log-likelihood per time step (nats, summed over the 88 keys, averaged over time
steps), the number of the polyphonic-music literature (Boulanger-Lewandowski et al. 2012;
Chiu, Deng & Rush 2021).  Each piece is one HMM sequence.  Data come from
:func:`lorank.data.load_music` (``bach``, ``folk``, ``palestrina`` or a directory of scores;
see ``docs/data.md``).  ``metrics.json`` also holds the independent-keys baseline (per-key
Bernoulli marginals of the training split, :func:`lorank.baselines.fit_independent_keys`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorank.baselines import fit_independent_keys
from lorank.config import Config, option
from lorank.data import load_music, music_batches
from lorank.data.music import LOWEST_MIDI
from lorank.nn.hmm import MusicHMM, MusicHMMConfig
from lorank.tasks.base import Task, require_splits
from lorank.tasks.lm import upgrade_neural_hmm_state


@dataclass(frozen=True)
class MusicDataConfig(Config):
    """A music corpus, quantized to a grid of quarter lengths."""

    corpus: str = option("bach", "'bach' (the chorales), 'folk' (Ryan's Mammoth), "
                                 "'palestrina', or a directory of score files")
    grid: float | None = option(None, "quarter lengths per time step (default: the corpus "
                                      "default, 1 for bach/palestrina, 0.5 for folk)")
    max_pieces: int | None = option(None, "use only this many pieces (~70/15/15 %%), for quick "
                                          "runs")
    transpose: bool = option(True, "transpose every piece to C major / A minor")

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, str) or not self.corpus:
            raise self._error("corpus", f"corpus must be a non-empty string, got "
                                        f"{self.corpus!r}")
        self._positive_float("grid", optional=True)
        self._positive_int("max_pieces", optional=True)


#: pitch-class names for :func:`roll_to_text`
_PITCH_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


def midi_name(midi: int) -> str:
    """Scientific pitch name of a MIDI number (60 -> ``"C4"``)."""
    return f"{_PITCH_NAMES[midi % 12]}{midi // 12 - 1}"


def roll_to_text(roll: torch.Tensor) -> str:
    """A (T, 88) piano roll as one line: the sounding pitches of each step, steps separated by
    ``" | "``, a silent step as ``"-"``."""
    steps = []
    for frame in torch.as_tensor(roll).bool():
        keys = frame.nonzero().flatten().tolist()
        steps.append(" ".join(midi_name(LOWEST_MIDI + k) for k in keys) if keys else "-")
    return " | ".join(steps)


def _data_digest(ids: dict[str, list[str]], lengths: dict[str, list[int]]) -> str:
    blob = json.dumps({"ids": ids, "lengths": lengths}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class MusicTask(Task, name="music", metric="nll_per_step", unit="time_steps",
                data=MusicDataConfig, model=MusicHMMConfig):
    """Polyphonic music with neural HMMs on 88-key piano rolls; metric: NLL per time step."""

    corpus = None
    _baseline: dict[str, float] | None = None

    # ---- data ------------------------------------------------------------------------------
    def load_data(self) -> None:
        """Load the pieces and check that every split has some."""
        d = self.data_config
        self.corpus = load_music(d.corpus, grid=d.grid, max_pieces=d.max_pieces,
                                 transpose=d.transpose)
        sizes = {s: len(self.corpus.rolls(s)) for s in ("train", "valid", "test")}
        require_splits(sizes, f"music corpus {d.corpus!r}",
                       " (use more pieces: --max-pieces >= 3)")
        self._baseline = None

    def build_model(self) -> nn.Module:
        return MusicHMM(self.model_config)

    def upgrade_state(self, state, version):
        return upgrade_neural_hmm_state(state, version)

    def batches(self, split, *, batch_size, max_tokens=None, **order):
        """Padded piano-roll batches ``(rolls (B, T, 88) float, lengths (B,))``;
        ``max_tokens`` caps ``pieces x longest`` time steps."""
        if self.corpus is None:
            raise RuntimeError("call load_data() before batches()")
        return music_batches(self.corpus.rolls(split), batch_size, max_steps=max_tokens, **order)

    # ---- reporting -------------------------------------------------------------------------
    def independent_keys(self) -> dict[str, float]:
        """The independent-keys baseline on this corpus (alpha chosen on valid):
        ``{"alpha", "val_nll_per_step", "test_nll_per_step"}``."""
        if self._baseline is None:
            _, r = fit_independent_keys(self.corpus)
            self._baseline = {"alpha": r["alpha"], "val_nll_per_step": r["valid_nll_per_step"]}
            if "test_nll_per_step" in r:
                self._baseline["test_nll_per_step"] = r["test_nll_per_step"]
        return dict(self._baseline)

    def baselines(self) -> dict[str, dict[str, float]]:
        return {"independent_keys": self.independent_keys()}

    def extra_summary(self) -> dict[str, Any]:
        if self.corpus is None:
            return {}
        return {"grid": self.corpus.grid,
                "pieces": {s: len(self.corpus.rolls(s)) for s in ("train", "valid", "test")},
                "baselines": self.baselines()}

    def metadata(self) -> dict[str, Any]:
        ids = self.corpus.ids
        lengths = {s: [int(r.shape[0]) for r in self.corpus.rolls(s)] for s in ids}
        return {
            "grid": self.corpus.grid,
            "time_steps": {s: sum(v) for s, v in lengths.items()},
            "data_sha": _data_digest(ids, lengths),
        }

    def check_metadata(self, meta: dict[str, Any]) -> None:
        want = meta.get("task_meta", {}).get("data_sha")
        if want is None or meta.get("data_config", {}).get("corpus") != self.data_config.corpus:
            return  # an older checkpoint, or deliberately evaluated on another corpus
        have = self.metadata()["data_sha"]
        if want != have:
            raise ValueError(
                f"the music corpus {self.data_config.corpus!r} gives different pieces than the "
                f"checkpoint was trained on (data hash {have} != {want}; the music21 version, "
                f"grid or cache version may have changed)"
            )

    def sample(self, model, num, max_length, generator):
        """``num`` pieces of ``max_length`` steps from the model's prior, one line each
        (see :func:`roll_to_text`)."""
        _, frames = model.sample_paths(num, max_length, generator)
        rolls = torch.stack(frames, 1)  # (num, T, 88) bool
        return [roll_to_text(r) for r in rolls]


__all__ = ["MusicTask", "MusicDataConfig", "midi_name", "roll_to_text"]
