"""``neti overlay-ip`` and ``neti members``: the registry as an operator sees it."""

from __future__ import annotations

import argparse
import sys

from neti.cli.common import add_config, add_json, load_config, print_json, print_table
from neti.config import Config
from neti.fleet.model import without_revoked
from neti.identity import source as identity_source
from neti.registry import Registry, connect


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "overlay-ip",
        help="print this host's overlay IP, claiming one if it has none",
        description="Print this host's overlay IP. A host without a claim gets a free address "
        "of overlay_subnet; a host with one always gets the same address back.",
    )
    add_config(p)
    add_json(p)
    p.add_argument(
        "--release",
        action="store_true",
        help="give the address back instead (for a host leaving for good)",
    )
    p.add_argument(
        "--instance-id",
        metavar="ID",
        help="with --release: release this instance's claim instead of this host's "
        "(a decommissioned host); needs --network or a resolvable identity",
    )
    p.add_argument("--network", metavar="LABEL", help="pick zk_hosts for this network")
    p.set_defaults(func=run_overlay_ip)

    m = sub.add_parser(
        "members",
        help="list the live fleet from ZooKeeper",
        description="List every live member (new and legacy) as this host's agent sees it.",
    )
    add_config(m)
    add_json(m)
    m.add_argument(
        "--network",
        metavar="LABEL",
        help="pick zk_hosts for this network instead of resolving this host's identity",
    )
    m.set_defaults(func=run_members)


def _open(cfg: Config, network: str | None) -> Registry:
    if network is None:
        network = identity_source.resolve(cfg).network
    return connect(cfg, network)


def run_overlay_ip(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.instance_id and not args.release:
        print("neti: --instance-id only works with --release", file=sys.stderr)
        return 2
    if args.release and args.instance_id:
        instance_id, network = args.instance_id, args.network
    else:
        me = identity_source.resolve(cfg)
        instance_id, network = me.instance_id, args.network or me.network
    with _open(cfg, network) as reg:
        if args.release:
            ip = reg.release_claim(instance_id)
            if args.json:
                print_json({"instance_id": instance_id, "released": str(ip) if ip else None})
            elif ip is None:
                print(f"neti: {instance_id} had no overlay IP claim", file=sys.stderr)
            else:
                print(ip)
            return 0
        before = reg.claim_of(instance_id)
        ip = reg.claim(instance_id)
    if args.json:
        print_json(
            {
                "instance_id": instance_id,
                "overlay_ip": str(ip),
                "overlay_subnet": str(cfg.overlay_subnet),
                "new_claim": before is None,
            }
        )
    else:
        print(ip)
    return 0


def run_members(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    # Without --network this host's identity is known: the fleet is then filtered exactly as
    # this host's agent filters it (its own addresses, its LAN, the reach address).
    me = identity_source.resolve(cfg) if args.network is None else None
    with _open(cfg, args.network or (me.network if me else None)) as reg:
        fleet = without_revoked(reg.read_fleet(identity=me), reg.revoked())
    if args.json:
        print_json(
            {
                "members": [m.as_dict() for m in fleet.members],
                "count": len(fleet.members),
                "skipped": fleet.skipped,
                "skipped_by_reason": dict(fleet.skipped_by_reason),
                "skipped_reasons": list(fleet.skipped_reasons),
            }
        )
        return 0
    rows = [
        (
            m.instance_id,
            m.network,
            m.public_ip,
            m.private_ip,
            m.overlay_ip,
            m.version or "-",
            "yes" if m.legacy else "no",
        )
        for m in fleet.members
    ]
    print_table(rows, ["INSTANCE", "NETWORK", "PUBLIC", "PRIVATE", "OVERLAY", "VERSION", "LEGACY"])
    if fleet.skipped:
        by = ", ".join(f"{k} {v}" for k, v in sorted(fleet.skipped_by_reason.items()))
        print(
            f"neti: skipped {fleet.skipped} registry entries ({by}); the warnings above, "
            "or --json, say why",
            file=sys.stderr,
        )
    return 0
