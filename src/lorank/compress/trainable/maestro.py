"""Maestro (Horvath et al., "Maestro: Uncovering Low-Rank Structures via Trainable
Decomposition", ICML 2024): layers trained in factorized form ``W = U V^T`` with *ordered
dropout* over the rank (at each step a random prefix of the components is kept) and a
hierarchical group lasso whose groups are the trailing components, so the components come
out ordered by importance: a layer can be truncated to any prefix without retraining, and
progressive shrinking drops the trailing components whose importance falls below a
threshold.

* :class:`MaestroLinear`: a factorized ``nn.Linear``; :class:`MaestroRNN`: an LSTM/GRU whose
  selected matrices are factorized (stacked or per gate), run by PyTorch's fused kernel on
  the materialized matrices.
* :class:`Maestro`: converts the selected layers of a model and drives sampling, the group
  lasso and shrinking through optimizer step hooks; ``compress()`` returns the model with
  :class:`~lorank.compress.LowRankLinear` / :class:`~lorank.compress.LowRankRNN` layers.

A "unit" is one factorized matrix: a ``MaestroLinear`` (key ``""``) or one matrix of a
``MaestroRNN`` (key ``"weight_ih_l0"``...).  Factors are ``left`` (..., m, R) and ``right``
(..., R, n): component i is ``left[..., i]`` and ``right[..., i, :]``; ``R`` is the unit's
capacity and its *rank* the number of leading components in use.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorank import linalg
from lorank.compress.core import _set_module
from lorank.compress.modules import LowRankLinear, LowRankRNN, register_structured
from lorank.compress.report import CompressionReport
from lorank.compress.trainable._common import (
    Selection,
    StepHooks,
    add_grad,
    layer_row,
    positive_int,
    select,
)

__all__ = ["MaestroConfig", "Maestro", "MaestroLinear", "MaestroRNN", "group_norms"]

SAMPLERS = ("single", "independent", "none")


def _check_rank(owner: str, rank: object, limit: int, what: str = "the rank in use") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"{owner}: rank must be an integer in [1, {limit}] ({what}), "
                         f"got {rank!r}")
    return rank


def group_norms(left: torch.Tensor, right: torch.Tensor, rank: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hierarchical group norms of the first ``rank`` components: entry b is
    ``sqrt(sum_{b <= i < rank} ||left[..., i]||^2)`` and the same for ``right[..., i, :]``
    (the groups of Maestro's hierarchical group lasso)."""
    sl = left[..., :rank].pow(2).reshape(-1, rank).sum(0)
    sr = right[..., :rank, :].pow(2).sum(-1).reshape(-1, rank).sum(0)
    tails = [s.flip(0).cumsum(0).flip(0) for s in (sl, sr)]
    # clamp: sqrt has an infinite derivative at 0 (a component that is exactly zero)
    return tuple(t.clamp_min(torch.finfo(t.dtype).tiny).sqrt() for t in tails)


@register_structured
class MaestroLinear(LowRankLinear):
    """``y = x V_k U_k^T + bias`` with ``first.weight = V^T`` (R x in), ``second.weight = U``
    (out x R): the first k components, k the rank, or in training mode the width sampled by
    :class:`Maestro` (ordered dropout)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 device=None, dtype=None, orig: str = "Linear"):
        super().__init__(in_features, out_features, rank, bias, device=device, dtype=dtype,
                         orig=orig)
        self.width: int | None = None

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int | None = None) -> MaestroLinear:
        """SVD of an ``nn.Linear`` (or HF ``Conv1D``) weight, truncated to ``rank``
        components (default all ``min(in, out)``: the same map)."""
        conv1d = not isinstance(linear, nn.Linear)
        w = linear.weight.detach().mT if conv1d else linear.weight.detach()
        a, b = linalg.truncated_svd(w, rank or min(w.shape))
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_factors(a, b, bias, orig="Conv1D" if conv1d else "Linear")

    @property
    def capacity(self) -> int:
        return self.first.weight.shape[0]

    # ---- unit interface -------------------------------------------------------------------
    def unit_keys(self) -> list[str]:
        return [""]

    def factors(self, key: str = "") -> tuple[nn.Parameter, nn.Parameter]:
        return self.second.weight, self.first.weight

    def unit_rank(self, key: str = "") -> int:
        return self.rank

    def set_unit_rank(self, key: str, rank: int) -> None:
        self.rank = _check_rank(f"MaestroLinear.{key or 'rank'}", rank, self.capacity,
                                "the capacity")

    def set_width(self, key: str, width: int | None) -> None:
        self.width = width

    def truncate(self, rank: int | None = None, key: str | None = None) -> MaestroLinear:
        """Keep only the first ``rank`` components (default: the current rank) as the
        parameters themselves; returns self.  Rebuild optimizers afterwards."""
        k = _check_rank("MaestroLinear.truncate", self.rank if rank is None else rank,
                        self.rank)
        self.first.weight = nn.Parameter(self.first.weight.detach()[:k].clone())
        self.second.weight = nn.Parameter(self.second.weight.detach()[:, :k].clone())
        self.rank, self.width = k, None
        return self

    # ---- computation ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = min(self.width, self.rank) if self.training and self.width else self.rank
        return F.linear(F.linear(x, self.first.weight[:k]), self.second.weight[:, :k],
                        self.second.bias)

    def dense_weight(self) -> torch.Tensor:
        k = self.rank
        return self.second.weight[:, :k] @ self.first.weight[:k]

    def to_lowrank(self, rank: int | None = None) -> LowRankLinear:
        """The first ``rank`` components (default: the current rank) as a ``LowRankLinear``."""
        k = _check_rank("MaestroLinear.to_lowrank", self.rank if rank is None else rank,
                        self.rank)
        bias = None if self.bias is None else self.bias.detach()
        return LowRankLinear.from_factors(self.second.weight.detach()[:, :k],
                                          self.first.weight.detach()[:k], bias, orig=self.orig)

    def structure(self) -> dict:
        return {**super().structure(), "type": "MaestroLinear", "capacity": self.capacity}

    @classmethod
    def from_structure(cls, spec: dict) -> MaestroLinear:
        """An uninitialized module of the shapes and ranks of a :meth:`structure` dict."""
        mod = cls(spec["in_features"], spec["out_features"], spec["capacity"], spec["bias"],
                  orig=spec.get("orig", "Linear"))
        mod.set_unit_rank("", spec["rank"])
        return mod

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, capacity={self.capacity}"


@register_structured
class MaestroRNN(LowRankRNN):
    """A :class:`~lorank.compress.LowRankRNN` whose factorized matrices use their first k
    components (k the matrix's rank, or in training mode its sampled width).  The forward
    materializes the matrices and runs PyTorch's fused LSTM/GRU kernel (the Python time
    loop of ``LowRankRNN`` is used only while calibration hooks are set)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.widths: dict[str, int] = {}

    @classmethod
    def from_dense(cls, rnn: nn.RNNBase, matrices: tuple[str, ...] = ("ih", "hh"),
                   granularity: str = "stacked", rank: int | None = None) -> MaestroRNN:
        """Factorize the ``matrices`` ("ih", "hh") of an ``nn.LSTM`` / ``nn.GRU`` by SVD
        (stacked over the gates or per gate), keeping ``rank`` components (default all)."""
        mod = cls.from_rnn(rnn)
        for name in mod.matrix_names():
            if name.split("_")[1] not in matrices:
                continue
            w = mod.matrix(name).detach()
            g = mod.num_gates if granularity == "per_gate" else 1
            blocks = w.reshape(g, -1, w.shape[1])
            k = rank or min(blocks.shape[1:])
            parts = [linalg.truncated_svd(blk, k) for blk in blocks]
            mod.factorize(name, torch.stack([a for a, _ in parts]),
                          torch.stack([b for _, b in parts]))
        return mod

    def factorize(self, name: str, left: torch.Tensor, right: torch.Tensor) -> None:
        super().factorize(name, left, right)
        self.factorized[name]["capacity"] = self.factorized[name]["rank"]
        self.widths.pop(name, None)

    # ---- unit interface -------------------------------------------------------------------
    def unit_keys(self) -> list[str]:
        return sorted(self.factorized)

    def factors(self, key: str) -> tuple[nn.Parameter, nn.Parameter]:
        return getattr(self, f"{key}_left"), getattr(self, f"{key}_right")

    def unit_rank(self, key: str) -> int:
        return self.factorized[key]["rank"]

    def set_unit_rank(self, key: str, rank: int) -> None:
        info = self.factorized[key]
        info["rank"] = _check_rank(f"MaestroRNN.{key}", rank, info["capacity"], "the capacity")

    def set_width(self, key: str, width: int | None) -> None:
        if width is None:
            self.widths.pop(key, None)
        else:
            self.widths[key] = width

    def truncate(self, rank: int | None = None, key: str | None = None) -> MaestroRNN:
        """Keep only the first ``rank`` components (default: each matrix's rank) of matrix
        ``key`` (default: all) as the parameters themselves; returns self."""
        for name in [key] if key is not None else self.unit_keys():
            left, right = self.factors(name)
            k = _check_rank(f"MaestroRNN.truncate({name})",
                            self.unit_rank(name) if rank is None else rank,
                            self.unit_rank(name))
            self.factorize(name, left.detach()[..., :k], right.detach()[..., :k, :])
        return self

    # ---- computation ----------------------------------------------------------------------
    def _k(self, name: str) -> int:
        w, r = self.widths.get(name), self.unit_rank(name)
        return min(w, r) if self.training and w else r

    def _dense(self, name: str, k: int) -> torch.Tensor:
        left, right = self.factors(name)
        return (left[..., :k] @ right[..., :k, :]).reshape(-1, right.shape[-1])

    def matrix(self, name: str) -> torch.Tensor:
        if name in self.factorized:
            return self._dense(name, self.unit_rank(name))
        return getattr(self, name)

    def _project(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if name not in self.factorized:
            return super()._project(x, name)
        left, right = self.factors(name)
        k = self._k(name)
        z = torch.einsum("ni,gri->gnr", x, right[..., :k, :])
        return torch.einsum("gnr,ghr->ngh", z, left[..., :k]).reshape(x.shape[0], -1)

    def _template(self) -> nn.RNNBase:
        """A parameterless (meta) ``nn.LSTM``/``nn.GRU`` of the same shape: the fused kernel
        is called through it with this module's tensors."""
        tmpl = self.__dict__.get("_dense_template")
        if tmpl is None:
            cls = nn.LSTM if self.mode == "LSTM" else nn.GRU
            tmpl = cls(self.input_size, self.hidden_size, self.num_layers, bias=self.bias,
                       batch_first=self.batch_first, dropout=self.dropout,
                       bidirectional=self.bidirectional, device="meta")
            self.__dict__["_dense_template"] = tmpl
        return tmpl

    def forward(self, x, hx=None):
        if self.stats_hook is not None or isinstance(x, nn.utils.rnn.PackedSequence):
            return super().forward(x, hx)
        tensors = {name: self._dense(name, self._k(name)) if name in self.factorized
                   else getattr(self, name) for name in self.matrix_names()}
        for name, p in self.named_parameters(recurse=False):
            if name.startswith("bias_"):
                tensors[name] = p
        tmpl = self._template()
        tmpl.train(self.training)
        return torch.func.functional_call(tmpl, tensors, (x,) if hx is None else (x, hx))

    def to_lowrank(self, ranks: dict[str, int] | int | None = None) -> LowRankRNN:
        """A ``LowRankRNN`` with the first ``ranks[name]`` (or ``ranks``; default: the
        current rank) components of every factorized matrix."""
        out = LowRankRNN.from_rnn(self.merge())
        for name in self.unit_keys():
            k = ranks.get(name) if isinstance(ranks, dict) else ranks
            k = _check_rank(f"MaestroRNN.to_lowrank({name})",
                            self.unit_rank(name) if k is None else k, self.unit_rank(name))
            left, right = self.factors(name)
            out.factorize(name, left.detach()[..., :k], right.detach()[..., :k, :])
        return out

    def structure(self) -> dict:
        return {**super().structure(), "type": "MaestroRNN"}

    @classmethod
    def from_structure(cls, spec: dict) -> MaestroRNN:
        """An uninitialized module of the shapes and ranks of a :meth:`structure` dict."""
        mod = cls(spec["mode"], spec["input_size"], spec["hidden_size"], spec["num_layers"],
                  spec["bias"], spec["batch_first"], spec["dropout"], spec["bidirectional"])
        for name, info in spec["factorized"].items():
            g, cap = info["blocks"], info["capacity"]
            dense = mod.matrix(name)
            mod.factorize(name, dense.new_zeros(g, dense.shape[0] // g, cap),
                          dense.new_zeros(g, cap, dense.shape[1]))
            mod.set_unit_rank(name, info["rank"])
        return mod


@dataclass(frozen=True)
class MaestroConfig(Selection):
    """Maestro settings (layer types: linear, lstm, gru).

    * ``rank``: components kept when a layer is factorized (None: all, ``min(m, n)``, an
      exact re-parametrization of the dense layer).
    * ``sampler``: ordered dropout: ``"single"`` (each step, one (unit, width) pair drawn
      uniformly; the other units use their full rank; the paper's sampler),
      ``"independent"`` (every unit draws its own width), ``"none"``.
    * ``group_lasso``: weight of the hierarchical group lasso (0: off).
    * ``prune_every``: every that many optimizer steps, progressive shrinking drops the
      trailing components whose importance (product of the two hierarchical group norms)
      is below ``prune_threshold``, keeping at least ``min_rank`` (0: never).
    * ``inplace``: convert ``model`` itself instead of a deep copy."""

    SUPPORTED = ("linear", "lstm", "gru")

    rank: int | None = None
    sampler: str = "single"
    group_lasso: float = 0.0
    prune_every: int = 0
    prune_threshold: float = 1e-3
    min_rank: int = 1
    seed: int = 0
    inplace: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("MaestroConfig", "rank", self.rank, allow_none=True)
        positive_int("MaestroConfig", "min_rank", self.min_rank)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"MaestroConfig.sampler must be one of {SAMPLERS}, got "
                             f"{self.sampler!r}")
        if not self.group_lasso >= 0:
            raise ValueError(f"MaestroConfig.group_lasso must be >= 0, got {self.group_lasso!r}")
        if isinstance(self.prune_every, bool) or not isinstance(self.prune_every, int) or \
                self.prune_every < 0:
            raise ValueError(f"MaestroConfig.prune_every must be an integer >= 0, got "
                             f"{self.prune_every!r}")
        if not self.prune_threshold >= 0:
            raise ValueError(f"MaestroConfig.prune_threshold must be >= 0, got "
                             f"{self.prune_threshold!r}")


@dataclass(frozen=True)
class _Unit:
    key: str  # report name: "proj", "rnn.weight_ih_l0"
    target: str  # the module's qualified name
    module: MaestroLinear | MaestroRNN
    sub: str  # key within the module

    @property
    def rank(self) -> int:
        return self.module.unit_rank(self.sub)

    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.module.factors(self.sub)


class Maestro(StepHooks):
    """Train the layers of ``model`` selected by ``config`` in Maestro's factorized form::

        mae = Maestro(model, MaestroConfig(group_lasso=1e-4, prune_every=200))
        model = mae.model                  # the converted model (a copy unless inplace)
        mae.attach(optimizer)              # optimizer built over mae.model's parameters
        ... train as usual ...
        print(mae.rank_report())
        small, report = mae.compress(rank=16)   # LowRankLinear / LowRankRNN layers

    Each optimizer step adds the group-lasso gradient before the update, and afterwards
    shrinks (every ``prune_every`` steps) and draws the next ordered-dropout widths, which
    apply in training mode only (eval mode uses every unit's full rank)."""

    def __init__(self, model: nn.Module, config: MaestroConfig | None = None) -> None:
        super().__init__()
        config = config or MaestroConfig()
        if not isinstance(config, MaestroConfig):
            raise TypeError(f"config must be a MaestroConfig, got {type(config).__name__}")
        self.config = config
        targets = select(model, config)
        #: parameters of the dense model (the report's "before")
        self.dense_params = sum(p.numel() for p in model.parameters())
        if not config.inplace:
            model = copy.deepcopy(model)
            targets = select(model, config)
        self.units: list[_Unit] = []
        for t in targets:
            if isinstance(t.module, LowRankRNN):
                raise ValueError(f"{t.name} is already a LowRankRNN: apply Maestro to the "
                                 f"dense model (or exclude it)")
            if t.kind in ("linear", "conv1d"):
                new = MaestroLinear.from_linear(t.module,
                                                self._capacity(t.name, min(t.module.weight.shape)))
            else:
                gates = 4 if t.layer_type == "lstm" else 3
                g = gates if config.rnn_granularity == "per_gate" else 1
                rows = gates * t.module.hidden_size // g  # of each factorized block
                out = getattr(t.module, "proj_size", 0) or t.module.hidden_size
                dirs = 2 if t.module.bidirectional else 1
                cols = []  # the selected matrices' input sizes
                for layer in range(t.module.num_layers):
                    if "ih" in config.rnn_matrices:
                        cols.append(t.module.input_size if layer == 0 else out * dirs)
                    if "hh" in config.rnn_matrices:
                        cols.append(out)
                self._capacity(t.name, min([rows, *cols]))
                new = MaestroRNN.from_dense(t.module, config.rnn_matrices,
                                            config.rnn_granularity, config.rank)
            new.train(t.module.training)
            model = _set_module(model, t.name, new)
            for sub in new.unit_keys():
                key = ".".join(p for p in (t.name, sub) if p)
                self.units.append(_Unit(key, t.name, new, sub))
        self.model = model
        self._gen = torch.Generator().manual_seed(config.seed)
        self.resample()

    def _capacity(self, name: str, smallest: int) -> int | None:
        """``config.rank``, checked against the smallest matrix dimension of layer ``name``."""
        r = self.config.rank
        if r is not None and r > smallest:
            raise ValueError(f"MaestroConfig.rank={r} exceeds min(m, n) = {smallest} of {name}")
        return r

    def factor_parameters(self) -> list[nn.Parameter]:
        """The factor parameters of every unit (e.g. for their own optimizer group: Adam
        moves a product ``U V^T`` of R components about R times further per step than a
        dense matrix, so factors usually want a smaller learning rate)."""
        return [p for u in self.units for p in u.factors()]

    # ---- the regularizer and the sampler --------------------------------------------------
    def penalty(self) -> torch.Tensor:
        """The hierarchical group lasso ``sum_units sum_b (||left_{b:}|| + ||right_{b:}||)``
        over each unit's rank (without the ``group_lasso`` weight)."""
        total = None
        for u in self.units:
            a, b = group_norms(*u.factors(), u.rank)
            term = a.sum() + b.sum()
            total = term if total is None else total + term
        return total

    def importance(self) -> dict[str, torch.Tensor]:
        """Per unit: the product of its two hierarchical group norms, component by
        component (non-increasing)."""
        with torch.no_grad():
            out = {}
            for u in self.units:
                a, b = group_norms(*u.factors(), u.rank)
                out[u.key] = a * b
            return out

    def before_step(self) -> None:
        lam = self.config.group_lasso
        if lam == 0:
            return
        params = self.factor_parameters()
        with torch.enable_grad():
            grads = torch.autograd.grad(self.penalty(), params)
        for p, g in zip(params, grads, strict=True):
            add_grad(p, lam * g)

    def after_step(self) -> None:
        every = self.config.prune_every
        if every and self.steps % every == 0:
            self.shrink()
        self.resample()

    def shrink(self, threshold: float | None = None) -> dict[str, int]:
        """Progressive shrinking: each unit keeps its leading components whose importance
        is ``>= threshold`` (default ``prune_threshold``), at least ``min_rank``; returns the
        new ranks."""
        thr = self.config.prune_threshold if threshold is None else threshold
        importance = self.importance()
        for u in self.units:
            keep = int((importance[u.key] >= thr).sum())
            u.module.set_unit_rank(u.sub, min(u.rank, max(self.config.min_rank, keep)))
        self.resample()  # widths within the new ranks
        return {u.key: u.rank for u in self.units}

    def resample(self) -> None:
        """Draw the ordered-dropout widths of the next training step."""
        for u in self.units:
            u.module.set_width(u.sub, None)
        if self.config.sampler == "none":
            return
        ranks = torch.tensor([u.rank for u in self.units])
        if self.config.sampler == "independent":
            for u, r in zip(self.units, ranks.tolist(), strict=True):
                w = int(torch.randint(1, r + 1, (), generator=self._gen))
                u.module.set_width(u.sub, w)
            return
        # one (unit, width) pair, uniformly among all of them
        idx = int(torch.randint(0, int(ranks.sum()), (), generator=self._gen))
        ends = ranks.cumsum(0)
        i = int((ends <= idx).sum())
        self.units[i].module.set_width(self.units[i].sub, idx - int(ends[i] - ranks[i]) + 1)

    # ---- results --------------------------------------------------------------------------
    def rank_report(self) -> dict[str, dict]:
        """Per unit: matrix shape, gate blocks, rank in use, capacity, and the parameters of
        the factorization at that rank against the dense matrix."""
        out = {}
        for u in self.units:
            left, right = u.factors()
            blocks = left.shape[0] if left.dim() == 3 else 1
            m, n = left.shape[-2] * blocks, right.shape[-1]
            out[u.key] = {"shape": (m, n), "blocks": blocks, "rank": u.rank,
                          "capacity": left.shape[-1],
                          "params": blocks * u.rank * (m // blocks + n), "dense_params": m * n}
        return out

    def _check_rank_keys(self, rank, where: str) -> None:
        if isinstance(rank, dict):
            unknown = sorted(set(rank) - {u.key for u in self.units})
            if unknown:
                raise KeyError(f"Maestro.{where}: unknown unit keys {unknown}; the units are "
                               f"{[u.key for u in self.units]}")

    def truncate(self, rank: int | dict[str, int] | None = None) -> nn.Module:
        """Keep only the first ``rank`` components of every unit (or ``rank[key]``; default:
        each unit's rank) as the parameters themselves, in place; returns the model.
        Rebuild optimizers afterwards."""
        self._check_rank_keys(rank, "truncate")
        for u in self.units:
            k = rank.get(u.key) if isinstance(rank, dict) else rank
            u.module.truncate(u.rank if k is None else k, u.sub)
        return self.model

    def compress(self, rank: int | dict[str, int] | None = None
                 ) -> tuple[nn.Module, CompressionReport]:
        """A copy of the model with every Maestro layer replaced by a ``LowRankLinear`` /
        ``LowRankRNN`` holding the first ``rank`` components of each unit (or
        ``rank[key]``; default: each unit's rank), and its report (``weight_error``: the
        truncation's relative error against the unit at its rank; parameters "before" are
        those of the dense model Maestro was given)."""
        self._check_rank_keys(rank, "compress")
        want = {}
        for u in self.units:
            k = rank.get(u.key) if isinstance(rank, dict) else rank
            want[u.key] = u.rank if k is None else k
        report = CompressionReport(method="maestro", rank_mode="trained",
                                   config={"maestro": repr(self.config), "ranks": want})
        with torch.no_grad():
            for u in self.units:
                before = u.module.matrix(u.sub) if u.sub else u.module.dense_weight()
                left, right = u.factors()
                k = _check_rank(f"Maestro.compress({u.key})", want[u.key], u.rank)
                after = (left[..., :k] @ right[..., :k, :]).reshape(before.shape)
                err = float((before - after).norm() / before.norm().clamp_min(1e-30))
                blocks = left.shape[0] if left.dim() == 3 else 1
                kind = "linear" if isinstance(u.module, MaestroLinear) else u.module.mode.lower()
                report.layers.append(layer_row(u.key, kind, tuple(before.shape), k, blocks,
                                               weight_error=err))
        report.model_params_before = self.dense_params
        small = copy.deepcopy(self.model)
        for name, mod in list(small.named_modules()):
            if isinstance(mod, MaestroLinear | MaestroRNN):
                sub = {u.sub: want[u.key] for u in self.units if u.target == name}
                new = mod.to_lowrank(sub[""]) if isinstance(mod, MaestroLinear) else \
                    mod.to_lowrank(sub)
                new.train(mod.training)
                small = _set_module(small, name, new)
        report.model_params_after = sum(p.numel() for p in small.parameters())
        return small, report
