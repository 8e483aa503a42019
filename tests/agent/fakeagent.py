"""Run the real agent (real ZooKeeper, real signals) with a kernel-free backend.

``python -m tests.agent.fakeagent neti.yml`` is ``neti agent -c neti.yml`` except that the
dataplane is a recorder: the lifecycle tests need no root and no namespace. Each apply is
appended to ``<state_dir>/applied.jsonl`` (members' overlay IPs), so a test can tell what
the agent would have programmed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from neti.dataplane.base import ApplyResult


class RecordingBackend:
    name = "recording"
    system = None  # no conntrack priming

    def __init__(self, state_dir: str):
        self.out = Path(state_dir) / "applied.jsonl"

    def apply(self, desired: Any, generation: int | None = None) -> ApplyResult:
        dnat = sorted(str(d.overlay_ip) for d in getattr(desired, "dnat", ()) or ())
        with self.out.open("a") as f:
            f.write(json.dumps({"at": time.time(), "dnat": dnat}) + "\n")
        return ApplyResult(backend=self.name, changed=True)

    def apply_delta(self, delta: Any, generation: int | None = None) -> ApplyResult | None:
        return None  # no element updates: every change is recorded as a full apply

    def keep_open(self) -> None:
        pass

    def close(self) -> None:
        pass


def main(argv: list[str]) -> int:
    from neti import config, dataplane
    from neti.cli import main as cli_main

    cfg = config.load(argv[0])
    backend = RecordingBackend(cfg.state_dir)
    dataplane.select = lambda *_a, **_k: backend  # type: ignore[assignment]
    return cli_main(["agent", "-c", argv[0]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
