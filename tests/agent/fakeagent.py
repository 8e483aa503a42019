"""Run the real agent (real ZooKeeper, real signals) with a kernel-free backend.

``python -m tests.agent.fakeagent neti.yml`` is ``neti agent -c neti.yml`` except that the
dataplane is a recorder: the lifecycle tests need no root and no namespace. Each apply is
appended to ``<state_dir>/applied.jsonl`` (members' overlay IPs), so a test can tell what
the agent would have programmed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from neti import config
from neti.agent.core import Agent
from neti.agent.ports import DataplanePort
from neti.dataplane.base import ApplyResult
from neti.dataplane.system import System
from neti.desired import DesiredState
from neti.desired.model import Delta
from neti.errors import NetiError


class RecordingBackend:
    name = "recording"
    system: System | None = None  # no kernel: no conntrack priming, no lock

    def __init__(self, state_dir: str):
        self.out = Path(state_dir) / "applied.jsonl"

    def apply(self, desired: DesiredState, generation: int | None = None) -> ApplyResult:
        dnat = sorted(str(d.overlay_ip) for d in desired.dnat)
        with self.out.open("a") as f:
            f.write(json.dumps({"at": time.time(), "dnat": dnat}) + "\n")
        return ApplyResult(backend=self.name, changed=True)

    def apply_delta(self, delta: Delta, generation: int | None = None) -> ApplyResult | None:
        return None  # no element updates: every change is recorded as a full apply

    def keep_open(self) -> None:
        pass

    def close(self) -> None:
        pass


def _conforms(backend: RecordingBackend) -> DataplanePort:
    """Never called: mypy checks the recorder against the agent's port."""
    return backend


def main(argv: list[str]) -> int:
    """``neti agent -c argv[0]`` (as neti.cli runs it) with the recording backend."""
    logging.basicConfig(level=logging.WARNING, format="neti: %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config.load(argv[0])
        backend = RecordingBackend(cfg.state_dir)
        return Agent.build(argv[0], cfg, select_backend=lambda _cfg: backend).run()
    except NetiError as exc:
        print(f"neti: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
