"""What every config section is: `Strict` (unknown keys, NaN and retyped scalars refused), the one
error type, errors written as dotted keys, and the path rules a recorded config follows."""

from __future__ import annotations

import os
from typing import Annotated, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names every offending key."""


_SCALARS = (bool, int, float)


def _scalar_type(annotation) -> type | None:
    """bool, int or float when a field holds that scalar (or None); else None (left to pydantic)."""
    args = [a for a in get_args(annotation) if a is not type(None)] if get_args(annotation) else [annotation]
    args = [get_args(a)[0] if get_origin(a) is Annotated else a for a in args]  # a derived field's bounds
    return args[0] if len(args) == 1 and args[0] in _SCALARS else None


class Strict(BaseModel):
    """A config section: unknown keys refused, NaN and inf refused, and scalars taken only as
    what they are: ``itm: "0.3"`` (a string) or ``num_captions: true`` (a bool) are mistakes that
    pydantic's lax mode would turn into 0.3 and 1 (an int is a fine float: ``temperature: 1``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _scalars_as_written(cls, data):
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            kind = _scalar_type(field.annotation)
            value = data.get(name, None)
            if kind is None or value is None:
                continue
            if kind is bool:
                ok = isinstance(value, bool)
            else:
                ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
            if not ok:
                expected = {float: "a number", int: "an integer", bool: "true or false"}[kind]
                raise ValueError(f"{name}: expected {expected}, got {written(value)}")
        return data


def written(value) -> str:
    """A value as the user wrote it in YAML, with its type when that is the surprise."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, float) and value != value:
        return ".nan (NaN, not a number)"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return f"{'-' if value < 0 else ''}.inf (infinite)"
    kind = {str: "a string", int: "an integer", float: "a number"}.get(type(value))
    return f"{value!r} ({kind})" if kind else repr(value)


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"decide": {"web": {"itm": 0.5}}}`` -> ``{"decide.web.itm": 0.5}``."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def format_errors(err: ValidationError) -> str:
    """One line per error: the dotted key, what is wrong, and what the user wrote there."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
            field, sep, rest = msg.partition(": ")
            if sep and field.isidentifier():  # a Strict section's "key: ..." error names its own key
                loc, msg = [*loc, field], rest
        elif e["type"] not in ("extra_forbidden", "missing") and not isinstance(e.get("input"), (dict, list)):
            msg += f", got {written(e['input'])}"
        lines.append(f"  {'.'.join(loc) or '(top level)'}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def is_url(path: str | os.PathLike) -> bool:
    """Written as a URL (``s3://…``, ``file://…``): recorded as given, never made absolute through
    pathlib (`absolute_path`). Whether a location is on this machine is `io.folder.is_local`."""
    return "://" in os.fspath(path)


def absolute_path(path: str) -> str:
    """A local path or shard pattern made absolute (``~`` expanded), so that what a run records
    resolves from any directory; a URL as given."""
    return path if is_url(path) else os.path.abspath(os.path.expanduser(path))
