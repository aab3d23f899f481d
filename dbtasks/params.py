"""Job params: JSON that comes back from the database exactly as it went in.

Params are stored as JSON text in both databases. Only values that survive
that trip unchanged are accepted: dicts with string keys, lists, strings,
integers, finite floats, booleans and None. Everything else is refused at
enqueue, before anything is written, with the path to the bad value:

- NaN and Infinity (not JSON), tuples (they come back as lists), sets, bytes,
  datetimes, Decimals and other objects (no exact JSON form; convert them, for
  example `when.isoformat()` or `str(amount)`, and convert back in the task);
- dict keys that are not strings (JSON turns them into strings).

Strings are stored with non-ASCII and control characters escaped, so NUL and
lone surrogates come back too, on PostgreSQL as on SQLite.
"""

from __future__ import annotations

import json
import math
from typing import Any

from dbtasks.errors import InvalidParams

#: Largest params accepted, as encoded JSON text.
MAX_PARAMS_BYTES = 1024 * 1024

_encoder = json.JSONEncoder(allow_nan=False, separators=(",", ":"))
_decoder = json.JSONDecoder()


def encode_params(params: Any) -> str:
    """Validate params and return their JSON text; raise InvalidParams if unfit."""
    if params is None:
        return "{}"
    _check(params, "params")
    text = _encoder.encode(params)
    if len(text) > MAX_PARAMS_BYTES:
        raise InvalidParams(
            f"params are {len(text):,} bytes as JSON, over the limit of "
            f"{MAX_PARAMS_BYTES:,}; store large data in your own table and pass "
            "its key"
        )
    return text


def decode_params(text: str) -> Any:
    return _decoder.decode(text)


def _check(value: Any, path: str) -> None:
    # bool is an int subclass and fine; exact type checks keep out subclasses
    # (IntEnum, str subclasses) whose JSON form would not come back as given.
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return
    if kind is float:
        if not math.isfinite(value):
            raise InvalidParams(
                f"{path} is {value!r}, which JSON cannot hold; use None or a string"
            )
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise InvalidParams(
                    f"{path} has the key {key!r} of type {type(key).__name__}; JSON "
                    "keys are strings, so it would come back changed: use str keys"
                )
            _check(item, f"{path}[{key!r}]")
        return
    if kind is list:
        for index, item in enumerate(value):
            _check(item, f"{path}[{index}]")
        return
    raise InvalidParams(f"{path} is {_describe(value)}; {_advice(value)}")


def _describe(value: Any) -> str:
    return f"a {type(value).__name__} ({value!r:.60})"


def _advice(value: Any) -> str:
    name = type(value).__name__
    if name == "tuple":
        return "it would come back as a list: pass a list"
    if name in ("datetime", "date", "time"):
        return "pass value.isoformat() and parse it in the task"
    if name == "Decimal":
        return "pass str(value) and turn it back into a Decimal in the task"
    if name in ("bytes", "bytearray", "memoryview"):
        return "pass base64 text, or store the bytes in a table and pass the key"
    if name in ("set", "frozenset"):
        return "pass a sorted list"
    return (
        "params may hold only dicts with str keys, lists, str, int, finite float, "
        "bool and None"
    )
