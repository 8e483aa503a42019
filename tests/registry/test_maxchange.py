"""The maxchange node's value: plain ASCII digits, anything else the default and why."""

from __future__ import annotations

import pytest

from neti.registry.maxchange import parse_max_change


@pytest.mark.parametrize(
    ("data", "value", "problem"),
    [
        (b"20", 20, False),
        (b" 5\n", 5, False),
        (b"", 7, False),
        (b"0", 0, False),
        (b"abc", 7, True),
        (b"-3", 7, True),
        (b"1.5", 7, True),
    ],
)
def test_parse_max_change(data: bytes, value: int, problem: bool) -> None:
    got, why = parse_max_change(data, 7)
    assert got == value and (why is not None) == problem
