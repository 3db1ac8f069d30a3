"""SLTrain (Han et al., "SLTrain: a sparse plus low-rank approach for parameter and memory
efficient pretraining", NeurIPS 2024): linear layers trained from scratch as
``W = scale * B A + S``, a low-rank product plus a sparse matrix whose support is drawn
uniformly at random once and then fixed; only its nonzero values are learned.

``S`` is stored as sorted flat indices (a buffer) and their values (a parameter), never as a
dense mask.  The forward builds ``W`` inside a custom autograd function that saves only the
input and the factors, and builds ``W`` again in the backward, so no dense weight is kept
for the backward pass (the paper's memory saving)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from lorank import linalg
from lorank.compress.core import _set_module
from lorank.compress.modules import (
    LowRankLinear,
    SparseLowRankLinear,
    register_structured,
)
from lorank.compress.report import CompressionReport
from lorank.compress.trainable._common import Selection, layer_row, positive_int, select

__all__ = ["SLTrainConfig", "SLTrainLinear", "sltrain", "sltrain_report", "sparse_lowrank_linear"]


def _weight(b: torch.Tensor, a: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
            scale: float) -> torch.Tensor:
    w = (b @ a) * scale  # under autocast: in the autocast dtype, so values follow it
    return w.view(-1).index_add_(0, index, values.to(w.dtype)).view_as(w)


class _SparseLowRankFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, a, values, index, bias, scale):
        ctx.save_for_backward(x, b, a, values, index)
        ctx.scale = scale
        ctx.has_bias = bias is not None
        w = _weight(b, a, values, index, scale)
        return nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, gy):
        x, b, a, values, index = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = gb = ga = gv = gbias = None
        gy = gy.to(b.dtype)  # autocast: the output (and its gradient) was in lower precision
        if need[0]:
            gx = (gy @ _weight(b, a, values, index, ctx.scale)).to(x.dtype)
        if need[1] or need[2] or need[3]:
            gw = gy.reshape(-1, gy.shape[-1]).mT @ x.reshape(-1, x.shape[-1]).to(b.dtype)
            if need[1]:
                gb = (gw @ a.mT) * ctx.scale
            if need[2]:
                ga = (b.mT @ gw) * ctx.scale
            if need[3]:
                gv = gw.view(-1)[index]
        if ctx.has_bias and need[5]:
            gbias = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, gb, ga, gv, None, gbias, None


def sparse_lowrank_linear(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                          values: torch.Tensor, index: torch.Tensor,
                          bias: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """``x @ (scale * b @ a + S)^T + bias`` with ``S`` (out x in) zero except
    ``S.view(-1)[index] = values``; the backward recomputes the dense matrix instead of
    saving it.  ``index`` must hold distinct flat indices."""
    return _SparseLowRankFunction.apply(x, b, a, values, index, bias, float(scale))


@register_structured
class SLTrainLinear(SparseLowRankLinear):
    """``y = x @ (scale * B A + S)^T + bias``: ``second.weight = B`` (out x r),
    ``first.weight = A`` (r x in), ``sparse_index`` (sorted flat indices into the out x in
    matrix, a buffer) and ``sparse_values`` (a parameter).

    Initialized following the paper: ``B = 0``, ``A`` Kaiming-uniform (``nn.Linear``'s
    default), the support uniform at random without replacement; its values and the bias
    uniform in ``+-1/sqrt(in)`` (``nn.Linear``'s bias rule); ``scale = alpha / rank``."""

    def __init__(self, in_features: int, out_features: int, rank: int, nnz: int,
                 bias: bool = True, *, scale: float = 1.0, generator: torch.Generator | None = None,
                 device=None, dtype=None, orig: str = "Linear", init: bool = True):
        super().__init__(in_features, out_features, rank, nnz, bias, device=device, dtype=dtype,
                         orig=orig)
        if not 0 <= nnz <= in_features * out_features:
            raise ValueError(f"nnz must lie in [0, {in_features * out_features}] for a "
                             f"{out_features}x{in_features} matrix, got {nnz}")
        self.scale = float(scale)
        if init:  # False: the values are about to be loaded (no O(m n) support draw)
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw a new support and new initial values (see the class docstring)."""
        gen = generator or torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        n, m = self.in_features, self.out_features
        bound = 1 / math.sqrt(n)
        a = torch.empty(self.first.weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        self.first.weight.copy_(a)
        self.second.weight.zero_()
        idx = torch.randperm(m * n, generator=gen)[:self.nnz].sort().values
        self.sparse_index.copy_(idx)
        self.sparse_values.copy_(torch.empty(self.nnz).uniform_(-bound, bound, generator=gen))
        if self.bias is not None:
            self.bias.copy_(torch.empty(m).uniform_(-bound, bound, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nnz == 0:  # low rank alone: two thin products beat building W
            return nn.functional.linear(nn.functional.linear(x, self.first.weight),
                                        self.second.weight * self.scale, self.bias)
        return sparse_lowrank_linear(x, self.second.weight, self.first.weight,
                                     self.sparse_values, self.sparse_index, self.bias,
                                     self.scale)

    def dense_weight(self) -> torch.Tensor:
        return _weight(self.second.weight, self.first.weight, self.sparse_values,
                       self.sparse_index, self.scale)

    def to_sparse_lowrank(self) -> SparseLowRankLinear | LowRankLinear:
        """The same map as a :class:`~lorank.compress.SparseLowRankLinear` (the scale folded
        into the left factor), or a ``LowRankLinear`` when ``S`` is empty."""
        a = self.second.weight.detach() * self.scale
        b = self.first.weight.detach()
        bias = None if self.bias is None else self.bias.detach()
        if self.nnz == 0:
            return LowRankLinear.from_factors(a, b, bias, orig=self.orig)
        out = SparseLowRankLinear(self.in_features, self.out_features, self.rank, self.nnz,
                                  bias is not None, device=a.device, dtype=a.dtype,
                                  orig=self.orig)
        with torch.no_grad():
            out.second.weight.copy_(a)
            out.first.weight.copy_(b)
            out.sparse_index.copy_(self.sparse_index)
            out.sparse_values.copy_(self.sparse_values)
            if bias is not None:
                out.second.bias.copy_(bias)
        return out

    def structure(self) -> dict:
        return {**super().structure(), "type": "SLTrainLinear", "scale": self.scale}

    @classmethod
    def from_structure(cls, spec: dict) -> SLTrainLinear:
        """An uninitialized module of the shapes of a :meth:`structure` dict."""
        return cls(spec["in_features"], spec["out_features"], spec["rank"], spec["nnz"],
                   spec["bias"], scale=spec["scale"], orig=spec.get("orig", "Linear"), init=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nnz={self.nnz}, scale={self.scale:g}"


@dataclass(frozen=True)
class SLTrainConfig(Selection):
    """SLTrain settings (layer type: linear, HF ``Conv1D`` included).

    ``rank``: r of every ``B A`` (``<= min(m, n)``); ``density``: fraction of the m n
    entries in the support of ``S`` (0: low-rank only); ``alpha``: ``scale = alpha / rank``
    (the paper's code: 32 with rank d/4); ``seed`` draws every layer's support and initial
    values (layer i uses ``seed + i``).  The layers are new: their previous weights are
    discarded (SLTrain pretrains from scratch)."""

    SUPPORTED = ("linear",)

    rank: int = 1
    density: float = 0.03
    alpha: float = 32.0
    seed: int = 0
    inplace: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("SLTrainConfig", "rank", self.rank)
        if not 0 <= self.density < 1:
            raise ValueError(f"SLTrainConfig.density must lie in [0, 1), got {self.density!r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"SLTrainConfig.alpha must be positive, got {self.alpha!r}")


def sltrain(model: nn.Module, config: SLTrainConfig) -> nn.Module:
    """Replace the selected linear layers of ``model`` (a deep copy unless
    ``config.inplace``) by freshly initialized :class:`SLTrainLinear` layers; returns it."""
    if not isinstance(config, SLTrainConfig):
        raise TypeError(f"config must be an SLTrainConfig, got {type(config).__name__}")
    select(model, config)  # errors before copying
    if not config.inplace:
        model = copy.deepcopy(model)
    for i, t in enumerate(select(model, config)):
        w = t.module.weight
        m, n = (w.shape[1], w.shape[0]) if t.kind == "conv1d" else tuple(w.shape)
        if config.rank > min(m, n):
            raise ValueError(f"SLTrainConfig.rank={config.rank} exceeds min(m, n) = "
                             f"{min(m, n)} of {t.name} ({m}x{n})")
        new = SLTrainLinear(n, m, config.rank, linalg.nnz_for_density((m, n), config.density),
                            t.module.bias is not None, scale=config.alpha / config.rank,
                            generator=torch.Generator().manual_seed(config.seed + i),
                            orig="Conv1D" if t.kind == "conv1d" else "Linear")
        new.to(device=w.device, dtype=w.dtype)
        new.train(t.module.training)
        model = _set_module(model, t.name, new)
    return model


def sltrain_report(model: nn.Module) -> CompressionReport:
    """Parameters, FLOPs and ranks of the ``SLTrainLinear`` layers of ``model`` against
    dense layers of the same shapes."""
    report = CompressionReport(method="sltrain", rank_mode="rank")
    for name, mod in model.named_modules():
        if isinstance(mod, SLTrainLinear):
            report.layers.append(layer_row(name, "linear", (mod.out_features, mod.in_features),
                                           mod.rank, nnz=mod.nnz, note=f"scale {mod.scale:g}"))
    params = sum(p.numel() for p in model.parameters())
    report.model_params_after = params
    report.model_params_before = params + report.target_params_before - \
        report.target_params_after
    return report
