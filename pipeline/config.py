"""Reading `params.yaml` into config dataclasses, and the one error type users see.

Every component has one dataclass with defaults; it is built as `Config(**params["section"])` through
`build()`, so an unknown or mistyped key fails loudly in one line instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

T = TypeVar("T")

DEFAULT_PARAMS = "params.yaml"  # the one place the default params path is written


class UserError(click.ClickException):
    """A problem with the user's input (path, parameter, cache...): printed as one line, no traceback.

    Raised from library code; inside a click command click prints `Error: <message>` and exits 2.
    """

    exit_code = 2


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """The whole params file as a dict; a missing or malformed file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"params file {path} not found: run from the repository root or pass --params PATH")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise UserError(f"params file {path} is not valid YAML ({first}): fix the file") from None
    if not isinstance(params, dict):
        raise UserError(f"params file {path} must hold a mapping of sections, got {type(params).__name__}")
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One section of the params, `{}` when absent (every field then takes its default)."""
    value = params.get(name) or {}
    if not isinstance(value, dict):
        raise UserError(f"params section '{name}' must be a mapping, got {type(value).__name__}")
    return value


def build(cls: type[T], values: dict[str, Any] | None, where: str) -> T:
    """`cls(**values)` with one-line errors for unknown keys and wrongly typed values.

    `where` names the params section for the message (e.g. "pretrain"). A class with a `gather(values)`
    classmethod first moves its open-ended keys into a field of their own (DistillConfig: the method sections).
    Values are checked against the
    field annotations (int, float, str, bool, optional, list and dict of those); ints are accepted for
    floats. The dataclass's own `__post_init__` checks ranges and choices.
    """
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra: list[str] = []
    if hasattr(cls, "gather"):  # a section with open-ended keys (distill: one per registered method) gathers them
        values, extra = cls.gather(values)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(
            f"unknown key(s) {', '.join(unknown)} in params section '{where}'; "
            f"known keys: {', '.join([*fields, *extra])}"
        )
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if not _matches(value, hints[key]):
            raise UserError(
                f"params {where}.{key} = {value!r} has the wrong type: expected {_type_name(hints[key])}"
            )
        if hints[key] is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
    return cls(**values)


def check(condition: bool, message: str) -> None:
    """Raise a UserError with `message` unless `condition` holds (for `__post_init__` range checks)."""
    if not condition:
        raise UserError(message)


def check_choice(value: Any, choices: typing.Iterable[Any], what: str) -> None:
    choices = list(choices)
    if value not in choices:
        raise UserError(f"{what} = {value!r} is not one of {', '.join(map(str, choices))}")


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a plain dict (for checkpoints and metrics files)."""
    return dataclasses.asdict(config)


def without_defaults(values: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """`values` less each key of `later` that holds the default given there: what keys added after checkpoints
    were made contribute to an identity, so that those checkpoints still resume while the keys keep defaults."""
    return {k: v for k, v in values.items() if not (k in later and v == later[k])}


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict) and (
            not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
        )
    if origin is typing.Literal:
        return value in args
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
