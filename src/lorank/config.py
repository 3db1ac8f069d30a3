"""Settings as frozen dataclasses: each model family, task and the trainer has one.

A config class canonicalizes, defaults and validates its fields once, in ``__post_init__``,
and raises :class:`ConfigError` naming the field.  Its fields carry command-line metadata
(:func:`option`), from which :mod:`lorank.cli.options` generates the argparse options;
checkpoints store :meth:`Config.to_dict` and rebuild with :meth:`Config.from_dict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from lorank._checks import check_nonnegative_int, check_positive_int, check_probability

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """An invalid setting: ``owner`` (a config class name), ``field`` and ``reason``."""

    def __init__(self, owner: str, field: str, reason: str):
        super().__init__(f"{owner}.{field}: {reason}")
        self.owner, self.field, self.reason = owner, field, reason


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    cli: bool = True,
    compute_only: bool = False,
) -> Any:
    """A dataclass field with command-line metadata.

    ``flag``: the option name (default ``--`` + the field name with dashes); ``cli=False``
    keeps the field off the command line (set from data, e.g. a vocabulary size);
    ``compute_only``: changing it changes how the model is computed, not the model (a resumed
    run may change it).
    """
    meta = {"help": help, "flag": flag, "choices": choices, "cli": cli,
            "compute_only": compute_only}
    if isinstance(default, list | dict | set):
        raise TypeError("config defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata=meta)


class Config:
    """Mixin of the frozen config dataclasses (see the module docstring)."""

    #: values of fields that a stored dict written before the field existed must read as
    LEGACY: ClassVar[dict[str, Any]] = {}

    # ---- validation helpers for __post_init__ -------------------------------------------------
    def _set(self, name: str, value: Any) -> None:
        """Store a canonical value on the frozen instance (only from ``__post_init__``)."""
        object.__setattr__(self, name, value)

    def _error(self, name: str, message: str) -> ConfigError:
        return ConfigError(type(self).__name__, name, message)

    def _positive_int(self, *names: str, optional: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if optional and value is None:
                continue
            try:
                check_positive_int(name, value)
            except ValueError as e:
                raise self._error(name, str(e)) from None

    def _nonnegative_int(self, *names: str) -> None:
        for name in names:
            try:
                check_nonnegative_int(name, getattr(self, name))
            except ValueError as e:
                raise self._error(name, str(e)) from None

    def _probability(self, *names: str) -> None:
        for name in names:
            try:
                self._set(name, check_probability(name, getattr(self, name)))
            except ValueError as e:
                raise self._error(name, str(e)) from None

    def _positive_float(self, *names: str, optional: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if optional and value is None:
                continue
            ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            if not ok or value != value or value == float("inf"):
                raise self._error(name, f"{name} must be a finite number > 0, got {value!r}")
            self._set(name, float(value))

    def _rank(self, applies: bool, default: int, maximum: int | None, not_applicable: str
              ) -> None:
        """Validate the field ``rank``: an error if given where it does not apply (message
        ``not_applicable``), else a positive integer (``default`` if not given) at most
        ``maximum`` (the number of states: a larger rank is no cheaper than dense)."""
        if not applies:
            if self.rank is not None:
                raise self._error("rank", not_applicable)
            return
        self._positive_int("rank", optional=True)
        if self.rank is None:
            self._set("rank", default)
        if maximum is not None and self.rank > maximum:
            raise self._error("rank", f"rank ({self.rank}) must be at most the number of states "
                                      f"({maximum}): a low-rank transition with R > Z is no "
                                      f"cheaper than the dense one")

    def _choice(self, name: str, choices: tuple[str, ...], aliases: Mapping[str, str] = {}) -> str:
        value = getattr(self, name)
        key = str(value).lower().replace("-", "_")
        key = aliases.get(key, key)
        if key not in choices:
            raise self._error(name, f"unknown {name} {value!r}: choose one of {', '.join(choices)}")
        self._set(name, key)
        return key

    # ---- (de)serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (what checkpoints store)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Rebuild from :meth:`to_dict` output.  Unknown keys are an error; keys missing from
        a dict stored by an older version read as :attr:`LEGACY` (else the default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(cls.__name__, unknown[0], f"no such field(s) {unknown}; known: "
                                                        f"{sorted(names)}")
        values = {k: v for k, v in cls.LEGACY.items() if k not in data}
        values.update(data)
        for f in dataclasses.fields(cls):  # JSON turns tuples into lists
            if isinstance(values.get(f.name), list) and isinstance(f.default, tuple):
                values[f.name] = tuple(values[f.name])
        return cls(**values)

    @classmethod
    def resolve(cls: type[C], config: C | None = None, **fields: Any) -> C:
        """``config`` with ``fields`` replaced, or ``cls(**fields)`` when ``config`` is None:
        how modules accept either a config or its fields as keywords."""
        if config is None:
            return cls(**fields)
        if not isinstance(config, cls):
            raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        return dataclasses.replace(config, **fields) if fields else config

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def differences(self, other: Config, *, ignore_compute_only: bool = True) -> list[str]:
        """Names of the fields whose values differ from ``other``'s (same class)."""
        out = []
        for f in dataclasses.fields(self):
            if ignore_compute_only and f.metadata.get("compute_only"):
                continue
            if getattr(self, f.name) != getattr(other, f.name):
                out.append(f.name)
        return out


__all__ = ["Config", "ConfigError", "option"]
