"""Params: only JSON that comes back exactly as given; everything else refused."""

from __future__ import annotations

import enum
import ipaddress
import json
from datetime import date, datetime, time, timezone
from decimal import Decimal

import pytest

from dbtasks import DbtasksError, InvalidParams, JobError
from dbtasks.params import (
    MAX_INT_BITS,
    MAX_PARAMS_BYTES,
    decode_params,
    encode_params,
)


class Colour(enum.IntEnum):
    RED = 1


class Name(str):
    """A str subclass, whose JSON form could differ from its value."""


def round_trip(value: object) -> object:
    return decode_params(encode_params(value))


def test_no_params_is_an_empty_object():
    assert encode_params(None) == "{}"
    assert decode_params("{}") == {}


def test_the_encoding_is_compact_ascii_json():
    assert encode_params({"a": [1, 2.5, True, None], "b": "é"}) == (
        '{"a":[1,2.5,true,null],"b":"\\u00e9"}'
    )


@pytest.mark.parametrize(
    "value",
    [
        {"nested": {"deeper": {"deepest": [1, [2, [3]]]}}},
        [2**63, -(2**63) - 1, 10**50, -(10**50)],
        [0.1, 1e308, 5e-324, -0.0, 3.0, 1.7976931348623157e308],
        ["日本語", "🚀👍🏽", "e\u0301", "\ud800", "\udfff", "\x00", "\x1f\x7f"],
        ["\\", '"', "'", "'; DROP TABLE dbtasks_jobs; --", "%s %(x)s"],
        {"": "", "b": [], "a": {}},
        [True, False, None, 1, 1.0, "1"],
        "just a string",
        42,
    ],
    ids=["nested", "big-ints", "floats", "unicode", "quotes", "empty", "kinds",
         "string", "int"],
)
def test_accepted_values_come_back_exactly(value):
    # repr tells 1 from 1.0 and True, and 0.0 from -0.0, where == does not.
    assert repr(round_trip(value)) == repr(value)


def test_key_order_is_kept():
    value = {"z": 1, "a": 2, "m": {"y": 1, "b": 2}}

    assert list(round_trip(value)) == ["z", "a", "m"]
    assert list(round_trip(value)["m"]) == ["y", "b"]


def test_non_ascii_and_nul_are_stored_escaped():
    text = encode_params({"s": "\x00é\ud800🚀"})

    assert text == '{"s":"\\u0000\\u00e9\\ud800\\ud83d\\ude80"}'
    assert text.isascii()


@pytest.mark.parametrize(
    "value, message",
    [
        ({"x": float("nan")}, "params['x'] is nan, which JSON cannot hold; "
         "use None or a string"),
        ([1, float("inf")], "params[1] is inf, which JSON cannot hold"),
        ({"a": [{"b": -float("inf")}]}, "params['a'][0]['b'] is -inf"),
        ({"t": (1, 2)}, "params['t'] is a tuple ((1, 2)); it would come back as "
         "a list: pass a list"),
        ({"s": {3, 1}}, "params['s'] is a set ({1, 3}); pass a sorted list"),
        ({"s": frozenset()}, "pass a sorted list"),
        ({"b": b"ab"}, "params['b'] is a bytes (b'ab'); pass base64 text"),
        ({"b": bytearray(b"x")}, "pass base64 text"),
        ({"d": datetime(2030, 1, 1, tzinfo=timezone.utc)},
         "pass value.isoformat() and parse it in the task"),
        ({"d": date(2030, 1, 1)}, "pass value.isoformat()"),
        ({"d": time(9, 0)}, "pass value.isoformat()"),
        ({"m": Decimal("9.99")}, "params['m'] is a Decimal (Decimal('9.99')); pass "
         "str(value) and turn it back into a Decimal in the task"),
        ({1: "one"}, "params has the key 1 of type int; JSON keys are strings"),
        ({"k": {None: 1}}, "params['k'] has the key None of type NoneType"),
        ({"c": Colour.RED}, "params['c'] is a Colour"),
        ({"n": Name("x")}, "params['n'] is a Name"),
        (object(), "params may hold only dicts with str keys, lists, str, int, "
         "finite float, bool and None"),
        (ipaddress.ip_address("::1"), "params is an IPv6Address"),
        # Two characters that JSON would read back as the one they encode.
        ({"p": ["é\ud83d\ude00"]}, "params['p'][0] holds the surrogate pair "
         "'\\ud83d\\ude00' as two characters, which would come back as the one "
         "character they encode; join them: "
         "text.encode('utf-16', 'surrogatepass').decode('utf-16')"),
        ({"\ud83d\ude00": 1}, "params has a key that holds the surrogate pair"),
    ],
    ids=["nan", "inf", "nested-inf", "tuple", "set", "frozenset", "bytes",
         "bytearray", "datetime", "date", "time", "decimal", "int-key",
         "none-key", "int-enum", "str-subclass", "object", "an-article",
         "surrogate-pair", "surrogate-pair-key"],
)
def test_unfit_values_are_refused_with_their_path_and_a_fix(value, message):
    with pytest.raises(InvalidParams) as refused:
        encode_params(value)

    assert message in str(refused.value)


def test_invalid_params_is_a_job_error_and_a_dbtasks_error():
    with pytest.raises(InvalidParams) as refused:
        encode_params({"x": float("nan")})

    assert isinstance(refused.value, JobError)
    assert isinstance(refused.value, DbtasksError)


def test_params_up_to_the_limit_are_accepted_and_one_byte_more_refused():
    # {"x":"..."} adds 8 characters around the string.
    at_limit = {"x": "a" * (MAX_PARAMS_BYTES - 8)}
    over = {"x": "a" * (MAX_PARAMS_BYTES - 7)}

    assert len(encode_params(at_limit)) == MAX_PARAMS_BYTES
    with pytest.raises(InvalidParams) as refused:
        encode_params(over)

    assert str(refused.value).startswith(
        "params are 1,048,577 bytes as JSON, over the limit of 1,048,576"
    )


def test_the_limit_counts_escaped_characters():
    # Each "é" takes six bytes as \u00e9.
    params = {"x": "é" * (MAX_PARAMS_BYTES // 6)}

    with pytest.raises(InvalidParams, match="over the limit"):
        encode_params(params)


def test_too_deeply_nested_params_are_refused_clearly():
    value: list[object] = []
    for _ in range(5000):
        value = [value]

    with pytest.raises(InvalidParams):
        encode_params(value)


def test_decode_reads_what_json_wrote():
    assert decode_params(json.dumps({"a": [1, "b"]})) == {"a": [1, "b"]}


def test_integers_up_to_the_bound_come_back_and_one_bit_more_is_refused():
    largest = (1 << MAX_INT_BITS) - 1
    assert decode_params(encode_params({"n": largest})) == {"n": largest}
    assert decode_params(encode_params({"n": -largest})) == {"n": -largest}
    with pytest.raises(InvalidParams, match=r"params\['n'\] is an integer of "
                       r"14,001 bits.*pass it as a string"):
        encode_params({"n": 1 << MAX_INT_BITS})
