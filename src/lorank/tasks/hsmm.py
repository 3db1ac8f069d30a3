"""The ``hsmm`` task: :class:`lorank.nn.LHSMM` (or its dense-transition baseline) on the weekly
Mauna Loa CO2 series (:func:`lorank.data.series.co2_splits`, which needs the PyPI package
``statsmodels`` for its data file); metric: NLL per time step (nats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorank.config import Config, option
from lorank.data._batching import padded_batches
from lorank.data.series import co2_splits
from lorank.nn.hsmm import LHSMM, HSMMConfig
from lorank.tasks.base import Task, require_splits


@dataclass(frozen=True)
class SeriesDataConfig(Config):
    """A univariate series cut into windows, split by time."""

    series: str = option("co2", "co2 (weekly Mauna Loa CO2 from statsmodels' data; the only "
                                "built-in series)", choices=("co2",))
    csv: str | None = option(None, "read the CO2 series from this CSV (a 'co2' column) instead")
    window: int = option(104, "weeks per sequence")
    train_stride: int = option(26, "weeks between training windows")
    valid_fraction: float = option(0.1, "fraction of the weeks held out for validation")
    test_fraction: float = option(0.2, "fraction of the weeks held out for test")

    def __post_init__(self) -> None:
        self._choice("series", ("co2",))
        self._positive_int("window", "train_stride")
        self._positive_float("valid_fraction", "test_fraction")
        if self.valid_fraction + self.test_fraction >= 1:
            raise self._error("valid_fraction", f"valid_fraction + test_fraction must be < 1, "
                                                f"got {self.valid_fraction} + "
                                                f"{self.test_fraction}")


class HSMMTask(Task, name="hsmm", metric="nll_per_step", unit="time_steps",
               data=SeriesDataConfig, model=HSMMConfig):
    """Low-rank (or dense) HSMMs on the weekly CO2 series; metric: NLL per time step."""

    data = None

    # ---- data ------------------------------------------------------------------------------
    def load_data(self) -> None:
        """Load the series, cut it into windows, and check every split has some."""
        d = self.data_config
        self.data = co2_splits(d.window, d.train_stride, valid_fraction=d.valid_fraction,
                               test_fraction=d.test_fraction, path=d.csv)
        require_splits({s: int(w.shape[0]) for s, w in self.data.windows.items()},
                       f"series {d.series!r}")

    def build_model(self) -> nn.Module:
        init = None
        if self.data is not None:  # means start at random training observations
            w, ln = self.data.windows["train"], self.data.lengths["train"]
            mask = torch.arange(w.shape[1]).unsqueeze(0) < ln.unsqueeze(1)
            init = w[mask]
        return LHSMM(self.model_config, init_data=init)

    def batches(self, split, *, batch_size, max_tokens=None, **order):
        """``(windows (B, T, 1), lengths (B,))`` batches; ``max_tokens`` caps ``B x T``."""
        if self.data is None:
            raise RuntimeError("call load_data() before batches()")
        windows, lengths = self.data.windows[split], self.data.lengths[split]
        items = [w[: int(n)] for w, n in zip(windows, lengths, strict=True)]
        return padded_batches(items, batch_size, max_tokens=max_tokens, **order)

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

    def extra_summary(self) -> dict[str, Any]:
        if self.data is None:
            return {}
        return {"weeks": dict(self.data.weeks), "baselines": self.baselines()}

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


__all__ = ["HSMMTask", "SeriesDataConfig"]
