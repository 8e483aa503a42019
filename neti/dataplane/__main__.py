"""Drive a backend without ZooKeeper: ``python -m neti.dataplane COMMAND``.

For the lab, tests and benchmarks: apply a DesiredState saved as JSON (``DesiredState.as_dict``)
inside a network namespace (``--netns NAME`` or run under ``ip netns exec``). Prints JSON.

    python -m neti.dataplane apply STATE.json [--netns NS] [--backend NAME]
    python -m neti.dataplane plan STATE.json [--netns NS]
    python -m neti.dataplane status [--netns NS]
    python -m neti.dataplane uninstall [--netns NS]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from neti.backends import CHOICES
from neti.dataplane import select
from neti.desired import DesiredState
from neti.errors import NetiError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neti.dataplane")
    p.add_argument("command", choices=["apply", "plan", "status", "uninstall"])
    p.add_argument("state", nargs="?", help="DesiredState JSON file (apply, plan)")
    p.add_argument("--netns", help="run inside this named network namespace")
    p.add_argument("--backend", choices=CHOICES, default="auto", help="default: auto")
    args = p.parse_args(argv)
    try:
        backend = select(None, netns=args.netns, name=args.backend)
        if args.command in ("apply", "plan"):
            if not args.state:
                p.error(f"{args.command} needs a STATE file")
            desired = DesiredState.from_dict(json.loads(Path(args.state).read_text()))
            out: Any = backend.apply(desired) if args.command == "apply" else backend.plan(desired)
        elif args.command == "status":
            out = backend.status()
        else:
            out = backend.uninstall()
    except NetiError as exc:
        print(f"neti: {exc}", file=sys.stderr)
        return exc.exit_code
    json.dump(out.as_dict(), sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
