"""Reading untrusted text: the bounded JSON reader every JSON field from a file goes through, and the
one parser of whole numbers from text (URLs, environment variables)."""

from __future__ import annotations

import json

import pytest

from qcore.files import MAX_JSON_DEPTH, JsonFileError, parse_whole_number, read_json


def test_ordinary_json_reads_as_json_does():
    text = json.dumps({"a": [1, 2.5, -3, {"b": None, "c": 'x"[{'}], "d": True})
    assert read_json(text, "meta", 1000) == json.loads(text)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[" * 1900 + "]" * 1900, "meta nests 1900 deep"),
        ('{"a": ' * 100 + "1" + "}" * 100, "meta nests 100 deep"),
        ("9" * 5000, "a number of 5000 digits"),
        ("-" + "9" * 21, "a number of 22 digits"),
        ("NaN", "NaN is not a JSON number"),
        ("[-Infinity]", "-Infinity is not a JSON number"),
        ("1e999", "beyond float range"),
        ('{"k": 1, "k": 2}', "the key 'k' appears twice"),
        ("{'k': 1}", "meta is not valid JSON"),
        ("", "meta is not valid JSON"),
        ("x" * 101, r"at most 100 characters \(found 101\)"),
    ],
)
def test_hostile_json_is_one_refusal_line(text, needle):
    with pytest.raises(JsonFileError, match=needle) as refused:
        read_json(text, "meta", 100 if len(text) == 101 else 100_000)
    assert "\n" not in str(refused.value)


def test_depth_is_counted_outside_strings_only():
    deep_string = json.dumps({"text": "[" * 1000})
    assert read_json(deep_string, "meta", 10_000) == {"text": "[" * 1000}
    just_deep_enough = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert read_json(just_deep_enough, "meta", 10_000) is not None
    with pytest.raises(JsonFileError, match="nests 33 deep"):
        read_json("[" + just_deep_enough + "]", "meta", 10_000)


def test_only_strings_are_read():
    with pytest.raises(JsonFileError, match="meta must be a JSON string"):
        read_json(b"{}", "meta", 100)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("7", 7),
        ("64", 64),
        ("007", 7),
        ("65", None),
        ("0", None),
        ("²", None),
        ("٧", None),
        ("+7", None),
        (" 7", None),
        ("7_0", None),
        ("", None),
        ("9" * 21, None),
    ],
)
def test_whole_numbers_are_ascii_digits_in_range(text, expected):
    assert parse_whole_number(text, 1, 64) == expected
