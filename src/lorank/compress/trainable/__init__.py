"""Trainable low rank: networks made low-rank while they train.

* TRP (Xu et al. 2019): :class:`TRP` / :class:`TRPConfig`, optimizer hooks that periodically
  project the selected weights onto their truncated SVD and add a nuclear-norm subgradient.
* Maestro (Horvath et al. 2024): :class:`Maestro` / :class:`MaestroConfig` with the layers
  :class:`MaestroLinear` and :class:`MaestroRNN` (ordered dropout, hierarchical group
  lasso, truncation to any prefix).
* SLTrain (Han et al. 2024): :func:`sltrain` / :class:`SLTrainConfig` and
  :class:`SLTrainLinear` (low rank plus a fixed random sparse support).
* :func:`train_low_rank`: train with any of them and return the factorized model and report.

Layer selection follows :func:`lorank.compress.compress` (``target_modules``,
``exclude_modules``, ``layer_types``, ``rnn_matrices``, ``rnn_granularity``); results convert
to the modules and report of ``lorank.compress`` and save with ``save_compressed``.
"""

from lorank.compress.trainable.maestro import (
    Maestro,
    MaestroConfig,
    MaestroLinear,
    MaestroRNN,
    group_norms,
)
from lorank.compress.trainable.sltrain import (
    SLTrainConfig,
    SLTrainLinear,
    sltrain,
    sltrain_report,
    sparse_lowrank_linear,
)
from lorank.compress.trainable.train import train_low_rank
from lorank.compress.trainable.trp import TRP, TRPConfig

__all__ = [
    "TRP",
    "TRPConfig",
    "Maestro",
    "MaestroConfig",
    "MaestroLinear",
    "MaestroRNN",
    "group_norms",
    "SLTrainConfig",
    "SLTrainLinear",
    "sltrain",
    "sltrain_report",
    "sparse_lowrank_linear",
    "train_low_rank",
]
