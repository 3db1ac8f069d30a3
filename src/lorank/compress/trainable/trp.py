"""TRP, Trained Rank Pruning (Xu et al., "Trained Rank Pruning for Efficient Deep Neural
Networks", 2019 / IJCAI 2020): during training, every ``period`` optimizer steps each selected
weight matrix is replaced by its truncated SVD (rank by an energy threshold, or fixed), and a
nuclear-norm regularizer ``lambda ||W||_*`` contributes its subgradient ``lambda U V^T`` (the
SVD of the current matrix, every nonzero singular value) to every step, as the paper's code
does, so that the trained matrices are low-rank and their final factorization loses (almost)
nothing."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from lorank import linalg
from lorank.compress.config import CompressConfig
from lorank.compress.core import compress
from lorank.compress.report import CompressionReport
from lorank.compress.trainable._common import (
    Selection,
    StepHooks,
    Weight,
    add_grad,
    positive_int,
    select,
    weights,
)
from lorank.linalg._common import work_dtype

__all__ = ["TRPConfig", "TRP"]


@dataclass(frozen=True)
class TRPConfig(Selection):
    """TRP settings.  Set exactly one of ``rank`` (the same rank for every matrix or gate
    block) and ``energy`` (the smallest rank keeping this fraction of the squared singular
    values, re-chosen at every projection, as in the paper).  ``period``: optimizer steps
    between projections (the paper's ``m``); ``nuclear_weight``: ``lambda`` (0 disables the
    regularizer; its subgradient ``U V^T`` is taken from the current matrix at every step)."""

    #: convolutions too: the kernel as its (C_out, C_in/groups * prod(kernel)) matrix, one
    #: rank per group, which ``compress`` then factorizes exactly (channel decomposition)
    SUPPORTED = ("linear", "embedding", "lstm", "gru", "conv")

    rank: int | None = None
    energy: float | None = None
    period: int = 20
    nuclear_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.rank is None) == (self.energy is None):
            raise ValueError(f"set exactly one of TRPConfig.rank and TRPConfig.energy, got "
                             f"rank={self.rank!r}, energy={self.energy!r}")
        positive_int("TRPConfig", "rank", self.rank, allow_none=True)
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"TRPConfig.energy must lie in (0, 1], got {self.energy!r}")
        positive_int("TRPConfig", "period", self.period)
        if not self.nuclear_weight >= 0:
            raise ValueError(f"TRPConfig.nuclear_weight must be >= 0, got "
                             f"{self.nuclear_weight!r}")


class TRP(StepHooks):
    """Trained Rank Pruning on the layers of ``model`` that ``config`` selects (linear,
    embedding, LSTM/GRU matrices, Conv1d/Conv2d kernels), with any optimizer and training
    loop::

        trp = TRP(model, TRPConfig(energy=0.99, nuclear_weight=1e-4, period=20))
        trp.attach(optimizer)            # hooks into optimizer.step()
        ... train as usual ...
        small, report = trp.compress()   # project once more, then factorize exactly

    The model's weights are modified in place.  A matrix whose rank is its full rank is left
    untouched (projection is then the identity), so with ``nuclear_weight=0`` and full rank
    training is exactly plain training.  A weight shared by several layers (tied embeddings)
    is projected and regularized once.  The nuclear-norm subgradient costs one SVD per
    selected matrix per step."""

    def __init__(self, model: nn.Module, config: TRPConfig) -> None:
        super().__init__()
        if not isinstance(config, TRPConfig):
            raise TypeError(f"config must be a TRPConfig, got {type(config).__name__}")
        self.model = model
        self.config = config
        self.matrices: list[Weight] = []
        #: key of a weight shared with an earlier matrix -> that matrix's key
        self.aliases: dict[str, str] = {}
        owner: dict[int, str] = {}
        for w in weights(select(model, config), config):
            if id(w.param) in owner:
                self.aliases[w.key] = owner[id(w.param)]
            else:
                owner[id(w.param)] = w.key
                self.matrices.append(w)
        if not self.matrices:
            raise ValueError("TRP: the selected layers have no dense weight matrix")
        if config.rank is not None:
            for w in self.matrices:
                m, n = w.matrix().shape
                if config.rank > min(m // w.blocks, n):
                    raise ValueError(
                        f"TRPConfig.rank={config.rank} exceeds min(m, n) = "
                        f"{min(m // w.blocks, n)} of {w.key} (block shape {m // w.blocks}x{n})"
                    )
        #: key -> rank per block after the latest projection (None: not projected yet)
        self.ranks: dict[str, list[int] | None] = {w.key: None for w in self.matrices}
        #: ``steps`` at the latest projection (None: never projected)
        self.projected_at: int | None = None

    # ---- the two steps of the method ------------------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        """Add ``nuclear_weight * U V^T`` (the nuclear norm's subgradient at the current
        matrix, per gate block) to the gradients."""
        lam = self.config.nuclear_weight
        if lam == 0:
            return
        for w in self.matrices:
            add_grad(w.param, lam * self.nuclear_subgradient(w))

    @staticmethod
    def nuclear_subgradient(w: Weight) -> torch.Tensor:
        """``U V^T`` over the singular values above the matrix's numerical-rank tolerance,
        per row block, laid out like the parameter (a subgradient of ``||W||_*``)."""
        m = w.matrix()
        hb = m.shape[0] // w.blocks
        x = m.to(work_dtype(m))
        sub = torch.zeros_like(x)
        for g in range(w.blocks):
            u, s, vh = torch.linalg.svd(x[g * hb:(g + 1) * hb], full_matrices=False)
            tol = s.max() * max(hb, m.shape[1]) * torch.finfo(s.dtype).eps if s.numel() else 0
            k = int((s > tol).sum())
            sub[g * hb:(g + 1) * hb] = u[:, :k] @ vh[:k]
        return w.as_param(sub).to(m.dtype)

    def after_step(self) -> None:
        if self.steps % self.config.period == 0:
            self.project()

    @torch.no_grad()
    def project(self) -> dict[str, list[int]]:
        """Replace every selected matrix by its truncated SVD now; returns the ranks."""
        cfg = self.config
        for w in self.matrices:
            m = w.matrix()
            hb = m.shape[0] // w.blocks
            new = m.to(work_dtype(m)).clone()
            ranks = []
            for g in range(w.blocks):
                u, s, vh = torch.linalg.svd(new[g * hb:(g + 1) * hb], full_matrices=False)
                r = cfg.rank if cfg.rank is not None else linalg.rank_for_energy(s, cfg.energy)
                ranks.append(r)
                if r < s.numel():
                    new[g * hb:(g + 1) * hb] = (u[:, :r] * s[:r]) @ vh[:r]
            self.ranks[w.key] = ranks
            if any(r < min(hb, m.shape[1]) for r in ranks):
                w.param.copy_(w.as_param(new.to(m.dtype)))
        self.projected_at = self.steps
        return {k: list(v) for k, v in self.ranks.items()}

    # ---- after training -------------------------------------------------------------------
    def rank_report(self) -> dict[str, dict]:
        """Per matrix: shape, gate blocks and the ranks of the latest projection."""
        return {w.key: {"shape": tuple(w.matrix().shape), "blocks": w.blocks,
                        "ranks": self.ranks[w.key]} for w in self.matrices}

    def compress(self, **overrides) -> tuple[nn.Module, CompressionReport]:
        """Project once more (unless no step was taken since the latest projection: an
        energy threshold applied twice would cut further), then factorize every selected
        matrix at its TRP rank with :func:`lorank.compress.compress` (``method="svd"``, exact
        on the projected weights); returns a new ``(model, report)``.  ``overrides``: extra
        ``CompressConfig`` fields."""
        if self.projected_at is None or self.projected_at != self.steps:
            self.project()
        ranks = {**self.ranks, **{a: self.ranks[k] for a, k in self.aliases.items()}}
        pattern = {re.escape(k): max(v) for k, v in
                   sorted(ranks.items(), key=lambda kv: -len(kv[0]))}
        cfg = CompressConfig(**{"method": "svd", "rank": max(pattern.values()),
                                "rank_pattern": pattern, "measure_latency": False,
                                **self.config.selection_dict(), **overrides})
        small, report = compress(self.model, cfg)
        report.method = "trp"
        report.rank_mode = "rank" if self.config.rank is not None else "energy"
        report.notes.append(f"TRP after {self.steps} steps ({self.config})")
        return small, report
