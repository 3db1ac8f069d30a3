"""lorank.compress: low-rank compression of trained networks.

``compress(model, config) -> (model, report)`` replaces the selected ``nn.Linear``,
``nn.Embedding``, ``nn.LSTM``/``nn.GRU``, ``nn.Conv1d``/``nn.Conv2d`` (and Hugging Face
attention / MLP projections, which are ``nn.Linear`` or ``Conv1D``) by factorized modules
computed with plain, randomized, Fisher-weighted, activation-aware or whitened SVD, semi-NMF,
or sparse plus low-rank; linear layers can also become a dense dictionary times sparse codes
(CoSpaDi, DSFormer).  Adapters (LoRA, WaRA) heal a compressed model.
``lorank.compress.trainable`` makes networks low-rank while they train (TRP, Maestro,
SLTrain).  See ``docs/compress.md``.
"""

from lorank.compress import trainable
from lorank.compress.adapters import (
    AdaptedLinear,
    AdapterConfig,
    adapter_parameters,
    attach_adapters,
    heal,
    load_adapters,
    merge_adapters,
    save_adapters,
)
from lorank.compress.config import DATA_AWARE, DICTIONARY_METHODS, METHODS, CompressConfig
from lorank.compress.conv import ConvFactorization, LowRankConv, SparseLowRankConv
from lorank.compress.core import (
    compress,
    count_parameters,
    default_forward,
    find_targets,
    measure_latency,
    merge,
    output_tensor,
)
from lorank.compress.dictionary import SparseDictionaryLinear, straight_through_finetune
from lorank.compress.finetune import finetune
from lorank.compress.hmm import (
    FixedLowRankTransition,
    break_even_rank,
    compress_hmm,
    dense_to_lowrank,
    nmf_transition,
    transition_error,
)
from lorank.compress.io import apply_structure, load_compressed, read_compressed, save_compressed
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
    "DICTIONARY_METHODS",
    "SparseDictionaryLinear",
    "straight_through_finetune",
    "attach_adapters",
    "heal",
    "merge_adapters",
    "save_adapters",
    "load_adapters",
    "adapter_parameters",
    "AdapterConfig",
    "AdaptedLinear",
    "CompressionReport",
    "LayerReport",
    "LowRankLinear",
    "SparseLowRankLinear",
    "LowRankEmbedding",
    "LowRankRNN",
    "LowRankConv",
    "SparseLowRankConv",
    "ConvFactorization",
    "save_compressed",
    "load_compressed",
    "apply_structure",
    "finetune",
    "nmf_transition",
    "compress_hmm",
    "FixedLowRankTransition",
    "break_even_rank",
    "read_compressed",
    "dense_to_lowrank",
    "transition_error",
    "find_targets",
    "default_forward",
    "output_tensor",
    "measure_latency",
    "count_parameters",
    *trainable.__all__,
]
