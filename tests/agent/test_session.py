"""The saved ZooKeeper session (neti/agent/session.py): 0600, atomic, strict on reading."""

from __future__ import annotations

import dataclasses
import json
import os
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from neti.agent import session


def test_round_trip_and_mode(tmp_path) -> None:
    s = session.SavedSession(0x1234, b"\x01" * 16, "10.0.0.1:2181", time.time(), 10.0)
    session.save(tmp_path, s)
    p = session.path_for(tmp_path)
    assert p.stat().st_mode & 0o777 == 0o600
    got = session.load(tmp_path)
    assert got is not None and got.saved_at >= s.saved_at  # the file's mtime if later
    assert dataclasses.replace(got, saved_at=s.saved_at) == s
    assert s.fresh()
    assert not s.fresh(time.time() + 11)
    session.clear(tmp_path)
    assert session.load(tmp_path) is None


def test_world_readable_file_is_refused(tmp_path) -> None:
    s = session.SavedSession(7, b"\x02" * 16, "h:1", time.time(), 10.0)
    session.save(tmp_path, s)
    os.chmod(session.path_for(tmp_path), 0o644)
    assert session.load(tmp_path) is None


@settings(max_examples=200)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=10,
    )
)
def test_hostile_content_never_raises(tmp_path_factory, value: object) -> None:
    d = tmp_path_factory.mktemp("s")
    p = session.path_for(d)
    p.write_text(json.dumps(value))
    os.chmod(p, 0o600)
    got = session.load(d)
    assert got is None or isinstance(got, session.SavedSession)


def test_touch_keeps_an_old_session_fresh(tmp_path) -> None:
    """A crash hours after connecting still resumes: the running agent touches the file."""
    old = time.time() - 3600
    session.save(tmp_path, session.SavedSession(9, b"\x03" * 16, "h:1", old, 10.0))
    os.utime(session.path_for(tmp_path), (old, old))
    assert not session.load(tmp_path).fresh()  # type: ignore[union-attr]
    session.touch(tmp_path)
    got = session.load(tmp_path)
    assert got is not None and got.fresh() and got.session_id == 9
    session.touch(tmp_path / "missing")  # never raises
