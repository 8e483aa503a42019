"""``neti agent``: the long-running agent (systemd: packaging/neti.service, Type=notify)."""

from __future__ import annotations

import argparse

from neti.agent import memory
from neti.agent.core import Agent
from neti.cli.common import add_config, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "agent",
        help="run the agent: register, watch the fleet, keep the kernel in step",
        description=(
            "Run until a signal: SIGTERM exits keeping the ZooKeeper session for a restart, "
            "SIGINT/SIGUSR1 leave the fleet; both keep the rules. SIGHUP reloads the config. "
            "Logs to stderr; see docs/operations.md."
        ),
    )
    add_config(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    memory.one_arena()  # before kazoo starts a thread: neti/agent/memory.py
    cfg = load_config(args)
    return Agent.build(args.config, cfg, verbose=args.verbose).run()
