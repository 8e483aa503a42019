"""A WireGuard public key's text form, checked strictly: what a member's signed record may
carry and what ``wg`` prints. Pure; the key pair itself lives in neti/identity/wireguard.py."""

from __future__ import annotations

import base64
import binascii

KEY_BYTES = 32
KEY_CHARS = 44  # base64 of 32 bytes, with its one '='
_ZERO = bytes(KEY_BYTES)


def decode_key(text: str | bytes) -> bytes:
    """The 32 bytes of a WireGuard key in its base64 form; ValueError naming the problem.

    Strict: canonical base64 (what ``wg`` prints and encoding the bytes gives back), exactly
    32 bytes, not all zero (a peer with it could never complete a handshake)."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    if len(raw) != KEY_CHARS:
        raise ValueError(f"{len(raw)} characters, a key has {KEY_CHARS}")
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(key) != KEY_BYTES or base64.b64encode(key) != raw:
        raise ValueError("not the base64 of 32 bytes")
    if key == _ZERO:
        raise ValueError("an all-zero key")
    return key


def public_key(text: str | bytes) -> str:
    """``text`` if it is a WireGuard public key in canonical form; else ValueError."""
    decode_key(text)
    return text if isinstance(text, str) else text.decode("ascii")
