"""Checkpoints: safetensors (no pickle on load) written atomically, JSON metadata inside.

A checkpoint file holds

* ``model.<name>``: the model's state dict;
* ``optim.<param index>.<key>``: the optimizer's per-parameter tensors (AdamW moments, step);
* ``rng.torch`` (and ``rng.cuda``): the global RNG states;
* metadata ``"lorank"``: JSON with the task, data and model configs (enough to rebuild the
  model), the optimizer's param groups, the scheduler state and the trainer state (step,
  epoch, position in the epoch, best metric, history).

Files are written through :func:`lorank._io.atomic_save_tensors` (temporary file + rename),
so a crash never leaves a truncated checkpoint, and loaded with ``safetensors`` (tensors only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorank._io import atomic_save_tensors

FORMAT_VERSION = 2  #: 2: configs are dataclass dicts; NeuralHMM has transition_net
META_KEY = "lorank"
#: the full training state (resumable)
CHECKPOINT_NAME = "checkpoint.safetensors"
#: the best model by validation metric (weights and configs only)
BEST_NAME = "model.safetensors"


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON part) of ``optimizer.state_dict()``."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The ``state_dict`` that :func:`optimizer_to_flat` split."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    rng: bool = True,
) -> None:
    """Write model (and optionally optimizer, scheduler, RNG) state atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta = dict(meta, format_version=FORMAT_VERSION)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = optimizer_to_flat(optimizer)
        tensors.update(opt_tensors)
    if scheduler is not None:
        meta["scheduler"] = scheduler.state_dict()
    if rng:
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
    atomic_save_tensors(path, tensors, metadata={META_KEY: json.dumps(meta)})


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without loading its tensors."""
    path = _resolve(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise ValueError(f"{str(path)!r} is not a readable checkpoint (empty, truncated or not "
                         f"a safetensors file: {e})") from None
    if raw is None:
        raise ValueError(f"{str(path)!r} is a safetensors file but not a lorank checkpoint")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} has damaged lorank metadata ({e})") from None


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a checkpoint file or of a run directory (its best model if
    present, else its latest checkpoint)."""
    path = _resolve(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as e:  # a file whose header survived but whose data did not
        raise ValueError(f"{str(path)!r} is not a readable checkpoint ({e})") from None
    return tensors, meta


def model_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict from checkpoint tensors."""
    return {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"].cpu())
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"].cpu())


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        for name in (BEST_NAME, CHECKPOINT_NAME):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(
            f"no checkpoint in directory {str(p)!r} (expected {BEST_NAME} or {CHECKPOINT_NAME})"
        )
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    return p


__all__ = [
    "CHECKPOINT_NAME",
    "BEST_NAME",
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "model_state",
    "restore_rng",
    "optimizer_to_flat",
    "optimizer_from_flat",
]
