"""Real time series for the semi-Markov models: weekly atmospheric CO2 at Mauna Loa.

``load_co2()`` reads the ``co2`` data set that the PyPI package ``statsmodels`` ships
(``statsmodels/datasets/co2/co2.csv``: 2284 weeks, 1958-03-29 .. 2001-12-29, ppm, 59 weeks
missing).  Only the CSV file is read (located with ``importlib.util.find_spec``); statsmodels
itself is never imported, and nothing is downloaded.  Missing weeks are linearly interpolated.

``co2_splits()`` turns it into HSMM training data as in ``benchmarks/lhsmm_co2.py``: weekly
differences (the trend removed, the seasonal cycle kept), split in time (train, then valid,
then the last ``test_fraction`` of the weeks as test), standardized with the training
statistics, and cut into windows: overlapping ones (``train_stride``) for training and
non-overlapping ones covering the held-out weeks for evaluation.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorank._checks import check_positive_int, check_probability

__all__ = ["SeriesSplits", "co2_csv", "load_co2", "series_windows", "co2_splits"]

#: the CSV inside the statsmodels package
CO2_RELATIVE_PATH = ("datasets", "co2", "co2.csv")
INSTALL_HINT = "pip install statsmodels"


def co2_csv() -> Path:
    """The path of statsmodels' ``co2.csv``; a ModuleNotFoundError naming
    ``pip install statsmodels`` when the package is missing."""
    spec = importlib.util.find_spec("statsmodels")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the CO2 series is read from the PyPI package statsmodels, which is not installed: "
            f"{INSTALL_HINT}  (only its data file is used; or pass the path of a co2.csv)"
        )
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*CO2_RELATIVE_PATH)
    if not path.is_file():
        raise FileNotFoundError(
            f"statsmodels is installed but has no {'/'.join(CO2_RELATIVE_PATH)} ({path}); "
            f"reinstall it: {INSTALL_HINT}"
        )
    return path


def load_co2(path: str | os.PathLike | None = None) -> torch.Tensor:
    """The weekly CO2 series (N,) float64 in ppm, missing weeks linearly interpolated.

    ``path``: a CSV with a ``co2`` column (default: statsmodels' copy, see :func:`co2_csv`)."""
    path = co2_csv() if path is None else Path(path)
    vals: list[float] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "co2" not in reader.fieldnames:
            raise ValueError(f"{str(path)!r} has no 'co2' column (columns: {reader.fieldnames})")
        for row in reader:
            text = (row["co2"] or "").strip()
            vals.append(float(text) if text else float("nan"))
    x = np.asarray(vals, dtype=np.float64)
    ok = ~np.isnan(x)
    if ok.sum() < 2:
        raise ValueError(f"{str(path)!r} holds fewer than two CO2 values")
    idx = np.arange(len(x), dtype=np.float64)
    return torch.from_numpy(np.interp(idx, idx[ok], x[ok]))


def series_windows(
    x: torch.Tensor, length: int, stride: int, keep_remainder: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of a (N,) or (N, D) series: ``(windows (W, length, D) float32 zero-padded,
    lengths (W,))``, starting every ``stride`` steps.  ``keep_remainder`` adds a final
    shorter window holding the steps no full window reached (so non-overlapping windows,
    ``stride == length``, cover every step exactly once)."""
    check_positive_int("length", length)
    check_positive_int("stride", stride)
    x = x.unsqueeze(-1) if x.dim() == 1 else x
    if x.dim() != 2:
        raise ValueError(f"series must have shape (N,) or (N, D), got {tuple(x.shape)}")
    n = x.shape[0]
    starts = list(range(0, n - length + 1, stride)) if n >= length else []
    spans = [(s, length) for s in starts]
    covered = starts[-1] + length if starts else 0
    if keep_remainder and covered < n:
        start = covered if stride >= length or not starts else starts[-1] + stride
        spans.append((start, n - start))
    if not spans:
        raise ValueError(
            f"a series of {n} steps holds no window of {length} steps (pass keep_remainder=True "
            f"or a shorter window)"
        )
    out = torch.zeros(len(spans), length, x.shape[1], dtype=torch.float32)
    for i, (s, ln) in enumerate(spans):
        out[i, :ln] = x[s : s + ln].float()
    return out, torch.tensor([ln for _, ln in spans], dtype=torch.long)


@dataclass(eq=False)
class SeriesSplits:
    """Windows per split: ``windows[split]`` (W, L, D) float32 (zero-padded) and
    ``lengths[split]`` (W,); ``mean``/``std`` the training statistics used to standardize."""

    name: str
    windows: dict[str, torch.Tensor]
    lengths: dict[str, torch.Tensor]
    mean: float
    std: float
    weeks: dict[str, int]

    def steps(self, split: str) -> int:
        """Time steps of ``split`` (padding excluded)."""
        return int(self.lengths[split].sum())


def co2_splits(
    window: int = 104,
    train_stride: int = 26,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.2,
    path: str | os.PathLike | None = None,
    eval_remainder: bool = True,
) -> SeriesSplits:
    """Standardized weekly CO2 differences in windows (see the module docstring).

    The differenced series (N - 1 weeks) is split in time: the last ``test_fraction`` test,
    the ``valid_fraction`` before it valid, the rest train (``valid_fraction=0``: no
    validation split, the set-up of ``benchmarks/lhsmm_co2.py``).  Training windows start
    every ``train_stride`` weeks; valid and test windows do not overlap and cover every week
    of their split, the last one shorter (``eval_remainder=False`` drops that last partial
    window, as ``benchmarks/lhsmm_co2.py`` does).  ``path``: a CSV with a ``co2`` column
    instead of statsmodels' copy."""
    check_probability("valid_fraction", valid_fraction)
    check_probability("test_fraction", test_fraction)
    if valid_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"valid_fraction + test_fraction must be < 1 (training needs weeks), got "
            f"{valid_fraction} + {test_fraction}"
        )
    series = load_co2(path)
    diff = series[1:] - series[:-1]
    n = diff.shape[0]
    cut_test = int(round((1.0 - test_fraction) * n))
    cut_valid = int(round((1.0 - test_fraction - valid_fraction) * n))
    parts = {"train": diff[:cut_valid], "valid": diff[cut_valid:cut_test], "test": diff[cut_test:]}
    train = parts["train"]
    if train.shape[0] < window:
        raise ValueError(
            f"the training part has {train.shape[0]} weeks, fewer than window={window}"
        )
    mean, std = float(train.mean()), float(train.std())
    windows, lengths = {}, {}
    for split, x in parts.items():
        z = (x - mean) / std
        if split == "train":
            w, ln = series_windows(z, window, train_stride)
        elif x.shape[0] == 0:
            w, ln = torch.zeros(0, window, 1), torch.zeros(0, dtype=torch.long)
        else:
            w, ln = series_windows(z, window, window, keep_remainder=eval_remainder)
        windows[split], lengths[split] = w, ln
    weeks = {s: int(x.shape[0]) for s, x in parts.items()}
    return SeriesSplits("co2", windows, lengths, mean, std, weeks)
