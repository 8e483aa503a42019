"""The chaos harness's own logic (no root, no lab): parsing probe lines, building reports."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from tests.chaos.harness import build_report, parse_line

D1 = "-A NETI-DNAT -d 192.168.0.1/32 -j DNAT --to-destination 10.0.0.1"


def reading(t: float, dnat: list[str] | None, allow: list[str] | None) -> dict:
    return {"t": t, "dnat": dnat, "allow": allow}


def test_no_change_no_failure_is_an_empty_report() -> None:
    readings = {"a": [reading(1.0, [D1], ["10.0.0.1"])]}
    attempts = {("a", "b", "x:7000"): [{"t": t, "ok": True, "err": None} for t in (2.0, 3.0)]}
    rep = build_report("s", 1.5, 4.0, readings, attempts)
    assert rep.changes == [] and rep.failed == 0 and rep.connects == 2
    assert rep.unchanged_at_end("a")


def test_changes_inside_the_window_only_and_back_to_baseline() -> None:
    readings = {
        "a": [
            reading(0.5, [D1], ["10.0.0.1"]),
            reading(1.0, [D1], ["10.0.0.1", "10.0.0.2"]),  # before t0: the baseline
            reading(2.0, [], ["10.0.0.1", "10.0.0.2"]),
            reading(3.0, [D1], ["10.0.0.1", "10.0.0.2"]),
            reading(9.0, None, None),  # after t1: not counted
        ]
    }
    attempts = {
        ("a", "b", "x:7000"): [
            {"t": 1.2, "ok": False, "err": "warm-up"},
            {"t": 2.1, "ok": False, "err": "TimeoutError"},
            {"t": 2.2, "ok": True, "err": None},
        ]
    }
    rep = build_report("s", 1.5, 4.0, readings, attempts)
    assert [(c.host, c.added, c.removed) for c in rep.changes] == [
        ("a", [], [f"dnat {D1}"]),
        ("a", [f"dnat {D1}"], []),
    ]
    assert rep.failed == 1 and rep.streams[0].failures == [(2.1, "TimeoutError")]
    assert rep.unchanged_at_end("a")
    assert rep.failed_without(["a"]) == 0
    assert "2 kernel changes" in rep.render()
    json.dumps(rep.as_dict())


def test_a_vanished_set_is_a_change() -> None:
    readings = {"a": [reading(1.0, [D1], ["10.0.0.1"]), reading(2.0, [D1], None)]}
    rep = build_report("s", 1.5, 4.0, readings, {})
    assert rep.changes[0].added == ["allow: <missing>"]
    assert not rep.unchanged_at_end("a")


def test_probe_lines_parse_strictly() -> None:
    assert parse_line('{"t": 1, "ok": true, "err": null}') == {"t": 1.0, "ok": True, "err": None}
    assert parse_line('{"t": 1, "dnat": ["x"], "allow": null}') == reading(1.0, ["x"], None)
    bad = ["", "ready", "[]", '{"t": "1"}', '{"t": true, "ok": true}', '{"t": NaN}']
    bad += ['{"t": 1, "ok": 1}', '{"t": 1, "dnat": [1]}', '{"t": 1, "allow": "x"}']
    for line in bad:
        assert parse_line(line) is None, line


@given(st.text(max_size=200))
def test_probe_line_parser_never_raises(line: str) -> None:
    item = parse_line(line)
    assert item is None or isinstance(item["t"], float)


@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.sampled_from(["t", "ok", "err", "dnat", "allow", "x"]), inner)
        ),
        max_leaves=10,
    )
)
def test_probe_line_parser_on_any_json(value: object) -> None:
    item = parse_line(json.dumps(value))
    if item is not None:
        build_report("s", 0.0, 1.0, {"a": [item] if "ok" not in item else []}, {})
