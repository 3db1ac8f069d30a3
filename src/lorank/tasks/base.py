"""The task protocol: what the generic trainer (:mod:`lorank.train`) needs to know about a kind
of model and data, and the registry behind ``lorank train --task NAME``.

A task pairs a data config and a model config (frozen dataclasses, :mod:`lorank.config`) with
a model factory, batch iterators, a unit counter (tokens, time steps) and a metric (``"ppl"``:
``exp(NLL / units)``, or ``"nll_per_step"``: ``NLL / units``).  Adding a task is one subclass
in one file of this package; naming it registers it::

    class MusicTask(Task, name="music", metric="nll_per_step", unit="time_steps",
                    data=MusicDataConfig, model=MusicHMMConfig):
        def load_data(self): ...                # check every split before training starts
        def build_model(self): ...              # an nn.Module; forward -> a distribution
        def batches(self, split, **kw): ...     # iterator of batches (sharded by rank)

Checkpoints store both configs (``to_dict()``), so ``lorank eval``/``sample`` rebuild the task
and the model from a checkpoint alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from lorank.config import Config

#: task name -> Task subclass
TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``lorank train --task cls.name``."""
    if not getattr(cls, "name", None):
        raise ValueError(f"task class {cls.__name__} needs a non-empty 'name'")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    """The registered task class called ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


class Task:
    """Base class; see the module docstring.  Subclasses set the class attributes and
    implement :meth:`load_data`, :meth:`build_model` and :meth:`batches`."""

    name: ClassVar[str] = ""
    #: "ppl" (exp of the mean NLL) or "nll_per_step" (the mean NLL)
    metric: ClassVar[str] = "ppl"
    #: what :meth:`count` counts ("tokens", "time_steps" of the sequences)
    unit: ClassVar[str] = "tokens"
    data_config_class: ClassVar[type[Config]]
    model_config_class: ClassVar[type[Config]]

    def __init_subclass__(cls, name: str | None = None, metric: str | None = None,
                          unit: str | None = None, data: type[Config] | None = None,
                          model: type[Config] | None = None, **kwargs: Any) -> None:
        """Set the class attributes given as class keywords; a ``name`` registers the task."""
        super().__init_subclass__(**kwargs)
        for attr, value in (("metric", metric), ("unit", unit), ("data_config_class", data),
                            ("model_config_class", model)):
            if value is not None:
                setattr(cls, attr, value)
        if name is not None:
            cls.name = name
            register_task(cls)

    def __init__(self, data_config: Config, model_config: Config):
        for what, value, cls in (("data_config", data_config, self.data_config_class),
                                 ("model_config", model_config, self.model_config_class)):
            if not isinstance(value, cls):
                raise TypeError(f"task {self.name!r} takes a {cls.__name__} as {what}, got "
                                f"{type(value).__name__}")
        self.data_config = data_config
        self.model_config = model_config

    @classmethod
    def from_dicts(cls, data_config: dict[str, Any], model_config: dict[str, Any]) -> Task:
        """The task from stored config dicts (a checkpoint's metadata)."""
        return cls(cls.data_config_class.from_dict(data_config),
                   cls.model_config_class.from_dict(model_config))

    # ---- data and model --------------------------------------------------------------------
    def check_data_source(self) -> None:
        """Raise at once if the data source cannot exist (a missing path), before any work."""

    def load_data(self) -> None:
        """Load the data (once), and raise if any split is unusable (before training)."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The model of :attr:`model_config` (data-derived fields filled in by load_data)."""
        raise NotImplementedError

    def batches(self, split: str, *, batch_size: int, max_tokens: int | None = None,
                **order: Any) -> Iterator:
        """Batches of ``split`` of at most ``batch_size`` sequences and ``max_tokens`` padded
        units.  ``order``: ``shuffle``, ``seed``, ``rank``, ``world_size`` of
        :func:`lorank.data._batching.length_batches` (with ``world_size > 1``, this rank's
        share; every rank gets the same number of batches)."""
        raise NotImplementedError

    def to_device(self, batch, device: torch.device):
        if isinstance(batch, torch.Tensor):
            return batch.to(device)
        return type(batch)(self.to_device(b, device) for b in batch)

    def count(self, batch) -> int:
        """Number of predicted units (tokens incl. ``<eos>``, time steps) in a batch; the
        default reads ``(inputs, lengths)`` batches."""
        return int(batch[1].sum())

    def nll(self, model: nn.Module, batch, generator: torch.Generator | None) -> torch.Tensor:
        """Summed negative log-likelihood (nats) of the batch: a differentiable scalar; the
        default calls ``model(inputs, lengths, generator=...)`` and reads its log-partition."""
        inputs, lengths = batch
        return -model(inputs, lengths, generator=generator).log_partition.sum()

    def upgrade_state(self, state: dict[str, torch.Tensor], version: int) -> dict:
        """A model state dict written by checkpoint format ``version``, in today's names."""
        return state

    # ---- reporting -------------------------------------------------------------------------
    def metric_value(self, nll: float, count: int) -> float:
        mean = nll / max(count, 1)
        if self.metric == "ppl":
            return math.exp(min(mean, 700.0))
        return mean

    def model_name(self) -> str:
        """A short name of the model for tables (the config's ``model`` by default)."""
        return str(getattr(self.model_config, "model", self.name))

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """Facts about the run for metrics.json: model name, both configs' fields, parameter
        count, and :meth:`extra_summary`."""
        out: dict[str, Any] = {"model": self.model_name()}
        out.update(self.data_config.to_dict())
        out.update({k: v for k, v in self.model_config.to_dict().items() if k != "model"})
        rank = getattr(model, "rank", None)
        if isinstance(rank, int) and rank != out.get("rank"):
            out["model_rank"] = rank  # the rank the weights have (a compressed transition)
        out["params"] = sum(p.numel() for p in model.parameters())
        out.update(self.extra_summary())
        return out

    def extra_summary(self) -> dict[str, Any]:
        """Task-specific facts for :meth:`summary` (e.g. the baselines)."""
        return {}

    def metadata(self) -> dict[str, Any]:
        """Extra JSON stored in checkpoints (e.g. the vocabulary)."""
        return {}

    def check_metadata(self, meta: dict[str, Any]) -> None:
        """Raise if the loaded data does not match a checkpoint's metadata."""

    def restore_metadata(self, task_meta: dict[str, Any]) -> None:
        """Take what :meth:`metadata` stored (e.g. the vocabulary, for sampling without
        loading the data)."""

    def baselines(self) -> dict[str, dict[str, float]]:
        """Count-based baselines on the same data (name -> {val_<metric>, test_<metric>})."""
        return {}

    def sample(
        self, model: nn.Module, num: int, max_length: int, generator: torch.Generator | None
    ) -> list[str]:
        raise NotImplementedError(f"task {self.name!r} cannot sample")


def require_splits(sizes: dict[str, int], what: str, hint: str = "") -> None:
    """Raise before training if a split of ``sizes`` (split -> item count) is empty."""
    empty = [s for s, n in sizes.items() if n == 0]
    if empty:
        raise ValueError(f"{what} has no usable item in split(s) {', '.join(empty)} "
                         f"(sizes {sizes}){hint}")


__all__ = ["Task", "TASKS", "register_task", "get_task", "require_splits"]
