"""A stand-in agent for tests: claim an overlay IP, join the fleet, stay until stdin closes.

python -m tests.dataplane.member NETI_YML
"""

from __future__ import annotations

import sys

from neti import config
from neti.identity.source import resolve
from neti.registry import connect


def main(path: str) -> int:
    cfg = config.load(path)
    ident = resolve(cfg)
    reg = connect(cfg, ident.network, timeout=30)
    try:
        overlay = reg.claim(ident.instance_id)
        reg.join(ident, overlay)
        print(f"joined {overlay}", flush=True)
        sys.stdin.read()  # until the test closes our stdin (or kills us)
    finally:
        reg.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
