"""Low-rank adapters for healing compressed (or adapting original) linear layers.

* LoRA (Hu et al. 2021): ``y = base(x) + (alpha / r) x A^T B^T``, ``A`` (r x in) random,
  ``B`` (out x r) zero, so an attached adapter changes no output.
* WaRA (Heidari et al. 2025): the update is learned in the 2-D wavelet domain,
  ``ΔW = (alpha / r) IDWT2(B A)``, with ``A`` (r x in') and ``B`` (out' x r) wavelet
  coefficients of a one-level periodized DWT (:mod:`lorank.linalg.wavelet`, PyWavelets'
  filters as matrices, so gradients flow).  With an orthogonal wavelet IDWT2 is a rotation
  of rows and columns: the update is still rank r; what changes is the parameterization
  the optimizer steps in.

Adapters attach to ``nn.Linear``, Hugging Face ``Conv1D``, :class:`LowRankLinear` and
:class:`SparseDictionaryLinear` modules chosen by ``target_modules`` / ``exclude_modules``
(the syntax of :class:`CompressConfig`); :func:`merge_adapters` folds them in exactly (a
low-rank layer gains r ranks, a dictionary layer r atoms used by every row); adapters are
saved as safetensors; :func:`heal` fine-tunes the adapters alone.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lorank._io import atomic_save_tensors
from lorank.compress.dictionary import SparseDictionaryLinear, refresh_sharing
from lorank.compress.modules import LowRankLinear, _dense_linear, is_hf_conv1d
from lorank.linalg.wavelet import wavelet_matrices

__all__ = [
    "AdapterConfig",
    "AdaptedLinear",
    "attach_adapters",
    "merge_adapters",
    "adapter_parameters",
    "save_adapters",
    "load_adapters",
    "heal",
]

KINDS = ("lora", "wara")


@dataclass(frozen=True)
class AdapterConfig:
    """Which layers get an adapter and of what kind.

    ``kind``: ``"lora"`` or ``"wara"``; ``rank`` r; ``alpha`` (scale ``alpha / r``, default r:
    scale 1); ``wavelet`` (WaRA: a PyWavelets discrete wavelet name); ``dropout`` on the
    adapter's input; ``target_modules`` / ``exclude_modules`` as in ``CompressConfig``;
    ``seed`` for A's initialization."""

    kind: str = "lora"
    rank: int = 8
    alpha: float | None = None
    wavelet: str = "haar"
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, int | float)
                                           and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if self.kind == "wara":
            wavelet_matrices(2, self.wavelet)  # raises on an unknown wavelet name
        if isinstance(self.target_modules, tuple):
            object.__setattr__(self, "target_modules", list(self.target_modules))

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


def _shape(base: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear-like module."""
    if is_hf_conv1d(base):
        return base.weight.shape[1], base.weight.shape[0]
    return base.out_features, base.in_features


class AdaptedLinear(nn.Module):
    """``base(x) + scale * (x A_eff^T) B_eff^T`` with ``A_eff = A``, ``B_eff = B`` (LoRA) or
    ``A_eff = A S_in^T``, ``B_eff = S_out B`` (WaRA: ``S`` the wavelet synthesis matrices,
    non-persistent buffers).  The base module's parameters are left as they are."""

    def __init__(self, base: nn.Module, config: AdapterConfig):
        super().__init__()
        self.base = base
        self.kind = config.kind
        self.rank = config.rank
        self.scale = config.scale
        self.wavelet = config.wavelet
        out, inp = _shape(base)
        self.out_features, self.in_features = out, inp
        ref = next(base.parameters())
        kw = {"device": ref.device, "dtype": ref.dtype}
        if self.kind == "wara":
            _, s_out = wavelet_matrices(out, config.wavelet, **kw)
            _, s_in = wavelet_matrices(inp, config.wavelet, **kw)
            self.register_buffer("synth_out", s_out, persistent=False)
            self.register_buffer("synth_in", s_in, persistent=False)
            out_c, in_c = s_out.shape[1], s_in.shape[1]
        else:
            out_c, in_c = out, inp
        gen = torch.Generator().manual_seed(config.seed)
        bound = 1 / math.sqrt(in_c)  # kaiming-uniform(a=sqrt(5)) as nn.Linear / PEFT
        a = (torch.rand(config.rank, in_c, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        self.adapter_a = nn.Parameter(a.to(**kw))
        self.adapter_b = nn.Parameter(torch.zeros(out_c, config.rank, **kw))
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B_eff (out x r), A_eff (r x in))``, ``ΔW = scale * B_eff @ A_eff``."""
        if self.kind == "wara":
            return self.synth_out @ self.adapter_b, self.adapter_a @ self.synth_in.mT
        return self.adapter_b, self.adapter_a

    def delta_weight(self) -> torch.Tensor:
        b, a = self.factors()
        return self.scale * (b @ a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, a = self.factors()
        return self.base(x) + self.scale * (self.dropout(x) @ a.mT) @ b.mT

    def merged(self) -> nn.Module:
        """The base module with the update folded in exactly (same type; a low-rank layer
        gains ``rank`` ranks, a dictionary layer ``rank`` atoms used by every row)."""
        with torch.no_grad():
            b, a = (t.detach() for t in self.factors())
            b = self.scale * b
            base = self.base
            if isinstance(base, LowRankLinear):
                return LowRankLinear.from_factors(
                    torch.cat([base.second.weight, b], 1), torch.cat([base.first.weight, a], 0),
                    None if base.bias is None else base.bias.detach(), orig=base.orig)
            if isinstance(base, SparseDictionaryLinear):
                k, r = base.n_atoms, self.rank
                idx = torch.cat([base.index(), torch.arange(k, k + r).expand(base.out_features,
                                                                             r)], 1)
                val = torch.cat([base.values.detach(), b], 1)
                return SparseDictionaryLinear.from_codes(
                    idx, val, torch.cat([base.atoms.detach(), a], 0),
                    None if base.bias is None else base.bias.detach(), nm=None, orig=base.orig)
            w = (base.weight.mT if is_hf_conv1d(base) else base.weight).detach() + b @ a
            return _dense_linear(w, None if base.bias is None else base.bias.detach(),
                                 "Conv1D" if is_hf_conv1d(base) else "Linear")

    def extra_repr(self) -> str:
        wav = f", wavelet={self.wavelet}" if self.kind == "wara" else ""
        return f"kind={self.kind}, rank={self.rank}, scale={self.scale:g}{wav}"


def _adaptable(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear | LowRankLinear | SparseDictionaryLinear) or \
        is_hf_conv1d(mod)


def _adapter_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    from lorank.compress.core import _selected

    inside = {n for n, m in model.named_modules() if isinstance(m, AdaptedLinear | LowRankLinear
                                                                | SparseDictionaryLinear)}
    return [name for name, mod in model.named_modules()
            if _adaptable(mod) and not any(name.startswith(p + ".") for p in inside)
            and _selected(name, config.target_modules, config.exclude_modules)]


def attach_adapters(model: nn.Module, config: AdapterConfig | None = None, *,
                    inplace: bool = False, **overrides) -> nn.Module:
    """Wrap every selected linear-like layer in an :class:`AdaptedLinear` (on a deep copy
    unless ``inplace``); ``config`` fields may be given as keywords.  Outputs are unchanged
    until the adapters are trained (B starts at zero)."""
    if config is None:
        config = AdapterConfig(**overrides)
    elif overrides:
        config = AdapterConfig(**{**config.to_dict(), **overrides})
    from lorank.compress.core import _set_module

    names = _adapter_targets(model, config)
    if not names:
        cands = [n for n, m in model.named_modules() if _adaptable(m)]
        raise ValueError(f"no layer matches the adapter configuration (target_modules="
                         f"{config.target_modules!r}, exclude_modules="
                         f"{config.exclude_modules!r}); candidates: {cands[:12]}")
    if not inplace:
        model = copy.deepcopy(model)
    for name in names:
        model = _set_module(model, name, AdaptedLinear(model.get_submodule(name) if name
                                                       else model, config))
    model.adapter_config = config
    return model


def _adapted(model: nn.Module) -> list[tuple[str, AdaptedLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter tensors (A and B of every adapter)."""
    return [p for _, m in _adapted(model) for p in (m.adapter_a, m.adapter_b)]


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer (in place); returns the model."""
    from lorank.compress.core import _set_module

    for name, mod in _adapted(model):
        model = _set_module(model, name, mod.merged())
    refresh_sharing(model)
    if hasattr(model, "adapter_config"):
        del model.adapter_config
    return model


def save_adapters(model: nn.Module, path: str | Path) -> Path:
    """Write the adapters' A and B (and their configuration, in the file's metadata) as
    safetensors, atomically; returns the path."""
    adapted = _adapted(model)
    if not adapted:
        raise ValueError("the model has no adapters to save (attach_adapters first)")
    config = getattr(model, "adapter_config", None)
    if config is None:
        raise ValueError("the model does not record its adapter configuration; attach "
                         "adapters with attach_adapters")
    tensors = {}
    for name, mod in adapted:
        tensors[f"{name}.adapter_a"] = mod.adapter_a
        tensors[f"{name}.adapter_b"] = mod.adapter_b
    meta = {"format": "lorank.adapters/1", "config": json.dumps(config.to_dict()),
            "modules": json.dumps([n for n, _ in adapted])}
    path = Path(path)
    atomic_save_tensors(path, tensors, metadata=meta)
    return path


def load_adapters(model: nn.Module, path: str | Path, *, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with the adapters saved in ``path`` (same
    configuration and layers) attached and their values loaded exactly."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "lorank.adapters/1":
            raise ValueError(f"{path} is not a lorank adapter file (format "
                             f"{meta.get('format')!r})")
        config = AdapterConfig(**json.loads(meta["config"]))
        names = json.loads(meta["modules"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    model = attach_adapters(model, config, inplace=inplace, target_modules=names,
                            exclude_modules=None)
    got = [n for n, _ in _adapted(model)]
    if sorted(got) != sorted(names):
        raise ValueError(f"the adapters of {path} are for layers {names}, the model matched "
                         f"{got}")
    with torch.no_grad():
        for name, mod in _adapted(model):
            for part in ("adapter_a", "adapter_b"):
                saved = tensors[f"{name}.{part}"]
                p = getattr(mod, part)
                if saved.shape != p.shape:
                    raise ValueError(f"{name}.{part}: saved shape {tuple(saved.shape)}, model "
                                     f"{tuple(p.shape)}")
                p.copy_(saved)
    model.adapter_config = AdapterConfig(**{**config.to_dict(), "target_modules": names,
                                            "exclude_modules": None})
    return model


def heal(model: nn.Module, data: Iterable, loss_fn: Callable[[object, object], torch.Tensor],
         **finetune_kwargs) -> list[float]:
    """Fine-tune only the adapters of ``model`` (every other parameter frozen during the
    run, its ``requires_grad`` restored afterwards) with :func:`lorank.compress.finetune`
    (``steps`` required; ``lr`` etc. as there); returns the step losses."""
    from lorank.compress.finetune import finetune

    params = adapter_parameters(model)
    if not params:
        raise ValueError("heal: the model has no adapters (attach_adapters first)")
    ids = {id(p) for p in params}
    saved = {id(p): p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        return finetune(model, data, loss_fn, params=params, **finetune_kwargs)
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
