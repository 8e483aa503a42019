"""The ZooKeeper session kept across a restart: ``<state_dir>/session.json`` (mode 0600).

A SIGTERM'd agent leaves its session open (the server keeps it, and our member node, for
zk_session_timeout); the next agent resumes it with the id and password saved here, so a
planned restart never takes this host out of its peers' rules (docs/operations.md
"Stopping and restarting"). The password lets anyone holding it act as this host's session:
the file is written 0600, atomically, and read back with strict types.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from neti import files

FILENAME = "session.json"
MAX_BYTES = 4096


@dataclass(frozen=True)
class SavedSession:
    session_id: int
    password: bytes
    hosts: str  # the zk_hosts it belongs to: another ensemble never sees it
    saved_at: float  # epoch seconds the agent last held it (the file's mtime if later)
    timeout: float  # the session timeout it was negotiated with, in seconds

    def fresh(self, now: float | None = None) -> bool:
        """Could the server still hold it? (It expires a timeout after we were last heard.)"""
        now = time.time() if now is None else now
        return 0 <= now - self.saved_at < self.timeout


def path_for(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / FILENAME


def save(state_dir: str | os.PathLike[str], session: SavedSession) -> None:
    """Atomically write the session file, 0600 from the start (never readable by others)."""
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o755)
    data = json.dumps(
        {
            "session_id": session.session_id,
            "password": session.password.hex(),
            "hosts": session.hosts,
            "saved_at": session.saved_at,
            "timeout": session.timeout,
        }
    ).encode()
    files.replace_atomic(d / FILENAME, data, 0o600, sync_dir=False)


def load(state_dir: str | os.PathLike[str]) -> SavedSession | None:
    """The saved session, or None if there is none or it is unusable (never raises for a
    damaged or hostile file: a fresh session is always a safe answer)."""
    p = path_for(state_dir)
    try:
        st = p.lstat()
        if not p.is_file() or p.is_symlink() or st.st_size > MAX_BYTES:
            return None
        if st.st_mode & 0o077:
            return None  # readable by others: someone else may have written or read it
        raw = json.loads(p.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    sid, pw, hosts = raw.get("session_id"), raw.get("password"), raw.get("hosts")
    saved_at, timeout = raw.get("saved_at"), raw.get("timeout")
    if not (isinstance(sid, int) and not isinstance(sid, bool) and 0 < sid < 2**64):
        return None
    if not (isinstance(pw, str) and len(pw) == 32):
        return None
    try:
        password = bytes.fromhex(pw)
    except ValueError:
        return None
    if not isinstance(hosts, str) or len(hosts) > 2048:
        return None
    nums = (saved_at, timeout)
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in nums):
        return None
    if not (0 < float(timeout) <= 3600) or float(saved_at) != float(saved_at):  # type: ignore[arg-type]
        return None
    # The running agent touches the file while connected (touch()): its mtime is the last
    # time the session was known alive, so a kill -9 after hours of uptime still resumes.
    held = max(float(saved_at), st.st_mtime)  # type: ignore[arg-type]
    return SavedSession(sid, password, hosts, held, float(timeout))  # type: ignore[arg-type]


def touch(state_dir: str | os.PathLike[str]) -> None:
    """Record "the session is alive now" cheaply (mtime only, no rewrite, no fsync)."""
    try:
        os.utime(path_for(state_dir))
    except OSError:
        pass


def clear(state_dir: str | os.PathLike[str]) -> None:
    """Forget the session (after leaving the fleet: it is closed, nothing to resume)."""
    try:
        path_for(state_dir).unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass
