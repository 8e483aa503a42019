"""``neti config check``: validate a config and print it normalized."""

from __future__ import annotations

import argparse
import sys

import yaml

from neti import config as config_mod
from neti.cli.common import add_config, add_json, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect the configuration")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    check = csub.add_parser("check", help="validate a config; print it normalized")
    add_config(check)
    add_json(check)
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)  # logs cfg.warnings() to stderr itself
    if not cfg.secured:
        print(
            "neti: warning: the registry is open: no zk_tls.cert, zk_auth or zk_acl, so anyone "
            "who reaches ZooKeeper can change every host's firewall (docs/security.md)",
            file=sys.stderr,
        )
    data = config_mod.normalized(cfg)
    if args.json:
        print_json(data)
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
    return 0
