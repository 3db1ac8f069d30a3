"""lorank.nn: modules that map parameters to a distribution for a batch, each built from its
frozen config dataclass.

* :mod:`lorank.nn.hmm`: neural HMMs (dense softmax, LHMM, LHMM + band, rank-space) with a
  swappable transition network; the word-level :class:`HMMLanguageModel` and :class:`MusicHMM`;
* :mod:`lorank.nn.emissions`: emission heads (softmax over words, Bernoulli over 88 keys);
* :mod:`lorank.nn.pcfg`, :mod:`lorank.nn.hsmm`: neural PCFGs and the LHSMM;
* :mod:`lorank.nn.attention`: low-rank multi-head attention pooling (LAMA).
"""

from lorank.nn.attention import LowRankMultiHeadAttention
from lorank.nn.emissions import Bernoulli88Emission, EmissionHead, SoftmaxEmission
from lorank.nn.hmm import (
    MODELS,
    HMMConfig,
    HMMLanguageModel,
    HMMLMConfig,
    MLPTransition,
    MusicHMM,
    MusicHMMConfig,
    NeuralHMM,
    TransitionNet,
)
from lorank.nn.hsmm import LHSMM, HSMMConfig
from lorank.nn.pcfg import NeuralPCFG, PCFGConfig

__all__ = [
    "NeuralHMM",
    "HMMLanguageModel",
    "MusicHMM",
    "HMMConfig",
    "HMMLMConfig",
    "MusicHMMConfig",
    "TransitionNet",
    "MLPTransition",
    "MODELS",
    "NeuralPCFG",
    "PCFGConfig",
    "LHSMM",
    "HSMMConfig",
    "EmissionHead",
    "SoftmaxEmission",
    "Bernoulli88Emission",
    "LowRankMultiHeadAttention",
]
