"""The ``neti`` command: one small module per command group, registered here.

Every command takes ``-c FILE``; every command that prints data takes ``--json``. Expected
failures (NetiError) print one clear message and exit with its code; anything else prints
"internal error" with the exception, and the traceback only with ``NETI_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from neti import __version__
from neti.errors import NetiError

# Each module defines ``register(subparsers)``; a parser's ``func(args) -> int`` runs it.
COMMAND_MODULES = [
    "neti.cli.config_cmd",
    "neti.cli.registry_cmd",
    "neti.cli.dataplane_cmd",
    "neti.cli.agent_cmd",
    "neti.cli.status_cmd",
    "neti.cli.fleet_cmd",
    "neti.cli.zkproxy_cmd",
    "neti.cli.encryption_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neti",
        description="One flat, firewalled overlay network across networks that cannot route.",
    )
    parser.add_argument("--version", action="version", version=f"neti {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="neti: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kazoo").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    try:
        return int(args.func(args) or 0)
    except NetiError as exc:
        print(f"neti: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("neti: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("NETI_DEBUG"):
            raise
        print(f"neti: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("neti: run with NETI_DEBUG=1 for the traceback and report it", file=sys.stderr)
        return 70
