"""lorank.compress: low-rank compression of trained networks.

``compress(model, config) -> (model, report)`` replaces the selected ``nn.Linear``,
``nn.Embedding``, ``nn.LSTM``/``nn.GRU`` (and Hugging Face attention / MLP projections, which
are ``nn.Linear`` or ``Conv1D``) by factorized modules computed with plain, randomized,
Fisher-weighted, activation-aware or whitened SVD, semi-NMF, or sparse plus low-rank.
``lorank.compress.trainable`` makes networks low-rank while they train (TRP, Maestro,
SLTrain).  See ``docs/compress.md``.
"""

from lorank.compress import trainable
from lorank.compress.config import DATA_AWARE, METHODS, CompressConfig
from lorank.compress.core import (
    compress,
    count_parameters,
    default_forward,
    find_targets,
    measure_latency,
    merge,
    output_tensor,
)
from lorank.compress.finetune import finetune
from lorank.compress.hmm import (
    attach_lowrank_transition,
    compress_hmm,
    dense_to_lowrank,
    nmf_transition,
    transition_error,
)
from lorank.compress.io import apply_structure, load_compressed, save_compressed
from lorank.compress.modules import (
    LowRankEmbedding,
    LowRankLinear,
    LowRankRNN,
    SparseLowRankLinear,
)
from lorank.compress.report import CompressionReport, LayerReport
from lorank.compress.trainable import *  # noqa: F403  (re-exported: trainable.__all__)

__all__ = [
    "compress",
    "merge",
    "CompressConfig",
    "METHODS",
    "DATA_AWARE",
    "CompressionReport",
    "LayerReport",
    "LowRankLinear",
    "SparseLowRankLinear",
    "LowRankEmbedding",
    "LowRankRNN",
    "save_compressed",
    "load_compressed",
    "apply_structure",
    "finetune",
    "nmf_transition",
    "compress_hmm",
    "attach_lowrank_transition",
    "dense_to_lowrank",
    "transition_error",
    "find_targets",
    "default_forward",
    "output_tensor",
    "measure_latency",
    "count_parameters",
    *trainable.__all__,
]
