"""``neti encryption``: this host's WireGuard key (``encryption.mode: wireguard``).

``show`` prints the public key (never the private one); ``rotate`` replaces the key pair
atomically and tells the running agent (SIGHUP), which publishes the new public key in its
signed member record and writes the new private key into the interface. Peers follow as
they read the record (docs/operations.md, "Rotating a host's WireGuard key").
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

from neti import state as state_mod
from neti.cli.common import add_config, add_json, load_config, print_json
from neti.config import Config
from neti.errors import NetiError
from neti.identity import wireguard as wg
from neti.status import agent_process


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encryption",
        help="this host's WireGuard key: show it, rotate it",
        description="This host's WireGuard key pair, kept in state_dir (mode 0600).",
    )
    cmds = p.add_subparsers(dest="encryption_command", metavar="ACTION", required=True)
    show = cmds.add_parser("show", help="the public key, interface and port this host uses")
    add_config(show)
    add_json(show)
    show.set_defaults(func=run_show)
    rotate = cmds.add_parser(
        "rotate",
        help="a new key pair; the running agent publishes it and peers follow",
        description=(
            "Replace this host's WireGuard key pair atomically and send the running agent "
            "SIGHUP: it publishes the new public key in its signed record and writes the new "
            "private key into the interface. Tunnelled connections pause until the peers "
            "have the new key (seconds), then carry on."
        ),
    )
    add_config(rotate)
    add_json(rotate)
    rotate.add_argument(
        "--no-reload",
        action="store_true",
        help="only replace the key file; the agent takes it at its next SIGHUP or start",
    )
    rotate.set_defaults(func=run_rotate)


class EncryptionOff(NetiError):
    """The command needs ``encryption.mode: wireguard``."""

    exit_code = 2


def _need_on(cfg: Config, path: str) -> None:
    if not cfg.encryption.on:
        raise EncryptionOff(f"{path}: encryption.mode is off: no WireGuard key is used here")


def run_show(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    _need_on(cfg, args.config)
    pair = wg.load(wg.key_path(cfg.state_dir))
    enc = cfg.encryption
    out = {
        "public_key": pair.public,
        "key_file": str(pair.path),
        "interface": enc.interface,
        "listen_port": enc.listen_port,
        "scope": enc.scope,
        "implementation": enc.implementation,
    }
    if args.json:
        print_json(out)
    else:
        for k, v in out.items():
            print(f"{k + ':':16}{v}")
    return 0


def _agent(cfg: Config) -> tuple[int, bool]:
    """The running agent's pid, if one runs for this state_dir."""
    runtime = state_mod.read_runtime(state_mod.runtime_path(cfg.runtime_dir, cfg.state_dir))
    try:
        saved = state_mod.read(cfg.state_dir)
    except state_mod.StateFileError:
        saved = None
    return agent_process(saved, runtime)


def run_rotate(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    _need_on(cfg, args.config)
    path = wg.key_path(cfg.state_dir)
    try:
        old: str | None = wg.load(path).public
    except wg.KeyFileError:
        old = None  # none yet, or unusable: rotating replaces it either way
    pair = wg.rotate(cfg.state_dir)
    out: dict[str, Any] = {"public_key": pair.public, "previous": old, "key_file": str(path)}
    pid, running = _agent(cfg)
    out["agent_pid"] = pid if running else None
    out["agent_told"] = False
    if running and not args.no_reload:
        try:
            os.kill(pid, signal.SIGHUP)
            out["agent_told"] = True
        except OSError as exc:  # it exited meanwhile, or is not ours to signal
            out["agent_error"] = f"could not signal pid {pid}: {exc.strerror or exc}"
    if args.json:
        print_json(out)
        return 0
    print(f"rotated {path}: public key {pair.public}" + (f" (was {old})" if old else ""))
    if out["agent_told"]:
        print(
            f"told the agent (pid {pid}, SIGHUP): it publishes the new key in its record and "
            f"writes it into {cfg.encryption.interface}; peers follow within seconds"
        )
    elif "agent_error" in out:
        print(f"{out['agent_error']}: reload the agent (SIGHUP) to publish the new key")
    elif running:
        print(f"the agent (pid {pid}) takes the new key at its next reload (SIGHUP) or start")
    else:
        print("no agent is running here: it publishes the new key when it starts")
    return 0
