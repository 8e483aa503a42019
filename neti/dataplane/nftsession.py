"""One long-lived libnftables context for a long-running writer (the agent's element updates).

Why: ``nft -f`` that deletes elements waits at exit: closing its netlink socket makes the
kernel flush the transaction's deferred release (``synchronize_rcu``), ~12 ms on a busy
fleet-sized table, on every member that leaves. A context that stays open pays none of it (the
release runs in the background) - 0.1 ms for the same two elements (docs/performance.md).

The context lives in a small worker process, ``python -m neti.dataplane.nftsession``, started
through ``System.spawn`` like any other command: it runs in the System's network namespace
(``ip netns exec`` for a named one), never in this process, so a test's namespace stays the
only one it can touch, and a kernel-free System (no ``spawn``) simply keeps ``nft -f``. The
worker refuses the initial namespace when ``NETI_REFUSE_INIT_NETNS=1``, as ``System`` does.

Protocol (bytes on the worker's stdin/stdout): the worker first prints one JSON line,
``{"ready": true}`` or ``{"error": "..."}``; then per request the client writes
``<length>\\n<script>`` and the worker answers ``{"rc": int, "err": str}``. Every read and
write has a deadline; a worker that does not take a script or answer in time is killed and
the write counts as failed (the caller repairs with a full apply, as after any failed
element update). A ``cancel`` callable (the System's abort flag) ends a wait early.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from neti.dataplane.system import POLL, REFUSE_ENV, Aborted, in_init_netns
from neti.errors import DataplaneError

log = logging.getLogger(__name__)

LIBRARY = "libnftables.so.1"
START_TIMEOUT = 10.0  # python start-up and the library load, on a busy host
WRITE_TIMEOUT = 30.0  # one element update (a whole table passes its own, longer deadline)
MAX_SCRIPT = 64 * 1024 * 1024  # the worker refuses longer requests (a framing error)


class SessionLost(DataplaneError):
    """The worker ended or did not answer in time: the write's outcome is unknown."""


class NftSession:
    """Client side: ``run(script)`` writes one ``nft -f`` script as one transaction."""

    def __init__(self, proc: subprocess.Popen[bytes]):
        self.proc = proc
        self._buf = b""
        self.ready = False
        if proc.stdin is not None:
            os.set_blocking(proc.stdin.fileno(), False)  # writes have a deadline too

    # --- lines with a deadline ---
    def _check(self, deadline: float, cancel: Callable[[], bool] | None, what: str) -> float:
        """Seconds to wait next (at most POLL with ``cancel``); closes and raises when the
        deadline passed or ``cancel()`` says stop."""
        if cancel is not None and cancel():
            self.close()
            raise Aborted("nft session write abandoned: stopping")
        left = deadline - time.monotonic()
        if left <= 0:
            self.close()
            raise SessionLost(f"the nft session did not {what} in time")
        return min(left, POLL) if cancel is not None else left

    def _line(self, deadline: float, cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
        out = self.proc.stdout
        assert out is not None
        fd = out.fileno()
        while b"\n" not in self._buf:
            wait = self._check(deadline, cancel, "answer")
            readable, _, _ = select.select([fd], [], [], wait)
            if not readable:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self.close()
                raise SessionLost("the nft session ended")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return parse_reply(line)
        except SessionLost:
            self.close()
            raise

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Block until the worker has loaded libnftables; DataplaneError when it cannot."""
        if self.ready:
            return
        msg = self._line(time.monotonic() + timeout)
        if msg.get("ready") is not True:
            self.close()
            raise DataplaneError(f"nft session: {msg.get('error') or 'did not start'}")
        self.ready = True

    def run(
        self,
        script: str,
        timeout: float = WRITE_TIMEOUT,
        cancel: Callable[[], bool] | None = None,
    ) -> None:
        """Run ``script`` as one transaction; DataplaneError with nft's message on failure
        (Aborted when ``cancel()`` turned true while waiting)."""
        self.wait_ready()
        data = script.encode()
        deadline = time.monotonic() + timeout
        self._send(b"%d\n" % len(data) + data, deadline, cancel)
        msg = self._line(deadline, cancel)
        try:
            check_result(msg)
        except SessionLost:
            self.close()
            raise

    def _send(self, data: bytes, deadline: float, cancel: Callable[[], bool] | None = None) -> None:
        """Write all of ``data`` to the worker's stdin by ``deadline`` (a worker that stops
        reading must not hang the agent on a full pipe)."""
        inp = self.proc.stdin
        assert inp is not None
        fd = inp.fileno()
        view = memoryview(data)
        while view:
            wait = self._check(deadline, cancel, "take the script")
            _, writable, _ = select.select([], [fd], [], wait)
            if not writable:
                continue
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                continue
            except OSError:  # BrokenPipeError: the worker is gone
                self.close()
                raise SessionLost("the nft session ended") from None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """End the worker (closing its stdin ends it; kill it if it does not go)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def parse_reply(line: bytes) -> dict[str, Any]:
    """One line from the worker as a JSON object; SessionLost for anything else."""
    try:
        msg = json.loads(line)
    except ValueError:  # also UnicodeDecodeError
        raise SessionLost("the nft session answered something that is not JSON") from None
    if not isinstance(msg, dict):
        raise SessionLost("the nft session answered something that is not an object")
    return msg


def check_result(msg: dict[str, Any]) -> None:
    """A request's answer: nothing for success, DataplaneError with nft's first lines when
    nft refused the script, SessionLost when the answer has no return code."""
    rc, err = msg.get("rc"), msg.get("err")
    if not isinstance(rc, int) or isinstance(rc, bool):
        raise SessionLost("the nft session answered without a result")
    if rc != 0:
        lines = (err if isinstance(err, str) else "").strip().splitlines()
        detail = "; ".join(line[:300] for line in lines[:5]) or f"rc {rc}"
        raise DataplaneError(f"nft (session) failed: {detail}")


def command() -> list[str]:
    """The worker's argv (this interpreter, so the worker runs this copy of Neti)."""
    return [sys.executable, "-m", "neti.dataplane.nftsession"]


# --------------------------------------------------------------------------- the worker


def _reply(msg: dict[str, Any]) -> None:
    sys.stdout.buffer.write(json.dumps(msg).encode() + b"\n")
    sys.stdout.buffer.flush()


def serve() -> int:
    """Worker: one libnftables context, requests from stdin until it closes."""
    if os.environ.get(REFUSE_ENV) == "1" and in_init_netns():
        _reply({"error": f"refusing the initial network namespace ({REFUSE_ENV}=1 is set)"})
        return 2
    try:
        lib = ctypes.CDLL(LIBRARY)
    except OSError as exc:
        _reply({"error": f"cannot load {LIBRARY}: {exc}"})
        return 1
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        _reply({"error": "nft_ctx_new failed"})
        return 1
    lib.nft_ctx_buffer_output(ctx)
    lib.nft_ctx_buffer_error(ctx)
    _reply({"ready": True})
    stdin = sys.stdin.buffer
    while True:
        header = stdin.readline()
        if not header:
            return 0
        try:
            size = int(header)
        except ValueError:
            _reply({"rc": -1, "err": "framing error: expected a length"})
            return 1
        if not 0 <= size <= MAX_SCRIPT:
            _reply({"rc": -1, "err": f"framing error: length {size}"})
            return 1
        script = stdin.read(size)
        if len(script) != size or b"\0" in script:
            _reply({"rc": -1, "err": "framing error: short or NUL-bearing script"})
            return 1
        rc = lib.nft_run_cmd_from_buffer(ctx, script)
        lib.nft_ctx_get_output_buffer(ctx)  # drained: output is not part of the protocol
        err = lib.nft_ctx_get_error_buffer(ctx) or b""
        _reply({"rc": int(rc), "err": err.decode(errors="replace")})


if __name__ == "__main__":
    sys.exit(serve())
