"""Low-rank convolutions: a ``Conv1d``/``Conv2d`` written as two thinner convolutions.

A convolution with weight ``W`` (C_out, C_in/G, *k) is linear in ``W``, so a low-rank
factorization of ``W`` viewed as a matrix gives two convolutions whose composition is the
low-rank convolution (Jaderberg, Vedaldi & Zisserman 2014; Zhang et al. 2016):

* ``"channel"``: ``W`` as the (C_out, C_in/G · prod k) matrix ``M ≈ A B``.  ``first`` is a
  C_in -> G·r convolution with the original kernel, stride, padding and dilation (its
  filters are the rows of B), ``second`` a G·r -> C_out 1x1 convolution (A) holding the bias.
* ``"spatial"`` (Conv2d): ``W`` as the (C_out · kw, C_in/G · kh) matrix with rows
  ``(o, j)`` and columns ``(c, i)`` (Tai et al. 2016).  ``first`` is a ``kh x 1``
  convolution C_in -> G·r (vertical stride/padding/dilation), ``second`` a ``1 x kw``
  convolution G·r -> C_out (horizontal ones).  Its factors cost ``r (C_in kh + C_out kw)``
  instead of ``r (C_in kh kw + C_out)``, so a parameter budget buys a larger rank.

With ``groups = G > 1`` each group's (C_out/G)-row block of the matrix gets its own rank-r
factors and both convolutions are grouped.  At full rank both forms reproduce the
convolution exactly; :meth:`LowRankConv.merge` returns the equivalent single convolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lorank.compress._hooks import hooked_eval
from lorank.compress.config import CONV_DECOMPOSITIONS as DECOMPOSITIONS

__all__ = [
    "DECOMPOSITIONS",
    "ConvSpec",
    "ConvFactorization",
    "LowRankConv",
    "SparseLowRankConv",
    "conv_patches",
    "conv_costs",
    "record_input_sizes",
    "is_conv",
]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}


def is_conv(module: nn.Module) -> bool:
    """A (non-transposed) ``nn.Conv1d`` or ``nn.Conv2d`` with materialized weights."""
    return isinstance(module, nn.Conv1d | nn.Conv2d) and \
        not isinstance(module.weight, nn.parameter.UninitializedParameter)


@dataclass(frozen=True)
class ConvSpec:
    """Everything that defines a convolution but its weights."""

    dim: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"
    bias: bool = True

    def __post_init__(self) -> None:
        if self.dim not in _CONV:
            raise ValueError(f"dim must be 1 or 2, got {self.dim!r}")
        for name in ("kernel_size", "stride", "dilation") + \
                (() if isinstance(self.padding, str) else ("padding",)):
            v = getattr(self, name)
            if len(v) != self.dim:
                raise ValueError(f"{name} must have {self.dim} entries, got {v!r}")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups={self.groups} must divide in_channels="
                             f"{self.in_channels} and out_channels={self.out_channels}")

    @classmethod
    def of(cls, conv: nn.Module) -> ConvSpec:
        """The spec of an ``nn.Conv1d`` / ``nn.Conv2d``."""
        if not is_conv(conv):
            raise TypeError(f"expected nn.Conv1d or nn.Conv2d, got {type(conv).__name__}")
        pad = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        return cls(len(conv.kernel_size), conv.in_channels, conv.out_channels,
                   tuple(conv.kernel_size), tuple(conv.stride), pad, tuple(conv.dilation),
                   conv.groups, conv.padding_mode, conv.bias is not None)

    @classmethod
    def from_dict(cls, d: dict) -> ConvSpec:
        d = dict(d)
        for k in ("kernel_size", "stride", "dilation"):
            d[k] = tuple(d[k])
        if not isinstance(d["padding"], str):
            d["padding"] = tuple(d["padding"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def weight_numel(self) -> int:
        return self.out_channels * self.in_channels // self.groups * math.prod(self.kernel_size)

    def build(self, *, device=None, dtype=None) -> nn.Module:
        """An ``nn.Conv1d`` / ``nn.Conv2d`` with this geometry (initialized by PyTorch)."""
        return _CONV[self.dim](self.in_channels, self.out_channels, self.kernel_size,
                               self.stride, self.padding, self.dilation, self.groups,
                               self.bias, self.padding_mode, device=device, dtype=dtype)

    def pads(self) -> tuple[int, ...]:
        """The padding in ``F.pad`` order (last dimension first, left then right)."""
        out: list[int] = []
        for i in reversed(range(self.dim)):
            if self.padding == "valid":
                left = right = 0
            elif self.padding == "same":
                total = self.dilation[i] * (self.kernel_size[i] - 1)
                left, right = total // 2, total - total // 2
            else:
                left = right = self.padding[i]
            out += [left, right]
        return tuple(out)

    def output_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        """Spatial output size for a spatial input ``size``."""
        pads = self.pads()
        out = []
        for i in range(self.dim):
            total = pads[2 * (self.dim - 1 - i)] + pads[2 * (self.dim - 1 - i) + 1]
            span = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            out.append((size[i] + total - span) // self.stride[i] + 1)
        return tuple(out)


def conv_patches(spec: ConvSpec, x: torch.Tensor) -> torch.Tensor:
    """im2col: ``(N, C_in · prod k, L)`` patches of ``x`` (N, C_in, *size), channel-major like
    ``weight.reshape(C_out, -1)``, so ``conv(x) = W_mat @ patches`` (groups = 1)."""
    if x.dim() == spec.dim + 1:
        x = x.unsqueeze(0)
    if x.dim() != spec.dim + 2 or x.shape[1] != spec.in_channels:
        raise ValueError(f"conv input must have shape (N, {spec.in_channels}, ...) with "
                         f"{spec.dim} spatial dims, got {tuple(x.shape)}")
    pads = spec.pads()
    if any(pads):
        mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
        x = F.pad(x, pads, mode=mode)
    if spec.dim == 1:
        x = x.unsqueeze(2)
    k = (1,) * (2 - spec.dim) + spec.kernel_size
    d = (1,) * (2 - spec.dim) + spec.dilation
    s = (1,) * (2 - spec.dim) + spec.stride
    return F.unfold(x, k, dilation=d, stride=s)


@dataclass(frozen=True)
class ConvFactorization:
    """How a convolution's weight maps to the matrix that is factorized, and how factors
    ``A`` (G, m, r), ``B`` (G, r, n) map to the two convolutions (see the module docstring)."""

    spec: ConvSpec
    decomposition: str = "channel"

    def __post_init__(self) -> None:
        if self.decomposition not in DECOMPOSITIONS:
            raise ValueError(f"decomposition must be one of {DECOMPOSITIONS}, got "
                             f"{self.decomposition!r}")
        if self.decomposition == "spatial" and self.spec.dim != 2:
            raise ValueError(f"the spatial decomposition needs a Conv2d, got a "
                             f"{self.spec.dim}-d convolution")

    @property
    def blocks(self) -> int:
        return self.spec.groups

    @property
    def block_shape(self) -> tuple[int, int]:
        """(m, n) of each group's matrix."""
        s = self.spec
        m, n = s.out_channels // s.groups, s.in_channels // s.groups
        if self.decomposition == "channel":
            return m, n * math.prod(s.kernel_size)
        kh, kw = s.kernel_size
        return m * kw, n * kh

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The (G·m, n) matrix of a weight (or of anything shaped like it, e.g. gradients)."""
        if self.decomposition == "channel":
            return weight.reshape(weight.shape[0], -1)
        return weight.permute(0, 3, 1, 2).reshape(-1, self.block_shape[1])

    def weight(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`matrix`."""
        s = self.spec
        cin = s.in_channels // s.groups
        if self.decomposition == "channel":
            return matrix.reshape(s.out_channels, cin, *s.kernel_size)
        kh, kw = s.kernel_size
        return matrix.reshape(s.out_channels, kw, cin, kh).permute(0, 2, 3, 1)

    def split(self) -> tuple[ConvSpec, ConvSpec]:
        """Specs of ``first`` and ``second`` with rank 1 per group (channels scale with r)."""
        s = self.spec
        g = s.groups
        if self.decomposition == "channel":
            ones = (1,) * s.dim
            first = replace(s, out_channels=g, bias=False)
            second = ConvSpec(s.dim, g, s.out_channels, ones, ones, (0,) * s.dim, ones, g,
                              "zeros", s.bias)
            return first, second
        (kh, kw), (sh, sw), (dh, dw) = s.kernel_size, s.stride, s.dilation
        ph, pw = (s.padding, s.padding) if isinstance(s.padding, str) else s.padding
        first = replace(s, out_channels=g, kernel_size=(kh, 1), stride=(sh, 1),
                        padding=ph if isinstance(ph, str) else (ph, 0), dilation=(dh, 1),
                        bias=False)
        second = replace(s, in_channels=g, kernel_size=(1, kw), stride=(1, sw),
                         padding=pw if isinstance(pw, str) else (0, pw), dilation=(1, dw))
        return first, second

    def specs(self, rank: int) -> tuple[ConvSpec, ConvSpec]:
        first, second = self.split()
        g = self.spec.groups
        return replace(first, out_channels=g * rank), replace(second, in_channels=g * rank)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The inputs of the factorized matrix: ``(N·L, G, n)`` patches that ``first`` sees."""
        return self._grouped(conv_patches(self.split()[0], x))

    def full_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N·L, G, C_in/G · prod k)`` patches of the original convolution."""
        return self._grouped(conv_patches(self.spec, x))

    def _grouped(self, p: torch.Tensor) -> torch.Tensor:
        n, f, length = p.shape
        g = self.spec.groups
        return p.permute(0, 2, 1).reshape(n * length, g, f // g)

    def to_convs(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``first.weight``, ``second.weight`` from ``A`` (G, m, r), ``B`` (G, r, n)."""
        s = self.spec
        g, _, r = a.shape
        cin = s.in_channels // g
        if self.decomposition == "channel":
            return (b.reshape(g * r, cin, *s.kernel_size),
                    a.reshape(s.out_channels, r, *(1,) * s.dim))
        kh, kw = s.kernel_size
        first = b.reshape(g * r, cin, kh, 1)
        second = a.reshape(s.out_channels, kw, r).permute(0, 2, 1).reshape(
            s.out_channels, r, 1, kw)
        return first, second

    def from_convs(self, first: torch.Tensor, second: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`to_convs`: ``(A, B)``."""
        g = self.spec.groups
        r = first.shape[0] // g
        b = first.reshape(g, r, -1)
        if self.decomposition == "channel":
            return second.reshape(g, -1, r), b
        a = second.reshape(self.spec.out_channels, r, -1).permute(0, 2, 1)
        return a.reshape(g, -1, r), b

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "decomposition": self.decomposition}

    @classmethod
    def from_dict(cls, d: dict) -> ConvFactorization:
        return cls(ConvSpec.from_dict(d["spec"]), d["decomposition"])


class LowRankConv(nn.Module):
    """``second(first(x))``: a rank-r (per group) convolution; see the module docstring.

    ``first`` and ``second`` are plain ``nn.Conv1d`` / ``nn.Conv2d`` modules, so the factors
    train like any convolution; :meth:`factors` / :meth:`set_factors` expose them as the
    matrices ``A`` (G, m, r), ``B`` (G, r, n) of :class:`ConvFactorization` (what a
    rank-adapting trainer re-factorizes)."""

    def __init__(self, factorization: ConvFactorization, rank: int, *, device=None,
                 dtype=None):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        self.factorization = factorization
        self.rank = rank
        first, second = factorization.specs(rank)
        self.first = first.build(device=device, dtype=dtype)
        self.second = second.build(device=device, dtype=dtype)

    @property
    def spec(self) -> ConvSpec:
        return self.factorization.spec

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    @classmethod
    def from_factors(cls, factorization: ConvFactorization, a: torch.Tensor, b: torch.Tensor,
                     bias: torch.Tensor | None = None) -> LowRankConv:
        """The module with factors ``A`` (G, m, r), ``B`` (G, r, n) and ``bias``."""
        mod = cls(factorization, a.shape[-1], device=a.device, dtype=a.dtype)
        mod.set_factors(a, b)
        if (bias is None) != (mod.bias is None):
            raise ValueError(f"bias given: {bias is not None}, but spec.bias = "
                             f"{factorization.spec.bias}")
        if bias is not None:
            with torch.no_grad():
                mod.bias.copy_(bias)
        return mod

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` as (G, m, r), (G, r, n) views of the two weights."""
        return self.factorization.from_convs(self.first.weight, self.second.weight)

    def set_factors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Overwrite the weights with factors of this module's rank."""
        g, (m, n), r = self.spec.groups, self.factorization.block_shape, self.rank
        if tuple(a.shape) != (g, m, r) or tuple(b.shape) != (g, r, n):
            raise ValueError(f"factors must have shapes {(g, m, r)} and {(g, r, n)}, got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        w1, w2 = self.factorization.to_convs(a, b)
        with torch.no_grad():
            self.first.weight.copy_(w1)
            self.second.weight.copy_(w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def dense_weight(self) -> torch.Tensor:
        """The equivalent convolution weight (C_out, C_in/G, *k)."""
        a, b = self.factors()
        return self.factorization.weight((a @ b).reshape(-1, b.shape[-1]))

    def merge(self) -> nn.Module:
        """The equivalent single ``nn.Conv1d`` / ``nn.Conv2d``."""
        w = self.dense_weight().detach()
        conv = self.spec.build(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def structure(self) -> dict:
        return {"type": type(self).__name__, "rank": self.rank, **self.factorization.to_dict()}

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{s.in_channels}, {s.out_channels}, kernel_size={s.kernel_size}, "
                f"rank={self.rank}, decomposition={self.factorization.decomposition!r}")


class SparseLowRankConv(LowRankConv):
    """``LowRankConv`` plus a convolution whose weight ``S`` is sparse: a fixed support
    (``sparse_index``: flat indices into the (C_out, C_in/G, *k) weight, a buffer) with
    trainable ``sparse_values``, applied as a sparse matrix to the im2col patches."""

    def __init__(self, factorization: ConvFactorization, rank: int, nnz: int, *, device=None,
                 dtype=None):
        super().__init__(factorization, rank, device=device, dtype=dtype)
        self.nnz = nnz
        self.sparse_values = nn.Parameter(torch.zeros(nnz, device=device, dtype=dtype))
        self.register_buffer("sparse_index", torch.zeros(nnz, dtype=torch.long, device=device))

    @classmethod
    def from_sparse_factors(cls, factorization: ConvFactorization, a: torch.Tensor,
                            b: torch.Tensor, s: torch.Tensor,
                            bias: torch.Tensor | None = None) -> SparseLowRankConv:
        """``s``: the sparse part in the layout of :meth:`ConvFactorization.matrix`."""
        sw = factorization.weight(s).flatten()
        idx = sw.nonzero().squeeze(-1)
        dense = LowRankConv.from_factors(factorization, a, b, bias)
        mod = cls(factorization, a.shape[-1], idx.numel(), device=a.device, dtype=a.dtype)
        mod.load_state_dict({**dense.state_dict(), "sparse_index": idx,
                             "sparse_values": sw[idx]})
        return mod

    def sparse_matrix(self) -> torch.Tensor:
        """``S`` as a sparse (C_out, C_in · prod k) matrix acting on the im2col patches
        (block diagonal over the groups)."""
        s = self.spec
        per_group = s.weight_numel // s.out_channels
        rows = self.sparse_index // per_group
        cols = (rows // (s.out_channels // s.groups)) * per_group + self.sparse_index % per_group
        return torch.sparse_coo_tensor(torch.stack([rows, cols]), self.sparse_values,
                                       (s.out_channels, per_group * s.groups),
                                       is_coalesced=True, check_invariants=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.nnz == 0:
            return y
        p = conv_patches(self.spec, x)  # (N, F, L)
        n, f, length = p.shape
        ys = torch.sparse.mm(self.sparse_matrix(), p.permute(1, 0, 2).reshape(f, n * length))
        # (C_out, N L) -> (N, C_out, L) -> y's shape (an unbatched input has N = 1)
        return y + ys.reshape(-1, n, length).transpose(0, 1).reshape(y.shape)

    def dense_weight(self) -> torch.Tensor:
        w = super().dense_weight()
        s = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
        return w + s.index_put((self.sparse_index,), self.sparse_values).view_as(w)

    def structure(self) -> dict:
        return {**super().structure(), "nnz": self.nnz}


def build_conv_module(spec: dict) -> LowRankConv:
    """An uninitialized module from :meth:`LowRankConv.structure`."""
    fac = ConvFactorization.from_dict(spec)
    if spec["type"] == "SparseLowRankConv":
        return SparseLowRankConv(fac, spec["rank"], spec["nnz"])
    return LowRankConv(fac, spec["rank"])


def conv_costs(module: nn.Module, size: tuple[int, ...] | None) -> tuple[int, int]:
    """``(weight parameters, FLOPs)`` of a convolution or :class:`LowRankConv` for one example
    of spatial input ``size``: ``2 · weight numel · output positions`` per convolution
    (``+ 2 nnz`` per output position for the sparse part); biases are not counted.  With
    ``size=None``, FLOPs per output position (every convolution counted once)."""
    if isinstance(module, LowRankConv):
        p1, f1 = conv_costs(module.first, size)
        mid = None if size is None else ConvSpec.of(module.first).output_size(size)
        p2, f2 = conv_costs(module.second, mid)
        nnz = getattr(module, "nnz", 0)
        positions = 1 if size is None else math.prod(module.spec.output_size(size))
        return p1 + p2 + nnz, f1 + f2 + 2 * nnz * positions
    spec = ConvSpec.of(module)
    positions = 1 if size is None else math.prod(spec.output_size(size))
    return spec.weight_numel, 2 * spec.weight_numel * positions


def record_input_sizes(model: nn.Module, modules: dict[str, nn.Module], batch: object,
                       forward_fn: Callable[[nn.Module, object], object]
                       ) -> dict[str, tuple[int, ...]]:
    """Spatial input size of each named convolution in one ``forward_fn(model, batch)``
    (the first call's, for a module called several times)."""
    sizes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, mod in modules.items():
        dim = len(mod.kernel_size)

        def pre(m, args, name=name, dim=dim):
            sizes.setdefault(name, tuple(args[0].shape[-dim:]))
        hooks.append(mod.register_forward_pre_hook(pre))
    with hooked_eval(model, hooks), torch.no_grad():
        forward_fn(model, batch)
    return sizes

