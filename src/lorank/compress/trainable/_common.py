"""What TRP, Maestro and SLTrain share: layer selection (the ``find_targets`` rules of
:func:`lorank.compress.compress`), live handles on the selected weight matrices, optimizer
step hooks and report rows."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lorank.compress.core import _candidates_description, _Target, find_targets
from lorank.compress.report import LayerReport

ALL_LAYER_TYPES = ("linear", "embedding", "lstm", "gru")
_RNN_WEIGHT = re.compile(r"weight_(ih|hh)_l\d+(_reverse)?")


@dataclass(frozen=True)
class Selection:
    """Which layers a trainable low-rank method acts on, with the conventions of
    :class:`lorank.compress.CompressConfig`: ``target_modules`` / ``exclude_modules`` (a list
    of names matched exactly or as a ``"." + name`` suffix, or one regular expression matched
    against the whole qualified name), ``layer_types``, and for LSTM/GRU layers which matrices
    (``rnn_matrices``) and whether each is one stacked matrix or one block per gate
    (``rnn_granularity``)."""

    #: layer types the method supports (subclasses narrow it)
    SUPPORTED: ClassVar[tuple[str, ...]] = ALL_LAYER_TYPES

    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    layer_types: tuple[str, ...] | None = None
    rnn_matrices: tuple[str, ...] = ("ih", "hh")
    rnn_granularity: str = "stacked"

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                v = tuple(v)
                if not all(isinstance(p, str) for p in v):
                    raise ValueError(f"{name} must be a string (regex) or a list of names, "
                                     f"got {v!r}")
                object.__setattr__(self, name, v)
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            bad = [t for t in types if t not in self.SUPPORTED]
            if bad or not types:
                raise ValueError(f"layer_types must be a non-empty subset of {self.SUPPORTED} "
                                 f"for {type(self).__name__}, got {types!r}")
            object.__setattr__(self, "layer_types", types)
        mats = tuple(self.rnn_matrices)
        if not mats or any(p not in ("ih", "hh") for p in mats):
            raise ValueError(f"rnn_matrices must be a non-empty subset of ('ih', 'hh'), got "
                             f"{self.rnn_matrices!r}")
        object.__setattr__(self, "rnn_matrices", mats)
        if self.rnn_granularity not in ("stacked", "per_gate"):
            raise ValueError(f"rnn_granularity must be 'stacked' or 'per_gate', got "
                             f"{self.rnn_granularity!r}")

    def selection_dict(self) -> dict:
        """The selection fields, as :class:`~lorank.compress.CompressConfig` keyword args."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(Selection)}
        for k in ("target_modules", "exclude_modules", "layer_types"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        d["layer_types"] = d["layer_types"] or list(self.SUPPORTED)
        return d


def positive_int(owner: str, name: str, value: object, *, allow_none: bool = False) -> None:
    """Raise a ValueError naming ``owner.name`` unless ``value`` is a positive int."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


def select(model: nn.Module, selection: Selection) -> list[_Target]:
    """``find_targets`` with the method's layer types, or an error listing the candidates."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    types = selection.layer_types or selection.SUPPORTED
    targets = find_targets(model, dataclasses.replace(selection, layer_types=types))
    if not targets:
        raise ValueError(
            f"no layer matches {type(selection).__name__}(layer_types={types}, "
            f"target_modules={selection.target_modules!r}, exclude_modules="
            f"{selection.exclude_modules!r}); candidate layers: {_candidates_description(model)}"
        )
    return targets


@dataclass(eq=False)
class Weight:
    """A live handle on one selected weight matrix ``M`` (out x in, ``y = x M^T``)."""

    key: str  # report name, as in compress(): "proj", "rnn.weight_ih_l0"
    kind: str  # layer type: linear | embedding | lstm | gru | conv
    module: nn.Module
    attr: str  # the parameter's name on module
    transposed: bool  # HF Conv1D and nn.Embedding store M^T
    blocks: int = 1  # RNN gates (per_gate) or convolution groups: one rank per row block

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    def matrix(self) -> torch.Tensor:
        """``M`` (a view of the parameter's data, out x in; a convolution's kernel as
        ``(C_out, C_in/groups * prod(kernel))``, the matrix of its channel factorization)."""
        p = self.param.detach()
        if self.kind == "conv":
            return p.reshape(p.shape[0], -1)
        return p.mT if self.transposed else p

    def as_param(self, m: torch.Tensor) -> torch.Tensor:
        """An out x in matrix laid out like the parameter."""
        if self.kind == "conv":
            return m.reshape(self.param.shape)
        return m.mT if self.transposed else m


def weights(targets: list[_Target], selection: Selection) -> Iterator[Weight]:
    """The dense weight matrices of the selected layers (RNN matrices already factorized by a
    ``LowRankRNN`` are skipped)."""
    for t in targets:
        if t.kind in ("linear", "conv1d", "embedding"):
            yield Weight(t.name, t.layer_type, t.module, "weight", t.kind != "linear")
            continue
        if t.kind == "conv":
            yield Weight(t.name, "conv", t.module, "weight", False, t.module.groups)
            continue
        gates = {"LSTM": 4, "GRU": 3}[t.layer_type.upper()]
        blocks = gates if selection.rnn_granularity == "per_gate" else 1
        for name, _ in t.module.named_parameters(recurse=False):
            m = _RNN_WEIGHT.fullmatch(name)
            if m and m.group(1) in selection.rnn_matrices:
                key = f"{t.name}.{name}" if t.name else name
                yield Weight(key, t.layer_type, t.module, name, False, blocks)


class StepHooks:
    """Optimizer step hooks: :meth:`attach` makes ``before_step`` run inside every
    ``optimizer.step()`` before the update (the gradients are final: after clipping) and
    ``after_step`` after it, so the method works with any optimizer and training loop."""

    def __init__(self) -> None:
        self._handles: list = []
        #: optimizer steps taken while attached
        self.steps = 0

    def attach(self, optimizer: torch.optim.Optimizer) -> StepHooks:
        """Hook into ``optimizer`` (one at a time: the one whose ``step()`` is one training
        step, holding the selected weights); returns self."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if self._handles:
            raise RuntimeError(f"{type(self).__name__} is already attached to an optimizer: "
                               f"each of its steps is one training step, so a second one "
                               f"would apply the method twice per step; detach() first")
        self._handles.append(optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: self.before_step()))
        self._handles.append(optimizer.register_step_post_hook(self._post))
        return self

    def detach(self) -> None:
        """Remove the hooks from the attached optimizer."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _post(self, opt, args, kwargs) -> None:
        self.steps += 1
        self.after_step()

    def before_step(self) -> None:
        """Called before every optimizer update."""

    def after_step(self) -> None:
        """Called after every optimizer update (``self.steps`` already counts it)."""


def add_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """``p.grad += g`` (``p.grad = g`` when the loss did not reach ``p``)."""
    g = g.to(dtype=p.dtype, device=p.device)
    if p.grad is None:
        p.grad = g.clone()
    else:
        p.grad.add_(g)


def layer_row(key: str, kind: str, shape: tuple[int, int], rank: int, blocks: int = 1, *,
              nnz: int = 0, weight_error: float = 0.0, note: str = "") -> LayerReport:
    """The report row of an out x in matrix stored as ``blocks`` rank-``rank`` factor pairs
    (plus ``nnz`` sparse entries), with the FLOP conventions of :func:`compress`."""
    m, n = shape
    params = blocks * rank * (m // blocks + n) + nnz
    return LayerReport(key, kind, (m, n), rank, "factorized", m * n, params, 2 * m * n,
                       2 * params, weight_error, None, blocks, note)
