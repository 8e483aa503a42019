"""A registry client for the proxy tests, run inside a lab host: ``python zkclient.py CFG NET``.

It claims and joins through the registry API (as the agent does), then answers one JSON line
per line read on stdin: its ZooKeeper state, session ID, every state it went through, and
whether its own member node is in the fleet.
"""

from __future__ import annotations

import json
import logging
import sys

from neti import config
from neti.identity.source import resolve
from neti.registry import connect


def main() -> int:
    # kazoo's connection log on stderr, with times: the test shows it when failover fails.
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(relativeCreated)6.0fms %(message)s"
    )
    cfg = config.load(sys.argv[1])
    network = sys.argv[2]
    me = resolve(cfg)
    reg = connect(cfg, network, timeout=20)
    logging.getLogger("kazoo").setLevel(logging.INFO)
    states: list[str] = []
    reg.client.add_listener(lambda s: states.append(str(s)))
    ip = reg.claim(me.instance_id)
    reg.join(me, ip)
    session = reg.client.client_id[0]
    print(json.dumps({"event": "joined", "overlay_ip": str(ip), "session": session}), flush=True)
    for _ in sys.stdin:
        try:
            ids = [m.instance_id for m in reg.read_fleet().members]
            err = ""
        except Exception as exc:  # noqa: BLE001 - reported to the test, which decides
            ids, err = [], str(exc)
        cid = reg.client.client_id
        out = {
            "state": str(reg.client.state),
            "session": cid[0] if cid else None,
            "states": states,
            "member": me.instance_id in ids,
            "error": err,
        }
        print(json.dumps(out), flush=True)
    reg.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
