"""The ``music`` task: neural HMMs (dense, low-rank, banded, rank-space) with a factored
Bernoulli emission over the 88 piano keys, trained on piano rolls from music21's scores.

``lorank train --task music --corpus bach --model lhmm --states 256 --rank 64`` reports the
negative log-likelihood per time step (nats, summed over the 88 keys, averaged over time
steps), the number of the polyphonic-music literature (Boulanger-Lewandowski et al. 2012;
Chiu, Deng & Rush 2021 report HMM 5.74 vs LHMM 5.80 on JSB).  Each piece is one HMM sequence.
Data come from :func:`lorank.data.load_music` (``bach``, ``folk``, ``palestrina`` or a
directory of scores; see ``docs/data.md``), emissions from
:class:`lorank.nn.emissions.Bernoulli88Emission`, transitions from
:class:`lorank.nn.hmm.NeuralHMM`.  ``metrics.json`` also holds the independent-keys baseline
(per-key Bernoulli marginals of the training split, :func:`lorank.baselines.fit_independent_keys`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Any

import torch
from torch import nn

from lorank.train.tasks import (
    LMTask,
    Task,
    add_hmm_model_arguments,
    hmm_model_config,
    register_task,
)

#: pitch-class names for :func:`roll_to_text`
_PITCH_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


def midi_name(midi: int) -> str:
    """Scientific pitch name of a MIDI number (60 -> ``"C4"``)."""
    return f"{_PITCH_NAMES[midi % 12]}{midi // 12 - 1}"


def roll_to_text(roll: torch.Tensor) -> str:
    """A (T, 88) piano roll as one line: the sounding pitches of each step, steps separated by
    ``" | "``, a silent step as ``"-"``."""
    from lorank.data.music import LOWEST_MIDI

    steps = []
    for frame in torch.as_tensor(roll).bool():
        keys = frame.nonzero().flatten().tolist()
        steps.append(" ".join(midi_name(LOWEST_MIDI + k) for k in keys) if keys else "-")
    return " | ".join(steps)


def _data_digest(ids: dict[str, list[str]], lengths: dict[str, list[int]]) -> str:
    blob = json.dumps({"ids": ids, "lengths": lengths}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _check_nonneg_int(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a nonnegative integer, got {v!r}")


@register_task
class MusicTask(Task):
    """Polyphonic music with neural HMMs on 88-key piano rolls; metric: NLL per time step."""

    name = "music"
    metric = "nll_per_step"
    unit = "steps"

    #: model-config keys passed to :class:`lorank.nn.hmm.NeuralHMM`
    HMM_KEYS = ("model", "num_states", "rank", "band", "mlp_layers", "state_dropout",
                "feature_dropout", "memory_light", "init_scale")  # fmt: skip

    def __init__(self, data_config: dict[str, Any], model_config: dict[str, Any]):
        super().__init__(data_config, model_config)
        self.corpus = None
        self._baseline: dict[str, float] | None = None

    # ---- command line ----------------------------------------------------------------------
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("polyphonic music (--task music)")
        g.add_argument("--corpus", default=None,
                       help="'bach' (default; the chorales), 'folk' (Ryan's Mammoth), "
                            "'palestrina', or a directory of score files")  # fmt: skip
        g.add_argument("--grid", type=float, default=None,
                       help="quarter lengths per time step (default: corpus default, "
                            "1 for bach/palestrina, 0.5 for folk)")  # fmt: skip
        g.add_argument("--max-pieces", type=int, default=None,
                       help="use only this many pieces (~70/15/15 %%), for quick runs")
        g.add_argument("--no-transpose", action="store_true",
                       help="keep every piece in its written key")
        # init scale 1: the setting docs/music.md was measured with
        add_hmm_model_arguments(g, default_hidden=128, default_init_scale=1.0)
        g.add_argument("--emission-layers", type=int, default=1,
                       help="residual layers of the key-logit MLP (0: linear in the state "
                            "embedding)")  # fmt: skip

    @classmethod
    def configs_from_args(cls, args: argparse.Namespace) -> tuple[dict, dict]:
        data = {
            "corpus": args.corpus or "bach",
            "grid": args.grid,
            "max_pieces": args.max_pieces,
            "transpose": not args.no_transpose,
        }
        model = hmm_model_config(args, default_states=256, default_hidden=128)
        model["emission_layers"] = args.emission_layers
        return data, model

    @classmethod
    def check_model_config(cls, config: dict[str, Any]) -> None:
        """Validate a model config before any data is loaded (clear CLI errors); fills in the
        default rank and the canonical model name."""
        LMTask.check_model_config(config)  # states, rank, band, model name
        h = config.get("hidden", 128)
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise ValueError(f"hidden must be a positive integer, got {h!r}")
        _check_nonneg_int("mlp_layers", config.get("mlp_layers", 2))
        _check_nonneg_int("emission_layers", config.get("emission_layers", 1))

    # ---- data ------------------------------------------------------------------------------
    def load_data(self) -> None:
        from lorank.data import load_music

        d = self.data_config
        self.corpus = load_music(
            d["corpus"],
            grid=d.get("grid"),
            max_pieces=d.get("max_pieces"),
            transpose=d.get("transpose", True),
        )
        if not self.corpus.train or not self.corpus.valid:
            sizes = {s: len(self.corpus.rolls(s)) for s in ("train", "valid", "test")}
            raise ValueError(
                f"music corpus {d['corpus']!r} needs training and validation pieces, got "
                f"{sizes} (use more pieces: --max-pieces >= 3)"
            )
        self._baseline = None

    def build_model(self) -> nn.Module:
        from lorank.data.music import NUM_KEYS
        from lorank.nn.emissions import Bernoulli88Emission
        from lorank.nn.hmm import NeuralHMM

        c = self.model_config
        head = Bernoulli88Emission(c.get("hidden", 128), NUM_KEYS, c.get("emission_layers", 1))
        kwargs = {k: c[k] for k in self.HMM_KEYS if k in c}
        num_states = kwargs.pop("num_states")
        return NeuralHMM(num_states, head, **kwargs)

    def batches(self, split, *, batch_size, max_tokens=None, shuffle=False, seed=0, rank=0,
                world_size=1):  # fmt: skip
        """Padded piano-roll batches ``(rolls (B, T, 88) float, lengths (B,))``;
        ``max_tokens`` caps ``pieces x longest`` time steps."""
        from lorank.data import music_batches

        if self.corpus is None:
            raise RuntimeError("call load_data() before batches()")
        return music_batches(
            self.corpus.rolls(split),
            batch_size,
            shuffle=shuffle,
            seed=seed,
            max_steps=max_tokens,
            rank=rank,
            world_size=world_size,
        )

    # ---- reporting -------------------------------------------------------------------------
    def independent_keys(self) -> dict[str, float]:
        """The independent-keys baseline on this corpus (alpha chosen on valid):
        ``{"alpha", "val_nll_per_step", "test_nll_per_step"}``."""
        if self._baseline is None:
            from lorank.baselines import fit_independent_keys

            _, r = fit_independent_keys(self.corpus)
            self._baseline = {"alpha": r["alpha"], "val_nll_per_step": r["valid_nll_per_step"]}
            if "test_nll_per_step" in r:
                self._baseline["test_nll_per_step"] = r["test_nll_per_step"]
        return dict(self._baseline)

    def baselines(self) -> dict[str, dict[str, float]]:
        return {"independent_keys": self.independent_keys()}

    def summary(self, model: nn.Module) -> dict[str, Any]:
        c = self.model_config
        out: dict[str, Any] = {
            "model": c["model"],
            "states": c["num_states"],
            "rank": c.get("rank") if c["model"] != "hmm" else None,
            "band": getattr(model, "band", c.get("band")),
            "hidden": c.get("hidden"),
            "corpus": self.data_config["corpus"],
            "params": sum(p.numel() for p in model.parameters()),
        }
        if self.corpus is not None:
            out["grid"] = self.corpus.grid
            out["pieces"] = {s: len(self.corpus.rolls(s)) for s in ("train", "valid", "test")}
            out["baselines"] = self.baselines()
        return out

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
        if want is None or meta.get("data_config", {}).get("corpus") != self.data_config["corpus"]:
            return  # an older checkpoint, or deliberately evaluated on another corpus
        have = self.metadata()["data_sha"]
        if want != have:
            raise ValueError(
                f"the music corpus {self.data_config['corpus']!r} gives different pieces than the "
                f"checkpoint was trained on (data hash {have} != {want}; the music21 version, "
                f"grid or cache version may have changed)"
            )

    def sample(self, model, num, max_length, generator):
        """``num`` pieces of ``max_length`` steps from the model's prior, one line each
        (see :func:`roll_to_text`)."""
        _, frames = model.sample_paths(num, max_length, generator)
        rolls = torch.stack(frames, 1)  # (num, T, 88) bool
        return [roll_to_text(r) for r in rolls]


__all__ = ["MusicTask", "midi_name", "roll_to_text"]
