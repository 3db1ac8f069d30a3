"""Save and load compressed models: ``model.safetensors`` plus ``lorank_compress.json``.

The JSON records, for every factorized module, its qualified name and :meth:`structure`, so
:func:`load_compressed` can turn a freshly built *dense* model of the same architecture into
the factorized one before loading the weights (the PEFT pattern).  When the directory also
holds a Hugging Face ``config.json`` (written by the CLI), ``load_compressed(directory)``
rebuilds the base model itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lorank._io import atomic_save_tensors, atomic_write_json
from lorank.compress.core import _set_module
from lorank.compress.dictionary import refresh_sharing, tie_shared_atoms
from lorank.compress.modules import build_module, is_structured
from lorank.compress.report import CompressionReport

__all__ = ["save_compressed", "load_compressed", "read_compressed", "apply_structure",
           "compressed_structure"]

FORMAT = "lorank.compress/1"
WEIGHTS = "model.safetensors"
META = "lorank_compress.json"
REPORT = "compress_report.json"


def compressed_structure(model: nn.Module) -> dict[str, dict]:
    """``{qualified name: structure dict}`` of every factorized module."""
    refresh_sharing(model)
    return {name: mod.structure() for name, mod in model.named_modules() if is_structured(mod)}


def apply_structure(model: nn.Module, structure: dict[str, dict]) -> nn.Module:
    """Replace the modules named in ``structure`` by uninitialized factorized modules (on the
    device and dtype of the modules they replace); returns the model."""
    for name, spec in structure.items():
        try:
            old = model.get_submodule(name) if name else model
        except AttributeError as e:
            raise ValueError(f"the model has no module {name!r} to factorize: is it the "
                             f"architecture the compressed model was made from?") from e
        ref = next(old.parameters(), None)
        new = build_module(spec)
        if ref is not None:
            new.to(device=ref.device, dtype=ref.dtype)
        model = _set_module(model, name, new)
    tie_shared_atoms(model)
    return model


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage (tied weights): keep one name per tensor."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape),
               tuple(v.stride()), v.dtype)
        if v.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        out[k] = v
    return out, aliases


def save_compressed(
    model: nn.Module,
    directory: str | Path,
    report: CompressionReport | None = None,
    *,
    base: dict | None = None,
) -> Path:
    """Write ``model.safetensors`` (the full state dict, factorized layers included),
    ``lorank_compress.json`` (the factorized structure, ``base`` info) and, if given, the
    report as ``compress_report.json``.  Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, aliases = _dedupe(model.state_dict())
    atomic_save_tensors(directory / WEIGHTS, state, metadata={"format": FORMAT})
    meta = {"format": FORMAT, "modules": compressed_structure(model), "aliases": aliases,
            "base": base or {}}
    atomic_write_json(directory / META, meta)
    if report is not None:
        report.to_json(directory / REPORT)
    return directory


def read_compressed(directory: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, state dict)`` of a directory written by :func:`save_compressed` (tied weights
    restored), without building a model."""
    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: not a lorank compressed model")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"unsupported format {meta.get('format')!r} in {meta_path}")
    state = load_file(str(directory / WEIGHTS), device=str(map_location))
    for alias, target in meta.get("aliases", {}).items():
        state[alias] = state[target]
    return meta, state


def load_compressed(
    directory: str | Path,
    model: nn.Module | None = None,
    *,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Restore a model saved by :func:`save_compressed`.

    ``model``: a dense model of the original architecture (its weights are overwritten).
    If omitted, the directory must describe its base (``config.json`` of a Hugging Face
    model, as written by ``lorank compress``).  A compressed ``lorank train`` run is loaded
    with :func:`lorank.tasks.load_run`."""
    meta, state = read_compressed(directory, map_location)
    if model is None:
        model = _build_base(Path(directory), meta.get("base") or {})
    model = apply_structure(model, meta["modules"])
    model.load_state_dict(state, strict=strict)
    return model


def _build_base(directory: Path, base: dict) -> nn.Module:
    kind = base.get("kind")
    if kind == "hf":
        try:
            import transformers
        except ImportError as e:  # pragma: no cover
            raise ImportError("loading this model needs `transformers`") from e
        config = transformers.AutoConfig.from_pretrained(str(directory))
        auto = getattr(transformers, base.get("auto_class", "AutoModel"))
        return auto.from_config(config)
    if kind == "lorank":
        raise ValueError(f"{str(directory)!r} holds a compressed lorank run: load it with "
                         f"lorank.tasks.load_run({str(directory)!r}) (or `lorank eval`)")
    raise ValueError(
        "this directory does not describe its base model: pass model= (a dense model of the "
        "original architecture) to load_compressed"
    )
