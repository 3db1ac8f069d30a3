"""The user cache directory and safe (pickle-free, atomic) cache files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from lorank._io import atomic_save_tensors


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$LORANK_CACHE``, else ``$XDG_CACHE_HOME/lorank``, else
    ``~/.cache/lorank``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LORANK_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lorank"


def config_digest(config: dict) -> str:
    """A short stable hash of a JSON-able configuration."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def save_cache(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> None:
    """Write tensors and JSON metadata as one safetensors file, atomically."""
    atomic_save_tensors(path, tensors, {k: json.dumps(v) for k, v in metadata.items()})


def load_cache(
    path: Path, expect: dict[str, object]
) -> tuple[dict[str, torch.Tensor], dict[str, object]] | None:
    """Tensors and metadata of ``path`` if it exists, reads cleanly, and its metadata holds
    every ``expect`` item; otherwise None (with a warning when a file was there but unusable)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            meta = {k: json.loads(v) for k, v in raw.items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # truncated or foreign file
        warnings.warn(f"ignoring unreadable cache file {path}: {err}; rebuilding", stacklevel=3)
        return None
    for k, v in expect.items():
        if meta.get(k) != v:
            warnings.warn(
                f"cache file {path} was written with {k}={meta.get(k)!r}, need {v!r}; rebuilding",
                stacklevel=3,
            )
            return None
    return tensors, meta


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = 3600.0) -> Iterator[None]:
    """An inter-process lock beside ``path`` (so torch.distributed ranks build a cache once);
    a no-op when the ``filelock`` package (a torch dependency) is missing."""
    try:
        from filelock import FileLock  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=timeout):
        yield
