"""The configuration of :func:`lorank.compress.compress`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from lorank.config import Config

METHODS = ("svd", "randomized_svd", "snmf", "fwsvd", "asvd", "whitened", "svd+sparse",
           "cospadi", "dsformer")
#: methods that need a calibration data loader
DATA_AWARE = frozenset({"fwsvd", "asvd", "whitened", "cospadi"})
#: dense dictionary x sparse codes (lorank.compress.dictionary); linear layers only
DICTIONARY_METHODS = frozenset({"cospadi", "dsformer"})
LAYER_TYPES = ("linear", "embedding", "lstm", "gru", "conv")
CONV_DECOMPOSITIONS = ("channel", "spatial")
RANK_MODES = ("rank", "param_reduction", "energy", "budget_reduction")


@dataclass(frozen=True)
class CompressConfig(Config):
    """What to factorize, how, and at which rank.

    Layer selection (PEFT conventions):

    * ``layer_types``: subset of ``("linear", "embedding", "lstm", "gru", "conv")``
      (``"linear"`` includes Hugging Face's ``Conv1D``; ``"conv"`` is ``nn.Conv1d`` and
      ``nn.Conv2d``); None means all of them.
    * ``target_modules``: a list of names — a module matches if its qualified name equals an
      entry or ends with ``"." + entry`` (``["query", "value"]``) — or one string, a regular
      expression that must match the whole qualified name.  None: every module of a selected
      type.
    * ``exclude_modules``: same syntax; matching modules are skipped.

    Method: one of ``svd``, ``randomized_svd``, ``snmf`` (semi-NMF, nonnegative right factor),
    ``fwsvd`` (Fisher-weighted; needs calibration data and a loss), ``asvd`` (activation
    scaling), ``whitened`` (SVD-LLM), ``svd+sparse`` (``A B + S``), ``cospadi`` (dense
    dictionary x sparse codes fitted on calibration outputs) and ``dsformer`` (dictionary x
    N:M codes); the last two factorize linear layers only, ``rank`` counts their atoms.

    Rank — set exactly one of:

    * ``rank``: the same rank r for every matrix (or gate block).  Must be ``<= min(m, n)``.
    * ``param_reduction``: fraction f of each matrix's weights to remove: the largest r with
      ``r (m + n) <= (1 - f) m n``.  ``0.4`` keeps at most 60% of every factorized matrix's
      weights (biases are not counted and stay as they are).
    * ``energy``: smallest r keeping this fraction of the squared singular values of the
      matrix the method truncates (the weighted / whitened one for data-aware methods).
    * ``budget_reduction``: global: the selected matrices together keep at most
      ``(1 - f)`` of their weights; ranks are allocated greedily by measured sensitivity
      (loss increase, or model output change, on the calibration data when given; relative
      reconstruction error otherwise).

    ``rank_pattern`` maps names (same syntax as ``target_modules`` entries) to fixed ranks
    that override the rank rule for those modules.

    A matrix whose rank would not save parameters (``r >= m n / (m + n)``) stays dense and
    the report says so.
    """

    method: str = "svd"
    rank: int | None = None
    param_reduction: float | None = None
    energy: float | None = None
    budget_reduction: float | None = None
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layer_types: tuple[str, ...] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    #: LSTM/GRU: which matrices ("ih" input-to-hidden, "hh" recurrent)
    rnn_matrices: tuple[str, ...] = ("ih", "hh")
    #: LSTM/GRU: "stacked" factorizes the (gates*H) x in matrix, "per_gate" each H x in block
    rnn_granularity: str = "stacked"
    #: convolutions: "channel" (C_in -> r with the kernel, then r -> C_out 1x1), "spatial"
    #: (Conv2d: k_h x 1 then 1 x k_w; Conv1d layers use "channel"), or "auto": per Conv2d,
    #: the form with the smaller weight error at the param_reduction budget, or with fewer
    #: parameters at the energy threshold; see lorank.compress.conv
    conv_decomposition: str = "channel"
    asvd_alpha: float = 0.5
    #: relative diagonal damping of the calibration Gram matrix before Cholesky
    whiten_damp: float = 1e-5
    #: svd+sparse: fraction of the m*n entries kept in S (counted as parameters)
    sparse_density: float = 0.01
    snmf_iters: int = 100
    randomized_oversample: int = 10
    randomized_iters: int = 4
    #: budget mode: candidate ranks per matrix (fractions of the largest useful rank)
    budget_candidates: int = 8
    #: budget mode: calibration batches used to measure sensitivity (None: all)
    sensitivity_batches: int | None = 4
    #: calibration: collect input Gram matrices (for whitening and the output-error column)
    #: of matrices with at most this many input features
    max_gram_features: int = 8192
    #: cospadi: candidate nonzeros-per-atom ratios s/k (the best calibration fit is kept)
    dict_sparsity: tuple[float, ...] = (0.5,)
    #: cospadi: also try the low-rank solution s = k (whitened SVD) at the same storage
    dict_lowrank_fallback: bool = True
    #: dsformer: N nonzeros in every M consecutive atoms
    dict_nm: tuple[int, int] = (2, 4)
    #: dictionary methods: alternating OMP / dictionary-update sweeps
    dict_iters: int = 6
    #: dictionary methods: regex over matrix names; matrices whose full match captures the
    #: same groups share one dictionary (same input size; fitted on their pooled inputs)
    share_dictionary: str | None = None
    seed: int = 0
    inplace: bool = False
    measure_latency: bool = True
    latency_repeats: int = 10

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        set_modes = [m for m in RANK_MODES if getattr(self, m) is not None]
        if len(set_modes) != 1:
            raise ValueError(
                f"set exactly one of {RANK_MODES} in CompressConfig, got "
                f"{set_modes or 'none'}"
            )
        if self.rank is not None:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
                raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        for name in ("param_reduction", "budget_reduction"):
            v = getattr(self, name)
            if v is not None and not 0 < v < 1:
                raise ValueError(f"{name} must lie strictly between 0 and 1, got {v!r}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"energy must lie in (0, 1], got {self.energy!r}")
        for k, v in self.rank_pattern.items():
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"rank_pattern[{k!r}] must be a positive integer, got {v!r}")
        if self.layer_types is not None:
            self._set("layer_types", tuple(self.layer_types))
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad or not self.layer_types:
                raise ValueError(f"layer_types must be a non-empty subset of {LAYER_TYPES}, "
                                 f"got {self.layer_types!r}")
        self._set("rnn_matrices", tuple(self.rnn_matrices))
        if not self.rnn_matrices or any(p not in ("ih", "hh") for p in self.rnn_matrices):
            raise ValueError(f"rnn_matrices must be a non-empty subset of ('ih', 'hh'), "
                             f"got {self.rnn_matrices!r}")
        if self.rnn_granularity not in ("stacked", "per_gate"):
            raise ValueError(f"rnn_granularity must be 'stacked' or 'per_gate', got "
                             f"{self.rnn_granularity!r}")
        if self.conv_decomposition not in CONV_DECOMPOSITIONS + ("auto",):
            raise ValueError(f"conv_decomposition must be one of {CONV_DECOMPOSITIONS} or "
                             f"'auto', got {self.conv_decomposition!r}")
        if self.conv_decomposition == "auto" and self.rank_mode not in (
                "param_reduction", "energy"):
            raise ValueError(f"conv_decomposition='auto' compares the channel and spatial forms "
                             f"at equal parameters (param_reduction) or equal energy (energy), "
                             f"not with {self.rank_mode}; pick the form yourself")
        if not 0 <= self.sparse_density < 1:
            raise ValueError(f"sparse_density must lie in [0, 1), got {self.sparse_density!r}")
        if self.whiten_damp < 0:
            raise ValueError(f"whiten_damp must be >= 0, got {self.whiten_damp!r}")
        if self.budget_candidates < 1:
            raise ValueError("budget_candidates must be >= 1")
        if self.method in DICTIONARY_METHODS:
            self._check_dictionary()

    def _check_dictionary(self) -> None:
        if self.rank_mode not in ("rank", "param_reduction"):
            raise ValueError(f"method {self.method!r} takes rank (number of atoms) or "
                             f"param_reduction, got {self.rank_mode}")
        if self.layer_types is None:
            self._set("layer_types", ("linear",))
        elif self.layer_types != ("linear",):
            raise ValueError(f"method {self.method!r} factorizes linear layers only: "
                             f"layer_types must be ('linear',), got {self.layer_types!r}")
        self._set("dict_sparsity", tuple(self.dict_sparsity))
        if not self.dict_sparsity or any(
                isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r <= 1
                for r in self.dict_sparsity):
            raise ValueError(f"dict_sparsity must be a non-empty tuple of ratios s/k in (0, 1], "
                             f"got {self.dict_sparsity!r}")
        self._set("dict_nm", tuple(self.dict_nm))
        from lorank.linalg.dictionary import check_nm

        try:
            check_nm(self.dict_nm)
        except ValueError as e:
            raise ValueError(f"dict_nm: {e}") from None
        if isinstance(self.dict_iters, bool) or not isinstance(self.dict_iters, int) or \
                self.dict_iters < 0:
            raise ValueError(f"dict_iters must be a nonnegative integer, got {self.dict_iters!r}")
        if self.share_dictionary is not None:
            try:
                re.compile(self.share_dictionary)
            except re.error as e:
                raise ValueError(f"share_dictionary is not a valid regex "
                                 f"({self.share_dictionary!r}): {e}") from None

    @property
    def rank_mode(self) -> str:
        return next(m for m in RANK_MODES if getattr(self, m) is not None)

    @property
    def data_aware(self) -> bool:
        return self.method in DATA_AWARE

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("layer_types", "rnn_matrices", "dict_sparsity", "dict_nm"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CompressConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown CompressConfig fields: {sorted(unknown)}")
        return cls(**d)
