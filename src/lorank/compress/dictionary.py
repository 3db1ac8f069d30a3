"""Dense-dictionary x sparse-code layers: CoSpaDi and DSFormer.

A linear layer ``y = x W^T + b`` (W: out x in) becomes ``W ≈ A B``: a dense dictionary ``B``
(k atoms of the input space, k x in) and codes ``A`` (out x k) with ``s`` nonzeros in every
row, so each output neuron mixes its own s atoms (a union of subspaces, not one subspace).

* ``method="cospadi"`` (Shopkhoev et al. 2025): fitted on calibration activations
  (whitened by the input Gram factor, so outputs rather than weights are matched) with
  :func:`lorank.linalg.sparse_dictionary`; optionally one dictionary shared by several
  layers (``share_dictionary``).
* ``method="dsformer"`` (Chand et al. 2023): N:M semi-structured codes (``dict_nm``) and
  :func:`straight_through_finetune`, the straight-through factorizer (STF) reduced to a
  task-loss fine-tuning in which the N:M support is re-chosen by magnitude every step.

Storage is counted as saved: the dictionary, the nonzero values and the support as a
bitmask of k bits per output row (:func:`lorank.linalg.dictionary_bytes`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lorank import linalg
from lorank.compress.modules import LowRankLinear, _dense_linear, register_structured

__all__ = [
    "SparseDictionaryLinear",
    "straight_through_finetune",
    "dictionary_layers",
    "pack_support",
    "unpack_support",
]


def pack_support(mask: torch.Tensor) -> torch.Tensor:
    """(rows, k) bool -> (rows, ceil(k / 8)) uint8, bit j % 8 of byte j // 8 for atom j."""
    rows, k = mask.shape
    pad = (-k) % 8
    bits = F.pad(mask.to(torch.uint8), (0, pad)).view(rows, -1, 8)
    weights = (2 ** torch.arange(8, device=mask.device)).to(torch.uint8)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def unpack_support(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_support`: (rows, ceil(k / 8)) uint8 -> (rows, k) bool."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :k].bool()


@register_structured
class SparseDictionaryLinear(nn.Module):
    """``y = (x @ atoms^T) @ A^T + bias``: ``atoms`` (k x in, dense) and codes ``A``
    (out x k) with ``nnz`` nonzeros per row, stored as ``values`` (out x nnz, in increasing
    atom order) and ``support`` (a packed bitmask, out x ceil(k/8) uint8).  The second
    product is a sparse x dense one (``F.embedding_bag`` over each row's s atoms); neither
    the dense codes nor W are formed in ``forward``.

    ``nm=(N, M)`` records DSFormer's N:M structure (N of every M consecutive atoms)."""

    def __init__(self, in_features: int, out_features: int, n_atoms: int, nnz: int,
                 bias: bool = True, *, nm: tuple[int, int] | None = None, device=None,
                 dtype=None, orig: str = "Linear"):
        super().__init__()
        if not 1 <= nnz <= n_atoms:
            raise ValueError(f"nnz must lie in [1, n_atoms={n_atoms}], got {nnz}")
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.n_atoms = n_atoms
        self.nnz = nnz
        self.nm = None if nm is None else tuple(nm)
        self.orig = orig
        self.atoms = nn.Parameter(torch.empty(n_atoms, in_features, **kw))
        nn.init.normal_(self.atoms, std=1 / math.sqrt(in_features))
        self.values = nn.Parameter(torch.zeros(out_features, nnz, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        first = torch.zeros(out_features, n_atoms, dtype=torch.bool, device=device)
        first[:, :nnz] = True
        self.register_buffer("support", pack_support(first))
        self._index_key = None
        self._index_cache = None
        #: name of the module whose ``atoms`` this one shares (set by compress / load)
        self.shared_from: str | None = None

    @classmethod
    def from_codes(cls, codes_index: torch.Tensor, codes_values: torch.Tensor,
                   atoms: torch.Tensor | nn.Parameter, bias: torch.Tensor | None = None, *,
                   nm=None, orig: str = "Linear") -> SparseDictionaryLinear:
        """From the support ``codes_index`` (out, nnz) and its values, and the atoms (k x in);
        an ``nn.Parameter`` for ``atoms`` is used as is (a shared dictionary)."""
        out, s = codes_index.shape
        k, inp = atoms.shape
        if codes_values.shape != (out, s):
            raise ValueError(f"codes_values must have shape {(out, s)}, got "
                             f"{tuple(codes_values.shape)}")
        mod = cls(inp, out, k, s, bias=bias is not None, nm=nm, device=atoms.device,
                  dtype=atoms.dtype, orig=orig)
        mask = torch.zeros(out, k, dtype=torch.bool, device=atoms.device)
        mask.scatter_(1, codes_index, True)
        if int(mask.sum()) != out * s:
            raise ValueError("codes_index has repeated atoms in a row")
        order = codes_index.argsort(-1)
        with torch.no_grad():
            mod.support.copy_(pack_support(mask))
            mod.values.copy_(torch.gather(codes_values, 1, order))
            if bias is not None:
                mod.bias.copy_(bias)
        if isinstance(atoms, nn.Parameter):
            mod.atoms = atoms
        else:
            with torch.no_grad():
                mod.atoms.copy_(atoms)
        return mod

    def index(self) -> torch.Tensor:
        """The (out, nnz) atom indices of every row, ascending (cached per support version)."""
        key = (self.support.data_ptr(), self.support._version)
        if self._index_key != key:
            mask = unpack_support(self.support, self.n_atoms)
            counts = mask.sum(-1)
            if bool((counts != self.nnz).any()):
                raise ValueError(f"support has rows with {sorted(set(counts.tolist()))} atoms; "
                                 f"expected {self.nnz} in every row")
            ar = torch.arange(self.n_atoms, device=mask.device).expand_as(mask)
            self._index_cache = ar[mask].view(self.out_features, self.nnz)
            self._index_key = key
        return self._index_cache

    def codes_dense(self) -> torch.Tensor:
        """``A`` as a dense (out x k) tensor."""
        a = torch.zeros(self.out_features, self.n_atoms, dtype=self.values.dtype,
                        device=self.values.device)
        return a.scatter(1, self.index(), self.values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.atoms).reshape(-1, self.n_atoms)
        # y^T[j] = sum_t values[j, t] z^T[index[j, t]]: a weighted bag of s rows of z^T per
        # output, the sparse x dense product without a dense A (and far faster on CPU than
        # torch.sparse.mm)
        y = F.embedding_bag(self.index(), z.mT.contiguous(), per_sample_weights=self.values,
                            mode="sum").mT
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        """``A @ atoms`` (out x in)."""
        return self.codes_dense() @ self.atoms

    def merge(self) -> nn.Module:
        """The equivalent dense ``nn.Linear`` (or HF ``Conv1D``)."""
        return _dense_linear(self.dense_weight().detach(), self.bias, self.orig)

    def storage_bytes(self, include_atoms: bool = True) -> int:
        """Bytes of the tensors that define the codes (and the atoms): values, support
        bitmask, atoms; the bias is not counted (as for every compressed layer)."""
        total = self.values.nbytes + self.support.nbytes
        return total + (self.atoms.nbytes if include_atoms else 0)

    @classmethod
    def from_structure(cls, spec: dict) -> SparseDictionaryLinear:
        """An uninitialized module from its :meth:`structure` (for loading)."""
        mod = cls(spec["in_features"], spec["out_features"], spec["n_atoms"], spec["nnz"],
                  spec["bias"], nm=spec.get("nm"), orig=spec.get("orig", "Linear"))
        mod.shared_from = spec.get("shared_from")
        return mod

    def structure(self) -> dict:
        return {"type": "SparseDictionaryLinear", "in_features": self.in_features,
                "out_features": self.out_features, "n_atoms": self.n_atoms, "nnz": self.nnz,
                "bias": self.bias is not None, "orig": self.orig,
                "nm": None if self.nm is None else list(self.nm),
                "shared_from": self.shared_from}

    def extra_repr(self) -> str:
        nm = "" if self.nm is None else f", nm={self.nm[0]}:{self.nm[1]}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"n_atoms={self.n_atoms}, nnz={self.nnz}{nm}")


def refresh_sharing(model: nn.Module) -> None:
    """Set every :class:`SparseDictionaryLinear`'s ``shared_from`` from the atoms parameters
    it actually shares: the first holder (in ``named_modules`` order) owns them."""
    owners: dict[int, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SparseDictionaryLinear):
            mod.shared_from = owners.setdefault(id(mod.atoms), name)
            if mod.shared_from == name:
                mod.shared_from = None


def tie_shared_atoms(model: nn.Module) -> None:
    """Make every :class:`SparseDictionaryLinear` with ``shared_from`` use that module's atoms
    parameter (after loading, the copies hold equal values; this restores the sharing)."""
    mods = dict(model.named_modules())
    for mod in mods.values():
        if isinstance(mod, SparseDictionaryLinear) and mod.shared_from:
            owner = mods.get(mod.shared_from)
            if not isinstance(owner, SparseDictionaryLinear):
                raise ValueError(f"shared_from={mod.shared_from!r} names no dictionary layer")
            mod.atoms = owner.atoms


# ---------------------------------------------------------------------------------------------
# DSFormer's straight-through factorizer


def nm_mask(codes: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    """The N largest-magnitude entries of every M consecutive ones along the last axis."""
    n_keep, m_group = nm
    rows, k = codes.shape
    g = codes.detach().abs().reshape(rows, k // m_group, m_group)
    top = g.topk(n_keep, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(rows, k)


class _StraightThrough(nn.Module):
    """A dictionary layer in training: dense codes, N:M-masked in the forward pass, with the
    gradient passed straight through to every entry (Chand et al. 2023's STF)."""

    def __init__(self, layer: SparseDictionaryLinear):
        super().__init__()
        self.layer_spec = layer.structure()
        self.nm = layer.nm
        self.atoms = layer.atoms
        self.codes = nn.Parameter(layer.codes_dense().detach().clone())
        self.bias = layer.bias
        self.shared_from = layer.shared_from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.codes
        masked = c + (c * nm_mask(c, self.nm) - c).detach()
        return F.linear(F.linear(x, self.atoms), masked, self.bias)

    def freeze(self) -> SparseDictionaryLinear:
        mask = nm_mask(self.codes, self.nm)
        k = self.codes.shape[1]
        ar = torch.arange(k, device=mask.device).expand_as(mask)
        index = ar[mask].view(mask.shape[0], -1)
        values = torch.gather(self.codes.detach(), 1, index)
        mod = SparseDictionaryLinear.from_codes(index, values, self.atoms,
                                                None if self.bias is None else self.bias.detach(),
                                                nm=self.nm, orig=self.layer_spec["orig"])
        mod.bias = self.bias
        mod.shared_from = self.shared_from
        return mod


def straight_through_finetune(model: nn.Module, data: Iterable,
                              loss_fn: Callable[[object, object], torch.Tensor],
                              **finetune_kwargs) -> list[float]:
    """DSFormer's straight-through factorizer, reduced: fine-tune ``model`` on the task loss
    with every N:M :class:`SparseDictionaryLinear` trained as dense codes masked to N:M by
    magnitude in each forward pass (straight-through gradient), then re-sparsified; in place.
    Other arguments (``steps`` required, ``lr``, ...) as :func:`lorank.compress.finetune`.
    Returns the step losses."""
    from lorank.compress.core import _set_module
    from lorank.compress.finetune import finetune

    names = [n for n, m in model.named_modules()
             if isinstance(m, SparseDictionaryLinear) and m.nm is not None]
    if not names:
        raise ValueError("straight_through_finetune: the model has no N:M dictionary layer "
                         "(compress with method='dsformer' first)")
    for n in names:
        model = _set_module(model, n, _StraightThrough(model.get_submodule(n)))
    try:
        return finetune(model, data, loss_fn, **finetune_kwargs)
    finally:
        for n in names:
            _set_module(model, n, model.get_submodule(n).freeze())


# ---------------------------------------------------------------------------------------------
# fitting inside compress()


def _groups(matrices, config) -> list[list]:
    """Matrices grouped by the captured groups of ``config.share_dictionary`` (all matches
    form one group when it captures none; a matrix it does not match is alone)."""
    groups: dict[object, list] = {}
    for mx in matrices:
        key = ("own", mx.key)
        if config.share_dictionary is not None:
            hit = re.fullmatch(config.share_dictionary, mx.key)
            if hit is not None:
                key = ("shared", hit.groups())
        groups.setdefault(key, []).append(mx)
    return list(groups.values())


def _candidates(m: int, n: int, members: int, budget: int | None, config, itemsize: int):
    """(k, s) options that fit ``budget`` bytes (or the fixed ``config.rank`` atoms)."""
    out = []
    if config.method == "dsformer":
        n_keep, m_group = config.dict_nm
        if budget is None:
            k = config.rank
            linalg.check_nm(config.dict_nm, k)
            return [(k, n_keep * k // m_group)]
        ks = [k for k in range(m_group, n + 1, m_group)
              if linalg.dictionary_bytes(m, n, k, n_keep * k // m_group, itemsize) <= budget]
        return [(ks[-1], n_keep * ks[-1] // m_group)] if ks else []
    for rho in config.dict_sparsity:
        if budget is None:
            out.append((config.rank, max(1, math.ceil(rho * config.rank))))
            continue
        best = None
        for k in range(1, n + 1):
            s = max(1, math.ceil(rho * k))
            if linalg.dictionary_bytes(m, n, k, s, itemsize) > budget:
                break
            best = (k, s)
        if best is not None and best[0] == n:  # all atoms: spend the rest on nonzeros
            s = best[1]
            while s < n and linalg.dictionary_bytes(m, n, n, s + 1, itemsize) <= budget:
                s += 1
            best = (n, s)
        if best is not None:
            out.append(best)
    if config.dict_lowrank_fallback and members == 1 and budget is not None:
        r = max((k for k in range(1, min(m, n) + 1)
                 if linalg.dictionary_bytes(m, n, k, k, itemsize) <= budget), default=0)
        if r:
            out.append((r, r))
    return sorted(set(out))


def dictionary_layers(matrices, config, gen, notes_by_key, unused):
    """Fit every selected matrix (or shared group) and build its replacement: returns
    ``(rows, {id(target): module})``."""
    from lorank.compress.core import _chol, _output_error
    from lorank.compress.report import LayerReport

    rows: dict[str, LayerReport] = {}
    modules: dict[int, nn.Module] = {}
    live = [mx for mx in matrices if id(mx) not in unused]
    for mx in matrices:
        if id(mx) in unused:
            m, n = mx.shape
            rows[mx.key] = LayerReport(mx.key, "linear", (m, n), None, "dense", m * n, m * n,
                                       2 * m * n, 2 * m * n, 0.0, None, 1,
                                       "; ".join(notes_by_key[mx.key]))
    for group in _groups(live, config):
        first = group[0]
        n = first.shape[1]
        if any(mx.shape[1] != n for mx in group):
            raise ValueError(f"share_dictionary groups {[mx.key for mx in group]} whose input "
                             f"sizes differ ({[mx.shape[1] for mx in group]})")
        w = torch.cat([mx.weight for mx in group], 0)
        m = w.shape[0]
        itemsize = w.element_size()
        chol = None
        if all(mx.stats.gram is not None for mx in group):
            if len(group) == 1:
                chol = _chol(first, config, 0)
            else:
                gram = sum(mx.stats.gram for mx in group)
                chol = linalg.whitening_factor(gram, config.whiten_damp)
        elif config.method == "cospadi":
            raise ValueError(f"cospadi needs the input Gram matrix of {first.key} ({n} input "
                             f"features; max_gram_features={config.max_gram_features})")
        budget = None
        if config.rank_mode == "param_reduction":
            budget = math.floor((1 - config.param_reduction) * m * n * itemsize)
        elif config.rank > n:
            raise ValueError(f"rank (atoms) {config.rank} > {n} input features of {first.key}")
        cands = _candidates(m, n, len(group), budget, config, itemsize)
        best = None
        for k, s in cands:
            (idx, val), b = linalg.sparse_dictionary(
                w, k, s, chol=chol, n_iter=config.dict_iters, generator=gen, sparse_codes=True,
                nm=tuple(config.dict_nm) if config.method == "dsformer" else None)
            a = torch.zeros(m, k, dtype=torch.float64).scatter_(1, idx, val.to(torch.float64))
            diff = w.to(torch.float64) - a @ b.to(torch.float64)
            err = diff @ chol.to(torch.float64) if chol is not None else diff
            score = float((err * err).sum())
            if best is None or score < best[0]:
                best = (score, k, s, idx, val, b)
        if best is None:
            for mx in group:
                mm = mx.shape[0]
                notes_by_key[mx.key].append("no dictionary fits the budget: kept dense")
                rows[mx.key] = LayerReport(mx.key, "linear", (mm, n), None, "dense", mm * n,
                                           mm * n, 2 * mm * n, 2 * mm * n, 0.0, None, 1,
                                           "; ".join(notes_by_key[mx.key]))
            continue
        _, k, s, idx, val, b = best
        a = torch.zeros(m, k, dtype=w.dtype).scatter_(1, idx, val.to(w.dtype))
        shared = nn.Parameter(b.to(w.dtype).contiguous()) if len(group) > 1 else None
        start = 0
        for i, mx in enumerate(group):
            mm = mx.shape[0]
            a_i = a[start:start + mm]
            start += mm
            t = mx.target
            bias = t.module.bias.detach() if t.module.bias is not None else None
            orig = "Conv1D" if t.kind == "conv1d" else "Linear"
            notes = notes_by_key[mx.key]
            if s == k:
                mod = LowRankLinear.from_factors(a_i, b.to(w.dtype), bias, orig=orig)
                notes.append(f"s = k = {k}: the low-rank (whitened SVD) solution fitted best; "
                             f"stored as rank-{k} factors")
                nbytes = (a_i.numel() + b.numel()) * itemsize
                flops = 2 * k * (mm + n)
            else:
                atoms = shared if shared is not None else b.to(w.dtype)
                mod = SparseDictionaryLinear.from_codes(
                    idx[start - mm:start], val[start - mm:start].to(w.dtype), atoms, bias,
                    nm=tuple(config.dict_nm) if config.method == "dsformer" else None,
                    orig=orig)
                nbytes = mod.storage_bytes(include_atoms=i == 0)
                if i == 0 and shared is not None:
                    notes.append(f"holds the dictionary shared by {len(group)} matrices")
                elif shared is not None:
                    mod.shared_from = group[0].target.name
                    notes.append(f"uses the dictionary of {group[0].key}")
                notes.append(f"{k} atoms, {s} nonzeros per row (s/k = {s / k:.2f}); "
                             f"{nbytes:,} bytes")
                flops = 2 * (k * n + mm * s)
            wi = mx.weight
            w2 = (a_i.to(torch.float64) @ b.to(torch.float64)).to(wi.dtype)
            d = (wi - w2).to(torch.float64)
            werr = float(d.norm() / wi.to(torch.float64).norm().clamp_min(1e-300))
            rows[mx.key] = LayerReport(mx.key, "linear", (mm, n), k, "factorized", mm * n,
                                       -(-nbytes // itemsize), 2 * mm * n, flops, werr,
                                       _output_error(mx, d), 1, "; ".join(notes),
                                       storage_bytes=nbytes)
            modules[id(t)] = mod
    return [rows[mx.key] for mx in matrices], modules
