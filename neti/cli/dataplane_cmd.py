"""``neti apply`` (one reconcile from the live fleet) and ``neti uninstall``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from neti import dataplane, desired
from neti.cli.common import add_config, add_json, load_config, print_json
from neti.identity import source as identity_source
from neti.registry import connect


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "apply",
        help="make the kernel match the live fleet once",
        description="Read the fleet from ZooKeeper and write this host's DNAT rules, allowlist "
        "and filter rules, changing only what differs from the kernel. This host's overlay IP "
        "is claimed first so it reaches itself by it even before its agent joins.",
    )
    add_config(p)
    add_json(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the exact payloads and a diff against the kernel; change nothing "
        "(not even the overlay IP claim)",
    )
    p.set_defaults(func=run_apply)

    u = sub.add_parser(
        "uninstall",
        help="remove every rule, chain, set and route Neti owns (and nothing else)",
    )
    add_config(u)
    add_json(u)
    u.set_defaults(func=run_uninstall)


def _desired(cfg: Any, dry_run: bool) -> tuple[desired.DesiredState, dict[str, Any]]:
    ident = identity_source.resolve(cfg)
    reg = connect(cfg, ident.network)
    try:
        overlay = reg.claim_of(ident.instance_id) if dry_run else reg.claim(ident.instance_id)
        fleet = reg.read_fleet()
    finally:
        reg.close()
    state = desired.compute(ident, fleet, cfg, self_overlay=overlay)
    info = {
        "identity": ident.as_dict(),
        "overlay_ip": str(overlay) if overlay else None,
        "members": len(fleet.members),
        "registry_skipped": list(fleet.skipped_reasons),
        "skipped": list(state.skipped),
    }
    return state, info


def run_apply(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    state, info = _desired(cfg, args.dry_run)
    backend = dataplane.select(cfg)
    if args.dry_run:
        plan = backend.plan(state)
        if args.json:
            print_json({**info, **plan.as_dict()})
            return 0
        _print_info(info)
        print(f"backend: {plan.backend}")
        if not plan.changed and not plan.actions:
            print("no changes: the kernel already matches")
        for action in plan.actions:
            print(f"would: {action}")
        for name, payload in plan.payloads.items():
            print(f"--- payload {name} ({backend.payload_tool(name)}) ---")
            sys.stdout.write(payload)
        if plan.diff:
            print("--- diff (kernel -> desired) ---")
            for line in plan.diff:
                print(line)
        return 0
    result = backend.apply(state)
    if args.json:
        print_json({**info, **result.as_dict()})
        return 0
    _print_info(info)
    _print_result(result, "no changes: the kernel already matched")
    print(f"done in {result.duration:.2f}s ({result.backend})")
    return 0


def _print_result(result: Any, unchanged: str) -> None:
    for w in result.warnings:
        print(f"neti: warning: {w}", file=sys.stderr)
    if result.changed:
        for c in result.changes:
            print(c)
    else:
        print(unchanged)


def _print_info(info: dict[str, Any]) -> None:
    ov = info["overlay_ip"] or "none claimed yet"
    print(
        f"host {info['identity']['instance_id']} ({info['identity']['network']}), "
        f"overlay IP {ov}, live members: {info['members']}"
    )
    for reason in info["registry_skipped"] + info["skipped"]:
        print(f"neti: warning: skipped {reason}", file=sys.stderr)


def run_uninstall(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    result = dataplane.select(cfg).uninstall()
    if args.json:
        print_json(result.as_dict())
        return 0
    _print_result(result, "nothing to remove: Neti owns nothing in this kernel")
    return 0
