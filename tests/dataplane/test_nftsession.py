"""The libnftables session: the client against scripted workers (no root), the backend's
fallbacks, then the real worker in a namespace (framing, refusal of the initial namespace).
Element updates through it are checked against full applies in test_delta.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neti.dataplane import nftsession
from neti.dataplane.nftables import SESSION_RESTARTS, NftablesBackend
from neti.dataplane.nftsession import NftSession, SessionLost
from neti.dataplane.system import REFUSE_ENV, System
from neti.desired import build
from neti.desired.model import Delta
from neti.errors import DataplaneError
from tests.support.fakesystem import FakeSystem

# A worker that speaks the protocol as told by its first argument.
WORKER = r"""
import json, sys
mode = sys.argv[1]
out = sys.stdout.buffer
def say(x):
    out.write(x if isinstance(x, bytes) else json.dumps(x).encode() + b"\n"); out.flush()
if mode == "refuse":
    say({"error": "cannot load libnftables.so.1"}); sys.exit(1)
if mode == "mute":
    sys.stdin.buffer.read(); sys.exit(0)
say({"ready": True})
if mode == "deaf":
    import time; time.sleep(600)
while True:
    header = sys.stdin.buffer.readline()
    if not header:
        sys.exit(0)
    script = sys.stdin.buffer.read(int(header)).decode()
    if mode == "garbage":
        say(b"this is not json\n")
    elif mode == "list":
        say(b"[1, 2]\n")
    elif mode == "norc":
        say({"err": ""})
    elif mode == "die":
        sys.exit(3)
    elif mode == "hang":
        sys.stdin.buffer.read()

    elif "bad" in script:
        say({"rc": 1, "err": "Error: Could not process rule: No such file or directory\nbad\n"})
    else:
        say({"rc": 0, "err": ""})
"""


def worker(mode: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )


@pytest.fixture
def sessions() -> Iterator[list[NftSession]]:
    made: list[NftSession] = []
    yield made
    for s in made:
        s.close()


def session(mode: str, made: list[NftSession]) -> NftSession:
    s = NftSession(worker(mode))
    made.append(s)
    return s


# --------------------------------------------------------------------------- the client


def test_a_write_and_nfts_refusal(sessions: list[NftSession]) -> None:
    s = session("ok", sessions)
    s.run("add element ip neti allow { 10.0.0.1 }\n")
    with pytest.raises(DataplaneError, match="No such file or directory; bad") as exc:
        s.run("bad\n")
    assert not isinstance(exc.value, SessionLost)  # nft refused: the session goes on
    s.run("add element ip neti allow { 10.0.0.2 }\n")
    assert s.alive


@pytest.mark.parametrize("mode", ["garbage", "list", "norc", "die"])
def test_a_hostile_or_dead_worker_is_a_lost_session(mode: str, sessions: list[NftSession]) -> None:
    s = session(mode, sessions)
    with pytest.raises(SessionLost):
        s.run("add element ip neti allow { 10.0.0.1 }\n")
    assert not s.alive  # closed: never asked again


def test_a_worker_that_does_not_answer_is_killed(sessions: list[NftSession]) -> None:
    s = session("hang", sessions)
    with pytest.raises(SessionLost, match="in time"):
        s.run("add element ip neti allow { 10.0.0.1 }\n", timeout=0.5)
    assert not s.alive


@pytest.mark.slow
def test_a_worker_that_stops_reading_is_killed(sessions: list[NftSession]) -> None:
    s = session("deaf", sessions)  # ready, then reads nothing
    big = "add element ip neti allow { " + ", ".join(["10.0.0.1"] * 200_000) + " }\n"
    with pytest.raises(SessionLost, match="did not take the script in time"):
        s.run(big, timeout=1.0)  # far more than a pipe holds
    assert not s.alive


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["refuse", "mute"])
def test_a_worker_that_does_not_start(mode: str, sessions: list[NftSession]) -> None:
    s = session(mode, sessions)
    with pytest.raises(DataplaneError):
        s.wait_ready(timeout=1.0)
    assert not s.ready


@given(st.binary(max_size=200))
def test_any_reply_line_is_an_object_or_a_lost_session(line: bytes) -> None:
    try:
        msg = nftsession.parse_reply(line)
    except SessionLost:
        return
    assert isinstance(msg, dict)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@given(st.dictionaries(st.sampled_from(["rc", "err", "out", "x"]), JSON, max_size=4))
def test_any_answer_is_success_refusal_or_lost(msg: dict[str, object]) -> None:
    rc = msg.get("rc")
    try:
        nftsession.check_result(msg)  # type: ignore[arg-type]
    except SessionLost:
        assert not isinstance(rc, int) or isinstance(rc, bool)
    except DataplaneError as exc:
        assert isinstance(rc, int) and rc != 0
        assert str(exc).startswith("nft (session) failed: ") and len(str(exc)) < 2000
    else:
        assert rc == 0 and not isinstance(rc, bool)


# --------------------------------------------------------------------------- the backend

STATE = build("192.168.0.0/18", allow=["10.0.0.1"], reject_all=True)
JOIN = Delta(allow_add=(IPv4Address("10.0.0.2"),))


class SpawningSystem(FakeSystem):
    """FakeSystem whose spawn starts scripted workers (modes in order, then "ok")."""

    def __init__(self, modes: Sequence[str]) -> None:
        super().__init__()
        self.modes = list(modes)
        self.spawned: list[NftSession] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        assert list(argv) == nftsession.command()
        proc = worker(self.modes.pop(0) if self.modes else "ok")
        self.procs.append(proc)
        return proc

    def nft_writes(self) -> int:
        return sum(1 for a in self.argvs() if a[:2] == ["nft", "-f"])


@pytest.fixture
def spawning() -> Iterator[list[SpawningSystem]]:
    made: list[SpawningSystem] = []
    yield made
    for s in made:
        for p in s.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def backend(system: FakeSystem) -> NftablesBackend:
    b = NftablesBackend(system)
    b.apply(STATE)
    b.keep_open()
    return b


def test_without_processes_element_updates_use_nft_f() -> None:
    system = FakeSystem()
    b = backend(system)
    before = len(system.calls)
    assert b.apply_delta(JOIN) is not None
    assert [c.argv for c in system.calls[before:]] == [["nft", "-f", "-"]]


def test_updates_go_through_the_session(spawning: list[SpawningSystem]) -> None:
    system = SpawningSystem([])
    spawning.append(system)
    b = backend(system)
    writes = system.nft_writes()
    result = b.apply_delta(JOIN)
    assert result is not None and result.changed
    assert system.nft_writes() == writes and len(system.procs) == 1
    b.close()
    assert system.procs[0].wait(timeout=5) == 0  # stdin closed: the worker ends


def test_a_session_that_cannot_start_falls_back_at_once(spawning: list[SpawningSystem]) -> None:
    system = SpawningSystem(["refuse"])
    spawning.append(system)
    b = backend(system)
    writes = system.nft_writes()
    assert b.apply_delta(JOIN) is not None  # written by nft -f instead, nothing lost
    assert system.nft_writes() == writes + 1
    assert b.apply_delta(Delta(allow_del=JOIN.allow_add)) is not None
    assert system.nft_writes() == writes + 2 and len(system.procs) == 1  # no second try


def test_a_lost_session_fails_the_write_and_is_restarted(
    spawning: list[SpawningSystem],
) -> None:
    system = SpawningSystem(["die"] * SESSION_RESTARTS)
    spawning.append(system)
    b = backend(system)
    for i in range(SESSION_RESTARTS):
        with pytest.raises(SessionLost):
            b.apply_delta(JOIN)  # the outcome is unknown: the agent runs a full apply
        assert b.applied is None
        b.apply(STATE)
        assert len(system.procs) == i + 1
    writes = system.nft_writes()
    assert b.apply_delta(JOIN) is not None  # too many losses: nft -f from now on
    assert system.nft_writes() == writes + 1 and len(system.procs) == SESSION_RESTARTS


# --------------------------------------------------------------------------- the real worker


def test_the_worker_refuses_the_initial_namespace(
    monkeypatch: pytest.MonkeyPatch, sessions: list[NftSession]
) -> None:
    monkeypatch.setenv(REFUSE_ENV, "1")
    system = System(None)
    if not system.in_init_netns():
        pytest.skip("not in the initial network namespace")
    s = NftSession(system.spawn(nftsession.command()))
    sessions.append(s)
    with pytest.raises(DataplaneError, match="refusing the initial network namespace"):
        s.wait_ready()


@pytest.mark.root
@pytest.mark.parametrize(
    "request_bytes",
    [b"x\n", b"-1\n", b"99999999999\n", b"10\nshort", b"5\nab\0cd"],
    ids=["not-a-length", "negative", "huge", "short", "nul"],
)
def test_the_worker_refuses_bad_framing(scratch_ns: str, request_bytes: bytes) -> None:
    proc = System(scratch_ns).spawn(nftsession.command())
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert b'"ready": true' in proc.stdout.readline()
        proc.stdin.write(request_bytes)
        proc.stdin.close()
        assert b"framing error" in proc.stdout.readline()
        assert proc.wait(timeout=10) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.root
def test_the_worker_writes_in_its_namespace_only(scratch_ns: str) -> None:
    s = NftSession(System(scratch_ns).spawn(nftsession.command()))
    try:
        s.run("add table ip neti_session_test\n")
        listed = System(scratch_ns).run(["nft", "list", "tables"]).stdout
        assert "table ip neti_session_test" in listed
        with pytest.raises(DataplaneError, match="nft \\(session\\) failed"):
            s.run("delete table ip no_such_table\n")
        s.run("delete table ip neti_session_test\n")  # still usable after a refusal
    finally:
        s.close()
