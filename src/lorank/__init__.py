"""lorank: low-rank structure for fast inference in structured models and neural networks."""

from lorank.distributions.hmm import HMM, RankSpaceHMM
from lorank.factors import Banded, Dense, Factor, LowRank, Sum, orthogonal_random_features
from lorank.semiring import EntropySemiring, LogSemiring, MaxSemiring

__version__ = "0.1.0"

__all__ = [
    "HMM",
    "RankSpaceHMM",
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
