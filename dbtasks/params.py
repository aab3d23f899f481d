"""Job params: JSON that comes back from the database exactly as it went in.

Params are stored as JSON text in both databases. Only values that survive
that trip unchanged are accepted: dicts with string keys, lists, strings,
integers, finite floats, booleans and None. Everything else is refused at
enqueue, before anything is written, with the path to the bad value:

- NaN and Infinity (not JSON), tuples (they come back as lists), sets, bytes,
  datetimes, Decimals and other objects (no exact JSON form; convert them, for
  example `when.isoformat()` or `str(amount)`, and convert back in the task);
- dict keys that are not strings (JSON turns them into strings);
- integers of more than about 4,200 digits (Python's default limit on turning
  them into text and back; pass them as strings).

Strings are stored with non-ASCII and control characters escaped, so NUL and
lone surrogates come back too, on PostgreSQL as on SQLite. A surrogate pair
held as two characters (from text decoded with 'surrogatepass') is refused:
JSON reads its two escapes back as the one character they encode.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

from dbtasks.errors import InvalidParams

_T = TypeVar("_T")

#: Largest params accepted, as encoded JSON text.
MAX_PARAMS_BYTES = 1024 * 1024

#: Deepest nesting of dicts and lists accepted (far below Python's recursion
#: limit, which the check and the JSON codec would otherwise hit).
MAX_PARAMS_DEPTH = 100

#: Largest integer accepted, in bits: about 4,200 decimal digits, below the
#: 4,300 that Python converts to and from text by default
#: (sys.set_int_max_str_digits), so that every worker can read it back.
MAX_INT_BITS = 14_000

_encoder = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Reads what enqueue wrote, and refuses what it never writes: NaN and
# Infinity, which Python's JSON reader takes by default.
_decoder = json.JSONDecoder(parse_constant=_refuse_constant)


def encode_params(params: Any) -> str:
    """Validate params and return their JSON text; raise InvalidParams if unfit."""
    return encode_checked(checked_params(params))


def checked_params(params: Any) -> Any:
    """Validate params and return the value to encode (None gives {}); raise
    InvalidParams if unfit. The size limit is checked on encoding."""
    if params is None:
        return {}
    try:
        _check(params, 0)
    except _Unfit as unfit:
        path = "params" + "".join(reversed(unfit.path))
        if len(path) > 200:
            path = path[:200] + "..."
        raise InvalidParams(path + unfit.message) from None
    return params


def encode_params_array(values: list[Any]) -> str:
    """The JSON array of checked params values (checked_params), as one text
    whose elements are each value's encode_params text; raise InvalidParams,
    naming the position, for a value over the size limit.

    Encoded a thousand at a time: one call of the JSON encoder for each
    value cost half of the CPU time of a bulk enqueue. A slice whose text is
    within the limit holds no value over it; only a longer one is encoded
    again value by value, to find it.
    """
    texts = []
    for start in range(0, len(values), _ARRAY_SLICE):
        part = values[start:start + _ARRAY_SLICE]
        text = _encoder.encode(part)
        if len(text) > MAX_PARAMS_BYTES:
            for position, value in enumerate(part, start):
                in_list(position, encode_checked, value)
        texts.append(text[1:-1])
    return "[" + ",".join(texts) + "]"


def in_list(position: int, convert: Callable[[Any], _T], value: Any) -> _T:
    """`convert(value)` for the value at `position` of enqueue_many's
    params_list, whose InvalidParams says which value it is."""
    try:
        return convert(value)
    except InvalidParams as exc:
        raise InvalidParams(f"params_list[{position}]: {exc}") from None


#: Values encoded in one call by encode_params_array.
_ARRAY_SLICE = 1000


def encode_checked(value: Any) -> str:
    """The JSON text of a checked params value (checked_params); raise
    InvalidParams if it is over the size limit."""
    text = _encoder.encode(value)
    if len(text) > MAX_PARAMS_BYTES:
        raise InvalidParams(
            f"params are {len(text):,} bytes as JSON, over the limit of "
            f"{MAX_PARAMS_BYTES:,}; store large data in your own table and pass "
            "its key"
        )
    return text


def decode_params(text: str) -> Any:
    """The params of a stored job; ValueError for a text enqueue would not
    have written (changed by hand or by another program)."""
    return _decoder.decode(text)


class _Unfit(Exception):
    """Raised deep in the check, its message following the path to the value.

    The path is added on the way up, so a valid value (the common case) builds
    no path strings at all."""

    def __init__(self, message: str):
        self.message = message
        self.path: list[str] = []


def _check(value: Any, depth: int) -> None:
    # bool is an int subclass and fine; exact type checks keep out subclasses
    # (IntEnum, str subclasses) whose JSON form would not come back as given.
    kind = type(value)
    if kind is str:
        if not value.isascii():
            _check_text(value)
        return
    if kind is bool or value is None:
        return
    if kind is int:
        if value.bit_length() > MAX_INT_BITS:
            raise _Unfit(
                f" is an integer of {value.bit_length():,} bits, more than Python "
                "turns into text by default; pass it as a string"
            )
        return
    if kind is float:
        if not math.isfinite(value):
            raise _Unfit(
                f" is {value!r}, which JSON cannot hold; use None or a string"
            )
        return
    if kind is not dict and kind is not list:
        raise _Unfit(f" is {_describe(value)}; {_advice(value)}")
    if depth >= MAX_PARAMS_DEPTH:
        raise _Unfit(
            f" nests dicts and lists more than {MAX_PARAMS_DEPTH} levels "
            "deep; flatten them"
        )
    items = value.items() if kind is dict else enumerate(value)
    for key, item in items:
        if kind is dict:
            if type(key) is not str:
                raise _Unfit(
                    f" has the key {key!r:.60} of type {type(key).__name__}; JSON "
                    "keys are strings, so it would come back changed: use str keys"
                )
            if not key.isascii():
                _check_text(key, " has a key that holds")
        try:
            _check(item, depth + 1)
        except _Unfit as unfit:
            unfit.path.append(f"[{key!r:.60}]")
            raise


def _check_text(text: str, holder: str = " holds") -> None:
    """Refuse a string with a surrogate pair as two characters: JSON writes
    both escaped, and reads the two escapes back as the one character they
    encode, so the string would come back changed."""
    pair = _SURROGATE_PAIR.search(text)
    if pair is not None:
        raise _Unfit(
            f"{holder} the surrogate pair {pair.group()!r} as two characters, which "
            "would come back as the one character they encode; join them: "
            "text.encode('utf-16', 'surrogatepass').decode('utf-16')"
        )


_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")


def _describe(value: Any) -> str:
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name} ({value!r:.60})"


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
