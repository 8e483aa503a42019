"""``neti zkproxy apply|status|remove``: make this host a ZooKeeper proxy for the far network.

Runs on the proxy host itself (in its own network namespace). ``-c`` is read when given or
present, only to validate it; a proxy host needs no Neti agent.
"""

from __future__ import annotations

import argparse
import os
import sys

from neti import config as config_mod
from neti.cli.common import add_config, add_json, print_json
from neti.zkproxy import DEFAULT_PORT, ZkProxy, make_spec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "zkproxy",
        help="make this host a ZooKeeper proxy (DNAT to one ensemble member)",
        description="Forward the ZooKeeper port of this host to one ensemble member, for "
        "the hosts of the --allow networks only (clients in networks that cannot reach the "
        "ensemble privately). It forwards TCP: ZooKeeper's TLS runs end to end through it.",
    )
    zsub = p.add_subparsers(dest="zkproxy_command", metavar="SUBCOMMAND", required=True)

    a = zsub.add_parser("apply", help="install or update the proxy rules (idempotent)")
    add_config(a)
    add_json(a)
    a.add_argument("--target", required=True, metavar="HOST:PORT", help="the ensemble member")
    a.add_argument(
        "--listen-port",
        type=int,
        default=DEFAULT_PORT,
        metavar="PORT",
        help=f"port clients connect to on this host (default {DEFAULT_PORT})",
    )
    a.add_argument(
        "--allow",
        action="append",
        metavar="CIDR",
        help="proxy clients from this IPv4 network or address (repeatable; required: with "
        "none, apply refuses and changes nothing)",
    )
    a.set_defaults(func=run_apply)

    s = zsub.add_parser("status", help="show the proxy rules; exit 0 only when healthy")
    add_config(s)
    add_json(s)
    s.set_defaults(func=run_status)

    r = zsub.add_parser("remove", help="remove the proxy rules and end proxied connections")
    add_config(r)
    add_json(r)
    r.set_defaults(func=run_remove)


def _check_config(args: argparse.Namespace) -> None:
    if args.config != config_mod.DEFAULT_PATH or os.path.exists(args.config):
        config_mod.load(args.config)


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        print(f"neti: warning: {w}", file=sys.stderr)


def run_apply(args: argparse.Namespace) -> int:
    _check_config(args)
    spec = make_spec(args.target, args.listen_port, args.allow)
    proxy = ZkProxy()
    result = proxy.apply(spec)
    if args.json:
        print_json({**spec.as_dict(), "backend": proxy.label, **result.as_dict()})
    else:
        state = "" if result.changes else ": unchanged"
        sources = ", ".join(map(str, spec.allow))
        print(
            f"zkproxy tcp/{spec.listen_port} from {sources} -> {spec.target} ({proxy.label}){state}"
        )
        for c in result.changes:
            print(f"  {c}")
    _warn(result.warnings)
    return 1 if result.warnings else 0


def run_status(args: argparse.Namespace) -> int:
    _check_config(args)
    st = ZkProxy().status()
    if args.json:
        print_json(st.as_dict())
        return 0 if st.healthy else 1
    if not st.installed:
        print(f"zkproxy NOT INSTALLED ({st.backend})")
        return 1
    level = "OK" if st.healthy else "WARNING"
    what = f"tcp/{st.spec.listen_port} -> {st.spec.target}" if st.spec else "unreadable rules"
    print(f"zkproxy {level} - {what} ({st.backend})")
    if st.spec:
        print(f"allowed sources: {', '.join(map(str, st.spec.allow))}")
    print(f"ip_forward: {st.ip_forward}")
    for p in st.problems:
        print(f"problem: {p}")
    return 0 if st.healthy else 1


def run_remove(args: argparse.Namespace) -> int:
    _check_config(args)
    proxy = ZkProxy()
    result = proxy.remove()
    if args.json:
        print_json({"backend": proxy.label, **result.as_dict()})
    else:
        print(f"zkproxy removed ({proxy.label})" if result.changes else "zkproxy: not installed")
        for c in result.changes:
            print(f"  {c}")
    _warn(result.warnings)
    return 0
