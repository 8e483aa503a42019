"""The state file: round trip, atomic replacement, clear errors."""

from __future__ import annotations

import errno
import json
import os
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_

from neti import state as st
from neti.fleet.model import Fleet, Member
from neti.identity import Identity


def sample() -> st.AgentState:
    ident = Identity("i-1", IPv4Address("10.0.0.1"), IPv4Address("203.0.113.1"), "ec2")
    member = Member(
        "i-1",
        "ec2",
        IPv4Address("203.0.113.1"),
        IPv4Address("10.0.0.1"),
        IPv4Address("192.168.0.5"),
        "2.0.0",
    )
    return st.AgentState(
        pid=os.getpid(),
        started_at=1.0,
        identity=ident,
        overlay_ip=IPv4Address("192.168.0.5"),
        fleet=Fleet(members=(member,)),
        last_reconcile=st.Reconcile(at=2.0, duration=0.1, result="ok", reason="event"),
        last_success=2.0,
        guard=st.GuardState(
            held=True, since=2.0, would_remove=3, removed=["a", "b", "c"], max_change=2
        ),
        zookeeper=st.ZkState(state="connected", since=1.5, hosts=["10.0.0.9:2181"]),
        skipped=1,
        skipped_reasons=["bad entry"],
        tagging="ok",
    )


def test_round_trip(tmp_path: Path) -> None:
    s = sample()
    p = st.write(tmp_path / "sub", s)
    assert p == tmp_path / "sub" / "state.json"
    back = st.read(tmp_path / "sub")
    assert back is not None
    assert back.identity == s.identity
    assert back.overlay_ip == s.overlay_ip
    assert back.fleet == s.fleet
    assert back.guard == s.guard
    assert back.zookeeper == s.zookeeper
    assert back.last_reconcile == s.last_reconcile
    assert back.tagging == s.tagging
    data = json.loads(p.read_text())
    assert data["members_by_network"] == {"ec2": 1}
    assert oct(p.stat().st_mode & 0o777) == "0o644"


def test_write_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    s = sample()
    st.write(tmp_path, s)
    s.skipped = 7
    st.write(tmp_path, s)
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    assert st.read(tmp_path).skipped == 7  # type: ignore[union-attr]


def test_missing_is_none(tmp_path: Path) -> None:
    assert st.read(tmp_path) is None


def test_garbage_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(st.StateFileError, match="state.json"):
        st.read(tmp_path)
    (tmp_path / "state.json").write_text("[]")
    with pytest.raises(st.StateFileError, match="not a Neti state file"):
        st.read(tmp_path)


# --- hostile or damaged files: always one StateFileError line, never another exception ---


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\xff\xfe{}", "not UTF-8 text (byte 0)"),
        (b"[" * 200_000 + b"]" * 200_000, "nested more than 16 levels deep"),
        (b'{"a": ' * 20_000 + b"1" + b"}" * 20_000, "nested more than 16 levels deep"),
        (b'{"pid": 1e400}', "out of range"),
        (b'{"pid": Infinity}', "Infinity is not a number"),
        (b'{"started_at": NaN}', "NaN is not a number"),
        (b'{"pid": 1' + b"0" * 100 + b"}", "pid is out of range"),
        (b'{"pid": ' + b"9" * 5000 + b"}", "Exceeds the limit"),
        (b'{"pid": "12"}', "pid is str, not int"),
        (b'{"last_reconcile": {"at": "x"}}', "last_reconcile.at is str, not float"),
        (b'{"guard": {"held": 1}}', "guard.held is int, not bool"),
        (b'{"guard": {"removed": [1]}}', "guard.removed is int, not str"),
        (b'{"guard": []}', "guard is list, not dict"),
        (b'{"zookeeper": {"hosts": "h:1"}}', "zookeeper.hosts is str, not list"),
        (b'{"fleet": [1]}', "a fleet member is not an object"),
        (b'{"fleet": {}}', "fleet is not a list"),
        (b'{"fleet": [{"instance_id": 5}]}', "instance_id is not a string"),
        (b'{"identity": {"instance_id": "a"}}', "missing 'private_ip'"),
        (b'{"identity": "i-1"}', "identity is not an object"),
        (b'{"overlay_ip": "300.1.1.1"}', "300.1.1.1"),
        (b'{"applied": [1]}', "applied is list, not dict"),
        (b'{"skipped_reasons": "x"}', "skipped_reasons is str, not list"),
        (b"{", "Expecting property name"),
        (b'{"generation": -1}', "generation is negative"),
        (b'{"generation": "5"}', "generation is str, not int"),
        (b'{"pid_start": true}', "pid_start is bool, not int"),
    ],
)
def test_damaged_files_are_one_clear_line(tmp_path: Path, content: bytes, why: str) -> None:
    (tmp_path / "state.json").write_bytes(content)
    with pytest.raises(st.StateFileError) as err:
        st.read(tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'state.json'}: not a Neti state file: "), msg
    assert why in msg and "\n" not in msg and len(msg) < 400, msg


def test_oversized_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    with open(tmp_path / "state.json", "wb") as f:
        f.truncate(st.MAX_BYTES + 1)  # sparse: no disk used
    with pytest.raises(st.StateFileError, match="larger than 32 MiB"):
        st.read(tmp_path)


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path: Path) -> None:
    s = sample()
    s.skipped_reasons = ["[" * 100 + '"\\' + "{" * 100]
    st.write(tmp_path, s)
    assert st.read(tmp_path).skipped_reasons == s.skipped_reasons  # type: ignore[union-attr]


def test_unknown_keys_are_ignored_for_compatibility(tmp_path: Path) -> None:
    data = sample().to_dict()
    data["future"] = {"x": [1]}
    data["guard"]["future_field"] = 3
    (tmp_path / "state.json").write_text(json.dumps(data))
    assert st.read(tmp_path).guard == sample().guard  # type: ignore[union-attr]


_JSON = st_.recursive(
    st_.none()
    | st_.booleans()
    | st_.integers()
    | st_.floats(allow_nan=False, allow_infinity=False)
    | st_.text(max_size=10),
    lambda inner: (
        st_.lists(inner, max_size=4) | st_.dictionaries(st_.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_KEYS = list(sample().to_dict())


@settings(max_examples=300, deadline=None)
@given(
    changes=st_.dictionaries(st_.sampled_from(_KEYS), _JSON, max_size=4),
    nested=st_.sampled_from(["guard", "zookeeper", "last_reconcile", "identity"]),
    inner=st_.dictionaries(st_.text(max_size=12), _JSON, max_size=3),
)
def test_any_json_is_a_state_or_a_state_file_error(
    changes: dict[str, object], nested: str, inner: dict[str, object]
) -> None:
    import tempfile

    data = sample().to_dict()
    data.update(changes)
    if isinstance(data.get(nested), dict):
        data[nested] = {**data[nested], **inner}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "state.json").write_text(json.dumps(data))
        try:
            got = st.read(d)
        except st.StateFileError as exc:
            assert "\n" not in str(exc)
            return
    assert got is not None
    # What was read has the declared types: consumers can rely on them.
    assert isinstance(got.pid, int) and isinstance(got.last_reconcile.at, float)
    assert isinstance(got.guard.held, bool) and all(isinstance(r, str) for r in got.guard.removed)
    assert isinstance(got.zookeeper.state, str) and isinstance(got.skipped_reasons, list)
    for counter in (got.generation, got.pid_start):
        assert counter is None or (type(counter) is int and counter >= 0)


def test_fifo_directory_and_symlinked_device_are_errors_not_hangs(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "state.json")  # nobody writes: a blocking open would hang forever
    with pytest.raises(st.StateFileError, match="not a regular file"):
        st.read(fifo)
    (tmp_path / "dir" / "state.json").mkdir(parents=True)
    with pytest.raises(st.StateFileError, match="state.json"):
        st.read(tmp_path / "dir")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "state.json").symlink_to("/dev/zero")
    with pytest.raises(st.StateFileError, match="not a regular file"):
        st.read(tmp_path / "dev")


def test_member_labels_are_checked(tmp_path: Path) -> None:
    data = sample().to_dict()
    data["fleet"][0]["instance_id"] = "i-1\n-A INPUT -j ACCEPT"
    (tmp_path / "state.json").write_text(json.dumps(data))
    with pytest.raises(st.StateFileError, match="fleet member instance_id .* is not a label"):
        st.read(tmp_path)


def _m(i: int, net: str = "a", ov: int | None = None) -> Member:
    A = IPv4Address
    o = i if ov is None else ov
    return Member(f"i-{i}", net, A(f"100.64.0.{i}"), A(f"10.0.0.{i}"), A(f"192.168.0.{o}"))


def test_a_fleet_given_apart_writes_what_state_fleet_does(tmp_path: Path) -> None:
    """The agent hands the fleet apart (``members``): the same file content as state.fleet."""
    s = st.AgentState(pid=1, started_at=1.0, version="t")
    fleet = [_m(3, "b"), _m(1), _m(4, "b")]
    st.write(tmp_path, s, fleet)
    s.fleet = Fleet(members=tuple(sorted(fleet)))
    full = tmp_path / "full"
    st.write(full, s)
    a = json.loads(st.path_for(tmp_path).read_text())
    b = json.loads(st.path_for(full).read_text())
    assert a == b and a["members_by_network"] == {"a": 1, "b": 2}


# One journal step: (removed instance numbers, added (number, overlay) pairs, generation).
steps = st_.lists(
    st_.tuples(
        st_.lists(st_.integers(1, 9), max_size=3),
        st_.lists(st_.tuples(st_.integers(1, 9), st_.integers(1, 30)), max_size=3),
        st_.integers(0, 2**32),
    ),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(base=st_.lists(st_.integers(1, 9), max_size=6), steps=steps)
def test_the_journal_replays_to_the_fleet_of_a_full_write(
    tmp_path_factory: pytest.TempPathFactory, base: list[int], steps: list[Any]
) -> None:
    """State file + journal lines read back as the fleet and state a full write would hold."""
    d = tmp_path_factory.mktemp("j")
    s = st.AgentState(pid=1, started_at=1.0, version="t")
    fleet = {f"i-{i}": _m(i) for i in base}
    st.write(d, s, fleet.values(), journal="abc")
    st.start_journal(d, "abc")
    for removed, added, gen in steps:
        for i in removed:
            fleet.pop(f"i-{i}", None)
        new = list({i: _m(i, ov=o) for i, o in added}.values())  # one per instance
        fleet.update({m.instance_id: m for m in new})
        s.generation = gen
        st.append_journal(d, st.journal_line(s, [f"i-{i}" for i in removed], new))
    got = st.read(d)
    assert got is not None and got.fleet is not None and got.journal_skipped == 0
    assert got.fleet.members == tuple(sorted(fleet.values()))
    assert got.generation == s.generation


@settings(max_examples=200, deadline=None)
@given(
    junk=st_.binary(max_size=200) | st_.sampled_from([b"{}", b"[]", b'{"remove": 1}', b"\xff"]),
    where=st_.integers(0, 3),
    newline=st_.booleans(),
)
def test_a_hostile_journal_line_is_skipped_and_counted(
    tmp_path_factory: pytest.TempPathFactory, junk: bytes, where: int, newline: bool
) -> None:
    """A torn, damaged or planted line ends the replay there: the lines before it count,
    it and the rest are skipped and counted, and nothing raises."""
    d = tmp_path_factory.mktemp("h")
    s = st.AgentState(pid=1, started_at=1.0, version="t")
    st.write(d, s, [_m(1)], journal="abc")
    st.start_journal(d, "abc")
    lines = [st.journal_line(s, [], [_m(n)]) for n in (2, 3, 4)]
    junk = junk.replace(b"\n", b" ") + (b"\n" if newline else b"")
    body = b"".join(lines[:where]) + junk + (b"".join(lines[where:]) if newline else b"")
    with open(d / st.JOURNAL, "ab") as f:
        f.write(body)
    got = st.read(d)
    assert got is not None and got.fleet is not None
    members = [m.instance_id for m in got.fleet.members]
    assert members == [f"i-{n}" for n in range(1, 2 + where)]  # the lines before it only
    if junk == b"":
        assert got.journal_skipped == 0
    else:
        assert got.journal_skipped == (1 + 3 - where if newline else 1)


def test_a_journal_of_another_state_file_is_ignored(tmp_path: Path) -> None:
    """Stopped between writing a new state file and starting its journal: the state file is
    whole, the old journal is not replayed (and is no damage)."""
    s = st.AgentState(pid=1, started_at=1.0, version="t")
    st.write(tmp_path, s, [_m(1)], journal="old")
    st.start_journal(tmp_path, "old")
    st.append_journal(tmp_path, st.journal_line(s, ["i-1"], [_m(2)]))
    st.write(tmp_path, s, [_m(1), _m(3)], journal="new")
    got = st.read(tmp_path)
    assert got is not None and got.fleet is not None and got.journal_skipped == 0
    assert [m.instance_id for m in got.fleet.members] == ["i-1", "i-3"]


def test_a_planted_journal_header_or_a_fifo_is_counted(tmp_path: Path) -> None:
    s = st.AgentState(pid=1, started_at=1.0, version="t")
    st.write(tmp_path, s, [_m(1)], journal="abc")
    (tmp_path / st.JOURNAL).write_bytes(b'["abc"]\n{"remove":[],"add":[],"state":{}}\n')
    got = st.read(tmp_path)
    assert got is not None and got.journal_skipped == 2
    (tmp_path / st.JOURNAL).unlink()
    os.mkfifo(tmp_path / st.JOURNAL)
    got = st.read(tmp_path)  # never blocks
    assert got is not None and got.journal_skipped == 1
    assert got.fleet is not None and len(got.fleet.members) == 1


def test_a_hostile_member_in_the_journal_is_refused(tmp_path: Path) -> None:
    s = st.AgentState(pid=1, started_at=1.0, version="t")
    st.write(tmp_path, s, [_m(1)], journal="abc")
    st.start_journal(tmp_path, "abc")
    bad = _m(2).as_dict()
    bad["instance_id"] = "i-2\n-A INPUT -j ACCEPT"
    line = {"remove": ["i-1"], "add": [bad], "state": s.to_dict(with_fleet=False)}
    st.append_journal(tmp_path, json.dumps(line).encode() + b"\n")
    got = st.read(tmp_path)
    assert got is not None and got.fleet is not None and got.journal_skipped == 1
    assert [m.instance_id for m in got.fleet.members] == ["i-1"]  # the line did nothing


# --- the process, and the runtime record (the agent's second channel to status)


def test_a_process_is_known_by_its_pid_and_start_time() -> None:
    me = st.proc_start(os.getpid())
    assert isinstance(me, int) and me > 0
    assert st.running(os.getpid(), me)
    assert not st.running(os.getpid(), me + 1)  # the pid, handed out again later
    assert st.proc_start(0) is None and not st.running(0, None)
    assert st.proc_start(2**22 + 12345) is None  # above pid_max: no such process


def test_the_runtime_record_round_trips(tmp_path: Path) -> None:
    rec = st.RuntimeRecord(
        pid=os.getpid(),
        pid_start=st.proc_start(os.getpid()),
        started_at=5.0,
        state_dir="/var/lib/neti",
        state_error="No space left on device",
        state_error_since=6.0,
        updated_at=7.0,
    )
    path = st.runtime_path(tmp_path / "run", "/var/lib/neti")
    assert path == st.runtime_path(tmp_path / "run", "/var/lib/neti/")  # one per directory
    assert path != st.runtime_path(tmp_path / "run", "/var/lib/other")
    st.write_runtime(path, rec)
    assert st.read_runtime(path) == rec
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_a_damaged_or_planted_runtime_record_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "agent-x.json"
    for content in (
        b"",
        b"[]",
        b"{",
        b'{"pid": "12"}',
        b'{"pid_start": -4}',
        b'{"state_error": 5}',
        b'{"started_at": NaN}',
        b"[" * 100_000,
        b'{"state_error": "' + b"x" * 20_000 + b'"}',
    ):
        path.write_bytes(content)
        assert st.read_runtime(path) is None, content
    path.unlink()
    os.mkfifo(path)
    assert st.read_runtime(path) is None  # never waits on a FIFO
    assert st.read_runtime(tmp_path / "missing.json") is None


def test_a_long_error_in_the_runtime_record_is_one_short_line(tmp_path: Path) -> None:
    path = tmp_path / "agent-x.json"
    path.write_text(json.dumps({"pid": 1, "state_error": "bad\n" * 200}))
    rec = st.read_runtime(path)
    assert rec is not None and rec.state_error is not None
    assert "\n" not in rec.state_error and len(rec.state_error) <= 200


@settings(max_examples=200, deadline=None)
@given(changes=st_.dictionaries(st_.sampled_from(list(st.RuntimeRecord().to_dict())), _JSON))
def test_any_json_is_a_runtime_record_or_none(changes: dict[str, object]) -> None:
    import tempfile

    data = {**st.RuntimeRecord(pid=3, started_at=1.0).to_dict(), **changes}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "agent.json"
        path.write_text(json.dumps(data))
        got = st.read_runtime(path)
    if got is not None:
        assert type(got.pid) is int and isinstance(got.started_at, float)
        assert got.pid_start is None or (type(got.pid_start) is int and got.pid_start >= 0)
        assert got.state_error is None or isinstance(got.state_error, str)


def test_a_journal_line_that_does_not_fit_is_an_error_not_a_torn_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk takes what fits and refuses the rest: the agent must hear of it (it
    names the error and writes the whole file again), not count a torn line as saved."""
    s = st.AgentState(pid=1, started_at=1.0, version="t")
    st.write(tmp_path, s, [_m(1)], journal="j1")
    st.start_journal(tmp_path, "j1")
    real = os.write
    calls: list[int] = []

    def short_then_full(fd: int, data: bytes | memoryview) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, bytes(data[:7]))  # what fitted
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st.os, "write", short_then_full)
    with pytest.raises(OSError, match="No space left"):
        st.append_journal(tmp_path, st.journal_line(s, ["i-1"], [_m(2)]))
    assert len(calls) == 2


_text = st_.text(max_size=12)  # quotes, backslashes, control and non-ASCII characters


@settings(max_examples=300, deadline=None)
@given(
    st_.builds(
        Member,
        instance_id=_text,
        network=_text,
        public_ip=st_.integers(0, 2**32 - 1).map(IPv4Address),
        private_ip=st_.integers(0, 2**32 - 1).map(IPv4Address),
        overlay_ip=st_.integers(0, 2**32 - 1).map(IPv4Address),
        version=_text,
        legacy=st_.booleans(),
        wg_key=_text,
        wg_port=st_.integers(0, 65535),
    )
)
def test_a_row_is_the_members_json(m: Member) -> None:
    assert st._row(m) == json.dumps(m.as_dict())


def test_the_state_file_is_written_in_pieces_as_it_was_whole(tmp_path: Path) -> None:
    """Rows streamed a few at a time: the same bytes as the document built whole."""
    s = st.AgentState(pid=1, started_at=1.0, version="t")
    A = IPv4Address
    fleet = [
        Member(f"i-{i}", "ab"[i % 3 % 2], A(0x64400001 + i), A(0x0A000001 + i), A(0xC0A80001 + i))
        for i in range(2 * st.ROWS_PER_WRITE + 7)
    ]
    st.write(tmp_path, s, fleet, journal="j1")
    doc = s.to_dict(with_fleet=False) | {"journal": "j1"}
    by_network: dict[str, int] = {}
    for m in fleet:
        by_network[m.network] = by_network.get(m.network, 0) + 1
    doc["members_by_network"] = dict(sorted(by_network.items()))
    rows = ",\n".join(json.dumps(m.as_dict()) for m in sorted(fleet, key=lambda m: m.instance_id))
    whole = json.dumps(doc, indent=1).replace('"fleet": null', f'"fleet": [{rows}]', 1) + "\n"
    assert st.path_for(tmp_path).read_text() == whole
    back = st.read(tmp_path)
    assert back is not None and back.fleet is not None and len(back.fleet.members) == len(fleet)
