"""The one exception family users see: the CLI prints its message as one line and exits non-zero."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


class ScfriskError(Exception):
    """An error in the user's input, data or configuration, with a message that says what to fix."""


def describe_invalid(errors: list[dict[str, Any]], skip: Collection[str] = ()) -> str:
    """Pydantic's errors of a configuration file as one line, each with its dotted key: `unknown key 'a.b'`,
    or `'a.b': problem (got value)`. `skip` drops location parts that are not keys of the file (the tag
    pydantic puts in the location of a discriminated union's member); a validator's `field: problem` message
    becomes one more level of the key."""
    return "; ".join(_describe(error, skip) for error in errors)


def _describe(error: dict[str, Any], skip: Collection[str]) -> str:
    key = ".".join(str(part) for part in error["loc"] if part not in skip)
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    message = error["msg"].removeprefix("Value error, ")
    field, sep, rest = message.partition(": ")
    if sep and field.isidentifier():
        key, message = f"{key}.{field}" if key else field, rest
    value = error.get("input")
    shown = f" (got {value!r})" if isinstance(value, (str, int, float)) else ""
    return f"'{key}': {message}{shown}" if key else message
