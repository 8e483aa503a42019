"""``neti status``: a monitoring check (exit 0 OK, 1 WARNING, 2 CRITICAL)."""

from __future__ import annotations

import argparse

from neti.cli.common import add_config, add_json, load_config, print_json
from neti.status import gather, render_text, to_dict, trust, trust_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="this host's health from the state file and the kernel (exit 0/1/2)",
        description=(
            "Reads the agent's state file and the kernel, not ZooKeeper. Exit codes follow "
            "Nagios/Sensu: 0 OK, 1 WARNING, 2 CRITICAL (see docs/operations.md)."
        ),
    )
    add_config(p)
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    report = gather(cfg)
    if args.json:
        print_json({**to_dict(report), "trust": trust(cfg)})
    else:
        lines = render_text(report).split("\n")
        # The trust line goes after the zookeeper line (or last when there is none).
        at = next((i + 1 for i, ln in enumerate(lines) if ln.startswith("zookeeper:")), len(lines))
        lines.insert(at, trust_text(trust(cfg)))
        print("\n".join(lines))
    return report.code
