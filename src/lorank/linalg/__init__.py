"""lorank.linalg: the low-rank factorization algorithms shared by ``lorank.compress`` and the
structured models (e.g. turning a dense HMM transition into a ``LowRank`` factor).

Convention: ``X (m x n) ≈ A @ B`` with ``A`` m x r and ``B`` r x n (NMF: ``W @ H``).  For a
PyTorch layer ``y = x @ W^T`` with ``W`` (out x in), ``A`` maps rank space to outputs and ``B``
maps inputs to rank space.  Work is done in float64 on CPU; results come back in the input's
dtype.
"""

from lorank.linalg import dictionary as _dictionary
from lorank.linalg import nmf as _nmf
from lorank.linalg import rank as _rank
from lorank.linalg import sparse as _sparse
from lorank.linalg import svd as _svd
from lorank.linalg.dictionary import *  # noqa: F403
from lorank.linalg.nmf import *  # noqa: F403
from lorank.linalg.rank import *  # noqa: F403
from lorank.linalg.sparse import *  # noqa: F403
from lorank.linalg.svd import *  # noqa: F403

#: every public name of the submodules (wavelet transforms live in lorank.linalg.wavelet)
__all__ = [*_svd.__all__, *_nmf.__all__, *_sparse.__all__, *_rank.__all__,
           *_dictionary.__all__]
