"""Command-line options generated from the config dataclasses (:mod:`lorank.config`).

Every field of a config with ``cli=True`` metadata becomes one option: ``--name-with-dashes``
(or the field's ``flag``), typed from the annotation, help text from the metadata, and the
dataclass default shown in the help.  Booleans become ``--flag/--no-flag``.  Options default
to "not given" (:data:`argparse.SUPPRESS`), so :func:`given` returns exactly what the user
typed and the dataclass stays the one owner of every default.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from lorank.config import Config, ConfigError


def _base_type(cls: type[Config], name: str) -> type:
    """The non-None type of a field annotation (``int | None`` -> ``int``)."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"{cls.__name__}.{name}: unsupported option type {hint}")
        hint = args[0]
    if hint not in (int, float, str, bool):
        raise TypeError(f"{cls.__name__}.{name}: unsupported option type {hint}")
    return hint


def flag_of(field: dataclasses.Field) -> str:
    """The command-line flag of a config field."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def cli_fields(cls: type[Config]) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line options."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and
            "help" in f.metadata]


def add_config_options(group, cls: type[Config], *, exclude: tuple[str, ...] = ()) -> None:
    """Add one option per command-line field of ``cls`` to ``group`` (a parser or group)."""
    for f in cli_fields(cls):
        if f.name in exclude:
            continue
        kind = _base_type(cls, f.name)
        default = "" if f.default is None else f" (default: {f.default})"
        help_text = f.metadata["help"].replace("%", "%%") + default
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            kw["metavar"] = {int: "N", float: "X", str: "TEXT"}[kind]
            if f.metadata.get("choices") and kind is str:
                kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        group.add_argument(flag_of(f), **kw)


def given(cls: type[Config], args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in cli_fields(cls) if hasattr(args, f.name)}


def build(cls: type[Config], args: argparse.Namespace, *layers: Config | Mapping[str, Any],
          **fixed: Any) -> Config:
    """One config from ``layers`` (a config's fields, or a dict of the fields a preset sets),
    then the user's options, then ``fixed``, in that order; built once, so defaults that
    depend on other fields (rank = Z/4) follow the final values."""
    values: dict[str, Any] = {}
    for layer in layers:
        values.update(layer.to_dict() if isinstance(layer, Config) else layer)
    values.update(given(cls, args))
    values.update(fixed)
    return cls(**values)


def describe_error(error: ConfigError, classes: tuple[type[Config], ...]) -> str:
    """A config error in command-line terms: ``argument --states: ...``."""
    for cls in classes:
        for f in cli_fields(cls):
            if cls.__name__ == error.owner and f.name == error.field:
                return f"argument {flag_of(f)}: {error.reason}"
    return str(error)


__all__ = ["add_config_options", "given", "build", "flag_of", "cli_fields", "describe_error"]
