"""Rebuild a task and its trained model from what ``lorank train`` or ``lorank compress``
wrote: a checkpoint file, a run directory, or a compressed-run directory.

Checkpoints of format 1 (before the configs were dataclasses) load through the tasks'
:meth:`~lorank.tasks.base.Task.upgrade_state`; a format-1 compressed HMM (``base`` holding
``hmm_transition_rank``) gets its fixed low-rank transition put back in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorank.compress.hmm import FixedLowRankTransition
from lorank.compress.io import META as COMPRESS_META
from lorank.compress.io import apply_structure, read_compressed
from lorank.tasks.base import Task, get_task
from lorank.train.checkpoint import load_checkpoint, model_state


def task_from_meta(meta: dict[str, Any], corpus: str | None = None) -> Task:
    """The task of a checkpoint's metadata; ``corpus`` replaces the data source."""
    data = dict(meta["data_config"])
    if corpus is not None:
        data["corpus"] = corpus
    return get_task(meta["task"]).from_dicts(data, meta["model_config"])


def is_compressed_run(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``lorank compress``."""
    return Path(path).is_dir() and (Path(path) / COMPRESS_META).is_file()


def _compressed_model(task: Task, cmeta: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    base = cmeta.get("base") or {}
    model = task.build_model()
    old_rank = base.get("hmm_transition_rank")
    if old_rank:  # format 1: the transition was swapped by changing the model's class
        left, right = state.pop("lowrank_transition.left"), state.pop("lowrank_transition.right")
        model.load_state_dict(task.upgrade_state(state, 1))
        with torch.no_grad():
            init = model.init_logits()
        model.transition_net = FixedLowRankTransition(left, right, init)
        return model
    model = apply_structure(model, cmeta["modules"])
    model.load_state_dict(state)
    return model


def load_run(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    data: bool = False,
    corpus: str | None = None,
) -> tuple[Task, nn.Module, dict[str, Any]]:
    """``(task, model in eval mode on device, metadata)`` of a checkpoint file, a run directory
    (its best model) or a ``lorank compress`` output directory.  ``data=True`` also loads the
    task's data and checks it matches the checkpoint; ``corpus`` replaces the data source."""
    if is_compressed_run(path):
        cmeta, state = read_compressed(path)
        meta = dict(cmeta.get("base") or {})
        if meta.get("kind") != "lorank":
            raise ValueError(f"{str(path)!r} is a compressed {meta.get('kind', 'unknown')} "
                             f"model, not a lorank run: load it with "
                             f"lorank.compress.load_compressed")
        task = task_from_meta(meta, corpus)
        if data:
            task.load_data()
            task.check_metadata(meta)
        model = _compressed_model(task, cmeta, state)
    else:
        tensors, meta = load_checkpoint(path)
        task = task_from_meta(meta, corpus)
        if data:
            task.load_data()
            task.check_metadata(meta)
        model = task.build_model()
        state = task.upgrade_state(model_state(tensors), int(meta.get("format_version", 1)))
        model.load_state_dict(state)
    task.restore_metadata(meta.get("task_meta", {}))
    return task, model.to(device).eval(), meta


__all__ = ["load_run", "task_from_meta", "is_compressed_run"]
