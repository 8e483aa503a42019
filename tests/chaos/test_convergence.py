"""The kernel comes back to the fleet and ``neti status`` tells the truth: under churn, with
a full state_dir, while another program holds the xtables lock, under a rate of events that
used to starve the resync, with a foreign rule ahead of Neti's, and after kill -9.

Synthetic members come from bench.fleet (the lab's registry is open), run in the operator's
host; each scenario removes its own before it ends, and ends with every host's kernel
equal to the fleet (``wait_kernel_equals_fleet``). Measured figures go into the report's
notes (printed at the end of the run; docs/operations.md quotes them).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from neti.lab.demo import wait_for
from neti.lab.ensemble import EnsembleLab
from neti.lab.netns import LabError
from tests.chaos.harness import settled

pytestmark = [pytest.mark.chaos, pytest.mark.root, pytest.mark.zk, pytest.mark.timeout(420)]

STOP_DEADLINE = 10.0  # docs/operations.md promises 5 s; slack for a loaded machine
ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


class Synthetic:
    """bench.fleet in the operator's host: members that join and leave on command."""

    def __init__(self, lab: EnsembleLab):
        from bench.control import Driver

        host = lab.operator_host
        self.lab = lab
        # A new seed each time: claims outlive members, so instance IDs must not repeat.
        seed = random.randrange(2**31)
        self.driver = Driver(
            lab.topo.ns(host), lab.config_path(host), lab.workdir / "synthetic.log", seed=seed
        )
        self.alive: list[str] = []  # overlay IPs, oldest first

    def add(self) -> str:
        ip = self.driver.ask("add")
        self.alive.append(ip)
        return ip

    def remove(self) -> str:
        ip = self.driver.ask("remove")  # the one added last
        self.alive.remove(ip)
        return ip

    def close(self) -> None:
        while self.alive:  # one by one: a departure the guard lets through
            self.remove()
        self.driver.close()


@contextlib.contextmanager
def synthetic(lab: EnsembleLab) -> Iterator[Synthetic]:
    s = Synthetic(lab)
    try:
        yield s
    finally:
        s.close()


def status(lab: EnsembleLab, host: str, wrap: list[str] | None = None) -> dict[str, Any]:
    """``neti status --json`` in ``host`` (``wrap``: e.g. nsenter into the agent's mount
    namespace, where its state_dir is)."""
    if not wrap:
        return lab.status(host)[1]
    argv = [*wrap, *lab.neti_argv("status", "--json", "-c", str(lab.config_path(host)))]
    return dict(json.loads(lab.topo.run(host, argv, check=False).stdout))


def dnat(lab: EnsembleLab, host: str, tool: str = "iptables") -> set[str]:
    """Overlay IPs the host's kernel DNATs (Neti's nat chains)."""
    out = lab.topo.run(host, [f"{tool}-save", "-t", "nat"]).stdout
    return {
        line.split()[3].split("/")[0]
        for line in out.splitlines()
        if line.startswith("-A NETI-DNAT") and " -j DNAT " in line
    }


def allowed(lab: EnsembleLab, host: str) -> set[str]:
    out = lab.topo.run(host, ["ipset", "list", "-o", "save", "neti-allow"]).stdout
    return {x.split()[2] for x in out.splitlines() if x.startswith("add neti-allow ")}


def member_sources(lab: EnsembleLab, overlay: str) -> set[str]:
    """The private and public address of the member with ``overlay`` (one of them is what
    a host allows), as the registry lists it."""
    out = lab.neti(lab.operator_host, "members", "--json", check=True).stdout
    for m in json.loads(out)["members"]:
        if m["overlay_ip"] == overlay:
            return {m["private_ip"], m["public_ip"]}
    raise AssertionError(f"no member with overlay IP {overlay}")


def kernel_equals_fleet(lab: EnsembleLab, extra: int = 0) -> bool:
    """Every agent settled on exactly the agent hosts (plus ``extra`` synthetic members)
    and its kernel equal, generation for generation, to the fleet it applied."""
    if extra == 0 and not settled(lab):
        return False
    for h in lab.agent_hosts:
        k = status(lab, h)["kernel"] or {}
        if not k.get("matches") or k.get("not_compared"):
            return False
        st = lab.state(h) or {}
        if len(st.get("fleet") or []) != len(lab.agent_hosts) + extra:
            return False
    return True


def wait_kernel_equals_fleet(lab: EnsembleLab, what: str, timeout: float = 90.0) -> None:
    try:
        wait_for(
            f"every kernel to equal the fleet {what}", lambda: kernel_equals_fleet(lab), timeout
        )
    except LabError as exc:
        seen = {h: status(lab, h)["summary"] for h in lab.agent_hosts}
        logs = "\n".join(f"--- {h}\n{lab.agent_log(h)[-1500:]}" for h in lab.agent_hosts)
        raise LabError(f"{exc}: {seen}\n{logs}") from None


# Synthetic members come and go faster than the guard's defaults allow in a fleet of five
# (one removal a minute): for these scenarios a departure is routine, not a mass removal.
RELAXED = {"guard_fraction": 1.0, "guard_window": 0}


def reconfigure(lab: EnsembleLab, hosts: tuple[str, ...], **overrides: Any) -> None:
    """Rewrite the hosts' configs (RELAXED plus ``overrides``) and SIGHUP their agents."""
    for h in hosts:
        lab.write_config(h, **{**RELAXED, **overrides})
        lab.signal_agent(h, signal.SIGHUP)


@pytest.fixture(autouse=True)
def relaxed_guard(fleet: EnsembleLab) -> Iterator[None]:
    fleet.set_max_change(1000)
    reconfigure(fleet, fleet.agent_hosts)
    yield
    # Back to the lab's own guard; a release forgets the scenario's removals (the tighter
    # window would put them back), then every kernel must equal the fleet again.
    fleet.set_max_change(20)
    for h in fleet.agent_hosts:
        if fleet.agents.get(h) is not None:
            fleet.write_config(h)
            fleet.signal_agent(h, signal.SIGHUP)
    time.sleep(1.0)
    fleet.neti(fleet.operator_host, "fleet", "release-guard", check=True)
    wait_kernel_equals_fleet(fleet, "with the guard back to its defaults")


def stop(lab: EnsembleLab, host: str, sig: int = signal.SIGTERM) -> float:
    """Signal the agent and wait for it; the seconds it took (a hang fails the test)."""
    proc = lab.agents.pop(host)
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(STOP_DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"the agent on {host} still ran {STOP_DEADLINE:g}s after signal {sig}")
    return time.monotonic() - t0


def start_wrapped(
    lab: EnsembleLab, host: str, wrap: list[str], env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """lab.start_agent with ``wrap`` (e.g. nsenter into a mount namespace) before neti."""
    log = open(lab.log_path(host), "a")  # noqa: SIM115 - the child keeps it
    argv = [*wrap, *lab.neti_argv("agent", "-c", str(lab.config_path(host)))]
    proc = lab.topo.spawn(
        host, argv, stdout=log, stderr=subprocess.STDOUT, env={**lab.env, **(env or {})}
    )
    log.close()
    lab.agents[host] = proc
    return proc


def started(
    lab: EnsembleLab, host: str, wrap: list[str] | None = None, timeout: float = 30.0
) -> dict[str, Any]:
    """Wait until status names the new agent as running; its last report."""
    proc = lab.agents[host]

    def check() -> dict[str, Any] | None:
        doc = status(lab, host, wrap)
        agent = doc["agent"]
        return doc if agent["pid"] == proc.pid and agent["running"] else None

    return wait_for(f"the agent on {host} to report itself", check, timeout)


# --------------------------------------------------------------------------- scenarios


def test_status_sampled_under_churn_is_never_critical(fleet: EnsembleLab, harness) -> None:
    """Members join and leave at 5 a second while every host's status is sampled: the
    kernel is always ahead of the state file by a change or two, and that is never drift."""
    hosts = fleet.agent_hosts
    h = harness()
    samples: list[tuple[str, str, str]] = []
    stop_churn = threading.Event()
    done = [0]
    try:
        with synthetic(fleet) as syn:

            def churn() -> None:
                t = time.monotonic()
                while not stop_churn.is_set():
                    syn.add() if not syn.alive else syn.remove()
                    done[0] += 1
                    t += 0.2
                    time.sleep(max(0.0, t - time.monotonic()))

            worker = threading.Thread(target=churn, daemon=True)
            worker.start()
            time.sleep(2.0)
            t0 = time.monotonic()
            for i in range(40):
                host = hosts[i % len(hosts)]
                doc = status(fleet, host)
                samples.append((host, doc["status"], doc["summary"]))
            seconds = time.monotonic() - t0
            stop_churn.set()
            worker.join(30)
        critical = [s for s in samples if s[1] == "CRITICAL"]
        for text, n in collections.Counter(s[2] for s in samples if s[1] != "OK").items():
            h.note(f"{n} x {text[:200]}")
        h.note(
            f"{len(samples)} status samples under {done[0] / (seconds + 2):.1f} changes/s: "
            f"{sum(s[1] == 'OK' for s in samples)} OK, "
            f"{sum(s[1] == 'WARNING' for s in samples)} WARNING, {len(critical)} CRITICAL"
        )
        assert critical == [], critical
    finally:
        stop_churn.set()
    wait_kernel_equals_fleet(fleet, "after the churn")
    h.finish()


def test_kill9_and_a_resumed_session_converge_within_seconds(fleet: EnsembleLab, harness) -> None:
    """kill -9; one member leaves and one joins while the agent is down; the restart
    resumes the session, so no grace holds the departure back."""
    host = "ec2b"
    h = harness()
    with synthetic(fleet) as syn:
        gone = syn.add()
        wait_for("the member in ec2b's kernel", lambda: gone in dnat(fleet, host), 30)
        time.sleep(1.0)
        stop(fleet, host, signal.SIGKILL)
        syn.remove()
        new = syn.add()
        t0 = time.monotonic()
        fleet.start_agent(host)
        wait_for(
            "ec2b's kernel to equal the fleet after the restart",
            lambda: new in (k := dnat(fleet, host)) and gone not in k,
            30,
            interval=0.05,
        )
        took = time.monotonic() - t0
        h.note(f"kill -9 + restart: {host}'s kernel equal to the fleet {took:.2f}s after start")
        log = fleet.agent_log(host)
        assert "session resumed: no grace" in log, log[-2000:]
    wait_kernel_equals_fleet(fleet, "after kill -9")
    rep = h.finish()
    assert rep.failed_without([host]) == 0, rep.render()


def test_a_resync_under_constant_events_still_repairs_drift(fleet: EnsembleLab, harness) -> None:
    """A member joins or leaves every 3 s, faster than the resync interval; someone deletes
    an allowlist entry meanwhile. The resync runs on its own clock and repairs it."""
    host, peer = "vpc1", "vpc2"
    resync = 8.0
    reconfigure(fleet, (host,), resync_interval=resync)
    h = harness(hosts=[host])
    stop_churn = threading.Event()
    try:
        with synthetic(fleet) as syn:

            def churn() -> None:
                while not stop_churn.wait(3.0):
                    syn.add() if not syn.alive else syn.remove()

            worker = threading.Thread(target=churn, daemon=True)
            worker.start()
            time.sleep(4.0)
            source = fleet.topo.host(peer).private_ip  # same network: allowed by private IP
            fleet.topo.run(host, ["ipset", "del", "neti-allow", str(source)])
            t0 = time.monotonic()

            def repaired() -> bool:
                out = fleet.topo.run(
                    host, ["ipset", "test", "neti-allow", str(source)], check=False
                )
                return out.returncode == 0

            wait_for("the deleted allowlist entry to come back", repaired, resync * 3 + 10)
            took = time.monotonic() - t0
            stop_churn.set()
            worker.join(10)
        h.note(f"drift repaired {took:.1f}s after it was made (resync_interval {resync:g}s)")
        assert took <= resync * 2 + 5, took  # within one resync period plus slack
    finally:
        stop_churn.set()
        reconfigure(fleet, (host,))
    wait_kernel_equals_fleet(fleet, "after the starvation scenario")
    h.finish()


def test_a_foreign_rule_ahead_of_neti_is_named_and_chain_position_first_wins(
    fleet: EnsembleLab, harness
) -> None:
    host, peer = "vpc1", "vpc2"
    source = str(fleet.topo.host(peer).private_ip)
    drop = ["-I", "INPUT", "1", "-s", f"{source}/32", "-j", "DROP"]
    h = harness(streams=[(peer, host)])
    fleet.topo.run(host, ["iptables", "-w", *drop])
    try:
        doc = status(fleet, host)
        assert doc["status"] == "WARNING", doc["summary"]
        ahead = doc["kernel"]["rules_ahead"]
        assert ahead == [f'filter INPUT rule 1 "-s {source}/32 -j DROP" can drop what Neti allows']
        reconfigure(fleet, (host,), chain_position="first")
        wait_for(
            "Neti's jump back on top (the warning gone)",
            lambda: status(fleet, host)["kernel"]["rules_ahead"] == [],
            30,
        )
        rules = fleet.topo.run(host, ["iptables", "-w", "-S", "INPUT"]).stdout.splitlines()
        assert rules[1:3] == ["-A INPUT -j NETI-INPUT", f"-A INPUT -s {source}/32 -j DROP"]
        h.note("the foreign DROP was named by status, then put behind Neti by chain_position")
    finally:
        fleet.topo.run(host, ["iptables", "-w", "-D", "INPUT", "-s", f"{source}/32", "-j", "DROP"])
        reconfigure(fleet, (host,))
    wait_kernel_equals_fleet(fleet, "after the foreign rule")
    h.finish()


def test_a_full_state_dir_is_named_and_status_recovers_within_seconds(
    fleet: EnsembleLab, harness
) -> None:
    """ec2a's state_dir on a 1 MiB tmpfs in a private mount namespace, filled up: status
    names the error (not drift, not a dead agent, also after a restart), and is OK again
    within seconds of the space coming back."""
    host = "ec2a"
    state = fleet.state_dir(host)
    keep = fleet.workdir / f"{host}-state-copy"
    h = harness()
    stop(fleet, host)  # SIGTERM: the session stays, the restart below resumes it
    holder = fleet.topo.spawn(
        host,
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mkdir -p {keep} && cp -a {state}/. {keep}/ && "
            f"mount -t tmpfs -o size=1m neti-full {state} && cp -a {keep}/. {state}/ && "
            "echo ok && exec sleep 3600",
        ],
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
    inside = ["nsenter", "-t", str(holder.pid), "-m", "--"]
    try:
        start_wrapped(fleet, host, inside)
        started(fleet, host, inside)
        wait_for("ec2a OK on the tmpfs", lambda: status(fleet, host, inside)["status"] == "OK", 45)
        fill = " ; ".join(
            f"dd if=/dev/zero of={state}/fill{i} bs={b}" for i, b in enumerate(("64k", "4k", "512"))
        )
        fleet.topo.run(host, [*inside, "sh", "-c", fill + " ; true"])
        with synthetic(fleet) as syn:
            # A journal line may still fit in its file's last page (tmpfs needs no new block
            # for it), so the first few changes can be saved; the next one that is not
            # must be named.
            doc: dict[str, Any] = {}
            for _ in range(40):
                ip = syn.add()
                wait_for("the member in ec2a's kernel", lambda ip=ip: ip in dnat(fleet, host), 30)
                doc = status(fleet, host, inside)
                if doc["status"] != "OK":
                    break
            h.note(f"state_dir full: {doc['status']} {doc['summary']} ({len(syn.alive)} joins)")
            assert doc["status"] == "WARNING", doc["summary"]
            assert "state file not written: No space left on device" in doc["summary"]
            stop(fleet, host)
            start_wrapped(fleet, host, inside)
            doc = started(fleet, host, inside)  # running: its state file names the old pid
            h.note(f"state_dir full, after a restart: {doc['status']} {doc['summary']}")
            assert doc["status"] == "WARNING", doc["summary"]
            fleet.topo.run(host, [*inside, "sh", "-c", f"rm -f {state}/fill*"])
            t0 = time.monotonic()
            wait_for(
                "ec2a's status OK after space came back",
                lambda: status(fleet, host, inside)["status"] == "OK",
                60,
                interval=0.2,
            )
            h.note(f"status OK {time.monotonic() - t0:.1f}s after the space came back")
            syn.remove()
        # Back to the lab's own directory, carrying the state over.
        stop(fleet, host)
        fleet.topo.run(host, [*inside, "cp", "-a", f"{state}/.", f"{keep}/"])
    finally:
        if host in fleet.agents:
            stop(fleet, host, signal.SIGKILL)
        holder.kill()
        holder.wait(10)
        # Back in the lab's own state_dir, whatever happened above: the next test needs it.
        subprocess.run(["cp", "-a", f"{keep}/.", f"{state}/"], check=True)
        fleet.start_agent(host)
    wait_kernel_equals_fleet(fleet, "after the full state_dir")
    h.finish()


@contextlib.contextmanager
def xtables_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def test_a_held_xtables_lock_delays_a_change_whole_and_never_a_stop(
    fleet: EnsembleLab, harness
) -> None:
    """vpc2 on iptables-legacy, with another program holding the xtables lock (a private
    lock file through XTABLES_LOCKFILE): a joining member is neither allowed nor DNAT'd until
    the lock is free, then both; status says what is going on; SIGTERM does not wait."""
    host = "vpc2"
    lockfile = fleet.workdir / "xtables-vpc2.lock"
    lockfile.touch()
    env = {"XTABLES_LOCKFILE": str(lockfile)}
    h = harness(hosts=[x for x in fleet.agent_hosts if x != host])
    stop(fleet, host)
    fleet.neti(host, "uninstall", check=True)
    fleet.topo.run(host, ["iptables-legacy", "-w", "-N", "NETI-INPUT"])  # legacy wins detection
    try:
        fleet.start_agent(host, env=env)
        wait_for("vpc2 to settle on iptables-legacy", lambda: settled(fleet), 45)
        assert dnat(fleet, host, "iptables-legacy")
        with synthetic(fleet) as syn:
            with xtables_lock(lockfile):
                ip = syn.add()
                sources = member_sources(fleet, ip)
                time.sleep(3.0)  # the agent's write waits on the lock meanwhile
                assert ip not in dnat(fleet, host, "iptables-legacy")
                assert not sources & allowed(fleet, host), "allowed without its DNAT"
                doc = status(fleet, host)
                h.note(f"vpc2 with the xtables lock held: {doc['status']} {doc['summary']}")
                assert doc["status"] != "CRITICAL", doc["summary"]
                took = stop(fleet, host)
                h.note(f"SIGTERM while a write waited on the xtables lock: {took:.2f}s")
                assert took <= STOP_DEADLINE
                fleet.start_agent(host, env=env)
                time.sleep(2.0)
            wait_for(
                "the member in vpc2's kernel, allowed and DNAT'd, once the lock is free",
                lambda: (
                    ip in dnat(fleet, host, "iptables-legacy")
                    and bool(sources & allowed(fleet, host))
                ),
                40,
            )
            syn.remove()
        stop(fleet, host)
    finally:
        if host in fleet.agents:
            stop(fleet, host, signal.SIGKILL)
        fleet.neti(host, "uninstall")
    fleet.start_agent(host)
    wait_kernel_equals_fleet(fleet, "after the held lock")
    h.finish()
