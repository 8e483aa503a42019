"""bench.fleet: the synthetic-fleet driver's commands, and a real fill/add/remove in ZooKeeper."""

from __future__ import annotations

import io
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from bench.fleet import MAX_FILL, Command, CommandError, SyntheticFleet, parse_command, serve
from neti.fleet.names import decode_member
from neti.registry.paths import Paths
from tests.support.zkserver import ZooKeeperServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("line", "want"),
    [
        ("fill 20", Command("fill", 20)),
        ("  fill   16000  \n", Command("fill", 16000)),
        ("add", Command("add")),
        ("remove\n", Command("remove")),
        ("quit", Command("quit")),
        ("", None),
        ("   \n", None),
    ],
)
def test_commands_parse(line: str, want: Command | None) -> None:
    assert parse_command(line) == want


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("launch", "unknown command 'launch'"),
        ("fill -1", "'-1' is not a whole number"),
        ("fill abc", "'abc' is not a whole number"),
        ("fill 0", "out of range"),
        (f"fill {MAX_FILL + 1}", "out of range"),
        ("fill 99999999999999999999", "out of range"),
        ("fill 1e5", "not a whole number"),
        ("fill 0x10", "not a whole number"),
        ("fill", "one number"),
        ("fill 1 2", "one number"),
        ("fill ²", "not a whole number"),
        ("add 3", "add takes no arguments"),
        ("x" * 500, "too long"),
    ],
)
def test_hostile_lines_are_one_clear_error(line: str, says: str) -> None:
    with pytest.raises(CommandError) as err:
        parse_command(line)
    assert says in str(err.value)
    assert "\n" not in str(err.value)


@given(st.text(max_size=300))
def test_any_line_parses_or_is_refused_cleanly(line: str) -> None:
    try:
        cmd = parse_command(line)
    except CommandError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 200
        return
    assert cmd is None or cmd.verb in ("fill", "add", "remove", "quit")
    if cmd is not None and cmd.verb == "fill":
        assert 1 <= cmd.n <= MAX_FILL


class _NoZooKeeper:
    """Refuses any call: hostile lines must never reach ZooKeeper."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"ZooKeeper touched: {name}")


def test_serve_answers_each_bad_line_with_one_error_line() -> None:
    paths = Paths(
        "/p", "/p/id-to-ip", "/p/ip-to-id", "/p/members", "/p/ip-map", "/p/maxchange", "/p/revoked"
    )
    fleet = SyntheticFleet(_NoZooKeeper(), paths, IPv4Network("10.128.0.0/16"))  # type: ignore[arg-type]
    out = io.StringIO()
    lines = io.StringIO("bogus\nfill -1\nfill abc\nfill 10000000\n\nremove\nquit\nadd\n")
    assert serve(fleet, lines, out) == 5
    replies = out.getvalue().splitlines()
    assert len(replies) == 5
    assert all(r.startswith("error: ") for r in replies)
    assert "no member added" in replies[-1]


def test_fill_refuses_more_members_than_the_subnet_holds() -> None:
    paths = Paths(
        "/p", "/p/id-to-ip", "/p/ip-to-id", "/p/members", "/p/ip-map", "/p/maxchange", "/p/revoked"
    )
    fleet = SyntheticFleet(_NoZooKeeper(), paths, IPv4Network("10.128.0.0/24"))  # type: ignore[arg-type]
    with pytest.raises(CommandError, match="do not fit"):
        fleet.fill(300)


def test_members_are_plausible_and_varied() -> None:
    paths = Paths(
        "/p", "/p/id-to-ip", "/p/ip-to-id", "/p/members", "/p/ip-map", "/p/maxchange", "/p/revoked"
    )
    subnet = IPv4Network("10.128.0.0/16")
    fleet = SyntheticFleet(_NoZooKeeper(), paths, subnet, network="near", seed=1)  # type: ignore[arg-type]
    members = [fleet.new_member() for _ in range(2000)]
    assert len({m.instance_id for m in members}) == 2000
    assert len({m.overlay_ip for m in members}) == 2000
    assert len({m.public_ip for m in members}) == 2000
    assert all(m.overlay_ip in subnet and m.private_ip not in subnet for m in members)
    near = sum(m.network == "near" for m in members)
    assert 200 < near < 800  # some in the agent's network, most elsewhere
    for m in members:  # every name round-trips through the registry's codec
        assert decode_member(fleet.member_path(m).rsplit("/", 1)[1]) == m


@pytest.mark.zk
def test_driver_fills_adds_and_removes_in_a_real_zookeeper(
    zk_server: ZooKeeperServer, zk_prefix: str, zk_client: object, tmp_path: Path
) -> None:
    cfg = tmp_path / "neti.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "zk_hosts": {"near": [zk_server.hosts]},
                "zk_prefix": zk_prefix,
                "overlay_subnet": "10.128.0.0/16",
                "identity": {
                    "source": "static",
                    "instance_id": "i-0bench0000000001",
                    "network": "near",
                    "private_ip": "10.250.0.2",
                    "public_ip": "52.250.0.2",
                },
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "-c", str(cfg), "--seed", "7"],
        input="fill 20\nadd\nadd\nremove\nfill abc\nquit\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    replies = proc.stdout.splitlines()
    assert replies[0] == "filled 20"
    added = [IPv4Address(replies[1]), IPv4Address(replies[2])]
    assert IPv4Address(replies[3]) == added[1]  # remove: the last added
    assert replies[4].startswith("error: fill: 'abc'")
    assert len(replies) == 5
    assert "Traceback" not in proc.stderr
    # The claims stay (22); the session closed at quit, so the member nodes went with it.
    zk = zk_client
    ids = zk.get_children(f"{zk_prefix}/id-to-ip")  # type: ignore[attr-defined]
    ips = zk.get_children(f"{zk_prefix}/ip-to-id")  # type: ignore[attr-defined]
    assert len(ids) == len(ips) == 22
    for iid in ids:
        data, _ = zk.get(f"{zk_prefix}/id-to-ip/{iid}")  # type: ignore[attr-defined]
        owner, _ = zk.get(f"{zk_prefix}/ip-to-id/{data.decode()}")  # type: ignore[attr-defined]
        assert owner.decode() == iid
    assert {str(a) for a in added} <= set(ips)
    assert zk.get_children(f"{zk_prefix}/members") == []  # type: ignore[attr-defined]


@pytest.mark.zk
def test_members_are_live_while_the_driver_runs(
    zk_server: ZooKeeperServer, zk_prefix: str, zk_client: object, tmp_path: Path
) -> None:
    cfg = tmp_path / "neti.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "zk_hosts": {"near": [zk_server.hosts]},
                "zk_prefix": zk_prefix,
                "overlay_subnet": "10.128.0.0/16",
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.fleet", "-c", str(cfg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("fill 20\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "filled 20"
        proc.stdin.write("add\n")
        proc.stdin.flush()
        added = IPv4Address(proc.stdout.readline().strip())
        proc.stdin.write("add\nremove\n")
        proc.stdin.flush()
        second = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == second
        zk = zk_client
        names = zk.get_children(f"{zk_prefix}/members")  # type: ignore[attr-defined]
        members = [decode_member(n) for n in names]
        assert len(members) == 21
        assert added in {m.overlay_ip for m in members}
        assert IPv4Address(second) not in {m.overlay_ip for m in members}
        for m in members:  # each member's claim pair names it
            data, _ = zk.get(f"{zk_prefix}/id-to-ip/{m.instance_id}")  # type: ignore[attr-defined]
            assert data.decode() == str(m.overlay_ip)
            owner, _ = zk.get(f"{zk_prefix}/ip-to-id/{m.overlay_ip}")  # type: ignore[attr-defined]
            assert owner.decode() == m.instance_id
            _, stat = zk.get(f"{zk_prefix}/members/{names[members.index(m)]}")  # type: ignore[attr-defined]
            assert stat.ephemeralOwner != 0
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _size(n: int, join_bytes: float) -> dict[str, object]:
    change = {
        "bytes_per_change_median": join_bytes,
        "cpu_s_per_change_median": 0.5,
        "write_to_kernel_median_s": 0.9,
    }
    return {
        "members": n,
        "join": change,
        "leave": change,
        "idle": {"bytes_per_minute": 1.08e6, "cpu_s_per_minute": 0.3},
        "burst": {
            "joins": 1000,
            "bytes": 5e7,
            "full_lists": 20.0,
            "converge_s_from_first_write": 14.0,
            "exact": True,
            "missing": 0,
            "extra": 0,
            "cpu_s": 9.0,
        },
        "fleet": {
            "bytes_per_change": n * join_bytes,
            "bytes_per_idle_minute": n * 1.08e6,
            "bytes_per_idle_second": n * 1.08e6 / 60,
        },
    }


def test_control_report_and_side_by_side() -> None:
    from bench import control

    result = {
        "sizes": {"1000": _size(1000, 131e3), "16000": _size(16000, 2.16e6)},
        "machine": {
            "cpu": "x",
            "cores": 2,
            "kernel": "k",
            "zookeeper": "3.8",
            "iptables": "i",
            "loadavg": ["1", "1", "1"],
        },
        "config": {
            "backend": "iptables",
            "resync_interval": 60.0,
            "watch_delay_min": 0.2,
            "watch_delay_max": 1.0,
            "zk_session_timeout": 10.0,
        },
        "agent_tree": "/t",
        "agent_commit": "abc",
        "changes": 10,
        "idle_s": 180.0,
    }
    text = control.markdown(result)
    assert "| bytes ZooKeeper sends the agent (join) | 131.0 KB | 2.16 MB |" in text
    assert "34.6 GB" in text  # 16,000 agents x 2.16 MB
    after = {**result, "agent_commit": "def", "sizes": {"16000": _size(16000, 4e3)}}
    side = control.compare(result, after)
    assert "| bytes ZooKeeper sends the agent (join) | 2.16 MB | 4.0 KB |" in side
    assert "Before: abc; after: def." in side


def test_control_expects_each_member_at_its_reachable_address() -> None:
    from bench import control
    from neti.fleet.model import Member
    from neti.fleet.names import encode_member

    def name(iid: str, network: str, overlay: str) -> str:
        m = Member(iid, network, IPv4Address("52.1.1.1"), IPv4Address("10.16.0.1"),
                   IPv4Address(overlay), "bench")  # fmt: skip
        return encode_member(m)

    names = [
        name("i-near", control.NETWORK, "10.128.0.5"),
        name("i-far", "bench-far", "10.128.0.6"),
        name(control.AGENT_ID, control.NETWORK, "10.128.0.7"),
    ]
    assert control.expected_mappings(names, "10.128.0.7") == {
        "10.128.0.5": "10.16.0.1",
        "10.128.0.6": "52.1.1.1",
        "10.128.0.7": control.AGENT_ADDR,
    }
