"""lorank.linalg: the low-rank factorization algorithms shared by ``lorank.compress`` and the
structured models (e.g. turning a dense HMM transition into a ``LowRank`` factor).

Convention: ``X (m x n) ≈ A @ B`` with ``A`` m x r and ``B`` r x n (NMF: ``W @ H``).  For a
PyTorch layer ``y = x @ W^T`` with ``W`` (out x in), ``A`` maps rank space to outputs and ``B``
maps inputs to rank space.  Work is done in float64 on CPU; results come back in the input's
dtype.
"""

from lorank.linalg.dictionary import (
    check_nm,
    dictionary_bytes,
    omp,
    sparse_dictionary,
    support_bytes,
)
from lorank.linalg.nmf import kl_divergence, nmf, semi_nmf, semi_nmf_objective
from lorank.linalg.rank import (
    RankCandidate,
    allocate_ranks,
    lowrank_params,
    max_useful_rank,
    rank_for_energy,
    rank_for_param_reduction,
    saves_parameters,
    tail_energy,
)
from lorank.linalg.sparse import nnz_for_density, sparse_plus_low_rank
from lorank.linalg.svd import (
    activation_aware_svd,
    fisher_row_weights,
    fisher_weighted_svd,
    randomized_svd,
    scaled_svd,
    svd_spectrum,
    truncated_svd,
    whitened_svd,
    whitening_factor,
)

__all__ = [
    "truncated_svd",
    "randomized_svd",
    "scaled_svd",
    "fisher_weighted_svd",
    "fisher_row_weights",
    "activation_aware_svd",
    "whitened_svd",
    "whitening_factor",
    "svd_spectrum",
    "semi_nmf",
    "semi_nmf_objective",
    "nmf",
    "kl_divergence",
    "sparse_plus_low_rank",
    "nnz_for_density",
    "lowrank_params",
    "max_useful_rank",
    "saves_parameters",
    "rank_for_param_reduction",
    "rank_for_energy",
    "tail_energy",
    "RankCandidate",
    "allocate_ranks",
    "sparse_dictionary",
    "omp",
    "dictionary_bytes",
    "support_bytes",
    "check_nm",
]
