"""An on-path TLS relay in a lab namespace, for tests/e2e/test_attacks_limits.py:

    python relay.py PORT CERT KEY UPSTREAM-HOST:PORT CA

Plays ZooKeeper on PORT with CERT/KEY (a host's certificate) and forwards to UPSTREAM with
the same certificate (tests/support/tlsrelay.py). Prints "ready", then serves until killed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.tlsrelay import tls_relay  # noqa: E402


def main() -> int:
    port, cert, key, upstream, ca = sys.argv[1:6]
    host, up_port = upstream.rsplit(":", 1)
    with tls_relay(cert, key, (host, int(up_port)), ca, (cert, key), ("0.0.0.0", int(port))):
        print("ready", flush=True)
        while True:
            time.sleep(1)


if __name__ == "__main__":
    raise SystemExit(main())
