"""HMM posterior distributions over state paths, batch-first, like ``torch.distributions``."""

from __future__ import annotations

from functools import cached_property

import torch

from lorank._checks import check_lengths, check_positive_int, check_tensor, check_values
from lorank._inputs import check_precision
from lorank.dp import chain
from lorank.factors import Factor, LowRank
from lorank.semiring import EntropySemiring


def _check_structure(init: torch.Tensor, transition: Factor, emission: torch.Tensor) -> None:
    """Types, shapes and dtypes of chain-model inputs (no pass over their values)."""
    if not isinstance(transition, Factor):
        raise TypeError(
            "transition must be a lorank factor (Dense, LowRank, Banded or a sum), "
            f"got {type(transition).__name__}"
        )
    check_tensor("emission", emission, ndim=3, values=False)
    check_precision("emission", emission)
    b, t_len, z = emission.shape
    if t_len < 1:
        raise ValueError(f"emission must have at least one time step, got shape {(b, t_len, z)}")
    check_tensor("init", init, ndim=(1, 2), values=False)
    if init.shape[-1] != z or (init.dim() == 2 and init.shape[0] != b):
        raise ValueError(
            f"init must have shape ({z},) or ({b}, {z}) to match emission {tuple(emission.shape)}, "
            f"got {tuple(init.shape)}"
        )
    if transition.num_states != z:
        raise ValueError(
            f"transition has {transition.num_states} states but emission "
            f"{tuple(emission.shape)} has {z}"
        )
    for name, dtype in (("init", init.dtype), ("transition", transition.dtype)):
        if dtype != emission.dtype:
            raise TypeError(
                f"{name} has dtype {dtype} but emission {tuple(emission.shape)} has dtype "
                f"{emission.dtype}; all inputs must share one floating dtype"
            )
    if len(transition.batch_shape) and tuple(transition.batch_shape) != (b,):
        raise ValueError(
            f"a batched transition must have batch shape ({b},) to match emission "
            f"{tuple(emission.shape)}, got {tuple(transition.batch_shape)}"
        )


def _check_init_values(init: torch.Tensor) -> None:
    check_values("init", init)
    if init.numel() and torch.isneginf(init).all(-1).any():
        raise ValueError(f"init (shape {tuple(init.shape)}) has a row that is all -inf")


def prepare_chain_inputs(
    init: torch.Tensor, transition: Factor, emission: torch.Tensor, lengths
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate chain-model inputs (HMM, HSMM); return (init_logp (B, Z), lengths (B,)).

    One max-reduction per tensor finds NaN and +inf (:func:`lorank._checks.check_values`)."""
    _check_structure(init, transition, emission)
    check_values("emission", emission)
    _check_init_values(init)
    b, t_len, z = emission.shape
    lengths = check_lengths(lengths, b, t_len, emission.device)
    init_logp = torch.log_softmax(init, dim=-1).expand(b, z)
    return init_logp, lengths


def _unchecked_lengths(lengths, b: int, t_len: int, device: torch.device) -> torch.Tensor:
    if lengths is None:
        return torch.full((b,), t_len, dtype=torch.long, device=device)
    return torch.as_tensor(lengths).to(device=device, dtype=torch.long)


def _check_dead_rows(log_norm: torch.Tensor) -> None:
    dead = torch.isneginf(log_norm.detach())
    if dead.any():
        # padding relies on every row of P summing to one (padded steps keep the mass)
        states = sorted({int(i) for i in dead.nonzero()[:, -1]})
        raise ValueError(
            f"transition has states with no successor (all -inf potentials in their row): "
            f"{states[:10]}; every row of the transition must have a finite entry"
        )


class _ChainInputs:
    """Validated HMM inputs with the pieces the forward pass reuses: the per-step emission
    max (one pass, also the NaN/+inf check) and the normalized transition terms (the
    normalizer computed once, also the dead-row check)."""

    def __init__(self, init, transition, emission, lengths, validate_args: bool):
        _check_structure(init, transition, emission)
        b, t_len, z = emission.shape
        self.transition = transition
        self.terms = None
        self.terms_grad = False
        self.emission_max = None
        if validate_args:
            with torch.no_grad():
                self.emission_max = emission.detach().amax(-1)
            check_values("emission", emission, reduced=self.emission_max)
            _check_init_values(init)
            self.lengths = check_lengths(lengths, b, t_len, emission.device)
            log_norm, self.terms = transition.normalize()
            self.terms_grad = torch.is_grad_enabled()
            _check_dead_rows(log_norm)
        else:
            self.lengths = _unchecked_lengths(lengths, b, t_len, emission.device)
        self.init_logp = torch.log_softmax(init, dim=-1).expand(b, z)

    def prob_terms(self):
        """The transition's terms, rebuilt if they were built without grad but are now
        differentiated (an HMM made under ``no_grad`` whose log-partition is trained)."""
        stale = self.terms is None or (
            torch.is_grad_enabled()
            and not self.terms_grad
            and any(t.requires_grad for t in self.transition.tensors())
        )
        if stale:
            self.terms = self.transition.prob_terms()
            self.terms_grad = torch.is_grad_enabled()
        return self.terms

    def log_partition(self, fn, emission: torch.Tensor, option) -> torch.Tensor:
        """``fn(init_logp, transition, emission, lengths, option, ...)`` (a chain DP) with the
        normalized terms and the emission max computed here."""
        return fn(self.init_logp, self.transition, emission, self.lengths, option,
                  terms=self.prob_terms(), emission_max=self.emission_max)


class HMM:
    """Posterior over state paths of an HMM given the emission log-likelihoods of a sequence.

    Args:
        init: initial-state logits (Z,) or (B, Z) (softmax-normalized here).
        transition: a factor (``Dense``, ``LowRank``, ``Banded`` or a sum), shared or batched.
        emission: (B, T, Z) log-likelihoods ``log p(x_t | z_t)`` of the observed sequence.
        lengths: (B,) sequence lengths in [1, T]; default all T.
        memory_light: for ``LowRank``, a custom backward saving O(B T R) instead of O(B T Z).
        validate_args: check the values of the inputs (no NaN or +inf, lengths in [1, T], no
            all -inf init row, every transition row with a successor): one max-reduction of
            the emissions, reused by the forward pass, plus O(Z) work.  ``False`` (as in
            ``torch.distributions``) skips them; shapes and dtypes are always checked.

    The model is ``p(x, z) = p(z_1) prod_t p(z_t | z_{t-1}) prod_t p(x_t | z_t)``
    (Chiu, Deng & Rush, NeurIPS 2021 for the low-rank transition).
    """

    def __init__(
        self,
        init: torch.Tensor,
        transition: Factor,
        emission: torch.Tensor,
        lengths: torch.Tensor | None = None,
        memory_light: bool = False,
        validate_args: bool = True,
    ):
        self._inputs = _ChainInputs(init, transition, emission, lengths, validate_args)
        self.init_logp, self.lengths = self._inputs.init_logp, self._inputs.lengths
        self.transition = transition
        self.emission = emission
        self.memory_light = memory_light
        self.batch_size, self.max_length, self.num_states = emission.shape

    # ---- sum-product -------------------------------------------------------------------
    def _log_partition(self, emission: torch.Tensor) -> torch.Tensor:
        return self._inputs.log_partition(chain.log_partition, emission, self.memory_light)

    @cached_property
    def log_partition(self) -> torch.Tensor:
        """``log p(x)`` per sequence: (B,). Differentiable."""
        return self._log_partition(self.emission)

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) bool: True at real (non-padded) positions."""
        steps = torch.arange(self.max_length, device=self.emission.device)
        return steps.unsqueeze(0) < self.lengths.unsqueeze(1)

    @cached_property
    def marginals(self) -> torch.Tensor:
        """State posteriors ``p(z_t = j | x)``: (B, T, Z), zero at padding; from autograd of
        the log-partition with respect to the emissions."""
        with torch.enable_grad():
            em = self.emission.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self._log_partition(em).sum(), em)
        return grad * self.mask.unsqueeze(-1)

    # ---- max-product -------------------------------------------------------------------
    @cached_property
    def _viterbi(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return chain.viterbi(
                self.init_logp, self.transition.log_probs(), self.emission, self.lengths
            )

    @property
    def argmax(self) -> torch.Tensor:
        """The exact most probable state path (Viterbi): (B, T) long, -1 at padding (all -1
        for a sequence of probability 0).
        Materializes the Z x Z transition (max-product does not factor through rank space)."""
        return self._viterbi[1]

    @property
    def max_score(self) -> torch.Tensor:
        """``max_z log p(x, z)``: (B,)."""
        return self._viterbi[0]

    # ---- other queries -----------------------------------------------------------------
    def sample(
        self,
        sample_shape: torch.Size | tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Exact posterior samples by forward filtering, backward sampling:
        (*sample_shape, B, T) long, -1 at padding."""
        shape = torch.Size(sample_shape)
        n = shape.numel()
        with torch.no_grad():
            out = chain.sample(
                self.init_logp, self.transition, self.emission, self.lengths, n, generator
            )
        return out.reshape(*shape, self.batch_size, self.max_length)

    def entropy(self) -> torch.Tensor:
        """Entropy of the posterior over paths: (B,), by the entropy semiring on the dense
        transition (Z x Z)."""
        return chain.semiring_forward(
            self.init_logp,
            self.transition.log_probs(),
            self.emission,
            self.lengths,
            EntropySemiring,
        )

    def score(self, path: torch.Tensor) -> torch.Tensor:
        """``log p(x, z)`` for state paths (..., B, T); positions past ``lengths`` ignored;
        ``-inf`` for the all ``-1`` path."""
        path = self._check_path(path)
        return chain.path_score(self.init_logp, self.transition, self.emission, self.lengths, path)

    def log_prob(self, path: torch.Tensor) -> torch.Tensor:
        """``log p(z | x)`` for state paths (..., B, T): (..., B); ``-inf`` for a path of
        score ``-inf`` (the all ``-1`` "no path" included), also on an impossible sequence."""
        score = self.score(path)
        return torch.where(torch.isneginf(score), score, score - self.log_partition)

    def _check_path(self, path: torch.Tensor) -> torch.Tensor:
        if not isinstance(path, torch.Tensor) or path.is_floating_point():
            raise TypeError(f"path must be an integer tensor, got {getattr(path, 'dtype', path)}")
        want = (self.batch_size, self.max_length)
        if path.dim() < 2 or tuple(path.shape[-2:]) != want:
            raise ValueError(
                f"path must have shape (..., {want[0]}, {want[1]}), got {tuple(path.shape)}"
            )
        sentinel = ((path == -1) | ~self.mask).all(-1, keepdim=True)  # "no path" rows
        real = path[self.mask & ~sentinel]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.num_states):
            raise ValueError(
                f"path states must lie in [0, {self.num_states}) within lengths, got "
                f"min {int(real.min())} and max {int(real.max())}"
            )
        return path

    def __repr__(self) -> str:
        return (
            f"HMM(batch={self.batch_size}, T={self.max_length}, states={self.num_states}, "
            f"transition={self.transition!r})"
        )


class RankSpaceHMM:
    """An HMM with a ``LowRank`` transition, marginalized in rank space (Yang, Liu & Tu 2022).

    With ``P = A C^T`` (A row-stochastic, C column-stochastic, both Z x R), summing out each
    state ``z_t`` leaves a chain over R rank states ``r_t`` whose step transition, with the
    emission attached, is ``M_t = C^T diag(p(x_t | .)) A``: an R-state HMM whose emission-free
    transition ``C^T A`` has nonnegative rank <= Z.  The sequential recursion costs O(R^2) per
    step; building ``M_t`` costs O(Z R^2) per step, in parallel over time.  ``log_partition``
    equals that of ``HMM(init, transition, emission)``; marginals are over the Z states.
    ``validate_args`` as in :class:`HMM`.
    """

    def __init__(
        self,
        init: torch.Tensor,
        transition: LowRank,
        emission: torch.Tensor,
        lengths: torch.Tensor | None = None,
        max_chunk_elements: int = 1 << 24,
        validate_args: bool = True,
    ):
        if not isinstance(transition, LowRank):
            raise TypeError(
                f"RankSpaceHMM needs a LowRank transition, got {type(transition).__name__}"
            )
        self._inputs = _ChainInputs(init, transition, emission, lengths, validate_args)
        self.init_logp, self.lengths = self._inputs.init_logp, self._inputs.lengths
        self.transition = transition
        self.emission = emission
        self.max_chunk_elements = check_positive_int("max_chunk_elements", max_chunk_elements)
        self.batch_size, self.max_length, self.num_states = emission.shape
        self.rank = transition.rank

    def _log_partition(self, emission: torch.Tensor) -> torch.Tensor:
        return self._inputs.log_partition(
            chain.rank_space_log_partition, emission, self.max_chunk_elements
        )

    @cached_property
    def log_partition(self) -> torch.Tensor:
        """``log p(x)`` per sequence: (B,)."""
        return self._log_partition(self.emission)

    @cached_property
    def marginals(self) -> torch.Tensor:
        """State posteriors (B, T, Z) from autograd of the rank-space log-partition."""
        with torch.enable_grad():
            em = self.emission.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self._log_partition(em).sum(), em)
        steps = torch.arange(self.max_length, device=em.device)
        return grad * (steps.unsqueeze(0) < self.lengths.unsqueeze(1)).unsqueeze(-1)

    def to_hmm(self) -> HMM:
        """The same model as a state-space :class:`HMM` (for Viterbi, sampling, entropy)."""
        return HMM(self.init_logp, self.transition, self.emission, self.lengths)
