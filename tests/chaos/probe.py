"""The chaos suite's eyes inside a lab host (stdlib only: runs with ``python -I``).

    python probe.py watch INTERVAL            # the host's kernel view, one JSON line per change
    python probe.py stream RATE TIMEOUT NAME IP:PORT   # TCP connects, one JSON line each

``watch`` reads Neti's DNAT rules (``iptables-save -t nat``, chains NETI-DNAT*) and the
``neti-allow`` ipset every INTERVAL seconds and prints ``{"t", "dnat", "allow"}`` when either
differs from the last reading (the first reading is always printed). ``stream`` connects to
IP:PORT RATE times a second (a lab name server answers "NAME PEER"), each attempt bounded by
TIMEOUT, and prints ``{"t", "ok", "err"}``; an answer from another name counts as a failure.
Both run until killed.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time


def _read(argv: list[str]) -> tuple[bool, str]:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return r.returncode == 0, r.stdout


def snapshot() -> dict[str, object]:
    ok, nat = _read(["iptables-save", "-t", "nat"])
    dnat = sorted(line for line in nat.splitlines() if line.startswith("-A NETI-DNAT"))
    sok, sets = _read(["ipset", "list", "-o", "save", "neti-allow"])
    allow = sorted(
        line.split()[2] for line in sets.splitlines() if line.startswith("add neti-allow ")
    )
    return {
        "dnat": dnat if ok else None,
        # No set at all (never installed, or removed) reads as None, not as empty.
        "allow": allow if sok else None,
    }


def watch(interval: float) -> None:
    last: dict[str, object] | None = None
    while True:
        t = time.time()
        snap = snapshot()
        if snap != last:
            print(json.dumps({"t": t, **snap}), flush=True)
            last = snap
        time.sleep(max(0.0, interval - (time.time() - t)))


def attempt(target: str, name: str, timeout: float) -> str | None:
    """None when ``name`` answered at ``target``, else what went wrong."""
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        return type(exc).__name__ + (f": {exc.strerror}" if exc.strerror else "")
    answer = data.decode(errors="replace").split()
    if not answer or answer[0] != name:
        return f"wrong answer {' '.join(answer)!r}"
    return None


def stream(rate: float, timeout: float, name: str, target: str) -> None:
    period = 1.0 / rate
    nxt = time.monotonic()
    while True:
        t = time.time()
        err = attempt(target, name, timeout)
        print(json.dumps({"t": t, "ok": err is None, "err": err}), flush=True)
        nxt += period
        now = time.monotonic()
        if nxt < now:  # a slow attempt: keep the rate from here on, do not burst
            nxt = now
        time.sleep(nxt - now)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "watch":
        watch(float(argv[1]))
        return 0
    if len(argv) == 5 and argv[0] == "stream":
        stream(float(argv[1]), float(argv[2]), argv[3], argv[4])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
