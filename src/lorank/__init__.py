"""lorank: low-rank structure for fast inference in structured models and neural networks."""

from lorank.distributions.hmm import HMM, RankSpaceHMM
from lorank.distributions.hsmm import HSMM, Segmentation
from lorank.distributions.hypergraph import Hypergraph, LowRankPotential
from lorank.distributions.pcfg import PCFG
from lorank.factors import Banded, Dense, Factor, LowRank, Sum, orthogonal_random_features
from lorank.rules import CPRules, DenseRules, LowRankRules, RankSpaceRules, Rules
from lorank.semiring import EntropySemiring, LogSemiring, MaxSemiring

__version__ = "0.1.0"

__all__ = [
    "HMM",
    "RankSpaceHMM",
    "HSMM",
    "Segmentation",
    "PCFG",
    "Rules",
    "DenseRules",
    "LowRankRules",
    "CPRules",
    "RankSpaceRules",
    "Hypergraph",
    "LowRankPotential",
    "Factor",
    "Dense",
    "LowRank",
    "Banded",
    "Sum",
    "orthogonal_random_features",
    "LogSemiring",
    "MaxSemiring",
    "EntropySemiring",
]
