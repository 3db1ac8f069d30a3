"""lorank.nn: modules that map parameters to a distribution for a batch.

* :mod:`lorank.nn.hmm`: neural HMMs (dense softmax, LHMM, LHMM + band, rank-space) and the
  word-level :class:`HMMLanguageModel`;
* :mod:`lorank.nn.emissions`: emission heads (softmax over words, Bernoulli over 88 keys);
* :mod:`lorank.nn.pcfg`, :mod:`lorank.nn.hsmm`: neural PCFGs and the LHSMM;
* :mod:`lorank.nn.attention`: low-rank multi-head attention pooling (LAMA).
"""

from lorank.nn.attention import LowRankMultiHeadAttention
from lorank.nn.emissions import Bernoulli88Emission, EmissionHead, SoftmaxEmission
from lorank.nn.hmm import MODELS, HMMLanguageModel, NeuralHMM

__all__ = [
    "NeuralHMM",
    "HMMLanguageModel",
    "MODELS",
    "EmissionHead",
    "SoftmaxEmission",
    "Bernoulli88Emission",
    "LowRankMultiHeadAttention",
]
