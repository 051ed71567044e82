"""What a malicious model must not do to the daemon, starting with JSON it
sends that cannot be handled: nested so deep that parsing or encoding it
again raises RecursionError.

Each hole was found against a real ``crushd serve``; the tests plant the
attack through the fake model server, over a real socket, and check the
records the contract promises.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from crushd.common import MAX_JSON_DEPTH, json_depth, load_json
from crushd.providers import sse

#: About 2 KB of arguments nested a thousand deep: json.loads raises
#: RecursionError for it, which once crashed the run and every start after.
NESTED = '{"a":' * 1000 + "1" + "}" * 1000


# ---------------------------------------------------------------- JSON from outside


def test_load_json_turns_every_failure_into_value_error():
    assert load_json('{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
    assert load_json(b"[1]") == [1]
    assert load_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None
    too_deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    for bad, why in [
        (NESTED, "nested deeper than 64 levels"),  # json.loads: RecursionError
        (too_deep, "nested deeper than 64 levels"),  # parses, but is too deep
        (too_deep.encode(), "nested deeper than 64 levels"),
        ('{"a": ', "not valid JSON"),
        (b"\xff", "not valid JSON"),
        (None, "not valid JSON"),
    ]:
        with pytest.raises(ValueError, match=why):
            load_json(bad)
    # Brackets inside strings do not count as nesting.
    assert load_json(json.dumps(["[" * 500])) == ["[" * 500]


def test_json_depth_is_measured_without_recursion():
    deep: list[Any] = []
    node = deep
    for _ in range(100_000):  # far past the recursion limit
        node.append([])
        node = node[0]
    assert json_depth(deep) == 100_001
    assert json_depth(deep, limit=10) == 11  # stops as soon as it is past the limit
    assert json_depth({"a": [1, {"b": {}}], "c": 2}) == 4
    assert json_depth("scalar") == 0


def test_a_provider_event_nested_too_deep_is_invalid_data_not_a_crash():
    with pytest.raises(sse.ProviderError, match="nested deeper"):
        sse.decode_json('{"type": "content_block_start", "content_block": ' + NESTED + "}")
    # An error body nested absurdly deep is shown as text, not parsed.
    assert sse.error_message(NESTED) == NESTED[: sse.MAX_DETAILS]
