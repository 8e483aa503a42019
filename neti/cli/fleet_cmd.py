"""``neti fleet``: the operator's view of the whole fleet, from ZooKeeper and EC2.

These commands run on an operator's machine, not on a member: they need no identity, only
the ZooKeeper hosts of one network (``--network``; see ``_network``) and, for anything EC2,
boto3's usual credentials and region (``--region``, AWS_DEFAULT_REGION, ~/.aws/config).
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any, TextIO

from kazoo.exceptions import NoAuthError
from packaging.version import InvalidVersion, Version

from neti import __version__
from neti.aws import ec2, fleetops
from neti.aws.ec2 import AwsError
from neti.aws.tags import overlay_tags
from neti.cli.common import add_config, add_json, load_config, print_json, print_table
from neti.config import Config, StaticIdentity
from neti.errors import NetiError
from neti.fleet import addr
from neti.fleet.addr import MalformedEntry, label
from neti.registry import Registry, connect
from neti.registry import acl as acl_mod
from neti.registry import quota as quota_mod
from neti.registry.claims import ClaimConflictError
from neti.registry.client import check_trust
from neti.registry.paths import RELEASE_NODE
from neti.registry.quota import LimitChange, LimitsPlan
from neti.registry.survey import PRUNABLE, Survey


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fleet",
        help="operate the whole fleet (members, addresses, audit, gc)",
        description="Operator commands for the whole fleet: ZooKeeper plus EC2.",
    )
    fsub = p.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND", required=True)

    def cmd(name: str, help_: str, func: Any, ec2: bool = False) -> argparse.ArgumentParser:
        c = fsub.add_parser(name, help=help_, description=help_)
        add_config(c)
        add_json(c)
        c.add_argument(
            "--network",
            metavar="LABEL",
            help="use this network's zk_hosts (default: the static identity's network, "
            "else the 'default' entry, else the first entry)",
        )
        if ec2:
            c.add_argument("--region", metavar="REGION", help="AWS region (default: boto3's)")
        c.set_defaults(func=func)
        return c

    # In this order in `neti fleet --help`.
    _register_views(cmd)
    _register_settings(cmd)
    _register_cleanup(cmd)
    _register_secure(cmd)


# cmd(name, help, run function, ec2=False): one subcommand with the common options.
_Cmd = Callable[..., argparse.ArgumentParser]


def _register_views(cmd: _Cmd) -> None:
    m = cmd("members", "the live fleet, naturally sorted by Name tag", run_members, ec2=True)
    m.add_argument("--no-ec2", action="store_true", help="do not ask EC2 for Name tags")

    cmd(
        "ips",
        "used and free overlay addresses; claims without a live member; forged and excess claims",
        run_ips,
    )

    a = cmd(
        "audit",
        "EC2 instances not in the fleet, outdated agents, members EC2 no longer knows",
        run_audit,
        ec2=True,
    )
    a.add_argument(
        "--no-ec2",
        action="store_true",
        help="the registry only: forged and excess claims, revoked hosts' and junk nodes",
    )
    a.add_argument(
        "--below-version",
        metavar="V",
        default=__version__,
        help=f"report members whose agent is older than V (default {__version__}); "
        "members of unknown version (original agents) count as older",
    )


def _register_settings(cmd: _Cmd) -> None:
    s = cmd("set", "set a fleet-wide setting", run_set)
    s.add_argument("key", choices=["max-change"], help="max-change: the mass-removal guard")
    s.add_argument("value", type=_non_negative, metavar="N")
    g = cmd("get", "show a fleet-wide setting", run_get)
    g.add_argument("key", choices=["max-change"])

    cmd(
        "release-guard",
        "let the removals every agent's guard holds right now through, once",
        run_release_guard,
    )

    rv = cmd(
        "revoke",
        "stop every agent programming these instances, whatever they publish (a compromised "
        "host; operator identity needed; docs/security.md)",
        run_revoke,
    )
    rv.add_argument("instance_ids", metavar="INSTANCE-ID", nargs="+")
    ur = cmd("unrevoke", "take instances off the revoked list", run_unrevoke)
    ur.add_argument("instance_ids", metavar="INSTANCE-ID", nargs="+")
    cmd("revoked", "the revoked instances", run_revoked)


def _register_cleanup(cmd: _Cmd) -> None:
    pr = cmd(
        "prune",
        "delete forged and excess claims, revoked hosts' nodes, persistent and unreadable "
        "nodes (operator identity needed; docs/operations.md)",
        run_prune,
    )
    pr.add_argument("--dry-run", action="store_true", help="show what would be deleted")
    pr.add_argument(
        "--only",
        metavar="KIND",
        action="append",
        choices=list(PRUNABLE),
        help=f"prune only this kind (repeatable): {', '.join(PRUNABLE)}",
    )

    r = cmd("release", "remove an instance's overlay IP claim", run_release_claim)
    r.add_argument("instance_id", metavar="INSTANCE-ID")
    r.add_argument(
        "--force",
        action="store_true",
        help="release even while the instance is a live member (its agent re-claims)",
    )

    gc = cmd(
        "gc",
        "release claims of instances EC2 reports terminated or unknown",
        run_gc,
        ec2=True,
    )
    gc.add_argument("--dry-run", action="store_true", help="show what would be released")

    rc = cmd(
        "restore-claims",
        "re-create overlay IP claims from EC2 overlay_ip tags (after ZooKeeper lost its data "
        "and the hosts' state files are gone too; docs/operations.md)",
        run_restore_claims,
        ec2=True,
    )
    rc.add_argument(
        "--from-tags", action="store_true", required=True, help="read EC2 overlay_ip tags"
    )
    rc.add_argument("--dry-run", action="store_true", help="show what would be created")
    rc.add_argument(
        "--identities",
        metavar="FILE",
        help="whose ZooKeeper id owns each restored claim: 'INSTANCE-ID SCHEME:ID' lines "
        "(default with a client certificate: x509:CN=<instance ID>)",
    )


def _register_secure(cmd: _Cmd) -> None:
    sec = cmd(
        "secure",
        "set Neti's ACLs on an existing open registry tree (operator identity needed; "
        "docs/security.md)",
        run_secure,
    )
    sec.add_argument("--dry-run", action="store_true", help="show what would change")
    sec.add_argument(
        "--identities",
        metavar="FILE",
        help="whose ZooKeeper id owns each instance's nodes: 'INSTANCE-ID SCHEME:ID' lines "
        "(default with a client certificate: x509:CN=<instance ID>; required for digest)",
    )
    sec.add_argument(
        "--max-hosts",
        type=_positive,
        metavar="N",
        help="size the ZooKeeper quota on zk_prefix for N hosts (default: every address of "
        "overlay_subnet; docs/operations.md)",
    )
    sec.add_argument(
        "--lock-root",
        action="store_true",
        help="also take node creation outside zk_prefix (/, /zookeeper) away from all but "
        "operators, where no quota applies: on an ensemble of Neti's own",
    )


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


# --- plumbing -----------------------------------------------------------------------------


def _network(cfg: Config, given: str | None) -> str:
    """The network whose zk_hosts an operator's command uses."""
    if given:
        if given not in cfg.zk_hosts and "default" not in cfg.zk_hosts:
            known = ", ".join(cfg.zk_hosts)
            raise NetiError(f"--network {given!r}: zk_hosts has no such entry (known: {known})")
        return given
    if isinstance(cfg.identity, StaticIdentity):
        return cfg.identity.network
    if "default" in cfg.zk_hosts:
        return "default"
    return next(iter(cfg.zk_hosts))


@contextmanager
def _registry(cfg: Config, args: argparse.Namespace) -> Iterator[Registry]:
    reg = connect(cfg, _network(cfg, args.network))
    try:
        yield reg
    finally:
        reg.close()


class Progress:
    """``\\r[n/N]`` on stderr for long runs, only when stderr is a terminal."""

    def __init__(self, what: str, stream: TextIO | None = None):
        self.what = what
        self.stream = stream or sys.stderr
        self.active = self.stream.isatty()
        self.shown = False

    def __call__(self, n: int, total: int | None = None) -> None:
        if not self.active:
            return
        count = f"{n}/{total}" if total else str(n)
        self.stream.write(f"\r{self.what} [{count}]")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def _describe(cfg: Config, args: argparse.Namespace, ids: list[str] | None = None) -> Any:
    client = ec2.ec2_client(cfg, args.region)
    progress = Progress("EC2 instances")
    try:
        return ec2.describe_instances(client, ids, progress=progress)
    finally:
        progress.done()


def _section(title: str, rows: list[tuple[Any, ...]], headers: list[str]) -> None:
    """A titled, indented table (nothing but the title when empty)."""
    print(f"{title}: {len(rows)}")
    if not rows:
        return
    buf = io.StringIO()
    with redirect_stdout(buf):
        print_table(rows, headers)
    for line in buf.getvalue().splitlines():
        print(f"  {line}")


def _warn(msg: str) -> None:
    print(f"neti: warning: {msg}", file=sys.stderr)


# --- members ------------------------------------------------------------------------------


def run_members(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with _registry(cfg, args) as reg:
        fleet = reg.read_fleet()
        claims = reg.claims()
    instances = None
    ec2_note = "not asked (--no-ec2)"
    if not args.no_ec2:
        ids = list(fleetops.real_ids(fleet, claims).values())
        try:
            instances = _describe(cfg, args, ids)
            ec2_note = "ok"
        except AwsError as exc:
            ec2_note = f"unavailable: {exc}"
            _warn(f"no Name tags, sorting by instance ID: {exc}")
    rows = fleetops.member_rows(fleet, claims, instances)
    if args.json:
        print_json(
            {
                "members": [r.as_dict() for r in rows],
                "count": len(rows),
                "by_network": fleet.by_network(),
                "skipped": fleet.skipped,
                "skipped_by_reason": dict(fleet.skipped_by_reason),
                "skipped_reasons": list(fleet.skipped_reasons),
                "ec2": ec2_note,
            }
        )
        return 0
    print_table(
        [
            (
                r.name or "-",
                r.instance_id,
                r.member.network,
                r.member.overlay_ip,
                r.member.private_ip,
                r.member.public_ip,
                r.member.version or ("legacy" if r.member.legacy else "-"),
            )
            for r in rows
        ],
        ["NAME", "INSTANCE", "NETWORK", "OVERLAY", "PRIVATE", "PUBLIC", "VERSION"],
    )
    nets = ", ".join(f"{n} {c}" for n, c in fleet.by_network().items())
    tail = f"{len(rows)} members" + (f" ({nets})" if nets else "")
    if fleet.skipped:
        why = ", ".join(f"{code} {n}" for code, n in fleet.skipped_by_reason.items())
        tail += f"; {fleet.skipped} registry entries skipped ({why})"
    print(tail)
    return 0


# --- ips ----------------------------------------------------------------------------------


def _survey(reg: Registry) -> Survey:
    progress = Progress("reading claims")
    try:
        return reg.survey(progress)
    finally:
        progress.done()


def _who(counts: dict[str, int]) -> str:
    top = list(counts.items())[:5]
    more = ", ..." if len(counts) > 5 else ""
    return f" (held by {', '.join(f'{w}: {n}' for w, n in top)}{more})" if top else ""


def run_ips(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with _registry(cfg, args) as reg:
        fleet = reg.read_fleet()
        claims = reg.claims()
        found = _survey(reg)
    report = fleetops.ip_report(cfg.overlay_subnet, claims, fleet, found.used)
    excess = dict(found.by_owner("excess").most_common())
    forged = dict(found.by_owner("forged").most_common())
    if args.json:
        print_json(
            {
                **report.as_dict(),
                "id_to_ip": found.id_to_ip,
                "ip_to_id": found.ip_to_id,
                "forged": found.count("forged"),
                "excess": found.count("excess"),
                "forged_by_owner": forged,
                "excess_by_owner": excess,
            }
        )
        return 0
    print(
        f"overlay subnet {report.subnet}: {report.usable} usable, {report.usable - report.free} "
        f"used, {report.free} free ({found.id_to_ip} id-to-ip, {found.ip_to_id} ip-to-id nodes)"
    )
    if report.used:
        print()
        print_table(
            [(ip, iid, "live" if live else "STALE") for ip, iid, live in report.used],
            ["OVERLAY", "OWNER", "STATE"],
        )
    print()
    print(f"claims without a live member: {len(report.stale)}")
    for ip, iid in report.stale:
        print(f"  {ip!s:<15}  {iid}")
    for ip, iid in report.outside:
        print(f"claim outside {report.subnet}: {ip} {iid}")
    for m in report.unclaimed:
        print(f"live member without a claim: {m.instance_id} {m.overlay_ip}")
    if forged or excess:
        print()
        print(f"forged claims: {found.count('forged')}{_who(forged)}")
        print(f"excess claims: {found.count('excess')}{_who(excess)}")
        print("(neti fleet audit --no-ec2 lists them; neti fleet prune removes them)")
    return 0


# --- audit --------------------------------------------------------------------------------


def run_audit(args: argparse.Namespace) -> int:
    try:
        below = Version(args.below_version)
    except InvalidVersion:
        raise NetiError(f"--below-version {args.below_version!r} is not a version") from None
    cfg = load_config(args)
    with _registry(cfg, args) as reg:
        fleet = reg.read_fleet()
        claims = reg.claims()
        found = _survey(reg)
    if args.no_ec2:
        rows = fleetops.member_rows(fleet, claims, None)
        outdated = [r for r in rows if fleetops.older_than(r.member.version, below)]
        if args.json:
            print_json(
                {
                    "below_version": str(below),
                    "outdated": [r.as_dict() for r in outdated],
                    "registry": found.as_dict(),
                    "ec2": "not asked (--no-ec2)",
                }
            )
            return 0
        _print_outdated(below, outdated)
        _print_survey(found)
        return 0
    instances = _describe(cfg, args)  # every instance, every page: the audit needs them all
    result = fleetops.audit(fleet, claims, instances, below)
    if args.json:
        print_json({**result.as_dict(), "registry": found.as_dict()})
        return 0
    _section(
        "running EC2 instances not in the fleet",
        [
            (i.name or "-", i.instance_id, i.private_ip or "-", i.vpc_id or "-")
            for i in result.not_in_fleet
        ],
        ["NAME", "INSTANCE", "PRIVATE", "VPC"],
    )
    _print_outdated(below, result.outdated)
    _section(
        "members EC2 no longer knows",
        [(r.instance_id, r.member.overlay_ip, why) for r, why in result.gone],
        ["INSTANCE", "OVERLAY", "EC2"],
    )
    _print_survey(found)
    print(f"summary: {result.summary()}")
    return 0


def _print_outdated(below: Version, rows: list[fleetops.Row]) -> None:
    _section(
        f"members below {below}",
        [
            (r.name or "-", r.instance_id, r.member.overlay_ip, r.member.version or "unknown")
            for r in rows
        ],
        ["NAME", "INSTANCE", "OVERLAY", "VERSION"],
    )


SURVEY_TITLES = {
    "forged": "forged claims (not owned by the instance they name, or not claims)",
    "excess": "excess claims (one owner, more than one claim)",
    "revoked": "nodes of revoked instances",
    "persistent": "persistent member nodes",
    "unreadable": "nodes ZooKeeper refuses to read",
    "open": "claims from the open days (neti fleet secure gives them their owner)",
    "reserved": "addresses held while the host's id-to-ip is forged",
}


def _print_survey(found: Survey) -> None:
    """The registry's part of the audit: one section per kind that has findings."""
    for kind, title in SURVEY_TITLES.items():
        rows = [(f.path, f.owner or "-", f.why) for f in found.of(kind)]
        if rows:
            _section(title, rows[:200], ["NODE", "OWNER", "WHY"])
            if len(rows) > 200:
                print(f"  ... {len(rows) - 200} more (--json lists all)")
    print(f"registry: {found.summary()}")


# --- set / get ----------------------------------------------------------------------------


def run_set(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with _registry(cfg, args) as reg:
        before = reg.max_change()
        reg.set_max_change(args.value)
        after = reg.max_change()
    if args.json:
        print_json({"max_change": after, "previous": before})
    else:
        print(f"max-change {after} (was {before})")
    return 0


def run_get(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with _registry(cfg, args) as reg:
        value = reg.max_change()
    if args.json:
        print_json({"max_change": value})
    else:
        print(f"max-change {value}")
    return 0


# --- release-guard ------------------------------------------------------------------------


def run_release_guard(args: argparse.Namespace) -> int:
    """Bump ``<prefix>/guard-release``: each agent applies the fleet it reads, once.

    A one-shot token rather than a raised maxchange: nothing to remember to set back, and
    removals after this moment are guarded as before.
    """
    cfg = load_config(args)
    path = cfg.path(RELEASE_NODE)
    data = json.dumps({"at": round(time.time(), 3), "by": socket.gethostname()[:255]}).encode()
    with _registry(cfg, args) as reg:
        version = reg.request_guard_release(data)
    if args.json:
        print_json({"path": path, "version": version, "released": True})
    else:
        print(
            f"guard release requested ({path}, version {version}): every agent lets what its "
            "guard holds now through, once; watch `neti status` on the hosts"
        )
    return 0


# --- revoke / unrevoke / revoked -----------------------------------------------------------


def _valid_ids(ids: list[str]) -> list[str]:
    try:
        return [label(i, "instance ID") for i in ids]
    except MalformedEntry as exc:
        raise NetiError(str(exc)) from None


def _print_revoked(args: argparse.Namespace, ids: frozenset[str], note: str) -> None:
    if args.json:
        print_json({"revoked": sorted(ids)})
        return
    print(note)
    for i in sorted(ids):
        print(i)


def run_revoke(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    ids = _valid_ids(args.instance_ids)
    with _registry(cfg, args) as reg:
        now = reg.change_revoked(ids, [])
    _print_revoked(
        args,
        now,
        f"revoked {', '.join(ids)}: every agent leaves them out at its next event "
        f"(`neti status` on the hosts shows them as skipped, reason revoked); "
        f"{len(now)} revoked in all:",
    )
    return 0


def run_unrevoke(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    ids = _valid_ids(args.instance_ids)
    with _registry(cfg, args) as reg:
        now = reg.change_revoked([], ids)
    _print_revoked(args, now, f"unrevoked {', '.join(ids)}; {len(now)} revoked in all:")
    return 0


def run_revoked(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with _registry(cfg, args) as reg:
        ids = reg.revoked()
        problem = reg.revoked_problem
    if problem:
        print(f"warning: {problem}", file=sys.stderr)
    _print_revoked(args, ids, f"{len(ids)} revoked instances:")
    return 0


# --- prune --------------------------------------------------------------------------------


def run_prune(args: argparse.Namespace) -> int:
    """Delete what the survey finds prunable, each node at the version it was read at."""
    cfg = load_config(args)
    kinds = tuple(args.only or PRUNABLE)
    with _registry(cfg, args) as reg:
        found = _survey(reg)
        todo = found.of(*kinds)
        pruned = []
        if todo and not args.dry_run:
            progress = Progress("deleting")
            try:
                pruned = reg.prune(todo, progress)
            finally:
                progress.done()
    refused = [p for p in pruned if p.result == "refused"]
    if args.json:
        print_json(
            {
                "dry_run": bool(args.dry_run),
                "kinds": list(kinds),
                "found": [f.as_dict() for f in todo],
                "pruned": [p.as_dict() for p in pruned],
                "counts": found.counts(),
            }
        )
    elif args.dry_run:
        for f in todo:
            print(f"would delete {f.path} ({f.kind}: {f.why})")
        print(f"would delete {len(todo)} nodes ({found.summary()})")
    else:
        for p in pruned:
            print(f"{p.result} {p.finding.path} ({p.finding.kind}: {p.finding.why})")
        deleted = sum(1 for p in pruned if p.result == "deleted")
        changed = sum(1 for p in pruned if p.result == "changed")
        tail = f"; {changed} changed since they were read (run it again)" if changed else ""
        print(f"deleted {deleted} of {len(todo)} nodes{tail}")
    if refused:
        raise NetiError(
            f"ZooKeeper refused deleting {len(refused)} nodes (e.g. {refused[0].finding.path}): "
            f"not allowed for {reg.acl.identity}; this needs an operator identity "
            "(zk_acl.operators, docs/security.md)"
        )
    return 0


# --- release ------------------------------------------------------------------------------


def run_release_claim(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    iid = args.instance_id
    with _registry(cfg, args) as reg:
        fleet = reg.read_fleet()
        claims = reg.claims()
        ids = fleetops.real_ids(fleet, claims)
        live = [m for m, real in ids.items() if iid in (real, m.instance_id)]
        if live and not args.force:
            raise NetiError(
                f"{iid} is a live member (overlay IP {live[0].overlay_ip}): its agent still "
                "uses the address; stop the agent first, or pass --force"
            )
        ip = reg.release_claim(iid)
    if ip is None:
        raise NetiError(f"{iid} holds no overlay IP claim (see neti fleet ips)")
    if args.json:
        print_json({"instance_id": iid, "overlay_ip": str(ip), "was_live": bool(live)})
    else:
        print(f"released {ip} ({iid})")
    return 0


# --- secure -------------------------------------------------------------------------------


def run_secure(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    policy = _operator(cfg)
    owner_of: Callable[[str], str | None]
    if args.identities:
        mapping = acl_mod.load_identities(args.identities)
        owner_of = mapping.get
    elif policy.x509:
        owner_of = acl_mod.instance_x509_id
    else:
        raise NetiError(
            "digest identities cannot be derived from instance IDs: give --identities FILE "
            "('INSTANCE-ID digest:USER:HASH' lines)"
        )
    with _registry(cfg, args) as reg:
        progress = Progress("reading ACLs")
        try:
            changes, right = acl_mod.plan_secure(
                reg.client, reg.paths, policy, owner_of, cfg.legacy_networks, progress
            )
        finally:
            progress.done()
        done = changes
        refused: list[acl_mod.AclChange] = []
        if changes and not args.dry_run:
            progress = Progress("setting ACLs")
            try:
                done, refused = acl_mod.apply_secure(reg.client, changes, progress)
            finally:
                progress.done()
        want = quota_mod.for_fleet(cfg.overlay_subnet, args.max_hosts)
        limits, limit_changes = _secure_limits(reg, cfg, policy, want, args)
    if args.json:
        print_json(
            {
                "dry_run": bool(args.dry_run),
                "operator": policy.identity,
                "changes": [c.as_dict() for c in done],
                "refused": [c.as_dict() for c in refused],
                "unchanged": right,
                "limits": _limits_dict(want, limits, limit_changes),
            }
        )
        return 0
    verb = "would set" if args.dry_run else "set"
    for c in done:
        note = f"  ({c.note})" if c.note else ""
        print(f"{verb} {c.path}: {acl_mod.acl_text(list(c.want))}{note}")
        print(f"    was {acl_mod.acl_text(list(c.have))}")
    for c in refused:
        print(f"refused {c.path}: its ACL leaves the operators out (neti fleet prune removes it)")
    print(f"{verb} {len(done)} ACLs; {right} nodes already right")
    _print_limits(cfg.zk_prefix, limits, limit_changes, verb)
    return 0


def _operator(cfg: Config) -> acl_mod.AclPolicy:
    """This config's policy, which must name an operator (NetiError otherwise)."""
    if not cfg.secured or cfg.zk_acl is None:
        raise NetiError(
            "neti fleet secure needs an operator identity: zk_tls.cert/key or zk_auth, and "
            "zk_acl.operators listing it, in this config (docs/security.md)"
        )
    policy = check_trust(cfg)
    if not policy.is_operator:
        raise NetiError(
            f"this config authenticates as {policy.identity}, which is not in "
            "zk_acl.operators: only an operator may set ACLs (and keep the right to undo them)"
        )
    return policy


def _secure_limits(
    reg: Registry,
    cfg: Config,
    policy: acl_mod.AclPolicy,
    want: quota_mod.Quota,
    args: argparse.Namespace,
) -> tuple[LimitsPlan, list[LimitChange]]:
    """The ensemble's own limits: a quota on the prefix, its nodes locked (planned, and
    made unless --dry-run)."""
    try:
        limits = quota_mod.plan(reg.client, cfg.zk_prefix, policy, want, args.lock_root)
        limit_changes = limits.changes
        if limit_changes and not args.dry_run:
            limit_changes = quota_mod.apply(reg.client, limits, policy)
    except NoAuthError:
        raise NetiError(
            f"ZooKeeper refused setting the quota on {cfg.zk_prefix} or locking its nodes "
            f"for {policy.identity}: another identity locked {quota_mod.QUOTA_ROOT}; "
            "ZooKeeper's super user can reset it (docs/operations.md)"
        ) from None
    return limits, limit_changes


def _limits_dict(
    want: quota_mod.Quota, limits: LimitsPlan, changes: list[LimitChange]
) -> dict[str, Any]:
    return {
        "quota": {"nodes": want.nodes, "bytes": want.size},
        "usage": ({"nodes": limits.usage[0], "bytes": limits.usage[1]} if limits.usage else None),
        "changes": [c.as_dict() for c in changes],
        "open_outside": limits.open_outside,
    }


def _print_limits(prefix: str, limits: LimitsPlan, changes: list[LimitChange], verb: str) -> None:
    for c in changes:
        if c.kind == "quota":
            print(f"{verb} the quota on {prefix}: {c.want} (was {c.have})")
        else:
            note = f"  ({c.note})" if c.note else ""
            print(f"{verb} {c.path}: {c.want}{note}")
            print(f"    was {c.have}")
    usage = (
        f"; in use: {limits.usage[0]:,} nodes, {limits.usage[1]:,} bytes" if limits.usage else ""
    )
    print(
        f"quota on {prefix}: {limits.quota.describe()}{usage} (refused only by servers run "
        "with -Dzookeeper.enforceQuota=true; docs/operations.md)"
    )
    still_open = [p for p in limits.open_outside if not any(c.path == p for c in changes)]
    if still_open:
        _warn(
            f"{', '.join(still_open)}: fleet identities may create nodes there, outside "
            f"{prefix}, where no quota applies: one host could fill the ensemble; on an "
            "ensemble of Neti's own run neti fleet secure --lock-root"
        )


# --- gc -----------------------------------------------------------------------------------


def run_gc(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with _registry(cfg, args) as reg:
        fleet = reg.read_fleet()
        claims = reg.claims()
        candidates = fleetops.gc_candidates(fleet, claims)
        sample = fleetops.gc_sample(fleet, claims) if candidates else []
        instances = _describe(cfg, args, [*candidates, *sample]) if candidates else {}
        fleetops.check_same_account(sample, instances)
        plan = fleetops.gc_plan(fleet, claims, instances)
        released: list[tuple[str, Any, str]] = []
        if plan.release and not args.dry_run:
            # A member that appeared since the first read is never touched.
            now_live = fleetops.live_claims(reg.read_fleet(), reg.claims())
            progress = Progress("releasing")
            try:
                released = fleetops.release_claims(plan, now_live, reg.release_claim, progress)
            finally:
                progress.done()
    if args.json:
        out = plan.as_dict()
        out["dry_run"] = bool(args.dry_run)
        out["released"] = [
            {"instance_id": i, "overlay_ip": str(ip), "reason": w} for i, ip, w in released
        ]
        print_json(out)
        return 0
    if args.dry_run:
        for iid, ip, why in plan.release:
            print(f"would release {ip} {iid} ({why})")
    else:
        for iid, ip, why in released:
            print(f"released {ip} {iid} ({why})")
    for iid, ip, why in plan.kept:
        print(f"kept {ip} {iid}: {why}")
    count = len(plan.release) if args.dry_run else len(released)
    verb = "would release" if args.dry_run else "released"
    print(f"{verb} {count} claims; {plan.live} claims of live members untouched")
    return 0


# --- restore-claims -------------------------------------------------------------------------


def restore_plan(
    tags: dict[str, Any], claims: dict[str, Any], subnet: Any
) -> dict[str, list[tuple[str, str, str]]]:
    """Pure: what restoring claims from tags does. Lists of (instance, ip, why) under
    create / present / conflict / skipped."""
    holder = {str(ip): iid for iid, ip in claims.items()}
    plan: dict[str, list[tuple[str, str, str]]] = {
        "create": [],
        "present": [],
        "conflict": [],
        "skipped": [],
    }
    seen: dict[str, str] = {}
    for iid in sorted(tags, key=fleetops.id_key):
        ip = tags[iid]
        if not addr.usable(ip, subnet):
            plan["skipped"].append((iid, str(ip), f"not a host address of {subnet}"))
        elif iid in claims:
            why = "already claimed" if claims[iid] == ip else f"holds {claims[iid]} instead"
            plan["present"].append((iid, str(ip), why))
        elif str(ip) in holder:
            plan["conflict"].append((iid, str(ip), f"claimed by {holder[str(ip)]}"))
        elif str(ip) in seen:
            plan["conflict"].append((iid, str(ip), f"also tagged on {seen[str(ip)]}"))
        else:
            seen[str(ip)] = iid
            plan["create"].append((iid, str(ip), "from its tag"))
    return plan


def _owners(cfg: Config, identities: str | None) -> Callable[[str], str | None]:
    """Whose ZooKeeper id a claim made for another instance is written for: its host must
    own it, or the host will not adopt it. None: the caller's own (an open registry)."""
    if identities:
        mapping = acl_mod.load_identities(identities)
        return mapping.get
    if not cfg.secured:
        return lambda _iid: None
    if cfg.zk_tls is not None and cfg.zk_tls.cert is not None:
        return acl_mod.instance_x509_id
    raise NetiError(
        "digest identities cannot be derived from instance IDs: give --identities FILE "
        "('INSTANCE-ID digest:USER:HASH' lines), so each restored claim is its host's"
    )


def run_restore_claims(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    owner_of = _owners(cfg, args.identities)
    tags, problems = overlay_tags(ec2.ec2_client(cfg, args.region))
    for p in problems:
        _warn(p)
    created: list[tuple[str, str, str]] = []
    with _registry(cfg, args) as reg:
        plan = restore_plan(tags, reg.claims(), cfg.overlay_subnet)
        if not args.dry_run:
            for iid, ip, _why in plan["create"]:
                try:
                    got = reg.claim(iid, prefer=tags[iid], owner=owner_of(iid))
                except ClaimConflictError as exc:
                    plan["conflict"].append((iid, ip, str(exc)))
                    continue
                created.append((iid, str(got), "created"))
    if args.json:
        out: dict[str, Any] = {
            k: [{"instance_id": i, "overlay_ip": ip, "reason": w} for i, ip, w in v]
            for k, v in plan.items()
        }
        out["dry_run"] = bool(args.dry_run)
        out["created"] = [{"instance_id": i, "overlay_ip": ip} for i, ip, _ in created]
        out["problems"] = problems
        print_json(out)
        return 1 if plan["conflict"] else 0
    if args.dry_run:
        for iid, ip, _why in plan["create"]:
            print(f"would create {ip} {iid}")
    for iid, ip, _why in created:
        print(f"created {ip} {iid}")
    for iid, ip, why in plan["conflict"]:
        print(f"conflict {ip} {iid}: {why}")
    for iid, ip, why in plan["skipped"]:
        print(f"skipped {ip} {iid}: {why}")
    n = len(plan["create"]) if args.dry_run else len(created)
    print(
        f"{'would create' if args.dry_run else 'created'} {n} claims; "
        f"{len(plan['present'])} already present, {len(plan['conflict'])} conflicts"
    )
    return 1 if plan["conflict"] else 0
