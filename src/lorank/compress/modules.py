"""Factorized drop-in modules and their conversions from and to dense layers.

* :class:`LowRankLinear`: ``y = (x @ B^T) @ A^T + bias``; replaces ``nn.Linear`` (and the
  Hugging Face GPT-2 style ``Conv1D``, whose weight is stored transposed).
* :class:`SparseLowRankLinear`: ``y = x @ (A B + S)^T + bias`` with ``S`` sparse (fixed
  support, trainable values).
* :class:`LowRankEmbedding`: a rank-r table followed by an r -> dim projection.
* :class:`LowRankRNN`: LSTM/GRU whose input (``ih``) and recurrent (``hh``) matrices are
  each dense or factorized, stacked over the gates or per gate.
* :class:`~lorank.compress.conv.LowRankConv` (in ``lorank.compress.conv``): Conv1d/Conv2d.

Every module has ``merge()`` returning the equivalent dense PyTorch module and
``structure()`` returning the JSON-able description :func:`build_module` rebuilds it from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorank.compress.conv import LowRankConv, build_conv_module

__all__ = [
    "LowRankLinear",
    "SparseLowRankLinear",
    "LowRankEmbedding",
    "LowRankRNN",
    "FACTORIZED_TYPES",
    "build_module",
    "register_structured",
    "is_hf_conv1d",
]


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2): ``y = x @ W + b`` with W (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous())


class LowRankLinear(nn.Module):
    """``y = x @ (A @ B)^T + bias`` with ``second.weight = A`` (out x r), ``first.weight = B``
    (r x in).  Costs ``r (in + out)`` multiply-adds per input vector instead of ``in * out``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        device=None,
        dtype=None,
        orig: str = "Linear",
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.orig = orig
        self.first = nn.Linear(in_features, rank, bias=False, **kw)
        self.second = nn.Linear(rank, out_features, bias=bias, **kw)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    @classmethod
    def from_factors(
        cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, orig="Linear"
    ) -> LowRankLinear:
        out, r = a.shape
        r2, inp = b.shape
        if r != r2:
            raise ValueError(f"factor ranks differ: A {tuple(a.shape)}, B {tuple(b.shape)}")
        mod = cls(inp, out, r, bias=bias is not None, device=a.device, dtype=a.dtype, orig=orig)
        with torch.no_grad():
            mod.first.weight.copy_(b)
            mod.second.weight.copy_(a)
            if bias is not None:
                mod.second.bias.copy_(bias)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def dense_weight(self) -> torch.Tensor:
        """``A @ B`` (out x in)."""
        return self.second.weight @ self.first.weight

    def merge(self) -> nn.Module:
        """The equivalent dense ``nn.Linear`` (or HF ``Conv1D`` if that is what was replaced)."""
        w = self.dense_weight().detach()
        return _dense_linear(w, self.bias, self.orig)

    def structure(self) -> dict:
        return {
            "type": "LowRankLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.bias is not None,
            "orig": self.orig,
        }

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _dense_linear(w: torch.Tensor, bias: torch.Tensor | None, orig: str) -> nn.Module:
    out, inp = w.shape
    if orig == "Conv1D":
        from transformers.pytorch_utils import Conv1D

        lin = Conv1D(out, inp)
        lin.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.mT)
            if bias is not None:
                lin.bias.copy_(bias)
            else:
                lin.bias.zero_()
        return lin
    lin = nn.Linear(inp, out, bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias.detach())
    return lin


class SparseLowRankLinear(LowRankLinear):
    """``y = x @ (A B + S)^T + bias``: ``S`` has a fixed support (``sparse_index``: flat
    indices into the out x in matrix, a buffer) and trainable values ``sparse_values``."""

    def __init__(self, in_features, out_features, rank, nnz, bias=True, *, device=None,
                 dtype=None, orig="Linear"):
        super().__init__(in_features, out_features, rank, bias, device=device, dtype=dtype,
                         orig=orig)
        self.nnz = nnz
        self.sparse_values = nn.Parameter(torch.zeros(nnz, device=device, dtype=dtype))
        self.register_buffer("sparse_index", torch.zeros(nnz, dtype=torch.long, device=device))

    @classmethod
    def from_factors(cls, a, b, s, bias=None, orig="Linear") -> SparseLowRankLinear:
        out, r = a.shape
        inp = b.shape[1]
        idx = s.flatten().nonzero().squeeze(-1)
        mod = cls(inp, out, r, idx.numel(), bias=bias is not None, device=a.device,
                  dtype=a.dtype, orig=orig)
        with torch.no_grad():
            mod.first.weight.copy_(b)
            mod.second.weight.copy_(a)
            mod.sparse_index.copy_(idx)
            mod.sparse_values.copy_(s.flatten()[idx])
            if bias is not None:
                mod.second.bias.copy_(bias)
        return mod

    def sparse_matrix(self) -> torch.Tensor:
        """``S`` as a sparse COO tensor (out x in)."""
        rows = self.sparse_index // self.in_features
        cols = self.sparse_index % self.in_features
        return torch.sparse_coo_tensor(
            torch.stack([rows, cols]), self.sparse_values,
            (self.out_features, self.in_features), is_coalesced=True, check_invariants=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.second(self.first(x))
        if self.nnz == 0:
            return y
        flat = x.reshape(-1, self.in_features)
        ys = torch.sparse.mm(self.sparse_matrix(), flat.mT).mT
        return y + ys.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        w = super().dense_weight()
        s = torch.zeros_like(w).flatten().index_put((self.sparse_index,), self.sparse_values)
        return w + s.view_as(w)

    def structure(self) -> dict:
        return {**super().structure(), "type": "SparseLowRankLinear", "nnz": self.nnz}


class LowRankEmbedding(nn.Module):
    """``emb(idx) = table[idx] @ proj^T``: table (num x r), proj (dim x r), so the dense table
    is ``table @ proj^T``.  ``padding_idx``, ``max_norm`` etc. are not carried over (max_norm
    would renormalize the rank-space rows); a padding row stays whatever its factors give."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, *,
                 padding_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.rank = rank
        self.padding_idx = padding_idx
        self.table = nn.Parameter(torch.empty(num_embeddings, rank, device=device, dtype=dtype))
        self.proj = nn.Parameter(torch.empty(embedding_dim, rank, device=device, dtype=dtype))
        nn.init.normal_(self.table)
        nn.init.normal_(self.proj, std=1 / math.sqrt(rank))

    @classmethod
    def from_factors(cls, table: torch.Tensor, proj: torch.Tensor, padding_idx=None):
        mod = cls(table.shape[0], proj.shape[0], table.shape[1], padding_idx=padding_idx,
                  device=table.device, dtype=table.dtype)
        with torch.no_grad():
            mod.table.copy_(table)
            mod.proj.copy_(proj)
        return mod

    @property
    def weight(self) -> torch.Tensor:
        """The dense table (num x dim), built on demand (tied output layers read this)."""
        return self.table @ self.proj.mT

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.table) @ self.proj.mT

    def merge(self) -> nn.Embedding:
        w = self.weight.detach()
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            emb.weight.copy_(w)
        return emb

    def structure(self) -> dict:
        return {"type": "LowRankEmbedding", "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "rank": self.rank,
                "padding_idx": self.padding_idx}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


_GATES = {"LSTM": 4, "GRU": 3}


class LowRankRNN(nn.Module):
    """A multi-layer LSTM or GRU (same math, parameter names and gate order as ``nn.LSTM`` /
    ``nn.GRU``) whose weight matrices can each be factorized.

    A dense matrix keeps its ``nn.LSTM`` name (``weight_ih_l0``, ``weight_hh_l1_reverse``).
    A factorized one is stored as ``<name>_left`` (G, H_g, r) and ``<name>_right``
    (G, r, in): ``W[g] = left[g] @ right[g]`` for each of the G gate blocks — G = 1 for a
    factorization of the stacked (gates * hidden) x in matrix, G = 4 (LSTM) / 3 (GRU) per gate.

    The recurrence runs as a Python loop over time (the input projection of all steps is one
    batched product); packed sequences and ``proj_size`` are not supported.
    """

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, *, device=None, dtype=None):
        super().__init__()
        if mode not in _GATES:
            raise ValueError(f"mode must be 'LSTM' or 'GRU', got {mode!r}")
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.num_gates = _GATES[mode]
        #: name -> rank and gate blocks for factorized matrices
        self.factorized: dict[str, dict] = {}
        #: optional hook ``f(name, inputs_2d)`` called with each matrix's inputs (calibration)
        self.stats_hook = None
        gh = self.num_gates * hidden_size
        kw = {"device": device, "dtype": dtype}
        for layer in range(num_layers):
            for sfx in self._suffixes():
                inp = input_size if layer == 0 else hidden_size * self.num_directions
                self.register_parameter(f"weight_ih_l{layer}{sfx}",
                                        nn.Parameter(torch.empty(gh, inp, **kw)))
                self.register_parameter(f"weight_hh_l{layer}{sfx}",
                                        nn.Parameter(torch.empty(gh, hidden_size, **kw)))
                if bias:
                    self.register_parameter(f"bias_ih_l{layer}{sfx}",
                                            nn.Parameter(torch.empty(gh, **kw)))
                    self.register_parameter(f"bias_hh_l{layer}{sfx}",
                                            nn.Parameter(torch.empty(gh, **kw)))
        std = 1 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -std, std)

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffixes(self) -> list[str]:
        return ["", "_reverse"] if self.bidirectional else [""]

    def matrix_names(self) -> list[str]:
        """All weight matrix names, e.g. ``['weight_ih_l0', 'weight_hh_l0', ...]``."""
        return [f"weight_{p}_l{layer}{sfx}" for layer in range(self.num_layers)
                for sfx in self._suffixes() for p in ("ih", "hh")]

    # ---- conversion ----------------------------------------------------------------------
    @classmethod
    def from_rnn(cls, rnn: nn.RNNBase) -> LowRankRNN:
        """An exact copy of ``rnn`` (nn.LSTM or nn.GRU) with every matrix dense."""
        mode = type(rnn).__name__ if isinstance(rnn, nn.LSTM | nn.GRU) else None
        if mode is None:
            raise TypeError(f"expected nn.LSTM or nn.GRU, got {type(rnn).__name__}")
        if getattr(rnn, "proj_size", 0):
            raise ValueError("LSTMs with proj_size > 0 are not supported")
        w = rnn.weight_ih_l0
        mod = cls(mode, rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.bias,
                  rnn.batch_first, rnn.dropout, rnn.bidirectional, device=w.device, dtype=w.dtype)
        mod.load_state_dict(rnn.state_dict())
        mod.train(rnn.training)
        return mod

    def matrix(self, name: str) -> torch.Tensor:
        """The dense (gates * hidden) x in matrix ``name`` (reconstructed if factorized)."""
        if name in self.factorized:
            left = getattr(self, f"{name}_left")
            right = getattr(self, f"{name}_right")
            return (left @ right).reshape(-1, right.shape[-1])
        return getattr(self, name)

    def factorize(self, name: str, left: torch.Tensor, right: torch.Tensor) -> None:
        """Replace matrix ``name`` by factors left (G, H_g, r), right (G, r, in) (2-D factors
        mean G = 1)."""
        if name not in self.matrix_names():
            raise KeyError(f"{name!r} is not a weight matrix of this RNN")
        if left.dim() == 2:
            left, right = left.unsqueeze(0), right.unsqueeze(0)
        g, hg, r = left.shape
        dense = self.matrix(name)
        if g * hg != dense.shape[0] or right.shape != (g, r, dense.shape[1]):
            raise ValueError(
                f"factors {tuple(left.shape)}, {tuple(right.shape)} do not match {name} "
                f"{tuple(dense.shape)}"
            )
        if name in self.factorized:
            delattr(self, f"{name}_left")
            delattr(self, f"{name}_right")
        else:
            delattr(self, name)
        self.register_parameter(f"{name}_left", _param(left))
        self.register_parameter(f"{name}_right", _param(right))
        self.factorized[name] = {"rank": r, "blocks": g}

    def densify(self, name: str) -> None:
        """Turn factorized matrix ``name`` back into a dense parameter."""
        if name not in self.factorized:
            return
        w = self.matrix(name).detach()
        delattr(self, f"{name}_left")
        delattr(self, f"{name}_right")
        del self.factorized[name]
        self.register_parameter(name, _param(w))

    def merge(self) -> nn.RNNBase:
        """The equivalent ``nn.LSTM`` / ``nn.GRU``."""
        w = self.weight_ih_l0_right if "weight_ih_l0" in self.factorized else self.weight_ih_l0
        cls = nn.LSTM if self.mode == "LSTM" else nn.GRU
        rnn = cls(self.input_size, self.hidden_size, self.num_layers, bias=self.bias,
                  batch_first=self.batch_first, dropout=self.dropout,
                  bidirectional=self.bidirectional, device=w.device, dtype=w.dtype)
        state = {}
        for name in self.matrix_names():
            state[name] = self.matrix(name).detach()
        for name, p in self.named_parameters():
            if name.startswith("bias_"):
                state[name] = p.detach()
        rnn.load_state_dict(state)
        rnn.train(self.training)
        return rnn

    def structure(self) -> dict:
        return {"type": "LowRankRNN", "mode": self.mode, "input_size": self.input_size,
                "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "bias": self.bias, "batch_first": self.batch_first, "dropout": self.dropout,
                "bidirectional": self.bidirectional,
                "factorized": {k: dict(v) for k, v in sorted(self.factorized.items())}}

    # ---- forward -------------------------------------------------------------------------
    def _project(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``x @ W^T`` for x (N, in) -> (N, gates * hidden)."""
        if name not in self.factorized:
            return x @ getattr(self, name).mT
        left = getattr(self, f"{name}_left")  # (G, Hg, r)
        right = getattr(self, f"{name}_right")  # (G, r, in)
        g, hg, r = left.shape
        if g == 1:
            return (x @ right[0].mT) @ left[0].mT
        z = (x @ right.reshape(g * r, -1).mT).view(-1, g, r).transpose(0, 1)  # (G, N, r)
        return torch.bmm(z, left.mT).transpose(0, 1).reshape(x.shape[0], g * hg)

    def _run_direction(self, x, layer, sfx, h0, c0, reverse):
        t_len, batch, _ = x.shape
        name_ih, name_hh = f"weight_ih_l{layer}{sfx}", f"weight_hh_l{layer}{sfx}"
        flat = x.reshape(t_len * batch, -1)
        if self.stats_hook is not None:
            self.stats_hook(name_ih, flat)
        gi = self._project(flat, name_ih).view(t_len, batch, -1)
        if self.bias:
            gi = gi + getattr(self, f"bias_ih_l{layer}{sfx}")
            b_hh = getattr(self, f"bias_hh_l{layer}{sfx}")
        else:
            b_hh = None
        h, c = h0, c0
        outs = [None] * t_len
        prev = [] if self.stats_hook is not None else None
        steps = range(t_len - 1, -1, -1) if reverse else range(t_len)
        hs = self.hidden_size
        for t in steps:
            if prev is not None:
                prev.append(h)
            gh = self._project(h, name_hh)
            if b_hh is not None:
                gh = gh + b_hh
            if self.mode == "LSTM":
                gates = gi[t] + gh
                i, f, g, o = gates.split(hs, -1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                ir, iz, inn = gi[t].split(hs, -1)
                hr, hz, hn = gh.split(hs, -1)
                r = torch.sigmoid(ir + hr)
                z = torch.sigmoid(iz + hz)
                n = torch.tanh(inn + r * hn)
                h = (1 - z) * n + z * h
            outs[t] = h
        if prev is not None:
            self.stats_hook(name_hh, torch.cat(prev, 0))
        return torch.stack(outs), h, c

    def forward(self, x: torch.Tensor, hx=None):
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise TypeError("LowRankRNN does not support PackedSequence inputs; pad them")
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        batch = x.shape[1]
        nd = self.num_directions
        shape = (self.num_layers * nd, batch, self.hidden_size)
        if hx is None:
            h0 = x.new_zeros(shape)
            c0 = x.new_zeros(shape) if self.mode == "LSTM" else None
        elif self.mode == "LSTM":
            h0, c0 = hx
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        else:
            h0, c0 = (hx.unsqueeze(1) if unbatched else hx), None
        hn, cn = [], []
        out = x
        for layer in range(self.num_layers):
            dir_outs = []
            for d, sfx in enumerate(self._suffixes()):
                k = layer * nd + d
                o, h, c = self._run_direction(out, layer, sfx, h0[k],
                                              None if c0 is None else c0[k], reverse=d == 1)
                dir_outs.append(o)
                hn.append(h)
                cn.append(c)
            out = dir_outs[0] if nd == 1 else torch.cat(dir_outs, -1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                out = F.dropout(out, self.dropout, training=True)
        h_n = torch.stack(hn)
        if unbatched:
            out = out.squeeze(1)
            h_n = h_n.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if self.mode == "LSTM":
            c_n = torch.stack(cn)
            if unbatched:
                c_n = c_n.squeeze(1)
            return out, (h_n, c_n)
        return out, h_n

    def extra_repr(self) -> str:
        fac = ", ".join(f"{k}: r={v['rank']}x{v['blocks']}" for k, v in self.factorized.items())
        return (f"{self.mode}({self.input_size}, {self.hidden_size}, "
                f"num_layers={self.num_layers}), factorized={{{fac}}}")


FACTORIZED_TYPES = (LowRankLinear, LowRankEmbedding, LowRankRNN, LowRankConv)

#: more module types that save and rebuild themselves: type name -> class with a
#: ``structure()`` method and a ``from_structure(spec)`` classmethod
STRUCTURED_TYPES: dict[str, type[nn.Module]] = {}


def register_structured(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: let :func:`build_module` rebuild ``cls`` from its ``structure()``."""
    for attr in ("structure", "from_structure"):
        if not callable(getattr(cls, attr, None)):
            raise TypeError(f"{cls.__name__} needs a {attr}() method to be registered")
    STRUCTURED_TYPES[cls.__name__] = cls
    return cls


def is_structured(module: nn.Module) -> bool:
    """Whether ``module`` is a factorized or registered module that :func:`build_module` can
    rebuild from its ``structure()``."""
    return isinstance(module, FACTORIZED_TYPES + tuple(STRUCTURED_TYPES.values()))


def build_module(spec: dict) -> nn.Module:
    """An uninitialized factorized module from a :meth:`structure` dict (for loading)."""
    kind = spec["type"]
    if kind in STRUCTURED_TYPES:
        return STRUCTURED_TYPES[kind].from_structure(spec)
    if kind == "LowRankLinear":
        return LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"],
                             spec["bias"], orig=spec.get("orig", "Linear"))
    if kind == "SparseLowRankLinear":
        return SparseLowRankLinear(spec["in_features"], spec["out_features"], spec["rank"],
                                   spec["nnz"], spec["bias"], orig=spec.get("orig", "Linear"))
    if kind == "LowRankEmbedding":
        return LowRankEmbedding(spec["num_embeddings"], spec["embedding_dim"], spec["rank"],
                                padding_idx=spec.get("padding_idx"))
    if kind == "LowRankRNN":
        mod = LowRankRNN(spec["mode"], spec["input_size"], spec["hidden_size"],
                         spec["num_layers"], spec["bias"], spec["batch_first"], spec["dropout"],
                         spec["bidirectional"])
        for name, info in spec["factorized"].items():
            dense = mod.matrix(name)
            g, r = info["blocks"], info["rank"]
            mod.factorize(name, dense.new_zeros(g, dense.shape[0] // g, r),
                          dense.new_zeros(g, r, dense.shape[1]))
        return mod
    if kind in ("LowRankConv", "SparseLowRankConv"):
        return build_conv_module(spec)
    raise ValueError(f"unknown factorized module type {kind!r}")
